"""`steerserve ab-eval`: offline A/B evaluation of steering arms against a running server.

Runs a data set through two or more arms (each a `steer` object or a server profile),
concurrently, with a progress bar, scores every (item, arm), and reports per-arm means with 95%
bootstrap intervals, each arm's paired difference from the first arm with a paired bootstrap
interval and a paired sign-flip permutation test, as a Markdown report and a PNG plot.

Data: `--data FILE.jsonl` or a ready-made offline set: squad, squad-cf, drop (generation;
passages in the prompt) and arc-easy, arc-challenge, sciq, boolq (multiple choice). JSONL rows:
- generation: {"prompt": str} or {"messages": [...]}, plus {"references": [str, ...]};
- multiple choice: {"prompt": str, "choices": [str, ...], "answer": int}.
Metrics: exact (normalised exact match), contains (a reference in the answer), f1 (token F1), mc
(multiple-choice log-likelihood: each choice is scored as the continuation of the prompt on
/v1/completions with echo, the highest total log-probability wins).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from steerserve.clients.context_eval import PROMPT  # the same reading-comprehension prompt


@dataclass
class Item:
    id: str
    messages: list | None = None  # generation
    references: tuple[str, ...] = ()
    prompt: str | None = None  # multiple choice
    choices: tuple[str, ...] = ()
    answer: int = -1


def load_items(data: str, n: int | None) -> tuple[list[Item], str]:
    """(items, default metric)."""
    from steerserve.clients import datasets as ds

    if data in ("squad", "squad-cf", "drop"):
        loader = {"squad": ds.load_squad, "squad-cf": ds.counterfactual_squad, "drop": ds.load_drop}[data]
        qa = loader(n)
        return [Item(q.id, [{"role": "user", "content": PROMPT.format(passage=q.passage, question=q.question)}],
                     q.answers) for q in qa], "contains"
    if data in ds.MC_TASKS:
        return [Item(m.id, prompt=m.query, choices=m.choices, answer=m.gold) for m in ds.load_mc(data, n)], "mc"
    path = Path(data)
    if not path.exists():
        raise SystemExit(f"--data: {data} is neither a file nor one of squad, squad-cf, drop, "
                         f"{', '.join(ds.MC_TASKS)}")
    items = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise SystemExit(f"--data: {path}:{i + 1}: not JSON: {err}") from None
        if "choices" in row:
            if not isinstance(row.get("answer"), int) or not 0 <= row["answer"] < len(row["choices"]):
                raise SystemExit(f"--data: {path}:{i + 1}: `answer` must index `choices`")
            items.append(Item(str(row.get("id", i)), prompt=row["prompt"], choices=tuple(row["choices"]),
                              answer=row["answer"]))
        else:
            messages = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
            refs = row.get("references") or ([row["reference"]] if "reference" in row else [])
            if not refs:
                raise SystemExit(f"--data: {path}:{i + 1}: needs `references`")
            items.append(Item(str(row.get("id", i)), messages, tuple(refs)))
        if n and len(items) >= n:
            break
    metric = "mc" if items and items[0].choices else "contains"
    return items, metric


def parse_arm(value: str) -> tuple[str, dict]:
    """`NAME=JSON` (a steer object), `NAME=profile:PROFILE`, or `NAME=none`."""
    name, sep, spec = value.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{value!r}: expected NAME=STEER_JSON, NAME=profile:NAME or NAME=none")
    if spec == "none":
        return name, {}
    if spec.startswith("profile:"):
        return name, {"profile": spec[len("profile:"):]}
    try:
        steer = json.loads(spec)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{value!r}: the steer is not JSON: {err}") from None
    if not isinstance(steer, dict):
        raise argparse.ArgumentTypeError(f"{value!r}: the steer must be a JSON object")
    return name, steer


# ----------------------------------------------------------------------------- statistics


def bootstrap_ci(values: list[float], resamples: int, rng: random.Random) -> tuple[float, float]:
    n = len(values)
    means = sorted(statistics.fmean(values[rng.randrange(n)] for _ in range(n)) for _ in range(resamples))
    return means[int(0.025 * resamples)], means[min(resamples - 1, int(0.975 * resamples))]


def sign_flip_p(diffs: list[float], resamples: int, rng: random.Random) -> float:
    """Two-sided paired permutation test of mean(diffs) == 0 (random sign flips)."""
    observed = abs(statistics.fmean(diffs))
    if observed == 0:
        return 1.0
    hits = 0
    for _ in range(resamples):
        if abs(statistics.fmean(d if rng.random() < 0.5 else -d for d in diffs)) >= observed - 1e-12:
            hits += 1
    return (hits + 1) / (resamples + 1)


def summarise(scores: dict[str, list[float]], resamples: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    names = list(scores)
    base = scores[names[0]]
    rows = []
    for name in names:
        vals = scores[name]
        row = {"arm": name, "n": len(vals), "mean": statistics.fmean(vals), "ci95": bootstrap_ci(vals, resamples, rng)}
        if name != names[0]:
            diffs = [a - b for a, b in zip(vals, base)]
            row["diff_vs_first"] = statistics.fmean(diffs)
            row["diff_ci95"] = bootstrap_ci(diffs, resamples, rng)
            row["p_value"] = sign_flip_p(diffs, resamples, rng)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- running


async def _score_item(client, model: str, item: Item, steer: dict, metric: str, max_tokens: int) -> float:
    from steerserve.clients import datasets as ds

    extra = {"steer": steer} if steer else {}
    if metric == "mc":
        best, best_lp = -1, float("-inf")
        for j, choice in enumerate(item.choices):
            r = await client.completions.create(model=model, prompt=item.prompt + " " + choice, max_tokens=1,
                                                echo=True, logprobs=0, temperature=0.0, extra_body=extra)
            lp = r.choices[0].logprobs
            start = len(item.prompt)
            total = sum(t for t, off in zip(lp.token_logprobs, lp.text_offset)
                        if t is not None and off >= start and off < len(item.prompt) + 1 + len(choice))
            if total > best_lp:
                best, best_lp = j, total
        return float(best == item.answer)
    r = await client.chat.completions.create(model=model, messages=item.messages, max_tokens=max_tokens,
                                             temperature=0.0, extra_body=extra)
    text = r.choices[0].message.content or ""
    if metric == "exact":
        return float(any(ds.normalise(text) == ds.normalise(ref) for ref in item.references))
    if metric == "f1":
        return ds.token_f1(text, item.references)
    return float(ds.contains(text, item.references))


async def _run_all(args, items: list[Item], arms: list[tuple[str, dict]], metric: str) -> dict[str, list[float]]:
    import openai
    from tqdm import tqdm

    client = openai.AsyncOpenAI(base_url=args.base_url, api_key=args.api_key or "none", max_retries=2,
                                timeout=args.timeout)
    model = args.model or (await client.models.list()).data[0].id
    sem = asyncio.Semaphore(args.concurrency)
    scores = {name: [0.0] * len(items) for name, _ in arms}
    bar = tqdm(total=len(items) * len(arms), desc="ab-eval", unit="req", file=sys.stderr)

    async def one(i: int, name: str, steer: dict) -> None:
        async with sem:
            scores[name][i] = await _score_item(client, model, items[i], steer, metric, args.max_tokens)
        bar.update(1)

    try:
        await asyncio.gather(*(one(i, name, steer) for i in range(len(items)) for name, steer in arms))
    except openai.BadRequestError as err:
        raise SystemExit(f"the server refused a request: {err.message}") from None
    finally:
        bar.close()
        await client.close()
    return scores


def write_report(out_dir: Path, rows: list[dict], meta: dict) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"# A/B evaluation: {meta['data']} ({meta['metric']}, n = {meta['n']})", "",
             f"Server {meta['base_url']}, model {meta['model'] or '(first listed)'}; arms: "
             + "; ".join(f"`{a}` = `{json.dumps(s)}`" for a, s in meta["arms"]), "",
             "| arm | mean | 95% CI | diff vs first | 95% CI of diff | p (paired sign-flip) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["ci95"]
        if "diff_vs_first" in r:
            dlo, dhi = r["diff_ci95"]
            tail = f"{r['diff_vs_first']:+.3f} | [{dlo:+.3f}, {dhi:+.3f}] | {r['p_value']:.4f}"
        else:
            tail = "(reference) | | "
        lines.append(f"| {r['arm']} | {r['mean']:.3f} | [{lo:.3f}, {hi:.3f}] | {tail} |")
    lines += ["", f"Intervals: {meta['resamples']} paired bootstrap resamples over items; p: "
              f"{meta['resamples']} random sign flips of the per-item differences (two-sided)."]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(rows), 3.6))
    means = [r["mean"] for r in rows]
    errs = [[r["mean"] - r["ci95"][0] for r in rows], [r["ci95"][1] - r["mean"] for r in rows]]
    ax.bar([r["arm"] for r in rows], means, yerr=errs, capsize=6, color="#4c72b0")
    ax.set_ylabel(meta["metric"])
    ax.set_title(f"{meta['data']} (n = {meta['n']}), 95% bootstrap CI")
    fig.tight_layout()
    plot = out_dir / "report.png"
    fig.savefig(plot, dpi=110)
    plt.close(fig)
    return report, plot


def run_ab_eval(args: argparse.Namespace) -> dict:
    if len(args.arm) < 2:
        raise SystemExit("--arm: give at least two arms (NAME=STEER_JSON, NAME=profile:NAME or NAME=none)")
    names = [n for n, _ in args.arm]
    if len(set(names)) != len(names):
        raise SystemExit("--arm: arm names must be unique")
    items, default_metric = load_items(args.data, args.n)
    metric = args.metric or default_metric
    if (metric == "mc") != bool(items and items[0].choices):
        raise SystemExit(f"--metric {metric} does not fit the data set ({'multiple choice' if items[0].choices else 'generation'})")
    print(f"[ab-eval] {len(items)} items x {len(args.arm)} arms, metric {metric}", file=sys.stderr)
    scores = asyncio.run(_run_all(args, items, args.arm, metric))
    rows = summarise(scores, args.resamples, args.seed)
    meta = {"data": args.data, "metric": metric, "n": len(items), "base_url": args.base_url, "model": args.model,
            "arms": args.arm, "resamples": args.resamples}
    report, plot = write_report(Path(args.out_dir), rows, meta)
    (Path(args.out_dir) / "scores.json").write_text(json.dumps({"meta": meta, "rows": rows, "scores": scores}))
    print(report.read_text())
    print(f"[ab-eval] wrote {report}, {plot}", file=sys.stderr)
    return {"rows": rows, "scores": scores}


def add_ab_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="server (default http://127.0.0.1:8000/v1)")
    p.add_argument("--api-key", default=None, help="API key (default $STEERSERVE_API_KEY)")
    p.add_argument("--model", default=None, help="model name (default: the server's first)")
    p.add_argument("--data", required=True,
                   help="JSONL file, or squad, squad-cf, drop, arc-easy, arc-challenge, sciq, boolq (fetched once)")
    p.add_argument("--n", type=int, default=100, help="items (default 100)")
    p.add_argument("--arm", action="append", type=parse_arm, default=[], metavar="NAME=STEER",
                   help="an arm (repeatable, at least two; the first is the reference): NAME=STEER_JSON, "
                        "NAME=profile:PROFILE, or NAME=none")
    p.add_argument("--metric", choices=["exact", "contains", "f1", "mc"], default=None,
                   help="default: contains for generation sets, mc for multiple-choice sets")
    p.add_argument("--max-tokens", type=int, default=32, help="generated tokens per answer (default 32)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight (default 16)")
    p.add_argument("--timeout", type=float, default=300, help="per-request timeout in seconds (default 300)")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap / permutation resamples (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the resampling (default 0)")
    p.add_argument("--out-dir", default="ab-eval-report", help="report folder (default ./ab-eval-report)")
