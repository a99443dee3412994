"""Overlap SGP (PushSum(overlap=τ)) on the simulator, against a numpy OSGP.

Oracle: a numpy re-implementation of Algorithm 2 (Overlap SGP) of Assran, Loizou, Ballas
& Rabbat, "Stochastic Gradient Push for Distributed Deep Learning" (ICML 2019): node i
keeps P[i, i] of its mass at once and receives its in-neighbours' shares of step c at
the end of step c + τ.  Graphs are directed with unequal out-degrees (column-stochastic
P, not row-stochastic), so only de-biasing by the push-sum weight gives the true mean.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from decomm.optim import PushSum
from decomm.sim import Simulation
from decomm.topology import RingGraph, Topology

N, D = 5, 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


class Vec(nn.Module):
    def __init__(self, x0: np.ndarray, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.tensor(x0, dtype=dtype))


def directed_w(n: int = N) -> np.ndarray:
    """Row-stochastic W of the digraph: ring j -> j+1 plus 0 -> every node."""
    A = np.eye(n)
    A[(np.arange(n) + 1) % n, np.arange(n)] = 1.0
    A[:, 0] = 1.0
    return A / A.sum(axis=1, keepdims=True)


def uniform_split(W: np.ndarray) -> np.ndarray:
    A = (W > 0).astype(float)
    return A / A.sum(axis=0, keepdims=True)


def data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((N, D)) * 2 + np.arange(N)[:, None], rng.standard_normal((N, D))


def loss_fn(B: np.ndarray):
    Bt = torch.from_numpy(B)
    return lambda i, m: 0.5 * (m.x - Bt[i].to(m.x.dtype)).square().sum()


def numpy_osgp(P_of_round, X0, gradient, lr, steps, tau, every=1, global_every=None):
    """OSGP (Assran et al. 2019, Alg. 2) with delay τ; returns z, x, w, messages in flight.

    ``lr``: a number, or a function of the step index."""
    n = X0.shape[0]
    x, w = X0.copy(), np.ones(n)
    z = x / w[:, None]
    queue: list[tuple[np.ndarray, np.ndarray]] = []
    comms = rnd = 0
    for s in range(steps):
        x = x - (lr(s) if callable(lr) else lr) * gradient(z)
        if (s + 1) % every == 0:
            if global_every is not None and (comms + 1) % global_every == 0:
                for mx, mw in queue:  # a global step first completes everything in flight
                    x, w = x + mx, w + mw
                queue = []
                x, w = np.tile(x.mean(0), (n, 1)), np.full(n, w.mean())
            else:
                P = P_of_round(rnd)
                keep = np.diag(P)
                off = P - np.diag(keep)
                queue.append((off @ x, off @ w))  # sent: shares of x^{c+1/2}, w^c
                x, w = keep[:, None] * x, keep * w
                if len(queue) > tau:
                    mx, mw = queue.pop(0)
                    x, w = x + mx, w + mw
                rnd += 1
            comms += 1
        z = x / w[:, None]
    return z, x, w, queue


def make_sim(topology, X0, lr=0.1, dtype=torch.float64, momentum=0.0, **kw):
    it = iter(range(len(X0)))
    return Simulation(topology, lambda: Vec(X0[next(it)], dtype),
                      lambda m: torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum),
                      PushSum, identical_init=False, **kw)


def numerators(sim) -> tuple[np.ndarray, np.ndarray]:
    w = np.array([o.push_weights[0] for o in sim.optimizers])
    return sim.param_matrix().numpy() * w[:, None], w


@pytest.mark.parametrize("tau", [1, 2, 3])
@pytest.mark.parametrize("custom", [False, True])
def test_matches_numpy_osgp(tau, custom):
    B, X0 = data()
    W = directed_w()
    if custom:
        rng = np.random.default_rng(4)
        Ps = [m / m.sum(axis=0, keepdims=True) for m in rng.random((3, N, N)) + 0.05]
        kw, P_of_round = {"weights": Ps}, (lambda r: Ps[r % 3])
    else:
        kw, P_of_round = {}, (lambda r: uniform_split(W))
    lr, steps = 0.1, 20
    sim = make_sim(Topology.from_matrices(W), X0, lr, overlap=tau, **kw)
    sim.run(loss_fn(B), steps)
    z, _, w, queue = numpy_osgp(P_of_round, X0, lambda q: q - B, lr, steps, tau)
    np.testing.assert_allclose(sim.param_matrix().numpy(), z, rtol=0, atol=1e-12)
    np.testing.assert_allclose(numerators(sim)[1], w, rtol=0, atol=1e-13)
    assert all(o.in_flight == tau for o in sim.optimizers) and len(queue) == tau
    # the delay matters: plain SGP (τ = 0) gives different iterates
    z0, *_ = numpy_osgp(P_of_round, X0, lambda q: q - B, lr, steps, 0)
    assert np.abs(z0 - z).max() > 1e-3


def test_overlap_zero_is_plain_push_sum():
    B, X0 = data(1)
    f = loss_fn(B)
    a = make_sim(Topology.from_matrices(directed_w()), X0, overlap=0)
    b = make_sim(Topology.from_matrices(directed_w()), X0)
    a.run(f, 10)
    b.run(f, 10)
    assert torch.equal(a.param_matrix(), b.param_matrix())
    assert a.optimizers[0].overlap == 0 and "overlap" not in repr(a.optimizers[0])
    assert make_sim(RingGraph(N), X0, overlap=True).optimizers[0].overlap == 1


def test_mass_is_conserved_counting_what_is_in_flight_and_flush_applies_it():
    """lr = 0: Σ x + in flight = Σ x⁰ and Σ w + in flight = n at every step; the
    de-biased z converge to the true mean (not the Perron-weighted one)."""
    _, X0 = data(2)
    sim = make_sim(Topology.from_matrices(directed_w()), X0, lr=0.0, overlap=2)
    zero = lambda i, m: 0.0 * m.x.sum()  # noqa: E731
    for _ in range(8):
        sim.step(zero)
        x, w = numerators(sim)
        fly_x = sum(o._slots[s][0][:D].numpy() for o in sim.optimizers for s, _ in o._queue)
        fly_w = sum(float(o._slots[s][0][D]) for o in sim.optimizers for s, _ in o._queue)
        np.testing.assert_allclose(x.sum(0) + fly_x, X0.sum(0), rtol=0, atol=1e-12)
        assert abs(w.sum() + fly_w - N) < 1e-12
        assert w.sum() < N - 1e-3  # some mass really is in flight
    for o in sim.optimizers:
        o.flush()
        assert o.in_flight == 0
    x, w = numerators(sim)
    np.testing.assert_allclose(x.sum(0), X0.sum(0), rtol=0, atol=1e-12)
    assert abs(w.sum() - N) < 1e-12
    for _ in range(300):
        sim.step(zero)
    np.testing.assert_allclose(sim.param_matrix().numpy(),
                               np.tile(X0.mean(0), (N, 1)), rtol=0, atol=1e-10)


def test_de_biased_average_converges_to_the_optimum():
    """Heterogeneous quadratics f_i = ½|x − b_i|², lr_t = 0.5 / (1 + 0.05 t): every
    de-biased z_i → mean(b), the error shrinking like lr_t (0.42 at t = 250, 0.11 at
    t = 1000, as in the numpy OSGP), while the Perron-weighted point is 0.3 or more away."""
    B, X0 = data(3)
    sim = make_sim(Topology.from_matrices(directed_w()), X0, lr=0.5, overlap=1)
    f = loss_fn(B)
    lr = lambda t: 0.5 / (1 + 0.05 * t)  # noqa: E731
    errors = {}
    for t in range(1000):
        for o in sim.optimizers:
            for g in o.param_groups:
                g["lr"] = lr(t)
        sim.step(f)
        if t + 1 in (250, 1000):
            errors[t + 1] = np.abs(sim.param_matrix().numpy() - B.mean(0)).max()
    z, *_ = numpy_osgp(lambda r: uniform_split(directed_w()), X0, lambda q: q - B, lr, 1000, 1)
    np.testing.assert_allclose(sim.param_matrix().numpy(), z, rtol=0, atol=1e-10)
    assert errors[1000] < 0.12 and errors[1000] < errors[250] / 3, errors
    pi = np.linalg.eig(directed_w().T)[1][:, 0].real
    pi /= pi.sum()
    assert np.abs(pi @ B - B.mean(0)).max() > 0.3  # where row-stochastic gossip would go
    for o in sim.optimizers:  # applying what is in flight brings z closer still
        o.flush()
    assert np.abs(sim.param_matrix().numpy() - B.mean(0)).max() < errors[1000]


def test_local_and_global_steps_match_numpy():
    B, X0 = data(4)
    W = directed_w()
    lr, steps = 0.1, 17
    sim = make_sim(Topology.from_matrices(W), X0, lr, overlap=1, communicate_every=2,
                   global_every=3)
    sim.run(loss_fn(B), steps)
    z, _, w, queue = numpy_osgp(lambda r: uniform_split(W), X0, lambda q: q - B, lr, steps,
                                1, 2, 3)
    np.testing.assert_allclose(sim.param_matrix().numpy(), z, rtol=0, atol=1e-12)
    np.testing.assert_allclose(numerators(sim)[1], w, rtol=0, atol=1e-13)
    assert sim.optimizers[0].in_flight == len(queue)


def test_state_dict_with_messages_in_flight_resumes_bitwise():
    B, X0 = data(5)
    f = loss_fn(B)
    sim = make_sim(Topology.from_matrices(directed_w()), X0, 0.05, dtype=torch.float32,
                   momentum=0.9, overlap=2)
    sim.run(f, 5)
    saved = copy.deepcopy(sim.state_dict())
    dc = saved["optimizers"][0]["decomm"]
    assert len(dc["extra"]["in_flight_slots"]) == 2 and len(dc["state"]["in_flight"]) == 3
    sim.run(f, 6)
    after = sim.param_matrix().clone()
    sim.load_state_dict(saved)
    sim.run(f, 6)
    assert torch.equal(sim.param_matrix(), after)
    # a plain PushSum cannot take the in-flight state
    plain = make_sim(Topology.from_matrices(directed_w()), X0, 0.05, dtype=torch.float32,
                     momentum=0.9)
    with pytest.raises(ValueError, match="unexpected state 'in_flight'"):
        plain.optimizers[0].load_state_dict(saved["optimizers"][0])


@pytest.mark.parametrize("tau", [1, 2])
def test_blocked_finish_matches_numpy_osgp(tau, monkeypatch):
    """The end of an overlapped gossip step (keep P[i, i] x, add the completed message,
    divide by w) runs block by block over large vectors: shrunk to 8 elements a block,
    a 37-element model (four whole blocks and a partial one) still follows OSGP."""
    import decomm.optim._flat as flat

    monkeypatch.setattr(flat, "BLOCK_BYTES", 64)
    monkeypatch.setattr(flat, "WHOLE_BYTES", 64)
    assert flat.block_elements(37, 8) == 8
    rng = np.random.default_rng(7)
    dim = 37
    X0 = rng.standard_normal((N, dim)) + np.arange(N)[:, None]
    B = rng.standard_normal((N, dim)) * 2
    W = directed_w()
    lr, steps = 0.1, 12
    sim = make_sim(Topology.from_matrices(W), X0, lr, overlap=tau)
    sim.run(loss_fn(B), steps)
    z, _, w, _ = numpy_osgp(lambda r: uniform_split(W), X0, lambda q: q - B, lr, steps, tau)
    np.testing.assert_allclose(sim.param_matrix().numpy(), z, rtol=0, atol=1e-12)
    np.testing.assert_allclose(numerators(sim)[1], w, rtol=0, atol=1e-13)


def test_plain_push_sum_on_a_regular_graph_keeps_w_exactly_one():
    """Without overlap the parameters' buffer is the message ([x | w] mixed in place). On
    a regular graph every column of the default split sums its in-shares to 1, so w
    stays exactly 1 (the wrapper then skips x = w z and z = x / w) and z follows SGP."""
    B, X0 = data(8)
    topo = RingGraph(N)
    lr, steps = 0.1, 15
    sim = make_sim(topo, X0, lr)
    sim.run(loss_fn(B), steps)
    P = uniform_split(np.asarray(topo.matrix(0)))
    z, _, w, _ = numpy_osgp(lambda r: P, X0, lambda q: q - B, lr, steps, 0)
    assert np.array_equal(w, np.ones(N))
    assert all(o.push_weights == [1.0] for o in sim.optimizers)
    np.testing.assert_allclose(sim.param_matrix().numpy(), z, rtol=0, atol=1e-12)
    o = sim.optimizers[0]
    assert o._mix_buffers()[0] is o._buckets[0].buffer and o._slots == []


@pytest.mark.parametrize("bad", [-1, 1.5, "yes", None])
def test_bad_overlap(bad):
    _, X0 = data()
    with pytest.raises(ValueError, match=r"PushSum overlap must be a bool or an int tau >= 0"):
        make_sim(RingGraph(N), X0, overlap=bad)


def test_without_scipy_the_simulator_mixes_with_dense_P(monkeypatch):
    """SciPy is optional: P(t) falls back to a dense array, with the same numbers."""
    B, X0 = data(6)
    f = loss_fn(B)
    Ps = [uniform_split(directed_w()), np.full((N, N), 1.0 / N)]
    runs = []
    for hide in (False, True):
        if hide:  # importing scipy.sparse now raises ImportError
            monkeypatch.setitem(__import__("sys").modules, "scipy.sparse", None)
        sims = [make_sim(Topology.from_matrices(directed_w()), X0, overlap=1),
                make_sim(RingGraph(N), X0, weights=Ps)]
        for sim in sims:
            sim.run(f, 6)
        kinds = {type(o._pw.matrix(0)).__name__ for s in sims for o in s.optimizers[:1]}
        assert (kinds == {"ndarray"}) == hide, kinds
        runs.append([s.param_matrix() for s in sims])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
