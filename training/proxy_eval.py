"""`steerserve train eval-proxy`: does proxy tuning close the gap to a directly tuned base?

Scores, on a multiple-choice task that ships offline, the base, the expert (the small tuned model
alone), the proxy-tuned base (base + alpha * (expert - anti_expert), one row per alpha) and the
directly tuned base, and reports the fraction of the gap closed, (proxy - base) / (tuned - base).

Scoring: chat-formatted ranked classification, zero-shot: the user turn is the task's OLMES prompt
(as `train proxy-demo` trains on), each choice is scored as the assistant's reply by the
log-likelihood of its tokens after the rendered generation prompt; accuracy is by the raw sum and
by the per-character normalised sum (OLMES' `acc_per_char`). The three proxy models see the same
tokens (as in the engine). Hugging Face models in float32; the proxy arithmetic is
`patches.steers.proxy.reference.proxy_combine`, the function the engine's parity tests check the engine against.
Standard errors are binomial, sqrt(p (1 - p) / n); the majority-class rate is reported for
reference. For one-token answers (BoolQ's yes/no) the raw sum is the meaningful metric: per-character
normalisation favours the longer word.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from tqdm import tqdm


def add_proxy_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--demo", default=None, help="a `train proxy-demo` output folder (gives the four checkpoints, "
                                                "the task and its held-out range)")
    p.add_argument("--base", default=None, help="base checkpoint (default: the demo's, else the embedded model)")
    p.add_argument("--expert", default=None, help="tuned expert checkpoint")
    p.add_argument("--anti-expert", default=None, help="untuned anti-expert checkpoint")
    p.add_argument("--tuned", default=None, help="the base tuned directly on the task (optional: gap closed needs it)")
    p.add_argument("--task", default=None, help="boolq, arc-easy, arc-challenge or sciq (default: the demo's, else boolq)")
    p.add_argument("--n", type=int, default=300, help="items scored, the first n (default 300)")
    p.add_argument("--alpha", default="1.0", help="comma-separated proxy alphas (default 1.0)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--out", default="proxy-eval", help="output folder (default ./proxy-eval)")


def _log(msg: str) -> None:
    print(f"[eval-proxy] {msg}", file=sys.stderr, flush=True)


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def _continuation_logits(model, batch: list[list[int]], keep: int) -> torch.Tensor:
    """Left-padded batch -> logits of the last `keep` positions, [B, keep, V] float32."""
    width = max(len(x) for x in batch)
    ids = torch.tensor([[0] * (width - len(x)) + x for x in batch])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep)
    return out.logits.float()


def choice_scores(models: dict, items, tokenizer, alphas: list[float], batch_size: int) -> dict[str, dict]:
    """Per configuration, {(item, choice): log-likelihood of the choice's tokens}. `models`: base,
    expert, anti_expert and optionally tuned."""
    from steerserve.patches.steers.proxy.reference import proxy_combine

    configs = ["base", "expert"] + [f"proxy a={a:g}" for a in alphas] + (["tuned"] if "tuned" in models else [])
    # sequences: prompt + each choice's tokens; logits of the positions predicting the choice tokens
    seqs: list[tuple[int, int, list[int], int]] = []  # (item, choice, ids, continuation length)
    for i, it in enumerate(items):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": it.query}], add_generation_prompt=True,
                                               tokenize=True)
        prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
        for j, choice in enumerate(it.choices):
            cont = tokenizer(choice, add_special_tokens=False)["input_ids"]
            seqs.append((i, j, prompt + cont, len(cont)))
    scores: dict[str, dict[tuple[int, int], float]] = {c: {} for c in configs}
    for start in tqdm(range(0, len(seqs), batch_size), desc="scoring", file=sys.stderr):
        chunk = seqs[start:start + batch_size]
        keep = max(c for *_, c in chunk) + 1
        logits = {name: _continuation_logits(m, [s[2] for s in chunk], keep) for name, m in models.items()}
        vocab = logits["base"].shape[-1]
        per_config = {"base": logits["base"], "expert": logits["expert"][..., :vocab]}
        for a in alphas:
            per_config[f"proxy a={a:g}"] = proxy_combine(logits["base"], logits["expert"], logits["anti_expert"], a)
        if "tuned" in logits:
            per_config["tuned"] = logits["tuned"]
        for row, (i, j, ids, c) in enumerate(chunk):
            targets = torch.tensor(ids[-c:])
            for name, lg in per_config.items():
                lp = torch.log_softmax(lg[row, keep - c - 1:keep - 1], dim=-1)
                scores[name][(i, j)] = lp.gather(1, targets[:, None]).sum().item()
    return scores


def score_items(models: dict, items, tokenizer, alphas: list[float], batch_size: int) -> dict[str, dict]:
    """Per configuration: accuracy by raw sum and per character over `items`."""
    scores = choice_scores(models, items, tokenizer, alphas, batch_size)
    correct = {c: [0, 0] for c in scores}
    for name in scores:
        for i, it in enumerate(items):
            raw = [scores[name][(i, j)] for j in range(len(it.choices))]
            per_char = [s / max(len(ch), 1) for s, ch in zip(raw, it.choices)]
            correct[name][0] += int(max(range(len(raw)), key=raw.__getitem__) == it.gold)
            correct[name][1] += int(max(range(len(per_char)), key=per_char.__getitem__) == it.gold)
    return {name: {"acc": c[0] / len(items), "acc_per_char": c[1] / len(items), "n": len(items)}
            for name, c in correct.items()}


def run_proxy_eval(args: argparse.Namespace) -> dict:
    from transformers import AutoTokenizer

    from steerserve.clients.datasets import load_mc
    from steerserve.server.model_store import ensure_embedded_model

    demo = {}
    if args.demo:
        demo_file = Path(args.demo) / "proxy-demo.json"
        if not demo_file.exists():
            raise SystemExit(f"--demo {args.demo}: no proxy-demo.json (run `steerserve train proxy-demo` first)")
        demo = json.loads(demo_file.read_text())
    paths = {"base": args.base or demo.get("base") or str(ensure_embedded_model()),
             "expert": args.expert or demo.get("expert"), "anti_expert": args.anti_expert or demo.get("anti_expert"),
             "tuned": args.tuned or demo.get("tuned")}
    for key in ("expert", "anti_expert"):
        if not paths[key]:
            raise SystemExit(f"--{key.replace('_', '-')} (or --demo) is required")
    task = args.task or demo.get("task") or "boolq"
    if demo and demo.get("holdout") is not None and args.n > demo["holdout"]:
        raise SystemExit(f"--n {args.n} would score items the demo trained on (it held out the first "
                         f"{demo['holdout']}); use --n <= {demo['holdout']}")
    try:
        alphas = [float(a) for a in args.alpha.split(",") if a.strip()]
    except ValueError:
        raise SystemExit(f"--alpha {args.alpha!r}: expected comma-separated numbers") from None
    items = load_mc(task, args.n)
    tokenizer = AutoTokenizer.from_pretrained(paths["base"])
    models = {k: _load(Path(v)) for k, v in paths.items() if v}
    _log(f"{task}: {len(items)} items; models: " + ", ".join(f"{k}={v}" for k, v in paths.items() if v))
    results = score_items(models, items, tokenizer, alphas, args.batch_size)
    add_summary(results, items)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    body = {"task": task, "n": len(items), "paths": paths, "alphas": alphas, "results": results}
    (out / "results.json").write_text(json.dumps(body, indent=2) + "\n")
    table = report(body)
    (out / "report.md").write_text(table)
    print(table)
    return body


def add_summary(results: dict, items) -> None:
    """Standard errors, the gap closed per metric, and the majority-class rate for reference (on a
    task with a skewed label prior, tuning first learns the prior)."""
    from collections import Counter

    n = len(items)
    for metric in ("acc", "acc_per_char"):
        base = results["base"][metric]
        gap = results["tuned"][metric] - base if "tuned" in results else None
        for name, r in results.items():
            r[f"se_{metric}"] = math.sqrt(r[metric] * (1 - r[metric]) / n)
            if name.startswith("proxy") and gap is not None:
                r[f"gap_closed_{metric}"] = (r[metric] - base) / gap if gap else None
    top = Counter(it.gold for it in items).most_common(1)[0][1] / n
    results["majority class (reference)"] = {"acc": top, "acc_per_char": top, "n": n}


def report(body: dict) -> str:
    lines = [f"Task {body['task']}, first {body['n']} items, chat-formatted ranked classification (float32 HF)", "",
             "| configuration | acc (raw sum) | gap closed (acc) | acc_per_char | gap closed (per char) |",
             "|---|---|---|---|---|"]

    def gap(r, metric):
        value = r.get(f"gap_closed_{metric}")
        return "" if value is None else f"{value:+.2f}"

    for name, r in body["results"].items():
        se = r.get("se_acc")
        se_text = f" ± {100 * se:.1f}" if se is not None else ""
        lines.append(f"| {name} | {100 * r['acc']:.1f}{se_text} | {gap(r, 'acc')} | {100 * r['acc_per_char']:.1f} | "
                     f"{gap(r, 'acc_per_char')} |")
    return "\n".join(lines) + "\n"
