"""The steering vectors' graph-safe form (patches/steers/vectors/engine.py, `VectorBuffers`): the
fixed op equals the eager engine path on any steering (bit for bit), leaves unsteered rows
untouched, checks its capacity, compiles with fullgraph and serves differently steered steps with
zero recompilations; captured in a CUDA graph it replays new buffer contents (CUDA only)."""

import random
from types import SimpleNamespace

import pytest
import torch

from steerserve.patches.steers.engine import RequestRows, StepShape
from steerserve.patches.steers.vectors import VectorsPlan, VectorTerm
from steerserve.patches.steers.vectors.engine import ENGINE, VectorBuffers, VectorStore, vectors_fixed_

LAYERS, H, N, SLOTS = 5, 48, 40, 34
NAMES = ("a", "b", "c")


def store(dtype=torch.float32, device="cpu") -> VectorStore:
    g = torch.Generator().manual_seed(0)
    vectors = {}
    for k, name in enumerate(NAMES):
        dense = torch.randn(LAYERS, H, generator=g)
        dense[k % LAYERS] = 0  # each vector lacks a layer
        vectors[name] = dense
    return VectorStore(LAYERS, H, dtype, device, vectors)


def random_plan(rng: random.Random) -> VectorsPlan:
    terms = []
    for _ in range(rng.randint(1, 3)):
        layers = tuple(sorted(rng.sample(range(LAYERS), rng.randint(1, LAYERS))))
        terms.append(VectorTerm(rng.choice(NAMES), round(rng.uniform(-3, 3), 3), layers,
                                rng.choice(["all", "all", "prompt", "generated"])))
    return VectorsPlan(tuple(terms))


def rows(i, start, end, prompt=None, first=0):
    return RequestRows(i, start, end, f"r{i}", prompt, first)


def steps(rng: random.Random):
    """Named steps whose steering differs: none, one config, 32 distinct, prefills crossing the
    prompt / generated border, decode rows."""
    one = random_plan(rng)
    yield "none", []
    yield "one config", [(one, rows(0, 0, 5, 5)), (one, rows(1, 9, 10, 3, 7))]
    yield "32 distinct", [(random_plan(rng), rows(i, i, i + 1, 4, 6)) for i in range(32)]
    mixed, row = [], 0
    for i in range(12):
        length = rng.choice([1, 1, 4])
        if rng.random() < 0.8:
            mixed.append((random_plan(rng), rows(i, row, row + length, rng.randint(1, 8), rng.randint(0, 6))))
        row += length
    yield "mixed, prompt / generated borders", mixed


def eager(s: VectorStore, x: torch.Tensor, entries, layer: int) -> torch.Tensor:
    y = x.clone()
    handle = SimpleNamespace(resources={"vectors": s}, buffer_served=set())
    state = ENGINE.build_step(entries, StepShape(len(entries), N), handle)
    if state is not None:
        state.apply_(y, layer)
    return y


def no_zeros(dtype) -> torch.Tensor:
    """Hidden states without exact zeros (+0.0 added to -0.0 gives +0.0: the one value the fixed
    op's adds of zeros change)."""
    x = torch.randn(N, H)
    return (x + torch.sign(x) * 0.01).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fixed_op_equals_the_eager_path(dtype):
    rng = random.Random(0)
    torch.manual_seed(0)
    s = store(dtype)
    buffers = VectorBuffers(s, 64, SLOTS)
    for name, entries in steps(rng):
        x = no_zeros(dtype)
        assert buffers.fill_(entries), name
        for layer in range(LAYERS):
            y = x.clone()
            buffers.apply_(y, layer)
            expected = eager(s, x, entries, layer)
            assert torch.equal(y, expected), (name, layer, (y.float() - expected.float()).abs().max())


def test_unsteered_rows_are_bit_identical():
    rng = random.Random(1)
    s = store(torch.bfloat16)
    buffers = VectorBuffers(s, 64, SLOTS)
    x = no_zeros(torch.bfloat16)
    assert buffers.fill_([(random_plan(rng), rows(0, 3, 6)), (random_plan(rng), rows(1, 10, 11))])
    y = x.clone()
    buffers.apply_(y, 1)
    for r in set(range(N)) - {3, 4, 5, 10}:
        assert torch.equal(y[r], x[r]), r
    assert buffers.fill_([])
    y = x.clone()
    buffers.apply_(y, 1)
    assert torch.equal(y, x)


def test_capacity_is_checked_and_slots_are_reused():
    rng = random.Random(2)
    s = store()
    buffers = VectorBuffers(s, 16, 2)
    plans = [random_plan(rng) for _ in range(3)]
    assert not buffers.fill_([(plans[i], rows(i, i, i + 1)) for i in range(3)])  # 3 configurations > 2
    assert not buffers.fill_([(plans[0], rows(0, 10, 17))])  # row 16 >= 16 tokens
    assert buffers.fill_([(plans[0], rows(0, 0, 4)), (plans[1], rows(1, 4, 5))])
    assert buffers.fill_([(plans[1], rows(0, 0, 1)), (plans[2], rows(1, 1, 2))])  # plan 1 keeps its slot
    assert buffers.keys.count(None) == 1  # slot 0 only


def test_compiles_fullgraph_with_no_recompilation_across_steps():
    """The op compiled once (fullgraph, inductor) serves every step after warm-up: zero
    recompilations while the steering changes; equal to eager within 1e-6 (float32)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(vectors_fixed_, fullgraph=True, backend=counter, dynamic=False)
    rng = random.Random(3)
    s = store()
    b = VectorBuffers(s, 64, SLOTS)
    x = no_zeros(torch.float32)

    def run(fn, layer):
        y = x.clone()
        fn(y, b.table[layer], b.slot_of_row)
        return y

    assert b.fill_([])
    run(compiled, 0)  # warm-up
    warm = counter.frame_count
    assert warm == 1
    seen = 0
    for _round in range(2):
        for name, entries in steps(rng):
            assert b.fill_(entries)
            for layer in range(LAYERS):
                torch.testing.assert_close(run(compiled, layer), run(vectors_fixed_, layer), atol=1e-6, rtol=1e-6,
                                           msg=name)
                seen += 1
    assert counter.frame_count == warm, f"recompiled {counter.frame_count - warm} times over {seen} steps"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA GPU (none here)")
def test_cuda_graph_replays_new_buffer_contents():
    """Captured once with no steering, the graph replays each later step's buffers: equal to the
    eager engine path."""
    rng = random.Random(4)
    s = store(torch.bfloat16, "cuda")
    buffers = VectorBuffers(s, 64, SLOTS)
    x = no_zeros(torch.bfloat16).cuda()
    static = x.clone()
    layer = 2
    assert buffers.fill_([])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up outside the capture
            static.copy_(x)
            buffers.apply_(static, layer)
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        buffers.apply_(static, layer)
    for name, entries in steps(rng):
        assert buffers.fill_(entries)
        static.copy_(x)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(static, eager(s, x, entries, layer)), name
