"""Ops under mpirun, each result checked against a closed form computed locally.

Rank j's input is ``x_j = j + offsets`` (offsets differ per element), so the expected
``neighbor_allreduce`` on rank i is ``sum_j W[i, j] x_j`` computed here in float64
from the topology's dense matrix - an independent computation of the same maths.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import decomm
from decomm import topology as T

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
SHAPES = [(), (0,), (7,), (3, 5), (2, 3, 4), (1000,)]


def rank_value(j: int, shape: tuple, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    numel = int(np.prod(shape)) if shape else 1
    offsets = (np.arange(numel, dtype=np.float64) % 13) / 16.0
    return torch.from_numpy((j + offsets).reshape(shape)).to(dtype)


def expected_mix(W: np.ndarray, i: int, shape: tuple) -> np.ndarray:
    n = W.shape[0]
    stack = np.stack([rank_value(j, shape).numpy() for j in range(n)])
    return np.tensordot(W[i], stack, axes=1)


def assert_close(got: torch.Tensor, want: np.ndarray, dtype: torch.dtype) -> None:
    assert got.dtype == dtype
    assert tuple(got.shape) == tuple(want.shape)
    g = got.double().numpy()
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    assert np.allclose(g, want, rtol=0, atol=TOL[dtype] * scale), (g, want)


def random_directed(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    W = rng.random((n, n)) * (rng.random((n, n)) < 0.5)
    np.fill_diagonal(W, rng.random(n) + 0.1)
    return W / W.sum(axis=1, keepdims=True)


def topologies(n: int):
    yield "ring", T.RingGraph(n)
    yield "exponential", T.ExponentialGraph(n)
    yield "one-peer-exp", T.OnePeerExponentialGraph(n)
    yield "base-k1", T.BaseGraph(n, 1)
    yield "base-k2", T.BaseGraph(n, 2)
    yield "full", T.FullyConnectedGraph(n)
    yield "star", T.StarGraph(n)
    yield "random-directed", T.Topology.from_matrices(
        [random_directed(n, 1), random_directed(n, 2)])


@pytest.mark.parametrize("kind", [k for k, _ in topologies(4)])
def test_neighbor_allreduce_every_round_of_topology(kind):
    n, r = decomm.size(), decomm.rank()
    topo = dict(topologies(n))[kind]
    decomm.set_topology(topo)
    for t in range(max(topo.rounds or 1, 1) + 1):
        x = rank_value(r, (3, 5))
        y = decomm.neighbor_allreduce(x, name=f"{kind}.{t}")
        assert_close(y, expected_mix(topo.matrix(t), r, (3, 5)), torch.float64)
        decomm.advance_round()
    assert decomm.current_round() == max(topo.rounds or 1, 1) + 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_neighbor_allreduce_dtypes_shapes(dtype, shape):
    n, r = decomm.size(), decomm.rank()
    topo = T.RingGraph(n)
    decomm.set_topology(topo)
    y = decomm.neighbor_allreduce(rank_value(r, shape, dtype), name="x")
    assert_close(y, expected_mix(topo.matrix(0), r, shape), dtype)


def test_non_contiguous_input_and_in_place():
    n, r = decomm.size(), decomm.rank()
    topo = T.ExponentialGraph(n)
    decomm.set_topology(topo)
    base = rank_value(r, (5, 4))
    x = base.t()  # non-contiguous view, shape (4, 5)
    assert not x.is_contiguous()
    want = np.stack([rank_value(j, (5, 4)).numpy().T for j in range(n)])
    want = np.tensordot(topo.matrix(0)[r], want, axes=1)
    y = decomm.neighbor_allreduce(x, name="nc")
    assert_close(y, want, torch.float64)
    assert torch.equal(x, base.t())  # input untouched
    out = decomm.neighbor_allreduce_(x, name="nc-inplace")
    assert out is x
    assert_close(base.t(), want, torch.float64)  # written through the view


@pytest.mark.parametrize("kind", ["ring", "one-peer-exp", "random-directed"])
@pytest.mark.parametrize("nonblocking", [False, True])
def test_neighbor_mix_delta_is_w_x_minus_x(kind, nonblocking):
    """out = (W(t) x)_i - x_i from the topology's dense matrix, x untouched, every round."""
    from decomm.ops import neighbor_mix_delta

    n, r = decomm.size(), decomm.rank()
    topo = dict(topologies(n))[kind]
    decomm.set_topology(topo)
    for t in range(max(topo.rounds or 1, 1)):
        x = rank_value(r, (3, 5))
        before = x.clone()
        out = torch.full_like(x, float("nan"))  # every entry must be written
        got = neighbor_mix_delta(x, out, name=f"delta.{kind}.{t}", nonblocking=nonblocking)
        if nonblocking:
            got = got.wait()
        assert got is out
        assert torch.equal(x, before)
        assert_close(out, expected_mix(topo.matrix(t), r, (3, 5)) - before.numpy(),
                     torch.float64)
        decomm.advance_round()


def test_neighbor_mix_delta_rejects_bad_out():
    from decomm.ops import neighbor_mix_delta

    decomm.set_topology(T.RingGraph(decomm.size()))
    x = torch.ones(6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"'bad-shape' on rank \d+: .*\(6,\).*\(5,\)"):
        neighbor_mix_delta(x, torch.empty(5, dtype=torch.float64), name="bad-shape")
    with pytest.raises(ValueError, match="same shape, dtype"):
        neighbor_mix_delta(x, torch.empty(6, dtype=torch.float32), name="bad-dtype")
    with pytest.raises(ValueError, match="overlaps"):
        neighbor_mix_delta(x, x, name="alias")
    big = torch.ones(12, dtype=torch.float64)
    with pytest.raises(ValueError, match="overlaps"):
        neighbor_mix_delta(big[:6], big[3:9], name="overlap")
    with pytest.raises(ValueError, match="contiguous"):
        neighbor_mix_delta(big[::2], torch.empty(6, dtype=torch.float64), name="strided")
    with pytest.raises(TypeError, match="torch tensors"):
        neighbor_mix_delta(np.ones(6), torch.empty(6, dtype=torch.float64), name="numpy")
    with pytest.raises(TypeError, match="int64 is not supported"):
        neighbor_mix_delta(torch.ones(6, dtype=torch.int64), torch.empty(6, dtype=torch.int64),
                           name="int")


def test_in_place_contiguous_returns_same_tensor():
    r = decomm.rank()
    topo = T.RingGraph(decomm.size())
    decomm.set_topology(topo)
    x = rank_value(r, (6,), torch.float32)
    ptr = x.data_ptr()
    assert decomm.neighbor_allreduce_(x) is x and x.data_ptr() == ptr
    assert_close(x, expected_mix(topo.matrix(0), r, (6,)), torch.float32)


def test_blocking_calls_take_the_native_path_and_give_the_general_paths_result(monkeypatch):
    """Plain contiguous float tensors go straight to C++ (decomm.ops._neighbor_allreduce_now);
    the result must be bitwise the general path's, and everything else must still take
    the general path (which owns conversions and error messages)."""
    from decomm import ops

    n, r = decomm.size(), decomm.rank()
    topo = T.ExponentialGraph(n)
    decomm.set_topology(topo)
    general = []
    real = ops._neighbor_allreduce

    def spy(tensor, *args):
        general.append(tensor)
        return real(tensor, *args)

    monkeypatch.setattr(ops, "_neighbor_allreduce", spy)
    want = expected_mix(topo.matrix(0), r, (300,))
    for dtype in DTYPES:
        x = rank_value(r, (300,), dtype)
        y = decomm.neighbor_allreduce(x, name=f"fast.{dtype}")
        assert_close(y, want, dtype)
        assert y.data_ptr() != x.data_ptr() and torch.equal(x, rank_value(r, (300,), dtype))
        z = x.clone()
        assert decomm.neighbor_allreduce_(z, name=f"fast-ip.{dtype}") is z
        assert torch.equal(z, y)
        assert torch.equal(real(x, None, None, None, f"general.{dtype}", False, False), y)
    assert general == []
    # what the native path leaves to the general one
    x2 = rank_value(r, (20, 15))
    others = [x2.t(), np.ascontiguousarray(x2.numpy()), x2.clone().requires_grad_()]
    for k, t in enumerate(others):
        decomm.neighbor_allreduce(t, name=f"general.{k}")
    assert len(general) == len(others)
    with pytest.raises(TypeError, match=f"'int' on rank {r}: dtype torch.int64 is not supported"):
        decomm.neighbor_allreduce_(torch.ones(3, dtype=torch.int64), name="int")
    with torch.inference_mode():  # no version counter to bump
        inf = rank_value(r, (300,))
    assert_close(decomm.neighbor_allreduce(inf, name="inference"), want, torch.float64)
    assert len(general) == len(others) + 2
    with torch.autograd.profiler.profile() as prof:  # recorded: the traced general path
        decomm.neighbor_allreduce(rank_value(r, (300,)), name="profiled")
    assert len(general) == len(others) + 3
    assert any(e.name == "decomm::neighbor_allreduce" for e in prof.function_events)


def test_native_in_place_call_bumps_the_version_counter():
    r = decomm.rank()
    decomm.set_topology(T.RingGraph(decomm.size()))
    w = torch.tensor([2.0], requires_grad=True)
    a = rank_value(r, (1,))  # no autograd history: the native path
    loss = (w * a).sum()  # saves a for backward
    v = a._version
    decomm.neighbor_allreduce_(a, name="a")
    assert a._version == v + 1
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_self_and_src_weight_override():
    n, r = decomm.size(), decomm.rank()
    topo = T.RingGraph(n)
    decomm.set_topology(topo)
    ins = decomm.in_neighbors()
    src = {j: 0.1 * (k + 1) for k, j in enumerate(ins[:1])}  # only the first in-neighbour
    y = decomm.neighbor_allreduce(rank_value(r, (4,)), self_weight=0.25, src_weights=src)
    want = 0.25 * rank_value(r, (4,)).numpy()
    for j, w in src.items():
        want = want + w * rank_value(j, (4,)).numpy()
    assert_close(y, want, torch.float64)


def test_dst_weights_dynamic_graph():
    n, r = decomm.size(), decomm.rank()
    if n == 1:
        pytest.skip("needs two ranks")
    # This call only: send 0.5 * x to r+1, receive from r-1 with weight 1.
    nxt, prv = (r + 1) % n, (r - 1) % n
    y = decomm.neighbor_allreduce(rank_value(r, (3,)), self_weight=0.5, src_weights={prv: 1.0},
                                  dst_weights={nxt: 0.5}, name="push")
    want = 0.5 * rank_value(r, (3,)).numpy() + 0.5 * rank_value(prv, (3,)).numpy()
    if n == 2:  # r+1 == r-1: still one message each way
        assert nxt == prv
    assert_close(y, want, torch.float64)


def test_nonblocking_many_in_flight_and_overlap():
    n, r = decomm.size(), decomm.rank()
    topo = T.BaseGraph(n, 2)
    decomm.set_topology(topo)
    handles = []
    for t in range(3):
        handles.append((t, decomm.neighbor_allreduce_nonblocking(
            rank_value(r, (257,), torch.float32), name=f"nb{t}")))
        busy = torch.randn(64, 64)
        for _ in range(5):
            busy = busy @ busy.T / 64  # compute while messages move
    for _, h in handles:
        y = h.wait()
        assert h.poll()
        assert_close(y, expected_mix(topo.matrix(0), r, (257,)), torch.float32)
        assert decomm.synchronize(h) is y  # a second wait returns the same result


def test_nonblocking_in_place():
    r = decomm.rank()
    topo = T.ExponentialGraph(decomm.size())
    decomm.set_topology(topo)
    x = rank_value(r, (5,))
    h = decomm.neighbor_allreduce_nonblocking_(x, name="nb-inplace")
    assert h.wait() is x
    assert_close(x, expected_mix(topo.matrix(0), r, (5,)), torch.float64)


def test_numpy_in_numpy_out():
    r = decomm.rank()
    topo = T.RingGraph(decomm.size())
    decomm.set_topology(topo)
    y = decomm.neighbor_allreduce(rank_value(r, (4,)).numpy())
    assert isinstance(y, np.ndarray)
    assert np.allclose(y, expected_mix(topo.matrix(0), r, (4,)), atol=1e-12)


def test_results_bitwise_identical_across_calls():
    r = decomm.rank()
    decomm.set_topology(T.FullyConnectedGraph(decomm.size()))
    x = torch.from_numpy(np.random.default_rng(r).standard_normal(10_000)).float()
    first = decomm.neighbor_allreduce(x, name="det")
    for _ in range(3):
        assert torch.equal(decomm.neighbor_allreduce(x, name="det"), first)
        h = decomm.neighbor_allreduce_nonblocking(x, name="det")
        assert torch.equal(h.wait(), first)


# ------------------------------------------------------------------ collectives
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_allreduce_average_and_sum(dtype):
    n, r = decomm.size(), decomm.rank()
    x = rank_value(r, (3, 3), dtype)
    mean = np.mean([rank_value(j, (3, 3)).numpy() for j in range(n)], axis=0)
    assert_close(decomm.allreduce(x), mean, dtype)
    assert_close(decomm.allreduce(x, average=False, name="sum"), mean * n, dtype)
    y = x.clone()
    assert decomm.allreduce_(y) is y
    assert_close(y, mean, dtype)


def test_allreduce_integers_and_nonblocking():
    n, r = decomm.size(), decomm.rank()
    got = decomm.allreduce(torch.tensor([r, 1], dtype=torch.int64), average=False)
    assert got.tolist() == [n * (n - 1) // 2, n]
    h = decomm.allreduce_nonblocking(torch.full((4,), float(r)))
    assert torch.allclose(h.wait(), torch.full((4,), (n - 1) / 2))
    z = torch.full((2,), float(r), dtype=torch.float64)
    assert decomm.allreduce_nonblocking_(z, average=False).wait() is z
    assert z.tolist() == [n * (n - 1) / 2] * 2


def test_broadcast_from_every_root():
    n, r = decomm.size(), decomm.rank()
    for root in range(n):
        x = torch.full((2, 3), float(r))
        y = decomm.broadcast(x, root, name=f"b{root}")
        assert torch.equal(y, torch.full((2, 3), float(root)))
        assert torch.equal(x, torch.full((2, 3), float(r)))  # input untouched
        z = torch.tensor([r, r + 1], dtype=torch.int32)
        decomm.broadcast_(z, root)
        assert z.tolist() == [root, root + 1]


def test_broadcast_parameters_mixed_dtypes():
    r = decomm.rank()
    torch.manual_seed(100 + r)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[1].to(torch.float64)
    step = torch.tensor(r)
    state = dict(model.state_dict(), step=step)
    decomm.broadcast_parameters(state, root=0)
    torch.manual_seed(100)
    ref = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    ref[1].to(torch.float64)
    for (k, v), (_, w) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(v, w), k
    assert step.item() == 0


def test_allgather_varying_first_dim_and_scalars():
    n, r = decomm.size(), decomm.rank()
    x = torch.full((r + 1, 2), float(r))
    got = decomm.allgather(x)
    want = torch.cat([torch.full((j + 1, 2), float(j)) for j in range(n)])
    assert torch.equal(got, want)
    assert decomm.allgather(torch.tensor(float(r)), name="scalar").tolist() == list(range(n))
    empty = decomm.allgather(torch.zeros((0, 3)), name="empty")
    assert tuple(empty.shape) == (0, 3)


def test_neighbor_allgather_concatenates_in_neighbours_in_rank_order():
    n, r = decomm.size(), decomm.rank()
    decomm.set_topology(T.ExponentialGraph(n))
    got = decomm.neighbor_allgather(torch.full((r + 1,), float(r)))
    want = torch.cat([torch.full((j + 1,), float(j)) for j in decomm.in_neighbors()]
                     or [torch.zeros(0)])
    assert torch.equal(got, want)


def test_neighbor_allgather_with_given_ranks_keeps_the_src_order():
    # A per-call graph: everyone sends to every other rank; rank r lists its sources in
    # descending order and gets their (variable-length) tensors in exactly that order.
    n, r = decomm.size(), decomm.rank()
    others = [j for j in range(n) if j != r]
    src = sorted(others, reverse=True)
    got = decomm.neighbor_allgather(torch.full((r + 1,), float(r)), src_ranks=src,
                                    dst_ranks=others, name="given")
    want = torch.cat([torch.full((j + 1,), float(j)) for j in src] or [torch.zeros(0)])
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="together"):
        decomm.neighbor_allgather(torch.zeros(1), src_ranks=others)
    with pytest.raises(ValueError, match="itself"):
        decomm.neighbor_allgather(torch.zeros(1), src_ranks=[r], dst_ranks=[r])


def test_barrier_and_stats():
    decomm.barrier()
    decomm.set_topology(T.RingGraph(decomm.size()))
    decomm.reset_stats()
    decomm.neighbor_allreduce(torch.zeros(250, dtype=torch.float32))
    sent = decomm.stats()["bytes_sent"]
    header = decomm._C.header_size()
    assert sent == len(decomm.out_neighbors()) * (1000 + header)
