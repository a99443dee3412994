"""decomm.sim.Simulation: API, scale (n = 1000), checkpoints, errors."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch import nn

from decomm.errors import DecommError
from decomm.optim import DSGD, GradientTracking
from decomm.sim import Simulation
from decomm.topology import EquiDyn, ExponentialGraph, OnePeerExponentialGraph, RingGraph


@pytest.fixture(autouse=True)
def _one_torch_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def linear_sim(topo, cls=DSGD, lr=0.1, **kw):
    return Simulation(
        topo,
        lambda: nn.Linear(3, 1, bias=False, dtype=torch.float64),
        lambda m: torch.optim.SGD(m.parameters(), lr=lr),
        cls,
        **kw,
    )


def test_thousand_nodes_linear_model():
    n, d = 1000, 10
    g = torch.Generator().manual_seed(0)
    A = torch.randn(n, 16, d, generator=g)
    b = torch.randn(n, 16, generator=g)
    t0 = time.perf_counter()
    sim = Simulation(
        OnePeerExponentialGraph(n),
        lambda: nn.Linear(d, 1, bias=False),
        lambda m: torch.optim.SGD(m.parameters(), lr=0.05),
        GradientTracking,
    )

    def loss_fn(i, model):
        return 0.5 * (model(A[i]).squeeze(1) - b[i]).square().mean()

    mean0 = sim.average_params()
    losses = sim.step(loss_fn)
    sim.step(loss_fn)
    elapsed = time.perf_counter() - t0
    assert losses is not None and len(losses) == n
    assert sim.round == 2 and sim.param_matrix().shape == (n, d)
    # gradient tracking's trackers sum to the gradients' sum (W doubly stochastic)
    ys = torch.stack([o._buckets[0].segment(1) for o in sim.optimizers]).double()
    gs = torch.stack([o._g_old[0] for o in sim.optimizers]).double()
    assert torch.allclose(ys.sum(0), gs.sum(0), atol=1e-3)
    assert not torch.allclose(sim.average_params(), mean0)
    assert elapsed < 60.0  # seconds, generous for a loaded 2-core machine


def test_mixing_only_matches_matrix_powers():
    n = 8
    topo = OnePeerExponentialGraph(n)  # power of 2: exact average after 3 rounds
    sim = linear_sim(topo, lr=0.0, identical_init=False)
    X0 = sim.param_matrix().numpy()
    for t in range(3):
        for p in (p for m in sim.models for p in m.parameters()):
            p.grad = torch.zeros_like(p)
        sim.step()  # gradients already in .grad (zero): pure gossip
        X0 = topo.matrix(t) @ X0
        assert np.allclose(sim.param_matrix().numpy(), X0, atol=1e-14)
    assert np.allclose(sim.param_matrix().numpy(), X0.mean(0), atol=1e-14)
    assert sim.consensus_distance() < 1e-28


def test_consensus_distance_and_average():
    sim = linear_sim(RingGraph(4), identical_init=False)
    X = sim.param_matrix().numpy()
    assert sim.consensus_distance() == pytest.approx(
        ((X - X.mean(0)) ** 2).sum(1).mean(), rel=1e-12
    )
    assert np.allclose(sim.average_params().numpy(), X.mean(0))
    assert torch.equal(sim.params(2), X_row(sim, 2))


def X_row(sim, i):
    return torch.cat([p.detach().reshape(-1) for p in sim.models[i].parameters()])


def test_identical_init_by_default():
    sim = linear_sim(RingGraph(3))
    X = sim.param_matrix()
    assert torch.equal(X, X[:1].expand_as(X))
    assert sim.consensus_distance() < 1e-30


class WeightsOnly:
    """A duck-typed topology: n, rounds and weights(i, t), but no ``sparse``."""

    def __init__(self, topo):
        self.n = topo.n
        self.rounds = topo.rounds
        self.weights = topo.weights


def test_duck_typed_topology_is_refused():
    with pytest.raises(TypeError, match="Topology.*got WeightsOnly"):
        linear_sim(WeightsOnly(RingGraph(3)))


@pytest.mark.parametrize("topo", [ExponentialGraph(6), EquiDyn(6, seed=3)])
def test_mixing_of_cycle_and_random_family_matches_dense_matrices(topo):
    """Pure gossip (zero gradients) over 5 rounds equals X <- W(t) X with dense W(t)."""
    sim = linear_sim(topo, lr=0.0, identical_init=False)
    X = sim.param_matrix().numpy()
    for t in range(5):
        for p in (p for m in sim.models for p in m.parameters()):
            p.grad = torch.zeros_like(p)
        sim.step()
        X = topo.matrix(t) @ X
        np.testing.assert_allclose(sim.param_matrix().numpy(), X, rtol=0, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_models(dtype):
    sim = Simulation(
        RingGraph(5),
        lambda: nn.Linear(3, 1, dtype=dtype),
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
        DSGD,
        identical_init=False,
    )
    mean0 = sim.param_matrix().double().mean(0)
    for p in (p for m in sim.models for p in m.parameters()):
        p.grad = torch.zeros_like(p)
    sim.step()
    assert sim.param_matrix().dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert torch.allclose(sim.param_matrix().double().mean(0), mean0, atol=tol)


def test_errors():
    with pytest.raises(TypeError, match="wrapper_cls"):
        Simulation(
            RingGraph(3),
            lambda: nn.Linear(2, 1),
            lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
            torch.optim.SGD,
        )
    with pytest.raises(TypeError, match="communicator"):
        linear_sim(RingGraph(3), communicator=None)
    sim = linear_sim(RingGraph(3))
    sim.models[0].weight.grad = torch.zeros(1, 3, dtype=torch.float64)
    with pytest.raises(DecommError, match="simulated node 0 cannot call neighbor_allreduce_"):
        sim.optimizers[0].step()
    with pytest.raises(DecommError, match="Simulation"):
        sim.optimizers[1].consensus_distance()
    with pytest.raises(ValueError, match="3 nodes"):
        linear_sim(RingGraph(4)).load_state_dict(sim.state_dict())
    sizes = iter([3, 3, 4])
    with pytest.raises(DecommError, match="node 2"):
        Simulation(
            RingGraph(3),
            lambda: nn.Linear(next(sizes), 1),
            lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
            identical_init=False,
        )
    with pytest.raises(ValueError):
        Simulation(
            np.ones((3, 3)),
            lambda: nn.Linear(2, 1),
            lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
        )


def test_matrix_topology_and_repr():
    W = np.full((3, 3), 1 / 3)
    sim = linear_sim(W)
    assert sim.n == 3
    assert "Simulation(n=3" in repr(sim) and "DSGD" in repr(sim)
