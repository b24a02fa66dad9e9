"""Every private vLLM surface steerserve touches (see patches/adapter/) still exists in the
installed vLLM with the shape we rely on. A failure here means: vLLM changed, update the adapter."""

import inspect
from types import SimpleNamespace

import numpy as np
import torch
import pytest

from steerserve.patches.adapter import WRAPPED_MARK, block_hash, metadata, parallel, runner
from steerserve.patches.adapter import server as adapter_server
from steerserve.patches.plan import InfoSteerPlan, SteerPlan
from steerserve.patches.steers.engine import RequestRows, StepHandle, StepShape


def test_pinned_vllm_version():
    import vllm

    assert vllm.__version__.startswith("0.32.0"), f"steerserve is pinned to vLLM 0.32.0, found {vllm.__version__}"


def test_runner_forward_hook_point():
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert issubclass(CPUModelRunner, GPUModelRunner)
    assert "_model_forward" not in CPUModelRunner.__dict__, "CPU runner overrides _model_forward: hook it too"
    original = inspect.unwrap(GPUModelRunner._model_forward)
    params = list(inspect.signature(original).parameters)
    assert params[:3] == ["self", "input_ids", "positions"]
    src = inspect.getsource(GPUModelRunner)
    assert "self.query_start_loc = self._make_buffer(" in src
    assert "self._model_forward(" in inspect.getsource(GPUModelRunner.execute_model)
    assert "self.requests: dict[str, CachedRequestState]" in inspect.getsource(GPUModelRunner.__init__)
    # the warm-up hook: dummy runs (profile, compile warm-up) with the runner's input buffers
    assert "_dummy_run" not in CPUModelRunner.__dict__, "CPU runner overrides _dummy_run: hook it too"
    assert list(inspect.signature(inspect.unwrap(GPUModelRunner._dummy_run)).parameters)[:2] == ["self", "num_tokens"]
    dummy = inspect.getsource(inspect.unwrap(GPUModelRunner._dummy_run))
    assert "input_ids = self.input_ids.gpu[:num_tokens_padded]" in dummy
    assert "positions = self.positions[:num_tokens_padded]" in dummy
    assert "self._dummy_run(" in inspect.getsource(GPUModelRunner.profile_run)


def test_runner_hook_installed_once():
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    runner.install_runner_hook()
    first = GPUModelRunner._model_forward
    runner.install_runner_hook()
    assert GPUModelRunner._model_forward is first and getattr(first, "_steerserve_wrapped")


def test_batch_and_request_state_fields():
    from vllm.v1.worker.gpu_input_batch import CachedRequestState, InputBatch
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    # each request's first position in the step (steering vectors' prompt / generated split):
    # the runner computes positions as num_computed_tokens_cpu[request] + offset
    assert "self.num_computed_tokens_cpu = " in inspect.getsource(InputBatch.__init__)
    assert "self.input_batch.num_computed_tokens_cpu[req_indices]" in inspect.getsource(GPUModelRunner)

    assert "sampling_params" in CachedRequestState.__dataclass_fields__
    # the context-attention span check compares the plan's prompt length with this
    assert "self.num_prompt_tokens = " in inspect.getsource(CachedRequestState)
    assert isinstance(InputBatch.req_ids, property)
    assert "num_reqs" in dir(InputBatch)
    from vllm import SamplingParams

    assert SamplingParams(extra_args={"steer": "x"}).extra_args == {"steer": "x"}


def test_step_requests_on_a_fake_runner():
    plan = SteerPlan(infosteer=InfoSteerPlan(layers=(0,), mode="scale", alpha=2.0))
    mk = lambda extra: SimpleNamespace(sampling_params=SimpleNamespace(extra_args=extra))  # noqa: E731
    fake = SimpleNamespace(
        input_batch=SimpleNamespace(num_reqs=3, req_ids=["a", "b", "c", "stale"],
                                    num_computed_tokens_cpu=np.array([0, 12, 0, 0])),
        query_start_loc=SimpleNamespace(np=np.array([0, 5, 6, 9, 9])),
        requests={"a": mk(None), "b": mk({"steer": plan.to_json()}), "c": mk({"steer": plan.to_json()}),
                  "stale": mk({"steer": plan.to_json()})},
    )
    assert runner.step_requests(fake) == [(plan, RequestRows(1, 5, 6, "b", None, 12)),
                                          (plan, RequestRows(2, 6, 9, "c", None, 0))]
    # the proxy engine's step: proxy rows by pair (alpha 0: none)
    from steerserve.patches.plan import ProxyPlan
    from steerserve.patches.steers.proxy.engine import ENGINE as PROXY

    proxy, zero = SteerPlan(proxy=ProxyPlan("task", 1.5)), SteerPlan(proxy=ProxyPlan("task", 0.0))
    fake.requests = {"a": mk({"steer": zero.to_json()}), "b": mk(None), "c": mk({"steer": proxy.to_json()})}
    step = StepHandle((PROXY,)).begin(runner.step_requests(fake), StepShape(3, 9))
    assert step.state("proxy").by_pair == {"task": [(2, 6, 9, 1.5)]}
    fake.requests = {"a": mk({"steer": zero.to_json()}), "b": mk(None), "c": mk(None)}
    assert StepHandle((PROXY,)).begin(runner.step_requests(fake), StepShape(3, 9)) is None


def test_runner_metadata_surfaces():
    """The runner's attention groups, where the step's recorded metadata is read."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.utils import AttentionGroup

    assert "self.attn_groups: list[list[AttentionGroup]]" in inspect.getsource(GPUModelRunner.__init__)
    assert "layer_names" in AttentionGroup.__dataclass_fields__
    assert hasattr(GPUModelRunner, "get_model")


def test_model_registry_surface():
    """Every listed architecture is in vLLM's registry, its class loads, and its steerable subclass
    is made from it (what `register()` registers by name)."""
    from vllm import ModelRegistry

    from steerserve.patches import models
    from steerserve.patches.adapter.registry import base_model_class
    from steerserve.patches.architectures import ARCHITECTURES

    supported = ModelRegistry.get_supported_archs()
    for name, arch in ARCHITECTURES.items():
        assert name in supported, f"vLLM no longer serves {name}"
        base = base_model_class(name)
        assert hasattr(base, "compute_logits") and hasattr(base, "load_weights")
        steerable = getattr(models, arch.steerable_name)
        assert issubclass(steerable, base) and steerable.__name__ == arch.steerable_name
        assert inspect.signature(base.__init__).parameters.get("vllm_config") is not None
    with pytest.raises(AttributeError):
        models.SteerableGPT2LMHeadModel  # noqa: B018
    from steerserve.patches import register

    register()
    assert "SteerableQwen3ForCausalLM" in ModelRegistry.get_supported_archs()  # registered by the plugin


def test_decoder_layer_surface():
    """The residual hook point: decoder layers take (positions, hidden_states, residual, **extra)
    and return the split stream (hidden_states, residual), whose halves the next layer's fused
    add-norm and the final norm add."""
    from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaModel
    from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer, Qwen2Model

    for cls in (LlamaDecoderLayer, Qwen2DecoderLayer):
        assert list(inspect.signature(cls.forward).parameters)[:4] == ["self", "positions", "hidden_states", "residual"]
        assert "return hidden_states, residual" in inspect.getsource(cls.forward)
        init = inspect.getsource(cls.__init__)
        for attr in ("self.input_layernorm", "self.post_attention_layernorm", "self.self_attn", "self.mlp"):
            assert attr in init, f"{cls.__name__} lost {attr}"
    for cls in (LlamaModel, Qwen2Model):
        src = inspect.getsource(cls.forward)
        assert "hidden_states, residual = layer(" in src and "self.norm(hidden_states, residual)" in src


def test_mlp_layout_and_layer_index():
    from vllm.model_executor.models.llama import LlamaMLP
    from vllm.model_executor.models.qwen2 import Qwen2MLP
    from vllm.model_executor.models.utils import extract_layer_index

    for cls in (LlamaMLP, Qwen2MLP):
        src = inspect.getsource(cls.__init__)
        for attr in ("self.gate_up_proj", "self.down_proj", "self.act_fn"):
            assert attr in src, f"{cls.__name__} lost {attr}"
    assert extract_layer_index("model.layers.17.mlp") == 17


def test_http_surface():
    s = adapter_server.http_surface()
    for handler in (s.stock_chat_handler, s.stock_completion_handler, s.stock_tokenize_handler,
                    s.stock_detokenize_handler):
        assert inspect.iscoroutinefunction(handler)
        assert list(inspect.signature(handler).parameters) == ["request", "raw_request"]
    for model in (*s.TokenizeRequest.__args__, s.DetokenizeRequest):  # the model name, renamed as for generation
        assert "model" in model.model_fields
    for model in (s.ChatCompletionRequest, s.CompletionRequest):
        assert {"vllm_xargs", "cache_salt"} <= set(model.model_fields)
        assert model.model_config.get("extra") == "allow"  # `steer` arrives in model_extra
    assert set(s.ErrorResponse.model_fields) == {"error"}
    assert "return_token_ids" in s.ChatCompletionRequest.model_fields
    assert "token_ids" in s.ChatCompletionResponse.model_fields["choices"].annotation.__args__[0].model_fields
    from types import SimpleNamespace

    fake = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(openai_serving_chat="handler")))
    assert s.serving_chat(fake) == "handler"
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat

    assert list(inspect.signature(OpenAIServingChat.create_chat_completion).parameters)[:3] == [
        "self", "request", "raw_request"]


def test_endpoint_plugin_and_launcher_surface():
    from vllm.entrypoints.launchers.api_server.entry import run_server
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.plugins import load_endpoint_plugins
    from vllm.plugins.endpoint_plugins.interface import EndpointPlugin
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from steerserve.server.plugin import SteerEndpointPlugin

    assert isinstance(SteerEndpointPlugin(), EndpointPlugin)
    assert inspect.iscoroutinefunction(run_server) and callable(load_endpoint_plugins)
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(
        ["--model", "/x", "--kv-cache-memory-bytes", "1024", "--hf-overrides", '{"architectures": ["A"]}',
         "--enforce-eager", "--api-key", "k", "--enable-prefix-caching", "--enable-offline-docs",
         "--enable-auto-tool-choice", "--tool-call-parser", "hermes"])
    assert args.kv_cache_memory_bytes == 1024 and args.api_key == ["k"]
    assert args.enable_offline_docs and args.enable_auto_tool_choice and args.tool_call_parser == "hermes"
    from vllm.tool_parsers import ToolParserManager  # the parser names `--tool-call-parser` documents

    assert {"hermes", "llama3_json", "mistral"} <= set(ToolParserManager.list_registered())


def test_offline_engine_shutdown_surface():
    from vllm.v1.engine.core_client import EngineCoreClient
    from vllm.v1.engine.llm_engine import LLMEngine

    assert callable(EngineCoreClient.shutdown)
    assert "self.engine_core = EngineCoreClient.make_client(" in inspect.getsource(LLMEngine.__init__)


def test_engine_client_config_fields():
    from vllm.engine.protocol import EngineClient

    assert "vllm_config" in EngineClient.__annotations__


def test_attention_surfaces():
    """The attention impls steerserve subclasses, their forward signature, the CPU cache-write op and
    the metadata fields the context-attention pass reads."""
    from vllm.model_executor.layers.attention import Attention
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl, CPUAttentionMetadata
    from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl, FlashAttentionMetadata

    for impl in (CPUAttentionBackendImpl, FlashAttentionImpl):
        params = list(inspect.signature(impl.forward).parameters)
        assert params[:8] == ["self", "layer", "query", "key", "value", "kv_cache", "attn_metadata", "output"]
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend

    for backend in (CPUAttentionBackend, FlashAttentionBackend):
        assert backend.forward_includes_kv_cache_update is False  # the step's K/V are cached before forward
    for meta in (CPUAttentionMetadata, FlashAttentionMetadata):
        assert {"seq_lens", "block_table", "query_start_loc"} <= set(meta.__dataclass_fields__)
    assert "impl" in inspect.getsource(Attention.__init__) and "layer_name" in inspect.getsource(Attention.__init__)
    # vLLM 0.32's FlashAttention cache: logically [blocks, kv_heads, block_size, 2 * head_dim]
    assert "kv_cache.transpose(1, 2).split(self.head_size, dim=-1)" in inspect.getsource(FlashAttentionImpl.forward)
    from vllm import _custom_ops as ops

    assert list(inspect.signature(ops.cpu_attn_reshape_and_cache).parameters)[:6] == [
        "key", "value", "key_cache", "value_cache", "slot_mapping", "isa"]
    from steerserve.patches.adapter.attention import _steerable_impl_class

    cls = _steerable_impl_class(CPUAttentionBackendImpl)
    obj = object.__new__(CPUAttentionBackendImpl)
    obj.__class__ = cls  # the in-place swap works on the real class (no layout change)
    assert isinstance(obj, CPUAttentionBackendImpl)


def test_render_surfaces():
    """The serving objects' render methods the span resolution hooks, and the engine input keys."""
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
    from vllm.inputs.engine import TokensInput
    from vllm.renderers.online_renderer import OnlineRenderer

    assert list(inspect.signature(OpenAIServingChat.render_chat_request).parameters) == ["self", "request"]
    assert list(inspect.signature(OpenAIServingCompletion.render_completion_request).parameters) == ["self", "request"]
    assert "render_chat_request(request)" in inspect.getsource(OpenAIServingChat._create_chat_completion)
    src = inspect.getsource(OpenAIServingChat._create_chat_completion)
    assert src.index("render_chat_request(request)") < src.index("to_sampling_params(")  # spans land in time
    assert inspect.iscoroutinefunction(OnlineRenderer.render_chat)
    assert {"prompt_token_ids", "prompt"} <= set(TokensInput.__annotations__)

    calls = []

    class FakeServing:
        async def render_chat_request(self, request):
            return ("conv", [request])

        async def render_completion_request(self, request):
            return [request]

    async def hook(kind, serving, request, result):
        calls.append(kind)
        return result

    import asyncio

    state = SimpleNamespace(openai_serving_chat=FakeServing(), openai_serving_completion=FakeServing())
    adapter_server.intercept_renders(state, hook)
    adapter_server.intercept_renders(state, hook)  # idempotent
    assert asyncio.run(state.openai_serving_chat.render_chat_request("r")) == ("conv", ["r"])
    assert asyncio.run(state.openai_serving_completion.render_completion_request("r")) == ["r"]
    assert calls == ["chat", "completions"]


def test_proxy_surfaces_and_metadata_subset():
    """The surfaces proxy tuning uses, and `subset_common_metadata` on a synthetic batch."""
    import dataclasses

    import torch
    import vllm.compilation.decorators as decorators
    from vllm.forward_context import ForwardContext
    from vllm.model_executor.models.llama import LlamaForCausalLM, LlamaModel
    from vllm.v1.attention.backend import CommonAttentionMetadata
    from vllm.v1.worker.utils import AttentionGroup

    assert list(inspect.signature(inspect.unwrap(AttentionGroup.build_metadata)).parameters)[:3] == [
        "self", "common_attn_metadata", "ubatch_idx"]
    assert {"attn_metadata", "slot_mapping", "cudagraph_runtime_mode", "batch_descriptor"} <= {
        f.name for f in dataclasses.fields(ForwardContext)}
    assert list(inspect.signature(LlamaModel.forward).parameters)[:4] == [
        "self", "input_ids", "positions", "intermediate_tensors"]
    src = inspect.getsource(decorators)
    assert "self.do_not_compile" in src and "if self.do_not_compile" in src
    # compiled sub-models: vLLM's rule for which modes compile, the model tag, the AOT cache key
    assert "in [CompilationMode.NONE, CompilationMode.STOCK_TORCH_COMPILE]" in src
    from vllm.compilation.backends import set_model_tag  # noqa: F401
    from vllm.config import ModelConfig

    assert "model" in {f.name for f in dataclasses.fields(ModelConfig)}, "the compile cache key's model path"
    assert "vllm_config.compute_hash()" in inspect.getsource(decorators) + inspect.getsource(
        __import__("vllm.compilation.caching", fromlist=["x"]))
    assert hasattr(LlamaForCausalLM, "compute_logits") and hasattr(LlamaForCausalLM, "load_weights")
    known = (set(metadata._CM_PER_REQUEST) | set(metadata._CM_PER_TOKEN) | set(metadata._CM_DROPPED)
             | set(metadata._CM_REBUILT))
    assert {f.name for f in dataclasses.fields(CommonAttentionMetadata)} <= known, "new metadata fields: cut them"

    qsl = torch.tensor([0, 4, 5, 9, 10], dtype=torch.int32)  # 4 requests: 4, 1, 4, 1 tokens
    cm = CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=torch.tensor([4, 7, 4, 9], dtype=torch.int32),
        num_reqs=4, num_actual_tokens=10, max_query_len=4, max_seq_len=9,
        block_table_tensor=torch.arange(8, dtype=torch.int32).reshape(4, 2), slot_mapping=torch.arange(100, 110),
        positions=torch.tensor([0, 1, 2, 3, 6, 0, 1, 2, 3, 8]), seq_lens_cpu_upper_bound=torch.tensor([4, 7, 4, 9]),
        is_prefilling=torch.tensor([True, False, True, False]))
    sub, tokens = metadata.subset_common_metadata(cm, [1, 2])
    assert tokens.tolist() == [4, 5, 6, 7, 8]
    assert sub.query_start_loc_cpu.tolist() == [0, 1, 5] and sub.num_reqs == 2 and sub.num_actual_tokens == 5
    assert sub.seq_lens.tolist() == [7, 4] and sub.max_seq_len == 7 and sub.max_query_len == 4
    assert sub.block_table_tensor.tolist() == [[2, 3], [4, 5]]
    assert sub.slot_mapping.tolist() == [104, 105, 106, 107, 108]
    assert sub.positions.tolist() == [6, 0, 1, 2, 3] and sub.is_prefilling.tolist() == [False, True]


def test_parallel_and_fault_surfaces():
    import dataclasses
    import inspect

    from vllm.distributed import (  # noqa: F401 - the names the adapter imports
        get_pp_group, get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size,
        tensor_model_parallel_all_gather,
    )
    from vllm.v1.engine.core_client import BackgroundResources
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    # no parallel state in this process: one rank
    assert parallel.tensor_parallel() == (0, 1)
    # the later pipeline stage's buffer, its assertion and who creates it
    assert "self.intermediate_tensors is not None" in inspect.getsource(GPUModelRunner.sync_and_gather_intermediate_tensors)
    assert "make_empty_intermediate_tensors" in inspect.getsource(GPUModelRunner._dummy_run)
    runner.install_cpu_pipeline_fix()
    runner.install_cpu_pipeline_fix()  # idempotent
    wrapped = CPUModelRunner.initialize_kv_cache
    assert getattr(wrapped, WRAPPED_MARK) and not getattr(wrapped.__wrapped__, WRAPPED_MARK, False)
    # the engine-death flag read by `serve` after vLLM's server stopped
    assert "engine_dead" in {f.name for f in dataclasses.fields(BackgroundResources)}

    class Client:
        class engine_core:
            resources = BackgroundResources(ctx=None)

    assert not adapter_server.engine_dead(Client())
    Client.engine_core.resources.engine_dead = True
    assert adapter_server.engine_dead(Client()) and not adapter_server.engine_dead(object())


def test_engine_refuses_unsigned_plans_on_a_fake_runner(monkeypatch, caplog):
    """A plan without this server's signature (vllm_xargs through vLLM's other routes) runs
    unsteered and is logged once; it never reaches a forward pass."""
    from steerserve.patches import plan as plan_mod
    monkeypatch.setenv(plan_mod.PLAN_KEY_ENV, "secret")
    plan = SteerPlan(infosteer=InfoSteerPlan(layers=(0,), mode="scale", alpha=2.0))
    extras = [plan_mod.engine_args(plan), {"steer": plan.to_json()}, {"steer": "garbage"}]
    fake = SimpleNamespace(
        input_batch=SimpleNamespace(num_reqs=3, req_ids=["signed", "unsigned", "garbage"],
                                    num_computed_tokens_cpu=np.zeros(3, dtype=np.int64)),
        query_start_loc=SimpleNamespace(np=np.array([0, 2, 4, 6])),
        requests={rid: SimpleNamespace(sampling_params=SimpleNamespace(extra_args=extra))
                  for rid, extra in zip(["signed", "unsigned", "garbage"], extras)},
    )
    handle = SimpleNamespace(refused=set())
    with caplog.at_level("ERROR", logger="steerserve"):
        found = runner.step_requests(fake, handle)
        runner.step_requests(fake, handle)
    assert [p for p, _ in found] == [plan]
    refusals = [r for r in caplog.records if "running it unsteered" in r.getMessage()]
    assert len(refusals) == 2


def test_http_server_surfaces():
    """uvicorn: `Config.load` picks `http_protocol_class`; both protocol implementations have the
    hooks the header timeout uses; a wrapped class keeps working (a real socket: headers never
    completed -> closed; completed -> answered)."""
    import asyncio
    import inspect

    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    assert "http_protocol_class" in inspect.getsource(uvicorn.Config.load)
    for cls in (H11Protocol, HttpToolsProtocol):
        for name in ("connection_made", "on_response_complete", "connection_lost"):
            assert callable(getattr(cls, name)), (cls, name)
        assert "self.cycle" in inspect.getsource(cls) and "self.loop" in inspect.getsource(cls.__init__)

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def scenario(protocol):
        import socket

        config = uvicorn.Config(app, http=protocol, log_level="warning", lifespan="off")
        config.load()
        config.http_protocol_class = adapter_server.with_header_timeout(config.http_protocol_class, 0.5)
        server = uvicorn.Server(config)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            await asyncio.sleep(0.05)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")  # headers never completed
        await writer.drain()
        closed = await asyncio.wait_for(reader.read(), 5)  # EOF once the server closes it
        reader2, writer2 = await asyncio.open_connection("127.0.0.1", port)
        writer2.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader2.read(), 5)
        server.should_exit = True
        await task
        return closed, answer

    for protocol in ("h11", "httptools"):
        closed, answer = asyncio.run(scenario(protocol))
        assert closed == b"" and answer.startswith(b"HTTP/1.1 200"), (protocol, closed, answer)


def test_prefix_cache_hash_surfaces():
    """The block hasher looks `generate_block_hash_extra_keys` up by name at call time (so the
    wrapper is seen), with the signature the wrapper forwards, and requests keep their sampling
    params in the engine core."""
    import inspect

    from vllm.v1.core import block_pool, kv_cache_utils
    from vllm.v1.request import Request

    hasher = kv_cache_utils.get_request_block_hasher(16, lambda x: b"")
    inner = hasher.__code__
    assert "generate_block_hash_extra_keys" in inner.co_names
    block_hash.install_prefix_cache_keys()
    wrapped = kv_cache_utils.generate_block_hash_extra_keys
    assert getattr(wrapped, "_steerserve_wrapped", False) and block_pool.generate_block_hash_extra_keys is wrapped
    block_hash.install_prefix_cache_keys()  # idempotent
    assert kv_cache_utils.generate_block_hash_extra_keys is wrapped
    original = inspect.signature(inspect.unwrap(wrapped))
    assert list(inspect.signature(wrapped).parameters) == list(original.parameters)
    assert "sampling_params" in inspect.signature(Request.__init__).parameters


def test_route_enumeration_and_the_vllm_streaming_echo_bug_code(monkeypatch):
    """`served_routes` sees vLLM's routes and ours; the code of the bug `refused_by_vllm_bug`
    works around is still there (when this fails, check whether vLLM fixed it and drop the refusal)."""
    import inspect
    from types import SimpleNamespace

    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion

    from steerserve.server.model_store import ensure_embedded_model

    monkeypatch.setenv("VLLM_PLUGINS", "steerserve,steerserve_api")  # as `serve` sets it (cli.enable_plugins)
    routes = adapter_server.served_routes(["--model", str(ensure_embedded_model())])
    paths = {p for _, p in routes}
    assert {"/invocations", "/tokenize", "/v1/chat/completions", "/v1/ab/feedback", "/health", "/metrics"} <= paths
    source = inspect.getsource(OpenAIServingCompletion._create_completion_logprobs)
    assert "step_top_logprobs[token_id]" in source
    bug = SimpleNamespace(stream=True, echo=True, logprobs=1, n=4)
    assert adapter_server.refused_by_vllm_bug(bug)[0] == "n"
    for ok in (dict(n=1), dict(stream=False), dict(echo=False), dict(logprobs=None)):
        assert adapter_server.refused_by_vllm_bug(SimpleNamespace(**{**vars(bug), **ok})) is None


def test_cpu_lora_ops_and_their_fix():
    """vLLM 0.32's pure-torch LoRA ops (the CPU build's) apply the last slot's adapter to rows with
    index -1 (no adapter); the wrapped ops leave those rows as they were. When this fails on the
    stock ops, vLLM fixed it: drop `adapter/lora_cpu.py`."""
    import importlib

    from steerserve.patches.adapter import lora_cpu

    lora_cpu.install_cpu_lora_fix()
    ops = importlib.import_module("vllm.lora.ops.torch_ops.lora_ops")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, generator=g)
    a = torch.randn(2, 1, 4, 8, generator=g)  # [slots, 1, rank, in]
    b = torch.randn(2, 1, 6, 4, generator=g)  # [slots, 1, out, rank]
    idx = torch.tensor([0, -1, 1])
    for op, weights, out_cols, extra in (("bgmv_shrink", a, 4, (1.0,)), ("bgmv_expand", b, 6, (True,)),
                                         ("bgmv_expand_slice", b, 6, (0, 6, True))):
        fixed = getattr(ops, op)
        assert getattr(fixed, "stock", None) is not None, f"{op} is not wrapped"
        for name in lora_cpu.MODULES:
            assert getattr(importlib.import_module(name), op) is fixed, f"{name}.{op} is not the fixed op"
        inputs = x if op == "bgmv_shrink" else x[:, :4]
        stock_out, fixed_out = torch.zeros(3, out_cols), torch.zeros(3, out_cols)
        fixed.stock(inputs, weights, stock_out, idx, *extra)
        fixed(inputs, weights, fixed_out, idx, *extra)
        assert stock_out[1].abs().sum() > 0, f"stock {op} no longer applies the last slot to index -1: vLLM fixed it"
        assert torch.equal(fixed_out[1], torch.zeros(out_cols))  # the row without an adapter is untouched
        assert torch.equal(fixed_out[[0, 2]], stock_out[[0, 2]])  # the others as the stock op computes them
    sgmv = importlib.import_module("vllm.lora.ops.torch_ops.lora_ops").sgmv_shrink  # finds bgmv_shrink by name
    out = torch.zeros(3, 4)
    sgmv(x, a, out, None, torch.tensor([1, 2]), torch.tensor([0, -1]), 2, 2, 3, 1.0)
    assert torch.equal(out[1:], torch.zeros(2, 4)) and out[0].abs().sum() > 0
