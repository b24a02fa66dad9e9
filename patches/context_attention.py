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


# ----------------------------------------------------------------------------- paged KV readers


class PagedKV:
    """Reads whole blocks of one layer's paged KV cache as dense K and V."""

    block_size: int

    def gather(self, kv_cache: torch.Tensor, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """block_ids [R, n] -> K, V [R, kv_heads, n * block_size, head_dim] (a copy)."""
        raise NotImplementedError


def _layout_view(region: torch.Tensor, perm: torch.Tensor, kind: str, block_size: int, head_dim: int):
    """region [..., block_size * head_dim] (one block's K or V interior, as stored) -> [..., bs, hd]."""
    lead = region.shape[:-1]
    if kind == "identity":
        return region.reshape(*lead, block_size, head_dim)
    if kind == "transposed":
        return region.reshape(*lead, head_dim, block_size).transpose(-1, -2)
    return region.index_select(-1, perm).reshape(*lead, block_size, head_dim)


def _classify(perm: torch.Tensor, block_size: int, head_dim: int) -> str:
    ident = torch.arange(block_size * head_dim)
    if torch.equal(perm, ident):
        return "identity"
    if torch.equal(perm, ident.view(head_dim, block_size).t().reshape(-1)):
        return "transposed"
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

    def gather(self, kv_cache, block_ids):
        nb, kvh, bs, two_d = kv_cache.shape
        r, n = block_ids.shape
        region = kv_cache.view(nb, kvh, 2, bs * self.head_dim)
        blocks = region.index_select(0, block_ids.reshape(-1))  # [R*n, kvh, 2, bs*hd]
        blocks = blocks.view(r, n, kvh, 2, bs * self.head_dim)
        perm_k, perm_v = self.perm_k.to(kv_cache.device), self.perm_v.to(kv_cache.device)
        k = _layout_view(blocks[:, :, :, 0], perm_k, self.kind_k, bs, self.head_dim)  # [R, n, kvh, bs, hd]
        v = _layout_view(blocks[:, :, :, 1], perm_v, self.kind_v, bs, self.head_dim)
        k = k.permute(0, 2, 1, 3, 4).reshape(r, kvh, n * bs, self.head_dim)
        v = v.permute(0, 2, 1, 3, 4).reshape(r, kvh, n * bs, self.head_dim)
        return k, v


class FlashPagedKV(PagedKV):
    """vLLM 0.32's CUDA FlashAttention layout: the layer's cache is (logically, any strides)
    [num_blocks, kv_heads, block_size, 2 * head_dim], K in the first head_dim channels of each
    token and V in the last (`FlashAttentionImpl`: `kv_cache.transpose(1, 2).split(head_size, -1)`).
    Plain indexing, so it holds whatever physical block-interior order the backend picked."""

    def __init__(self, block_size: int, head_dim: int):
        self.block_size, self.head_dim = block_size, head_dim

    def gather(self, kv_cache, block_ids):
        nb, kvh, bs, two_d = kv_cache.shape
        r, n = block_ids.shape
        blocks = kv_cache.index_select(0, block_ids.reshape(-1))  # [R*n, kvh, bs, 2*hd]
        blocks = blocks.view(r, n, kvh, bs, two_d).permute(0, 2, 1, 3, 4).reshape(r, kvh, n * bs, two_d)
        return blocks[..., : self.head_dim], blocks[..., self.head_dim :]


# ----------------------------------------------------------------------------- the math


def key_bias(plan: ContextAttentionPlan, length: int) -> torch.Tensor:
    """[length] float32: 0 on emphasised prompt positions, log(alpha) elsewhere (incl. generated)."""
    bias = torch.full((length,), math.log(plan.alpha), dtype=torch.float32)
    for start, end in plan.spans:
        if start < length:
            bias[start : min(end, length)] = 0.0
    return bias


def biased_attention(q, k, v, bias, scale: float) -> torch.Tensor:
    """Float32 attention with an additive mask.

    q [R, H, Q, D]; k, v [R, KVH, L, D] (H a multiple of KVH); bias broadcastable to [R, H, Q, L]
    (-inf = masked). Returns [R, H, Q, D] float32."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=bias, scale=scale
    )


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
            self._decode_(decode, query, output, kv_cache, reader, seq_lens, block_table, scale, bs)
        for i, local in prefill:
            self._prefill_(i, local, query, output, kv_cache, reader, seq_lens, block_table, scale, bs)

    def _decode_(self, items, query, output, kv_cache, reader, seq_lens, block_table, scale, bs):
        """All single-token rows of this layer in one padded batch."""
        reqs = [self.requests[i] for i, _ in items]
        lengths = [seq_lens[r.batch_index] for r in reqs]
        n_blocks = -(-max(lengths) // bs)
        batch_idx = torch.tensor([r.batch_index for r in reqs], device=block_table.device)
        block_ids = block_table.index_select(0, batch_idx)[:, :n_blocks].long()
        k, v = reader.gather(kv_cache, block_ids)  # [R, kvh, n*bs, hd]
        width = n_blocks * bs
        bias = torch.full((len(reqs), width), float("-inf"), device=query.device)
        for row, ((i, _), length) in enumerate(zip(items, lengths)):
            bias[row, :length] = self.bias(i, length)
        rows = torch.tensor([r.start for r in reqs], device=query.device)
        q = query.index_select(0, rows).unsqueeze(2)  # [R, H, 1, D]
        new = biased_attention(q, k, v, bias[:, None, None, :], scale)[:, :, 0].to(output.dtype)
        num_heads = query.shape[1]
        if all(len(local) == num_heads for _, local in items):
            output.index_copy_(0, rows, new)
            return
        mask = torch.zeros(len(reqs), num_heads, 1, dtype=torch.bool, device=query.device)
        for row, (_, local) in enumerate(items):
            mask[row, local] = True
        output.index_copy_(0, rows, torch.where(mask, new, output.index_select(0, rows)))

    def _prefill_(self, i, local, query, output, kv_cache, reader, seq_lens, block_table, scale, bs):
        """One request's multi-token chunk, causal, chunked over queries to bound memory."""
        r = self.requests[i]
        length = seq_lens[r.batch_index]
        q_len = r.end - r.start
        n_blocks = -(-length // bs)
        block_ids = block_table[r.batch_index : r.batch_index + 1, :n_blocks].long()
        k, v = reader.gather(kv_cache, block_ids)
        k, v = k[:, :, :length], v[:, :, :length]
        heads = torch.tensor(local, device=query.device)
        bias = self.bias(i, length)
        key_pos = torch.arange(length, device=query.device)
        step = max(1, PREFILL_CHUNK_ELEMENTS // length)
        first_pos = length - q_len
        for c0 in range(0, q_len, step):
            c1 = min(q_len, c0 + step)
            q = query[r.start + c0 : r.start + c1].transpose(0, 1).unsqueeze(0)  # [1, H, c, D]
            q_pos = torch.arange(first_pos + c0, first_pos + c1, device=query.device)
            causal = key_pos[None, :] <= q_pos[:, None]
            mask = torch.where(causal, bias[None, :], torch.tensor(float("-inf"), device=query.device))
            new = biased_attention(q, k, v, mask[None, None], scale)[0].transpose(0, 1)  # [c, H, D]
            block = output[r.start + c0 : r.start + c1]
            block.index_copy_(1, heads, new.index_select(1, heads).to(output.dtype))
