"""Steerable Qwen2 in a real vLLM engine (eager, float32)."""

import pytest
import torch
from conftest import close_engine, make_engine, model_info
from engine_checks import check_mixed_batch_bit_identical, check_reference_parity

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def llm(tiny_qwen2):
    engine = make_engine(tiny_qwen2)
    yield engine
    close_engine(engine)


def test_mixed_batch_unsteered_rows_bit_identical(llm, tiny_qwen2):
    check_mixed_batch_bit_identical(llm, model_info(tiny_qwen2))


def test_logprobs_match_hf_reference(llm, tiny_qwen2):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32, attn_implementation="eager").eval()
    check_reference_parity(llm, hf, model_info(tiny_qwen2))
