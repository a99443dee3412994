"""Seeded fuzzing of neighbor_allreduce, a soak run, and non-finite reporting.

Every rank draws the same random cases from the same seed, so all ranks agree on
topology, shape, dtype and weights; each result is compared with the closed form
``sum_j W[i, j] x_j`` computed locally in float64.
"""

from __future__ import annotations

import resource

import numpy as np
import pytest
import torch

import decomm
from decomm import topology as T

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float64: 1e-12, torch.float32: 3e-6, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def random_topology(rng: np.random.Generator, n: int) -> T.Topology:
    kind = rng.integers(0, 4)
    if kind == 0:
        return T.BaseGraph(n, int(rng.integers(1, 4)))
    if kind == 1:
        return T.OnePeerExponentialGraph(n)
    mats = []
    for _ in range(int(rng.integers(1, 4))):
        W = rng.random((n, n)) * (rng.random((n, n)) < rng.uniform(0.2, 0.9))
        np.fill_diagonal(W, rng.random(n) + 0.05)
        if kind == 3:
            W = W + W.T
        mats.append(W / W.sum(axis=1, keepdims=True))
    return T.Topology.from_matrices(mats)


def values(j: int, shape: tuple, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, j]).standard_normal(shape)


def test_fuzz_against_closed_form():
    n, r = decomm.size(), decomm.rank()
    rng = np.random.default_rng(2026)
    for case in range(30):
        topo = random_topology(rng, n)
        decomm.set_topology(topo, start_round=int(rng.integers(0, 5)))
        shape = tuple(int(s) for s in rng.integers(0, 6, size=int(rng.integers(0, 4))))
        dtype = DTYPES[int(rng.integers(0, len(DTYPES)))]
        t = decomm.current_round()
        W = topo.matrix(t)
        self_w, src = None, None
        if rng.random() < 0.3:  # override weights with random ones on the same edges
            ins = [j for j in range(n) if j != r and W[r, j] != 0]
            w = rng.random(n + 1)
            self_w, src = float(w[n]), {j: float(w[j]) for j in ins}
        x = torch.from_numpy(values(r, shape, case)).to(dtype)
        mode = int(rng.integers(0, 3))
        kwargs = {"self_weight": self_w, "src_weights": src, "name": f"fuzz{case}"}
        if mode == 0:
            y = decomm.neighbor_allreduce(x, **kwargs)
        elif mode == 1:
            y = decomm.neighbor_allreduce_nonblocking(x, **kwargs).wait()
        else:
            y = decomm.neighbor_allreduce_(x.clone(), **kwargs)
        xs = [torch.from_numpy(values(j, shape, case)).to(dtype).double().numpy()
              for j in range(n)]
        if self_w is None:
            want = sum(W[r, j] * xs[j] for j in range(n))
        else:
            want = self_w * xs[r] + sum(w * xs[j] for j, w in src.items())
        got = y.double().numpy()
        scale = max(1.0, float(np.abs(want).max(initial=0.0)))
        assert y.dtype == dtype and got.shape == np.shape(want)
        assert np.allclose(got, want, rtol=0, atol=TOL[dtype] * scale * 4), (case, topo.name)


def test_fuzz_invalid_inputs_raise_cleanly():
    n, r = decomm.size(), decomm.rank()
    rng = np.random.default_rng(7)
    decomm.set_topology(T.RingGraph(n))
    bad_calls = [
        lambda: decomm.neighbor_allreduce(torch.zeros(3, dtype=torch.int32)),
        lambda: decomm.neighbor_allreduce(torch.zeros(3, dtype=torch.bool)),
        lambda: decomm.neighbor_allreduce(torch.zeros(3), self_weight=float("nan"),
                                          src_weights={}),
        lambda: decomm.neighbor_allreduce(torch.zeros(3), self_weight=1.0,
                                          src_weights={-1: 0.5}),
        lambda: decomm.neighbor_allreduce(torch.zeros(3), self_weight=1.0,
                                          src_weights={"a": 0.5}),
        lambda: decomm.neighbor_allreduce(torch.zeros(3), self_weight="x", src_weights={}),
        lambda: decomm.neighbor_allreduce(torch.zeros(3), self_weight=1.0, src_weights={},
                                          dst_weights={n: 1.0}),
        lambda: decomm.neighbor_allreduce(torch.zeros(3), self_weight=1.0, src_weights={},
                                          dst_weights=3.0),
        lambda: decomm.neighbor_allreduce("tensor"),
        lambda: decomm.broadcast(torch.zeros(2), root=-1),
        lambda: decomm.broadcast(torch.zeros(2), root=1.5),
        lambda: decomm.allreduce(torch.zeros(2, dtype=torch.complex64)),
        lambda: decomm.set_topology(np.full((n, n), -1.0)),
        lambda: decomm.set_topology(np.ones((n, n + 1)) / (n + 1)),
        lambda: decomm.set_topology([[float("nan")] * n] * n),
        lambda: decomm.set_topology(T.RingGraph(n + 1)),
        lambda: decomm.in_neighbors(n + 5),
    ]
    for idx in rng.permutation(len(bad_calls)):
        with pytest.raises((ValueError, TypeError, decomm.DecommError)):
            bad_calls[idx]()
    # and the runtime still works
    y = decomm.neighbor_allreduce(torch.full((2,), float(r)))
    assert torch.isfinite(y).all()


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def test_soak_time_varying_nonblocking_exact_and_no_leak():
    n, r = decomm.size(), decomm.rank()
    topo = T.BaseGraph(n, 1)
    decomm.set_topology(topo)
    L = topo.rounds
    xs = np.stack([np.full(16, float(j)) + np.arange(16) for j in range(n)]).astype(np.float32)

    def fixed_order_sum(t: int) -> torch.Tensor:
        # float32, self first then in-neighbours by ascending rank: the documented order
        W = topo.matrix(t)
        acc = np.float32(W[r, r]) * xs[r]
        for j in range(n):
            if j != r and W[r, j] != 0:
                acc = acc + np.float32(W[r, j]) * xs[j]
        return torch.from_numpy(acc)

    expected = [fixed_order_sum(t) for t in range(L)]
    x = torch.from_numpy(xs[r])
    busy = torch.randn(16, 16)
    calls = 10_000
    rss_start = 0.0
    for i in range(calls):
        h = decomm.neighbor_allreduce_nonblocking(x, name="soak")
        busy = torch.tanh(busy @ busy)  # overlap some compute
        y = h.wait()
        assert torch.equal(y, expected[i % L]), i
        decomm.advance_round()
        if i == 1000:
            rss_start = rss_mb()
    growth = rss_mb() - rss_start
    assert growth < 16, f"RSS grew by {growth:.1f} MB over {calls - 1000} calls"


def test_check_finite_names_the_rank_and_passes_values_through():
    n, r = decomm.size(), decomm.rank()
    decomm.set_topology(T.FullyConnectedGraph(n))
    state = decomm._state.require()
    state.check_finite = True
    try:
        x = torch.ones(4)
        if r == 0:
            x[2] = float("nan")
            with pytest.raises(decomm.DecommError, match="rank 0: this rank's input holds 1 "
                                                         "non-finite value"):
                decomm.neighbor_allreduce(x, name="nan")
        else:
            y = decomm.neighbor_allreduce(x, name="nan")
            assert torch.isnan(y[2]) and torch.isfinite(y[[0, 1, 3]]).all()
    finally:
        state.check_finite = False
