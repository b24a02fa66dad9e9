"""The steer survives torch.compile: a compiled (non-eager) steerable Llama engine steers every
step (the ops are opaque to the compiler) and leaves unsteered neighbours bit-identical. The engine
also holds a fully fine-tuned variant, so TAIA mixing is checked compiled too (and the other steers
with its routed modules in place), and a proxy pair, whose expert and anti-expert are compiled with
the engine (in vLLM's warm-up, before the first request) and then serve a varying number of proxy
rows per step without recompiling."""

import pytest
import torch
from conftest import apply_model_allowed, close_engine, make_engine, model_info
from engine_checks import (
    LOGPROB_TOL, PROMPTS, build_family, check_mixed_batch_bit_identical, check_mixing_parity, check_reference_parity,
    hf, perturbed_copy, run, variant_settings,
)
from tiny_models import build_tiny

from steerserve.patches.plan import ProxyPlan, SteerPlan
from steerserve.patches.steers.base import SETTINGS_KEY
from steerserve.patches.steers.proxy import PAIRS_SETTING
from steerserve.patches.steers.proxy.reference import proxy_token_logprobs

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def family(tiny_llama, tmp_path_factory):
    return build_family(tiny_llama, tmp_path_factory.mktemp("family"))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("compiled-proxy")
    anti = build_tiny("llama", root / "anti", seed=3, num_layers=2)
    return perturbed_copy(anti, root / "expert", seed=11, scale=0.3), anti


@pytest.fixture(scope="module")
def llm(family, pair):
    settings = variant_settings(family)
    config = settings["additional_config"]
    config[SETTINGS_KEY][PAIRS_SETTING] = [{"name": "task", "expert": str(pair[0]), "anti_expert": str(pair[1])}]
    with apply_model_allowed():
        engine = make_engine(family["base"], enforce_eager=False, **settings)
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


def _compiled_experts(model) -> list[bool]:
    """Per sub-model: compiled (not eager) and its compiled function made."""
    holder = next(iter(model.steer_proxy.values()))
    out = []
    for role in ("expert", "anti_expert"):
        inner = getattr(holder, role).model
        out.append(not inner.do_not_compile and (getattr(inner, "compiled", False)
                                                 or getattr(inner, "aot_compiled_fn", None) is not None))
    return out


def _submodules_taken_by_mixing(model) -> int:
    """Modules of the proxy pair's sub-models that TAIA mixing took as its sites (must be none)."""
    return sum(hasattr(m, "steer_component") for m in model.steer_proxy.modules())


def _compile_count(model) -> tuple[int, ...]:
    from vllm.compilation.counter import compilation_counter as c

    return c.num_graphs_seen, c.num_backend_compilations, c.num_aot_compiles, c.num_inductor_compiles


def test_compiled_proxy_experts(llm, family, pair):
    """The experts were compiled in the warm-up (before any request); proxy rows match the pure-torch
    reference, plain rows stay bit-identical, and steps with 1 to 5 proxy rows (prefill and decode)
    compile nothing more."""
    assert llm.apply_model(_compiled_experts) == [[True, True]], "proxy experts not compiled at warm-up"
    assert llm.apply_model(_submodules_taken_by_mixing) == [0], "the variant's routing reached the proxy pair"
    (graphs_before,) = llm.apply_model(_compile_count)
    base, expert, anti = hf(family["base"]), hf(pair[0]), hf(pair[1])
    worst = 0.0
    for k in (1, 3, 5):
        plans = [SteerPlan(proxy=ProxyPlan("task", 1.5)) if i < k else None for i in range(len(PROMPTS))]
        outs = run(llm, list(zip(PROMPTS, plans)), max_tokens=6)
        plain = run(llm, [(t, None) for t in PROMPTS], max_tokens=6)
        for plan, (toks, lps, prompt_ids, _), ref_plain in zip(plans, outs, plain):
            if plan is None:
                assert (toks, lps) == (ref_plain[0], ref_plain[1]), "plain row changed by compiled proxy neighbours"
                continue
            ref = proxy_token_logprobs(base, expert, anti, prompt_ids, toks, plan.proxy.alpha)
            worst = max(worst, max(abs(a - b) for a, b in zip(lps, ref)))
    assert worst < LOGPROB_TOL, f"compiled proxy rows differ from the reference by {worst}"
    assert llm.apply_model(_compile_count) == [graphs_before], "proxy steps recompiled the experts"
