"""`steerserve train eval`: base vs fully tuned vs TAIA (and any other variants) on multiple-choice
sets that ship offline (TAIA's question: does the base FFN generalise better than the tuned one when
the tuning data does not match the task?).

Each `--variant NAME=PATH` (a LoRA adapter or a fully fine-tuned checkpoint of `--base`) is scored
as `NAME` (tuned) and `NAME:taia` (tuned attention/norms/embeddings + base FFN, built with the
same export code as `steerserve train export-taia`), next to the base. Scoring is OLMES'
ranked classification, zero-shot, raw text (no chat template): each choice's continuation
log-likelihood after the task's prompt with a Hugging Face model in float32; accuracy uses the
per-character normalised log-likelihood (OLMES' `acc_per_char`), and the raw-sum accuracy is kept
too. Standard errors are binomial, sqrt(p (1 - p) / n).

Writes `results.json` and `report.md` (the table) to `--out`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoints as ck


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default=None, help="base checkpoint (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=PATH",
                   help="a tuned variant of the base (LoRA adapter or full checkpoint); scored as NAME and NAME:taia "
                        "(repeatable)")
    p.add_argument("--no-taia", action="store_true", help="score the variants as tuned only")
    p.add_argument("--tasks", default="arc-easy,arc-challenge,sciq,boolq",
                   help="comma-separated multiple-choice tasks (default arc-easy,arc-challenge,sciq,boolq)")
    p.add_argument("--n", type=int, default=300, help="items per task, the first n (default 300)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass (default 16)")
    p.add_argument("--out", default="taia-eval", help="output folder (default ./taia-eval)")


def _log(msg: str) -> None:
    print(f"[eval] {msg}", file=sys.stderr, flush=True)


def load_config(base: Path, path: Path | None, taia: bool, scratch: Path):
    """The Hugging Face model for base / a variant / a variant's TAIA mix (float32, eval mode)."""
    from transformers import AutoModelForCausalLM

    from .export import merge_full, split_adapter

    if path is None:
        return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    if ck.is_lora_adapter(path):
        from peft import PeftModel

        adapter = path
        if taia:
            adapter = split_adapter(path, scratch / f"{path.name}-taia", keep="attention")
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        return PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()
    if taia:
        path = merge_full(path, base, scratch / f"{path.name}-taia")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def score_mc(model, tokenizer, items, batch_size: int, desc: str) -> dict:
    """Accuracy (per-char normalised and raw) of `items` (datasets.MCItem)."""
    seqs = []  # (item index, choice index, ids, number of continuation tokens, continuation chars)
    for i, item in enumerate(items):
        ctx = tokenizer(item.query, add_special_tokens=False)["input_ids"]
        for j, choice in enumerate(item.choices):
            cont = tokenizer(item.query + " " + choice, add_special_tokens=False)["input_ids"][len(ctx):]
            if not cont:
                cont = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
            seqs.append((i, j, (ctx + cont)[-1024:], min(len(cont), 1023), len(" " + choice)))
    order = sorted(range(len(seqs)), key=lambda k: len(seqs[k][2]))
    loglik = [0.0] * len(seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in tqdm(range(0, len(order), batch_size), desc=desc, file=sys.stderr):
        batch = [seqs[k] for k in order[start : start + batch_size]]
        width = max(len(s[2]) for s in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, s in enumerate(batch):
            ids[r, : len(s[2])] = torch.tensor(s[2])
            mask[r, : len(s[2])] = 1
        logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        for r, (k, s) in enumerate(zip(order[start : start + batch_size], batch)):
            n, n_cont = len(s[2]), s[3]
            targets = ids[r, n - n_cont : n]
            loglik[k] = logprobs[r, n - n_cont - 1 : n - 1].gather(-1, targets[:, None]).sum().item()
    by_item: dict[int, list[tuple[float, float]]] = {}
    for (i, j, _, _, chars), ll in zip(seqs, loglik):
        by_item.setdefault(i, []).append((ll / max(chars, 1), ll))
    norm = raw = 0
    for i, item in enumerate(items):
        scores = by_item[i]
        norm += int(max(range(len(scores)), key=lambda c: scores[c][0]) == item.gold)
        raw += int(max(range(len(scores)), key=lambda c: scores[c][1]) == item.gold)
    n = len(items)
    return {"n": n, "acc_per_char": norm / n, "acc_raw": raw / n,
            "se": math.sqrt(max(norm / n * (1 - norm / n), 1e-12) / n)}


def run_eval(args: argparse.Namespace) -> dict:
    from transformers import AutoTokenizer

    from steerserve.clients import datasets as ds
    from steerserve.server.model_store import resolve_model

    base = resolve_model(args.base)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = [t for t in tasks if t not in ds.MC_TASKS]
    if bad:
        raise SystemExit(f"--tasks: unknown {bad}; allowed: {', '.join(ds.MC_TASKS)}")
    configs: list[tuple[str, Path | None, bool]] = [("base", None, False)]
    for value in args.variant:
        if "=" not in value:
            raise SystemExit(f"--variant: {value!r}: expected NAME=PATH")
        name, path = value.split("=", 1)
        path = Path(path).expanduser().resolve()
        if not (ck.is_lora_adapter(path) or ck.is_full_checkpoint(path)):
            raise SystemExit(f"--variant: {path} is neither a LoRA adapter nor a checkpoint folder")
        meta = ck.read_metadata(path)
        if meta is not None and meta["base"].get("digest") not in (None, ck.base_digest(base)):
            raise SystemExit(f"--variant: {name} was trained from another base than {base}")
        configs.append((name, path, False))
        if not args.no_taia:
            configs.append((f"{name}:taia", path, True))
    items = {t: ds.load_mc(t, args.n) for t in tasks}
    tokenizer = AutoTokenizer.from_pretrained(base)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"base": str(base), "tasks": tasks, "n": args.n, "configs": {}}
    t0 = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        for name, path, taia in configs:
            _log(f"{name}: loading")
            model = load_config(base, path, taia, Path(scratch))
            row = {}
            for task in tasks:
                row[task] = score_mc(model, tokenizer, items[task], args.batch_size, f"{name} {task}")
                _log(f"{name} {task}: {100 * row[task]['acc_per_char']:.1f} +- {100 * row[task]['se']:.1f}")
            row["mean"] = sum(row[t]["acc_per_char"] for t in tasks) / len(tasks)
            results["configs"][name] = {"path": str(path) if path else None, "taia": taia, "scores": row}
            del model
    results["seconds"] = round(time.time() - t0, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "report.md").write_text(report(results))
    print(report(results))
    return results


def report(results: dict) -> str:
    tasks = results["tasks"]
    lines = ["| configuration | " + " | ".join(tasks) + " | mean |", "|---" * (len(tasks) + 2) + "|"]
    for name, entry in results["configs"].items():
        row = entry["scores"]
        cells = [f"{100 * row[t]['acc_per_char']:.1f} ± {100 * row[t]['se']:.1f}" for t in tasks]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {100 * row['mean']:.1f} |")
    lines.append("")
    lines.append(f"Accuracy (%, per-character normalised log-likelihood, zero-shot), first {results['n']} items per "
                 "task, ± binomial standard error.")
    return "\n".join(lines) + "\n"
