"""The engine-measuring loop the benchmarks share (`steerserve bench --steer ...`): chat prompts,
interleaved rounds with rotated order, one timed engine run, paired ratios and the targets report.
Imported by `bench`, `bench_mixing` and `bench_proxy` (none of which imports another's loop)."""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

TOPICS = [
    "the water cycle", "how vaccines work", "the history of Rome", "black holes", "photosynthesis",
    "the French revolution", "machine learning", "volcanoes", "the stock market", "honey bees",
    "the printing press", "climate change", "the human heart", "electric cars", "the moon landing",
    "ancient Egypt", "quantum computers", "the immune system", "coral reefs", "the internet",
    "earthquakes", "the Renaissance", "DNA", "solar panels", "the Great Wall of China", "rainbows",
    "antibiotics", "the Olympic games", "glaciers", "jazz music", "the periodic table", "tea",
]


def _prompts(tokenizer, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        msgs = [{"role": "user", "content": f"Write a short explanation of {TOPICS[i % len(TOPICS)]} for a child."}]
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids))
    return out


def bench_inputs(args) -> tuple[Path, Any, Any, list[list[int]]]:
    """What every engine benchmark starts from: the checkpoint (`--model`, default the embedded
    model), its ModelInfo and tokenizer, and `--requests` chat prompts as token ids."""
    from transformers import AutoTokenizer

    from steerserve.server.model_store import ensure_embedded_model
    from steerserve.server.schema import ModelInfo

    model_dir = Path(args.model) if args.model else ensure_embedded_model()
    tok = AutoTokenizer.from_pretrained(model_dir)
    return model_dir, ModelInfo.from_checkpoint(model_dir), tok, _prompts(tok, args.requests)


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def interleaved_rounds(workloads: dict, repeats: int, run, tokens: int, label: str) -> dict[str, list[float]]:
    """`run(plans, name)` for every workload once per round, `repeats` rounds, the order rotated
    each round so no workload always runs first; returns the wall times per workload. Ratios are
    then taken within a round and the median taken over rounds: this machine's speed drifts by
    several % between minutes."""
    times: dict[str, list[float]] = {name: [] for name in workloads}
    names = list(workloads)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(run(workloads[name], name))
            _log(f"{label} {name} (round {r + 1}/{repeats}): {tokens / times[name][-1]:.1f} tok/s")
    return times


def timed_generate(llm, prompts: list[list[int]], plans: list, max_tokens: int, decode_log: list) -> float:
    """One engine run: every prompt with its plan (or None), exactly `max_tokens` greedy tokens each,
    submitted at once on a cold prefix cache. Returns the wall time; appends each request's own
    decode time (engine timestamps) to `decode_log`."""
    from vllm import SamplingParams

    llm.reset_prefix_cache()
    items = [{"prompt_token_ids": p, **({"cache_salt": pl.fingerprint()} if pl else {})}
             for p, pl in zip(prompts, plans)]
    params = [SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True, temperature=0.0,
                             extra_args={"steer": pl.to_json()} if pl else None) for pl in plans]
    t0 = time.perf_counter()
    outs = llm.generate(items, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs)
    decode_log.append([o.metrics.last_token_ts - o.metrics.first_token_ts if o.metrics else float("nan")
                       for o in outs])
    return dt


def steerable_llm(path: Path, dtype: str, max_num_seqs: int, settings: dict | None = None, compile_: bool = False,
                  tokenizer: Path | None = None):
    """The benchmarks' steerable engine on `path` (`settings`: full variants, proxy pairs; what
    `steerserve serve` passes as `--additional-config`)."""
    from vllm import LLM

    from steerserve.patches import STEERABLE_ARCHITECTURES
    from steerserve.patches.steers.base import SETTINGS_KEY

    arch = json.loads((path / "config.json").read_text())["architectures"][0]
    return LLM(model=str(path), tokenizer=str(tokenizer or path), dtype=dtype, enforce_eager=not compile_,
               max_model_len=1024, kv_cache_memory_bytes=2 << 30, max_num_seqs=max(max_num_seqs, 8), seed=0,
               disable_log_stats=False,  # per-request timestamps for the per-row ratios
               hf_overrides={"architectures": [STEERABLE_ARCHITECTURES[arch]]},
               additional_config={SETTINGS_KEY: settings} if settings else {})


def measure_engine(path: Path, prompts: list[list[int]], max_tokens: int, workloads: dict, label: str,
                   repeats: int, dtype: str, compile_: bool = False, tokenizer: Path | None = None,
                   settings: dict | None = None):
    """One steerable engine on `path`: a warm-up, then `interleaved_rounds` of `workloads`; the engine is
    shut down after. `settings`: the engine settings (full variants, proxy pairs; what `steerserve
    serve` passes as `--additional-config`). Returns (wall times per workload, per-request decode
    times per workload)."""
    from steerserve.patches.adapter.runner import shutdown_engine

    n = len(prompts)
    llm = steerable_llm(path, dtype, n, settings, compile_, tokenizer)
    decode: dict[str, list[list[float]]] = {}

    def run(plans, name):
        return timed_generate(llm, prompts, plans, max_tokens, decode.setdefault(name, []))

    run([None] * n, "warm-up")
    times = interleaved_rounds(workloads, repeats, run, n * max_tokens, label)
    shutdown_engine(llm)
    return times, decode


def decode_step_extra(decode: dict, name: str, plain: str = "plain") -> float:
    """Per round: the median over all rows of a row's decode time in workload `name` / in `plain`
    (every row waits for every step of its batch), minus 1; the median over rounds. The extra time
    per decode step that `name`'s steered rows cost the whole batch."""
    return statistics.median(statistics.median(m / p for m, p in zip(steered, base))
                             for base, steered in zip(decode[plain], decode[name])) - 1


def median_decode(decode: dict, name: str) -> float:
    """The median over rounds and requests of a request's decode time in workload `name`."""
    return statistics.median(t for round_ in decode[name] for t in round_)


def paired_ratio(times: dict, a: str, b: str) -> float:
    """Median over rounds of time(a) / time(b), i.e. tok/s(b) / tok/s(a)."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def print_targets_report(runs: dict, ratios: dict, targets: dict) -> None:
    """The runs' tok/s and the ratios, each ratio with a target marked met / NOT met."""
    print(f"\n{'run (median over rounds)':<40}{'tok/s':>10}")
    for k, v in runs.items():
        print(f"{k:<40}{v:>10.1f}")
    print(f"\n{'ratio':<56}{'value':>8}  target")
    for k, v in ratios.items():
        verdict = ""
        if k in targets:
            op, goal = targets[k]
            ok = v >= goal if op == ">=" else v <= goal
            verdict = f"{op} {goal}  {'met' if ok else 'NOT met'}"
        print(f"{k:<56}{v:>8.3f}  {verdict}")
