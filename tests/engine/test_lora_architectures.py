"""TAIA with LoRA variants on Qwen2 (its own engine): vLLM's multi-LoRA serves a random LoRA adapter
on every linear projection of a tiny random checkpoint and its TAIA export (`steerserve train
export-taia`: the attention modules' LoRA only), per request, next to plain rows in one batch
(float32, eager); each row equals the Hugging Face model with that adapter merged
(`engine_checks.check_lora_rows`).

The other architectures of the matrix run the same check in their own engines: Qwen3, Mistral,
Phi-3, Granite, Gemma 2 and Gemma 3 in `test_architectures.py` (whose steerable engines serve LoRA),
Llama in `tests/mixing/test_family_e2e.py` (a LoRA family over HTTP: the tuned and TAIA mixes'
greedy tokens equal the merged adapters', a plain request beside adapter requests equals the base).
Together they fill the matrix's "TAIA, LoRA variants" column (docs/architectures.md, generated from
`patches/architectures.py`: LORA_TESTED)."""

from __future__ import annotations

import pytest
from conftest import close_engine, make_engine
from engine_checks import LORA_ENGINE, check_lora_rows
from tiny_models import build_tiny

from steerserve.patches.architectures import LORA_TESTED

pytestmark = pytest.mark.engine


def test_lora_and_its_taia_export_per_request_qwen2(tmp_path):
    assert "Qwen2ForCausalLM" in LORA_TESTED  # the matrix says what this test shows
    base = build_tiny("qwen2", tmp_path / "qwen2")
    llm = make_engine(base, max_num_batched_tokens=64, max_model_len=256, **LORA_ENGINE)
    try:
        check_lora_rows(llm, base, tmp_path, "qwen2")
    finally:
        close_engine(llm)
