"""The steer survives torch.compile: a compiled (non-eager) steerable Llama engine steers every
step (the ops are opaque to the compiler) and leaves unsteered neighbours bit-identical. The engine
also holds a fully fine-tuned variant, so TAIA mixing is checked compiled too (and the other steers
with its routed modules in place)."""

import pytest
import torch
from conftest import close_engine, make_engine, model_info
from engine_checks import (
    build_family, check_mixed_batch_bit_identical, check_mixing_parity, check_reference_parity, variant_settings,
)

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def family(tiny_llama, tmp_path_factory):
    return build_family(tiny_llama, tmp_path_factory.mktemp("family"))


@pytest.fixture(scope="module")
def llm(family):
    engine = make_engine(family["base"], enforce_eager=False, **variant_settings(family))
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


def test_compiled_taia_mixing(llm, family):
    check_mixing_parity(llm, family)
