"""The CUDA route of context-attention steering: a Triton kernel with the per-key bias inside the
attention loop, reading vLLM's FlashAttention paged cache in place.

Cache: the layer's `kv_cache`, logically [num_blocks, kv_heads, block_size, 2 * head_dim] (K in the
first head_dim channels, V in the last; `FlashPagedKV` in kv.py), any strides. One program per
steered (query row, query head): it walks the row's keys in tiles of BLOCK_N tokens, looks each
token's page up in the request's block ids, and keeps an online softmax in float32:
s = q.k * scale + bias[t]; out = softmax(s) . V. Decode rows and prefill rows are the same work
item (a prefill row at position p attends to keys 0..p), so one launch serves a whole step's
steered rows of a layer. Only the steered (row, head) outputs are written.

Tested against the pure-torch pass on synthetic paged tensors: on CUDA where it exists
(`tests/gpu_check.sh`), and everywhere through Triton's interpreter on CPU tensors
(`TRITON_INTERPRET=1` in a subprocess, slow, for tests only).
"""

from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - not installed or broken: the torch pass serves
    triton = tl = None


def triton_available() -> bool:
    return triton is not None


if triton is not None:

    def _bias_attention(Q, O, KV, BLOCKS, BIAS, ITEM_REQ, ITEM_ROW, ITEM_LEN, ITEM_HEAD, scale,
                       sq0, sq1, sq2, so0, so1, so2, skv0, skv1, skv2, skv3, sblk0, sbias0,
                       HEAD_DIM, GROUP: tl.constexpr, PAGE: tl.constexpr, D: tl.constexpr,
                       BLOCK_N: tl.constexpr):
        pid = tl.program_id(0)
        req = tl.load(ITEM_REQ + pid).to(tl.int64)
        row = tl.load(ITEM_ROW + pid).to(tl.int64)
        length = tl.load(ITEM_LEN + pid).to(tl.int64)
        head = tl.load(ITEM_HEAD + pid).to(tl.int64)
        kv_head = head // GROUP
        d = tl.arange(0, D)
        dmask = d < HEAD_DIM
        q = tl.load(Q + row * sq0 + head * sq1 + d * sq2, mask=dmask, other=0.0).to(tl.float32) * scale
        m = tl.full((), float("-inf"), tl.float32)
        denom = tl.full((), 0.0, tl.float32)
        acc = tl.zeros((D,), tl.float32)
        for start in range(0, length, BLOCK_N):
            t = start + tl.arange(0, BLOCK_N).to(tl.int64)
            tmask = t < length
            page = tl.load(BLOCKS + req * sblk0 + t // PAGE, mask=tmask, other=0).to(tl.int64)
            base = page * skv0 + kv_head * skv1 + (t % PAGE) * skv2
            both = tmask[:, None] & dmask[None, :]
            k = tl.load(KV + base[:, None] + d[None, :] * skv3, mask=both, other=0.0).to(tl.float32)
            s = tl.sum(k * q[None, :], 1) + tl.load(BIAS + req * sbias0 + t, mask=tmask, other=0.0)
            s = tl.where(tmask, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 0))
            correction = tl.exp(m - m_new)
            p = tl.exp(s - m_new)
            denom = denom * correction + tl.sum(p, 0)
            v = tl.load(KV + base[:, None] + (HEAD_DIM + d[None, :]) * skv3, mask=both, other=0.0).to(tl.float32)
            acc = acc * correction + tl.sum(p[:, None] * v, 0)
            m = m_new
        out = acc / denom
        tl.store(O + row * so0 + head * so1 + d * so2, out.to(O.dtype.element_ty), mask=dmask)


@functools.cache
def _kernel():
    """The jitted kernel (under TRITON_INTERPRET=1, set before Triton is imported, Triton's
    interpreter, which runs it on CPU tensors)."""
    if triton is None:
        raise RuntimeError("Triton is not installed: the context-attention CUDA kernel cannot run")
    return triton.jit(_bias_attention)


def bias_attention_(query: torch.Tensor, output: torch.Tensor, kv_cache: torch.Tensor, block_ids: torch.Tensor,
                    bias: torch.Tensor, item_req: torch.Tensor, item_row: torch.Tensor, item_len: torch.Tensor,
                    item_head: torch.Tensor, scale: float, block_n: int = 64) -> None:
    """Overwrite output[item_row[i], item_head[i]] with biased attention of that query over keys
    0 .. item_len[i]-1 of request item_req[i] (its pages `block_ids[req]`, its bias `bias[req]`,
    float32, log(alpha) outside the emphasised spans).

    query / output [N, H, D] (any strides); kv_cache [num_blocks, kv_heads, page, 2 * D] (any
    strides); block_ids [R, max_pages] int; bias [R, >= max length] float32 contiguous rows."""
    items = item_req.numel()
    if items == 0:
        return
    num_heads, head_dim = query.shape[1], query.shape[2]
    _, kv_heads, page, two_d = kv_cache.shape
    if two_d != 2 * head_dim or num_heads % kv_heads:
        raise ValueError(f"bias_attention_: query [.., {num_heads}, {head_dim}] does not fit cache "
                         f"{tuple(kv_cache.shape)}")
    if bias.dtype != torch.float32 or bias.stride(-1) != 1:
        raise ValueError("bias_attention_: bias must be float32 with contiguous rows")
    _kernel()[(items,)](
        query, output, kv_cache, block_ids, bias, item_req, item_row, item_len, item_head, float(scale),
        *query.stride(), *output.stride(), *kv_cache.stride(), block_ids.stride(0), bias.stride(0),
        head_dim, GROUP=num_heads // kv_heads, PAGE=page, D=triton.next_power_of_2(head_dim), BLOCK_N=block_n,
    )
