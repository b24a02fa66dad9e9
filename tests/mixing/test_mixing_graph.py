"""TAIA mixing's graph-safe routing (patches/steers/mixing/graph.py): the fixed op overwrites exactly
the routed rows with the variant's shadow, leaves every other row bit-identical, compiles with
fullgraph and serves differently routed steps with zero recompilations; captured in a CUDA graph
it replays new buffer contents (CUDA only)."""

import pytest
import torch

from steerserve.patches.plan import MixingPlan
from steerserve.patches.steers.engine import RequestRows
from steerserve.patches.steers.mixing import graph

N, D, V, R = 24, 16, 2, 12


def plan(variant: int, attention: str, ffn: str) -> MixingPlan:
    return MixingPlan(f"v{variant}", attention, ffn, "weights", variant)


def steps():
    yield "none", []
    yield "one taia request", [(plan(0, "tuned", "base"), RequestRows(0, 2, 5))]
    yield "two variants, scattered", [(plan(0, "tuned", "tuned"), RequestRows(0, 0, 1)),
                                       (plan(1, "tuned", "base"), RequestRows(1, 3, 4)),
                                       (plan(0, "tuned", "base"), RequestRows(2, 7, 12)),
                                       (plan(1, "base", "tuned"), RequestRows(3, 20, 24))]
    yield "base/base routes nothing", [(plan(0, "base", "base"), RequestRows(0, 0, 8))]


def modules():
    torch.manual_seed(0)
    base = torch.nn.Linear(D, D)
    shadows = [torch.nn.Linear(D, D), None]  # variant 1's weights equal the base's at this site
    return base, shadows


def expected(x, base, shadows, entries, component):
    out = base(x)
    for p, rows in entries:
        if p.routes and getattr(p, component) == "tuned" and shadows[p.index] is not None:
            out[rows.start : rows.end] = shadows[p.index](x[rows.start : rows.end])
    return out


@torch.no_grad()
def test_fixed_routing_overwrites_exactly_the_routed_rows():
    base, shadows = modules()
    buffers = graph.MixingBuffers(V, R)
    x = torch.randn(N, D)
    for name, entries in steps():
        assert buffers.fill_(entries), name
        for component in ("attention", "ffn"):
            c = graph.COMPONENT_INDEX[component]
            out = base(x)
            graph.route_fixed_(out, x, shadows, buffers.rows[c], buffers.valid[c])
            want = expected(x, base, shadows, entries, component)
            routed = {t for p, r in entries if p.routes and getattr(p, component) == "tuned" and p.index == 0
                      for t in range(r.start, r.end)}
            for t in range(N):
                if t in routed:
                    torch.testing.assert_close(out[t], want[t], msg=f"{name} {component} row {t}")
                else:
                    assert torch.equal(out[t], want[t]), f"{name} {component}: unrouted row {t} changed"


def test_capacity_is_checked():
    buffers = graph.MixingBuffers(V, 4)
    assert not buffers.fill_([(plan(0, "tuned", "base"), RequestRows(0, 0, 5))])
    assert not buffers.fill_([(plan(2, "tuned", "base"), RequestRows(0, 0, 1))])  # no variant 2
    assert buffers.fill_([(plan(0, "tuned", "base"), RequestRows(0, 0, 4))])


@torch.no_grad()
def test_compiles_fullgraph_with_no_recompilation_across_steps():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    base, shadows = modules()
    compiled = torch.compile(lambda out, x, rows, valid: graph.route_fixed_(out, x, shadows, rows, valid),
                             fullgraph=True, backend=counter, dynamic=False)
    buffers = graph.MixingBuffers(V, R)
    x = torch.randn(N, D)
    assert buffers.fill_([])
    compiled(base(x), x, buffers.rows[0], buffers.valid[0])
    warm = counter.frame_count
    seen = 0
    for _round in range(2):
        for name, entries in steps():
            assert buffers.fill_(entries)
            for c in (0, 1):
                got, want = base(x), base(x)
                compiled(got, x, buffers.rows[c], buffers.valid[c])
                graph.route_fixed_(want, x, shadows, buffers.rows[c], buffers.valid[c])
                torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6, msg=name)
                seen += 1
    assert counter.frame_count == warm, f"recompiled {counter.frame_count - warm} times over {seen} steps"
    print(f"[graph] {seen} differently routed steps after warm-up: {counter.frame_count - warm} recompilations")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA GPU (none here)")
@torch.no_grad()
def test_cuda_graph_replays_new_buffer_contents():
    base, shadows = modules()
    base, shadows = base.cuda(), [s.cuda() if s is not None else None for s in shadows]
    buffers = graph.MixingBuffers(V, R, "cuda")
    x = torch.randn(N, D, device="cuda")
    out = torch.empty(N, D, device="cuda")
    assert buffers.fill_([])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            out.copy_(base(x))
            graph.route_fixed_(out, x, shadows, buffers.rows[0], buffers.valid[0])
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out.copy_(base(x))
        graph.route_fixed_(out, x, shadows, buffers.rows[0], buffers.valid[0])
    for name, entries in steps():
        assert buffers.fill_(entries)
        g.replay()
        torch.cuda.synchronize()
        want = base(x)
        graph.route_fixed_(want, x, shadows, buffers.rows[0], buffers.valid[0])
        assert torch.equal(out, want), name
