"""The context-attention Triton kernel (the CUDA route) against the pure-torch pass, on synthetic
FlashAttention-layout paged caches: on CUDA where it exists (`tests/gpu_check.sh` runs this file on
the device machine), and here through Triton's interpreter on CPU tensors (small shapes: the
interpreter is slow). No vLLM needed."""

import pytest
import torch

from steerserve.patches.steers.context_attention import engine as ca
from steerserve.patches.steers.context_attention import kv as kvmod
from steerserve.patches.steers.context_attention import triton_kernel
from steerserve.patches.steers.context_attention.reference import pasta_bias  # noqa: F401 - importable without vLLM
from steerserve.patches.steers.engine import RequestRows
from steerserve.patches.steers.context_attention import ContextAttentionPlan

needs_triton = pytest.mark.skipif(not triton_kernel.triton_available(), reason="Triton is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device here: the Triton kernel's GPU test runs in tests/gpu_check.sh")


def _flash_cache(nb, kvh, bs, hd, dtype, device, physical_token_major=True):
    """A cache with FlashAttention's logical shape [nb, kvh, bs, 2*hd]; physically token-major
    ([nb, bs, kvh, 2*hd], as vLLM allocates it) unless told otherwise."""
    if physical_token_major:
        return torch.randn(nb, bs, kvh, 2 * hd, device=device).to(dtype).permute(0, 2, 1, 3)
    return torch.randn(nb, kvh, bs, 2 * hd, device=device).to(dtype)


def _step(device, dtype, physical_token_major=True, heads=6, kvh=2, hd=32, bs=16):
    """A step: two decode rows, a 5-row prefill chunk, an unsteered decode row; plans steering
    different heads and layers."""
    torch.manual_seed(4)
    nb = 24
    cache = _flash_cache(nb, kvh, bs, hd, dtype, device, physical_token_major)
    # (seq_len, query rows this step, pages)
    reqs = [(40, 1, [3, 17, 8]), (9, 1, [20]), (29, 5, [1, 5]), (33, 1, [11, 2, 7])]
    starts, n_rows = [0, 1, 2, 7], 8
    block_table = torch.zeros(4, 3, dtype=torch.int32)
    for i, (_, _, pages) in enumerate(reqs):
        block_table[i, : len(pages)] = torch.tensor(pages)
    seq_lens = torch.tensor([r[0] for r in reqs], dtype=torch.int32)
    p_all = ContextAttentionPlan(0.25, ((0, tuple(range(heads))), (1, (3,))), "user", ((2, 6), (20, 26)))
    p_some = ContextAttentionPlan(0.6, ((0, (1, 4)),), "user", ((0, 3),))
    entries = [(p_all, RequestRows(0, 0, 1)), (p_some, RequestRows(1, 1, 2)), (p_all, RequestRows(2, 2, 7))]
    query = torch.randn(n_rows, heads, hd, device=device).to(dtype)
    before = torch.randn(n_rows, heads, hd, device=device).to(dtype)
    return cache, block_table.to(device), seq_lens.to(device), entries, query, before


def _both(device, dtype, monkeypatch=None, **kw):
    """Each layer's outputs by the torch pass and by the Triton route, from the same step."""
    cache, block_table, seq_lens, entries, query, before = _step(device, dtype, **kw)
    reader = kvmod.FlashPagedKV(cache.shape[2], query.shape[2])
    results = []
    for layer in (0, 1, 2):
        ref, got = before.clone(), before.clone()
        ca.AttentionWork.build(entries, device, "torch").apply_(layer, query, ref, cache, reader, seq_lens,
                                                               block_table, 0.3)
        work = ca.AttentionWork.build(entries, device, "auto")
        assert work._use_triton(cache, reader)
        work.apply_(layer, query, got, cache, reader, seq_lens, block_table, 0.3)
        results.append((layer, before, ref, got))
    return results


def _check(results, dtype):
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    for layer, before, ref, got in results:
        changed = (got != before).any(-1)
        assert torch.equal(changed, (ref != before).any(-1)), f"layer {layer}: different (row, head)s written"
        torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=tol)
        if layer == 0:  # 7 rows x all heads of p_all, 2 heads of the p_some row, nothing on row 7
            assert changed.sum().item() == 6 * 6 + 2 and not changed[7].any()
        elif layer == 1:
            assert changed[:, 3].sum().item() == 6 and changed.sum().item() == 6
        else:
            assert not changed.any()


def interpreted_check() -> None:
    """Run by the test below in a subprocess with TRITON_INTERPRET=1 (set before Triton loads)."""
    ca.AttentionWork._use_triton = lambda self, cache, reader: self.kernel != "torch"  # forced on CPU tensors
    _check(_both("cpu", torch.float32, hd=16), torch.float32)
    print("interpreted kernel ok")


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA here: the compiled kernel is tested instead (Triton "
                    "3.6's interpreter cannot run a loop bound loaded from memory)")
def test_triton_kernel_in_the_interpreter_equals_the_torch_pass():
    """The kernel's logic, run by Triton's interpreter on CPU tensors (the engine picks the Triton
    route only on CUDA; here it is forced)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).parent
    code = f"import sys; sys.path.insert(0, {str(here)!r}); import test_context_kernels as t; t.interpreted_check()"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "interpreted kernel ok" in done.stdout, done.stdout + done.stderr


@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("physical_token_major", [True, False])
def test_triton_kernel_on_cuda_equals_the_torch_pass(dtype, physical_token_major):
    _check(_both("cuda", dtype, physical_token_major=physical_token_major), dtype)


@needs_cuda
@needs_triton
def test_triton_kernel_on_cuda_long_contexts_and_gqa():
    """2,000-token contexts, head_dim 128 (not a tile multiple of the pages), 4 query heads per KV
    head, 32 decode rows: the kernel equals the torch pass."""
    torch.manual_seed(5)
    device, dtype, heads, kvh, hd, bs, R, L = "cuda", torch.bfloat16, 16, 4, 128, 16, 32, 2000
    pages = -(-L // bs)
    cache = _flash_cache(R * pages, kvh, bs, hd, dtype, device)
    block_table = torch.randperm(R * pages, device=device).view(R, pages).to(torch.int32)
    seq_lens = torch.tensor([L - 37 * i for i in range(R)], dtype=torch.int32, device=device)
    plan = ContextAttentionPlan(0.5, ((0, tuple(range(heads))),), "user", ((10, 1500),))
    entries = [(plan, RequestRows(i, i, i + 1)) for i in range(R)]
    query = torch.randn(R, heads, hd, device=device).to(dtype)
    reader = kvmod.FlashPagedKV(bs, hd)
    ref, got = torch.zeros_like(query), torch.zeros_like(query)
    ca.AttentionWork.build(entries, device, "torch").apply_(0, query, ref, cache, reader, seq_lens, block_table,
                                                           hd**-0.5)
    ca.AttentionWork.build(entries, device, "auto").apply_(0, query, got, cache, reader, seq_lens, block_table,
                                                          hd**-0.5)
    torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)


@needs_cuda
@needs_triton
def test_triton_kernel_speed_against_the_torch_pass_on_cuda():
    """Not an assertion on time: prints the per-layer time of both routes (32 decode rows, 2,000
    tokens, all heads), so the device run records it."""
    torch.manual_seed(6)
    device, dtype, heads, kvh, hd, bs, R, L = "cuda", torch.bfloat16, 32, 8, 128, 16, 32, 2000
    pages = -(-L // bs)
    cache = _flash_cache(R * pages, kvh, bs, hd, dtype, device)
    block_table = torch.arange(R * pages, device=device).view(R, pages).to(torch.int32)
    seq_lens = torch.full((R,), L, dtype=torch.int32, device=device)
    plan = ContextAttentionPlan(0.5, ((0, tuple(range(heads))),), "user", ((10, 1500),))
    entries = [(plan, RequestRows(i, i, i + 1)) for i in range(R)]
    query = torch.randn(R, heads, hd, device=device).to(dtype)
    reader = kvmod.FlashPagedKV(bs, hd)
    out = torch.zeros_like(query)
    times = {}
    for kernel in ("torch", "auto", "torch", "auto"):
        for _ in range(3):
            ca.AttentionWork.build(entries, device, kernel).apply_(0, query, out, cache, reader, seq_lens,
                                                                  block_table, hd**-0.5)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            ca.AttentionWork.build(entries, device, kernel).apply_(0, query, out, cache, reader, seq_lens,
                                                                  block_table, hd**-0.5)
        end.record()
        torch.cuda.synchronize()
        times.setdefault(kernel, []).append(start.elapsed_time(end) / 20)
    print(f"\n[context kernel, CUDA] 32 decode rows x 2000 tokens x 32 heads, per layer: torch pass "
          f"{min(times['torch']):.3f} ms, Triton {min(times['auto']):.3f} ms, "
          f"{min(times['torch']) / min(times['auto']):.2f}x")
