"""User-context attention steering (PASTA-style) over vLLM's paged KV cache: device-agnostic torch.

The fast attention kernels take no per-key bias, so the steer is a second pass: vLLM's kernel runs
for the whole batch as usual, then for the steered requests on a steered layer we gather their K/V
from the paged cache, recompute attention with the bias (log(alpha) on keys outside the emphasised
spans) in float32, and overwrite the steered heads' output rows. Unsteered rows and heads are never
written, so they stay bit-identical to a plain engine; a step without steered rows does nothing.

Pieces:
- `PagedKV` readers turn a layer's cache plus block ids into dense [R, kv_heads, n*block, head_dim]
  K and V. `CpuPagedKV` learns the CPU backend's ISA-dependent block interior by writing known
  values through the backend's own cache-write op once (`calibrate`), so it is exact for any ISA
  path (vec, vec16, AMX, NEON...) without hard-coding one. `FlashPagedKV` reads the CUDA
  FlashAttention layout [num_blocks, kv_heads, block_size, 2 * head_dim] (K | V channels).
- `AttentionWork`: one step's steered requests, built once per step and shared by every layer.
- `apply_(...)`: the per-layer recompute, batched over decode rows, chunked over long prefills.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .plan import ContextAttentionPlan

# queries x keys elements of one float32 score matrix per head in a prefill chunk (bounds memory)
PREFILL_CHUNK_ELEMENTS = 1 << 20
# requests x padded key length gathered at once for decode rows (bounds the dense K/V copy:
# 65536 tokens x KV heads x head_dim x 2, e.g. 48 MiB for 3 KV heads of 64 in bfloat16)
DECODE_CHUNK_TOKENS = 1 << 16


# ----------------------------------------------------------------------------- paged KV readers


class PagedKV:
    """Reads whole blocks of one layer's paged KV cache for a few requests and KV heads."""

    block_size: int

    def gather(self, kv_cache: torch.Tensor, block_ids: torch.Tensor, kv_heads: torch.Tensor) -> "Gathered":
        """block_ids [R, n] (physical blocks of each request, in order), kv_heads [h] (which KV heads)."""
        raise NotImplementedError


@dataclass
class Gathered:
    """K and V of R requests x h KV heads x n blocks. `v` is [R, h, n*bs, D]; `k` is the same shape,
    or, when `k_blocks_transposed`, [R, h, n, D, bs] (the CPU "vec" layout stores each block's K
    as [D, bs]: exactly what q @ K needs, so it is used as stored)."""

    k: torch.Tensor
    v: torch.Tensor
    k_blocks_transposed: bool = False

    def k_dense(self) -> torch.Tensor:
        """K as [R, h, n*bs, D] (a copy when stored transposed)."""
        if not self.k_blocks_transposed:
            return self.k
        r, h, n, d, bs = self.k.shape
        return self.k.transpose(-1, -2).reshape(r, h, n * bs, d)


def _strided_candidates(block_size: int, head_dim: int) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Block-interior layouts that are a reshape + permute of [block_size, head_dim]:
    name -> (stored shape, permutation of it giving the logical (token..., dim...) order).
    Seen in vLLM 0.32's CPU backend: "vec" K = transposed, V = identity; "amx" (bfloat16 with AMX
    tiles) K = [bs/16, D/2, 16, 2] (token tile, dim pair, token, pair) and
    V = [D/16, bs/2, 16, 2] (dim tile, token pair, dim, pair)."""
    bs, d = block_size, head_dim
    out = {"identity": ((bs, d), (0, 1)), "transposed": ((d, bs), (1, 0))}
    if bs % 16 == 0 and d % 2 == 0:
        out["amx_k"] = ((bs // 16, d // 2, 16, 2), (0, 2, 1, 3))
    if d % 16 == 0 and bs % 2 == 0:
        out["amx_v"] = ((d // 16, bs // 2, 16, 2), (1, 3, 0, 2))
    return out


def _classify(perm: torch.Tensor, block_size: int, head_dim: int) -> str:
    """The name of the strided layout `perm` is, else "permuted" (gathered element by element)."""
    n = block_size * head_dim
    for name, (shape, order) in _strided_candidates(block_size, head_dim).items():
        # stored offset of each logical (t, d): the stored arange, viewed and permuted to logical order
        if torch.equal(torch.arange(n).view(shape).permute(order).reshape(-1), perm):
            return name
    return "permuted"


def decode_layout(stored: list[torch.Tensor], digits: int, block_size: int, head_dim: int) -> torch.Tensor:
    """From the calibration writes, the permutation logical (t * head_dim + d) -> stored offset.

    `stored[i]` is the block interior after writing digit i of the token index t (first `digits`
    writes) then digit i of the dim index d (next `digits` writes), each as value digit + 1 (so an
    untouched 0 is detectable). Raises ValueError when the writes do not form a permutation.
    """
    n = block_size * head_dim
    t = torch.zeros(n, dtype=torch.long)
    d = torch.zeros(n, dtype=torch.long)
    for i in range(digits):
        t += (stored[i].round().long() - 1) * (16**i)
        d += (stored[digits + i].round().long() - 1) * (16**i)
    if bool((t < 0).any() or (t >= block_size).any() or (d < 0).any() or (d >= head_dim).any()):
        raise ValueError("paged KV calibration: block interior is not a permutation of (token, dim)")
    logical = t * head_dim + d
    perm = torch.full((n,), -1, dtype=torch.long)
    perm[logical] = torch.arange(n)
    if bool((perm < 0).any()):
        raise ValueError("paged KV calibration: block interior is not a permutation of (token, dim)")
    return perm


class CpuPagedKV(PagedKV):
    """vLLM's CPU attention backend: cache [num_blocks, kv_heads, block_size, 2 * head_dim] in
    memory, viewed by the backend as [num_blocks, kv_heads, 2, block_size * head_dim] (K then V),
    each half laid out per the ISA path. The layout is measured by `calibrate`, not assumed."""

    def __init__(self, block_size: int, head_dim: int, perm_k: torch.Tensor, perm_v: torch.Tensor):
        self.block_size, self.head_dim = block_size, head_dim
        self.kind_k = _classify(perm_k, block_size, head_dim)
        self.kind_v = _classify(perm_v, block_size, head_dim)
        self.perm_k, self.perm_v = perm_k, perm_v

    @classmethod
    def calibrate(
        cls,
        write: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None],
        num_kv_heads: int,
        block_size: int,
        head_dim: int,
        dtype: torch.dtype,
    ) -> CpuPagedKV:
        """`write(key, value, key_cache, value_cache, slot_mapping)` is the backend's cache write.

        Writes token/dim indices, base-16 digit by digit (exact in any float dtype), into a one-block
        scratch cache and reads back where each landed."""
        digits = max(1, math.ceil(math.log(max(block_size, head_dim), 16)))
        t = torch.arange(block_size)[:, None, None].expand(block_size, num_kv_heads, head_dim)
        d = torch.arange(head_dim)[None, None, :].expand(block_size, num_kv_heads, head_dim)
        stored_k, stored_v = [], []
        for index in [t] * digits + [d] * digits:
            i = len(stored_k) % digits
            values = ((index // (16**i)) % 16 + 1).to(dtype).contiguous()
            cache = torch.zeros(1, num_kv_heads, block_size, 2 * head_dim, dtype=dtype)
            kv = cache.view(1, num_kv_heads, 2 * block_size, head_dim)
            key_cache, value_cache = kv.chunk(2, dim=2)
            write(values, values, key_cache, value_cache, torch.arange(block_size, dtype=torch.long))
            region = cache.view(1, num_kv_heads, 2, block_size * head_dim).float()
            if not all(torch.equal(region[0, h], region[0, 0]) for h in range(num_kv_heads)):
                raise ValueError("paged KV calibration: KV heads are not laid out alike")
            stored_k.append(region[0, 0, 0])
            stored_v.append(region[0, 0, 1])
        perm_k = decode_layout(stored_k, digits, block_size, head_dim)
        perm_v = decode_layout(stored_v, digits, block_size, head_dim)
        return cls(block_size, head_dim, perm_k, perm_v)

    def _half(self, rows, idx, part: int, kind: str, perm, shape) -> tuple[torch.Tensor, bool]:
        """One half (K: part 0, V: part 1) of the selected (block, head) rows -> [R, h, n*bs, D],
        or [R, h, n, D, bs] when stored transposed and `part` is K."""
        r, h, n = shape
        bs, d = self.block_size, self.head_dim
        x = rows.index_select(0, idx * 2 + part)  # [R*h*n, bs*D]: one memcpy per (block, head)
        if kind == "identity":
            return x.view(r, h, n * bs, d), False
        if kind == "transposed" and part == 0:
            return x.view(r, h, n, d, bs), True  # used as stored by the decode pass
        if kind != "permuted":  # a strided layout: one strided copy
            stored, order = _strided_candidates(bs, d)[kind]
            if stored[-1] == 2 and order[-1] == len(stored) - 1 and x.element_size() == 2:
                # the innermost pair stays innermost (AMX's K): move it as one 4-byte element,
                # about 5x faster than a 2-byte strided copy
                y = x.view(torch.int32).view(r * h * n, *stored[:-1])
                y = y.permute(0, *(o + 1 for o in order[:-1])).contiguous()
                return y.view(x.dtype).view(r, h, n * bs, d), False
            x = x.view(r * h * n, *stored).permute(0, *(o + 1 for o in order))
            return x.reshape(r, h, n * bs, d), False
        return x.index_select(-1, perm.to(x.device)).view(r, h, n * bs, d), False

    def gather(self, kv_cache, block_ids, kv_heads):
        nb, kvh, bs, _ = kv_cache.shape
        r, n = block_ids.shape
        h = kv_heads.numel()
        # (block, head, K|V) rows of one block interior each, as a contiguous 2-D view (index_select
        # on contiguous rows is a plain memcpy per row, ~3x faster than on a strided view)
        rows = kv_cache.reshape(nb * kvh * 2, bs * self.head_dim)
        idx = (block_ids[:, None, :] * kvh + kv_heads[None, :, None]).reshape(-1)  # order (R, h, n)
        k, k_t = self._half(rows, idx, 0, self.kind_k, self.perm_k, (r, h, n))
        v, _ = self._half(rows, idx, 1, self.kind_v, self.perm_v, (r, h, n))
        return Gathered(k, v, k_t)


class FlashPagedKV(PagedKV):
    """vLLM 0.32's CUDA FlashAttention layout: the layer's cache is (logically, any strides)
    [num_blocks, kv_heads, block_size, 2 * head_dim], K in the first head_dim channels of each
    token and V in the last (`FlashAttentionImpl`: `kv_cache.transpose(1, 2).split(head_size, -1)`).
    Plain indexing, so it holds whatever physical block-interior order the backend picked."""

    def __init__(self, block_size: int, head_dim: int):
        self.block_size, self.head_dim = block_size, head_dim

    def gather(self, kv_cache, block_ids, kv_heads):
        nb, kvh, bs, two_d = kv_cache.shape
        r, n = block_ids.shape
        blocks = kv_cache.index_select(0, block_ids.reshape(-1)).index_select(1, kv_heads)  # [R*n, h, bs, 2D]
        h = kv_heads.numel()
        blocks = blocks.view(r, n, h, bs, two_d).permute(0, 2, 1, 3, 4).reshape(r, h, n * bs, two_d)
        return Gathered(blocks[..., : self.head_dim], blocks[..., self.head_dim :])


# ----------------------------------------------------------------------------- the math


def key_bias(plan: ContextAttentionPlan, length: int) -> torch.Tensor:
    """[length] float32: 0 on emphasised prompt positions, log(alpha) elsewhere (incl. generated)."""
    bias = torch.full((length,), math.log(plan.alpha), dtype=torch.float32)
    for start, end in plan.spans:
        if start < length:
            bias[start : min(end, length)] = 0.0
    return bias


def biased_attention(q, k, v, bias, scale: float) -> torch.Tensor:
    """Attention with an additive float32 mask (flash-style SDPA: accumulates in float32).

    q [R, H, Q, D]; k, v [R, KVH, L, D] in the cache dtype (H a multiple of KVH); bias broadcastable
    to [R, H, Q, L] (-inf = masked). Returns [R, H, Q, D] in the cache dtype."""
    return torch.nn.functional.scaled_dot_product_attention(
        q.to(v.dtype), k, v, attn_mask=bias, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


def decode_attention(q: torch.Tensor, kv: Gathered, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """One query per request. q [R, h*g, D] (g query heads per KV head, grouped as vLLM/HF do);
    bias [R, L] float32 (-inf = padding). When K is stored transposed per block (used in place,
    no copy): q @ K in the cache dtype (as Hugging Face's eager attention does), bias and softmax
    in float32; else flash-style SDPA. Returns [R, h*g, D]."""
    r, hq, d = q.shape
    h = kv.v.shape[1]
    g = hq // h
    if not kv.k_blocks_transposed:
        return biased_attention(q.unsqueeze(2), kv.k, kv.v, bias[:, None, None, :], scale)[:, :, 0]
    n, bs = kv.k.shape[2], kv.k.shape[4]
    qq = q.view(r, h, 1, g, d).to(kv.k.dtype)
    scores = torch.matmul(qq, kv.k)  # [R, h, n, g, bs]: per block, K as stored ([D, bs])
    scores = scores.permute(0, 1, 3, 2, 4).reshape(r, h, g, n * bs).float()
    probs = torch.softmax(scores * scale + bias[:, None, None, :], dim=-1)
    return torch.matmul(probs.to(kv.v.dtype), kv.v).view(r, hq, d)


@dataclass
class _Request:
    batch_index: int  # the request's index in the step's attention metadata
    start: int  # first token row of the step's flattened batch
    end: int
    plan: ContextAttentionPlan
    heads_by_layer: dict[int, tuple[int, ...]]  # global head indices


@dataclass
class AttentionWork:
    """The step's attention-steered requests, shared by every layer's `apply_`."""

    requests: list[_Request]
    device: torch.device | str
    layers: frozenset[int] = field(default_factory=frozenset)
    _bias_cache: dict = field(default_factory=dict)  # (request idx, length) -> bias tensor
    _lengths: list[int] | None = None  # seq_lens of the step (one read, shared by every layer)

    @classmethod
    def build(cls, entries: list[tuple[ContextAttentionPlan, int, int, int]], device) -> AttentionWork | None:
        """entries: (plan, batch_index, start_row, end_row) per steered request."""
        reqs = [_Request(b, s, e, plan, dict(plan.heads)) for plan, b, s, e in entries if e > s]
        if not reqs:
            return None
        layers = frozenset(layer for r in reqs for layer in r.heads_by_layer)
        return cls(reqs, device, layers)

    def bias(self, i: int, length: int) -> torch.Tensor:
        key = (i, length)
        if key not in self._bias_cache:
            self._bias_cache[key] = key_bias(self.requests[i].plan, length).to(self.device)
        return self._bias_cache[key]

    def apply_(
        self,
        layer: int,
        query: torch.Tensor,
        output: torch.Tensor,
        kv_cache: torch.Tensor,
        reader: PagedKV,
        seq_lens: torch.Tensor,
        block_table: torch.Tensor,
        scale: float,
        head_offset: int = 0,
    ) -> None:
        """Overwrite the steered heads' rows of `output` ([N, H, D], H the local heads, the first
        being global head `head_offset`) for the requests steering `layer`."""
        if layer not in self.layers:
            return
        if self._lengths is None:
            self._lengths = [int(x) for x in seq_lens.tolist()]
        seq_lens = self._lengths
        num_heads = query.shape[1]
        decode, prefill = [], []
        for i, r in enumerate(self.requests):
            heads = r.heads_by_layer.get(layer)
            if heads is None:
                continue
            local = [h - head_offset for h in heads if 0 <= h - head_offset < num_heads]
            if not local:
                continue
            (decode if r.end - r.start == 1 else prefill).append((i, local))
        bs = reader.block_size
        if decode:
            # by length, so padding is small, and in chunks that bound the gathered K/V
            decode.sort(key=lambda item: seq_lens[self.requests[item[0]].batch_index])
            chunk: list = []
            for item in decode:
                padded = -(-seq_lens[self.requests[item[0]].batch_index] // bs) * bs
                if chunk and (len(chunk) + 1) * padded > DECODE_CHUNK_TOKENS:
                    self._decode_(chunk, query, output, kv_cache, reader, seq_lens, block_table, scale, bs)
                    chunk = []
                chunk.append(item)
            self._decode_(chunk, query, output, kv_cache, reader, seq_lens, block_table, scale, bs)
        for i, local in prefill:
            self._prefill_(i, local, query, output, kv_cache, reader, seq_lens, block_table, scale, bs)

    @staticmethod
    def _head_plan(locals_: list[list[int]], num_heads: int, num_kv_heads: int, device):
        """The KV heads the steered query heads read, and the query heads of those KV groups
        (computed together; only the steered ones are written)."""
        g = num_heads // num_kv_heads
        kvs = sorted({h // g for local in locals_ for h in local})
        qh = [kv * g + j for kv in kvs for j in range(g)]
        return torch.tensor(kvs, device=device), qh

    def _decode_(self, items, query, output, kv_cache, reader, seq_lens, block_table, scale, bs):
        """All single-token rows of this layer in one padded batch."""
        reqs = [self.requests[i] for i, _ in items]
        lengths = [seq_lens[r.batch_index] for r in reqs]
        n_blocks = -(-max(lengths) // bs)
        device = query.device
        batch_idx = torch.tensor([r.batch_index for r in reqs], device=block_table.device)
        block_ids = block_table.index_select(0, batch_idx)[:, :n_blocks].long()
        num_heads = query.shape[1]
        kv_idx, qh = self._head_plan([local for _, local in items], num_heads, kv_cache.shape[1], device)
        kv = reader.gather(kv_cache, block_ids, kv_idx)
        bias = torch.full((len(reqs), n_blocks * bs), float("-inf"), device=device)
        for row, ((i, _), length) in enumerate(zip(items, lengths)):
            bias[row, :length] = self.bias(i, length)
        rows = torch.tensor([r.start for r in reqs], device=device)
        q = query.index_select(0, rows)
        all_heads = len(qh) == num_heads
        if not all_heads:
            qh_t = torch.tensor(qh, device=device)
            q = q.index_select(1, qh_t)
        new = decode_attention(q, kv, bias, scale).to(output.dtype)  # [R, len(qh), D]
        everywhere = all(len(local) == len(qh) for _, local in items)
        if all_heads and everywhere:
            output.index_copy_(0, rows, new)
            return
        old = output.index_select(0, rows)
        if not everywhere:
            pos = {h: j for j, h in enumerate(qh)}
            mask = torch.zeros(len(reqs), len(qh), 1, dtype=torch.bool, device=device)
            for row, (_, local) in enumerate(items):
                mask[row, [pos[h] for h in local]] = True
            new = torch.where(mask, new, old if all_heads else old.index_select(1, qh_t))
        if all_heads:
            output.index_copy_(0, rows, new)
        else:
            old.index_copy_(1, qh_t, new)
            output.index_copy_(0, rows, old)

    def _prefill_(self, i, local, query, output, kv_cache, reader, seq_lens, block_table, scale, bs):
        """One request's multi-token chunk, causal, chunked over queries to bound memory."""
        r = self.requests[i]
        length = seq_lens[r.batch_index]
        q_len = r.end - r.start
        n_blocks = -(-length // bs)
        device = query.device
        block_ids = block_table[r.batch_index : r.batch_index + 1, :n_blocks].long()
        kv_idx, qh = self._head_plan([local], query.shape[1], kv_cache.shape[1], device)
        kv = reader.gather(kv_cache, block_ids, kv_idx)
        k, v = kv.k_dense()[:, :, :length], kv.v[:, :, :length]
        qh_t = torch.tensor(qh, device=device)
        pos = {h: j for j, h in enumerate(qh)}
        write = torch.tensor(local, device=device)
        pick = torch.tensor([pos[h] for h in local], device=device)
        bias = self.bias(i, length)
        key_pos = torch.arange(length, device=device)
        step = max(1, PREFILL_CHUNK_ELEMENTS // length)
        first_pos = length - q_len
        for c0 in range(0, q_len, step):
            c1 = min(q_len, c0 + step)
            q = query[r.start + c0 : r.start + c1].index_select(1, qh_t).transpose(0, 1).unsqueeze(0)  # [1, h, c, D]
            q_pos = torch.arange(first_pos + c0, first_pos + c1, device=device)
            causal = key_pos[None, :] <= q_pos[:, None]
            mask = torch.where(causal, bias[None, :], torch.tensor(float("-inf"), device=device))
            new = biased_attention(q, k, v, mask[None, None], scale)[0].transpose(0, 1)  # [c, h, D]
            block = output[r.start + c0 : r.start + c1]
            block.index_copy_(1, write, new.index_select(1, pick).to(output.dtype))
