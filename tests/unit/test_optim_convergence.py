"""Convergence on heterogeneous least squares, and every inner optimizer composes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from decomm.optim import D2, DSGD, GradientTracking, QGDSGDm
from decomm.sim import Simulation
from decomm.topology import RingGraph, Topology


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors: OpenMP threads only contend on the shared 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


D, M = 5, 20


def shard(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Node i's (A_i, b_i): seeded by 1234 + i; b_i shifted by i (heterogeneous)."""
    g = torch.Generator().manual_seed(1234 + i)
    A = torch.randn(M, D, generator=g, dtype=torch.float64)
    return A, torch.randn(M, generator=g, dtype=torch.float64) + i


def optimum(n: int) -> torch.Tensor:
    """x* = (sum A_i^T A_i)^{-1} sum A_i^T b_i, the minimiser of the average loss."""
    shards = [shard(i) for i in range(n)]
    H = sum(A.T @ A for A, _ in shards)
    r = sum(A.T @ b for A, b in shards)
    return torch.linalg.solve(H, r)


def lazy_ring(n: int) -> Topology:
    """(I + W_ring)/2: symmetric, eigenvalues >= 1/3 (safe for D2)."""
    return Topology.from_matrices((np.eye(n) + RingGraph(n).matrix(0)) / 2)


def ls_loss(i: int, model: nn.Module) -> torch.Tensor:
    A, b = shard(i)
    dt = next(model.parameters()).dtype
    return 0.5 * (model(A.to(dt)).squeeze(-1) - b.to(dt)).square().mean()


@pytest.mark.parametrize("n", [5])
def test_exact_methods_reach_optimum_dsgd_stalls(n):
    xs = optimum(n)
    errors = {}
    for cls in (DSGD, GradientTracking, D2):
        sim = Simulation(
            lazy_ring(n),
            lambda: nn.Linear(D, 1, bias=False, dtype=torch.float64),
            lambda m: torch.optim.SGD(m.parameters(), lr=0.2),  # constant lr
            cls,
        )
        sim.run(ls_loss, 250)
        X = sim.param_matrix()
        errors[cls.__name__] = float((X - xs).norm(dim=1).max() / xs.norm())
    assert errors["GradientTracking"] < 1e-6
    assert errors["D2"] < 1e-6
    assert errors["DSGD"] > 1e-3  # heterogeneity bias at a constant learning rate


def test_gt_trackers_sum_to_gradient_sum_and_average_is_preserved():
    n = 7
    sim = Simulation(
        RingGraph(n),
        lambda: nn.Linear(D, 1, bias=False, dtype=torch.float64),
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
        GradientTracking,
    )
    for _ in range(5):
        sim.step(ls_loss)
        ys = torch.stack([o.state_dict()["decomm"]["state"]["tracker"][0] for o in sim.optimizers])
        gs = torch.stack(
            [o.state_dict()["decomm"]["state"]["previous_gradient"][0] for o in sim.optimizers]
        )
        # W is doubly stochastic: sum_i W y_i = sum_i y_i = sum_i g_i
        assert torch.allclose(ys.sum(0), gs.sum(0), atol=1e-12)


X_TRUE = torch.linspace(-1.0, 1.0, D, dtype=torch.float64)


def teacher_loss(i: int, model: nn.Module) -> torch.Tensor:
    """Node i's shard of a common teacher problem: b_i = A_i x_true + small noise."""
    A, _ = shard(i)
    g = torch.Generator().manual_seed(77 + i)
    b = A @ X_TRUE + 0.01 * torch.randn(M, generator=g, dtype=torch.float64)
    dt = next(model.parameters()).dtype
    return 0.5 * (model(A.to(dt)).squeeze(-1) - b.to(dt)).square().mean()


INNER = {
    "momentum": lambda ps: torch.optim.SGD(ps, lr=0.02, momentum=0.9),
    "nesterov": lambda ps: torch.optim.SGD(ps, lr=0.02, momentum=0.9, nesterov=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.05),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.01),
}
WRAPPERS = {
    "dsgd": (DSGD, {}),
    "awc": (DSGD, {"combine_first": True}),
    "gt": (GradientTracking, {}),
    "d2": (D2, {}),
}


@pytest.mark.parametrize("inner", list(INNER))
@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_inner_optimizers_decrease_loss(inner, wrapper):
    n = 4
    cls, kw = WRAPPERS[wrapper]
    torch.manual_seed(0)
    sim = Simulation(
        lazy_ring(n),
        lambda: nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, 1)),  # float32 MLP
        lambda m: INNER[inner](m.parameters()),
        cls,
        **kw,
    )
    first = sim.step(teacher_loss)
    for _ in range(40):
        last = sim.step(teacher_loss)
    assert first is not None and last is not None
    for i in range(n):
        assert last[i] < 0.5 * first[i], (i, first[i], last[i])
    assert np.isfinite(sim.consensus_distance())


def test_qgdsgdm_decreases_loss():
    n = 4
    torch.manual_seed(0)
    sim = Simulation(
        lazy_ring(n),
        lambda: nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, 1)),
        lambda m: torch.optim.SGD(m.parameters(), lr=0.02),
        QGDSGDm,
        momentum=0.9,
    )
    first = sim.step(teacher_loss)
    for _ in range(40):
        last = sim.step(teacher_loss)
    assert first is not None and last is not None
    assert all(b < 0.5 * a for a, b in zip(first, last))
