"""Offline A/B evaluation: statistics, arm parsing, data loading (no server)."""

import argparse
import json
import random

import pytest

from steerserve.clients.ab_eval import bootstrap_ci, load_items, parse_arm, sign_flip_p, summarise


def test_parse_arm():
    assert parse_arm("plain=none") == ("plain", {})
    assert parse_arm("s=profile:strong") == ("s", {"profile": "strong"})
    assert parse_arm('x={"infosteer": {"alpha": 2}}') == ("x", {"infosteer": {"alpha": 2}})
    for bad in ["noequals", "=none", "a=[1]", "a={bad"]:
        with pytest.raises(argparse.ArgumentTypeError):
            parse_arm(bad)


def test_paired_statistics_detect_a_real_difference_and_not_noise():
    rng = random.Random(0)
    base = [float(rng.random() < 0.5) for _ in range(200)]
    better = [1.0 if b == 1.0 or rng.random() < 0.4 else 0.0 for b in base]  # strictly >= base, +~20 points
    same = list(base)
    rows = summarise({"base": base, "better": better, "same": same}, 1000, 1)
    by = {r["arm"]: r for r in rows}
    assert by["better"]["p_value"] < 0.01 and by["better"]["diff_ci95"][0] > 0
    assert by["same"]["p_value"] == 1.0 and by["same"]["diff_vs_first"] == 0
    lo, hi = bootstrap_ci(base, 1000, random.Random(2))
    assert lo < sum(base) / len(base) < hi
    noise = [rng.gauss(0, 1) for _ in range(100)]
    assert sign_flip_p(noise, 1000, random.Random(3)) > 0.01


def test_jsonl_loading(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "2+2=", "references": ["4"]}, {"messages": [{"role": "user", "content": "hi"}], "reference": "hello"}]))
    items, metric = load_items(str(f), None)
    assert metric == "contains" and items[0].messages[0]["content"] == "2+2=" and items[1].references == ("hello",)
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"prompt": "Sky colour?", "choices": ["blue", "green"], "answer": 0}))
    items, metric = load_items(str(mc), None)
    assert metric == "mc" and items[0].choices == ("blue", "green")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "choices": ["a"], "answer": 3}))
    with pytest.raises(SystemExit, match="answer"):
        load_items(str(bad), None)
