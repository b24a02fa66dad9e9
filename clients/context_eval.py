"""Context-following evaluation and head profiling for context-attention steering (PASTA-style).

`steerserve eval-context`: runs reading-comprehension questions through the steerable engine with
the embedded model (or --model) and prints a table, unsteered vs an alpha sweep on all heads vs
head sets:
- squad: SQuAD validation questions with their passages; score = the answer contains a gold answer.
- squad-cf: counterfactual SQuAD (the gold answer swapped in the passage for another question's
  answer of the same kind): "context" = the answer follows the passage (the swapped-in answer),
  "memory" = it gives the original answer instead.
- drop: DROP questions with passages; score = contains a gold answer.

`steerserve heads profile`: PASTA's head profiling. Each candidate (first every layer with all its
heads, then every head of the best layers alone) is steered by itself on a profiling slice of
squad-cf disjoint from the evaluation slice, scored by how much it raises the log-likelihood
margin log p(passage answer) - log p(remembered answer) over unsteered; the best heads are written
as a head set file that `steerserve serve --head-set` loads.

Both run the engine offline (no HTTP) with the same spans and plans the server builds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

PROMPT = ("Read the passage and answer the question with a short phrase from the passage.\n\n"
          "Passage: {passage}\n\nQuestion: {question}")
PROFILE_OFFSET = 0  # profiling uses squad-cf items [0, n); evaluation starts at EVAL_OFFSET
EVAL_OFFSET = 400


def _log(msg: str) -> None:
    print(f"[context] {msg}", file=sys.stderr, flush=True)


class Engine:
    """A steerable vLLM engine plus the tokenizer and model info, for offline steered runs."""

    def __init__(self, model: str | None, dtype: str, head_sets: dict | None = None):
        from transformers import AutoTokenizer
        from vllm import LLM

        from steerserve.patches import STEERABLE_ARCHITECTURES
        from steerserve.server.cli import enable_plugins
        from steerserve.server.model_store import ensure_embedded_model
        from steerserve.server.schema import ModelInfo

        enable_plugins()
        path = Path(model) if model else ensure_embedded_model()
        self.info = ModelInfo.from_checkpoint(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.head_sets = head_sets or {}
        _log(f"starting the engine on {path.name} ({dtype})")
        self.llm = LLM(model=str(path), dtype=dtype, enforce_eager=True, max_model_len=2048, seed=0,
                       kv_cache_memory_bytes=2 << 30, enable_prefix_caching=True,
                       hf_overrides={"architectures": [STEERABLE_ARCHITECTURES[self.info.architecture]]})

    def close(self) -> None:
        from steerserve.patches.adapter.runner import shutdown_engine

        shutdown_engine(self.llm)

    def prompt(self, item, emphasis: str = "user") -> tuple[list[int], tuple]:
        from steerserve.patches.steers.context_attention.spans import chat_spans

        text = PROMPT.format(passage=item.passage, question=item.question)
        if emphasis == "marked":  # emphasise the passage only
            text = PROMPT.format(passage=f"<emphasis>{item.passage}</emphasis>", question=item.question)
        return chat_spans(self.tokenizer, [{"role": "user", "content": text}], emphasis)

    def _request(self, ids: list[int], spans, steer: dict | None, extra_ids: list[int] = ()):
        from steerserve.server.schema import normalise

        prompt: dict = {"prompt_token_ids": ids + list(extra_ids)}
        extra = None
        if steer:
            plan = normalise(steer, self.info, self.head_sets)
            if plan.context_attention is not None:
                # prompt_len 0: no length check, so an item's forced-decoding requests (the prompt
                # plus more and more answer tokens) share one plan and one prefix-cache salt
                plan = replace(plan, context_attention=replace(plan.context_attention, spans=spans, prompt_len=0))
            if not plan.is_empty:
                extra = {"steer": plan.to_json()}
                prompt["cache_salt"] = f"steer:{plan.fingerprint()}"
        return prompt, extra

    def generate(self, items, steer: dict | None, max_tokens: int = 24) -> list[str]:
        from vllm import SamplingParams

        emphasis = (steer or {}).get("context_attention", {}).get("emphasis", "user")
        prompts, params = [], []
        for item in items:
            ids, spans = self.prompt(item, emphasis)
            prompt, extra = self._request(ids, spans, steer)
            prompts.append(prompt)
            params.append(SamplingParams(max_tokens=max_tokens, temperature=0.0, extra_args=extra))
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        return [o.outputs[0].text for o in outs]

    def answer_logprobs(self, items, answers: list[str], steer: dict | None) -> list[float]:
        """Teacher-forced log p(answer as the assistant reply | chat prompt), per item.

        Forced decoding: one request per answer token, the prompt extended by the answer so far and
        the next token forced (`allowed_token_ids`); vLLM returns that token's raw log-probability
        (before the restriction). The requests share their prompt through the prefix cache. (Much
        cheaper than `prompt_logprobs`, which scores every prompt position over the vocabulary.)"""
        from vllm import SamplingParams

        prompts, params, owner = [], [], []
        for n, (item, answer) in enumerate(zip(items, answers)):
            ids, spans = self.prompt(item)
            answer_ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
            for k, token in enumerate(answer_ids):
                prompt, extra = self._request(ids, spans, steer, answer_ids[:k])
                prompts.append(prompt)
                params.append(SamplingParams(max_tokens=1, temperature=0.0, logprobs=0,
                                             allowed_token_ids=[token], extra_args=extra))
                owner.append(n)
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        result = [0.0] * len(items)
        for n, o in zip(owner, outs):
            c = o.outputs[0]
            result[n] += c.logprobs[0][c.token_ids[0]].logprob
        return result


# ----------------------------------------------------------------------------- profiling


def _margin(engine: Engine, items, steer: dict | None) -> float:
    n = len(items)
    both = engine.answer_logprobs(list(items) * 2, [it.answers[0] for it in items] +
                                  [it.memory_answers[0] for it in items], steer)
    return statistics.fmean(c - m for c, m in zip(both[:n], both[n:]))


def profile_heads(args: argparse.Namespace) -> dict:
    from steerserve.clients.datasets import counterfactual_squad
    from steerserve.server.head_sets import save_head_set

    items = counterfactual_squad(PROFILE_OFFSET + args.n)[PROFILE_OFFSET:]
    engine = Engine(args.model, args.dtype)
    info = engine.info
    started = time.perf_counter()
    try:
        base = _margin(engine, items, None)
        _log(f"unsteered margin log p(context) - log p(memory) = {base:+.3f} over {len(items)} items")
        layer_scores = {}
        for layer in range(info.num_layers):
            steer = {"context_attention": {"alpha": args.alpha, "layers": [layer]}}
            layer_scores[layer] = _margin(engine, items, steer) - base
            _log(f"layer {layer:2d} (all heads): {layer_scores[layer]:+.3f}  [{time.perf_counter() - started:.0f} s]")
        best_layers = sorted(layer_scores, key=layer_scores.get, reverse=True)[: args.layers_top]
        head_scores = {}
        for layer in sorted(best_layers):
            for head in range(info.num_heads):
                steer = {"context_attention": {"alpha": args.alpha, "heads": [[layer, head]]}}
                head_scores[(layer, head)] = _margin(engine, items, steer) - base
            _log(f"layer {layer:2d} heads: " + " ".join(f"{head_scores[(layer, h)]:+.2f}" for h in range(info.num_heads)))
    finally:
        engine.close()
    ranked = sorted(head_scores, key=head_scores.get, reverse=True)
    chosen = sorted(p for p in ranked[: args.top] if head_scores[p] > 0)
    model = {"architecture": info.architecture, "num_layers": info.num_layers, "num_heads": info.num_heads,
             "name": Path(args.model).name if args.model else "SmolLM2-135M-Instruct"}
    profile = {
        "data": f"squad-cf items [{PROFILE_OFFSET}, {PROFILE_OFFSET + len(items)})", "alpha": args.alpha,
        "metric": "mean log p(passage answer) - log p(remembered answer), steered minus unsteered",
        "unsteered_margin": round(base, 4),
        "layer_scores": {str(k): round(v, 4) for k, v in layer_scores.items()},
        "head_scores": [[l, h, round(s, 4)] for (l, h), s in sorted(head_scores.items())],
        "seconds": round(time.perf_counter() - started, 1),
    }
    save_head_set(args.out, args.name, chosen, model, profile)
    _log(f"wrote head set {args.name!r} with {len(chosen)} heads to {args.out}")
    return {"heads": chosen, **profile}


# ----------------------------------------------------------------------------- evaluation


def _configs(args) -> list[tuple[str, dict | None]]:
    configs: list[tuple[str, dict | None]] = [("unsteered", None)]
    for alpha in args.alphas:
        configs.append((f"all heads, alpha {alpha}", {"context_attention": {"alpha": alpha, "heads": "all"}}))
    for name in args.head_set_names:
        for alpha in args.set_alphas:
            configs.append((f"head set {name}, alpha {alpha}",
                            {"context_attention": {"alpha": alpha, "heads": name}}))
    return configs


def evaluate(args: argparse.Namespace) -> dict:
    from steerserve.clients import datasets as ds
    from steerserve.server import head_sets as hs

    sets = {}
    for value in args.head_set:
        name, path = hs.parse_cli_value(value)
        sets[name] = tuple(tuple(p) for p in hs.read_head_set(path)["heads"])
    args.head_set_names = list(sets)
    data = {}
    if "squad" in args.datasets:
        data["squad"] = ds.load_squad()[EVAL_OFFSET: EVAL_OFFSET + args.n]
    if "squad-cf" in args.datasets:
        data["squad-cf"] = ds.counterfactual_squad(EVAL_OFFSET + args.n)[EVAL_OFFSET:]
    if "drop" in args.datasets:
        data["drop"] = ds.load_drop()[: args.n]
    engine = Engine(args.model, args.dtype, sets)
    rows = []
    try:
        for label, steer in _configs(args):
            t0 = time.perf_counter()
            row = {"config": label, "steer": steer}
            for name, items in data.items():
                preds = engine.generate(items, steer)
                if name == "squad-cf":
                    ctx = [ds.contains(p, it.answers) for p, it in zip(preds, items)]
                    mem = [ds.contains(p, it.memory_answers) and not c for p, it, c in zip(preds, items, ctx)]
                    row["squad-cf context"] = _mean_se(ctx)
                    row["squad-cf memory"] = _mean_se(mem)
                else:
                    row[name] = _mean_se([ds.contains(p, it.answers) for p, it in zip(preds, items)])
                    row[f"{name} F1"] = _mean_se([ds.token_f1(p, it.answers) for p, it in zip(preds, items)])
            rows.append(row)
            _log(f"{label}: " + ", ".join(f"{k} {v[0]:.1f}" for k, v in row.items() if isinstance(v, tuple))
                 + f"  [{time.perf_counter() - t0:.0f} s]")
    finally:
        engine.close()
    table = markdown_table(rows, {k: len(v) for k, v in data.items()})
    print(table)
    result = {"rows": rows, "n": {k: len(v) for k, v in data.items()}, "dtype": args.dtype, "table": table}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


def _mean_se(values) -> tuple[float, float]:
    xs = [float(v) for v in values]
    mean = statistics.fmean(xs)
    se = statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else 0.0
    return (100 * mean, 100 * se)


def markdown_table(rows: list[dict], n: dict) -> str:
    cols = [k for k in rows[0] if isinstance(rows[0][k], tuple)]
    head = "| configuration | " + " | ".join(cols) + " |"
    sep = "|---|" + "---|" * len(cols)
    lines = [head, sep]
    for row in rows:
        lines.append(f"| {row['config']} | " + " | ".join(f"{row[c][0]:.1f} ± {row[c][1]:.1f}" for c in cols) + " |")
    lines.append("")
    lines.append("Percent (± standard error); n = " + ", ".join(f"{k} {v}" for k, v in n.items()) + ".")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint folder (default: the embedded model)")
    p.add_argument("--dtype", default="bfloat16", help="engine dtype (default bfloat16: the speed of `serve --dtype bfloat16`)")
    p.add_argument("--n", type=int, default=150, help="questions per data set (default 150)")
    p.add_argument("--datasets", default="squad,squad-cf,drop", type=lambda s: s.split(","),
                   help="comma list of squad, squad-cf, drop (default all three)")
    p.add_argument("--alphas", default="0.9,0.7,0.5,0.3", type=lambda s: [float(x) for x in s.split(",")],
                   help="alpha sweep with all heads (default 0.9,0.7,0.5,0.3)")
    p.add_argument("--head-set", action="append", default=[], metavar="[NAME=]FILE",
                   help="also evaluate these head sets (repeatable)")
    p.add_argument("--set-alphas", default="0.7,0.5,0.3,0.1", type=lambda s: [float(x) for x in s.split(",")],
                   help="alphas for each head set (default 0.7,0.5,0.3,0.1)")
    p.add_argument("--out", default=None, help="write rows and the Markdown table as JSON here")


def add_profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint folder (default: the embedded model)")
    p.add_argument("--dtype", default="bfloat16", help="engine dtype (default bfloat16: the speed of `serve --dtype bfloat16`)")
    p.add_argument("--n", type=int, default=32, help="profiling questions (counterfactual SQuAD, default 32)")
    p.add_argument("--alpha", type=float, default=0.3, help="alpha each candidate is steered with (default 0.3)")
    p.add_argument("--layers-top", type=int, default=6,
                   help="profile single heads in this many best layers (default 6)")
    p.add_argument("--top", type=int, default=16, help="keep at most this many best heads (default 16)")
    p.add_argument("--name", default="context", help="head set name written in the file (default context)")
    p.add_argument("--out", required=True, help="head set file to write (JSON)")
