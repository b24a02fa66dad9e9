"""The steer survives torch.compile: a compiled (non-eager) steerable Llama engine steers every
step (the op is opaque to the compiler) and leaves unsteered neighbours bit-identical."""

import pytest
import torch
from conftest import close_engine, make_engine, model_info
from engine_checks import check_mixed_batch_bit_identical, check_reference_parity

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def llm(tiny_llama):
    engine = make_engine(tiny_llama, enforce_eager=False)
    yield engine
    close_engine(engine)


def test_engine_is_compiled(llm):
    config = llm.llm_engine.vllm_config.compilation_config
    assert config.mode != 0, "engine was not compiled"


def test_compiled_mixed_batch(llm, tiny_llama):
    check_mixed_batch_bit_identical(llm, model_info(tiny_llama))


def test_compiled_logprobs_match_hf_reference(llm, tiny_llama):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32, attn_implementation="eager").eval()
    check_reference_parity(llm, hf, model_info(tiny_llama))
