"""Steerable Qwen2 in a real vLLM engine (eager, float32). The engine also holds a fully fine-tuned
variant (Qwen2's q/k/v biases are routed too), so the other steers run with routed modules in place."""

import pytest
import torch
from conftest import close_engine, make_engine, model_info
from engine_checks import (
    build_family, check_mixed_batch_bit_identical, check_mixing_parity, check_reference_parity, variant_settings,
)

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def family(tiny_qwen2, tmp_path_factory):
    return build_family(tiny_qwen2, tmp_path_factory.mktemp("qwen2-family"))


@pytest.fixture(scope="module")
def llm(family):
    engine = make_engine(family["base"], **variant_settings(family))
    yield engine
    close_engine(engine)


def test_mixed_batch_unsteered_rows_bit_identical(llm, tiny_qwen2):
    check_mixed_batch_bit_identical(llm, model_info(tiny_qwen2))


def test_logprobs_match_hf_reference(llm, tiny_qwen2):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32, attn_implementation="eager").eval()
    check_reference_parity(llm, hf, model_info(tiny_qwen2))


def test_taia_mixing(llm, family):
    check_mixing_parity(llm, family)
