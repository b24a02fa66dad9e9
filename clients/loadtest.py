"""`steerserve loadtest`: concurrent streaming clients with mixed steering against a running server,
a share of them hanging up mid-stream; checks and prints what a server in front of users must keep.

For each client: a distinct prompt and one of several steering configurations, streamed from
/v1/completions with greedy decoding (`ignore_eos`, so every whole response has exactly
`max_tokens` tokens). Disconnecting clients close the stream after its first chunk
(`--hang-up-after`) and asked for a long answer (`--abort-max-tokens`), so a server that did not abort them would keep generating.

Checks, printed as figures (and returned by `run_load` for the tests):
- every completed stream is whole (finish_reason "length", `max_tokens` tokens, one response id,
  no error event), and every stream belongs to its request: the prompt tokens it carries equal
  those of the same request sent again alone (prompts are numbered, so no two are equal); with
  `--exact` (a float32 server) its tokens must equal that request's too;
- the server aborted the dropped requests: after the run nothing is running or waiting, the KV
  cache usage is back to its level before the run, and the generated-token counter grew by less
  than the completed streams plus half of what the dropped requests asked for;
- with `--pid`, the server's resident memory (the process and its children) after the run against
  a warm baseline taken after a first round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import httpx

PROMPTS = [
    "The quick brown fox jumps over the lazy dog because",
    "Once upon a time in a land far away, there lived",
    "In 1492, Columbus sailed the ocean blue and then",
    "The recipe calls for two cups of flour, one egg and",
    "Machine learning models are trained on data that",
    "The capital of France is a city known for",
    "A good night's sleep is important since",
    "The museum's newest exhibit shows",
]
# plain, the three InfoSteer modes and context attention on marked text (/v1/completions has no roles)
STEERS: list[dict | None] = [
    None,
    {"infosteer": {"mode": "scale", "alpha": 1.5}},
    {"infosteer": {"mode": "topk", "k": 8, "alpha": 3.0}},
    {"infosteer": {"mode": "lift", "p": 0.05, "alpha": 2.0}},
    {"context_attention": {"emphasis": "marked", "alpha": 0.3}},
]


def request_body(i: int, model: str, max_tokens: int, stream: bool) -> dict:
    """Client i's request: prompt i (numbered, so no two are equal) and steering config i mod 5."""
    steer = STEERS[i % len(STEERS)]
    text = f"{i}. {PROMPTS[i % len(PROMPTS)]}"
    if steer and "context_attention" in steer:
        text = f"<emphasis>Note {i}: the answer is short.</emphasis> {text}"
    body = {"model": model, "prompt": text, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "return_token_ids": True, "stream": stream}
    if steer:
        body["steer"] = steer
    return body


async def _stream(client: httpx.AsyncClient, body: dict, hang_up_after: int | None) -> dict:
    """Stream one completion; with `hang_up_after`, close after that many content chunks."""
    out = {"ids": set(), "tokens": [], "prompt_ids": None, "finish": None, "error": None, "chunks": 0,
           "closed_early": False}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            out["error"] = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
            return out
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                break
            payload = json.loads(data)
            if "error" in payload:
                out["error"] = payload["error"]
                break
            out["ids"].add(payload.get("id"))
            for choice in payload.get("choices", []):
                if choice.get("prompt_token_ids") is not None:
                    if out["prompt_ids"] is not None:
                        out["error"] = "a second prompt in one stream"
                    out["prompt_ids"] = list(choice["prompt_token_ids"])
                out["tokens"] += list(choice.get("token_ids") or [])
                out["finish"] = choice.get("finish_reason") or out["finish"]
            out["chunks"] += 1
            if hang_up_after is not None and out["chunks"] >= hang_up_after:
                out["closed_early"] = True
                break  # leaving the block closes the connection mid-stream
    return out


async def metrics(client: httpx.AsyncClient) -> dict[str, float]:
    """vLLM's gauges and counters summed over label sets (name -> value), parsed with
    prometheus-client's own text parser (counters by their `_total` sample names)."""
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, float] = {}
    for family in text_string_to_metric_families((await client.get("/metrics")).text):
        for sample in family.samples:
            if sample.name.startswith("vllm:"):
                values[sample.name] = values.get(sample.name, 0.0) + float(sample.value)
    return values


def server_rss_mb(pid: int) -> float:
    """Resident memory of `pid` and all its descendants, MiB."""
    import psutil

    proc = psutil.Process(pid)
    procs = [proc, *proc.children(recursive=True)]
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / (1 << 20)


async def _round(client, clients: int, model: str, max_tokens: int, abort_max_tokens: int,
                 disconnect_every: int, hang_up_after: int) -> list[dict]:
    tasks = []
    for i in range(clients):
        drops = disconnect_every > 0 and i % disconnect_every == disconnect_every - 1
        body = request_body(i, model, abort_max_tokens if drops else max_tokens, stream=True)
        tasks.append(_stream(client, body, hang_up_after if drops else None))
    return await asyncio.gather(*tasks)


async def _settle(client, timeout: float = 60.0) -> dict[str, float]:
    """Wait until nothing is running or waiting; returns the metrics then."""
    deadline = time.time() + timeout
    while True:
        m = await metrics(client)
        if m.get("vllm:num_requests_running", 0) == 0 and m.get("vllm:num_requests_waiting", 0) == 0:
            return m
        if time.time() > deadline:
            return m
        await asyncio.sleep(0.2)


async def run_load(base_url: str, model: str, clients: int = 64, disconnect_fraction: float = 0.25,
                   max_tokens: int = 24, abort_max_tokens: int = 200, hang_up_after: int = 1,
                   api_key: str | None = None, pid: int | None = None, timeout: float = 600.0,
                   exact: bool = False, check_aborts: bool = True) -> dict:
    """Run the load (a warm-up round first when `pid` is given) and check it; returns the figures
    and a list of `problems` (empty when every check held). `exact`: also require each completed
    stream's tokens to equal the request sent alone (true on a float32 server, whose greedy tokens do
    not move with batch composition; bfloat16 batches are not batch-invariant). `check_aborts`:
    count too many generated tokens as a problem (a slow API process may see hang-ups only after a
    fast engine finished the dropped requests: then it is reported, not judged)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    disconnect_every = round(1 / disconnect_fraction) if disconnect_fraction > 0 else 0
    # idle pooled connections are dropped after 1 s: a server closes idle keep-alive connections
    # after its header timeout (3 s on the test server), and reusing one it is closing is a read error
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8, keepalive_expiry=1.0)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout, limits=limits) as client:
        report: dict = {"clients": clients, "max_tokens": max_tokens, "abort_max_tokens": abort_max_tokens}
        if pid is not None:  # a first round grows the allocators to their working size
            await _round(client, clients, model, max_tokens, abort_max_tokens, disconnect_every, hang_up_after)
            await _settle(client)
            report["rss_baseline_mb"] = round(server_rss_mb(pid), 1)
        before = await _settle(client)
        started = time.perf_counter()
        results = await _round(client, clients, model, max_tokens, abort_max_tokens, disconnect_every, hang_up_after)
        report["seconds"] = round(time.perf_counter() - started, 2)
        after = await _settle(client)
        problems: list[str] = []
        completed = [(i, r) for i, r in enumerate(results) if not r["closed_early"]]
        dropped = [(i, r) for i, r in enumerate(results) if r["closed_early"]]
        for i, r in completed:
            if r["error"] is not None:
                problems.append(f"client {i}: error {r['error']}")
            elif r["finish"] != "length" or len(r["tokens"]) != max_tokens or len(r["ids"]) != 1:
                problems.append(f"client {i}: not whole (finish {r['finish']}, {len(r['tokens'])} tokens, "
                                f"{len(r['ids'])} ids)")
        # each stream against the same request sent alone, not streamed: the same prompt (tokens), so
        # the stream is its own; with `exact` (a float32 server, batch-invariant) also the same tokens
        crossed = same_tokens = 0
        for i, r in enumerate(results):
            if r["error"] is not None:
                continue
            drops = r["closed_early"]
            body = request_body(i, model, 1 if drops else max_tokens, stream=False)  # dropped: the prompt only
            alone = (await client.post("/v1/completions", json=body)).json()["choices"][0]
            if list(alone.get("prompt_token_ids") or []) != r["prompt_ids"]:
                crossed += 1
                problems.append(f"client {i}: the stream carries another prompt")
            if drops:
                continue
            if list(alone.get("token_ids") or []) == r["tokens"]:
                same_tokens += 1
            elif exact:
                problems.append(f"client {i}: streamed tokens differ from the same request alone")
        generated = after.get("vllm:generation_tokens_total", 0) - before.get("vllm:generation_tokens_total", 0)
        budget_if_not_aborted = len(completed) * max_tokens + len(dropped) * abort_max_tokens
        running = after.get("vllm:num_requests_running", 0) + after.get("vllm:num_requests_waiting", 0)
        kv_before = before.get("vllm:kv_cache_usage_perc", 0.0)
        kv_after = after.get("vllm:kv_cache_usage_perc", 0.0)
        if running:
            problems.append(f"{running:.0f} requests still running or waiting after the run")
        if kv_after > kv_before + 1e-9:
            problems.append(f"KV cache usage {kv_after:.4f} after the run, {kv_before:.4f} before")
        # aborted: the dropped requests stopped before half their length (a hang-up reaches the engine
        # within a few steps; a server that ignores it generates the whole budget)
        ceiling = len(completed) * max_tokens + len(dropped) * abort_max_tokens / 2
        if check_aborts and dropped and generated >= ceiling:
            problems.append(f"generated {generated:.0f} tokens (at most {ceiling:.0f} allowed): the dropped "
                            f"requests were not aborted")
        report.update({
            "completed": len(completed), "dropped": len(dropped), "crossed_streams": crossed,
            "same_tokens_as_alone": same_tokens, "exact": exact,
            "tokens_per_s": round(sum(len(r["tokens"]) for _, r in completed) / report["seconds"], 1),
            "generated_tokens": int(generated), "tokens_if_not_aborted": budget_if_not_aborted,
            "kv_usage_before": kv_before, "kv_usage_after": kv_after, "running_after": int(running),
        })
        if pid is not None:
            report["rss_after_mb"] = round(server_rss_mb(pid), 1)
            report["rss_growth_mb"] = round(report["rss_after_mb"] - report["rss_baseline_mb"], 1)
        report["problems"] = problems
        return report


def print_report(report: dict) -> None:
    print(f"[loadtest] {report['clients']} streaming clients, {report['dropped']} hung up mid-stream, "
          f"{report['completed']} completed in {report['seconds']} s ({report['tokens_per_s']} tokens/s)")
    print(f"[loadtest] streams carrying another request's prompt: {report['crossed_streams']}; completed "
          f"streams with the tokens of the same request sent alone: {report['same_tokens_as_alone']} of "
          f"{report['completed']}{' (required: float32)' if report['exact'] else ' (bfloat16 is not batch-invariant)'}")
    print(f"[loadtest] aborts: generated {report['generated_tokens']} tokens (would be "
          f"{report['tokens_if_not_aborted']} had the dropped requests run on); after the run "
          f"{report['running_after']} running, KV cache usage {report['kv_usage_before']:.4f} -> "
          f"{report['kv_usage_after']:.4f}")
    if "rss_after_mb" in report:
        print(f"[loadtest] server memory (RSS, process tree): warm baseline {report['rss_baseline_mb']} MiB, "
              f"after {report['rss_after_mb']} MiB ({report['rss_growth_mb']:+} MiB)")
    for p in report["problems"]:
        print(f"[loadtest] PROBLEM: {p}")
    print(f"[loadtest] {'OK' if not report['problems'] else 'FAILED'}")


def add_loadtest_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (default http://127.0.0.1:8000)")
    p.add_argument("--model", default=None, help="model name (default: the server's first model)")
    p.add_argument("--clients", type=int, default=64, help="concurrent streaming clients (default 64)")
    p.add_argument("--disconnect", type=float, default=0.25,
                   help="fraction of clients that hang up mid-stream (default 0.25)")
    p.add_argument("--max-tokens", type=int, default=24, help="tokens per completed response (default 24)")
    p.add_argument("--abort-max-tokens", type=int, default=200,
                   help="tokens the hanging-up clients ask for (default 200; keep below the context length)")
    p.add_argument("--hang-up-after", type=int, default=1,
                   help="content chunks a hanging-up client reads before it closes the stream (default 1)")
    p.add_argument("--pid", type=int, default=None,
                   help="the server's process id: measure its memory (a warm-up round first)")
    p.add_argument("--api-key", default=None, help="Bearer key (default $STEERSERVE_API_KEY)")
    p.add_argument("--exact", action="store_true",
                   help="also require every completed stream's tokens to equal the same request sent alone "
                        "(for a float32 server: bfloat16 batches are not batch-invariant)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the figures as JSON")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> None:
    import os

    key = args.api_key or os.environ.get("STEERSERVE_API_KEY")
    model = args.model
    if model is None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        model = httpx.get(f"{args.url}/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    report = asyncio.run(run_load(args.url, model, args.clients, args.disconnect, args.max_tokens,
                                  args.abort_max_tokens, hang_up_after=args.hang_up_after, api_key=key, pid=args.pid, exact=args.exact))
    print_report(report)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    if report["problems"]:
        raise SystemExit(1)
