"""PushDIGing, ExactDiffusion and Overlap SGP (PushSum(overlap=τ)) under mpirun.

Every rank generates the whole problem (heterogeneous quadratics
f_i(x) = ½ (x − b_i)ᵀ A_i (x − b_i), seeded), runs its own node under MPI, and runs all
n nodes in decomm.sim locally: the same wrapper code, mixed by sender-scaled
``neighbor_allreduce_`` (push-sum) or the runtime's W instead of the simulator's sparse
product, so rank r's parameters must equal simulated node r's (to 1e-6; the summation
orders differ only in the last bits).  The unit tests check the simulator against numpy
re-implementations of the papers' recursions.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import decomm
from decomm.optim import ExactDiffusion, PushDIGing, PushSum
from decomm.sim import Simulation
from decomm.topology import RingGraph, Topology

D = 3
TOL = 1e-6


@pytest.fixture(autouse=True)
def _one_torch_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


class Quad(nn.Module):
    def __init__(self, x0: np.ndarray, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.tensor(x0, dtype=dtype))


def problem(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    A = []
    for i in range(n):
        Q = rng.standard_normal((D, D))
        A.append(Q @ Q.T / D + (0.5 + i) * np.eye(D) / n)
    B = rng.standard_normal((n, D)) * 3 + np.arange(n)[:, None]
    return np.stack(A), B, rng.standard_normal((n, D))


def loss_fn(A: np.ndarray, B: np.ndarray):
    At, Bt = torch.from_numpy(A), torch.from_numpy(B)

    def f(i: int, m: Quad) -> torch.Tensor:
        r = m.x - Bt[i].to(m.x.dtype)
        return 0.5 * r @ At[i].to(m.x.dtype) @ r

    return f


def directed_graph(n: int) -> np.ndarray:
    """Row-stochastic W of a digraph with unequal out-degrees (ring + 0 -> everyone)."""
    adj = np.eye(n)
    adj[(np.arange(n) + 1) % n, np.arange(n)] = 1.0
    adj[:, 0] = 1.0
    return adj / adj.sum(axis=1, keepdims=True)


def random_push(n: int, count: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(42)  # the same on every rank
    return [m / m.sum(axis=0, keepdims=True) for m in rng.random((count, n, n)) + 0.05]


def run_both(cls, topology, steps, *, lr=0.05, momentum=0.0, dtype=torch.float64, seed=0,
             between=None, **kw):
    """(this rank's MPI parameters, simulated node r's parameters, the MPI wrapper)."""
    n, r = decomm.size(), decomm.rank()
    A, B, X0 = problem(n, seed)
    f = loss_fn(A, B)
    decomm.set_topology(topology)
    model = Quad(X0[r], dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = cls(torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum),
                  broadcast_parameters=False, **kw)
    for s in range(steps):
        opt.zero_grad()
        f(r, model).backward()
        opt.step()
        if between is not None:
            between(s, opt)
    it = iter(range(n))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sim = Simulation(topology, lambda: Quad(X0[next(it)], dtype),
                         lambda m: torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum),
                         cls, identical_init=False, **kw)
    sim.run(f, steps)
    return model.x.detach().double().numpy(), sim.params(r).double().numpy(), opt


def test_push_digging_matches_simulation_default_split():
    n = decomm.size()
    got, want, opt = run_both(PushDIGing, Topology.from_matrices(directed_graph(n)), 30)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
    assert opt.push_weights[0] > 0


@pytest.mark.parametrize("schedule", [{}, {"communicate_every": 2, "global_every": 3}])
def test_push_digging_matches_simulation_custom_weights(schedule):
    n = decomm.size()
    got, want, _ = run_both(PushDIGing, RingGraph(n), 24, weights=random_push(n), **schedule)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


def test_push_digging_reaches_the_exact_optimum():
    n = decomm.size()
    A, B, _ = problem(n, seed=3)
    x_star = np.linalg.solve(A.sum(0), np.einsum("nij,nj->i", A, B))
    got, want, opt = run_both(PushDIGing, Topology.from_matrices(directed_graph(n)), 400,
                              lr=0.1, seed=3)
    np.testing.assert_allclose(got, x_star, rtol=0, atol=1e-9)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
    total = decomm.allreduce(torch.tensor([opt.push_weights[0]], dtype=torch.float64),
                             average=False).item()
    assert abs(total - n) < 1e-9


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_exact_diffusion_matches_simulation(momentum):
    n = decomm.size()
    got, want, _ = run_both(ExactDiffusion, RingGraph(n), 30, lr=0.1, momentum=momentum)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


def test_exact_diffusion_reaches_the_exact_optimum():
    n = decomm.size()
    A, B, _ = problem(n, seed=4)
    x_star = np.linalg.solve(A.sum(0), np.einsum("nij,nj->i", A, B))
    got, _, _ = run_both(ExactDiffusion, RingGraph(n), 500, lr=0.2, seed=4)
    np.testing.assert_allclose(got, x_star, rtol=0, atol=1e-9)


@pytest.mark.parametrize("tau", [1, 2])
@pytest.mark.parametrize("custom", [False, True])
def test_osgp_matches_simulation(tau, custom):
    n = decomm.size()
    kw = {"weights": random_push(n)} if custom else {}

    def monitor(s, opt):  # collectives while exchanges are in flight must not interfere
        if s % 5 == 0:
            assert opt.in_flight == min(s + 1, tau)
            opt.consensus_distance()

    got, want, opt = run_both(PushSum, Topology.from_matrices(directed_graph(n)), 20,
                              overlap=tau, between=monitor, **kw)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
    assert opt.in_flight == tau
    opt.close()  # completes and applies what is in flight
    assert opt.in_flight == 0


def test_osgp_local_global_steps_and_resume_with_messages_in_flight():
    n, r = decomm.size(), decomm.rank()
    A, B, X0 = problem(n, seed=6)
    f = loss_fn(A, B)
    decomm.set_topology(Topology.from_matrices(directed_graph(n)))
    model = Quad(X0[r], torch.float32)
    opt = PushSum(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                  overlap=2, communicate_every=2, global_every=3, broadcast_parameters=False)

    def run(k):
        for _ in range(k):
            opt.zero_grad()
            f(r, model).backward()
            opt.step()

    run(9)
    sd = copy.deepcopy(opt.state_dict())  # completes the MPI exchanges in flight first
    saved = model.x.detach().clone()
    assert len(sd["decomm"]["extra"]["in_flight_slots"]) == opt.in_flight > 0
    run(7)
    after = model.x.detach().clone()
    with torch.no_grad():
        model.x.copy_(saved)
    opt.load_state_dict(sd)
    run(7)
    assert torch.equal(model.x.detach(), after)
    opt.flush()
    # after a flush the mass is all home: the weights sum to n (float32 messages)
    total = decomm.allreduce(torch.tensor([opt.push_weights[0]], dtype=torch.float64),
                             average=False).item()
    assert abs(total - n) < 1e-5


def test_osgp_lr_zero_reaches_the_true_mean():
    """lr = 0 on a directed graph: the de-biased values reach the true mean, not the
    Perron-weighted one, even with every exchange delayed by one step."""
    n, r = decomm.size(), decomm.rank()
    _, _, X0 = problem(n, seed=7)
    decomm.set_topology(Topology.from_matrices(directed_graph(n)))
    model = Quad(X0[r])
    opt = PushSum(torch.optim.SGD(model.parameters(), lr=0.0), overlap=True,
                  broadcast_parameters=False)
    for _ in range(300):
        model.x.grad = torch.zeros_like(model.x)
        opt.step()
    opt.flush()
    np.testing.assert_allclose(model.x.detach().numpy(), X0.mean(0), rtol=0, atol=1e-10)


@pytest.mark.parametrize("tau", [0, 1])
def test_osgp_step_does_not_wait_for_the_current_exchange(tau):
    """Rank n-1 (rank 0's only in-neighbour) sleeps 1.5 s before its second step. With
    overlap, rank 0's second step needs only the first step's messages, already sent,
    and returns at once; plain SGP (τ = 0) must wait for the sleeper's second message."""
    n, r = decomm.size(), decomm.rank()
    if n < 2:
        pytest.skip("needs 2 ranks")
    import time

    decomm.set_topology(Topology.from_matrices(directed_graph(n)))
    model = Quad(np.full(D, float(r)))
    opt = PushSum(torch.optim.SGD(model.parameters(), lr=0.0), overlap=tau,
                  broadcast_parameters=False)
    took = []
    for s in range(3):
        model.x.grad = torch.zeros_like(model.x)
        if r == n - 1 and s == 1:
            time.sleep(1.5)
        t0 = time.perf_counter()
        opt.step()
        took.append(time.perf_counter() - t0)
    opt.close()
    decomm.barrier()
    if r == 0:
        if tau:
            assert took[1] < 0.75, took  # did not wait for the sleeping neighbour
        else:
            assert took[1] > 1.0, took  # the blocking exchange waited for it
