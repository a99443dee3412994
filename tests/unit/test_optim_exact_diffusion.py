"""ExactDiffusion on the simulator: the paper's recursion, D² over (I + W)/2, the exact
optimum, the static-graph warnings, and the measured divergence of D² over time-varying
cycles that docs/optimizers.rst quotes.

Oracle: a numpy re-implementation of Algorithm 1 of Yuan, Ying, Zhao & Sayed, "Exact
Diffusion for Distributed Optimization and Learning - Part I" (IEEE TSP 2019): adapt
ψ = w − μ∇J(w), correct φ = ψ + w − ψ_prev, combine w = W̄ φ with W̄ = (I + W)/2.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from decomm.optim import D2, DSGD, ExactDiffusion
from decomm.sim import Simulation
from decomm.topology import BaseGraph, OnePeerExponentialGraph, RingGraph, Topology

N, D = 6, 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


class Quad(nn.Module):
    def __init__(self, x0: np.ndarray, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.tensor(x0, dtype=dtype))


def problem(n: int = N, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def grad(A, B, X):
    return np.einsum("nij,nj->ni", A, X - B)


def optimum(A, B):
    return np.linalg.solve(A.sum(0), np.einsum("nij,nj->i", A, B))


def random_symmetric_w(n: int, seed: int = 3) -> np.ndarray:
    """A symmetric doubly stochastic W with negative eigenvalues (Metropolis weights)."""
    rng = np.random.default_rng(seed)
    adj = np.triu(rng.random((n, n)) < 0.5, 1)
    adj = adj | adj.T
    idx = np.arange(n)
    adj[idx, (idx + 1) % n] = adj[(idx + 1) % n, idx] = True  # connected
    deg = adj.sum(1)
    W = np.where(adj, 1.0 / (1 + np.maximum(deg[:, None], deg[None, :])), 0.0)
    W[idx, idx] = 1 - W.sum(1)
    return W


def numpy_exact_diffusion(W, X0, gradient, mu, steps, every=1, global_every=None):
    """Algorithm 1 of Yuan et al. (2019) with the wrapper's schedule of local/global steps."""
    n = X0.shape[0]
    Wbar = (np.eye(n) + W) / 2
    w_prev = X0.copy()
    psi_prev = X0.copy()  # ψ^{-1} = w^{-1}
    comms = 0
    for s in range(steps):
        psi = w_prev - mu * gradient(w_prev)  # adapt
        phi = psi + w_prev - psi_prev  # correct
        if (s + 1) % every:
            M = np.eye(n)
        elif global_every is not None and (comms + 1) % global_every == 0:
            M, comms = np.full((n, n), 1.0 / n), comms + 1
        else:
            M, comms = Wbar, comms + 1
        w_prev, psi_prev = M @ phi, psi  # combine
    return w_prev


def make_sim(topology, X0, cls=ExactDiffusion, lr=0.1, momentum=0.0, dtype=torch.float64,
             **kw):
    it = iter(range(len(X0)))
    return Simulation(topology, lambda: Quad(X0[next(it)], dtype),
                      lambda m: torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum),
                      cls, identical_init=False, **kw)


@pytest.mark.parametrize(("every", "global_every"), [(1, None), (2, 3)])
def test_matches_the_papers_recursion(every, global_every):
    A, B, X0 = problem()
    W = random_symmetric_w(N)
    assert np.linalg.eigvalsh(W).min() < -0.1  # W itself has negative eigenvalues
    mu, steps = 0.1, 25
    sim = make_sim(Topology.from_matrices(W), X0, lr=mu, communicate_every=every,
                   global_every=global_every)
    sim.run(loss_fn(A, B), steps)
    want = numpy_exact_diffusion(W, X0, lambda z: grad(A, B, z), mu, steps, every,
                                 global_every)
    np.testing.assert_allclose(sim.param_matrix().numpy(), want, rtol=0, atol=1e-12)


def test_equals_d2_over_the_lazy_matrix():
    """ExactDiffusion over W is D² over (I + W)/2, here with momentum, to 1e-12."""
    A, B, X0 = problem(seed=1)
    W = random_symmetric_w(N, seed=8)
    f = loss_fn(A, B)
    ed = make_sim(Topology.from_matrices(W), X0, lr=0.05, momentum=0.5)
    d2 = make_sim(Topology.from_matrices((np.eye(N) + W) / 2), X0, D2, lr=0.05, momentum=0.5)
    for _ in range(40):
        ed.step(f)
        d2.step(f)
    np.testing.assert_allclose(ed.param_matrix().numpy(), d2.param_matrix().numpy(),
                               rtol=0, atol=1e-12)
    assert ed.consensus_distance() > 1e-6  # not trivially equal: still moving apart


def test_exact_optimum_where_dsgd_is_biased():
    A, B, X0 = problem(seed=2)
    W = random_symmetric_w(N, seed=5)
    f = loss_fn(A, B)
    x_star = optimum(A, B)
    ed = make_sim(Topology.from_matrices(W), X0, lr=0.2)
    dsgd = make_sim(Topology.from_matrices(W), X0, DSGD, lr=0.2)
    ed.run(f, 600)
    dsgd.run(f, 600)
    err_ed = np.abs(ed.param_matrix().numpy() - x_star).max()
    err_dsgd = np.abs(dsgd.param_matrix().numpy() - x_star).max()
    assert err_ed < 1e-10, err_ed
    assert err_dsgd > 0.05, err_dsgd  # DSGD's O(lr) heterogeneity bias


def test_bipartite_ring_is_fine_where_plain_d2_warns():
    """RingGraph(4) with weights 1/3 has eigenvalue -1/3: D² warns, exact diffusion
    (λ(W̄) = 1/3) neither warns nor fails to converge."""
    A, B, X0 = problem(n=4, seed=6)
    with pytest.warns(UserWarning, match="eigenvalues > -1/3"):
        make_sim(RingGraph(4), X0, D2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ed = make_sim(RingGraph(4), X0, lr=0.2)
    ed.run(loss_fn(A, B), 400)
    assert np.abs(ed.param_matrix().numpy() - optimum(A, B)).max() < 1e-10


def test_warns_on_time_varying_and_non_symmetric_topologies():
    _, _, X0 = problem(n=8)
    with pytest.warns(UserWarning, match=r"ExactDiffusion needs one static mixing matrix W "
                                         r".*cycle of 3 rounds.*GradientTracking"):
        make_sim(OnePeerExponentialGraph(8), X0)
    W = np.eye(8) * 0.5
    W[np.arange(8), (np.arange(8) + 1) % 8] = 0.5  # directed ring: doubly stochastic, not symmetric
    with pytest.warns(UserWarning, match="ExactDiffusion's analysis assumes a symmetric"):
        make_sim(Topology.from_matrices(W), X0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_sim(OnePeerExponentialGraph(8), X0, check_topology=False)
        make_sim(Topology.from_matrices(random_symmetric_w(8)), X0)


def test_state_dict_resumes_bitwise():
    A, B, X0 = problem(seed=9)
    f = loss_fn(A, B)
    sim = make_sim(Topology.from_matrices(random_symmetric_w(N)), X0, lr=0.05,
                   dtype=torch.float32, momentum=0.9)
    sim.run(f, 4)
    saved = copy.deepcopy(sim.state_dict())
    assert saved["optimizers"][0]["decomm"]["algorithm"] == "ExactDiffusion"
    sim.run(f, 6)
    after = sim.param_matrix().clone()
    sim.load_state_dict(saved)
    sim.run(f, 6)
    assert torch.equal(sim.param_matrix(), after)


# ------------------------------------------- D² over time-varying cycles (docs figures)
def d2_cycle_product(topo) -> np.ndarray:
    """One cycle of D²'s lr = 0 recursion on (x^t, x^{t-1}): Π_t [[2W(t), −W(t)], [I, 0]]."""
    n = topo.n
    M = np.eye(2 * n)
    for t in range(topo.rounds):
        W = topo.matrix(t)
        M = np.block([[2 * W, -W], [np.eye(n), np.zeros((n, n))]]) @ M
    return M


def test_d2_cycle_of_projections_has_eigenvalue_minus_three():
    """BaseGraph(16, 1): four rounds, each W a projection (eigenvalues 0 and 1 only, so
    λ > −1/3 holds round by round), yet the cycle's product has eigenvalue −3."""
    topo = BaseGraph(16, 1)
    assert topo.rounds == 4
    for t in range(4):
        ev = np.linalg.eigvalsh(topo.matrix(t))
        assert np.allclose(ev[np.abs(ev) > 1e-9], 1.0)
    ev = np.linalg.eigvals(d2_cycle_product(topo))
    lead = ev[np.argmax(np.abs(ev))]
    assert abs(lead - (-3.0)) < 1e-6, lead


@pytest.mark.parametrize(("topo", "factor"), [
    (BaseGraph(25, 1), 1.2851), (BaseGraph(25, 2), 1.3116), (BaseGraph(25, 3), 1.3514),
    (OnePeerExponentialGraph(25), 1.2239),
])
def test_d2_diverges_over_time_varying_cycles(topo, factor):
    """The wrapper itself at lr = 0 grows the consensus distance by the factor the cycle
    product's spectral radius predicts (ρ^(1/L) per round), quoted in docs/optimizers.rst."""
    L = topo.rounds
    rho = np.max(np.abs(np.linalg.eigvals(d2_cycle_product(topo))))
    assert rho ** (1.0 / L) == pytest.approx(factor, abs=1e-4)
    X0 = np.random.default_rng(0).standard_normal((topo.n, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # D2 warns that the topology is time-varying
        sim = make_sim(topo, X0, D2, lr=0.0)
    zero = lambda i, m: 0.0 * m.x.sum()  # noqa: E731
    dist = []
    for c in range(12 * L):
        sim.step(zero)
        if (c + 1) % L == 0:
            dist.append(sim.consensus_distance() ** 0.5)
    growth = (dist[-1] / dist[5]) ** (1.0 / (6 * L))  # per round, cycles 6..12
    assert growth == pytest.approx(factor, rel=0.01), growth


def test_d2_over_two_round_and_lazy_cycles():
    """The other rows of the docs: over BaseGraph(25, 4) (two rounds, exact consensus
    after one cycle for DSGD) D² is stuck from the first cycle on, alternating between
    two disagreements (2.92 and 2.70 of an initial 8.09 with this x⁰); over the lazy
    rounds of OnePeerExponentialGraph(8) it converges (0.944 per round)."""
    topo = BaseGraph(25, 4)
    X0 = np.random.default_rng(0).standard_normal((25, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sim = make_sim(topo, X0, D2, lr=0.0)
    zero = lambda i, m: 0.0 * m.x.sum()  # noqa: E731
    prev, x = X0, topo.matrix(0) @ X0  # numpy D², lr = 0
    norms = {}
    for t in range(1, 41):
        sim.step(zero)
        np.testing.assert_allclose(sim.param_matrix().numpy(), x,
                                   rtol=0, atol=1e-12)
        norms[t] = np.linalg.norm(x - x.mean(0))
        prev, x = x, topo.matrix(t % 2) @ (2 * x - prev)
    assert norms[40] == pytest.approx(norms[2], rel=1e-9)
    assert norms[39] == pytest.approx(norms[1], rel=1e-9)
    assert round(float(np.linalg.norm(X0 - X0.mean(0))), 2) == 8.09
    assert (round(norms[40], 2), round(norms[39], 2)) == (2.92, 2.70)
    lazy = Topology.from_matrices([(np.eye(8) + OnePeerExponentialGraph(8).matrix(t)) / 2
                                   for t in range(3)])
    M = d2_cycle_product(lazy)
    ev = np.sort(np.abs(np.linalg.eigvals(M)))[::-1]
    assert ev[0] == pytest.approx(1.0, abs=1e-6)  # the consensus direction only
    x0 = np.random.default_rng(0).standard_normal((8, 3))
    prev, x = x0, lazy.matrix(0) @ x0
    d = []
    for t in range(1, 3 * 60 + 1):
        prev, x = x, lazy.matrix(t % 3) @ (2 * x - prev)
        d.append(np.linalg.norm(x - x.mean(0)))
    assert (d[-1] / d[-61]) ** (1 / 60) == pytest.approx(0.944, abs=1e-3)
