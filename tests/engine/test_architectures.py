"""Every architecture of `patches/architectures.py` beyond Llama and Qwen2 (which the other engine
modules cover), on a tiny random checkpoint of its own config (tests/tiny_models.py, float32, eager,
chunked prefill with a 64-token budget), one architecture's engines at a time:

- the steerable engine attaches by structure (gated MLPs, decoder layers, attention layers);
- unsteered rows of a mixed batch are bit-identical (tokens and logprobs) to stock vLLM serving the
  same checkpoint with its own class, and steered rows differ;
- every steer the architecture supports (InfoSteer scale / top-k / lift, steering vectors,
  context attention where the checkpoint's attention allows it) gives logprobs equal to its
  pure-torch reference on the Hugging Face model of the same checkpoint (LOGPROB_TOL beyond the
  engine's own unsteered distance from that model), teacher forced, in one mixed batch, a long
  prompt in chunked prefill included;
- every refusal is a 400 naming the architecture and the reason, or a start-up refusal;
- the steerable engine serves vLLM's multi-LoRA (LoRA on, the plain rows above still equal stock
  vLLM's): a LoRA adapter and its TAIA export per request equal the merged Hugging Face model.

These results are the support matrix of docs/architectures.md (generated from the same table:
`python -m steerserve.patches.architectures`; `test_the_matrix_in_the_docs_is_current`).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from conftest import close_engine, make_engine, model_info
from engine_checks import LOGPROB_TOL, LORA_ENGINE, PROMPTS, check_lora_rows, hf, run, vector_plan, with_spans
from tiny_models import build_tiny

from steerserve.patches.architectures import ARCHITECTURES, FULL_VARIANTS, LORA_TESTED, PROXY_PAIRS
from steerserve.patches.reference import token_logprobs
from steerserve.server.schema import SteerError, normalise

pytestmark = pytest.mark.engine

TINY_ARCHS = {"qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM", "phi3": "Phi3ForCausalLM",
              "granite": "GraniteForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}
ENGINE = dict(max_num_batched_tokens=64, max_model_len=256)
LONG = " ".join(PROMPTS) + " " + " ".join(reversed(PROMPTS))


def supported_plans(info) -> dict:
    """A plan per steer and mode the model supports (normalised as the server does)."""
    last = info.num_layers - 1
    out = {
        "infosteer scale": normalise({"infosteer": {"alpha": 2.5}}, info),
        "infosteer topk": normalise({"infosteer": {"mode": "topk", "k": 8, "alpha": 4.0, "layers": [0, last]}}, info),
        "infosteer lift": normalise({"infosteer": {"mode": "lift", "p": 0.1, "alpha": 3.0, "layers": [1, 2]}}, info),
        "vectors": vector_plan(("joy", 1.0, tuple(range(1, info.num_layers)), "all"),
                               ("calm", 0.8, (1, 2), "generated")),
    }
    if info.attention_steerable:
        plan = normalise({"context_attention": {"alpha": 0.3, "heads": [[0, 1], [2, 0], [last, 3]]}}, info)
        out["context attention"] = with_spans(plan, [(1, 6)])
    return out


@pytest.fixture(scope="module", params=list(TINY_ARCHS))
def model(request, tmp_path_factory):
    """One architecture: its tiny checkpoint, the stock engine's plain outputs (that engine then
    shut down), the steerable engine, and the Hugging Face model of the checkpoint."""
    name = request.param
    path = build_tiny(name, tmp_path_factory.mktemp("arch") / name)
    info = model_info(path)
    assert info.architecture == TINY_ARCHS[name] and info.ffn_steerable
    items = batch(info)
    stock_engine = make_engine(path, hf_overrides=None, **ENGINE)
    try:
        stock = run(stock_engine, [(text, None) for text, _ in items])
    finally:
        close_engine(stock_engine)
    llm = make_engine(path, **ENGINE, **LORA_ENGINE)  # LoRA on: plain rows must still equal stock vLLM's
    yield SimpleNamespace(name=name, path=path, info=info, llm=llm, stock=stock, items=items, hf=hf(path))
    close_engine(llm)


def batch(info) -> list:
    p = supported_plans(info)
    steered = list(p.values())
    items = []
    for i in range(len(steered) * 2):  # steered and plain rows interleaved
        items.append((PROMPTS[i % len(PROMPTS)], steered[i // 2] if i % 2 else None))
    return items


def test_plain_rows_equal_stock_vllm_and_steered_rows_differ(model):
    outs = run(model.llm, model.items)
    for (_, plan), got, stock in zip(model.items, outs, model.stock):
        if plan is None:
            assert got[:2] == stock[:2], f"{model.name}: an unsteered row differs from stock vLLM"
        else:
            assert got[1] != stock[1], f"{model.name}: {plan.applied()}: not steered"


def test_every_supported_steer_matches_its_reference(model):
    """Steered logprobs within LOGPROB_TOL of the reference (beyond the engine's own distance from the
    Hugging Face model unsteered, the first, plain row: about 1e-6 on every architecture here; with
    Gemma 2's attention soft-capping on, vLLM's CPU build and Hugging Face differ by about 3e-3
    unsteered, so the tiny Gemma 2 turns it off)."""
    plans = supported_plans(model.info)
    items = [(PROMPTS[0], None)] + [(PROMPTS[i % len(PROMPTS)], plan) for i, plan in enumerate(plans.values())]
    items += [(LONG, plans["infosteer topk"]), (LONG, plans["vectors"])]
    outs = run(model.llm, items, max_tokens=8)
    diffs = []
    for (_, plan), (toks, lps, prompt_ids, _) in zip(items, outs):
        ref = token_logprobs(model.hf, prompt_ids, toks, plan)
        diffs.append(max(abs(a - b) for a, b in zip(lps, ref)))
    plain = diffs[0]
    assert plain < 5e-3, f"{model.name}: unsteered, the engine differs from Hugging Face by {plain}"
    for (_, plan), diff in zip(items[1:], diffs[1:]):
        assert diff < LOGPROB_TOL + plain, f"{model.name}: {plan.applied()}: engine vs reference difference {diff}"
    print(f"{model.name}: max |engine - reference| logprob difference {max(diffs[1:]):.2e} (unsteered {plain:.2e})")


def test_lora_and_its_taia_export_per_request(model, tmp_path):
    """TAIA with LoRA variants on this architecture: an adapter on every linear projection
    (whatever the names: Phi-3's fused qkv_proj / gate_up_proj included) and its TAIA export, per
    request next to plain rows, each equal to the merged Hugging Face model (fills LORA_TESTED)."""
    assert model.info.architecture in LORA_TESTED  # the matrix says what this test shows
    check_lora_rows(model.llm, model.path, tmp_path, model.name)


def test_refusals_name_the_architecture(model, tmp_path):
    """Context attention where the checkpoint's attention refuses it: a 400; proxy pairs and full
    variants this architecture cannot load: start-up refusals naming it."""
    from steerserve.server import family as _family

    info, arch = model.info, ARCHITECTURES[model.info.architecture]
    for steer, reason in info.refused:
        with pytest.raises(SteerError) as err:
            normalise({steer: {"alpha": 0.5}}, info)
        assert err.value.field == f"steer.{steer}" and reason in err.value.message
    if PROXY_PAIRS in arch.cannot_load:
        with pytest.raises(_family.FamilyError, match="proxy pairs cannot be served with this model"):
            _family.prepare_proxies([f"p={model.path},{model.path}"], model.path, _family.Family())
    if FULL_VARIANTS in arch.cannot_load:
        with pytest.raises(_family.FamilyError, match="fully fine-tuned checkpoint"):
            _family.prepare_family([f"v={model.path}"], model.path, "tiny", tmp_path)


def test_the_matrix_in_the_docs_is_current():
    from pathlib import Path

    from steerserve.patches.architectures import markdown_matrix

    doc = (Path(__file__).resolve().parents[2] / "docs" / "architectures.md").read_text()
    assert markdown_matrix() in doc, "regenerate the matrix: python -m steerserve.patches.architectures"
