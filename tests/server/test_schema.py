"""The `steer` contract: normalisation, neutral detection, fingerprints and 400 messages."""

import pytest

from steerserve.patches.plan import SteerPlan, parse_plan
from steerserve.server.schema import ModelInfo, SteerError, normalise

INFO = ModelInfo("SteerableLlamaForCausalLM", num_layers=30, ffn_width=1536, ffn_steerable=True)


def test_defaults_and_resolution():
    plan = normalise({"infosteer": {"alpha": 2}}, INFO)
    assert plan.infosteer.layers == tuple(range(30)) and plan.infosteer.mode == "scale"
    assert normalise({"infosteer": {"alpha": 2, "layers": [5, 1, 5]}}, INFO).infosteer.layers == (1, 5)
    lift = normalise({"infosteer": {"mode": "lift", "alpha": 1}}, INFO).infosteer
    assert (lift.p, lift.m) == (0.01, 15)
    assert normalise({"infosteer": {"mode": "topk", "k": 1536, "alpha": 0}}, INFO).infosteer.k == 1536


@pytest.mark.parametrize("raw", [None, {}, {"infosteer": {"alpha": 1.0}}, {"infosteer": {"mode": "topk", "k": 3,
                                 "alpha": 1}}, {"infosteer": {"alpha": 2, "layers": []}}])
def test_neutral_is_empty(raw):
    plan = normalise(raw, INFO)
    assert plan.is_empty and plan.fingerprint() is None and plan.echo()["applied"] == []


def test_fingerprint_is_stable_and_canonical():
    a = normalise({"infosteer": {"alpha": 2, "layers": [3, 2]}}, INFO)
    b = normalise({"infosteer": {"layers": [2, 3, 3], "alpha": 2.0, "mode": "scale"}}, INFO)
    c = normalise({"infosteer": {"alpha": 2.01, "layers": [2, 3]}}, INFO)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert parse_plan(a.to_json()) == a
    # pinned: the fingerprint salts the prefix cache and is what clients compare across releases
    assert a.to_json() == '{"infosteer":{"alpha":2.0,"k":0,"layers":[2,3],"m":0,"mode":"scale","p":0.0}}'
    assert a.fingerprint() == "78cdca8607eddd5e"


@pytest.mark.parametrize("raw,field,words", [
    ({"infosteer": {"alpha": 10.5}}, "steer.infosteer.alpha", "[0.0, 10.0]"),
    ({"infosteer": {"alpha": True}}, "steer.infosteer.alpha", "valid number"),
    ({"infosteer": {"alpha": 1.5, "layers": [30]}}, "steer.infosteer.layers[0]", "0..29"),
    ({"infosteer": {"alpha": 1.5, "layers": [-1]}}, "steer.infosteer.layers[0]", "0..29"),
    ({"infosteer": {"alpha": 1.5, "layers": list(range(2000))}}, "steer.infosteer.layers", "1024"),
    ({"infosteer": {"alpha": 1.5, "mode": "topk", "k": 0}}, "steer.infosteer.k", "1..1536"),
    ({"infosteer": {"alpha": 1.5, "mode": "lift", "p": 1.5}}, "steer.infosteer.p", "(0, 1]"),
    ({"infosteer": {"alpha": 1.5, "mode": "lift", "p": 0.0001}}, "steer.infosteer.p", "allowed range"),
    ({"infosteer": {"alpha": 1.5, "p": 0.1}}, "steer.infosteer.p", 'only applies to mode "lift"'),
    ({"infosteer": {"alpha": 1.5, "bogus": 1}}, "steer.infosteer.bogus", "allowed keys: alpha, k, layers, mode, p"),
    ({"other": {}}, "steer.other", "allowed keys: context_attention, context_indicator, experiment, infosteer, mixing, profile"),
    ({"infosteer": 3}, "steer.infosteer", "must be an object"),
    ("text", "steer", "must be an object"),
])
def test_bad_values_name_the_field(raw, field, words):
    with pytest.raises(SteerError) as err:
        normalise(raw, INFO)
    assert err.value.field == field
    assert words in err.value.message


def test_model_without_ffn_support_and_tensor_parallel():
    plain = ModelInfo("GPT2LMHeadModel", 12, 3072, ffn_steerable=False)
    with pytest.raises(SteerError, match=r"infosteer is unavailable on this model: the served model \(GPT2LMHeadModel\) "
                                         "has no steering support; supported architectures: LlamaForCausalLM"):
        normalise({"infosteer": {"alpha": 2}}, plain)
    assert normalise({}, plain).is_empty  # no steering asked: fine on any model
    tp2 = ModelInfo("SteerableLlamaForCausalLM", 30, 1536, True, tensor_parallel_size=2)
    assert not normalise({"infosteer": {"alpha": 2}}, tp2).is_empty
    # top-k and lift gather whole rows across ranks: every mode is served, k bounded by the whole FFN
    assert normalise({"infosteer": {"alpha": 2, "mode": "topk", "k": 1536}}, tp2).infosteer.k == 1536
    with pytest.raises(SteerError) as err:
        normalise({"infosteer": {"alpha": 2, "mode": "topk", "k": 1537}}, tp2)
    assert err.value.field == "steer.infosteer.k"


def test_echo_shape():
    plan = normalise({"infosteer": {"mode": "topk", "k": 9, "alpha": 3, "layers": [0]}}, INFO)
    assert plan.echo() == {"applied": [{"steer": "infosteer", "mode": "topk", "alpha": 3.0, "layers": [0], "k": 9}],
                           "fingerprint": plan.fingerprint()}
    assert SteerPlan().echo()["fingerprint"] is None


def test_null_means_the_default():
    from steerserve.server.experiments import resolve_experiment
    from steerserve.server.schema import resolve_profile

    assert normalise({"infosteer": {"alpha": None, "mode": None}}, INFO).is_empty  # alpha 1 = neutral
    assert normalise({"infosteer": {"alpha": 2, "layers": None}}, INFO) == normalise({"infosteer": {"alpha": 2}}, INFO)
    assert normalise({"profile": None, "experiment": None, "infosteer": None, "mixing": None}, INFO).is_empty
    assert resolve_profile({"profile": None, "infosteer": {"alpha": 2}}, {}) == ({"infosteer": {"alpha": 2}}, None)
    assert resolve_experiment({"experiment": None}, {}, None) == ({}, None)
    # a null steer key still removes a profile's steer (documented), a null field resets it to its default
    profiles = {"p": {"infosteer": {"alpha": 3, "layers": [1]}}}
    assert resolve_profile({"profile": "p", "infosteer": None}, profiles) == ({}, "p")
    merged, _ = resolve_profile({"profile": "p", "infosteer": {"layers": None}}, profiles)
    assert normalise(merged, INFO).infosteer.layers == tuple(range(30))


def test_negative_zero_is_canonical():
    zero = normalise({"infosteer": {"alpha": 0.0}}, INFO)
    negative = normalise({"infosteer": {"alpha": -0.0}}, INFO)
    assert negative == zero and negative.fingerprint() == zero.fingerprint()
    assert str(negative.echo()["applied"][0]["alpha"]) == "0.0"


def test_huge_names_are_not_echoed_whole():
    from steerserve.server.schema import resolve_profile

    with pytest.raises(SteerError) as err:
        resolve_profile({"profile": "p" * 10**6}, {})
    assert len(err.value.message) < 400
    with pytest.raises(SteerError) as err:
        normalise({"k" * 10**6: 1}, INFO)
    assert len(err.value.field) < 260 and len(err.value.message) < 400
