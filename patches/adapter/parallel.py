"""Parallel groups (worker process).

Surfaces: `get_tensor_model_parallel_rank` / `get_tensor_model_parallel_world_size` and
`tensor_model_parallel_all_gather` (InfoSteer's whole-row statistics over a sharded FFN).
"""

from __future__ import annotations

from typing import Callable

import torch


def tensor_parallel() -> tuple[int, int]:
    """(rank, world size) of this worker's tensor-parallel group; (0, 1) without parallel state."""
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    try:
        return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    except Exception:  # noqa: BLE001 - no parallel state (unit tests)
        return 0, 1


def gather_last_dim() -> Callable[[torch.Tensor], torch.Tensor]:
    """All-gather along the last dimension over the tensor-parallel group (rank order)."""
    from vllm.distributed import tensor_model_parallel_all_gather

    return lambda t: tensor_model_parallel_all_gather(t.contiguous(), dim=-1)
