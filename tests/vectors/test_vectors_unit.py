"""Steering vectors without an engine: vector files (both formats, every start-up refusal), the
request's normalisation and 400s, the family's transport to the API server, the config key, and
the client builder."""

from __future__ import annotations

import numpy as np
import pytest

from steerserve.clients import Steer
from steerserve.patches.plan import parse_plan
from steerserve.patches.steers.vectors import _ranges, files
from steerserve.server import family as _family
from steerserve.server.schema import ModelInfo, SteerError, normalise

INFO = ModelInfo("SteerableLlamaForCausalLM", 30, 1536, True, hidden_size=576)


def directions(layers, hidden=576, seed=0):
    rng = np.random.default_rng(seed)
    return {i: rng.standard_normal(hidden).astype(np.float32) for i in layers}


@pytest.fixture()
def served(tmp_path):
    files.write_gguf(tmp_path / "a.gguf", directions(range(1, 30)), "llama")
    files.write_safetensors(tmp_path / "b.safetensors", directions((3, 4, 5), seed=1),
                            {"base_model": "x", "method": "caa"})
    vectors = {"a": files.check("a", tmp_path / "a.gguf", 576, 30),
               "b": files.check("b", tmp_path / "b.safetensors", 576, 30)}
    _family.set_current(_family.Family(vectors=vectors))
    yield vectors
    _family.set_current(None)


def test_both_formats_read_alike_and_list_without_paths(tmp_path, served):
    a, b = served["a"], served["b"]
    assert (a.format, b.format) == ("gguf", "safetensors")
    assert a.layers == tuple(range(1, 30)) and b.layers == (3, 4, 5) and a.model == "llama"
    assert b.metadata == {"base_model": "x", "method": "caa"} and b.model == "x"
    d = directions((3, 4, 5), seed=1)
    assert b.norms == pytest.approx(tuple(float(np.linalg.norm(d[i])) for i in (3, 4, 5)))
    listing = a.listing()
    assert "path" not in listing and listing["norms"]["1"] == pytest.approx(a.norms[0], abs=1e-6)
    fam = _family.current()
    assert _family.Family.from_json(fam.to_json()).vectors == fam.vectors  # the API server's copy
    assert _family.engine_settings(fam)["vectors"] == [{"name": "a", "path": a.path}, {"name": "b", "path": b.path}]


@pytest.mark.parametrize("case,expected", [
    ("missing", "no such vector file"),
    ("junk", "unknown vector file format"),
    ("bad_gguf", "cannot read the gguf file"),
    ("hidden", "hidden size 64 (length of direction.2) does not match the served model's hidden size 576"),
    ("deep", "direction.30: layer 30 out of range; the served model has 30 layers (0..29)"),
    ("nan", "direction.4 holds NaN or infinite values"),
    ("names", "tensor 'weights': expected tensors named direction.<layer>"),
    ("ragged", "direction tensors of different lengths"),
    ("2d", "shape [2, 576]; a direction is 1-D"),
    ("meta_layers", "metadata num_layers is 40, the served model has 30 layers"),
])
def test_start_up_refusals_name_the_file_and_field(tmp_path, case, expected):
    from safetensors.numpy import save_file

    path = tmp_path / f"{case}.bin"
    if case == "junk":
        path.write_bytes(b"not a vector file")
    elif case == "bad_gguf":
        path.write_bytes(b"GGUF" + b"\xff" * 40)
    elif case == "hidden":
        files.write_gguf(path, directions((2,), hidden=64), "llama")
    elif case == "deep":
        files.write_gguf(path, directions((3, 30)), "llama")
    elif case == "nan":
        d = directions((4,))
        d[4][7] = np.inf
        files.write_safetensors(path, d, {})
    elif case == "names":
        save_file({"weights": np.ones(576, dtype=np.float32)}, str(path))
    elif case == "ragged":
        save_file({"direction.1": np.ones(576, np.float32), "direction.2": np.ones(5, np.float32)}, str(path))
    elif case == "2d":
        save_file({"direction.1": np.ones((2, 576), np.float32)}, str(path))
    elif case == "meta_layers":
        files.write_safetensors(path, directions((1,)), {"num_layers": "40"})
    with pytest.raises(files.VectorFileError) as err:
        files.check("v", path, 576, 30)
    assert expected in str(err.value) and str(path.name) in str(err.value)


def test_prepare_vectors_refuses_bad_declarations(tiny_llama, tmp_path):
    from tiny_models import tiny_vectors

    joy = tiny_vectors(tiny_llama)["joy"]
    for values, expected in [(["joy"], "expected NAME=FILE"), ({"bad name": joy}, "vector name 'bad name'"),
                             ({"joy": joy, "x": str(tmp_path / "none.gguf")}, "vector 'x': "),
                             (["joy=" + joy, "joy=" + joy], "declared twice")]:
        with pytest.raises(_family.FamilyError, match=expected):
            _family.prepare_vectors(values, tiny_llama, _family.Family())
    fam = _family.Family()
    _family.prepare_vectors({"joy": joy}, tiny_llama, fam)
    assert fam.vectors["joy"].layers == (1, 2, 3)


def test_config_key_resolves_paths_from_the_config_folder(tmp_path):
    from steerserve.server.cli import _config_vectors
    from steerserve.server.profiles import load_config

    (tmp_path / "conf").mkdir()
    config = tmp_path / "conf" / "steerserve.yaml"
    config.write_text("vectors:\n  happy: ../v/happy.gguf\n")
    assert _config_vectors(str(config)) == {"happy": str((tmp_path / "v" / "happy.gguf").resolve())}
    assert load_config(config, None).profiles == {}  # a known top-level key
    config.write_text("vectors: [a, b]\n")
    with pytest.raises(SystemExit, match="`vectors` must map vector names to files"):
        _config_vectors(str(config))


def test_normalise_resolves_layers_drops_zero_and_round_trips(served):
    plan = normalise({"vectors": [{"name": "a", "scale": 2}, {"name": "b", "layers": [5, 3, 5], "positions": "generated"},
                                  {"name": "a", "scale": 0}]}, INFO)
    assert plan.applied() == [{"steer": "vectors", "terms": [
        {"name": "a", "scale": 2.0, "layers": list(range(1, 30)), "positions": "all"},
        {"name": "b", "scale": 1.0, "layers": [3, 5], "positions": "generated"}]}]
    assert parse_plan(plan.to_json()) == plan and plan.salts_cache
    assert normalise({"vectors": [{"name": "a", "scale": -0.0}]}, INFO).is_empty
    assert normalise({"vectors": [{"name": "a", "scale": 1}]}, INFO).fingerprint() != \
        normalise({"vectors": [{"name": "a", "scale": 1.5}]}, INFO).fingerprint()


@pytest.mark.parametrize("steer,field,words", [
    ({"vectors": []}, "steer.vectors", "at least 1 item"),
    ({"vectors": [{"name": "a"}] * 9}, "steer.vectors", "at most 8 items"),
    ({"vectors": "a"}, "steer.vectors", "valid list"),
    ({"vectors": [{"name": "zz"}]}, "steer.vectors[0].name", "unknown vector 'zz'; served vectors: a, b"),
    ({"vectors": [{"scale": 1}]}, "steer.vectors[0].name", "Field required"),
    ({"vectors": [{"name": "a", "scale": 101}]}, "steer.vectors[0].scale", "allowed range [-100, 100]"),
    ({"vectors": [{"name": "a", "scale": float("nan")}]}, "steer.vectors[0].scale", "finite"),
    ({"vectors": [{"name": "a"}, {"name": "b", "layers": [3, 7]}]}, "steer.vectors[1].layers[1]", "it has layers 3-5"),
    ({"vectors": [{"name": "a", "layers": "some"}]}, "steer.vectors[0].layers", "layer indices the vector has"),
    ({"vectors": [{"name": "a", "positions": "later"}]}, "steer.vectors[0].positions", '"generated"'),
    ({"vectors": [{"name": "a", "foo": 1}]}, "steer.vectors[0].foo", "allowed keys: layers, name, positions, scale"),
])
def test_bad_requests_name_the_field(served, steer, field, words):
    with pytest.raises(SteerError) as err:
        normalise(steer, INFO)
    assert err.value.field == field and words in err.value.message, err.value


def test_a_model_without_steering_support_refuses_vectors(served, tmp_path):
    gpt2 = ModelInfo("GPT2LMHeadModel", 12, 3072, ffn_steerable=False, hidden_size=576)
    with pytest.raises(SteerError, match=r"vectors is unavailable on this model: the served model \(GPT2LMHeadModel\) "
                                         "has no steering support"):
        normalise({"vectors": [{"name": "a"}]}, gpt2)
    import json

    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps(
        {"architectures": ["GPT2LMHeadModel"], "num_hidden_layers": 30, "hidden_size": 576}))
    with pytest.raises(_family.FamilyError, match=r"vectors cannot be served: the served model \(GPT2LMHeadModel\)"):
        _family.prepare_vectors({"a": served["a"].path}, tmp_path / "gpt2", _family.Family())


def test_no_served_vectors_says_how_to_serve_one():
    _family.set_current(_family.Family())
    try:
        with pytest.raises(SteerError, match=r"none \(start the server with --vector NAME=FILE\)"):
            normalise({"vectors": [{"name": "a"}]}, INFO)
    finally:
        _family.set_current(None)


def test_client_builder_appends_terms():
    s = Steer().vector("a", 0.5).vector("b", -2, layers=[3], positions="prompt").infosteer(alpha=1.5)
    assert s.to_dict()["vectors"] == [{"name": "a", "scale": 0.5, "layers": "all", "positions": "all"},
                                      {"name": "b", "scale": -2.0, "layers": [3], "positions": "prompt"}]
    assert Steer().vectors({"name": "a"}).to_dict() == {"vectors": [{"name": "a", "scale": 1.0, "layers": "all",
                                                                     "positions": "all"}]}
    import pydantic

    with pytest.raises(pydantic.ValidationError):
        Steer().vector("a", 500)
    assert "vector" in dir(Steer()) and _ranges([1, 2, 3, 7, 9, 10]) == "1-3, 7, 9-10"
