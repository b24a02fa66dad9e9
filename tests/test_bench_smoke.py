"""`steerserve bench` runs end to end (tiny model, tiny workload) and reports every ratio."""

import argparse

import pytest

from steerserve.clients.bench import add_bench_args, run_bench

pytestmark = pytest.mark.engine


@pytest.mark.parametrize("steer,mixed", [("infosteer", "half_half"), ("context", "quarter_steered")])
def test_bench_runs_all_workloads(tiny_llama, tmp_path, steer, mixed):
    p = argparse.ArgumentParser()
    add_bench_args(p)
    out = tmp_path / "bench.json"
    args = p.parse_args(["--model", str(tiny_llama), "--requests", "4", "--max-tokens", "4",
                         "--dtype", "float32", "--out", str(out), "--steer", steer, "--repeats", "1"])
    results = run_bench(args)
    assert set(results["runs"]) == {"engine_plain", "engine_plain_control", "engine_all_steered", f"engine_{mixed}",
                                    "engine_distinct_configs", "hf_shared_config", "hf_distinct_configs"}
    assert f"unsteered_rows_decode_time_{mixed}_over_plain" in results["ratios"]
    assert all(r["tok_per_s"] > 0 for r in results["runs"].values())
    assert "engine_vs_hf_distinct_configs" in results["ratios"] and out.exists()
