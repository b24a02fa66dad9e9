"""The per-step state (a `StepHandle`'s step) and the FFN hook's registered op: rows, grouping, and
survival under torch.compile; the mixing engine's routing and logits route."""

import contextlib

import torch

from steerserve.patches.plan import InfoSteerPlan, MixingPlan, SteerPlan
from steerserve.patches.steers.engine import RequestRows, Step, StepHandle, StepShape, ffn_steer, ffn_steer_
from steerserve.patches.steers.infosteer import formulas as infosteer
from steerserve.patches.steers.infosteer.engine import ENGINE as INFOSTEER
from steerserve.patches.steers.mixing.engine import ENGINE as MIXING

HANDLE = StepHandle((INFOSTEER, MIXING))


def infosteer_step(entries, device="cpu", num_tokens=-1):
    """The InfoSteer step state for (plan, start, end) per request (request i = entry i)."""
    plans = [(SteerPlan(infosteer=plan), RequestRows(i, s, e)) for i, (plan, s, e) in enumerate(entries)]
    step = HANDLE.begin(plans, StepShape(len(entries), num_tokens, device))
    HANDLE.end()
    return step.state("infosteer") if step is not None else None


@contextlib.contextmanager
def published(state):
    """Publish `state` as the handle's step for the block."""
    HANDLE.step = Step(StepShape(0, 0), {"infosteer": state}, {"ffn_": [INFOSTEER]})
    try:
        yield
    finally:
        HANDLE.end()


def current():
    return HANDLE.step

SCALE = InfoSteerPlan(layers=(0, 2), mode="scale", alpha=2.0)
TOPK = InfoSteerPlan(layers=(1,), mode="topk", alpha=3.0, k=2)
LIFT = InfoSteerPlan(layers=(0,), mode="lift", alpha=1.5, m=3)


def test_no_entries_means_no_context():
    assert infosteer_step([], "cpu") is None


def test_op_touches_only_the_steered_rows_of_its_layers():
    torch.manual_seed(0)
    x = torch.randn(10, 8)
    # request A: rows 0-3 (prefill chunk), B: row 4 (decode), C: rows 5-6, rows 7-9 unsteered
    ctx = infosteer_step([(SCALE, 0, 4), (TOPK, 4, 5), (LIFT, 5, 7)], "cpu")
    assert ctx.num_requests == 3
    layer0 = x.clone()
    with published(ctx):
        ffn_steer_(layer0, HANDLE.index, 0)
    assert current() is None
    torch.testing.assert_close(layer0[0:4], x[0:4] * 2.0)
    assert torch.equal(layer0[4], x[4])  # TOPK is not on layer 0
    torch.testing.assert_close(layer0[5:7], infosteer.apply_one(x[5:7], "lift", 1.5, m=3))
    assert torch.equal(layer0[7:], x[7:])
    layer1 = x.clone()
    with published(ctx):
        ffn_steer_(layer1, HANDLE.index, 1)
    assert torch.equal(layer1[:4], x[:4]) and torch.equal(layer1[5:], x[5:])
    torch.testing.assert_close(layer1[4:5], infosteer.apply_one(x[4:5], "topk", 3.0, k=2))


def test_requests_with_one_config_share_a_group():
    ctx = infosteer_step([(SCALE, 0, 2), (SCALE, 2, 3), (SCALE, 5, 6)], "cpu")
    (group,) = ctx.groups[0]
    assert group.rows.tolist() == [0, 1, 2, 5]
    assert ctx.groups[2] == [group]
    distinct = [(InfoSteerPlan(layers=(0, 2), mode="scale", alpha=1 + i / 10), i, i + 1) for i in range(32)]
    ctx = infosteer_step(distinct, "cpu")
    assert len(ctx.groups[0]) == 1  # 32 distinct alphas: still one batched op per layer
    assert torch.allclose(ctx.groups[0][0].alpha, torch.tensor([1 + i / 10 for i in range(32)]))


def test_op_runs_inside_a_compiled_graph():
    """Compiled while no context is set, the graph still applies a context published later."""

    def mlp(x):
        h = torch.nn.functional.silu(x) * 2
        ffn_steer(h, HANDLE.index, 0)  # what steerable MLPs call: must pick the registered op when compiling
        return h.sum(-1)

    compiled = torch.compile(mlp, fullgraph=True)
    x = torch.randn(4, 8)
    plain = compiled(x)
    torch.testing.assert_close(plain, mlp(x))
    ctx = infosteer_step([(SCALE, 1, 3)], "cpu")
    with published(ctx):
        steered = compiled(x)
    expected = plain.clone()
    expected[1:3] *= 2.0
    torch.testing.assert_close(steered, expected)
    assert torch.equal(steered[0], plain[0]) and torch.equal(steered[3], plain[3])


def test_scale_fast_paths_equal_the_reference_formula():
    """Contiguous and scattered uniform-alpha groups (the one-kernel paths) round exactly like
    infosteer.scale_rows, in bfloat16 too."""
    torch.manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(12, 16).to(dtype)
        plan = InfoSteerPlan(layers=(0,), mode="scale", alpha=1.37)
        for ranges in ([(2, 5), (5, 9)], [(0, 2), (6, 7), (9, 12)]):
            ctx = infosteer_step([(plan, s, e) for s, e in ranges], "cpu")
            (group,) = ctx.groups[0]
            assert (group.span is not None) == (len(ranges) == 2) and group.uniform_alpha == 1.37
            y = x.clone()
            with published(ctx):
                ffn_steer_(y, HANDLE.index, 0)
            rows = group.rows
            expected = x.clone()
            expected[rows] = infosteer.scale_rows(x[rows], torch.full((len(rows),), 1.37))
            assert torch.equal(y, expected), dtype


def test_scale_with_per_row_alphas_equals_the_reference_formula():
    torch.manual_seed(4)
    x = torch.randn(6, 16).to(torch.bfloat16)
    entries = [(InfoSteerPlan(layers=(0,), mode="scale", alpha=a), i, i + 1) for i, a in enumerate([0.3, 1.7, 2.9])]
    for shift in (0, 1):  # contiguous rows 0-2, then rows 1, 3, 5
        ctx = infosteer_step([(p, s * (1 + shift) + shift, s * (1 + shift) + shift + 1) for p, s, _ in entries],
                                 "cpu")
        (group,) = ctx.groups[0]
        y = x.clone()
        with published(ctx):
            ffn_steer(y, HANDLE.index, 0)
        expected = x.clone()
        expected[group.rows] = infosteer.scale_rows(x[group.rows], group.alpha)
        assert torch.equal(y, expected)


def test_step_mixing_rows_and_logits_route():
    import torch

    from steerserve.patches.steers.mixing.engine import LogitsRoute, StepMixing

    # request 0: TAIA rows 0-3 (variant 0); request 1 unmixed rows 3-5; request 2: tuned rows 5-6 (variant 0);
    # request 3: ffn-only rows 6-9 (variant 1)
    def mix_plan(index, attention, ffn):
        return SteerPlan(mixing=MixingPlan("v", attention, ffn, "weights", index))

    step = HANDLE.begin([(mix_plan(0, "tuned", "base"), RequestRows(0, 0, 3)),
                         (mix_plan(0, "tuned", "tuned"), RequestRows(2, 5, 6)),
                         (mix_plan(1, "base", "tuned"), RequestRows(3, 6, 9))], StepShape(4, -1))
    HANDLE.end()
    mix = step.state("mixing").mix
    assert isinstance(mix, StepMixing)
    groups = {(c, v): (rows.tolist(), span) for c in ("attention", "ffn") for v, rows, span in mix.groups(c)}
    assert groups == {("attention", 0): ([0, 1, 2, 5], None), ("ffn", 0): ([5], (5, 6)),
                      ("ffn", 1): ([6, 7, 8], (6, 9))}
    hidden = torch.randn(9, 4)
    route = LogitsRoute(hidden, mix)
    # sampled rows (a gathered copy, one per request): by request index, LM head = attention component
    assert {v: r.tolist() for v, r in route.rows_for(hidden[torch.tensor([2, 4, 5, 8])]).items()} == {0: [0, 2]}
    # a prompt-logprobs slice of the step's hidden states: by token offset
    assert {v: r.tolist() for v, r in route.rows_for(hidden[2:6]).items()} == {0: [0, 3]}
    assert route.rows_for(torch.randn(3, 4)) is None  # neither: not routed (logged by the adapter)


def test_unknown_engine_settings_are_refused():
    import pytest

    from steerserve.patches.steers.proxy.engine import ENGINE as PROXY

    StepHandle((INFOSTEER, MIXING, PROXY), {"graph_safe_steps": True, "graph_sorted_rows": 8, "full_variants": [],
                                            "proxy_pairs": []})
    with pytest.raises(ValueError, match=r"unknown steerserve engine setting\(s\) \['graph_safe_step'\]"):
        StepHandle((INFOSTEER,), {"graph_safe_step": True})
