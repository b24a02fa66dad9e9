"""Context-attention steering math and the paged-KV readers, on synthetic tensors (no engine)."""

import math

import pytest
import torch

from steerserve.patches.steers.context_attention import engine as ca
from steerserve.patches.steers.context_attention import kv as kvmod
from steerserve.patches.steers.engine import RequestRows
from steerserve.patches.plan import ContextAttentionPlan
from steerserve.patches.steers.context_attention.reference import pasta_bias


def build_work(entries, device, kernel="auto"):
    """AttentionWork from (plan, batch index, start row, end row) per request."""
    return ca.AttentionWork.build([(p, RequestRows(b, st, e)) for p, b, st, e in entries], device, kernel)


def _cpu_write(isa: str):
    from vllm import _custom_ops as ops

    def write(k, v, key_cache, value_cache, slots):
        ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, isa)

    return write


def _fake_write(perm_k: torch.Tensor, perm_v: torch.Tensor):
    """A cache write with an arbitrary block-interior permutation (stands in for AMX/NEON layouts)."""

    def write(k, v, key_cache, value_cache, slots):
        bs, kvh, hd = k.shape
        for h in range(kvh):
            kc = key_cache[0, h].reshape(-1)  # views into the scratch cache
            vc = value_cache[0, h].reshape(-1)
            assert kc.data_ptr() == key_cache[0, h].data_ptr()
            kc[perm_k] = k[:, h].reshape(-1)
            vc[perm_v] = v[:, h].reshape(-1)

    return write


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_calibration_reads_the_cpu_kernel_layout(dtype):
    """The CPU backend's own cache write, then our gather: the same K/V come back, any dtype."""
    bs, kvh, hd, nb = 128, 2, 64, 5
    reader = kvmod.CpuPagedKV.calibrate(_cpu_write("vec"), kvh, bs, hd, dtype)
    assert (reader.kind_k, reader.kind_v) == ("transposed", "identity")  # the "vec" ISA path, measured
    from vllm import _custom_ops as ops

    cache = torch.zeros(nb, kvh, bs, 2 * hd, dtype=dtype)
    kv = cache.view(nb, kvh, 2 * bs, hd)
    kc, vc = kv.chunk(2, dim=2)
    n = 300
    k = torch.randn(n, kvh, hd).to(dtype)
    v = torch.randn(n, kvh, hd).to(dtype)
    blocks = [3, 0, 4]  # a request's block table: logical block i -> physical blocks[i]
    slots = torch.tensor([blocks[t // bs] * bs + t % bs for t in range(n)])
    ops.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, "vec")
    got = reader.gather(cache, torch.tensor([blocks]), torch.arange(kvh))
    assert got.k_blocks_transposed  # used as stored by the decode path
    assert torch.equal(got.k_dense()[0, :, :n], k.transpose(0, 1))
    assert torch.equal(got.v[0, :, :n], v.transpose(0, 1))
    one = reader.gather(cache, torch.tensor([blocks]), torch.tensor([1]))  # a KV-head subset
    assert torch.equal(one.k_dense()[0, 0, :n], k[:, 1]) and torch.equal(one.v[0, 0, :n], v[:, 1])


@pytest.mark.skipif(not torch.cpu._is_amx_tile_supported(), reason="this CPU has no AMX tiles")
def test_calibration_reads_the_amx_layout():
    """bfloat16 on an AMX CPU: vLLM's "amx" path tiles K and V; recognised as strided layouts
    (one strided copy, no per-element gather) and read back exactly."""
    from vllm import _custom_ops as ops

    bs, kvh, hd = 128, 3, 64
    reader = kvmod.CpuPagedKV.calibrate(_cpu_write("amx"), kvh, bs, hd, torch.bfloat16)
    assert (reader.kind_k, reader.kind_v) == ("amx_k", "amx_v")
    cache = torch.zeros(3, kvh, bs, 2 * hd, dtype=torch.bfloat16)
    kc, vc = cache.view(3, kvh, 2 * bs, hd).chunk(2, dim=2)
    n = 200
    k = torch.randn(n, kvh, hd).bfloat16()
    v = torch.randn(n, kvh, hd).bfloat16()
    slots = torch.tensor([[2, 0][t // bs] * bs + t % bs for t in range(n)])
    ops.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, "amx")
    got = reader.gather(cache, torch.tensor([[2, 0]]), torch.tensor([0, 2]))
    assert torch.equal(got.k_dense()[0, :, :n], k[:, [0, 2]].transpose(0, 1))
    assert torch.equal(got.v[0, :, :n], v[:, [0, 2]].transpose(0, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["amx_k", "amx_v"])
def test_strided_layouts_on_synthetic_caches(kind, dtype):
    """Each known strided layout, written by a fake backend, is classified and read back exactly."""
    bs, kvh, hd = 32, 2, 32
    shape, order = kvmod._strided_candidates(bs, hd)[kind]
    perm = torch.arange(bs * hd).view(shape).permute(order).reshape(-1)
    ident = torch.arange(bs * hd)
    reader = kvmod.CpuPagedKV.calibrate(_fake_write(perm, perm), kvh, bs, hd, dtype)
    assert reader.kind_k == reader.kind_v == kind
    k, v = torch.randn(bs, kvh, hd).to(dtype), torch.randn(bs, kvh, hd).to(dtype)
    cache = torch.zeros(2, kvh, bs, 2 * hd, dtype=dtype)
    kc, vc = cache.view(2, kvh, 2 * bs, hd).chunk(2, dim=2)
    _fake_write(perm, perm)(k, v, kc[1:], vc[1:], None)
    got = reader.gather(cache, torch.tensor([[1]]), torch.arange(kvh))
    assert torch.equal(got.k_dense()[0], k.transpose(0, 1)) and torch.equal(got.v[0], v.transpose(0, 1))
    assert kvmod._classify(ident, bs, hd) == "identity"


def test_calibration_handles_any_block_interior_permutation():
    bs, kvh, hd = 32, 3, 32
    g = torch.Generator().manual_seed(0)
    perm_k = torch.randperm(bs * hd, generator=g)
    perm_v = torch.randperm(bs * hd, generator=g)
    reader = kvmod.CpuPagedKV.calibrate(_fake_write(perm_k, perm_v), kvh, bs, hd, torch.bfloat16)
    assert reader.kind_k == reader.kind_v == "permuted"
    assert torch.equal(reader.perm_k, perm_k) and torch.equal(reader.perm_v, perm_v)
    k = torch.randn(bs, kvh, hd)
    v = torch.randn(bs, kvh, hd)
    cache = torch.zeros(2, kvh, bs, 2 * hd)
    kv = cache.view(2, kvh, 2 * bs, hd)
    kc, vc = kv.chunk(2, dim=2)
    _fake_write(perm_k, perm_v)(k, v, kc[1:], vc[1:], None)
    got = reader.gather(cache, torch.tensor([[1]]), torch.arange(kvh))
    assert torch.equal(got.k_dense()[0], k.transpose(0, 1)) and torch.equal(got.v[0], v.transpose(0, 1))


def test_calibration_refuses_a_lossy_layout():
    def lossy(k, v, key_cache, value_cache, slots):
        key_cache.zero_()
        value_cache.zero_()

    with pytest.raises(ValueError, match="not a permutation"):
        kvmod.CpuPagedKV.calibrate(lossy, 1, 32, 32, torch.float32)


def test_flash_layout_reader_on_synthetic_cache():
    """CUDA FlashAttention layout [num_blocks, kv_heads, block_size, 2*head_dim] (K | V channels),
    also through a non-contiguous view (the backend may store blocks in another stride order)."""
    nb, kvh, bs, hd = 6, 2, 16, 8
    storage = torch.randn(nb, bs, kvh, 2 * hd)  # physically [blocks, tokens, heads, channels]
    cache = storage.permute(0, 2, 1, 3)  # logical [blocks, heads, tokens, channels]
    reader = kvmod.FlashPagedKV(bs, hd)
    got = reader.gather(cache, torch.tensor([[4, 1], [0, 5]]), torch.arange(kvh))
    assert got.k.shape == (2, kvh, 2 * bs, hd) and not got.k_blocks_transposed
    assert torch.equal(got.k[0, 1, bs + 3], storage[1, 3, 1, :hd])
    assert torch.equal(got.v[1, 0, 2], storage[0, 2, 0, hd:])
    sub = reader.gather(cache, torch.tensor([[4, 1]]), torch.tensor([1]))
    assert torch.equal(sub.k[0, 0, bs + 3], storage[1, 3, 1, :hd])


def test_key_bias_and_reference_bias():
    plan = ContextAttentionPlan(alpha=0.25, heads=((1, (0, 2)),), emphasis="user", spans=((1, 3), (5, 6)))
    bias = ca.key_bias(plan, 8)
    expect = [math.log(0.25), 0, 0, math.log(0.25), math.log(0.25), 0, math.log(0.25), math.log(0.25)]
    assert torch.allclose(bias, torch.tensor(expect))
    ref = pasta_bias([None, plan], pads=[0, 2], total_len=10, num_heads=3)
    assert set(ref) == {1}
    assert torch.equal(ref[1][0], torch.zeros(3, 1, 10))  # unsteered row
    assert torch.equal(ref[1][1, 1], torch.zeros(1, 10))  # unsteered head
    assert torch.allclose(ref[1][1, 0, 0, 2:], bias)  # left padding shifts positions


def _dense_reference(q, k, v, bias_row, q_positions, scale, groups):
    """Plain softmax attention for one request: q [Q, H, D], k/v [KVH, L, D]."""
    k = k.repeat_interleave(groups, 0)
    v = v.repeat_interleave(groups, 0)
    scores = torch.einsum("qhd,hld->hql", q, k) * scale + bias_row
    causal = torch.arange(k.shape[1])[None, :] <= q_positions[:, None]
    scores = scores.masked_fill(~causal, float("-inf"))
    return torch.einsum("hql,hld->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("kernel", ["torch", "auto"])
@pytest.mark.parametrize("k_layout", ["identity", "transposed"])
def test_second_pass_matches_dense_attention_and_touches_only_steered_heads(monkeypatch, k_layout, kernel):
    """A step with two decode rows, one chunked prefill and an unsteered row: each steered head's
    output equals dense biased attention; every other value is left exactly as the kernel wrote it.
    Both K layouts: as-is, and stored transposed per block (the CPU "vec" path, used in place);
    decode rows by the torch pass and by the CPU kernel ("auto")."""
    monkeypatch.setattr(ca, "PREFILL_CHUNK_ELEMENTS", 64)  # force several query chunks
    torch.manual_seed(0)
    bs, kvh, hd, heads, nb = 16, 2, 8, 4, 12
    ident = torch.arange(bs * hd)
    perm_k = ident if k_layout == "identity" else ident.view(hd, bs).t().reshape(-1)
    reader = kvmod.CpuPagedKV(bs, hd, perm_k, ident)
    assert reader.kind_k == k_layout
    cache = torch.randn(nb, kvh, bs, 2 * hd)
    region = cache.view(nb, kvh, 2, bs * hd)
    # requests: (seq_len, query rows in this step, block table)
    reqs = [(37, 1, [5, 2, 9]), (20, 1, [1, 7]), (30, 12, [3, 0]), (15, 1, [11])]
    starts = [0, 1, 2, 14]
    n_rows = 15
    query = torch.randn(n_rows, heads, hd)
    output = torch.randn(n_rows, heads, hd)
    before = output.clone()
    block_table = torch.zeros(4, 3, dtype=torch.int32)
    for i, (_, _, blocks) in enumerate(reqs):
        block_table[i, : len(blocks)] = torch.tensor(blocks)
    seq_lens = torch.tensor([r[0] for r in reqs], dtype=torch.int32)
    p_all = ContextAttentionPlan(0.2, ((0, (0, 1, 2, 3)), (1, (2,))), "user", ((3, 9), (12, 14)))
    p_some = ContextAttentionPlan(0.5, ((0, (1, 3)),), "user", ((0, 4),))
    work = build_work([(p_all, 0, 0, 1), (p_some, 1, 1, 2), (p_all, 2, 2, 14)], "cpu", kernel)
    scale = hd**-0.5
    work.apply_(0, query, output, cache, reader, seq_lens, block_table, scale)

    def dense_kv(i):
        length, _, blocks = reqs[i]
        if k_layout == "identity":
            kk = torch.cat([region[b, :, 0].view(kvh, bs, hd) for b in blocks], 1)[:, :length]
        else:
            kk = torch.cat([region[b, :, 0].view(kvh, hd, bs).transpose(1, 2) for b in blocks], 1)[:, :length]
        vv = torch.cat([region[b, :, 1].view(kvh, bs, hd) for b in blocks], 1)[:, :length]
        return kk, vv

    for i, plan, steered_heads in [(0, p_all, [0, 1, 2, 3]), (1, p_some, [1, 3]), (2, p_all, [0, 1, 2, 3])]:
        length, q_len, _ = reqs[i]
        kk, vv = dense_kv(i)
        rows = slice(starts[i], starts[i] + q_len)
        positions = torch.arange(length - q_len, length)
        expect = _dense_reference(query[rows], kk, vv, ca.key_bias(plan, length), positions, scale, heads // kvh)
        for h in range(heads):
            if h in steered_heads:
                torch.testing.assert_close(output[rows, h], expect[:, h], atol=1e-5, rtol=1e-5)
            else:
                assert torch.equal(output[rows, h], before[rows, h])
    assert torch.equal(output[14], before[14])  # the unsteered request
    # layer 1: only head 2 of the p_all requests
    out1 = before.clone()
    work.apply_(1, query, out1, cache, reader, seq_lens, block_table, scale)
    changed = (out1 != before).any(-1)  # [rows, heads]
    assert changed[:, 2].tolist() == [True, False] + [True] * 12 + [False]
    assert not changed[:, [0, 1, 3]].any()
    # a layer nobody steers: nothing at all
    out3 = before.clone()
    work.apply_(3, query, out3, cache, reader, seq_lens, block_table, scale)
    assert torch.equal(out3, before)


def test_tensor_parallel_head_offset_maps_global_heads_to_local():
    """Rank 1 of TP=2 holds global heads 2..3 as local 0..1: a plan on global head 3 steers local 1."""
    torch.manual_seed(1)
    bs, kvh, hd = 16, 1, 8
    ident = torch.arange(bs * hd)
    reader = kvmod.CpuPagedKV(bs, hd, ident, ident)
    cache = torch.randn(2, kvh, bs, 2 * hd)
    plan = ContextAttentionPlan(0.3, ((0, (0, 3)),), "user", ((0, 2),))
    work = build_work([(plan, 0, 0, 1)], "cpu")
    query = torch.randn(1, 2, hd)
    output = torch.zeros(1, 2, hd)
    work.apply_(0, query, output, cache, reader, torch.tensor([9]), torch.tensor([[1]]), 0.3, head_offset=2)
    assert torch.equal(output[0, 0], torch.zeros(hd)) and output[0, 1].abs().sum() > 0


def test_decode_rows_are_chunked_by_gathered_tokens(monkeypatch):
    """Many long decode rows are split into chunks (bounded K/V copies); results equal one chunk."""
    torch.manual_seed(2)
    bs, kvh, hd, heads = 16, 1, 8, 2
    ident = torch.arange(bs * hd)
    reader = kvmod.CpuPagedKV(bs, hd, ident, ident)
    cache = torch.randn(40, kvh, bs, 2 * hd)
    lengths = [50, 17, 33, 64, 5, 40]
    block_table = torch.arange(40, dtype=torch.int32)[: 6 * 4].view(6, 4)
    plan = ContextAttentionPlan(0.3, ((0, (0, 1)),), "user", ((1, 3),))
    entries = [(plan, i, i, i + 1) for i in range(6)]
    query = torch.randn(6, heads, hd)
    calls = []
    original = ca.AttentionWork._decode_

    def spy(self, items, *args):
        calls.append(len(items))
        return original(self, items, *args)

    one = torch.zeros(6, heads, hd)
    build_work(entries, "cpu", "torch").apply_(0, query, one, cache, reader, torch.tensor(lengths), block_table, 0.3)
    monkeypatch.setattr(ca, "DECODE_CHUNK_TOKENS", 64)
    monkeypatch.setattr(ca.AttentionWork, "_decode_", spy)
    chunked = torch.zeros(6, heads, hd)
    build_work(entries, "cpu", "torch").apply_(0, query, chunked, cache, reader, torch.tensor(lengths),
                                               block_table, 0.3)
    assert len(calls) > 1 and sum(calls) == 6
    torch.testing.assert_close(chunked, one)


def test_cpu_kernel_builds_here():
    """The set-up builds the CPU kernel wherever g++ is installed (CI machines have it); the
    engine would otherwise fall back to the torch pass silently slower."""
    import shutil

    from steerserve.patches.steers.context_attention import native

    if shutil.which("g++") is None:
        pytest.skip("no g++ on this machine: the CPU kernel cannot be built (the torch pass is used)")
    assert native.cpu_kernel() is not None, native.cpu_kernel_error()


def _layout_perm(kind: str, bs: int, hd: int) -> torch.Tensor:
    """logical (t * hd + d) -> stored offset for a named block-interior layout."""
    if kind == "permuted":
        return torch.randperm(bs * hd, generator=torch.Generator().manual_seed(7))
    shape, order = kvmod._strided_candidates(bs, hd)[kind]
    return torch.arange(bs * hd).view(shape).permute(order).reshape(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layouts", [("transposed", "identity"), ("amx_k", "amx_v"), ("identity", "permuted"),
                                     ("permuted", "amx_v")])
def test_cpu_kernel_equals_the_torch_pass_on_every_layout(layouts, dtype):
    """Decode rows through the C++ kernel (cache read in place) against the pure-torch pass on the
    same step: every layout the calibration can report, grouped query heads, requests steering
    different heads and layers, lengths not a multiple of the block; unsteered heads untouched."""
    from steerserve.patches.steers.context_attention import native

    if native.cpu_kernel() is None:
        pytest.skip(f"CPU kernel unavailable: {native.cpu_kernel_error()}")
    torch.manual_seed(3)
    bs, kvh, hd, heads, nb = 32, 2, 32, 6, 20
    perm_k, perm_v = _layout_perm(layouts[0], bs, hd), _layout_perm(layouts[1], bs, hd)
    reader = kvmod.CpuPagedKV(bs, hd, perm_k, perm_v)
    assert (reader.kind_k, reader.kind_v) == layouts
    cache = torch.randn(nb, kvh, bs, 2 * hd).to(dtype)
    lengths = [70, 1, 33, 96, 5]
    block_table = torch.tensor([[4, 9, 2, 0], [7, 0, 0, 0], [11, 3, 0, 0], [1, 5, 8, 13], [19, 0, 0, 0]],
                               dtype=torch.int32)
    p_all = ContextAttentionPlan(0.2, ((0, tuple(range(heads))), (1, (4,))), "user", ((3, 9), (40, 60)))
    p_some = ContextAttentionPlan(0.6, ((0, (1, 5)),), "user", ((0, 4),))
    entries = [(p_all, 0, 0, 1), (p_some, 1, 1, 2), (p_all, 2, 2, 3), (p_some, 3, 3, 4)]  # row 4: unsteered
    query = torch.randn(5, heads, hd).to(dtype)
    before = torch.randn(5, heads, hd).to(dtype)
    for layer in (0, 1, 2):
        out_torch, out_kernel = before.clone(), before.clone()
        seq = torch.tensor(lengths, dtype=torch.int32)
        ca.AttentionWork.build([(p, RequestRows(b, st, e)) for p, b, st, e in entries], "cpu", "torch").apply_(
            layer, query, out_torch, cache, reader, seq, block_table, hd**-0.5)
        work = ca.AttentionWork.build([(p, RequestRows(b, st, e)) for p, b, st, e in entries], "cpu")
        assert work._cpu_kernel(cache, reader) is not None
        work.apply_(layer, query, out_kernel, cache, reader, seq, block_table, hd**-0.5)
        changed = (out_kernel != before).any(-1)
        assert torch.equal(changed, (out_torch != before).any(-1))
        tol = 1e-5 if dtype == torch.float32 else 1.6e-2  # one bf16 rounding of the output
        torch.testing.assert_close(out_kernel.float(), out_torch.float(), atol=tol, rtol=tol)
        if layer == 0:
            assert changed[:4].sum().item() == heads + 2 + heads + 2 and not changed[4].any()
        elif layer == 1:
            assert changed[:, 4].tolist() == [True, False, True, False, False] and changed.sum().item() == 2
        else:
            assert not changed.any()
