"""`steerserve train eval-vectors`: does a steering vector shift what the model writes?

Generates greedy chat replies to held-out prompts (`training/vector_data.HELD_OUT_PROMPTS`, none of
which is in the training statements) with the vector at each scale of a sweep, all scales mixed in
one continuous batch of the steerable vLLM engine (the served path), and scores each reply offline
with VADER (a sentiment lexicon, `vaderSentiment`): the compound score in [-1, 1], and the share of
replies above +0.05 ("positive") and below -0.05 ("negative"), VADER's own thresholds. Reported per
scale: mean compound with its standard error (sample standard deviation / sqrt(n)), the shares, and
distinct-2 (unique word bigrams / bigrams, over all replies of the scale; low values flag
repetition, i.e. a scale too large for fluent text).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path


def add_vector_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--vector", default=None, metavar="FILE",
                   help="vector file (GGUF or safetensors; default: the shipped demo vector of the embedded model)")
    p.add_argument("--scales", default="-8,-4,0,4,8", help="comma-separated scales (default -8,-4,0,4,8)")
    p.add_argument("--layers", default=None, help='"all" (default: every layer the vector has) or indices')
    p.add_argument("--n", type=int, default=None, help="held-out prompts used (default: all 24)")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens per reply (default 48)")
    p.add_argument("--out", default="vector-eval", help="output folder: results.json, table.md, samples.jsonl")


def _log(msg: str) -> None:
    print(f"[eval-vectors] {msg}", file=sys.stderr, flush=True)


def distinct_2(texts: list[str]) -> float:
    bigrams = [tuple(w[i:i + 2]) for w in (t.lower().split() for t in texts) for i in range(len(w) - 1)]
    return len(set(bigrams)) / len(bigrams) if bigrams else 0.0


def summarise(scores: list[float]) -> dict:
    n = len(scores)
    mean = statistics.fmean(scores)
    se = statistics.stdev(scores) / math.sqrt(n) if n > 1 else float("nan")
    return {"n": n, "compound": mean, "se": se, "positive": sum(s > 0.05 for s in scores) / n,
            "negative": sum(s < -0.05 for s in scores) / n}


def run_vector_eval(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    from vllm import LLM, SamplingParams

    from steerserve.patches import STEERABLE_ARCHITECTURES
    from steerserve.patches.adapter.runner import shutdown_engine
    from steerserve.patches.plan import engine_args
    from steerserve.patches.steers.base import SETTINGS_KEY, ModelInfo
    from steerserve.patches.steers.vectors import VECTORS_SETTING
    from steerserve.server import family as _family
    from steerserve.server.model_store import EMBEDDED_DEMO_VECTOR, resolve_model
    from steerserve.server.schema import SteerError, normalise

    from .vector_data import HELD_OUT_PROMPTS

    model = resolve_model(args.model)
    vector = Path(args.vector) if args.vector else EMBEDDED_DEMO_VECTOR
    info = ModelInfo.from_checkpoint(model)
    fam = _family.Family()
    try:
        _family.prepare_vectors({"v": str(vector)}, model, fam)
        scales = [float(x) for x in args.scales.split(",") if x.strip()]
    except (_family.FamilyError, ValueError) as err:
        raise SystemExit(f"steerserve train eval-vectors: {err}") from None
    _family.set_current(fam)
    layers = "all" if args.layers in (None, "all") else [int(x) for x in args.layers.split(",")]
    try:
        plans = {s: normalise({"vectors": [{"name": "v", "scale": s, "layers": layers}]}, info) for s in scales}
    except SteerError as err:
        raise SystemExit(f"steerserve train eval-vectors: {err}") from None
    prompts = HELD_OUT_PROMPTS[: args.n] if args.n else HELD_OUT_PROMPTS
    tok = AutoTokenizer.from_pretrained(model)
    arch = json.loads((model / "config.json").read_text())["architectures"][0]
    llm = LLM(model=str(model), dtype="float32", enforce_eager=True, max_model_len=1024, seed=0,
              kv_cache_memory_bytes=1 << 30, hf_overrides={"architectures": [STEERABLE_ARCHITECTURES[arch]]},
              additional_config={SETTINGS_KEY: {VECTORS_SETTING: [{"name": "v", "path": str(vector)}]}})
    items, params, keys = [], [], []
    for s, plan in plans.items():
        for text in prompts:
            ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          tokenize=True)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            items.append({"prompt_token_ids": ids, **({"cache_salt": plan.fingerprint()} if not plan.is_empty else {})})
            params.append(SamplingParams(max_tokens=args.max_tokens, temperature=0.0,
                                         extra_args=engine_args(plan) if not plan.is_empty else None))
            keys.append((s, text))
    _log(f"{len(items)} replies ({len(scales)} scales x {len(prompts)} prompts) in one batch")
    outs = llm.generate(items, params, use_tqdm=True)
    shutdown_engine(llm)
    vader = SentimentIntensityAnalyzer()
    by_scale: dict[float, list[tuple[str, str, float]]] = {s: [] for s in scales}
    for (s, text), o in zip(keys, outs):
        reply = o.outputs[0].text
        by_scale[s].append((text, reply, vader.polarity_scores(reply)["compound"]))
    results = {str(s): {**summarise([c for _, _, c in rows]), "distinct_2": distinct_2([r for _, r, _ in rows])}
               for s, rows in by_scale.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": model.name, "vector": vector.name, "layers": layers, "max_tokens": args.max_tokens,
            "prompts": len(prompts)}
    (out / "results.json").write_text(json.dumps({"config": meta, "by_scale": results}, indent=1) + "\n")
    with open(out / "samples.jsonl", "w") as f:
        for s, rows in by_scale.items():
            for text, reply, c in rows:
                f.write(json.dumps({"scale": s, "prompt": text, "reply": reply, "compound": c}) + "\n")
    lines = ["| scale | VADER compound (mean ± SE) | positive | negative | distinct-2 |", "|---|---|---|---|---|"]
    for s, r in results.items():
        lines.append(f"| {float(s):g} | {r['compound']:+.3f} ± {r['se']:.3f} | {r['positive']:.0%} | "
                     f"{r['negative']:.0%} | {r['distinct_2']:.2f} |")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    print(table)
    _log(f"wrote {out / 'results.json'}, {out / 'table.md'}, {out / 'samples.jsonl'}")
