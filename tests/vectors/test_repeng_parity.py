"""repeng (PyPI `repeng` 0.4.0, the steering-vector library steerserve's vectors follow) as the
reference, on a tiny random Llama and on the embedded model, float32:

- extraction: `steerserve train vectors`' pca_diff directions agree with repeng's
  `read_representations` on the same model and pairs (cosine >= 0.99 per layer after sign
  alignment; repeng reads the last layer after the final norm, steerserve before it, so the last
  layer is left out);
- serving: the engine's steered logprobs equal repeng's `ControlModel` hooks (`set_control(vector,
  coeff)`, one configuration for the whole model) within LOGPROB_TOL, teacher forced; the tiny
  model's GGUF vector is read by repeng's own `ControlVector.import_gguf`.

repeng 0.4.0 names `np.float_` in annotations, an alias NumPy 2 removed (vLLM needs NumPy 2):
`repeng_module()` restores the alias before importing it. Its `ControlModule` masks padding with
`position_ids` of shape [batch, seq], which Hugging Face models since transformers 5 pass as
[1, seq]: the reference passes explicit [batch, seq] positions.
"""

import numpy as np
import pytest
import torch
from conftest import close_engine, make_engine, model_info
from engine_checks import LOGPROB_TOL, PROMPTS, run
from tiny_models import tiny_vectors

from steerserve.patches.steers.vectors import VECTORS_SETTING, files
from steerserve.server import family as _family
from steerserve.server.schema import normalise
from steerserve.training.vectors import persona_pairs, train_vectors

pytestmark = pytest.mark.engine


def repeng_module():
    if not hasattr(np, "float_"):
        np.float_ = np.float64  # removed in NumPy 2; repeng 0.4.0 names it in type annotations
    return pytest.importorskip("repeng", reason="repeng is installed by run.sh (pip install --no-deps repeng)")


def hf_model(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def check_extraction(path, statements: int) -> list[float]:
    repeng = repeng_module()
    from repeng.extract import DatasetEntry, read_representations

    from steerserve.training.vector_data import STATEMENTS

    model, tok = hf_model(path)
    pairs = persona_pairs(tok, "happy", "sad", STATEMENTS[:statements])
    layers = list(range(1, model.config.num_hidden_layers - 1))
    ours = train_vectors(model, tok, pairs, layers, "pca_diff", batch_size=16)
    theirs = read_representations(model, tok, [DatasetEntry(p.positive, p.negative) for p in pairs],
                                  hidden_layers=layers, batch_size=16, method="pca_diff")
    assert repeng.ControlVector  # the package imported whole
    cosines = []
    for i in layers:
        a, b = ours[i].astype(np.float64), theirs[i].astype(np.float64)
        cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        cosines.append(cos)
        assert abs(cos) >= 0.99, f"layer {i}: cosine {cos:.4f} with repeng's direction"
        assert cos > 0, f"layer {i}: sign differs from repeng's (both use repeng's sign rule)"
    return cosines


def repeng_logprobs(model, vector, coeff: float, layers: list[int], prompt_ids, output_ids) -> list[float]:
    """Teacher-forced logprobs of `output_ids` under repeng's ControlModel with `coeff * vector`."""
    repeng = repeng_module()

    control = repeng.ControlModel(model, layers)
    try:
        control.set_control(vector, coeff)
        ids = torch.tensor([prompt_ids + output_ids])
        positions = torch.arange(ids.shape[1])[None, :]
        with torch.no_grad():
            logits = control(input_ids=ids, position_ids=positions).logits[0].float()
    finally:
        control.unwrap()
    logprobs = torch.log_softmax(logits, dim=-1)
    n = len(prompt_ids)
    return [logprobs[n - 1 + i, t].item() for i, t in enumerate(output_ids)]


def check_engine_against_repeng(llm, path, info, name: str, vector, scales: list[float]) -> float:
    model, _ = hf_model(path)
    layers = sorted(vector.directions)
    items = [(PROMPTS[i % len(PROMPTS)], normalise({"vectors": [{"name": name, "scale": s}]}, info))
             for i, s in enumerate(scales)]
    worst = 0.0
    for (_, plan), (toks, lps, prompt_ids, _), s in zip(items, run(llm, items), scales):
        ref = repeng_logprobs(model, vector, s, layers, prompt_ids, toks)
        diff = max(abs(a - b) for a, b in zip(lps, ref))
        worst = max(worst, diff)
        assert diff < LOGPROB_TOL, f"scale {s}: engine vs repeng logprob difference {diff}"
    return worst


def serving(path, vectors: dict[str, str]):
    fam = _family.Family()
    _family.prepare_vectors(vectors, path, fam)
    _family.set_current(fam)
    return model_info(path)


# --- tiny random Llama ----------------------------------------------------------------------


def test_extraction_matches_repeng_on_a_tiny_model(tiny_llama):
    check_extraction(tiny_llama, statements=12)


def test_engine_matches_repeng_control_model_on_a_tiny_model(tiny_llama):
    repeng = repeng_module()
    info = serving(tiny_llama, tiny_vectors(tiny_llama))
    vector = repeng.ControlVector.import_gguf(tiny_vectors(tiny_llama)["joy"])  # repeng reads our GGUF
    llm = make_engine(tiny_llama)
    try:
        check_engine_against_repeng(llm, tiny_llama, info, "joy", vector, [1.0, -2.0, 0.5])
    finally:
        close_engine(llm)
        _family.set_current(None)


# --- the embedded model -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded():
    from steerserve.server.model_store import ensure_embedded_model

    return ensure_embedded_model()


def test_extraction_matches_repeng_on_the_embedded_model(embedded):
    cosines = check_extraction(embedded, statements=6)
    print(f"embedded model: cosine with repeng per layer min {min(cosines):.5f}")


def test_engine_matches_repeng_control_model_on_the_embedded_model(embedded):
    """The shipped demo vector, float32, scales from the effect table (docs/vectors.md)."""
    repeng = repeng_module()
    from steerserve.server.model_store import EMBEDDED_DEMO_VECTOR

    info = serving(embedded, {"happy": str(EMBEDDED_DEMO_VECTOR)})
    _, directions, _ = files.read_directions(EMBEDDED_DEMO_VECTOR)
    vector = repeng.ControlVector("llama", directions)
    llm = make_engine(embedded, additional_config={"steerserve": {VECTORS_SETTING: [
        {"name": "happy", "path": str(EMBEDDED_DEMO_VECTOR)}]}})
    try:
        worst = check_engine_against_repeng(llm, embedded, info, "happy", vector, [4.0, -4.0, -8.0])
        print(f"embedded model: max |engine - repeng| logprob difference {worst:.2e}")
    finally:
        close_engine(llm)
        _family.set_current(None)
