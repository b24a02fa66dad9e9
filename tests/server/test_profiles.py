"""Steering profiles: config loading and validation, and `steer.profile` resolution."""

import json

import pytest

from steerserve.server.profiles import ConfigError, load_config
from steerserve.server.schema import ModelInfo, SteerError, normalise, resolve_profile

INFO = ModelInfo("SteerableLlamaForCausalLM", num_layers=30, ffn_width=1536, ffn_steerable=True)
PROFILES = {"gentle": {"infosteer": {"alpha": 1.2, "layers": [10, 11]}},
            "lift": {"infosteer": {"mode": "lift", "alpha": 2.0, "p": 0.02}}}


def test_profile_resolution_and_overrides():
    raw, name = resolve_profile({"profile": "gentle"}, PROFILES)
    assert name == "gentle" and normalise(raw, INFO) == normalise(PROFILES["gentle"], INFO)
    raw, _ = resolve_profile({"profile": "gentle", "infosteer": {"alpha": 2.0}}, PROFILES)
    assert normalise(raw, INFO).infosteer.alpha == 2.0 and normalise(raw, INFO).infosteer.layers == (10, 11)
    raw, _ = resolve_profile({"profile": "lift", "infosteer": None}, PROFILES)
    assert normalise(raw, INFO).is_empty
    assert PROFILES["gentle"] == {"infosteer": {"alpha": 1.2, "layers": [10, 11]}}  # not mutated
    assert resolve_profile({"infosteer": {"alpha": 2}}, PROFILES) == ({"infosteer": {"alpha": 2}}, None)


@pytest.mark.parametrize("raw,words", [
    ({"profile": "nope"}, "known profiles: gentle, lift"),
    ({"profile": 3}, "must be a string"),
])
def test_bad_profile_references(raw, words):
    with pytest.raises(SteerError) as err:
        resolve_profile(raw, PROFILES)
    assert err.value.field == "steer.profile" and words in err.value.message


def test_override_errors_name_the_request_field():
    raw, _ = resolve_profile({"profile": "gentle", "infosteer": {"alpha": 99}}, PROFILES)
    with pytest.raises(SteerError) as err:
        normalise(raw, INFO)
    assert err.value.field == "steer.infosteer.alpha"


def test_config_file_yaml_and_json(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("profiles:\n  gentle: {infosteer: {alpha: 1.2, layers: [10, 11]}}\n"
                 "  lift:\n    infosteer: {mode: lift, alpha: 2.0, p: 0.02}\n")
    assert load_config(y, INFO).profiles == PROFILES
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"profiles": PROFILES}))
    assert load_config(j, INFO).profiles == PROFILES


@pytest.mark.parametrize("text,words", [
    ("profiles:\n  bad: {infosteer: {alpha: 20}}\n", "profile 'bad': steer.infosteer.alpha"),
    ("profiles:\n  far: {infosteer: {alpha: 2, layers: [40]}}\n", "profile 'far': steer.infosteer.layers[0]"),
    ("profiles:\n  loop: {profile: far}\n", "profile 'loop': steer.profile"),
    ("profiles: [1, 2]\n", "`profiles` must be a mapping"),
    ("experimentz: {}\n", "unknown top-level key(s) experimentz"),
    ("experiments:\n  e: {arms: [{name: a, profile: nope}]}\n", "experiment 'e': arms[0].profile: unknown profile"),
    ("experiments:\n  e: {arms: [{name: a, weight: 0}]}\n", "experiment 'e': arms[0].weight"),
    ("experiments:\n  e: {arms: [{name: a}, {name: a}]}\n", "experiment 'e': arm names must be unique"),
    ("experiments:\n  e: {arms: []}\n", "experiment 'e': arms: must be a list"),
    ("profiles: {a: [\n", "cannot parse"),
])
def test_bad_config_names_file_profile_and_field(tmp_path, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path, INFO)
    assert str(path) in str(err.value) and words in str(err.value)


def test_serve_refuses_bad_config_before_starting(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text("profiles:\n  bad: {infosteer: {alpha: 20}}\n")
    out = subprocess.run([sys.executable, "-m", "steerserve.clients.cli", "serve", "--config", str(bad)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert f"{bad}: profile 'bad': steer.infosteer.alpha" in out.stderr
