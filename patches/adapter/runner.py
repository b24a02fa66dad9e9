"""The model runner: where each step's steering begins (worker process).

Surfaces: `GPUModelRunner._model_forward` (V1 runner; `CPUModelRunner` subclasses it), called once
per step under `set_forward_context` after the step's inputs are final, and
`GPUModelRunner._dummy_run(num_tokens, ...)` (profile and warm-up runs, where engines warm up on
`runner.input_ids.gpu` and `runner.positions`); inside it
`runner.input_batch.req_ids` (row order), `runner.input_batch.num_reqs`,
`runner.input_batch.num_computed_tokens_cpu` (each request's first position in the step),
`runner.query_start_loc.np` (token row offsets per request), `runner.requests[req_id].sampling_params.extra_args` (the plan) and
`.num_prompt_tokens`, `runner.get_model()` and `runner.attn_groups`; `CPUModelRunner.initialize_kv_cache`,
`runner.intermediate_tensors` and the model's `make_empty_intermediate_tensors` (the CPU pipeline
fix); the offline engine's `engine_core.shutdown()`.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from ..plan import PlanRefused, plan_from_engine_args
from ..steers.engine import RequestRows, StepHandle, StepShape
from . import WRAPPED_MARK
from .metadata import clear_step_metadata, step_metadata

logger = logging.getLogger("steerserve")


def step_requests(runner: Any, handle: StepHandle | None = None) -> list[tuple[Any, RequestRows]]:
    """(SteerPlan, rows) of every steered request in the runner's current step, in batch order.
    A plan the engine refuses (unsigned, forged, malformed) leaves its request unsteered, logged
    once per request (`handle.refused`)."""
    batch = runner.input_batch
    num_reqs = batch.num_reqs
    out: list[tuple[Any, RequestRows]] = []
    if num_reqs == 0:
        return out
    qsl = runner.query_start_loc.np
    computed = batch.num_computed_tokens_cpu  # the first position of each request's rows this step
    requests = runner.requests
    refused = handle.refused if handle is not None else set()
    for i, req_id in enumerate(batch.req_ids[:num_reqs]):
        state = requests.get(req_id)
        params = state.sampling_params if state is not None else None
        extra = params.extra_args if params is not None else None
        if not extra:
            continue
        try:
            plan = plan_from_engine_args(extra)
        except PlanRefused as err:
            if req_id not in refused:  # once per request, not per step
                if len(refused) > 4096:
                    refused.clear()
                refused.add(req_id)
                logger.error("steerserve: request %s: %s; running it unsteered", req_id, err)
            continue
        if plan is None or plan.is_empty:
            continue
        start, end = int(qsl[i]), int(qsl[i + 1])
        if end <= start:
            continue
        out.append((plan, RequestRows(i, start, end, req_id, getattr(state, "num_prompt_tokens", None),
                                      int(computed[i]))))
    return out


def install_runner_hook() -> None:
    """Wrap `GPUModelRunner._model_forward` to begin each step's steering on the model's handle,
    and after the forward run the engines' after-forward hooks (idempotent)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._model_forward
    if getattr(original, WRAPPED_MARK, False):
        return

    def _model_forward(self, *args, **kwargs):
        model = self.get_model()
        handle: StepHandle | None = getattr(model, "steer_handle", None)
        if handle is None:
            return original(self, *args, **kwargs)
        handle.end()
        try:
            plans = step_requests(self, handle)
            if not plans:
                handle.clear_buffers()
                return original(self, *args, **kwargs)
            num_reqs = self.input_batch.num_reqs
            num_tokens = int(self.query_start_loc.np[num_reqs])
            step = handle.begin(plans, StepShape(num_reqs, num_tokens, self.device,
                                                    functools.partial(step_metadata, self)))
            out = original(self, *args, **kwargs)
            if step is not None and isinstance(out, torch.Tensor):
                input_ids = kwargs.get("input_ids", args[0] if args else None)
                positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
                handle.after_forward(model, out[:num_tokens], input_ids, positions)
            return out
        finally:
            clear_step_metadata(self)

    setattr(_model_forward, WRAPPED_MARK, True)
    _model_forward.__wrapped__ = original
    GPUModelRunner._model_forward = _model_forward

    original_dummy = GPUModelRunner._dummy_run

    def _dummy_run(self, num_tokens: int, *args, **kwargs):
        # vLLM's profile / compile warm-up / graph capture runs (no requests): after the model's
        # dummy pass, the engines warm up what their steps will run (compiled sub-models), on the
        # runner's own input buffers (a compiled graph keeps the dtypes it was traced with)
        out = original_dummy(self, num_tokens, *args, **kwargs)
        model = self.get_model()
        handle: StepHandle | None = getattr(model, "steer_handle", None)
        ids = getattr(getattr(self, "input_ids", None), "gpu", None)
        positions = getattr(self, "positions", None)
        positions = getattr(positions, "gpu", positions)
        if handle is not None and isinstance(ids, torch.Tensor) and isinstance(positions, torch.Tensor) \
                and positions.dim() == 1:
            handle.warm_up(model, ids[:num_tokens], positions[:num_tokens])
        return out

    setattr(_dummy_run, WRAPPED_MARK, True)
    _dummy_run.__wrapped__ = original_dummy
    GPUModelRunner._dummy_run = _dummy_run


def install_cpu_pipeline_fix() -> None:
    """vLLM 0.32's CPU build cannot run pipeline parallelism eagerly: a later pipeline rank copies
    its input activations into `runner.intermediate_tensors`, a buffer only the warm-up dummy run
    creates, and the CPU worker skips that warm-up when nothing is compiled and the KV size is set
    (the stock model fails the same way: `assert self.intermediate_tensors is not None`). Wrap
    `CPUModelRunner.initialize_kv_cache` (once per worker, after the model is built) to create the
    buffer as the GPU runner's dummy run does. Idempotent; a no-op on the first rank, when the
    buffer exists, and on the CUDA build."""
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    except Exception:  # noqa: BLE001 - not importable on every platform
        return
    original = CPUModelRunner.initialize_kv_cache
    if getattr(original, WRAPPED_MARK, False):
        return

    def initialize_kv_cache(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        from vllm.distributed import get_pp_group

        if not get_pp_group().is_first_rank and getattr(self, "intermediate_tensors", None) is None:
            self.intermediate_tensors = self.model.make_empty_intermediate_tensors(
                batch_size=self.max_num_tokens, dtype=self.model_config.dtype, device=self.device)
        return out

    setattr(initialize_kv_cache, WRAPPED_MARK, True)
    initialize_kv_cache.__wrapped__ = original
    CPUModelRunner.initialize_kv_cache = initialize_kv_cache


# vLLM 0.32's engine-core process outlives its own teardown: its workers exit about 2 s after the
# stop and the core is then left until the process manager's 5 s timeout kills it (measured here
# with a stock engine: 5.4 s per shutdown, "force killing remaining process EngineCore"). Waiting
# 3 s stops it as soon after its workers as is safe (a worker still running then exits with it).
ENGINE_STOP_TIMEOUT_S = 3.0


def shutdown_engine(llm: Any) -> None:
    """Stop an offline `vllm.LLM`'s engine-core process now (it busy-polls a CPU core while alive)."""
    llm.llm_engine.engine_core.shutdown(timeout=ENGINE_STOP_TIMEOUT_S)
