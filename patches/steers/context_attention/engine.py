"""User-context attention steering (PASTA-style) over vLLM's paged KV cache: device-agnostic torch.

The fast attention kernels take no per-key bias, so the steer is a second pass: vLLM's kernel runs
for the whole batch as usual, then for the steered requests on a steered layer we gather their K/V
from the paged cache, recompute attention with the bias (log(alpha) on keys outside the emphasised
spans) in float32, and overwrite the steered heads' output rows. Unsteered rows and heads are never
written, so they stay bit-identical to a plain engine; a step without steered rows does nothing.

Pieces:
- `PagedKV` readers (`kv.py`) turn a layer's cache plus block ids into dense
  [R, kv_heads, n*block, head_dim] K and V.
- `AttentionWork`: one step's steered requests, built once per step and shared by every layer.
- `apply_(...)`: the per-layer recompute, batched over decode rows, chunked over long prefills.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from ..engine import AttentionCall, RequestRows, SteerEngine, StepHandle, StepShape
from . import ContextAttentionPlan
from .kv import Gathered, PagedKV

# queries x keys elements of one float32 score matrix per head in a prefill chunk (bounds memory)
PREFILL_CHUNK_ELEMENTS = 1 << 20
# requests x padded key length gathered at once for decode rows (bounds the dense K/V copy:
# 65536 tokens x KV heads x head_dim x 2, e.g. 48 MiB for 3 KV heads of 64 in bfloat16)
DECODE_CHUNK_TOKENS = 1 << 16


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
    def build(cls, entries: list[tuple[ContextAttentionPlan, RequestRows]], device) -> AttentionWork | None:
        """entries: (plan, rows) per steered request."""
        reqs = [_Request(r.index, r.start, r.end, plan, dict(plan.heads)) for plan, r in entries if r.end > r.start]
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


logger = logging.getLogger("steerserve")


class ContextAttentionEngine(SteerEngine):
    name = "context_attention"

    def build_step(self, entries, shape: StepShape, handle: StepHandle) -> AttentionWork | None:
        kept = []
        for plan, rows in entries:
            prompt_len = rows.num_prompt_tokens
            if plan.prompt_len and prompt_len is not None and prompt_len != plan.prompt_len:
                # The server resolved the spans on the prompt it rendered; the engine got another.
                # Never apply spans to the wrong tokens (logged once per request).
                if rows.req_id not in handle.refused:
                    handle.refused.add(rows.req_id)
                    logger.error("steerserve: request %s: context-attention spans were resolved for %d prompt "
                                 "tokens but the engine has %d; not steering its attention", rows.req_id,
                                 plan.prompt_len, prompt_len)
                continue
            kept.append((plan, rows))
        return AttentionWork.build(kept, shape.device) if kept else None

    def attention_(self, state: AttentionWork, call: AttentionCall) -> None:
        if call.layer not in state.layers:
            return
        if call.unsupported is not None:
            raise RuntimeError(f"steerserve: context-attention steering is not supported with {call.unsupported}")
        state.apply_(call.layer, call.query, call.output, call.kv_cache, call.reader(), call.seq_lens,
                     call.block_table, call.scale, call.head_offset)


ENGINE = ContextAttentionEngine()
