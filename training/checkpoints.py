"""What the trainer writes next to every checkpoint, and how the server checks it against its base.

Every output folder (fine-tuned model, LoRA adapter, TAIA export) carries `steerserve.json`:

    {"format": 1, "kind": "full" | "lora" | "taia-full" | "taia-lora",
     "base": {"path": "...", "digest": "..."}, "training": {...},
     "context_indicator": null | "<text appended to user turns>",
     "components": {"attention": "tuned", "ffn": "tuned" | "base"}}

`base.digest` identifies the base model by content, not by path: the architecture's shape fields,
the tokenizer's vocabulary and a slice of the input embeddings (rounded to bfloat16, so an fp32 and
a bf16 copy of the same weights agree). The server refuses a variant whose digest differs from the
model it serves.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

METADATA_FILE = "steerserve.json"
FORMAT = 1
KINDS = ("full", "lora", "taia-full", "taia-lora", "derived")
_SHAPE_KEYS = ("architectures", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "vocab_size", "head_dim", "tie_word_embeddings")
_EMBED_NAMES = ("model.embed_tokens.weight", "embed_tokens.weight", "transformer.wte.weight")


class CheckpointError(ValueError):
    pass


def _embedding_slice(folder: Path):
    import torch
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors weights")
    for f in files:
        with safe_open(f, framework="pt") as fh:
            for name in _EMBED_NAMES:
                if name in fh.keys():
                    sl = fh.get_slice(name)[:64]
                    return sl.to(torch.float32).to(torch.bfloat16).to(torch.float32)
    raise CheckpointError(f"{folder}: no input embedding tensor found ({', '.join(_EMBED_NAMES)})")


def base_digest(folder: str | Path) -> str:
    """Content digest of a full checkpoint folder (see module docstring)."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    shape = {k: config.get(k) for k in _SHAPE_KEYS}
    h = hashlib.sha256(json.dumps(shape, sort_keys=True).encode())
    tok = folder / "tokenizer.json"
    if tok.exists():
        vocab = json.loads(tok.read_text()).get("model", {}).get("vocab")
        h.update(json.dumps(vocab, sort_keys=True).encode())
    h.update(_embedding_slice(folder).numpy().tobytes())
    return h.hexdigest()[:20]


def write_metadata(folder: str | Path, kind: str, base: str | Path, base_digest_value: str, **fields) -> dict:
    if kind not in KINDS:
        raise ValueError(kind)
    meta = {"format": FORMAT, "kind": kind, "base": {"path": str(base), "digest": base_digest_value},
            "context_indicator": None, **fields}
    Path(folder, METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def read_metadata(folder: str | Path) -> dict | None:
    path = Path(folder, METADATA_FILE)
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not JSON ({err.msg})") from None
    if meta.get("format") != FORMAT or meta.get("kind") not in KINDS:
        raise CheckpointError(f"{path}: unknown steerserve metadata (format {meta.get('format')!r}, "
                              f"kind {meta.get('kind')!r})")
    return meta


def is_lora_adapter(folder: str | Path) -> bool:
    return Path(folder, "adapter_config.json").exists()


def is_full_checkpoint(folder: str | Path) -> bool:
    return Path(folder, "config.json").exists() and any(Path(folder).glob("*.safetensors"))
