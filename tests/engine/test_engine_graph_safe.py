"""Graph-safe steps in a real vLLM engine (eager, float32; `additional_config={"steerserve":
{"graph_safe_steps": true, ...}}`, holding a fully fine-tuned variant): InfoSteer, TAIA mixing's
routed sites and steering vectors are served by fixed ops reading persistent buffers every step, with the same
guarantees as the eager path: unsteered neighbours bit-identical, a neutral plan bit-identical to
none, logprobs equal to the Hugging Face references; a step over the buffers' capacity runs on the
eager path."""


import pytest
import torch
from conftest import apply_model_allowed, close_engine, make_engine, model_info
from engine_checks import (
    build_family, check_mixed_batch_bit_identical, check_mixing_parity, check_neutral_identity,
    check_reference_parity, plans, run, variant_settings,
)

from steerserve.patches.steers.engine import SETTINGS_KEY, handle_stats

pytestmark = pytest.mark.engine

SORTED_ROWS = 16  # top-k / lift rows per step: decode steps fit, a 20-token top-k prefill does not
MIXED_ROWS = 32  # routed rows per component and variant per step


@pytest.fixture(scope="module")
def family(tiny_llama, tmp_path_factory):
    return build_family(tiny_llama, tmp_path_factory.mktemp("graph-family"))


@pytest.fixture(scope="module")
def llm(family):
    with apply_model_allowed():
        config = variant_settings(family)["additional_config"]
        config[SETTINGS_KEY].update(graph_safe_steps=True, graph_sorted_rows=SORTED_ROWS, graph_mixed_rows=MIXED_ROWS)
        engine = make_engine(family["base"], additional_config=config)
        yield engine
        close_engine(engine)


def stats(llm) -> dict:
    (out,) = llm.apply_model(handle_stats)
    return out


def test_graph_mode_is_on(llm):
    s = stats(llm)
    assert s["graph_safe_steps"] and s["buffers"] == ["infosteer", "mixing", "vectors"]


def test_mixed_batch_unsteered_rows_bit_identical(llm, tiny_llama):
    check_mixed_batch_bit_identical(llm, model_info(tiny_llama))


def test_neutral_plan_bit_identical(llm, tiny_llama):
    check_neutral_identity(llm, model_info(tiny_llama))


def test_logprobs_match_hf_reference(llm, tiny_llama):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32, attn_implementation="eager").eval()
    check_reference_parity(llm, hf, model_info(tiny_llama))


def test_the_fixed_op_served_infosteer(llm, tiny_llama):
    """Scale requests always fit the buffers: every step with InfoSteer rows was served by the fixed
    op. Top-k and lift prefills of more than SORTED_ROWS tokens ran eagerly; their decode steps fit."""
    before = stats(llm)
    p = plans(model_info(tiny_llama))
    run(llm, [("Name three colours.", p["scale"]), ("Count to five.", None)])
    after = stats(llm)
    graph_steps = after["graph_safe"].get("infosteer", 0) - before["graph_safe"].get("infosteer", 0)
    eager_steps = after["eager"].get("infosteer", 0) - before["eager"].get("infosteer", 0)
    assert graph_steps >= 12 and eager_steps == 0, (graph_steps, eager_steps)
    run(llm, [("Spell the word kaleidoscope, letter by letter, slowly, and then spell it backwards too.", p["topk"])])
    final = stats(llm)
    assert final["eager"].get("infosteer", 0) - after["eager"].get("infosteer", 0) >= 1  # the prefill
    assert final["graph_safe"]["infosteer"] - after["graph_safe"]["infosteer"] >= 11  # the decode steps


def test_taia_mixing(llm, family):
    """TAIA / tuned / FFN-only rows equal the exported checkpoints' Hugging Face models and plain rows
    stay bit-identical, with the routed sites served from the buffers (prefills of up to MIXED_ROWS
    tokens too) and longer steps eagerly."""
    before = stats(llm)
    check_mixing_parity(llm, family)
    after = stats(llm)
    assert after["graph_safe"].get("mixing", 0) > before["graph_safe"].get("mixing", 0)


def test_the_fixed_op_served_vectors(llm, tiny_llama):
    """Steering vectors in graph mode: every step with vector rows is served by the fixed op (a
    slot per configuration; two configurations and a plain row here)."""
    before = stats(llm)
    p = plans(model_info(tiny_llama))
    run(llm, [("Name three colours.", p["vec"]), ("Count to five.", None), ("Say hello.", p["vec_gen"])])
    after = stats(llm)
    graph_steps = after["graph_safe"].get("vectors", 0) - before["graph_safe"].get("vectors", 0)
    eager_steps = after["eager"].get("vectors", 0) - before["eager"].get("vectors", 0)
    assert graph_steps >= 12 and eager_steps == 0, (graph_steps, eager_steps)
