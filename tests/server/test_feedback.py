"""A/B feedback store: persistence across reopen, per-arm summaries and their intervals."""

import math

import pytest

from steerserve.server.feedback import FeedbackStore, mean_ci, t95, wilson


def test_intervals():
    assert mean_ci([]) == {"n": 0, "mean": None, "ci95": None}
    assert mean_ci([0.5])["ci95"] is None
    r = mean_ci([1.0, 2.0, 3.0, 4.0])
    half = t95(3) * math.sqrt(5 / 3) / 2  # t(3) * sd / sqrt(n)
    assert r["mean"] == 2.5 and r["ci95"] == pytest.approx([2.5 - half, 2.5 + half])
    assert t95(1000) == 1.96
    lo, hi = wilson(8, 10)
    assert 0.49 < lo < 0.5 and 0.94 < hi < 0.95  # the textbook Wilson interval for 8/10
    assert wilson(0, 0) is None


def test_store_persists_and_summarises(tmp_path):
    path = tmp_path / "ab.sqlite3"
    store = FeedbackStore(path)
    for i in range(6):
        store.record_response(f"r{i}", "tone", "control" if i % 2 else "strong", f"u{i}")
    store.record_response("other", "else", "a", None)
    store.add_feedback("r0", "score", 0.9, None)
    store.add_feedback("r2", "score", 0.7, "ok")
    store.add_feedback("r2", "score", 0.8, "changed my mind")  # replaces
    store.add_feedback("r1", "thumbs", 1.0, None)
    store.add_feedback("r3", "thumbs", 0.0, None)
    store.close()
    store = FeedbackStore(path)  # a restart: nothing lost
    assert store.response("r4") == ("tone", "strong") and store.response("nope") is None
    assert store.served("r4") == ("tone", "strong", "u4") and store.served("other") == ("else", "a", None)
    assert store.served("nope") is None
    summary = {a["arm"]: a for a in store.summary("tone", ["control", "strong", "unused"])["arms"]}
    assert summary["strong"]["responses"] == 3 and summary["strong"]["feedback"] == 2
    assert summary["strong"]["score"]["mean"] == pytest.approx(0.85)
    assert summary["control"]["thumbs"] == {"n": 2, "up": 1, "up_rate": 0.5, "ci95": pytest.approx(wilson(1, 2))}
    assert summary["unused"]["responses"] == 0 and summary["unused"]["score"]["mean"] is None
