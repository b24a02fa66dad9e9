"""A steerable model serves unsteered requests bit-identically to stock vLLM (same checkpoint,
same batch, plugin architecture vs vLLM's own LlamaForCausalLM)."""

import pytest
from conftest import close_engine, make_engine
from engine_checks import PROMPTS, run

pytestmark = pytest.mark.engine


def test_unsteered_equals_stock_vllm(tiny_llama):
    batch = [(t, None) for t in PROMPTS]
    stock = make_engine(tiny_llama, hf_overrides=None)
    assert stock.llm_engine.vllm_config.model_config.architectures == ["LlamaForCausalLM"]
    stock_out = run(stock, batch)
    close_engine(stock)
    steerable = make_engine(tiny_llama)
    assert steerable.llm_engine.vllm_config.model_config.architectures == ["SteerableLlamaForCausalLM"]
    steerable_out = run(steerable, batch)
    close_engine(steerable)
    assert [o[:2] for o in steerable_out] == [o[:2] for o in stock_out]
