"""Tiny random Llama and Qwen2 checkpoints for fast engine tests, built in a temp dir.

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


def build_tiny(arch: str, out: Path, dtype: str = "float32", seed: int = 0, num_layers: int | None = None,
               vocab_pad: int = 0) -> Path:
    """Write a tiny random `arch` ("llama" or "qwen2") checkpoint with the embedded tokenizer
    (`vocab_pad`: that many unused rows after the tokenizer's vocabulary, as padded vocabularies have)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    src = ensure_embedded_model()
    tok = AutoTokenizer.from_pretrained(src)
    common = dict(TINY, vocab_size=len(tok) + vocab_pad, bos_token_id=1, eos_token_id=2, pad_token_id=2, dtype=dtype)
    if num_layers is not None:
        common["num_hidden_layers"] = num_layers
    if arch == "llama":
        config, cls = LlamaConfig(**common), LlamaForCausalLM
    elif arch == "qwen2":
        config, cls = Qwen2Config(**common), Qwen2ForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(config)
    # larger-than-default weights so that steering visibly moves the logits of a tiny model
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.to(getattr(torch, dtype)).save_pretrained(out)
    tok.save_pretrained(out)
    return out
