"""Each step's attention metadata, kept for sub-models that run on a subset of the step's requests
(proxy tuning's experts).

Surfaces: `AttentionGroup.build_metadata` (wrapped to keep the step's `CommonAttentionMetadata` on
the group), `AttentionGroup.layer_names`, the runner's `attn_groups`, and the fields of
`CommonAttentionMetadata` (cut to a subset of requests by `subset_common_metadata`; a field added
by an upgrade fails the adapter test).
"""

from __future__ import annotations

from typing import Any

import torch

from . import WRAPPED_MARK


def install_metadata_recorder() -> None:
    """Wrap `AttentionGroup.build_metadata` to keep each step's `CommonAttentionMetadata` on its
    group (`steer_common`, read by `step_metadata`, cleared after the step). Idempotent."""
    from vllm.v1.worker.utils import AttentionGroup

    original = AttentionGroup.build_metadata
    if getattr(original, WRAPPED_MARK, False):
        return

    def build_metadata(self, common_attn_metadata, ubatch_idx: int = 0, common_prefix_len: int = 0, **kwargs):
        if ubatch_idx == 0:
            self.steer_common = common_attn_metadata
        return original(self, common_attn_metadata, ubatch_idx, common_prefix_len, **kwargs)

    setattr(build_metadata, WRAPPED_MARK, True)
    build_metadata.__wrapped__ = original
    AttentionGroup.build_metadata = build_metadata


def build_metadata(group: Any, common: Any) -> Any:
    """The backend metadata of `group` for `common` (vLLM's own builder, not the recorder)."""
    method = type(group).build_metadata
    return getattr(method, "__wrapped__", method)(group, common)


def _groups(runner: Any):
    for groups in getattr(runner, "attn_groups", ()) or ():
        yield from groups


def step_metadata(runner: Any) -> dict[str, tuple[Any, Any]]:
    """attention layer name -> (its attention group, the step's common metadata) for the groups
    whose metadata was recorded this step."""
    out: dict[str, tuple[Any, Any]] = {}
    for group in _groups(runner):
        common = getattr(group, "steer_common", None)
        if common is not None:
            for layer in group.layer_names:
                out[layer] = (group, common)
    return out


def clear_step_metadata(runner: Any) -> None:
    for group in _groups(runner):
        if getattr(group, "steer_common", None) is not None:
            group.steer_common = None


# CommonAttentionMetadata fields, by how a subset of requests cuts them (checked by the adapter test)
_CM_PER_REQUEST = ("seq_lens", "seq_lens_cpu_upper_bound", "is_prefilling", "req_idx", "rswa_prefix_lens",
                   "replayssm_decode_base_cpu", "dcp_local_seq_lens", "dcp_local_seq_lens_cpu_upper_bound",
                   "encoder_seq_lens", "encoder_seq_lens_cpu", "block_table_tensor")
_CM_PER_TOKEN = ("slot_mapping", "positions")
_CM_DROPPED = ("logits_indices_padded", "num_logits_indices", "max_logits_per_req", "mm_req_doc_ranges",
               "_num_computed_tokens_cache", "_token_to_req_indices_cache")  # caches: recomputed lazily
_CM_REBUILT = ("query_start_loc", "query_start_loc_cpu", "num_reqs", "num_actual_tokens", "max_query_len",
               "max_seq_len", "causal")


def subset_common_metadata(cm: Any, requests: list[int]) -> tuple[Any, torch.Tensor]:
    """`cm` cut to the batch rows `requests` (sorted): (new metadata, the token rows kept, long)."""
    import dataclasses

    import numpy as np

    qsl = cm.query_start_loc_cpu.numpy()
    req = np.asarray(requests, dtype=np.int64)
    lens = qsl[req + 1] - qsl[req]
    tokens = np.concatenate([np.arange(qsl[r], qsl[r + 1]) for r in requests])
    new_qsl = np.zeros(len(requests) + 1, dtype=qsl.dtype)
    np.cumsum(lens, out=new_qsl[1:])
    new_qsl_cpu = torch.from_numpy(new_qsl)
    device = cm.query_start_loc.device
    req_t = {}
    tok_t = {}

    def cut(value, per_request: bool):
        if value is None:
            return None
        if isinstance(value, np.ndarray):
            return value[req] if per_request else value[tokens]
        if not isinstance(value, torch.Tensor):
            return value
        cache = req_t if per_request else tok_t
        if value.device not in cache:
            cache[value.device] = torch.from_numpy(req if per_request else tokens).to(value.device)
        return value.index_select(0, cache[value.device])

    changes = {f: cut(getattr(cm, f), True) for f in _CM_PER_REQUEST}
    changes.update({f: cut(getattr(cm, f), False) for f in _CM_PER_TOKEN})
    changes.update({f: None for f in _CM_DROPPED})
    upper = cm.seq_lens_cpu_upper_bound
    max_seq = int(upper[torch.from_numpy(req)].max()) if upper is not None else cm.max_seq_len
    causal = cm.causal
    if isinstance(causal, torch.Tensor):
        causal = cut(causal, causal.shape[0] != cm.num_actual_tokens)
    changes.update(query_start_loc=new_qsl_cpu.to(device), query_start_loc_cpu=new_qsl_cpu,
                   num_reqs=len(requests), num_actual_tokens=int(new_qsl[-1]), max_query_len=int(lens.max()),
                   max_seq_len=max_seq, causal=causal)
    known = set(_CM_PER_REQUEST) | set(_CM_PER_TOKEN) | set(_CM_DROPPED) | set(_CM_REBUILT)
    changes = {k: v for k, v in changes.items() if k in {f.name for f in dataclasses.fields(cm)}}
    assert known >= {f.name for f in dataclasses.fields(cm)}, "CommonAttentionMetadata gained fields"
    return dataclasses.replace(cm, **changes), torch.from_numpy(tokens)
