"""InfoSteer's graph-safe step data (patches/steers/infosteer/graph.py): the fixed op equals the eager
engine path on any steering; it compiles with fullgraph and runs a sequence of differently steered
steps with zero recompilations; captured in a CUDA graph it replays new buffer contents (CUDA only)."""

import random

import pytest
import torch

from steerserve.patches.plan import InfoSteerPlan
from steerserve.patches.steers.engine import RequestRows
from steerserve.patches.steers.infosteer import graph
from steerserve.patches.steers.infosteer.engine import build_groups

LAYERS, D, N = 4, 96, 40
CAP = graph.Capacity(tokens=64, slots=40, sorted_rows=48, num_layers=LAYERS)


def random_plan(rng: random.Random, mode: str | None = None) -> InfoSteerPlan:
    mode = mode or rng.choice(["scale", "topk", "lift"])
    layers = tuple(sorted(rng.sample(range(LAYERS), rng.randint(1, LAYERS))))
    alpha = round(rng.uniform(0.2, 3.0), 3)
    if mode == "topk":
        return InfoSteerPlan(layers=layers, mode=mode, alpha=alpha, k=rng.randint(1, D))
    if mode == "lift":
        return InfoSteerPlan(layers=layers, mode=mode, alpha=alpha, m=rng.randint(1, D), p=0.1)
    return InfoSteerPlan(layers=layers, mode=mode, alpha=alpha)


def steps(rng: random.Random):
    """Named steps whose steering differs: none, one config, 32 distinct, mixed modes and layer sets."""
    one = random_plan(rng, "scale")
    yield "none", []
    yield "one config", [(one, RequestRows(0, 0, 5)), (one, RequestRows(1, 9, 10))]
    yield "32 distinct scale", [(random_plan(rng, "scale"), RequestRows(i, i, i + 1)) for i in range(32)]
    mixed, row = [], 0
    for i in range(12):
        length = rng.choice([1, 1, 3])
        if rng.random() < 0.8:
            mixed.append((random_plan(rng), RequestRows(i, row, row + length)))
        row += length
    yield "mixed modes and layer sets", mixed
    yield "topk and lift prefill", [(random_plan(rng, "topk"), RequestRows(0, 2, 20)),
                                     (random_plan(rng, "lift"), RequestRows(1, 20, 36))]


def tie_free(n: int, dtype) -> torch.Tensor:
    """Rows whose coefficients have distinct magnitudes (exact in bfloat16): top-k and lift choose
    the same coefficients whatever breaks ties (the fixed op's stable sorts take the lowest index,
    `torch.topk`'s choice is unspecified)."""
    rows = [(torch.randperm(D) + 1).float() / 16 * (torch.randint(0, 2, (D,)) * 2 - 1) for _ in range(n)]
    return torch.stack(rows).to(dtype)


def eager(x: torch.Tensor, entries, layer: int) -> torch.Tensor:
    y = x.clone()
    state = build_groups(entries, "cpu")
    if state is not None:
        for group in state.groups.get(layer, ()):
            group.apply_(y)
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fixed_op_equals_the_eager_path(dtype):
    rng = random.Random(0)
    torch.manual_seed(0)
    buffers = graph.InfoSteerBuffers(CAP)
    for name, entries in steps(rng):
        x = tie_free(N, dtype)
        assert buffers.fill_(entries), name
        for layer in range(LAYERS):
            y = x.clone()
            graph.apply_buffers_(y, buffers, layer)
            expected = eager(x, entries, layer)
            assert torch.equal(y, expected), (name, layer, (y.float() - expected.float()).abs().max())


def test_unsteered_rows_are_bit_identical():
    rng = random.Random(1)
    buffers = graph.InfoSteerBuffers(CAP)
    x = torch.randn(N, D, dtype=torch.bfloat16)
    entries = [(random_plan(rng, "topk"), RequestRows(0, 3, 6)), (random_plan(rng, "scale"), RequestRows(1, 10, 11))]
    assert buffers.fill_(entries)
    y = x.clone()
    graph.apply_buffers_(y, buffers, 0)
    steered = set(range(3, 6)) | {10}
    for r in range(N):
        if r not in steered:
            assert torch.equal(y[r], x[r]), r
    assert buffers.fill_([])
    y = x.clone()
    graph.apply_buffers_(y, buffers, 0)
    assert torch.equal(y, x)


def test_capacity_is_checked():
    rng = random.Random(2)
    buffers = graph.InfoSteerBuffers(graph.Capacity(tokens=16, slots=2, sorted_rows=4, num_layers=LAYERS))
    assert not buffers.fill_([(random_plan(rng), RequestRows(i, i, i + 1)) for i in range(3)])  # 3 configs > 2
    assert not buffers.fill_([(random_plan(rng, "topk"), RequestRows(0, 0, 5))])  # 5 sorted rows > 4
    assert not buffers.fill_([(random_plan(rng, "scale"), RequestRows(0, 10, 17))])  # row 16 >= 16 tokens
    assert buffers.fill_([(random_plan(rng, "lift"), RequestRows(0, 0, 4))])


def test_compiles_fullgraph_with_no_recompilation_across_steps():
    """The op body compiled once (fullgraph, inductor) serves every step after warm-up: zero
    recompilations while the steering changes; equal to eager within 1e-6 (float32)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(graph.infosteer_fixed_, fullgraph=True, backend=counter, dynamic=False)
    rng = random.Random(3)
    torch.manual_seed(3)
    buffers = graph.InfoSteerBuffers(CAP)
    x = torch.randn(N, D)
    b = buffers

    def run(fn, layer):
        y = x.clone()
        fn(y, b.row_slot, b.mode, b.alpha, b.count, b.layer_on[layer], b.sorted_rows)
        return y

    assert buffers.fill_([])
    run(compiled, 0)  # warm-up
    warm = counter.frame_count
    assert warm == 1
    seen = 0
    for _round in range(2):
        for name, entries in steps(rng):
            assert buffers.fill_(entries)
            for layer in range(LAYERS):
                torch.testing.assert_close(run(compiled, layer), run(graph.infosteer_fixed_, layer), atol=1e-6,
                                           rtol=1e-6, msg=name)
                seen += 1
    assert counter.frame_count == warm, f"recompiled {counter.frame_count - warm} times over {seen} steps"
    print(f"[graph] {seen} differently steered step-layers after warm-up: {counter.frame_count - warm} recompilations")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA GPU (none here)")
def test_cuda_graph_replays_new_buffer_contents():
    """Captured once with no steering, the graph replays each later step's buffers: equal to eager."""
    rng = random.Random(4)
    torch.manual_seed(4)
    device = "cuda"
    buffers = graph.InfoSteerBuffers(CAP, device)
    x = tie_free(N, torch.bfloat16).to(device)  # ties would break differently on CUDA and CPU
    static = x.clone()
    assert buffers.fill_([])
    layer = 1
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up outside the capture
            static.copy_(x)
            graph.apply_buffers_(static, buffers, layer)
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        graph.apply_buffers_(static, buffers, layer)
    for name, entries in steps(rng):
        assert buffers.fill_(entries)
        static.copy_(x)
        g.replay()
        torch.cuda.synchronize()
        expected = x.clone()
        graph.apply_buffers_(expected, buffers, layer)
        assert torch.equal(static, expected), name
        reference = eager(x.cpu(), [(p, r) for p, r in entries], layer)
        torch.testing.assert_close(static.cpu().float(), reference.float(), atol=2e-2, rtol=2e-2, msg=name)
