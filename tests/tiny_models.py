"""Tiny random checkpoints (Llama, Qwen2 and the other architectures steerserve steers) for fast
engine tests, built in a temp dir.

They reuse the embedded model's tokenizer (so chat templates and vocab are real) with random
weights of a few MB; built with transformers, loaded by vLLM like any checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from steerserve.server.model_store import ensure_embedded_model

TINY = dict(
    hidden_size=256,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)


# per architecture: (transformers config class, model class, config fields beyond TINY)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 64, "use_sliding_window": False}),
    # no sliding window (as Mistral v0.2+): context attention is refused on checkpoints that set one
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None, "head_dim": 64}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"sliding_window": None}),
    # every multiplier away from 1, so that each is exercised
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"embedding_multiplier": 2.0, "residual_multiplier": 0.5,
                                                        "attention_multiplier": 0.1, "logits_scaling": 2.0}),
    # attention soft-capping off: vLLM's CPU build computes it within ~3e-3 of Hugging Face's, unsteered,
    # which would hide steering errors of that size (final logit soft-capping stays on)
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 64, "query_pre_attn_scalar": 64,
                                                      "attn_logit_softcapping": None}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 64, "query_pre_attn_scalar": 64}),
}


def build_tiny(arch: str, out: Path, dtype: str = "float32", seed: int = 0, num_layers: int | None = None,
               vocab_pad: int = 0) -> Path:
    """Write a tiny random checkpoint of `arch` (a key of ARCHS) with the embedded tokenizer
    (`vocab_pad`: that many unused rows after the tokenizer's vocabulary, as padded vocabularies have)."""
    import transformers
    from transformers import AutoTokenizer

    src = ensure_embedded_model()
    tok = AutoTokenizer.from_pretrained(src)
    common = dict(TINY, vocab_size=len(tok) + vocab_pad, bos_token_id=1, eos_token_id=2, pad_token_id=2, dtype=dtype)
    if num_layers is not None:
        common["num_hidden_layers"] = num_layers
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; known: {', '.join(ARCHS)}")
    config_name, model_name, extra = ARCHS[arch]
    config = getattr(transformers, config_name)(**{**common, **extra})
    cls = getattr(transformers, model_name)
    torch.manual_seed(seed)
    model = cls(config)
    # larger-than-default weights so that steering visibly moves the logits of a tiny model
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.to(getattr(torch, dtype)).save_pretrained(out)
    tok.save_pretrained(out)
    write_test_vectors(out, config.hidden_size, config.num_hidden_layers)
    return out


VECTORS_DIR = "steer-vectors"  # beside a tiny checkpoint: its test steering vectors


def write_test_vectors(model_dir: Path, hidden: int, num_layers: int) -> dict[str, str]:
    """Two random steering vectors for a tiny model, in `model_dir/steer-vectors/`: `joy` on every
    layer but 0 (GGUF, as repeng and llama.cpp write them, norm 3) and `calm` on layers 1-2
    (steerserve's safetensors, norm 5)."""
    import numpy as np

    from steerserve.patches.steers.vectors import files

    folder = Path(model_dir) / VECTORS_DIR
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(3)

    def direction(norm):
        d = rng.standard_normal(hidden).astype(np.float32)
        return d / np.linalg.norm(d) * norm

    files.write_gguf(folder / "joy.gguf", {i: direction(3.0) for i in range(1, num_layers)}, "llama")
    files.write_safetensors(folder / "calm.safetensors", {i: direction(5.0) for i in (1, 2) if i < num_layers},
                            {"base_model": "tiny", "method": "random"})
    return tiny_vectors(model_dir)


def tiny_vectors(model_dir: Path) -> dict[str, str]:
    """{name: file} of a tiny checkpoint's test vectors ({} when it has none)."""
    folder = Path(model_dir) / VECTORS_DIR
    return {f.name.split(".")[0]: str(f) for f in sorted(folder.glob("*")) if f.is_file()} if folder.is_dir() else {}
