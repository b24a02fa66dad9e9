"""Prefix-cache keys for steered requests: a KV block is reused only under the same steering of
every token up to and including it.

vLLM hashes each full KV block as hash(parent block's hash, the block's token ids, extra keys);
the API server adds the plan's fingerprint as `cache_salt`, which vLLM puts in the first block's
extra keys, so every block of a steered request is chained to its plan. That covers steers whose
effect on a token's KV is fixed by the plan. Context-attention steering is not: which keys are
emphasised comes from the request's text (the user-message spans), and two requests can render to
the same token ids with different spans (a user who types the chat template's own tokens inside a
message fakes a message boundary). The plan's salt leaves the spans out on purpose, so that
multi-turn conversations reuse their earlier turns' KV.

`block_key` adds, to every block's extra keys, the emphasis of that block's own tokens (the spans
cut to the block, relative to its start). With the chained hash, a block's hash then fixes the
token ids, the plan and the emphasis of every token up to its end — exactly what the block's KV
depends on (attention is causal) — and nothing that comes later. Sound reuse stays: the earlier
turns of a conversation keep their emphasis under "user" emphasis and hit the cache; a block
whose emphasis differs misses, whatever made it differ.

Pure Python; runs in the engine-core process (installed by `adapter.block_hash.install_prefix_cache_keys`).
"""

from __future__ import annotations

from .plan import PlanRefused, SteerPlan, plan_from_engine_args

KEY_NAME = "steerserve.emphasis"


def emphasis_in_block(plan: SteerPlan | None, start: int, end: int) -> tuple[tuple[int, int], ...] | None:
    """The emphasised token ranges of a plan within block [start, end), relative to `start`
    (None when the plan has no context-attention steer). Generated tokens are never emphasised."""
    ctx = plan.context_attention if plan is not None else None
    if ctx is None:
        return None
    return tuple((max(a, start) - start, min(b, end) - start) for a, b in ctx.spans if a < end and b > start)


def block_key(extra_args: dict | None, start: int, end: int) -> tuple | None:
    """The steering extra key of block [start, end) of a request with these sampling-params extra
    args, or None (no context-attention steer, or a plan the engine refuses and runs unsteered)."""
    if not extra_args:
        return None
    try:
        plan = plan_from_engine_args(extra_args)
    except PlanRefused:
        return None
    inside = emphasis_in_block(plan, start, end)
    return None if inside is None else (KEY_NAME, inside)
