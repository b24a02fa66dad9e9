"""Prefix caching: per-block steering keys next to vLLM's own (see `patches/prefix_cache.py`).

Surfaces: `kv_cache_utils.generate_block_hash_extra_keys` (looked up by name by
`get_request_block_hasher` and `block_pool`) and the engine-core `Request`'s `sampling_params`.
"""

from __future__ import annotations

from . import WRAPPED_MARK


def install_prefix_cache_keys() -> None:
    """Hash each KV block with its steering key too (`prefix_cache.block_key` of the request's
    plan), next to vLLM's own extra keys (LoRA name, multimodal hashes, `cache_salt` on the first
    block). Wraps `generate_block_hash_extra_keys` where the block hasher and the block pool look
    it up (idempotent; runs in the engine-core process, where requests are hashed)."""
    from vllm.v1.core import block_pool, kv_cache_utils

    from ..prefix_cache import block_key

    original = kv_cache_utils.generate_block_hash_extra_keys
    if getattr(original, WRAPPED_MARK, False):
        return

    def generate_block_hash_extra_keys(request, start_token_idx, end_token_idx, start_mm_idx):
        keys, next_mm_idx = original(request, start_token_idx, end_token_idx, start_mm_idx)
        params = getattr(request, "sampling_params", None)
        mine = block_key(getattr(params, "extra_args", None), start_token_idx, end_token_idx)
        if mine is None:
            return keys, next_mm_idx
        return (*(keys or ()), mine), next_mm_idx

    setattr(generate_block_hash_extra_keys, WRAPPED_MARK, True)
    kv_cache_utils.generate_block_hash_extra_keys = generate_block_hash_extra_keys
    if hasattr(block_pool, "generate_block_hash_extra_keys"):
        block_pool.generate_block_hash_extra_keys = generate_block_hash_extra_keys
