"""`steerserve bench` runs end to end (tiny model, tiny workload) and reports every ratio."""

import argparse

import pytest

from steerserve.clients.bench import add_bench_args, run_bench

pytestmark = pytest.mark.engine


def bench_args(model, out, steer, *more):
    """`steerserve bench` arguments for a tiny workload: 4 requests x 4 tokens, float32, one round."""
    p = argparse.ArgumentParser()
    add_bench_args(p)
    return p.parse_args(["--model", str(model), "--requests", "4", "--max-tokens", "4", "--dtype", "float32",
                         "--out", str(out), "--steer", steer, "--repeats", "1", *more])


@pytest.mark.parametrize("steer,mixed", [("infosteer", "half_half"), ("context", "quarter_steered")])
def test_bench_runs_all_workloads(tiny_llama, tmp_path, steer, mixed):
    out = tmp_path / "bench.json"
    results = run_bench(bench_args(tiny_llama, out, steer))
    assert set(results["runs"]) == {"engine_plain", "engine_plain_control", "engine_all_steered", f"engine_{mixed}",
                                    "engine_distinct_configs", "hf_shared_config", "hf_distinct_configs",
                                    *(["engine_one_steered"] if steer == "context" else [])}
    assert f"unsteered_rows_decode_time_{mixed}_over_plain" in results["ratios"]
    if steer == "context":
        assert {"decode_step_extra_one_steered_row", "decode_step_extra_all_steered_rows"} <= set(results["ratios"])
    assert all(r["tok_per_s"] > 0 for r in results["runs"].values())
    assert "engine_vs_hf_distinct_configs" in results["ratios"] and out.exists()


def test_context_kernel_bench_runs(tiny_llama, tmp_path):
    out = tmp_path / "bench.json"
    results = run_bench(bench_args(tiny_llama, out, "context-kernel", "--context-tokens", "300"))
    assert [(r["context"], r["steered_rows"]) for r in results["decode"]] == [(300, 1), (300, 8), (300, 32)]
    assert all(r["torch_ms"] > 0 and r["auto_ms"] > 0 for r in results["decode"]) and out.exists()
    assert results["prefill"][0]["ms_per_request"] > 0


def test_mixing_bench_runs(tiny_llama, tmp_path):
    out = tmp_path / "bench.json"
    results = run_bench(bench_args(tiny_llama, out, "mixing"))
    assert set(results["tok_per_s"]) == {
        "no_variants_plain", "no_variants_plain_control", "variant_loaded_plain", "variant_loaded_all_tuned",
        "variant_loaded_all_taia", "variant_loaded_tuned_taia_half", "variant_loaded_quarter_taia",
        "variant_loaded_one_taia", "hf_two_models_two_batches"}
    assert all(v > 0 for v in results["tok_per_s"].values())
    assert all(v == v for v in results["ratios"].values()), results["ratios"]  # no NaN
    assert "taia_vs_tuned_rows_in_one_half_half_batch" in results["ratios"] and out.exists()
    assert {"decode_step_extra_one_taia_row", "decode_step_extra_all_taia_rows"} <= set(results["ratios"])


def test_mixing_bits_check_runs(tiny_llama, tmp_path):
    """The check sees the TAIA rows change and reports the unmixed rows against the stock engine's
    own batch-composition differences (float32 here: all bit-identical)."""
    out = tmp_path / "bits.json"
    results = run_bench(bench_args(tiny_llama, out, "mixing-bits"))
    unmixed = results["variant loaded: unmixed rows of a quarter-TAIA batch vs the all-plain batch"]
    assert unmixed == {"rows": 3, "rows_with_equal_tokens": 3, "max_abs_logprob_difference": 0.0}
    assert results["stock: the unmixed prompts alone vs among all"]["max_abs_logprob_difference"] == 0.0
    assert results["TAIA rows differ from plain (the check can see a change)"]["max_abs_logprob_difference"] > 0
    assert out.exists()


def test_proxy_bench_runs(tiny_llama, tmp_path):
    out = tmp_path / "bench.json"
    results = run_bench(bench_args(tiny_llama, out, "proxy"))
    assert set(results["tok_per_s"]) == {
        "base_alone_plain", "base_alone_plain_control", "expert_alone_plain", "anti_expert_alone_plain",
        "pair_loaded_plain", "pair_loaded_all_proxy", "pair_loaded_quarter_proxy", "pair_loaded_one_proxy",
        "hf_three_models_batched", "hf_base_alone_batched"}
    assert all(v > 0 for v in results["tok_per_s"].values())
    assert all(v == v for v in results["ratios"].values()), results["ratios"]  # no NaN
    assert "proxy_cost_over_sum_of_three_plain_costs" in results["ratios"] and out.exists()
    assert {"decode_step_extra_one_proxy_row", "decode_step_extra_quarter_proxy_rows"} <= set(results["ratios"])


def test_vectors_bench_runs(tiny_llama, tmp_path):
    from tiny_models import tiny_vectors

    out = tmp_path / "bench.json"
    results = run_bench(bench_args(tiny_llama, out, "vectors", "--vector", tiny_vectors(tiny_llama)["joy"]))
    assert set(results["tok_per_s"]) == {
        "plain", "plain_control", "shared_all_layers", "distinct_8", "distinct_4", "quarter_shared",
        "hf_plain", "hf_shared_all_layers", "hf_distinct_4"}
    assert results["config"]["hooks_baseline"] == "repeng"
    assert all(v > 0 for v in results["tok_per_s"].values())
    assert all(v == v for v in results["ratios"].values()), results["ratios"]  # no NaN
    assert "engine_vs_repeng_distinct_4" in results["ratios"] and out.exists()
