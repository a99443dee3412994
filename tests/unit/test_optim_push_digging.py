"""PushDIGing on the simulator, against a numpy Push-DIGing and closed-form optima.

The oracle is a numpy re-implementation of Push-DIGing as written in Nedić, Olshevsky &
Shi (SIAM J. Optim. 2017, Section 4): u, v, x = u / v and the tracker y, all mixed with
a column-stochastic P(k).  The losses are heterogeneous quadratics
f_i(x) = ½ (x − b_i)ᵀ A_i (x − b_i), whose average has the closed-form minimiser
x* = (Σ A_i)⁻¹ Σ A_i b_i.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from decomm import DecommError
from decomm.optim import GradientTracking, LocalCommunicator, PushDIGing
from decomm.optim.push_sum import PushWeights
from decomm.sim import Simulation
from decomm.topology import RingGraph, Topology

N, D = 5, 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


class Quad(nn.Module):
    def __init__(self, x0: np.ndarray, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.tensor(x0, dtype=dtype))


def problem(n: int = N, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A, B, X0): SPD A_i with different curvatures, far-apart b_i, distinct x_i^0."""
    rng = np.random.default_rng(seed)
    A = []
    for i in range(n):
        Q = rng.standard_normal((D, D))
        A.append(Q @ Q.T / D + (0.5 + i) * np.eye(D) / n)
    B = rng.standard_normal((n, D)) * 3 + np.arange(n)[:, None]
    X0 = rng.standard_normal((n, D))
    return np.stack(A), B, X0


def loss_fn(A: np.ndarray, B: np.ndarray):
    At, Bt = torch.from_numpy(A), torch.from_numpy(B)

    def f(i: int, m: Quad) -> torch.Tensor:
        r = m.x - Bt[i].to(m.x.dtype)
        return 0.5 * r @ At[i].to(m.x.dtype) @ r

    return f


def grad(A: np.ndarray, B: np.ndarray, X: np.ndarray) -> np.ndarray:
    return np.einsum("nij,nj->ni", A, X - B)


def optimum(A: np.ndarray, B: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """argmin Σ_i c_i f_i = (Σ c_i A_i)⁻¹ Σ c_i A_i b_i (c = 1 without weights)."""
    c = np.ones(len(A)) if weights is None else weights
    return np.linalg.solve(np.einsum("n,nij->ij", c, A), np.einsum("n,nij,nj->i", c, A, B))


def directed_adjacency(n: int) -> np.ndarray:
    """Edges j -> i (A[i, j] = 1): the ring j -> j+1 and 0 -> every node, self loops."""
    A = np.eye(n)
    for j in range(n):
        A[(j + 1) % n, j] = 1.0
    A[:, 0] = 1.0
    return A


def column_stochastic(adj: np.ndarray, seed: int = 1) -> np.ndarray:
    """Random positive weights on the graph's edges, columns normalised (rows are not)."""
    rng = np.random.default_rng(seed)
    P = adj * (0.2 + rng.random(adj.shape))
    return P / P.sum(axis=0, keepdims=True)


def perron(W: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eig(W.T)
    v = np.real(vecs[:, np.argmin(np.abs(vals - 1))])
    return v / v.sum()


def schedule(steps: int, every: int = 1, global_every: int | None = None):
    """Per step: ('none' | 'neighbor' | 'global', round index), as DecentralizedOptimizer."""
    out, comms, rnd = [], 0, 0
    for s in range(steps):
        if (s + 1) % every:
            out.append(("none", rnd))
            continue
        if global_every is not None and (comms + 1) % global_every == 0:
            out.append(("global", rnd))
        else:
            out.append(("neighbor", rnd))
            rnd += 1
        comms += 1
    return out


def numpy_push_digging(P_of_round, X0, gradient, lr, steps, every=1, global_every=None):
    """Push-DIGing (Nedić, Olshevsky & Shi 2017, Sec. 4) for all nodes; returns x, y, v."""
    n = X0.shape[0]
    u, v = X0.copy(), np.ones(n)
    x = u / v[:, None]
    g = gradient(x)
    y = g.copy()
    for kind, r in schedule(steps, every, global_every):
        if kind == "none":
            M = np.eye(n)
        elif kind == "global":
            M = np.full((n, n), 1.0 / n)
        else:
            M = P_of_round(r)
        u = M @ (u - lr * y)
        v = M @ v
        x = u / v[:, None]
        g_new = gradient(x)
        y = M @ y + g_new - g
        g = g_new
    return x, y, v


def make_sim(topology, X0, lr=0.05, dtype=torch.float64, momentum=0.0, **kw):
    it = iter(range(len(X0)))
    return Simulation(topology, lambda: Quad(X0[next(it)], dtype),
                      lambda m: torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum),
                      PushDIGing, identical_init=False, **kw)


def uniform_split(adj: np.ndarray) -> np.ndarray:
    return adj / adj.sum(axis=0, keepdims=True)


@pytest.mark.parametrize("custom", [False, True])
def test_matches_numpy_push_digging(custom):
    A, B, X0 = problem()
    adj = directed_adjacency(N)
    W = adj / adj.sum(axis=1, keepdims=True)  # the runtime topology: only its graph is used
    if custom:  # time-varying column-stochastic P, dense
        rng = np.random.default_rng(7)
        Ps = [m / m.sum(axis=0, keepdims=True) for m in rng.random((3, N, N)) + 0.05]
        kw = {"weights": Ps}
        P_of_round = lambda r: Ps[r % 3]  # noqa: E731
    else:
        kw = {}
        P_of_round = lambda r: uniform_split(adj)  # noqa: E731
    lr, steps = 0.05, 30
    sim = make_sim(Topology.from_matrices(W), X0, lr, **kw)
    sim.run(loss_fn(A, B), steps)
    x, y, v = numpy_push_digging(P_of_round, X0, lambda z: grad(A, B, z), lr, steps)
    np.testing.assert_allclose(sim.param_matrix().numpy(), x, rtol=0, atol=1e-12)
    got_v = np.array([o.push_weights[0] for o in sim.optimizers])
    np.testing.assert_allclose(got_v, v, rtol=0, atol=1e-13)
    assert np.ptp(v) > 0.1  # the weights really moved (unequal out-degrees / random P)
    # the kept tracker is P(k) y^k; the next step forms y^{k+1} = P y^k + g^{k+1} − g^k
    kept = np.stack([o._buckets[0].segment(1).numpy() for o in sim.optimizers])
    g_old = np.stack([o._g_old[0].numpy() for o in sim.optimizers])
    np.testing.assert_allclose(kept + grad(A, B, x) - g_old, y, rtol=0, atol=1e-11)


def test_tracker_sum_equals_gradient_sum():
    """Σ_i y_i^k = Σ_i g_i^k and Σ_i v_i = n: the invariants that make the fixed point exact."""
    A, B, X0 = problem()
    P = column_stochastic(directed_adjacency(N))
    sim = make_sim(RingGraph(N), X0, 0.05, weights=P)
    f = loss_fn(A, B)
    for _ in range(6):
        sim.step(f)
        assert abs(sum(o.push_weights[0] for o in sim.optimizers) - N) < 1e-12
        x = sim.param_matrix().numpy()
        kept = np.stack([o._buckets[0].segment(1).numpy() for o in sim.optimizers])
        g_old = np.stack([o._g_old[0].numpy() for o in sim.optimizers])
        y_next = kept + grad(A, B, x) - g_old  # what the next step forms
        np.testing.assert_allclose(y_next.sum(0), grad(A, B, x).sum(0), rtol=0, atol=1e-10)


def test_exact_optimum_on_a_directed_graph_where_gradient_tracking_is_biased():
    A, B, X0 = problem(seed=3)
    adj = directed_adjacency(N)
    P = column_stochastic(adj)
    assert np.allclose(P.sum(axis=0), 1) and not np.allclose(P.sum(axis=1), 1)
    x_star = optimum(A, B)  # minimiser of the average of the quadratics
    lr, steps = 0.1, 400  # lr = 0.2 diverges here (largest curvature 4.9)
    pd = make_sim(RingGraph(N), X0, lr, weights=P)
    pd.run(loss_fn(A, B), steps)
    err_pd = np.abs(pd.param_matrix().numpy() - x_star).max()
    assert err_pd < 1e-9, err_pd
    # GradientTracking with the row-stochastic W of the same graph: W = rows of P normalised
    W = P / P.sum(axis=1, keepdims=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns that W is not column-stochastic
        it = iter(range(N))
        gt = Simulation(Topology.from_matrices(W), lambda: Quad(X0[next(it)]),
                        lambda m: torch.optim.SGD(m.parameters(), lr=lr), GradientTracking,
                        identical_init=False)
    gt.run(loss_fn(A, B), steps)
    X_gt = gt.param_matrix().numpy()
    # GT converges, but to the Perron-weighted optimum (Σ π_i ∇f_i = 0, πᵀW = πᵀ) ...
    x_pi = optimum(A, B, perron(W))
    assert np.abs(X_gt - x_pi).max() < 1e-8
    # ... which is biased: the bias is |x_π − x*|, far above PushDIGing's error
    bias = np.abs(x_pi - x_star).max()
    assert bias > 0.1, bias
    assert np.abs(X_gt - x_star).max() > 1e6 * err_pd


def test_time_varying_default_split_converges_exactly():
    """Uniform split over a time-varying directed cycle (out-degrees differ per round)."""
    A, B, X0 = problem(seed=5)
    rng = np.random.default_rng(11)
    mats = []
    for _ in range(3):
        adj = np.eye(N) + (rng.random((N, N)) < 0.35)
        adj[(np.arange(N) + 1) % N, np.arange(N)] = 1  # keep a ring: strongly connected
        adj = (adj > 0).astype(float)
        mats.append(adj / adj.sum(axis=1, keepdims=True))
    sim = make_sim(Topology.from_matrices(mats), X0, 0.1)
    sim.run(loss_fn(A, B), 600)
    assert np.abs(sim.param_matrix().numpy() - optimum(A, B)).max() < 1e-9


def test_local_and_global_steps_match_numpy():
    A, B, X0 = problem(seed=2)
    P = column_stochastic(directed_adjacency(N))
    lr, steps = 0.05, 14
    sim = make_sim(RingGraph(N), X0, lr, weights=P, communicate_every=2, global_every=3)
    sim.run(loss_fn(A, B), steps)
    x, _, _ = numpy_push_digging(lambda r: P, X0, lambda z: grad(A, B, z), lr, steps, 2, 3)
    np.testing.assert_allclose(sim.param_matrix().numpy(), x, rtol=0, atol=1e-12)
    assert sim.optimizers[0].communication_steps == 7


def test_state_dict_resumes_bitwise_and_float32_momentum_runs():
    A, B, X0 = problem(seed=4)
    P = column_stochastic(directed_adjacency(N))
    f = loss_fn(A, B)
    sim = make_sim(RingGraph(N), X0, 0.05, dtype=torch.float32, momentum=0.5, weights=P)
    sim.run(f, 5)
    saved = copy.deepcopy(sim.state_dict())
    assert "push_sum_weight" in saved["optimizers"][0]["decomm"]["state"]
    assert "tracker" in saved["optimizers"][0]["decomm"]["state"]
    sim.run(f, 7)
    after = sim.param_matrix().clone()
    sim.load_state_dict(saved)
    sim.run(f, 7)
    assert torch.equal(sim.param_matrix(), after)
    # float32 with momentum still heads for x* (float32 precision)
    sim.run(f, 400)
    assert np.abs(sim.param_matrix().double().numpy() - optimum(A, B)).max() < 1e-4


def test_no_column_sum_warning_on_directed_topologies():
    adj = directed_adjacency(N)
    W = Topology.from_matrices(adj / adj.sum(axis=1, keepdims=True))
    _, _, X0 = problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_sim(W, X0)  # P is built from the graph; W's column sums do not matter


def test_simulated_P_equals_the_per_rank_weights_mpi_uses():
    adj = directed_adjacency(6)
    topo = Topology.from_matrices(adj / adj.sum(axis=1, keepdims=True))
    pw = PushWeights(lambda: topo, None)
    P = pw.matrix(0).toarray()
    np.testing.assert_allclose(P, uniform_split(adj), rtol=0, atol=1e-15)
    for i in range(6):
        keep, src, dst = pw.of(i, 0)
        assert keep == P[i, i]
        assert dst == {j: P[j, i] for j in range(6) if j != i and P[j, i] > 0}
        assert src == {j: 1.0 for j in range(6) if j != i and P[i, j] > 0}


def test_errors():
    _, _, X0 = problem()
    m = Quad(X0[0])
    sgd = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="PushDIGing runs on the MPI runtime"):
        PushDIGing(sgd, communicator=LocalCommunicator())
    with pytest.raises(TypeError, match="PushDIGing wraps a torch.optim.Optimizer"):
        Simulation(RingGraph(N), lambda: Quad(X0[0]), lambda mod: mod, PushDIGing)
    bad = np.full((N, N), 1.0 / N)
    bad[0, 0] += 0.5
    with pytest.raises(ValueError, match=r"PushDIGing weights\[0\]: column 0 sums to 1.5"):
        make_sim(RingGraph(N), X0, weights=bad)
    with pytest.raises(ValueError, match=r"PushDIGing weights\[0\]: expected an 5 x 5"):
        make_sim(RingGraph(N), X0, weights=np.eye(N + 1))
    # node 0 receives nothing (row 0 of P is zero): its weight v collapses -> clear error
    P = np.eye(N)
    P[0, 0], P[1, 0] = 0.0, 1.0
    sim = make_sim(RingGraph(N), X0, weights=P)
    A, B, _ = problem()
    with pytest.raises(DecommError, match="PushDIGing: push-sum weight became 0.0 on rank 0"):
        sim.step(loss_fn(A, B))


def test_push_weights_follow_a_changed_topology():
    """set_topology to a new graph: the cached weights and matrices are not reused."""
    adj = directed_adjacency(4)
    holder = [Topology.from_matrices(adj / adj.sum(axis=1, keepdims=True))]
    pw = PushWeights(lambda: holder[0], None)
    assert pw.of(0, 0)[0] == pytest.approx(1 / 4)  # node 0 sends to everyone
    assert pw.matrix(0)[0, 0] == pytest.approx(1 / 4)
    holder[0] = RingGraph(4)  # out-degree 2 everywhere
    assert pw.of(0, 0)[0] == pytest.approx(1 / 3)
    np.testing.assert_allclose(pw.matrix(0).toarray(), RingGraph(4).matrix(0), atol=1e-15)
