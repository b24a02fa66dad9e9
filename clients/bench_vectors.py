"""`steerserve bench --steer vectors`: residual steering-vector throughput, side by side in one run.

One steerable engine serving four vectors (the embedded model's demo vector `happy`, or `--vector
FILE`, and three random unit directions written to a temp dir), the same workload everywhere (N
chat prompts x T generated tokens, all submitted at once, greedy):
- `plain`, `plain_control` (the noise floor);
- `shared_all_layers`: every request with one vector on every layer it has;
- `distinct_8`, `distinct_32`: K distinct configurations (vector, scale, layer range) spread over
  the N requests (K = N: every request its own);
- `quarter_shared`: 25% of the requests steered; the unsteered rows' own decode time (engine
  timestamps) against the all-plain run (the mixed-batch tax);
and repeng's hooks (`repeng.ControlModel`, one global configuration at a time, so K distinct
configurations run as K batches; Hugging Face `generate`, left padding) on the same prompts, with
the same configurations; without repeng, the pure-torch reference's hooks (`steers/vectors/
reference.py`) do the same. The Hugging Face base alone, batched, is the ceiling for the
engine-vs-hooks ratio on this machine. EasySteer's published ratios (GPU, batch 256) are printed
beside ours.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

# EasySteer's reported throughput relative to unsteered vLLM (its paper's table; GPU, batch 256)
EASYSTEER = {"shared_all_layers": 0.76, "distinct_32": 0.52}


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def stand_in_vectors(hidden: int, layers: list[int], root: Path, count: int = 3) -> dict[str, str]:
    """`count` random unit directions per layer, as GGUF control vectors."""
    import numpy as np

    from steerserve.patches.steers.vectors import files

    rng = np.random.default_rng(11)
    out = {}
    for k in range(count):
        dirs = {}
        for i in layers:
            d = rng.standard_normal(hidden).astype(np.float32)
            dirs[i] = d / np.linalg.norm(d)
        path = root / f"random{k}.gguf"
        files.write_gguf(path, dirs, "llama")
        out[f"random{k}"] = str(path)
    return out


def configurations(names: list[str], layers: tuple[int, ...], k: int, scale: float) -> list[tuple]:
    """K distinct (vector, scale, layers) configurations."""
    out = []
    n = len(layers)
    for i in range(k):
        name = names[i % len(names)]
        span = layers if i % 2 == 0 else layers[(i * 3) % (n // 2): (i * 3) % (n // 2) + n // 2]
        out.append((name, scale * (1 + 0.05 * i) * (-1 if i % 3 == 2 else 1), tuple(span)))
    return out


def _plan(config):
    from steerserve.patches.plan import SteerPlan
    from steerserve.patches.steers.vectors import VectorsPlan, VectorTerm

    name, scale, layers = config
    return SteerPlan(vectors=VectorsPlan((VectorTerm(name, float(scale), tuple(layers)),)))


def hooks_generate(model, prompts, T: int, configs: list[tuple], directions: dict, pad: int,
                   use_repeng: bool) -> float:
    """One configuration at a time (hook libraries hold one per model): each distinct configuration's
    requests as one left-padded `generate` batch. Returns the wall time."""
    import torch

    from steerserve.patches.reference import greedy_generate

    groups: dict[tuple, list[list[int]]] = {}
    for p, c in zip(prompts, configs):
        groups.setdefault(c, []).append(p)
    t0 = time.perf_counter()
    for config, batch in groups.items():
        if config is None:
            greedy_generate(model, batch, T, None, pad)
            continue
        if not use_repeng:
            greedy_generate(model, batch, T, _plan(config), pad)
            continue
        import repeng

        name, scale, layers = config
        control = repeng.ControlModel(model, list(layers))
        try:
            control.set_control(repeng.ControlVector("llama", {i: directions[name][i] for i in layers}), scale)
            width = max(len(x) for x in batch)
            ids = torch.tensor([[pad] * (width - len(x)) + x for x in batch])
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch])
            control.generate(input_ids=ids, attention_mask=mask, max_new_tokens=T, min_new_tokens=T,
                             do_sample=False, pad_token_id=pad)
        finally:
            control.unwrap()
    return time.perf_counter() - t0


def run_vectors_bench(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from steerserve.patches.steers.vectors import VECTORS_SETTING, files
    from steerserve.patches.steers.vectors.reference import attach
    from steerserve.server.model_store import EMBEDDED_DEMO_VECTOR

    from .bench_engine import bench_inputs, measure_engine, paired_ratio, print_targets_report

    model_dir, info, tok, prompts = bench_inputs(args)
    n, T = args.requests, args.max_tokens
    scratch = tempfile.TemporaryDirectory()
    main = Path(args.vector) if args.vector else EMBEDDED_DEMO_VECTOR
    if not args.vector and args.model:
        raise SystemExit("steerserve bench --steer vectors: --vector FILE is needed with --model")
    directions = {"main": files.read_directions(main)[1]}  # {name: {layer: float32 direction}}
    layers = tuple(sorted(directions["main"]))
    vectors = {"main": str(main), **stand_in_vectors(info.hidden_size, list(layers), Path(scratch.name))}
    directions.update({name: files.read_directions(path)[1] for name, path in vectors.items() if name != "main"})
    names = list(vectors)
    scale = args.vector_scale
    shared = ("main", scale, layers)
    workload_configs = {
        "plain": [None] * n,
        "shared_all_layers": [shared] * n,
        "distinct_8": [configurations(names, layers, 8, scale)[i % 8] for i in range(n)],
        f"distinct_{n}": configurations(names, layers, n, scale),
        "quarter_shared": [shared if i % 4 == 0 else None for i in range(n)],
        "plain_control": [None] * n,
    }
    workloads = {k: [_plan(c) if c else None for c in v] for k, v in workload_configs.items()}
    mode = "compiled" if args.compile else "eager"
    _log(f"engine: {model_dir.name}, {args.dtype}, {mode}; {n} requests x {T} tokens; vectors {', '.join(names)} "
         f"on {len(layers)} layers")
    settings = {VECTORS_SETTING: [{"name": k, "path": v} for k, v in vectors.items()]}
    if args.graph_safe:  # the fixed op on every layer of every step, reading the buffers (docs/gpu.md)
        settings["graph_safe_steps"] = True
    times, decode = measure_engine(model_dir, prompts, T, workloads, "vectors:", args.repeats, args.dtype,
                                   args.compile, settings=settings)
    runs = {k: n * T / statistics.median(v) for k, v in times.items()}
    rows = [i for i in range(n) if workload_configs["quarter_shared"][i] is None]
    plain_rows = statistics.median(
        statistics.median(m[i] / p[i] for i in rows) for p, m in zip(decode["plain"], decode["quarter_shared"]))
    ratios = {
        "plain_control_vs_plain (noise floor)": paired_ratio(times, "plain", "plain_control"),
        "shared_all_layers_vs_plain": paired_ratio(times, "plain", "shared_all_layers"),
        "distinct_8_vs_plain": paired_ratio(times, "plain", "distinct_8"),
        f"distinct_{n}_vs_plain": paired_ratio(times, "plain", f"distinct_{n}"),
        "quarter_shared_vs_plain": paired_ratio(times, "plain", "quarter_shared"),
        "plain_rows_decode_time_quarter_shared_over_plain": plain_rows,
    }
    baseline = None
    if not args.skip_hf:
        try:
            import importlib

            if not hasattr(np, "float_"):
                np.float_ = np.float64  # repeng 0.4.0 names this NumPy 1 alias
            importlib.import_module("repeng")
            baseline = "repeng"
        except ImportError:
            baseline = "reference hooks"
        _log(f"Hugging Face {args.dtype}: {baseline}, one configuration at a time")
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype)).eval()
        attach(hf, vectors)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        for name in ("plain", "shared_all_layers", f"distinct_{n}"):
            dt = hooks_generate(hf, prompts, T, workload_configs[name], directions, pad, baseline == "repeng")
            runs[f"hf_{name}"] = n * T / dt
            _log(f"HF {name}: {runs[f'hf_{name}']:.1f} tok/s")
        ratios["engine_plain_vs_hf_plain (the ceiling)"] = runs["plain"] / runs["hf_plain"]
        ratios[f"engine_vs_{baseline.replace(' ', '_')}_shared_all_layers"] = (
            runs["shared_all_layers"] / runs["hf_shared_all_layers"])
        ratios[f"engine_vs_{baseline.replace(' ', '_')}_distinct_{n}"] = runs[f"distinct_{n}"] / runs[f"hf_distinct_{n}"]
    targets = {"shared_all_layers_vs_plain": (">=", 0.97), f"distinct_{n}_vs_plain": (">=", 0.95)}
    if baseline:
        targets[f"engine_vs_{baseline.replace(' ', '_')}_distinct_{n}"] = (">=", 10.0)
    print_targets_report(runs, ratios, targets)
    print(f"\n{'vs plain (same engine)':<28}{'steerserve':>12}{'EasySteer':>12}")
    print(f"{'one vector, all layers':<28}{ratios['shared_all_layers_vs_plain']:>12.3f}"
          f"{EASYSTEER['shared_all_layers']:>12.2f}")
    print(f"{'32 distinct configurations':<28}{ratios.get('distinct_32_vs_plain', float('nan')):>12.3f}"
          f"{EASYSTEER['distinct_32']:>12.2f}")
    results = {"config": {"model": model_dir.name, "vectors": {k: Path(v).name for k, v in vectors.items()},
                          "layers": len(layers), "scale": scale, "requests": n, "max_tokens": T, "dtype": args.dtype,
                          "mode": mode, "graph_safe_steps": bool(args.graph_safe), "repeats": args.repeats,
                          "hooks_baseline": baseline},
               "tok_per_s": runs, "ratios": ratios, "easysteer": EASYSTEER}
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    scratch.cleanup()
    return results
