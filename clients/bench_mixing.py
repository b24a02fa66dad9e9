"""`steerserve bench --steer mixing`: TAIA mixing throughput with a fully fine-tuned variant.

Two engines on the same workload (N chat prompts x T generated tokens, all submitted at once):
1. the plain steerable engine (no variant loaded): `plain`, `plain_control` (noise floor);
2. the engine holding the variant (`--variant PATH`, a full checkpoint of `--model`; default: a
   perturbed copy of the model written to a temp dir): `plain`, `all_tuned`, `all_taia`,
   `tuned_taia_half` (TAIA rows and tuned rows in one batch), `quarter_taia` (25% TAIA rows among
   unmixed ones), `one_taia` (one TAIA row).
Rounds are interleaved within an engine; ratios within an engine are medians of per-round ratios.
The Hugging Face baseline holds one model per configuration, so a batch of half tuned, half TAIA
requests runs as two batches (tuned model, then the TAIA export).
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


def perturbed_variant(model_dir: Path, out: Path, scale: float = 0.02) -> Path:
    """A stand-in "fully fine-tuned" variant: the model with every weight perturbed (seeded)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steerserve.training import checkpoints as ck

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.float().std())
    cfg_dtype = json.loads((model_dir / "config.json").read_text()).get("dtype") or "float32"
    model.to(getattr(torch, cfg_dtype)).save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    ck.write_metadata(out, "full", model_dir, ck.base_digest(model_dir))
    return out


def run_mixing_bench(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from steerserve.patches.steers.mixing import VARIANTS_SETTING
    from steerserve.patches.plan import MixingPlan, SteerPlan
    from steerserve.training.export import merge_full

    from .bench_engine import bench_inputs, decode_step_extra, measure_engine, paired_ratio, print_targets_report

    model_dir, _, tok, prompts = bench_inputs(args)
    n, T = args.requests, args.max_tokens
    scratch = tempfile.TemporaryDirectory()
    variant = Path(args.variant) if args.variant else perturbed_variant(model_dir, Path(scratch.name) / "variant")
    taia = merge_full(variant, model_dir, Path(scratch.name) / "taia")
    tuned_plan = SteerPlan(mixing=MixingPlan("v", "tuned", "tuned", via="weights", index=0))
    taia_plan = SteerPlan(mixing=MixingPlan("v", "tuned", "base", via="weights", index=0))

    def measure(workloads: dict, label: str, settings: dict | None = None) -> tuple[dict, dict]:
        return measure_engine(model_dir, prompts, T, workloads, label, args.repeats, args.dtype, settings=settings)

    _log(f"engine 1/2: {model_dir.name} without variants, {args.dtype}, eager; {n} requests x {T} tokens")
    t1, _ = measure({"plain": [None] * n, "plain_control": [None] * n}, "no variants:")
    _log(f"engine 2/2: with the variant {variant}")
    w2 = {"plain": [None] * n, "all_tuned": [tuned_plan] * n, "all_taia": [taia_plan] * n,
          "tuned_taia_half": [tuned_plan if i % 2 else taia_plan for i in range(n)],
          "quarter_taia": [taia_plan if i % 4 == 0 else None for i in range(n)],
          "one_taia": [taia_plan] + [None] * (n - 1)}
    t2, decode2 = measure(w2, "variant loaded:", {VARIANTS_SETTING: [{"name": "v", "path": str(variant)}]})

    def tps(times):
        return n * T / statistics.median(times)

    paired = paired_ratio

    rows = [i for i in range(n) if w2["quarter_taia"][i] is None]
    unmixed = statistics.median(
        statistics.median(m[i] / p[i] for i in rows) for p, m in zip(decode2["plain"], decode2["quarter_taia"]))
    # in the half/half batch: TAIA rows' own throughput (tokens / own decode time) over tuned rows'
    taia_rows = [i for i in range(n) if not i % 2]
    tuned_rows = [i for i in range(n) if i % 2]
    in_batch = statistics.median(
        statistics.median(d[i] for i in tuned_rows) / statistics.median(d[i] for i in taia_rows)
        for d in decode2["tuned_taia_half"])
    runs = {"no_variants_plain": tps(t1["plain"]), "no_variants_plain_control": tps(t1["plain_control"]),
            **{f"variant_loaded_{k}": tps(v) for k, v in t2.items()}}
    ratios = {
        "plain_control_vs_plain (noise floor)": paired(t1, "plain_control", "plain") ** -1,
        "taia_vs_tuned (all-TAIA batch / all-tuned batch)": paired(t2, "all_taia", "all_tuned") ** -1,
        "taia_vs_tuned_rows_in_one_half_half_batch": in_batch,
        "plain_with_variant_loaded_vs_without": runs["variant_loaded_plain"] / runs["no_variants_plain"],
        "tuned_taia_half_vs_plain": paired(t2, "plain", "tuned_taia_half"),
        "all_taia_vs_plain": paired(t2, "plain", "all_taia"),
        "all_tuned_vs_plain": paired(t2, "plain", "all_tuned"),
        "unmixed_rows_decode_time_quarter_taia_over_plain": unmixed,
        "decode_step_extra_one_taia_row": decode_step_extra(decode2, "one_taia"),
        "decode_step_extra_quarter_taia_rows": decode_step_extra(decode2, "quarter_taia"),
        "decode_step_extra_all_taia_rows": decode_step_extra(decode2, "all_taia"),
    }
    if not args.skip_hf:
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        dtype = getattr(torch, args.dtype)
        half = [prompts[i] for i in range(n) if i % 2], [prompts[i] for i in range(n) if not i % 2]
        from steerserve.patches.reference import greedy_generate

        dt = 0.0  # generation time only (model loading excluded)
        for path, batch in ((variant, half[0]), (taia, half[1])):
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
            t0 = time.perf_counter()
            greedy_generate(hf, batch, T, None, pad)
            dt += time.perf_counter() - t0
            _log(f"HF: {path.name}: batch of {len(batch)} done")
            del hf
        runs["hf_two_models_two_batches"] = n * T / dt
        ratios["engine_tuned_taia_half_vs_hf_two_batches"] = runs["variant_loaded_tuned_taia_half"] / runs[
            "hf_two_models_two_batches"]
    targets = {"taia_vs_tuned (all-TAIA batch / all-tuned batch)": (">=", 0.9),
               "taia_vs_tuned_rows_in_one_half_half_batch": (">=", 0.9),
               "plain_with_variant_loaded_vs_without": (">=", 0.97),
               "tuned_taia_half_vs_plain": (">=", 0.95),
               "unmixed_rows_decode_time_quarter_taia_over_plain": ("<=", 1.05)}
    print_targets_report(runs, ratios, targets)
    results = {"config": {"model": model_dir.name, "variant": str(variant) if args.variant else "perturbed copy",
                          "requests": n, "max_tokens": T, "dtype": args.dtype, "repeats": args.repeats},
               "tok_per_s": runs, "ratios": ratios}
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    scratch.cleanup()
    return results


def run_mixing_bits(args: argparse.Namespace) -> dict:
    """`steerserve bench --steer mixing-bits`: whether unmixed rows keep their bits in a mixed batch.

    A mixed step computes unmixed rows with the base weights in a smaller matrix product than an
    all-plain step; where the GEMM kernel's per-row results depend on the number of rows, their bits
    move. The yardstick is vLLM's own behaviour: on an engine without a variant (the "stock" runs:
    no steering, whose plain rows are stock vLLM's bit for bit, as the engine tests check), the same requests
    in batches of other sizes (the non-TAIA prompts alone, every second prompt alone, against all
    of them together). Then on the engine holding the variant, the unmixed rows of a quarter-TAIA batch
    against the all-plain batch. Greedy tokens and their logprobs are compared (over the tokens
    both runs share)."""
    from steerserve.patches.adapter.runner import shutdown_engine
    from steerserve.patches.plan import MixingPlan, SteerPlan
    from steerserve.patches.steers.mixing import VARIANTS_SETTING

    from .bench_engine import bench_inputs, steerable_llm

    model_dir, _, _, prompts = bench_inputs(args)
    n, T = args.requests, args.max_tokens
    scratch = tempfile.TemporaryDirectory()
    variant = Path(args.variant) if args.variant else perturbed_variant(model_dir, Path(scratch.name) / "variant")
    taia = SteerPlan(mixing=MixingPlan("v", "tuned", "base", via="weights", index=0))

    def generate(llm, rows, plans):
        from vllm import SamplingParams

        params = [SamplingParams(max_tokens=T, temperature=0.0, ignore_eos=True, logprobs=0,
                                 extra_args={"steer": p.to_json()} if p else None) for p in plans]
        outs = llm.generate([{"prompt_token_ids": prompts[i]} for i in rows], params, use_tqdm=False)
        return {i: (list(o.outputs[0].token_ids),
                    [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)])
                for i, o in zip(rows, outs)}

    def compare(a: dict, b: dict, rows: list[int]) -> dict:
        diffs = [abs(x - y) for i in rows for s, t, x, y in zip(a[i][0], b[i][0], a[i][1], b[i][1]) if s == t]
        return {"rows": len(rows), "rows_with_equal_tokens": sum(a[i][0] == b[i][0] for i in rows),
                "max_abs_logprob_difference": max(diffs, default=0.0)}

    unmixed = [i for i in range(n) if i % 4]
    every_second = list(range(0, n, 2))
    results = {"config": {"model": model_dir.name, "requests": n, "max_tokens": T, "dtype": args.dtype}}
    _log(f"stock engine (no variant), {args.dtype}: {n} requests, then {len(unmixed)}, then {len(every_second)}")
    llm = steerable_llm(model_dir, args.dtype, n)
    try:
        full = generate(llm, range(n), [None] * n)
        results["stock: the unmixed prompts alone vs among all"] = compare(
            full, generate(llm, unmixed, [None] * len(unmixed)), unmixed)
        results["stock: every second prompt alone vs among all"] = compare(
            full, generate(llm, every_second, [None] * len(every_second)), every_second)
    finally:
        shutdown_engine(llm)
    _log("engine holding the variant: all plain, then a quarter TAIA")
    llm = steerable_llm(model_dir, args.dtype, n, {VARIANTS_SETTING: [{"name": "v", "path": str(variant)}]})
    try:
        plain = generate(llm, range(n), [None] * n)
        mixed = generate(llm, range(n), [taia if i % 4 == 0 else None for i in range(n)])
        results["variant loaded: unmixed rows of a quarter-TAIA batch vs the all-plain batch"] = compare(
            plain, mixed, unmixed)
        results["variant loaded vs stock: all plain"] = compare(plain, full, list(range(n)))
        results["TAIA rows differ from plain (the check can see a change)"] = compare(
            plain, mixed, [i for i in range(n) if i % 4 == 0])
    finally:
        shutdown_engine(llm)
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    scratch.cleanup()
    return results
