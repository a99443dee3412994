"""decomm.sim + decomm.optim wrappers vs an independent numpy recursion, step by step.

Problem: node i minimises f_i(x) = ||A_i x - b_i||^2 / (2 m) over a model whose
parameters are two tensors (w: 3x2, c: 4) flattened into x in R^10; the
gradient is A_i^T (A_i x - b_i) / m.  The numpy reference below writes each
algorithm's equation (as docs/optimizers.rst states it) directly on the n x d iterate matrix X
(row i = node i), with u = lr * g for plain SGD.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from decomm.optim import D2, DSGD, GradientTracking, QGDSGDm
from decomm.sim import Simulation
from decomm.topology import OnePeerExponentialGraph, Topology


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors: OpenMP threads only contend on the shared 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


N, D, M = 6, 10, 8
LR = 0.05
STEPS = 12


class TwoTensor(nn.Module):
    def __init__(self, init: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(init[:6].reshape(3, 2).clone())
        self.c = nn.Parameter(init[6:].clone())

    def vec(self) -> torch.Tensor:
        return torch.cat([self.w.reshape(-1), self.c])


def problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((N, M, D))
    b = rng.standard_normal((N, M)) + np.arange(N)[:, None]  # heterogeneous
    X0 = rng.standard_normal((N, D))
    return A, b, X0


def grad(A, b, X):
    return np.einsum("imd,im->id", A, np.einsum("imd,id->im", A, X) - b) / M


def make_sim(A, b, X0, wrapper_cls, topo, opt_kwargs=None, **kw):
    inits = iter(torch.from_numpy(X0))
    At, bt = torch.from_numpy(A), torch.from_numpy(b)
    sim = Simulation(
        topo,
        make_model=lambda: TwoTensor(next(inits)),
        make_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=LR, **(opt_kwargs or {})),
        wrapper_cls=wrapper_cls,
        identical_init=False,
        **kw,
    )

    def loss_fn(i: int, model: TwoTensor) -> torch.Tensor:
        return 0.5 * (At[i] @ model.vec() - bt[i]).square().sum() / M

    return sim, loss_fn


def reference(alg, A, b, X0, topo, steps, p=1, q=None, beta=0.9, mu=None, nesterov=False):
    """Yield X after each step of the named algorithm (plain numpy)."""
    n = X0.shape[0]
    mu = beta if mu is None else mu
    X = X0.copy()
    rnd = comms = 0
    Xprev = Gprev = WY = Y = None
    Mom = np.zeros_like(X)
    Buf = None
    for s in range(steps):
        communicate = (s + 1) % p == 0
        is_global = communicate and q is not None and (comms + 1) % q == 0
        if is_global:
            W = np.full((n, n), 1.0 / n)
        elif communicate:
            W = topo.matrix(rnd)
        else:
            W = np.eye(n)
        G = grad(A, b, X)
        if alg == "dsgd":
            X = W @ (X - LR * G)
        elif alg in ("dsgd_momentum", "dsgd_nesterov"):
            Buf = G.copy() if Buf is None else beta * Buf + G
            step = G + beta * Buf if alg == "dsgd_nesterov" else Buf
            X = W @ (X - LR * step)
        elif alg == "awc":
            X = W @ X - LR * G
        elif alg in ("gt", "gt_momentum"):
            Y = G.copy() if s == 0 else WY + G - Gprev
            if alg == "gt_momentum":
                Buf = Y.copy() if Buf is None else beta * Buf + Y
                X = W @ (X - LR * Buf)
            else:
                X = W @ (X - LR * Y)
            WY, Gprev = W @ Y, G
        elif alg == "d2":
            Xn = W @ (X - LR * G) if s == 0 else W @ (2 * X - Xprev - LR * G + LR * Gprev)
            Xprev, Gprev, X = X, G, Xn
        elif alg in ("qg", "qg_nesterov"):
            V = G + beta * Mom
            step = G + beta * V if alg == "qg_nesterov" else V
            Xn = W @ (X - LR * step)
            Mom = mu * Mom + (1 - mu) * (X - Xn) / LR
            X = Xn
        else:
            raise ValueError(alg)
        if communicate and not is_global:
            rnd += 1
        comms += communicate
        yield X


ALGS = {
    "dsgd": (DSGD, {}, {}),
    "dsgd_momentum": (DSGD, {}, {"momentum": 0.9}),
    "dsgd_nesterov": (DSGD, {}, {"momentum": 0.9, "nesterov": True}),
    "awc": (DSGD, {"combine_first": True}, {}),
    "gt": (GradientTracking, {}, {}),
    "gt_momentum": (GradientTracking, {}, {"momentum": 0.9}),
    "d2": (D2, {}, {}),
    "qg": (QGDSGDm, {"momentum": 0.9}, {}),
    "qg_nesterov": (QGDSGDm, {"momentum": 0.9, "nesterov": True}, {}),
}
SCHEDULES = [(1, None), (3, None), (1, 2), (2, 3)]


@pytest.mark.filterwarnings("ignore:D2's analysis assumes symmetric")
@pytest.mark.parametrize(
    ("alg", "schedule"),
    [
        (a, s)
        for a, s in itertools.product(ALGS, SCHEDULES)
        if a in ("dsgd", "gt", "d2", "awc", "qg") or s == (1, None)
    ],
)
def test_matches_numpy_recursion(alg, schedule):
    p, q = schedule
    A, b, X0 = problem()
    topo = OnePeerExponentialGraph(N)  # 3 rounds: time-varying
    cls, wkw, okw = ALGS[alg]
    sim, loss_fn = make_sim(A, b, X0, cls, topo, okw, communicate_every=p, global_every=q, **wkw)
    assert np.allclose(sim.param_matrix().numpy(), X0, atol=0)
    expected_round = 0
    for s, X in enumerate(reference(alg, A, b, X0, topo, STEPS, p=p, q=q)):
        sim.step(loss_fn)
        got = sim.param_matrix().numpy()
        err = np.abs(got - X).max()
        assert err < 1e-10, f"step {s}: max |sim - numpy| = {err:.3g}"
        communicated = (s + 1) % p == 0
        comm_index = (s + 1) // p
        if communicated and not (q is not None and comm_index % q == 0):
            expected_round += 1
        assert sim.round == expected_round
    assert sim.optimizers[0].steps == STEPS


def test_static_and_matrix_topology_accepted():
    A, b, X0 = problem(1)
    W = Topology.from_matrices([OnePeerExponentialGraph(N).matrix(t) for t in range(3)])
    sim_a, loss_fn = make_sim(A, b, X0, GradientTracking, W)
    sim_b, _ = make_sim(A, b, X0, GradientTracking, [W.matrix(t) for t in range(3)])
    for _ in range(5):
        sim_a.step(loss_fn)
        sim_b.step(loss_fn)
    assert torch.equal(sim_a.param_matrix(), sim_b.param_matrix())
