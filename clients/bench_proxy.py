"""`steerserve bench --steer proxy`: proxy-tuning throughput (base + alpha * (expert - anti_expert)).

Same workload everywhere (N chat prompts x T generated tokens, all submitted at once, greedy):
1. the base engine without pairs: `plain`, `plain_control` (noise floor);
2. an engine serving the expert alone and one serving the anti-expert alone: `plain` each (the
   three models' plain costs, summed, are what proxy tuning must not exceed by more than 10%);
3. the base engine holding the pair (`--proxy EXPERT,ANTI_EXPERT`; default: an anti-expert derived
   from the model (every 2nd layer) and a perturbed copy of it as the expert, in a temp dir):
   `plain`, `all_proxy`, `quarter_proxy` (25% proxy rows among plain ones), `one_proxy` (one row);
4. the Hugging Face reference: the three models batched and stepped together, each with its KV
   cache (`steers/proxy/reference.proxy_generate`), on the same N prompts; and the base alone (`generate`), whose
   ratio to the engine's plain run is the ceiling for the engine-vs-reference ratio on this machine.
Rounds are interleaved within an engine; ratios within an engine are medians of per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def stand_in_pair(model_dir: Path, root: Path) -> tuple[Path, Path]:
    """An anti-expert derived from the model (every 2nd layer) and a perturbed copy as the expert."""
    from steerserve.training.proxy_demo import build_anti_expert

    from .bench_mixing import perturbed_variant

    anti = build_anti_expert(model_dir, root / "anti-expert", 2)
    return perturbed_variant(anti, root / "expert"), anti


def run_proxy_bench(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from steerserve.patches.plan import ProxyPlan, SteerPlan
    from steerserve.patches.steers.proxy import PAIRS_SETTING
    from steerserve.patches.reference import greedy_generate
    from steerserve.patches.steers.proxy.reference import proxy_generate

    from .bench_engine import (bench_inputs, decode_step_extra, measure_engine, median_decode, paired_ratio,
                               print_targets_report)

    model_dir, info, tok, prompts = bench_inputs(args)
    n, T = args.requests, args.max_tokens
    scratch = tempfile.TemporaryDirectory()
    if args.proxy:
        expert, anti = (Path(p).expanduser().resolve() for p in args.proxy.split(",", 1))
    else:
        expert, anti = stand_in_pair(model_dir, Path(scratch.name))
    plan = SteerPlan(proxy=ProxyPlan("pair", args.proxy_alpha))

    def measure(path: Path, workloads: dict, label: str, settings: dict | None = None) -> tuple[dict, dict]:
        return measure_engine(path, prompts, T, workloads, label, args.repeats, args.dtype, args.compile, model_dir,
                              settings)

    mode = "compiled" if args.compile else "eager"
    _log(f"engine 1/4: {model_dir.name} alone, {args.dtype}, {mode}; {n} requests x {T} tokens")
    t_base, d_base = measure(model_dir, {"plain": [None] * n, "plain_control": [None] * n}, "base alone:")
    _log(f"engine 2/4: the expert alone ({expert})")
    # each alone on all N prompts, and on the first N/4 (what the experts run in a quarter-proxy batch)
    alone = {"plain": [None] * n, "quarter_rows": [None] * (n // 4)}
    t_expert, d_expert = measure(expert, alone, "expert alone:")
    _log(f"engine 3/4: the anti-expert alone ({anti})")
    t_anti, d_anti = measure(anti, alone, "anti-expert alone:")
    _log("engine 4/4: the base holding the pair")
    w = {"plain": [None] * n, "all_proxy": [plan] * n,
         "quarter_proxy": [plan if i % 4 == 0 else None for i in range(n)],
         "one_proxy": [plan] + [None] * (n - 1)}
    t_pair, decode = measure(model_dir, w, "pair loaded:",
                             {PAIRS_SETTING: [{"name": "pair", "expert": str(expert), "anti_expert": str(anti)}]})

    def med(times):
        return statistics.median(times)

    def tps(times):
        return n * T / med(times)

    paired = paired_ratio

    runs = {"base_alone_plain": tps(t_base["plain"]), "base_alone_plain_control": tps(t_base["plain_control"]),
            "expert_alone_plain": tps(t_expert["plain"]), "anti_expert_alone_plain": tps(t_anti["plain"]),
            **{f"pair_loaded_{k}": tps(v) for k, v in t_pair.items()}}
    three = med(t_base["plain"]) + med(t_expert["plain"]) + med(t_anti["plain"])
    rows = [i for i in range(n) if w["quarter_proxy"][i] is None]
    plain_rows = statistics.median(
        statistics.median(m[i] / p[i] for i in rows) for p, m in zip(decode["plain"], decode["quarter_proxy"]))
    ratios = {
        "plain_control_vs_plain (noise floor)": paired(t_base, "plain_control", "plain") ** -1,
        "proxy_cost_over_sum_of_three_plain_costs": med(t_pair["all_proxy"]) / three,
        "plain_with_pair_loaded_vs_without": runs["pair_loaded_plain"] / runs["base_alone_plain"],
        "all_proxy_vs_plain": paired(t_pair, "plain", "all_proxy"),
        "quarter_proxy_vs_plain": paired(t_pair, "plain", "quarter_proxy"),
        "plain_rows_decode_time_quarter_proxy_over_plain": plain_rows,
        # the floor for the previous ratio: the expert's and anti-expert's own decode steps at N/4
        # rows (each alone), over the base's at N rows, plus 1
        "floor: 1 + (expert + anti-expert decode at N/4 rows alone) / base decode at N rows":
            1 + (median_decode(d_expert, "quarter_rows") + median_decode(d_anti, "quarter_rows"))
            / median_decode(d_base, "plain"),
        "decode_step_extra_one_proxy_row": decode_step_extra(decode, "one_proxy"),
        "decode_step_extra_quarter_proxy_rows": decode_step_extra(decode, "quarter_proxy"),
        "decode_step_extra_all_proxy_rows": decode_step_extra(decode, "all_proxy"),
    }
    if not args.skip_hf:
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        dtype = getattr(torch, args.dtype)
        hf = [AutoModelForCausalLM.from_pretrained(p, dtype=dtype).eval() for p in (model_dir, expert, anti)]
        t0 = time.perf_counter()
        greedy_generate(hf[0], prompts, T, None, pad)
        runs["hf_base_alone_batched"] = n * T / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        proxy_generate(*hf, prompts, T, args.proxy_alpha, pad)
        runs["hf_three_models_batched"] = n * T / (time.perf_counter() - t0)
        _log(f"HF: base alone {runs['hf_base_alone_batched']:.1f} tok/s, three models batched: "
             f"{runs['hf_three_models_batched']:.1f} tok/s")
        ratios["engine_plain_vs_hf_base_alone (the ceiling)"] = runs["base_alone_plain"] / runs["hf_base_alone_batched"]
        ratios["engine_all_proxy_vs_hf_three_models"] = runs["pair_loaded_all_proxy"] / runs["hf_three_models_batched"]
    targets = {"proxy_cost_over_sum_of_three_plain_costs": ("<=", 1.05),
               "plain_with_pair_loaded_vs_without": (">=", 0.9),
               "plain_rows_decode_time_quarter_proxy_over_plain": ("<=", 1.35),
               "engine_all_proxy_vs_hf_three_models": (">=", 1.25)}
    print_targets_report(runs, ratios, targets)
    results = {"config": {"model": model_dir.name, "expert": str(expert) if args.proxy else "stand-in",
                          "anti_expert": str(anti) if args.proxy else "stand-in (every 2nd layer)",
                          "alpha": args.proxy_alpha, "requests": n, "max_tokens": T, "dtype": args.dtype,
                          "mode": mode, "repeats": args.repeats, "layers": info.num_layers},
               "tok_per_s": runs, "ratios": ratios}
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    scratch.cleanup()
    return results
