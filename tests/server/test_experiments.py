"""A/B experiment assignment: deterministic, sticky per unit key, weights honoured (tested
statistically), and `steer.experiment` resolution."""

import math

import pytest

from steerserve.server.experiments import Experiment, ExperimentArm, parse_experiments, resolve_experiment
from steerserve.server.schema import SteerError

EXP = Experiment("tone", (ExperimentArm("control", None, 1.0), ExperimentArm("gentle", "gentle", 3.0)))


def test_assignment_is_sticky_and_deterministic():
    assert all(EXP.assign(f"user-{i}") == EXP.assign(f"user-{i}") for i in range(200))
    other = Experiment("other", EXP.arms)  # the experiment name is part of the hash
    assert [EXP.assign(f"u{i}").name for i in range(64)] != [other.assign(f"u{i}").name for i in range(64)]


def test_weights_are_honoured():
    n = 20000
    gentle = sum(EXP.assign(f"unit-{i}").name == "gentle" for i in range(n))
    p = 0.75
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(gentle - n * p) < 4 * sigma, (gentle, n * p)
    three = Experiment("x", tuple(ExperimentArm(a, None, w) for a, w in [("a", 1), ("b", 1), ("c", 2)]))
    counts = {"a": 0, "b": 0, "c": 0}
    for i in range(n):
        counts[three.assign(str(i)).name] += 1
    expected = {"a": n / 4, "b": n / 4, "c": n / 2}
    chi2 = sum((counts[k] - expected[k]) ** 2 / expected[k] for k in counts)
    assert chi2 < 13.8  # chi-square, 2 degrees of freedom, p = 0.001


def test_resolution():
    exps = {"tone": EXP}
    arm = EXP.assign("alice")
    raw, which = resolve_experiment({"experiment": "tone"}, exps, "alice")
    assert which == ("tone", arm.name)
    assert raw == ({"profile": arm.profile} if arm.profile else {})
    assert resolve_experiment({"infosteer": {}}, exps, None) == ({"infosteer": {}}, None)
    for bad, field in [({"experiment": "nope"}, "steer.experiment"),
                       ({"experiment": "tone", "infosteer": {"alpha": 2}}, "steer.experiment")]:
        with pytest.raises(SteerError) as err:
            resolve_experiment(bad, exps, "alice")
        assert err.value.field == field
    with pytest.raises(SteerError) as err:
        resolve_experiment({"experiment": "tone"}, exps, None)
    assert err.value.field == "user" and "X-Steerserve-Unit" in err.value.message


def test_parse_experiments():
    exps = parse_experiments({"tone": {"arms": [{"name": "control"}, {"name": "g", "profile": "p", "weight": 2.5}]}},
                             {"p": {}}, "f.yaml")
    assert exps["tone"].arms == (ExperimentArm("control", None, 1.0), ExperimentArm("g", "p", 2.5))
