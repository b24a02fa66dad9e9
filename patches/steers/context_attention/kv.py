"""Paged KV readers: dense K/V of a few requests and KV heads from one layer's paged cache, for the
context-attention second pass (device-agnostic torch).

`CpuPagedKV` learns the CPU backend's ISA-dependent block interior by writing known values through
the backend's own cache-write op once (`calibrate`), so it is exact for any ISA path (vec, vec16,
AMX, NEON...) without hard-coding one. `FlashPagedKV` reads the CUDA FlashAttention layout
[num_blocks, kv_heads, block_size, 2 * head_dim] (K | V channels). Which reader a backend gets is
`adapter/attention.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch


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


