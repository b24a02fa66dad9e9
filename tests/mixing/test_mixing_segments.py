"""TAIA mixing's eager row segmentation (patches/steers/mixing/engine.py): a mixed step splits each
routed linear site's rows into groups, one per set of weights, so every row is computed once; the
groups cover every row exactly once; the result equals the base on unmixed rows and the variant's
shadow on routed ones, with the module's (out, bias) structure kept."""

import pytest
import torch

from steerserve.patches.plan import MixingPlan
from steerserve.patches.steers.engine import RequestRows
from steerserve.patches.steers.mixing.engine import StepMixing, segmented_forward

from test_mixing_graph import expected, modules, plan, steps

N, D = 24, 16


@pytest.mark.parametrize("label, entries", list(steps()))
@pytest.mark.parametrize("component", ["attention", "ffn"])
@torch.no_grad()
def test_segments_cover_every_row_once_and_compute_each_with_its_weights(label, entries, component):
    base, shadows = modules()
    x = torch.randn(N, D)
    mix = StepMixing.build(entries, num_reqs=len(entries), device="cpu", num_tokens=N)
    want = expected(x, base, shadows, entries, component)
    if mix is None:
        assert not any(p.routes for p, _ in entries), label
        return
    variants = tuple(v for v in mix.variants(component) if shadows[v] is not None)
    if not variants:  # nothing with weights of its own at this site: the plain forward
        assert torch.equal(base(x), want)
        return
    segments = mix.segments(component, variants)
    covered = torch.cat([rows for _, rows, _ in segments]).sort().values
    assert torch.equal(covered, torch.arange(N)), label  # each row in exactly one group
    for _, rows, span in segments:
        if span is not None:
            assert torch.equal(rows, torch.arange(*span))
    groups = [(None if v is None else shadows[v], rows, span) for v, rows, span in segments]
    got = segmented_forward(x, groups, base)
    assert torch.allclose(got, want, atol=1e-6), label
    # a linear that returns (out, bias) keeps that structure; the base group's forward is its own
    with_bias = segmented_forward(x, groups, lambda part: (base(part), "bias"))
    assert with_bias[1] == "bias" and torch.allclose(with_bias[0], want, atol=1e-6)


def test_one_owner_of_every_row_runs_alone():
    base, shadows = modules()
    x = torch.randn(N, D)
    mix = StepMixing.build([(plan(0, "tuned", "base"), RequestRows(0, 0, N))], 1, "cpu", N)
    (segment,) = mix.segments("attention", (0,))
    assert segment[0] == 0 and segment[2] == (0, N)
    calls = []
    shadow = shadows[0]
    got = segmented_forward(x, [(lambda part: calls.append(part.shape[0]) or shadow(part), *segment[1:])], base)
    assert calls == [N] and torch.equal(got, shadow(x))


def test_segments_are_made_once_per_step():
    mix = StepMixing.build([(MixingPlan("v0", "tuned", "base", "weights", 0), RequestRows(0, 3, 9))], 2, "cpu", 12)
    first = mix.segments("attention", (0,))
    assert mix.segments("attention", (0,)) is first
    assert [(v, span) for v, _, span in first] == [(None, None), (0, (3, 9))]  # rows 0-2 and 9-11: one group
    assert first[0][1].tolist() == [0, 1, 2, 9, 10, 11]
