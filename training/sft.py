"""`steerserve train sft`: supervised fine-tuning of a causal LM on chat data, full or LoRA.

Built on the Hugging Face `Trainer` (progress bars, eval loss, seeds, resumable checkpoints) and
peft (LoRA). Loss on assistant tokens only (`training.data`). Optional InfoSteer training
(`training.infosteer_train`) and context-dependency indicator (`training.indicator`).

Output folder (`--out`), loadable by the server as-is:
- full: a Hugging Face checkpoint (safetensors, saved in the base's dtype) + tokenizer;
- lora: a peft adapter (`adapter_config.json`, `adapter_model.safetensors`) + tokenizer;
- both: `steerserve.json` (kind, base path and digest, training settings, context indicator),
  `train_metrics.json` (train/eval loss), and `checkpoints/` (Trainer state; `--resume` picks up
  the latest).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import checkpoints as _ckpt
from . import data as _data

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN_MODULES = ("gate_proj", "up_proj", "down_proj")


def _log(msg: str) -> None:
    print(f"[train] {msg}", file=sys.stderr, flush=True)


def add_sft_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="sharegpt",
                   help="training conversations: `sharegpt` (ships offline, fetched once) or a JSONL file "
                        "(`messages` or ShareGPT `conversations` per line); default sharegpt")
    p.add_argument("--eval-data", default=None,
                   help="held-out JSONL for eval loss (default: --eval-size conversations split off --data)")
    p.add_argument("--limit", type=int, default=2000, help="use at most this many conversations (default 2000)")
    p.add_argument("--eval-size", type=int, default=64,
                   help="conversations held out for eval loss when no --eval-data (default 64)")
    p.add_argument("--base", default=None,
                   help="base checkpoint folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--method", choices=("full", "lora"), default="lora", help="full fine-tuning or LoRA (default)")
    p.add_argument("--max-len", type=int, default=384, help="tokens per conversation, longer ones cut (default 384)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the data (default 1)")
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimiser steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=8, help="conversations per optimiser step (default 8)")
    p.add_argument("--micro-batch", type=int, default=4,
                   help="conversations per forward pass; batch-size / micro-batch = gradient accumulation (default 4)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-4 LoRA, 2e-5 full)")
    p.add_argument("--warmup-ratio", type=float, default=0.05, help="linear warm-up fraction (default 0.05)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed for data order, init and dropout (default 0)")
    p.add_argument("--eval-steps", type=int, default=50, help="eval loss every N steps (default 50)")
    p.add_argument("--save-steps", type=int, default=50, help="resumable checkpoint every N steps (default 50)")
    p.add_argument("--resume", action="store_true", help="resume from the latest checkpoint in --out/checkpoints")
    p.add_argument("--bf16", action="store_true", help="train in bfloat16 autocast (GPUs; default fp32)")
    lora = p.add_argument_group("LoRA")
    lora.add_argument("--lora-r", type=int, default=16, help="rank (default 16)")
    lora.add_argument("--lora-alpha", type=int, default=32, help="scaling numerator (default 32)")
    lora.add_argument("--lora-dropout", type=float, default=0.05, help="dropout (default 0.05)")
    lora.add_argument("--lora-targets", default=",".join(ATTENTION_MODULES + FFN_MODULES),
                      help="comma-separated module names (default: all attention and FFN projections)")
    info = p.add_argument_group("InfoSteer training (arXiv 2507.05158)")
    info.add_argument("--infosteer-lambda", type=float, default=0.0,
                      help="regulariser weight: L = L_LM - lambda * sum_l H(k_hat_l) (default 0: off)")
    info.add_argument("--infosteer-p", type=float, default=0.0,
                      help="forward intervention: lift the p fraction of smallest FFN coefficients (default 0: off)")
    info.add_argument("--infosteer-alpha", type=float, default=1.0,
                      help="forward intervention: lifted coefficients become alpha * the token's mean (default 1)")
    info.add_argument("--infosteer-layers", default="all",
                      help="layers for both: `all`, or comma-separated indices/ranges like 0-9,20 (default all)")
    ind = p.add_argument_group("context-dependency indicator (arXiv 2411.02688)")
    ind.add_argument("--context-indicator", action="store_true",
                     help="score conversations by attention to user turns and mark the context-dependent ones")
    ind.add_argument("--indicator-text", default=None, help='text appended to marked user turns (default " [ctx]")')
    ind.add_argument("--indicator-quantile", type=float, default=0.5,
                     help="mark conversations scoring at or above this quantile (default 0.5)")
    ind.add_argument("--indicator-threshold", type=float, default=None,
                     help="mark conversations scoring at or above this absolute score (overrides the quantile)")
    ind.add_argument("--indicator-layer", type=int, default=None, help="layer scored (default: the middle one)")


def parse_layers(text: str, n_layers: int, flag: str = "--infosteer-layers") -> tuple[int, ...]:
    if text == "all":
        return tuple(range(n_layers))
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
                out.update(range(a, b + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise SystemExit(f"{flag}: {part!r} is not an index or a range like 0-9") from None
    bad = sorted(i for i in out if not 0 <= i < n_layers)
    if bad:
        raise SystemExit(f"{flag}: layers {bad} are outside [0, {n_layers - 1}]")
    return tuple(sorted(out))


@dataclass
class SftResult:
    out: Path
    train_loss: float | None
    eval_loss: float | None
    steps: int
    seconds: float


def run_sft(args: argparse.Namespace) -> SftResult:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, set_seed

    from steerserve.server.model_store import resolve_model

    from .indicator import DEFAULT_TEXT, score_conversations, suffixes, threshold_for
    from .infosteer_train import InfoSteerTraining, InfoSteerTrainConfig

    t0 = time.time()
    base = resolve_model(args.base)
    if not _ckpt.is_full_checkpoint(base):
        raise SystemExit(f"--base: {base} is not a checkpoint folder (config.json + *.safetensors)")
    out = Path(args.out).expanduser().resolve()
    if out.exists() and any(out.iterdir()) and not args.resume:
        raise SystemExit(f"--out: {out} exists and is not empty (choose another folder, or --resume a run there)")
    if args.batch_size % args.micro_batch:
        raise SystemExit(f"--batch-size ({args.batch_size}) must be a multiple of --micro-batch ({args.micro_batch})")
    out.mkdir(parents=True, exist_ok=True)
    set_seed(args.seed)
    random.seed(args.seed)

    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    base_cfg = json.loads((base / "config.json").read_text())
    save_dtype = getattr(torch, str(base_cfg.get("dtype") or base_cfg.get("torch_dtype") or "float32"))
    _log(f"base {base} (saved dtype {save_dtype}); loading model in float32")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    n_layers = model.config.num_hidden_layers

    _log(f"loading conversations from {args.data}")
    try:
        convs = _data.load_conversations(args.data, args.limit + (0 if args.eval_data else args.eval_size), args.seed)
        if args.eval_data:
            train_convs, eval_convs = convs, _data.load_jsonl(args.eval_data, args.eval_size or None)
        else:
            if len(convs) < args.eval_size + 1:
                raise SystemExit(f"--eval-size {args.eval_size} leaves no training data ({len(convs)} conversations)")
            eval_convs, train_convs = convs[: args.eval_size], convs[args.eval_size :]
    except _data.DataError as err:
        raise SystemExit(f"--data: {err}") from None

    indicator_text = None
    train_suffixes = eval_suffixes = None
    indicator_meta = None
    if args.context_indicator:
        indicator_text = args.indicator_text or DEFAULT_TEXT
        scores = score_conversations(model, tokenizer, train_convs, args.max_len, args.indicator_layer)
        eval_scores = score_conversations(model, tokenizer, eval_convs, args.max_len, args.indicator_layer)
        thr = args.indicator_threshold if args.indicator_threshold is not None else threshold_for(
            scores, args.indicator_quantile)
        train_suffixes = suffixes(scores, thr, indicator_text)
        eval_suffixes = suffixes(eval_scores, thr, indicator_text)
        marked = sum(1 for s in train_suffixes if s)
        _log(f"context indicator {indicator_text!r}: threshold {thr:.4f}, {marked}/{len(scores)} training "
             f"conversations marked")
        indicator_meta = {"text": indicator_text, "threshold": thr, "marked": marked, "scored": len(scores),
                          "layer": args.indicator_layer if args.indicator_layer is not None else n_layers // 2}

    train_ds = _data.build_dataset(tokenizer, train_convs, args.max_len, train_suffixes)
    eval_ds = _data.build_dataset(tokenizer, eval_convs, args.max_len, eval_suffixes)
    n_target = sum(e.num_target_tokens for e in train_ds.examples)
    _log(f"{len(train_ds)} training conversations ({n_target} assistant tokens), {len(eval_ds)} eval")

    if args.method == "lora":
        from peft import LoraConfig, get_peft_model

        targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
        lora_cfg = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                              target_modules=targets, task_type="CAUSAL_LM")
        model = get_peft_model(model, lora_cfg)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        _log(f"LoRA r={args.lora_r} alpha={args.lora_alpha} on {targets}: {trainable / 1e6:.2f}M trainable parameters")
    lr = args.lr if args.lr is not None else (2e-4 if args.method == "lora" else 2e-5)

    info_cfg = InfoSteerTrainConfig(parse_layers(args.infosteer_layers, n_layers), args.infosteer_lambda,
                                    args.infosteer_alpha, args.infosteer_p)
    if not 0.0 <= args.infosteer_p < 1.0:
        raise SystemExit(f"--infosteer-p: {args.infosteer_p} is outside [0, 1)")
    if args.infosteer_lambda < 0:
        raise SystemExit(f"--infosteer-lambda: {args.infosteer_lambda} must be >= 0")
    info = InfoSteerTraining(model, info_cfg) if info_cfg.active else None

    class SteerTrainer(Trainer):
        """Adds the InfoSteer regulariser to the LM loss (and logs it)."""

        def compute_loss(self, model, inputs, return_outputs=False, **kw):
            if info is None:
                return super().compute_loss(model, inputs, return_outputs=return_outputs, **kw)
            info.mask = inputs.get("attention_mask")
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kw)
            reg = info.regulariser()
            if reg is not None and info_cfg.lam > 0:
                loss = loss - info_cfg.lam * reg
                self._entropy = reg.detach().item()
            return (loss, outputs) if return_outputs else loss

        def log(self, logs, *a, **kw):
            if info is not None and getattr(self, "_entropy", None) is not None and "loss" in logs:
                logs["ffn_entropy_sum"] = round(self._entropy, 4)
            super().log(logs, *a, **kw)

    targs = TrainingArguments(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=args.micro_batch,
        per_device_eval_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.batch_size // args.micro_batch,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup_ratio,  # a float < 1 is a fraction of the total steps
        weight_decay=args.weight_decay,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        eval_strategy="steps",
        eval_steps=args.eval_steps,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=2,
        logging_steps=max(1, min(10, args.eval_steps)),
        seed=args.seed,
        data_seed=args.seed,
        bf16=args.bf16,
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    trainer = SteerTrainer(model=model, args=targs, train_dataset=train_ds, eval_dataset=eval_ds,
                           data_collator=_data.Collator(tokenizer.pad_token_id))
    resume = None
    if args.resume:
        ckpts = sorted((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        resume = str(ckpts[-1]) if ckpts else None
        _log(f"resuming from {resume}" if resume else "--resume: no checkpoint yet, starting fresh")
    result = trainer.train(resume_from_checkpoint=resume)
    eval_metrics = trainer.evaluate()
    if info is not None:
        info.remove()

    _log(f"saving to {out}")
    if args.method == "lora":
        model.save_pretrained(out)
        kind = "lora"
    else:
        model.to(save_dtype).save_pretrained(out)
        kind = "full"
    tokenizer.save_pretrained(out)
    settings = {k: v for k, v in vars(args).items() if k not in ("func", "command", "train_command")}
    _ckpt.write_metadata(
        out, kind, base, _ckpt.base_digest(base),
        components={"attention": "tuned", "ffn": "tuned"},
        context_indicator=indicator_text,
        indicator=indicator_meta,
        infosteer=info_cfg.describe() if info_cfg.active else None,
        training={**settings, "lr": lr, "train_conversations": len(train_ds), "eval_conversations": len(eval_ds)},
    )
    train_loss = result.training_loss if result.training_loss is not None else None
    eval_loss = eval_metrics.get("eval_loss")
    metrics = {"train_loss": train_loss, "eval_loss": eval_loss,
               "eval_perplexity": math.exp(eval_loss) if eval_loss is not None and eval_loss < 50 else None,
               "steps": result.global_step, "seconds": round(time.time() - t0, 1),
               "log_history": trainer.state.log_history}
    (out / "train_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    _log(f"done in {time.time() - t0:.0f} s: {result.global_step} steps, train loss {train_loss:.4f}, "
         f"eval loss {eval_loss:.4f} -> {out}")
    return SftResult(out, train_loss, eval_loss, result.global_step, time.time() - t0)
