"""`steerserve bench`: steering throughput, side by side in one run.

Drives one steerable vLLM engine with the same workload (N chat prompts x T generated tokens,
all submitted at once) as: all plain; all steered (one shared configuration); a mix; every request
with its own configuration (N distinct alphas); and the Hugging Face reference, which holds one
configuration at a time (as hook-based steering libraries and PASTA's own code do) and so runs each
distinct configuration as its own batch. Prints tokens/s and the ratios, writes JSON.

`--steer infosteer` (default): all layers, scale; the mix is half and half.
`--steer mixing`: TAIA mixing with a fully fine-tuned variant (see `bench_mixing`); `--steer mixing-bits`:
whether unmixed rows of a mixed batch keep their bits (`bench_mixing.run_mixing_bits`).
`--steer proxy`: proxy tuning with an expert / anti-expert pair (see `bench_proxy`).
`--steer vectors`: residual steering vectors, shared and K distinct configurations, vs repeng's
hooks (see `bench_vectors`).
`--steer context`: context attention with ~500-token user contexts, emphasis on the user message,
8 middle layers, all heads; the mix is 25% steered, and the unsteered rows' own decode time in the
mix is compared with the all-plain run (per-request engine timestamps).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from .bench_engine import TOPICS, _log, _prompts, decode_step_extra, interleaved_rounds, timed_generate


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint folder (default: the embedded model)")
    p.add_argument("--requests", type=int, default=32, help="concurrent requests per run (default 32)")
    p.add_argument("--max-tokens", type=int, default=128, help="generated tokens per request (default 128)")
    p.add_argument("--dtype", default="bfloat16", help="engine and reference dtype (default bfloat16)")
    p.add_argument("--alpha", type=float, default=1.5, help="InfoSteer scale alpha of the shared configuration")
    p.add_argument("--compile", action="store_true", help="torch.compile the engine (default eager)")
    p.add_argument("--graph-safe", action="store_true",
                   help="infosteer, context and vectors: run the engine with graph-safe steps (the steers that have a "
                        "graph-safe form read persistent buffers through fixed ops every step; docs/gpu.md)")
    p.add_argument("--skip-hf", action="store_true", help="skip the Hugging Face reference runs")
    p.add_argument("--repeats", type=int, default=3,
                   help="rounds of engine workloads (default 3); speeds are medians, engine ratios are medians "
                        "of per-round ratios")
    p.add_argument("--steer", choices=["infosteer", "context", "context-kernel", "mixing", "mixing-bits", "proxy",
                                       "vectors"],
                   default="infosteer",
                   help="which steer to measure (default infosteer); mixing: TAIA with a fully fine-tuned variant "
                        "(clients/bench_mixing.py); mixing-bits: whether unmixed rows of a mixed batch keep their "
                        "bits, against vLLM's own batch-composition differences; proxy: proxy tuning "
                        "(clients/bench_proxy.py); vectors: residual steering vectors (clients/bench_vectors.py); "
                        "context-kernel: the context-attention pass alone, CPU kernel vs torch pass, on synthetic "
                        "paged tensors (clients/bench_context_kernel.py)")
    p.add_argument("--vector", default=None, metavar="FILE",
                   help="vectors only: the main vector (default: the embedded model's demo vector; needed with --model)")
    p.add_argument("--vector-scale", type=float, default=4.0, help="vectors only: scale of the configurations (default 4)")
    p.add_argument("--proxy", default=None, metavar="EXPERT,ANTI_EXPERT",
                   help="proxy only: the pair's checkpoints (default: an anti-expert derived from --model, every "
                        "2nd layer, and a perturbed copy of it as the expert)")
    p.add_argument("--proxy-alpha", type=float, default=1.0, help="proxy only: alpha (default 1)")
    p.add_argument("--variant", default=None,
                   help="mixing only: a fully fine-tuned checkpoint of --model (default: a perturbed copy)")
    p.add_argument("--context-alpha", type=float, default=0.5, help="context attention alpha (default 0.5)")
    p.add_argument("--context-tokens", type=int, default=560,
                   help="context only: approximate prompt length in tokens (default 560; 2000 for long contexts)")
    p.add_argument("--context-kernel", choices=["auto", "torch"], default="auto",
                   help="context only: the decode pass (auto: the CPU/CUDA kernel where it runs; torch: the "
                        "pure-torch reference pass)")
    p.add_argument("--out", default=None, help="write the results as JSON here")


def _context_prompts(tokenizer, n: int, tokens: int = 560) -> list[tuple[list[int], tuple]]:
    """Chat prompts with user contexts of about `tokens` tokens (22 facts: ~560): (token ids,
    emphasised spans of the user message)."""
    from steerserve.patches.steers.context_attention.spans import chat_spans

    out = []
    num_facts = max(1, round(22 * tokens / 560))
    for i in range(n):
        facts = " ".join(f"Fact {j + 1}: {TOPICS[(i + j) % len(TOPICS)]} is a subject with a long history, "
                         f"many open questions and {j + 3} famous experts." for j in range(num_facts))
        msgs = [{"role": "user", "content": f"Context: {facts}\n\nQuestion: which facts mention "
                                            f"{TOPICS[i % len(TOPICS)]}? Explain briefly."}]
        out.append(chat_spans(tokenizer, msgs, "user"))
    return out


def run_bench(args: argparse.Namespace) -> dict:
    if args.steer == "proxy":
        from .bench_proxy import run_proxy_bench

        return run_proxy_bench(args)
    if args.steer == "mixing":
        from .bench_mixing import run_mixing_bench

        return run_mixing_bench(args)
    if args.steer == "mixing-bits":
        from .bench_mixing import run_mixing_bits

        return run_mixing_bits(args)
    if args.steer == "vectors":
        from .bench_vectors import run_vectors_bench

        return run_vectors_bench(args)
    if args.steer == "context-kernel":
        from .bench_context_kernel import run_context_kernel_bench

        return run_context_kernel_bench(args)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM

    from steerserve.patches import STEERABLE_ARCHITECTURES
    from steerserve.patches.plan import SteerPlan
    from steerserve.patches.reference import greedy_generate
    from steerserve.patches.adapter.runner import shutdown_engine
    from steerserve.server.model_store import ensure_embedded_model
    from steerserve.server.schema import ModelInfo, normalise

    model_dir = Path(args.model) if args.model else ensure_embedded_model()
    info = ModelInfo.from_checkpoint(model_dir)
    arch = info.architecture
    tok = AutoTokenizer.from_pretrained(model_dir)
    n, T = args.requests, args.max_tokens
    context = args.steer == "context"

    if context:
        from dataclasses import replace

        built = _context_prompts(tok, n, args.context_tokens)
        prompts = [ids for ids, _ in built]
        mid = info.num_layers // 2
        layers = list(range(max(0, mid - 4), min(info.num_layers, mid + 4)))

        def ctx_plan(alpha: float, i: int) -> SteerPlan:
            plan = normalise({"context_attention": {"alpha": alpha, "layers": layers, "heads": "all"}}, info)
            return replace(plan, context_attention=replace(plan.context_attention, spans=built[i][1],
                                                           prompt_len=len(prompts[i])))

        shared_rows = [ctx_plan(args.context_alpha, i) for i in range(n)]  # one configuration, per-row spans
        distinct = [ctx_plan(round(0.2 + 0.75 * i / max(n - 1, 1), 4), i) for i in range(n)]
        mixed_name = "quarter_steered"
        workloads: dict[str, list[SteerPlan | None]] = {
            "plain": [None] * n,
            "plain_control": [None] * n,
            "all_steered": shared_rows,
            mixed_name: [shared_rows[i] if i % 4 == 0 else None for i in range(n)],
            "distinct_configs": distinct,
            "one_steered": [shared_rows[0]] + [None] * (n - 1),
        }
        hf_shared = shared_rows
    else:
        prompts = _prompts(tok, n)
        shared = normalise({"infosteer": {"mode": "scale", "alpha": args.alpha}}, info)
        distinct = [normalise({"infosteer": {"mode": "scale", "alpha": round(0.5 + 1.5 * i / max(n - 1, 1), 4)}},
                              info) for i in range(n)]
        mixed_name = "half_half"
        workloads = {
            "plain": [None] * n,
            "plain_control": [None] * n,  # plain again: the noise floor of the ratios below
            "all_steered": [shared] * n,
            mixed_name: [shared if i % 2 else None for i in range(n)],
            "distinct_configs": distinct,
        }
        hf_shared = shared

    graph_safe = getattr(args, "graph_safe", False)
    _log(f"engine: {model_dir.name}, {args.dtype}, {'compiled' if args.compile else 'eager'}"
         f"{', graph-safe steps' if graph_safe else ''}; {n} requests x {T} tokens per run")
    from steerserve.patches.steers.base import SETTINGS_KEY

    settings = {"graph_safe_steps": True} if graph_safe else {}
    if context:
        settings["context_attention_kernel"] = args.context_kernel
        _log(f"context: ~{round(sum(map(len, prompts)) / n)} prompt tokens, decode pass: {args.context_kernel}")
    max_len = max(1024, max(map(len, prompts)) + T + 16)
    llm = LLM(model=str(model_dir), dtype=args.dtype, enforce_eager=not args.compile, max_model_len=max_len,
              kv_cache_memory_bytes=(2 << 30) if max_len <= 2304 else (4 << 30), max_num_seqs=max(n, 8), seed=0,
              disable_log_stats=False, hf_overrides={"architectures": [STEERABLE_ARCHITECTURES[arch]]},
              additional_config={SETTINGS_KEY: settings} if settings else {})

    decode_times: dict[str, list[list[float]]] = {}

    def engine_run(plans, name: str = "") -> float:
        return timed_generate(llm, prompts, plans, T, decode_times.setdefault(name, []))

    engine_run([None] * n)  # warm-up
    results: dict = {"config": {"model": model_dir.name, "steer": args.steer, "requests": n, "max_tokens": T,
                                "prompt_tokens_mean": round(sum(map(len, prompts)) / n, 1), "dtype": args.dtype,
                                "compiled": args.compile, "graph_safe": graph_safe,
                                "torch_threads": torch.get_num_threads()}, "runs": {}}
    times = interleaved_rounds(workloads, args.repeats, engine_run, n * T, "engine")
    for name, dts in times.items():
        mid = statistics.median(dts)
        results["runs"][f"engine_{name}"] = {
            "seconds": mid, "tok_per_s": n * T / mid, "rounds_tok_per_s": [round(n * T / dt, 1) for dt in dts]}
    shutdown_engine(llm)  # its engine core would keep a core busy during the Hugging Face runs

    def paired(name: str) -> float:
        return statistics.median(p / s for p, s in zip(times["plain"], times[name]))

    def unsteered_rows_slowdown() -> float:
        """Per round: median decode time of the unsteered rows in the mix / the same rows all-plain."""
        rows = [i for i, pl in enumerate(workloads[mixed_name]) if pl is None]
        per_round = []
        for plain_t, mixed_t in zip(decode_times["plain"], decode_times[mixed_name]):
            per_round.append(statistics.median(mixed_t[i] / plain_t[i] for i in rows))
        return statistics.median(per_round)

    if not args.skip_hf:
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype)).eval()
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        t0 = time.perf_counter()
        greedy_generate(hf, prompts, T, hf_shared, pad)
        dt = time.perf_counter() - t0
        results["runs"]["hf_shared_config"] = {"seconds": dt, "tok_per_s": n * T / dt}
        _log(f"HF hooks, one shared configuration, batch {n}: {n * T / dt:.1f} tok/s")
        t0 = time.perf_counter()
        for i, (p, plan) in enumerate(zip(prompts, distinct)):
            greedy_generate(hf, [p], T, plan, pad)
            _log(f"HF hooks, distinct configurations: {i + 1}/{n} batches done")
        dt = time.perf_counter() - t0
        results["runs"]["hf_distinct_configs"] = {"seconds": dt, "tok_per_s": n * T / dt}

    runs = results["runs"]
    tps = {k: v["tok_per_s"] for k, v in runs.items()}
    ratios = {
        "plain_control_vs_plain (noise floor)": paired("plain_control"),
        "all_steered_vs_plain": paired("all_steered"),
        f"{mixed_name}_vs_plain": paired(mixed_name),
        "distinct_configs_vs_plain": paired("distinct_configs"),
        f"unsteered_rows_decode_time_{mixed_name}_over_plain": unsteered_rows_slowdown(),
    }
    if context:
        def step_extra(name: str) -> float:
            return decode_step_extra(decode_times, name)

        ratios["decode_step_extra_one_steered_row"] = step_extra("one_steered")
        ratios["decode_step_extra_quarter_steered_rows"] = step_extra(mixed_name)
        ratios["decode_step_extra_all_steered_rows"] = step_extra("all_steered")
    if context:
        targets = {"all_steered_vs_plain": 0.85, f"{mixed_name}_vs_plain": 0.95}
    else:
        targets = {"all_steered_vs_plain": 0.95, f"{mixed_name}_vs_plain": 0.97}
    if "hf_shared_config" in tps:
        ratios["engine_vs_hf_distinct_configs"] = tps["engine_distinct_configs"] / tps["hf_distinct_configs"]
        ratios["engine_vs_hf_shared_config"] = tps["engine_all_steered"] / tps["hf_shared_config"]
        targets["engine_vs_hf_distinct_configs"] = 10.0
    results["ratios"] = ratios
    print(f"\n{'run (median over rounds)':<28}{'tok/s':>10}{'seconds':>10}")
    for k, v in runs.items():
        print(f"{k:<28}{v['tok_per_s']:>10.1f}{v['seconds']:>10.2f}")
    print(f"\n{'ratio':<46}{'value':>8}  target")
    for k, v in ratios.items():
        goal = targets.get(k)
        verdict = "" if goal is None else f">= {goal}  {'met' if v >= goal else 'NOT met'}"
        if k.startswith("unsteered_rows"):
            verdict = f"<= 1.03  {'met' if v <= 1.03 else 'NOT met'}"
        print(f"{k:<46}{v:>8.3f}  {verdict}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return results
