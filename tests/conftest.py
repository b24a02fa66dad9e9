import contextlib
import gc
import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import build_tiny, tiny_vectors  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny("llama", tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    return build_tiny("qwen2", tmp_path_factory.mktemp("tiny") / "qwen2")


@contextlib.contextmanager
def apply_model_allowed():
    """`LLM.apply_model` ships a function to the worker: allow vLLM's pickle fallback for engines
    started inside this block (the variable is restored after)."""
    key = "VLLM_ALLOW_INSECURE_SERIALIZATION"
    previous = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = previous


def model_info(model_dir: Path):
    from steerserve.server.schema import ModelInfo

    return ModelInfo.from_checkpoint(model_dir)


def make_engine(model_dir: Path, **kw):
    """A steerable vLLM engine on a local checkpoint (fp32, eager unless told otherwise), serving
    the checkpoint's test steering vectors when it has them (tiny_models.write_test_vectors)."""
    from vllm import LLM

    from steerserve.patches import STEERABLE_ARCHITECTURES

    arch = json.loads((model_dir / "config.json").read_text())["architectures"][0]
    args = dict(
        model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=512, seed=0,
        kv_cache_memory_bytes=1 << 28, enable_prefix_caching=True,
        hf_overrides={"architectures": [STEERABLE_ARCHITECTURES[arch]]},
    )
    args.update(kw)
    vectors = tiny_vectors(model_dir)
    if vectors:
        from steerserve.patches.steers.base import SETTINGS_KEY
        from steerserve.patches.steers.vectors import VECTORS_SETTING

        config = dict(args.get("additional_config") or {})
        settings = dict(config.get(SETTINGS_KEY) or {})
        settings.setdefault(VECTORS_SETTING, [{"name": k, "path": v} for k, v in vectors.items()])
        args["additional_config"] = {**config, SETTINGS_KEY: settings}
    return LLM(**args)


def close_engine(llm) -> None:
    from steerserve.patches.adapter.runner import shutdown_engine

    shutdown_engine(llm)
    del llm
    gc.collect()
