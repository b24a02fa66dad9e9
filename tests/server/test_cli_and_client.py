"""`steerserve serve` argument translation and the typed `Steer` builder."""

import argparse
import json

import pydantic
import pytest

from steerserve.clients import Steer
from steerserve.server import cli


def _args(*argv):
    p = argparse.ArgumentParser()
    cli.add_serve_args(p)
    return p.parse_args(list(argv))


def _model(tmp_path, arch):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": [arch]}))
    return tmp_path


def test_defaults_serve_loopback_eager_without_auth(tmp_path, monkeypatch):
    monkeypatch.delenv("STEERSERVE_API_KEY", raising=False)
    args = _args()
    argv = cli.vllm_argv(args, _model(tmp_path, "LlamaForCausalLM"))
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "8000"
    assert "--api-key" not in argv and "--enforce-eager" in argv and "--enable-prefix-caching" in argv
    assert json.loads(argv[argv.index("--hf-overrides") + 1]) == {"architectures": ["SteerableLlamaForCausalLM"]}
    assert argv[argv.index("--dtype") + 1] == "float32"  # no --model: the embedded model's default
    assert "--enable-offline-docs" in argv and "--enable-auto-tool-choice" not in argv
    own = cli.vllm_argv(_args("--model", str(tmp_path)), _model(tmp_path, "LlamaForCausalLM"))
    assert own[own.index("--dtype") + 1] == "auto"  # another checkpoint: its own dtype
    faster = cli.vllm_argv(_args("--dtype", "bfloat16"), _model(tmp_path, "LlamaForCausalLM"))
    assert faster[faster.index("--dtype") + 1] == "bfloat16"


def test_tool_call_parser_turns_on_tool_calling(tmp_path):
    argv = cli.vllm_argv(_args("--tool-call-parser", "hermes"), _model(tmp_path, "Qwen2ForCausalLM"))
    assert "--enable-auto-tool-choice" in argv and argv[argv.index("--tool-call-parser") + 1] == "hermes"


def test_flags_map_to_vllm(tmp_path):
    args = _args("--api-key", "k", "--compile", "--kv-cache-gb", "0.5", "--max-model-len", "1024",
                 "--served-model-name", "m", "--vllm-arg=--max-num-batched-tokens=512", "-tp", "2",
                 "--pipeline-parallel-size", "3", "--distributed-executor-backend", "ray")
    argv = cli.vllm_argv(args, _model(tmp_path, "Qwen2ForCausalLM"))
    # the key travels in the environment (STEERSERVE_API_KEY, read by server/auth.py), never in an argument list
    assert "--api-key" not in argv and "k" not in argv and "--enforce-eager" not in argv
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
    assert argv[argv.index("--pipeline-parallel-size") + 1] == "3"
    assert argv[argv.index("--distributed-executor-backend") + 1] == "ray"
    assert "-cc.cudagraph_mode=NONE" in argv
    assert argv[argv.index("--kv-cache-memory-bytes") + 1] == str(1 << 29)
    assert "SteerableQwen2ForCausalLM" in argv[argv.index("--hf-overrides") + 1]
    assert argv[-1] == "--max-num-batched-tokens=512"


def test_max_model_len_defaults_to_the_models_limit(tmp_path):
    """A model whose own limit is below 4096 (max_position_embeddings) is not refused at start-up."""
    argv = cli.vllm_argv(_args(), _model(tmp_path, "LlamaForCausalLM"))
    assert argv[argv.index("--max-model-len") + 1] == "4096"
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen3ForCausalLM"], "num_hidden_layers": 2,
                                                      "max_position_embeddings": 2048}))
    argv = cli.vllm_argv(_args(), tmp_path)
    assert argv[argv.index("--max-model-len") + 1] == "2048"
    assert "SteerableQwen3ForCausalLM" in argv[argv.index("--hf-overrides") + 1]  # steered by structure
    argv = cli.vllm_argv(_args("--max-model-len", "1024"), tmp_path)
    assert argv[argv.index("--max-model-len") + 1] == "1024"


def test_kv_cache_zero_leaves_it_to_vllm(tmp_path):
    argv = cli.vllm_argv(_args("--kv-cache-gb", "0"), _model(tmp_path, "LlamaForCausalLM"))
    assert "--kv-cache-memory-bytes" not in argv


def test_unsupported_architecture_served_plain(tmp_path):
    assert "--hf-overrides" not in cli.vllm_argv(_args(), _model(tmp_path, "GPT2LMHeadModel"))


def test_plugin_allowlist_keeps_user_plugins(monkeypatch):
    monkeypatch.setenv("VLLM_PLUGINS", "theirs")
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    cli.enable_plugins()
    import os

    assert os.environ["VLLM_PLUGINS"] == "theirs,steerserve,steerserve_api"
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"


def test_steer_builder():
    s = Steer().infosteer(alpha=1.5, layers=[1, 2], mode="topk", k=8)
    assert s.extra_body(user="u") == {
        "steer": {"infosteer": {"layers": [1, 2], "mode": "topk", "alpha": 1.5, "k": 8}}, "user": "u"}
    assert Steer().to_dict() == {}
    with pytest.raises(pydantic.ValidationError):
        Steer().infosteer(alpha=50)


def test_steer_builder_context_attention_round_trips_through_the_server_schema():
    from steerserve.clients import Steer
    from steerserve.server.schema import ModelInfo, normalise

    info = ModelInfo("SteerableLlamaForCausalLM", 30, 1536, True, num_heads=9, attention_steerable=True)
    steer = Steer().infosteer(alpha=1.5, layers=[1]).context_attention(alpha=0.5, heads=[(1, 2), (3, 0)],
                                                                         emphasis="last_user")
    body = steer.extra_body()["steer"]
    assert body["context_attention"] == {"alpha": 0.5, "layers": "all", "heads": [[1, 2], [3, 0]],
                                         "emphasis": "last_user"}
    plan = normalise(body, info)
    assert plan.context_attention.heads == ((1, (2,)), (3, (0,))) and plan.infosteer.alpha == 1.5
    assert Steer().context_attention().to_dict() == {"context_attention": {"layers": "all"}}  # server defaults
    assert Steer().profile("strong").to_dict() == {"profile": "strong"}
    import pydantic
    import pytest

    with pytest.raises(pydantic.ValidationError):
        Steer().context_attention(alpha=2.0)


def test_chat_context_attention_flags():
    import argparse

    from steerserve.clients.chat import add_chat_args, steer_from_args

    p = argparse.ArgumentParser()
    add_chat_args(p)
    assert steer_from_args(p.parse_args(["hi"])) is None
    s = steer_from_args(p.parse_args(["hi", "--context-alpha", "0.5", "--context-heads", "12:0,14:3",
                                      "--emphasis", "last_user", "--infosteer-alpha", "1.2"])).to_dict()
    assert s["context_attention"] == {"alpha": 0.5, "layers": "all", "heads": [[12, 0], [14, 3]],
                                      "emphasis": "last_user"}
    assert s["infosteer"]["alpha"] == 1.2
    assert steer_from_args(p.parse_args(["hi", "--context-attention"])).to_dict() == {
        "context_attention": {"layers": "all"}}
    assert steer_from_args(p.parse_args(["hi", "--context-heads", "default"])).to_dict()[
        "context_attention"]["heads"] == "default"


def test_chat_steer_flag_covers_every_registered_steer():
    """`--steer JSON` sets any steer of the registry (validated with its Spec); its help lists them."""
    import argparse

    import pydantic
    import pytest

    from steerserve.clients.chat import add_chat_args, steer_from_args
    from steerserve.patches.steers import STEERS

    p = argparse.ArgumentParser()
    add_chat_args(p)
    body = {"mixing": "taia", "proxy": {"alpha": 0.5}, "context_indicator": True, "profile": "concise"}
    s = steer_from_args(p.parse_args(["hi", "--steer", json.dumps(body), "--infosteer-alpha", "1.5"])).to_dict()
    assert s == {**body, "infosteer": {"alpha": 1.5, "mode": "scale", "layers": "all"}}
    help_text = p.format_help()
    assert all(steer.name in help_text for steer in STEERS)
    with pytest.raises(pydantic.ValidationError):
        steer_from_args(p.parse_args(["hi", "--steer", '{"proxy": {"alpha": 99}}']))
    with pytest.raises(ValueError, match="unknown steer"):
        steer_from_args(p.parse_args(["hi", "--steer", '{"ghosts": {}}']))
    s = steer_from_args(p.parse_args(["hi", "--vector", "joy:0.8", "--vector", "calm:-1.5:1,2:generated"])).to_dict()
    assert s == {"vectors": [{"name": "joy", "scale": 0.8, "layers": "all", "positions": "all"},
                             {"name": "calm", "scale": -1.5, "layers": [1, 2], "positions": "generated"}]}
    for bad in ("joy", "joy:x", "joy:1:all:later", ":1"):
        with pytest.raises((ValueError, pydantic.ValidationError)):
            steer_from_args(p.parse_args(["hi", "--vector", bad]))


def _checkpoint(folder, heads=4, kv=2, width=256, layers=4):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "num_attention_heads": heads, "num_key_value_heads": kv,
        "intermediate_size": width, "num_hidden_layers": layers}))
    return folder


def test_parallel_layouts_checked_before_start(tmp_path):
    base = _checkpoint(tmp_path / "base")
    cli.check_parallel(2, 2, base, {})  # 4 heads, 2 KV heads, width 256, 4 layers: fine
    cli.check_parallel(4, 1, base, {})  # 2 KV heads replicated over 4 ranks: vLLM's rule allows it
    with pytest.raises(SystemExit, match=r"--tensor-parallel-size 3: the model .* 4 attention heads, 2 KV heads"):
        cli.check_parallel(3, 1, base, {})
    odd = _checkpoint(tmp_path / "odd", width=250)
    with pytest.raises(SystemExit, match="FFN width 250: not divisible by 4"):
        cli.check_parallel(4, 1, odd, {})
    with pytest.raises(SystemExit, match="only 4 layers"):
        cli.check_parallel(1, 5, base, {})
    expert = _checkpoint(tmp_path / "expert", width=100)
    pair = {"p": {"expert": str(expert), "anti_expert": str(base)}}
    cli.check_parallel(2, 1, base, pair)
    with pytest.raises(SystemExit, match=r"proxy pair 'p' expert .* FFN width 100: not divisible by 8"):
        cli.check_parallel(8, 1, _checkpoint(tmp_path / "wide", heads=8, kv=8, width=512), pair)
    with pytest.raises(SystemExit, match="not supported with pipeline parallelism"):
        cli.check_parallel(1, 2, base, pair)
    with pytest.raises(SystemExit, match=">= 1"):
        cli.check_parallel(0, 1, base, {})


def test_cpu_ranks_get_their_share_of_cores():
    assert cli.cpu_thread_binding(2, [0, 1]) == "0|1"
    assert cli.cpu_thread_binding(2, [0, 1, 2, 3, 4, 5]) == "0-2|3-5"
    assert cli.cpu_thread_binding(2, [0, 2, 4, 6, 7]) == "0,2|4,6"
    assert cli.cpu_thread_binding(1, [3]) == "3"
    assert cli.cpu_thread_binding(4, [0, 1]) is None
