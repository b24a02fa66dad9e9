"""User-context attention steering (PASTA-style) over vLLM's paged KV cache.

vLLM's attention kernels take no per-key bias, so the steer is a second pass: vLLM's kernel runs
for the whole batch as usual, then for the steered requests on a steered layer attention is
recomputed with the bias (log(alpha) on keys outside the emphasised spans) in float32, and the
steered heads' output rows are overwritten. Unsteered rows and heads are never written, so they
stay bit-identical to a plain engine; a step without steered rows does nothing.

Pieces:
- Decode rows on the CPU: the C++ kernel (`csrc/bias_attention.cpp`, loaded by `native.py`) reads
  the paged cache in place, block by block, for the steered (request, KV head) pairs only.
- Decode rows on CUDA: the Triton kernel (`triton_kernel.py`) over FlashAttention's paged layout.
- The pure-torch pass, the reference of both and the fallback (engine setting
  `context_attention_kernel: "torch"`, or no compiler): `PagedKV` readers (`kv.py`) gather dense
  [R, kv_heads, n*block, head_dim] K and V, then SDPA / matmul with the bias. Prefill chunks
  (many queries per request) always take it: the gather is shared by the chunk's queries.
- `AttentionWork`: one step's steered requests, built once per step and shared by every layer.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from ..engine import AttentionCall, RequestRows, SteerEngine, StepHandle, StepShape
from . import ContextAttentionPlan
from . import native
from .kv import CpuPagedKV, FlashPagedKV, Gathered, PagedKV

KERNEL_SETTING = "context_attention_kernel"
KERNEL_CHOICES = ("auto", "torch")


def checked_kernel(kernel: str) -> str:
    """`kernel` when it is one of KERNEL_CHOICES; else ValueError naming the setting."""
    if kernel not in KERNEL_CHOICES:
        raise ValueError(f"steerserve: engine setting {KERNEL_SETTING} must be one of "
                         f"{', '.join(KERNEL_CHOICES)}; got {kernel!r}")
    return kernel


def kernel_setting(settings: dict) -> str:
    """The engine setting `context_attention_kernel` (default "auto"), checked."""
    return checked_kernel(settings.get(KERNEL_SETTING) or "auto")

# queries x keys elements of one float32 score matrix per head in a prefill chunk (bounds memory)
PREFILL_CHUNK_ELEMENTS = 1 << 20
# queries per prefill chunk at most: each chunk reads keys only up to its last query, so smaller
# chunks skip more of the causal triangle (256: -21% of the work at 560 tokens, -40% at 2,000)
PREFILL_CHUNK_QUERIES = 256
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
    to [R, H, Q, L] (-inf = masked). Returns [R, H, Q, D] in the cache dtype.

    On CUDA in half precision it runs in float32: measured on an H200 (torch 2.11), SDPA with a
    float32 mask and bfloat16 q/k/v returned outputs off by up to 2.2 from dense attention."""
    dtype = v.dtype
    if q.device.type != "cpu" and dtype != torch.float32:
        q, k, v = q.float(), k.float(), v.float()
    return torch.nn.functional.scaled_dot_product_attention(
        q.to(v.dtype), k, v, attn_mask=bias, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    ).to(dtype)


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
    kernel: str = "auto"  # "auto": the CPU / CUDA kernel for decode rows where it runs; "torch": never
    _bias_cache: dict = field(default_factory=dict)  # (request idx, length) -> bias tensor
    _lengths: list[int] | None = None  # seq_lens of the step (one read, shared by every layer)
    _kernel_inputs: dict = field(default_factory=dict)  # the kernels' per-step tensors, shared by the layers

    @classmethod
    def build(cls, entries: list[tuple[ContextAttentionPlan, RequestRows]], device,
              kernel: str = "auto") -> AttentionWork | None:
        """entries: (plan, rows) per steered request."""
        checked_kernel(kernel)
        reqs = [_Request(r.index, r.start, r.end, plan, dict(plan.heads)) for plan, r in entries if r.end > r.start]
        if not reqs:
            return None
        layers = frozenset(layer for r in reqs for layer in r.heads_by_layer)
        return cls(reqs, device, layers, kernel)

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
        if self._use_triton(kv_cache, reader):
            self._triton_(decode + prefill, query, output, kv_cache, seq_lens, block_table, scale, bs)
            return
        op = self._cpu_kernel(kv_cache, reader) if decode else None
        if op is not None:
            self._decode_kernel_(op, decode, query, output, kv_cache, reader, seq_lens, block_table, scale, bs)
            decode = []
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

    def _cpu_kernel(self, kv_cache: torch.Tensor, reader: PagedKV):
        if self.kernel == "torch" or kv_cache.device.type != "cpu" or not isinstance(reader, CpuPagedKV):
            return None
        if not kv_cache.is_contiguous():
            return None
        return native.cpu_kernel()

    def _use_triton(self, kv_cache: torch.Tensor, reader: PagedKV) -> bool:
        if self.kernel == "torch" or not kv_cache.is_cuda or not isinstance(reader, FlashPagedKV):
            return False
        from .triton_kernel import triton_available

        return triton_available()

    def _step_rows(self, indices: tuple[int, ...], seq_lens: list[int], block_table: torch.Tensor, bs: int):
        """For these requests, once per step (shared by every layer they steer): their key counts,
        their pages ([R, pages] int64) and their bias rows ([R, longest] float32 on the CPU; 0 past a
        row's length)."""
        key = ("rows", indices)
        if key not in self._kernel_inputs:
            reqs = [self.requests[i] for i in indices]
            lengths = [seq_lens[r.batch_index] for r in reqs]
            longest = max(lengths)
            batch_idx = torch.tensor([r.batch_index for r in reqs], device=block_table.device)
            block_ids = block_table.index_select(0, batch_idx)[:, : -(-longest // bs)].long().contiguous()
            bias = torch.zeros(len(reqs), longest, dtype=torch.float32)
            for row, (r, length) in enumerate(zip(reqs, lengths)):
                bias[row, :length] = key_bias(r.plan, length)
            self._kernel_inputs[key] = (lengths, block_ids, bias)
        return self._kernel_inputs[key]

    def _triton_(self, items, query, output, kv_cache, seq_lens, block_table, scale, bs):
        """Every steered row of this layer (decode and prefill alike: a prefill row at position p
        is a query over keys 0..p) in one Triton launch over the paged cache in place."""
        from .triton_kernel import bias_attention_

        device = query.device
        lengths, block_ids, bias = self._step_rows(tuple(range(len(self.requests))), seq_lens, block_table, bs)
        if "triton bias" not in self._kernel_inputs:  # on the device, once per step
            self._kernel_inputs["triton bias"] = bias.to(device, non_blocking=True)
        bias = self._kernel_inputs["triton bias"]
        key = ("triton", tuple((i, tuple(local)) for i, local in items))
        work = self._kernel_inputs.get(key)
        if work is None:  # (request, row, keys, head) per steered query row and head
            req, row, keys, head = [], [], [], []
            for i, local in items:
                r = self.requests[i]
                q_len = r.end - r.start
                for j in range(q_len):
                    for h in local:
                        req.append(i)
                        row.append(r.start + j)
                        keys.append(lengths[i] - q_len + 1 + j)
                        head.append(h)
            work = tuple(torch.tensor(x, dtype=torch.int32).to(device, non_blocking=True)
                         for x in (req, row, keys, head))
            self._kernel_inputs[key] = work
        bias_attention_(query, output, kv_cache, block_ids, bias, *work, scale)

    def _decode_kernel_(self, op, items, query, output, kv_cache, reader, seq_lens, block_table, scale, bs):
        """All single-token rows of this layer through the CPU kernel `op`: the paged cache is read
        in place; only the steered (row, head) outputs are written."""
        indices = tuple(i for i, _ in items)
        lengths, block_ids, bias = self._step_rows(indices, seq_lens, block_table, bs)
        if ("cpu", indices) not in self._kernel_inputs:
            self._kernel_inputs[("cpu", indices)] = (
                torch.tensor(lengths, dtype=torch.long),
                torch.tensor([self.requests[i].start for i in indices], dtype=torch.long))
        lengths_t, rows = self._kernel_inputs[("cpu", indices)]
        heads = tuple(tuple(local) for _, local in items)
        mask = self._kernel_inputs.get(("mask", indices, heads))
        if mask is None:  # the steered heads per row: usually the same on every layer of the step
            num_heads = query.shape[1]
            mask = torch.tensor([[h in steered for h in range(num_heads)] for steered in map(set, heads)],
                                dtype=torch.bool)
            self._kernel_inputs[("mask", indices, heads)] = mask
        empty = torch.empty(0, dtype=torch.long)
        codes = native.LAYOUT_CODES
        op(query, output, kv_cache, block_ids, lengths_t, rows, mask, bias, float(scale),
           codes[reader.kind_k], codes[reader.kind_v],
           reader.perm_k if reader.kind_k == "permuted" else empty,
           reader.perm_v if reader.kind_v == "permuted" else empty)

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
        step = max(1, min(PREFILL_CHUNK_QUERIES, PREFILL_CHUNK_ELEMENTS // length))
        first_pos = length - q_len
        for c0 in range(0, q_len, step):
            c1 = min(q_len, c0 + step)
            keys = first_pos + c1  # the chunk's queries see no key after its last position: skipped
            q = query[r.start + c0 : r.start + c1].index_select(1, qh_t).transpose(0, 1).unsqueeze(0)  # [1, h, c, D]
            q_pos = torch.arange(first_pos + c0, first_pos + c1, device=device)
            causal = key_pos[None, :keys] <= q_pos[:, None]
            mask = torch.where(causal, bias[None, :keys], torch.tensor(float("-inf"), device=device))
            new = biased_attention(q, k[:, :, :keys], v[:, :, :keys], mask[None, None], scale)[0].transpose(0, 1)
            block = output[r.start + c0 : r.start + c1]
            block.index_copy_(1, write, new.index_select(1, pick).to(output.dtype))


logger = logging.getLogger("steerserve")


class ContextAttentionEngine(SteerEngine):
    name = "context_attention"
    settings_keys = (KERNEL_SETTING,)

    def build_kernels(self):
        return [native.build()]

    def install(self, model: torch.nn.Module, handle: StepHandle) -> None:
        kernel = kernel_setting(handle.settings)
        param = next(model.parameters(), None)
        if kernel == "auto" and (param is None or param.device.type == "cpu"):
            native.cpu_kernel()  # load (or build) it at start-up, not inside the first steered step

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
        return AttentionWork.build(kept, shape.device, kernel_setting(handle.settings)) if kept else None

    def attention_(self, state: AttentionWork, call: AttentionCall) -> None:
        if call.layer not in state.layers:
            return
        if call.unsupported is not None:
            raise RuntimeError(f"steerserve: context-attention steering is not supported with {call.unsupported}")
        state.apply_(call.layer, call.query, call.output, call.kv_cache, call.reader(), call.seq_lens,
                     call.block_table, call.scale, call.head_offset)


ENGINE = ContextAttentionEngine()
