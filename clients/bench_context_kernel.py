"""`steerserve bench --steer context-kernel`: the context-attention pass alone, kernel vs torch.

No engine: a synthetic paged KV cache with the served model's attention shapes (heads, KV heads,
head_dim; vLLM's CPU block size 128, in the layout vLLM's CPU backend uses on this machine, "vec":
K stored [head_dim, block] per block), the steered rows' queries, and one step's pass over 8
steered layers, all heads. Per number of steered decode rows (1, 8, 32; `--context-tokens` long) it times the
C++ kernel ("auto") and the pure-torch pass ("torch") in rotated rounds, and a torch-vs-torch
control; then one prefill chunk per request (the torch path both routes share). Medians of
`--repeats` rounds. The engine-level effect is `steerserve bench --steer context`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from .bench_engine import _log

LAYERS = 8
BLOCK = 128


def _shapes(model_dir: Path) -> tuple[int, int, int]:
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    heads = cfg["num_attention_heads"]
    return heads, cfg.get("num_key_value_heads", heads), cfg.get("head_dim", cfg["hidden_size"] // heads)


def run_context_kernel_bench(args: argparse.Namespace) -> dict:
    import torch

    from steerserve.patches.steers.context_attention import ContextAttentionPlan, native
    from steerserve.patches.steers.context_attention import engine as ca
    from steerserve.patches.steers.context_attention import kv as kvmod
    from steerserve.patches.steers.engine import RequestRows
    from steerserve.server.model_store import ensure_embedded_model

    model_dir = Path(args.model) if args.model else ensure_embedded_model()
    heads, kv_heads, head_dim = _shapes(model_dir)
    dtype = getattr(torch, args.dtype)
    if native.cpu_kernel() is None:
        raise SystemExit(f"the CPU kernel is unavailable: {native.cpu_kernel_error()}")
    ident = torch.arange(BLOCK * head_dim)
    reader = kvmod.CpuPagedKV(BLOCK, head_dim, ident.view(head_dim, BLOCK).t().reshape(-1), ident)
    torch.manual_seed(0)
    lengths = [args.context_tokens]
    _log(f"context kernel: {model_dir.name} shapes ({heads} heads, {kv_heads} KV heads, head_dim {head_dim}), "
         f"{args.dtype}, {LAYERS} steered layers, contexts {lengths}, {args.repeats} rounds, "
         f"{torch.get_num_threads()} threads")
    results: dict = {"config": {"model": model_dir.name, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
                                "dtype": args.dtype, "layers": LAYERS, "block": BLOCK,
                                "threads": torch.get_num_threads()}, "decode": [], "prefill": []}
    for length in lengths:
        pages = -(-length // BLOCK)
        rows = 32
        cache = torch.randn(rows * pages, kv_heads, BLOCK, 2 * head_dim).to(dtype)
        table = torch.arange(rows * pages, dtype=torch.int32).view(rows, pages)
        seq = torch.full((rows,), length, dtype=torch.int32)
        plan = ContextAttentionPlan(0.5, tuple((layer, tuple(range(heads))) for layer in range(LAYERS)), "user",
                                    ((20, length - 40),))
        query = torch.randn(rows, heads, head_dim).to(dtype)
        out = torch.zeros(rows, heads, head_dim).to(dtype)

        def step(kernel: str, steered: int) -> float:
            entries = [(plan, RequestRows(i, i, i + 1)) for i in range(steered)]
            t0 = time.perf_counter()
            work = ca.AttentionWork.build(entries, "cpu", kernel)
            for layer in range(LAYERS):
                work.apply_(layer, query, out, cache, reader, seq, table, head_dim ** -0.5)
            return time.perf_counter() - t0

        for steered in (1, 8, 32):
            times: dict[str, list[float]] = {"torch": [], "auto": [], "torch_control": []}
            for _ in range(3):  # warm-up
                step("torch", steered), step("auto", steered)
            for r in range(args.repeats):
                order = ["torch", "auto", "torch_control"]
                order = order[r % 3:] + order[: r % 3]
                for name in order:
                    kernel = "auto" if name == "auto" else "torch"
                    times[name].append(statistics.median(step(kernel, steered) for _ in range(10)))
            row = {"context": length, "steered_rows": steered,
                   **{f"{k}_ms": round(statistics.median(v) * 1e3, 3) for k, v in times.items()}}
            row["speedup"] = round(row["torch_ms"] / row["auto_ms"], 2)
            row["control"] = round(row["torch_ms"] / row["torch_control_ms"], 3)
            results["decode"].append(row)
            _log(f"decode, {length} tokens, {steered} steered rows: torch {row['torch_ms']:.2f} ms, "
                 f"kernel {row['auto_ms']:.2f} ms per step ({row['speedup']}x; control {row['control']})")
        # prefill: one request's whole prompt as one chunk sequence, every layer
        q_all = torch.randn(length, heads, head_dim).to(dtype)
        o_all = torch.zeros(length, heads, head_dim).to(dtype)
        one = [(plan, RequestRows(0, 0, length))]
        spent = []
        for _ in range(max(2, args.repeats)):
            t0 = time.perf_counter()
            work = ca.AttentionWork.build(one, "cpu", "auto")
            for layer in range(LAYERS):
                work.apply_(layer, q_all, o_all, cache, reader, seq[:1], table[:1], head_dim ** -0.5)
            spent.append(time.perf_counter() - t0)
        row = {"context": length, "ms_per_request": round(statistics.median(spent) * 1e3, 1)}
        results["prefill"].append(row)
        _log(f"prefill, {length} tokens: {row['ms_per_request']} ms per request ({LAYERS} layers, all heads)")
    print(f"\n{'context':>8}{'steered':>9}{'torch ms':>10}{'kernel ms':>11}{'speedup':>9}{'control':>9}")
    for r in results["decode"]:
        print(f"{r['context']:>8}{r['steered_rows']:>9}{r['torch_ms']:>10.2f}{r['auto_ms']:>11.2f}"
              f"{r['speedup']:>8.2f}x{r['control']:>9.3f}")
    for r in results["prefill"]:
        print(f"prefill {r['context']} tokens: {r['ms_per_request']} ms per request")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return results
