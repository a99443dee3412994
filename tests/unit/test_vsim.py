"""decomm.vsim.VectorizedSimulation against the looped simulator and closed forms.

Equivalence tests run in float64: the two simulators sum in different orders
(vmap's grouped convolutions, a dense GEMM vs SciPy's CSR product), so they
agree to rounding (observed max |diff| ~ 1e-16 after 4 steps); the 1e-6 bound
is the requirement, far above float64 rounding and far below any algorithmic
difference (one wrong term changes parameters by ~lr * grad ~ 1e-2).
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import decomm.vsim as vsim_mod
from decomm.compression import QSGD, Identity, RandomK, Sign, TopK
from decomm.errors import DecommError
from decomm.optim import (
    D2,
    DSGD,
    AsyncGossip,
    ChocoSGD,
    ExactDiffusion,
    GradientTracking,
    PushDIGing,
    PushSum,
    QGDSGDm,
)
from decomm.optim.push_sum import PushWeights
from decomm.sim import Simulation
from decomm.topology import (
    BaseGraph,
    EquiDyn,
    ExponentialGraph,
    OnePeerExponentialGraph,
    RingGraph,
    Topology,
)
from decomm.vsim import ELEMENTWISE_OPTIMIZERS, VectorizedSimulation

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-6
N = 5
STEPS = 4


@pytest.fixture(autouse=True)
def _one_torch_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def cnn() -> nn.Module:
    """2 conv + 1 linear, float64, for (1, 8, 8) inputs."""
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.Tanh(),
        nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Tanh(),
        nn.Flatten(), nn.Linear(16, 4)).double()


def batches(n: int = N, steps: int = STEPS, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(steps, n, 6, 1, 8, 8, generator=g, dtype=torch.float64)
    Y = torch.randint(0, 4, (steps, n, 6), generator=g)
    return X, Y


def node_loss(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def sgd(**kw):
    return lambda m: torch.optim.SGD(m.parameters(), **kw)


def run_both(topo, cls, make_opt, steps=STEPS, make_model=cnn, **kw):
    """Same seeded init, same batches; returns the max |param diff| over all steps."""
    X, Y = batches(topo.n, steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # D2 over time-varying graphs
        torch.manual_seed(0)
        looped = Simulation(topo, make_model, make_opt, cls, identical_init=False, **kw)
        torch.manual_seed(0)
        vec = VectorizedSimulation(topo, make_model, make_opt, cls, identical_init=False, **kw)
        assert torch.equal(looped.param_matrix(), vec.param_matrix())
        worst = 0.0
        for t in range(steps):
            ll = looped.step(lambda i, m, t=t: node_loss(m, X[t, i], Y[t, i]))
            lv = vec.step(node_loss, X[t], Y[t])
            assert lv.shape == (topo.n,)
            np.testing.assert_allclose(lv.numpy(), np.array(ll), rtol=0, atol=TOL)
            worst = max(worst, float((looped.param_matrix() - vec.param_matrix()).abs().max()))
    assert vec.round == looped.round
    # the run did something: the nodes moved away from their start
    assert float((vec.param_matrix() - vec_start(topo, make_model)).abs().max()) > 1e-3
    return worst


def vec_start(topo, make_model):
    torch.manual_seed(0)
    return torch.stack([torch.cat([p.detach().reshape(-1) for p in make_model().parameters()])
                        for _ in range(topo.n)])


CONFIGS = [
    ("DSGD-ATC", DSGD, sgd(lr=0.1, momentum=0.9, weight_decay=1e-3), {}),
    ("DSGD-ATC-nesterov", DSGD, sgd(lr=0.1, momentum=0.9, nesterov=True), {}),
    ("DSGD-AWC-adam", DSGD, lambda m: torch.optim.Adam(m.parameters(), lr=0.02),
     {"combine_first": True}),
    ("DSGD-AWC-sgd", DSGD, sgd(lr=0.1, momentum=0.5), {"combine_first": True}),
    ("GT-sgd", GradientTracking, sgd(lr=0.1, momentum=0.5, weight_decay=1e-3), {}),
    ("GT-adam", GradientTracking, lambda m: torch.optim.Adam(m.parameters(), lr=0.02), {}),
    ("D2", D2, sgd(lr=0.1), {}),
    ("QGDSGDm", QGDSGDm, sgd(lr=0.1, weight_decay=1e-3), {"momentum": 0.9}),
    ("QGDSGDm-nesterov", QGDSGDm, sgd(lr=0.1), {"momentum": 0.8, "nesterov": True}),
]
TOPOLOGIES = [BaseGraph(N, 1), OnePeerExponentialGraph(N), RingGraph(N)]


@pytest.mark.parametrize("topo", TOPOLOGIES, ids=lambda t: t.name)
@pytest.mark.parametrize("name,cls,make_opt,kw", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_trajectories_equal_looped_simulation(name, cls, make_opt, kw, topo):
    assert run_both(topo, cls, make_opt, **kw) < TOL


@pytest.mark.parametrize("opt_cls", ELEMENTWISE_OPTIMIZERS, ids=lambda c: c.__name__)
def test_every_allowed_optimizer_is_n_independent_optimizers(opt_cls):
    extra = {"weight_decay": 1e-3}
    if opt_cls is torch.optim.SGD:
        extra.update(momentum=0.9)
    make_opt = lambda m: opt_cls(m.parameters(), lr=0.01, **extra)  # noqa: E731
    assert run_both(BaseGraph(N, 2), DSGD, make_opt) < TOL


@pytest.mark.parametrize("kw", [{"communicate_every": 2}, {"global_every": 2},
                                {"communicate_every": 2, "global_every": 2}])
def test_schedules_local_and_global_steps(kw):
    assert run_both(OnePeerExponentialGraph(N), GradientTracking, sgd(lr=0.1), steps=5,
                    **kw) < TOL


def test_param_groups_with_different_lrs():
    def make_opt(m):  # per-layer groups built from the (stacked) model's submodules
        return torch.optim.SGD([{"params": m[0].parameters(), "lr": 0.2},
                                {"params": list(m[2].parameters()) + list(m[5].parameters())}],
                               lr=0.05, momentum=0.9)
    assert run_both(BaseGraph(N, 1), DSGD, make_opt) < TOL


def test_float32_cnn_matches_to_1e6():
    def cnn32():
        return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(),
                             nn.Flatten(), nn.Linear(64, 4))

    X, Y = batches(N, 3)
    X = X.float()
    torch.manual_seed(0)
    looped = Simulation(BaseGraph(N, 1), cnn32, sgd(lr=0.05, momentum=0.9), DSGD)
    torch.manual_seed(0)
    vec = VectorizedSimulation(BaseGraph(N, 1), cnn32, sgd(lr=0.05, momentum=0.9), DSGD)
    for t in range(3):
        looped.step(lambda i, m, t=t: node_loss(m, X[t, i], Y[t, i]))
        vec.step(node_loss, X[t], Y[t])
    # float32: |x| < 1, each step adds a few ulps (6e-8) of rounding-order difference
    assert float((looped.param_matrix() - vec.param_matrix()).abs().max()) < TOL


def test_mixing_only_is_matrix_powers():
    """lr = 0, zero gradients: X(t+1) = W(t) X(t) exactly as numpy computes it."""
    topo = BaseGraph(6, 1)
    vs = VectorizedSimulation(topo, cnn, sgd(lr=0.0), DSGD, identical_init=False)
    X = vs.param_matrix().numpy()
    for t in range(topo.rounds):
        vs.step()  # no loss_fn: the (absent) gradients count as zero
        X = topo.matrix(t) @ X
        np.testing.assert_allclose(vs.param_matrix().numpy(), X, rtol=0, atol=1e-14)
    # Base-(k+1) graphs reach the exact average after one cycle
    np.testing.assert_allclose(X, np.broadcast_to(X.mean(0), X.shape), atol=1e-14)
    assert vs.consensus_distance() < 1e-26


def test_sparse_path_matches_dense(monkeypatch):
    dense = run_both(EquiDyn(N, seed=3), GradientTracking, sgd(lr=0.1))
    monkeypatch.setattr(vsim_mod, "DENSE_MAX_NODES", 2)
    vs = VectorizedSimulation(RingGraph(N), cnn, sgd(lr=0.1), DSGD)
    assert vs.mixing_matrix(0).is_sparse
    assert torch.equal(vs.mixing_matrix(0).to_dense(),
                       torch.from_numpy(RingGraph(N).matrix(0)))
    assert run_both(EquiDyn(N, seed=3), GradientTracking, sgd(lr=0.1)) < TOL
    assert dense < TOL


# ------------------------------------------------------------------ PushSum
def directed_weights(n):
    """Two column-stochastic P, not row-stochastic: node i keeps 1/2 and sends 1/2 to
    i+1 (first) / i+2 (second), except node 0, which splits its half over two nodes."""
    mats = []
    for s in (1, 2):
        P = np.eye(n) / 2
        for i in range(1, n):
            P[(i + s) % n, i] += 0.5
        P[1, 0] += 0.25
        P[3, 0] += 0.25
        mats.append(P)
    return mats


def hub_graph(n, shift=1):
    """Directed, irregular out-degrees: i hears i - shift, and everyone hears node 0."""
    W = np.zeros((n, n))
    for i in range(n):
        W[i, i] = 1
        W[i, (i - shift) % n] = 1
        W[i, 0] = 1
    return W / W.sum(1, keepdims=True)


@pytest.mark.parametrize("topo,kw,moves", [
    (Topology.from_matrices(hub_graph(N)), {}, True),  # static, uniform split
    (EquiDyn(N, seed=3), {}, False),  # directed random family (regular: w stays 1)
    # step 6 is a global step: exact averages of x and w, so every w is back at 1
    (Topology.from_matrices([hub_graph(N, 1), hub_graph(N, 2)]), {"global_every": 3}, False),
    (RingGraph(N), {"weights": directed_weights(N), "communicate_every": 2}, True),
], ids=["hub", "EquiDyn", "hub-cycle-global", "explicit-P-local"])
def test_push_sum_equals_looped_push_sum(topo, kw, moves):
    steps = 6
    X, Y = batches(topo.n, steps)
    make_opt = sgd(lr=0.1, momentum=0.9, weight_decay=1e-3)
    torch.manual_seed(0)
    looped = Simulation(topo, cnn, make_opt, PushSum, identical_init=False, **kw)
    torch.manual_seed(0)
    vs = VectorizedSimulation(topo, cnn, make_opt, PushSum, identical_init=False, **kw)
    for t in range(steps):
        looped.step(lambda i, m, t=t: node_loss(m, X[t, i], Y[t, i]))
        vs.step(node_loss, X[t], Y[t])
        assert float((vs.param_matrix() - looped.param_matrix()).abs().max()) < TOL
    w_loop = torch.tensor([o.push_weights[0] for o in looped.optimizers], dtype=torch.float64)
    assert torch.allclose(vs.push_weights, w_loop, rtol=0, atol=1e-12)
    assert (float(w_loop.std()) > 1e-3) == moves  # irregular P: the weights leave 1
    assert repr(vs).startswith("VectorizedSimulation(n=5") and "PushSum" in repr(vs)


def test_push_sum_weights_keep_their_sum_and_debias_the_average():
    """Pure push-sum averaging (lr = 0): Σ w = n, and z -> the plain average."""
    topo = Topology.from_matrices(hub_graph(6))  # directed, irregular out-degrees
    vs = VectorizedSimulation(topo, cnn, sgd(lr=0.0), PushSum, identical_init=False)
    x0 = vs.param_matrix().double().mean(0)
    for _ in range(60):
        vs.step()
        assert float(vs.push_weights.sum()) == pytest.approx(6.0, abs=1e-12)
    np.testing.assert_allclose(vs.param_matrix().numpy(),
                               np.broadcast_to(x0.numpy(), (6, x0.numel())), atol=1e-9)
    assert float(vs.push_weights.min()) > 0 and float(vs.push_weights.std()) > 1e-3


def test_push_sum_dead_node_is_reported():
    # node 0 sends everything to node 1 and receives nothing: its weight becomes 0
    P = np.array([[0.0, 0.0], [1.0, 1.0]])
    vs = VectorizedSimulation(RingGraph(2), cnn, sgd(lr=0.0), PushSum, weights=P)
    with pytest.raises(DecommError, match=r"non-positive on node\(s\) \[0\]"):
        vs.step()


def test_push_sum_rejects_bad_weights_and_options():
    with pytest.raises(ValueError, match="column 0 sums to"):
        VectorizedSimulation(RingGraph(3), cnn, sgd(lr=0.1), PushSum, weights=np.eye(3) * 0.5)
    with pytest.raises(ValueError, match="PushDIGing weights\\[0\\]: column 0 sums to"):
        VectorizedSimulation(RingGraph(3), cnn, sgd(lr=0.1), PushDIGing,
                             weights=np.eye(3) * 0.5)
    with pytest.raises(TypeError, match=r"PushSum with .*got \['combine_first'\]"):
        VectorizedSimulation(RingGraph(3), cnn, sgd(lr=0.1), PushSum, combine_first=True)
    with pytest.raises(TypeError, match=r"PushDIGing with .*got \['overlap'\]"):
        VectorizedSimulation(RingGraph(3), cnn, sgd(lr=0.1), PushDIGing, overlap=1)
    with pytest.raises(ValueError, match="overlap must be a bool or an int tau >= 0"):
        VectorizedSimulation(RingGraph(3), cnn, sgd(lr=0.1), PushSum, overlap=-1)


# ------------------------------------- ExactDiffusion, PushDIGing, overlap, Choco
def run_pair(topo, cls, steps=6, make_model=cnn, make_opt=None, flush=False, **kw):
    """Looped and vectorized simulation of the same seeded nodes and batches; returns
    (looped, vectorized, max |param diff| over the steps and, with flush, after it)."""
    make_opt = make_opt or sgd(lr=0.1, momentum=0.9, weight_decay=1e-3)
    X, Y = batches(topo.n, steps)
    dtype = next(make_model().parameters()).dtype
    X = X.to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # ExactDiffusion over a cycle
        torch.manual_seed(0)
        looped = Simulation(topo, make_model, make_opt, cls, identical_init=False, **kw)
        torch.manual_seed(0)
        vec = VectorizedSimulation(topo, make_model, make_opt, cls, identical_init=False, **kw)
        start = vec.param_matrix()
        worst = 0.0
        for t in range(steps):
            ll = looped.step(lambda i, m, t=t: node_loss(m, X[t, i], Y[t, i]))
            lv = vec.step(node_loss, X[t], Y[t])
            np.testing.assert_allclose(lv.double().numpy(), np.array(ll), rtol=0, atol=TOL)
            worst = max(worst, float((looped.param_matrix() - vec.param_matrix()).abs().max()))
    if flush:
        for o in looped.optimizers:
            o.flush()
        vec.flush()
        worst = max(worst, float((looped.param_matrix() - vec.param_matrix()).abs().max()))
    assert vec.round == looped.round
    assert float((vec.param_matrix() - start).abs().max()) > 1e-3  # the run did something
    return looped, vec, worst


def looped_push_weights(looped):
    return torch.tensor([o.push_weights[0] for o in looped.optimizers], dtype=torch.float64)


HUB = Topology.from_matrices(hub_graph(N))
HUB_CYCLE = Topology.from_matrices([hub_graph(N, 1), hub_graph(N, 2)])

NEW_CONFIGS = [
    ("ED-ring", ExactDiffusion, RingGraph(N), {}),
    ("ED-BaseGraph6", ExactDiffusion, BaseGraph(6, 1), {}),  # time-varying (it warns)
    ("ED-local-global", ExactDiffusion, RingGraph(N),
     {"communicate_every": 2, "global_every": 2}),
    ("PushDIGing-hub", PushDIGing, HUB, {}),
    ("PushDIGing-onepeer6", PushDIGing, OnePeerExponentialGraph(6), {}),
    ("PushDIGing-hub-cycle-global", PushDIGing, HUB_CYCLE, {"global_every": 3}),
    ("PushDIGing-explicit-P-local", PushDIGing, RingGraph(N),
     {"weights": directed_weights(N), "communicate_every": 2}),
]


@pytest.mark.parametrize("name,cls,topo,kw", NEW_CONFIGS, ids=[c[0] for c in NEW_CONFIGS])
def test_exact_diffusion_and_push_digging_equal_looped(name, cls, topo, kw):
    looped, vec, worst = run_pair(topo, cls, **kw)
    assert worst < TOL
    if cls is PushDIGing:
        assert torch.allclose(vec.push_weights, looped_push_weights(looped), rtol=0, atol=1e-12)
        assert "PushDIGing" in repr(vec)


OVERLAP_CONFIGS = [
    ("tau1-hub", HUB, {"overlap": True}),
    ("tau2-hub-cycle", HUB_CYCLE, {"overlap": 2}),
    ("tau3-BaseGraph6", BaseGraph(6, 1), {"overlap": 3}),
    ("tau2-explicit-P", RingGraph(N), {"overlap": 2, "weights": directed_weights(N)}),
    ("tau2-local-global", HUB_CYCLE, {"overlap": 2, "communicate_every": 2, "global_every": 3}),
]


@pytest.mark.parametrize("topo,kw", [c[1:] for c in OVERLAP_CONFIGS],
                         ids=[c[0] for c in OVERLAP_CONFIGS])
def test_overlapped_push_sum_equals_looped(topo, kw):
    """Same messages in flight (the queue), same weights, same de-biased iterates, step
    by step and after flush()."""
    steps = 8
    looped, vec, worst = run_pair(topo, PushSum, steps=steps, **kw)
    assert worst < TOL
    tau = int(kw["overlap"])
    assert vec.in_flight == looped.optimizers[0].in_flight
    # gossip steps since the last global one, capped at tau, are in flight
    assert vec.in_flight == (1 if "global_every" in kw else tau)
    assert torch.allclose(vec.push_weights, looped_push_weights(looped), rtol=0, atol=1e-12)
    assert f"overlap={tau}" in repr(vec)
    for o in looped.optimizers:
        o.flush()
    vec.flush()
    assert vec.in_flight == 0
    assert float((looped.param_matrix() - vec.param_matrix()).abs().max()) < TOL
    assert torch.allclose(vec.push_weights, looped_push_weights(looped), rtol=0, atol=1e-12)
    # the delay matters: plain PushSum over the same steps ends elsewhere
    plain = {k: v for k, v in kw.items() if k != "overlap"}
    _, undelayed, _ = run_pair(topo, PushSum, steps=steps, **plain)
    assert float((undelayed.param_matrix() - vec.param_matrix()).abs().max()) > 1e-3


def numpy_overlap_push_sum(mats, x0, tau, steps):
    """Overlap SGP at lr = 0, from its equations (PushSum's docstring): returns the
    de-biased z after every step, the mass in flight and z after applying it all."""
    x, w = x0.copy(), np.ones(len(x0))
    flight = []
    out = []
    for c in range(steps):
        P = mats[c % len(mats)]
        off = P - np.diag(np.diag(P))
        flight.append((off @ x, off @ w))  # x^{c+1/2} = x^c: no update at lr = 0
        x, w = np.diag(P)[:, None] * x, np.diag(P) * w
        if len(flight) > tau:
            dx, dw = flight.pop(0)
            x, w = x + dx, w + dw
        out.append((x / w[:, None], w.sum() + sum(f[1].sum() for f in flight)))
    for dx, dw in flight:
        x, w = x + dx, w + dw
    return out, x / w[:, None]


def test_overlapped_push_sum_matches_its_equations():
    """Pure push-sum averaging with delayed messages (lr = 0): z equals the numpy
    recursion step by step; the mass counted with what is in flight stays n; after
    enough steps and a flush every node holds the plain average of the start."""
    n, tau = 6, 2
    mats = [hub_graph(n, 1), hub_graph(n, 2)]
    pushed = [np.asarray(PushWeights(lambda m=m: Topology.from_matrices(m), None).matrix(0)
                         .toarray()) for m in mats]
    vs = VectorizedSimulation(Topology.from_matrices(mats), cnn, sgd(lr=0.0), PushSum,
                              identical_init=False, overlap=tau)
    for t, P in enumerate(pushed):  # what travels: P(t) without its diagonal
        off = torch.from_numpy(P - np.diag(np.diag(P)))
        assert torch.equal(vs.mixing_matrix(t), off)
    x0 = vs.param_matrix().numpy()
    steps = 200  # the numpy recursion is within 3e-9 of the average after 160 steps
    want, final = numpy_overlap_push_sum(pushed, x0, tau, steps)
    for c in range(steps):
        vs.step()
        if c < 10 or c % 50 == 0:
            np.testing.assert_allclose(vs.param_matrix().numpy(), want[c][0], rtol=0,
                                       atol=1e-12)
            inflight = sum(float(vs._slot_w[s].sum()) for s in vs._queue)
            assert float(vs.push_weights.sum()) + inflight == pytest.approx(n, abs=1e-12)
            assert want[c][1] == pytest.approx(n, abs=1e-12)
    assert float(vs.push_weights.std()) > 1e-3  # irregular P: the weights leave 1
    vs.flush()
    np.testing.assert_allclose(vs.param_matrix().numpy(), final, rtol=0, atol=1e-12)
    np.testing.assert_allclose(final, np.broadcast_to(x0.mean(0), x0.shape), atol=1e-9)


CHOCO_CASES = {
    "topk": (lambda: TopK(0.3), 0.5),
    "randomk": (lambda: RandomK(0.4, seed=3), 0.5),
    "qsgd4": (lambda: QSGD(bits=4, seed=2), 0.8),
    "sign": (lambda: Sign(), 0.3),
}


@pytest.mark.parametrize("topo", [RingGraph(N), ExponentialGraph(6)], ids=lambda t: t.name)
@pytest.mark.parametrize("case", list(CHOCO_CASES))
def test_choco_equals_looped_choco(case, topo):
    """Per-node compression (RandomK / QSGD drawing node i's stream (i, bucket)):
    the same iterates, public copies and memories as n separate ChocoSGD wrappers."""
    make, gamma = CHOCO_CASES[case]
    looped, vec, worst = run_pair(topo, ChocoSGD, compression=make(), consensus_step=gamma)
    assert worst < TOL
    n = topo.n
    for name in ("_xhat", "_s"):
        stacked = getattr(vec.optimizer, name)[0]
        bucket = vec.optimizer._buckets[0]
        rows = torch.cat([stacked[o:o + p.numel()].view(n, -1)
                          for o, p in zip(bucket.offsets, bucket.params)], dim=1)
        mine = torch.stack([getattr(o, name)[0] for o in looped.optimizers])
        assert float((rows - mine).abs().max()) < TOL, name


def test_choco_one_step_from_its_equations():
    """lr = 0, first gossip step (x̂ = s = 0): q_i = Q(x_i) drawn from RandomK's stream
    (i, 0), x̂_i = q_i, x_i ← x_i + γ (Σ_j W_ij q_j − q_i), computed here directly."""
    n, gamma = 4, 0.7
    comp = RandomK(0.5, seed=11)
    topo = RingGraph(n)

    def lin():
        return nn.Linear(7, 3, dtype=torch.float64)

    vs = VectorizedSimulation(topo, lin, sgd(lr=0.0), ChocoSGD, identical_init=False,
                              compression=comp, consensus_step=gamma)
    x = vs.param_matrix()
    q = torch.stack([comp(x[i], generator=comp.make_generator(i, 0)) for i in range(n)])
    assert int((q != 0).sum()) == n * 12  # k = round(0.5 * 24) entries kept per node
    want = x + gamma * (torch.from_numpy(topo.matrix(0)) @ q - q)
    vs.step()
    torch.testing.assert_close(vs.param_matrix(), want, rtol=0, atol=1e-14)


def test_per_node_compressor_compresses_each_row():
    """The stacked message's compressor: node i's bucket (its rows of the parameter
    blocks) compressed alone, scattered back; payload bytes are the n nodes' total."""
    n, top = 4, TopK(0.25)

    def lin():
        return nn.Linear(7, 3, dtype=torch.float64)  # 24 parameters per node

    vs = VectorizedSimulation(RingGraph(n), lin, sgd(lr=0.0), ChocoSGD, identical_init=False,
                              compression=top, consensus_step=0.5)
    opt = vs.optimizer
    x = vs.param_matrix()  # row i: node i's 24 parameters
    want = torch.stack([top(x[i]) for i in range(n)])  # each node compressed alone
    comp, msg = opt.compression, opt._m[0]
    msg.copy_(opt._buckets[0].flat)
    dense = comp.decompress(comp.compress(msg))
    opt._buckets[0].flat.copy_(dense)  # in the parameters' layout: read back per node
    got = vs.param_matrix()
    assert torch.equal(got, want) and int((got != 0).sum()) == n * 6
    assert not torch.equal(got, top(x.reshape(-1)).view(n, -1))  # not one top-k of all
    assert opt.payload_bytes == n * top.payload_bytes(24, torch.float64)
    assert "TopK(ratio=0.25) per node" in repr(opt)
    with pytest.raises(DecommError, match="compresses the stacked ChocoSGD's messages only"):
        comp.compress(torch.zeros(96, dtype=torch.float64))


def test_choco_identity_is_dsgd():
    """Identity compression and γ = 1: CHOCO is DSGD (adapt-then-combine)."""
    _, choco, _ = run_pair(RingGraph(N), ChocoSGD, compression=Identity(), consensus_step=1.0)
    _, dsgd, _ = run_pair(RingGraph(N), DSGD)
    assert float((choco.param_matrix() - dsgd.param_matrix()).abs().max()) < 1e-12


def test_choco_refusals():
    for sim_cls in (Simulation, VectorizedSimulation):
        with pytest.raises(DecommError, match="ChocoSGD needs a static topology"):
            sim_cls(BaseGraph(N, 1), cnn, sgd(lr=0.1), ChocoSGD, compression=TopK(0.5),
                    consensus_step=0.5)
    with pytest.raises(TypeError, match="compression must be a Compressor instance"):
        VectorizedSimulation(RingGraph(N), cnn, sgd(lr=0.1), ChocoSGD, compression=TopK,
                             consensus_step=0.5)
    with pytest.raises(TypeError, match="global_every"):
        VectorizedSimulation(RingGraph(N), cnn, sgd(lr=0.1), ChocoSGD, compression=TopK(0.5),
                             consensus_step=0.5, global_every=2)


def cnn32():
    return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.Tanh(),
                         nn.Flatten(), nn.Linear(64, 4))


F32_CONFIGS = [
    ("ExactDiffusion", ExactDiffusion, RingGraph(N), {}),
    ("PushDIGing", PushDIGing, BaseGraph(N, 1), {}),
    ("PushSum-overlap2", PushSum, BaseGraph(N, 1), {"overlap": 2}),
    ("ChocoSGD-topk", ChocoSGD, RingGraph(N), {"compression": TopK(0.3),
                                               "consensus_step": 0.5}),
    ("ChocoSGD-qsgd", ChocoSGD, RingGraph(N), {"compression": QSGD(bits=8, seed=1),
                                               "consensus_step": 0.8}),
]


@pytest.mark.parametrize("name,cls,topo,kw", F32_CONFIGS, ids=[c[0] for c in F32_CONFIGS])
def test_new_wrappers_float32_match_to_1e6(name, cls, topo, kw):
    # float32: |x| < 1, a few ulps (6e-8) of rounding-order difference per step
    _, _, worst = run_pair(topo, cls, steps=3, make_model=cnn32,
                           make_opt=sgd(lr=0.05, momentum=0.9), flush="overlap" in kw, **kw)
    assert worst < TOL


# independent checks: exact optimum of the average loss with a constant step size
LS_N, LS_D = 6, 5
_g = torch.Generator().manual_seed(3)
LS_A = torch.randn(LS_N, 20, LS_D, generator=_g, dtype=torch.float64)
LS_B = torch.randn(LS_N, 20, generator=_g, dtype=torch.float64) + torch.arange(LS_N)[:, None]
# x* = argmin (1/n) Σ_i ½ mean_r (A_i x − b_i)²: the normal equations of the stacked data
LS_X = torch.from_numpy(np.linalg.lstsq(LS_A.reshape(-1, LS_D).numpy(), LS_B.reshape(-1).numpy(),
                                        rcond=None)[0])


def ls_loss(model, A, b):
    return 0.5 * (model(A).squeeze(-1) - b).square().mean()


def ls_run(topo, cls, steps, lr):
    torch.manual_seed(0)
    vs = VectorizedSimulation(topo, lambda: nn.Linear(LS_D, 1, bias=False, dtype=torch.float64),
                              sgd(lr=lr), cls, identical_init=False)
    for _ in range(steps):
        vs.step(ls_loss, LS_A, LS_B)
    return float((vs.param_matrix() - LS_X).abs().max())


def test_exact_diffusion_reaches_the_minimiser_of_the_average():
    """Heterogeneous least squares on a static ring: ExactDiffusion's fixed point is x*
    (measured 1.5e-13 after 200 steps); DSGD at the same lr keeps an O(lr) bias."""
    assert ls_run(RingGraph(LS_N), ExactDiffusion, 200, 0.2) < 1e-9
    assert ls_run(RingGraph(LS_N), DSGD, 200, 0.2) > 1e-2


@pytest.mark.parametrize("topo", [Topology.from_matrices(hub_graph(LS_N)),
                                  Topology.from_matrices([hub_graph(LS_N, 1),
                                                          hub_graph(LS_N, 2)])],
                         ids=["hub", "hub-cycle"])
def test_push_digging_reaches_the_optimum_on_a_directed_graph(topo):
    """Directed graph with irregular out-degrees: PushDIGing reaches x* (measured 4.5e-13
    after 400 steps); GradientTracking with the row-stochastic W of the same graph
    converges to the Perron-weighted optimum instead, far from x*."""
    assert ls_run(topo, PushDIGing, 400, 0.1) < 1e-9
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # W is not column-stochastic
        assert ls_run(topo, GradientTracking, 400, 0.1) > 1e-2


@pytest.mark.parametrize("cls,kw", [
    (PushSum, {"overlap": 2}),
    (ChocoSGD, {"compression": RandomK(0.4, seed=5), "consensus_step": 0.5}),
    (PushDIGing, {}),
], ids=["PushSum-overlap", "ChocoSGD-randomk", "PushDIGing"])
def test_state_dict_resumes_new_wrappers_exactly(cls, kw):
    """In-flight messages (overlap), per-node generator states (RandomK) and push-sum
    weights are in the state: a resumed run is bitwise the uninterrupted one."""
    X, Y = batches(N, 6)
    topo = RingGraph(N) if cls is ChocoSGD else HUB_CYCLE

    def make():
        return VectorizedSimulation(topo, cnn, sgd(lr=0.1, momentum=0.9), cls,
                                    identical_init=False, **kw)

    torch.manual_seed(0)
    a = make()
    for t in range(3):
        a.step(node_loss, X[t], Y[t])
    saved = a.state_dict()
    for t in range(3, 6):
        a.step(node_loss, X[t], Y[t])
    torch.manual_seed(5)
    b = make()
    b.load_state_dict(saved)
    for t in range(3, 6):
        b.step(node_loss, X[t], Y[t])
    assert torch.equal(a.param_matrix(), b.param_matrix())
    if cls is not ChocoSGD:
        assert torch.equal(a.push_weights, b.push_weights)
    else:  # the per-node streams matter: resuming without them draws other coordinates
        c = make()
        c.load_state_dict({**saved, "compression_generators": None})
        for t in range(3, 6):
            c.step(node_loss, X[t], Y[t])
        assert float((a.param_matrix() - c.param_matrix()).abs().max()) > 1e-6


# ------------------------------------------------------------------ API
def test_map_node_model_and_inspection():
    X, Y = batches(N, 1)
    vs = VectorizedSimulation(RingGraph(N), cnn, sgd(lr=0.1), DSGD, identical_init=False)
    vs.step(node_loss, X[0], Y[0])
    logits = vs.map(lambda m, x: m(x), X[0])
    assert logits.shape == (N, 6, 4)
    for i in (0, 3):
        m = vs.node_model(i)
        torch.testing.assert_close(logits[i], m(X[0, i]), rtol=0, atol=1e-12)
        assert torch.equal(vs.params(i), torch.cat([p.reshape(-1) for p in m.parameters()]))
    P = vs.param_matrix().double()
    assert vs.consensus_distance() == pytest.approx(
        float((P - P.mean(0)).square().sum(1).mean()), rel=1e-12)
    assert torch.allclose(vs.average_params(), P.mean(0))
    stacked = vs.stacked_parameters()
    assert stacked["0.weight"].shape == (N, 3, 1, 3, 3)
    # the stacked parameters are views of the wrapper's flat bucket: no copies per step
    bucket = vs.optimizer._buckets[0]
    assert all(p.untyped_storage().data_ptr() == bucket.buffer.untyped_storage().data_ptr()
               for p in stacked.values())


def test_identical_init_by_default():
    vs = VectorizedSimulation(RingGraph(4), cnn, sgd(lr=0.1), DSGD)
    X = vs.param_matrix()
    assert torch.equal(X, X[:1].expand_as(X))


def test_state_dict_resumes_exactly():
    X, Y = batches(N, 6)
    make = lambda: VectorizedSimulation(  # noqa: E731
        BaseGraph(N, 1), cnn, sgd(lr=0.1, momentum=0.9), GradientTracking,
        identical_init=False)
    torch.manual_seed(0)
    a = make()
    for t in range(3):
        a.step(node_loss, X[t], Y[t])
    saved = a.state_dict()
    for t in range(3, 6):
        a.step(node_loss, X[t], Y[t])
    torch.manual_seed(5)
    b = make()
    b.load_state_dict(saved)
    assert b.round == 3
    for t in range(3, 6):
        b.step(node_loss, X[t], Y[t])
    assert torch.equal(a.param_matrix(), b.param_matrix())
    with pytest.raises(ValueError, match="state has 5 nodes, this simulation has 4"):
        VectorizedSimulation(RingGraph(4), cnn, sgd(lr=0.1), GradientTracking
                             ).load_state_dict(saved)


def test_lr_scheduler_drives_the_stacked_optimizer():
    vs = VectorizedSimulation(RingGraph(3), cnn, sgd(lr=0.1), DSGD)
    sched = torch.optim.lr_scheduler.StepLR(vs.optimizer, step_size=1, gamma=0.5)
    vs.step()
    with warnings.catch_warnings():
        # the simulator runs the wrapper's phases, not its step(), which the scheduler
        # counts: torch warns about the order, the schedule is unaffected
        warnings.simplefilter("ignore", UserWarning)
        sched.step()
    assert vs.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def test_dropout_needs_a_randomness_mode():
    def drop():
        return nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(64, 4)).double()

    X, Y = batches(N, 1)
    vs = VectorizedSimulation(RingGraph(N), drop, sgd(lr=0.1), DSGD)
    with pytest.raises(DecommError, match="randomness='different'"):
        vs.step(node_loss, X[0], Y[0])
    torch.manual_seed(0)
    vs = VectorizedSimulation(RingGraph(N), drop, sgd(lr=0.1), DSGD, randomness="different")
    losses = vs.step(node_loss, X[0], Y[0])
    assert torch.isfinite(losses).all() and losses.shape == (N,)


# ------------------------------------------------------------------ errors
def test_batchnorm_is_refused_by_name():
    def bn():
        return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(),
                             nn.Linear(72, 4))
    with pytest.raises(TypeError, match=r"1 \(BatchNorm2d\).*GroupNorm"):
        VectorizedSimulation(RingGraph(3), bn, sgd(lr=0.1), DSGD)


def test_batchnorm_without_running_stats_matches_looped():
    def bn():
        return nn.Sequential(nn.Conv2d(1, 2, 3, stride=2),
                             nn.BatchNorm2d(2, track_running_stats=False),
                             nn.Flatten(), nn.Linear(18, 4)).double()
    assert run_both(RingGraph(N), DSGD, sgd(lr=0.1), make_model=bn) < TOL


def test_unsupported_wrappers_and_optimizers():
    class MyDSGD(DSGD):
        pass

    with pytest.raises(TypeError, match="cannot run MyDSGD.*decomm.sim.Simulation"):
        VectorizedSimulation(RingGraph(3), cnn, sgd(lr=0.1), MyDSGD)
    # neither simulator runs AsyncGossip: the error says why and where it runs
    with pytest.raises(TypeError, match="cannot run AsyncGossip: .*one-sided MPI windows.*"
                                        "Neither simulator.*under MPI"):
        VectorizedSimulation(RingGraph(3), cnn, sgd(lr=0.1), AsyncGossip)
    with pytest.raises(TypeError, match="Simulation cannot run AsyncGossip"):
        Simulation(RingGraph(3), cnn, sgd(lr=0.1), AsyncGossip)
    with pytest.raises(TypeError, match="elementwise.*LBFGS"):
        VectorizedSimulation(RingGraph(3), cnn, lambda m: torch.optim.LBFGS(m.parameters()),
                             DSGD)


def test_bad_arguments():
    topo = RingGraph(3)
    with pytest.raises(ValueError, match="randomness must be"):
        VectorizedSimulation(topo, cnn, sgd(lr=0.1), randomness="maybe")
    with pytest.raises(TypeError, match="sets 'communicator' itself"):
        VectorizedSimulation(topo, cnn, sgd(lr=0.1), communicator=None)
    with pytest.raises(TypeError, match="must return an nn.Module"):
        VectorizedSimulation(topo, lambda: 3, sgd(lr=0.1))
    with pytest.raises(TypeError, match="Topology"):
        VectorizedSimulation("ring", cnn, sgd(lr=0.1))
    outside = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=r"param_groups\[0\] holds a tensor of shape \(2,\)"):
        VectorizedSimulation(topo, cnn, lambda m: torch.optim.SGD([outside], lr=0.1))
    vs = VectorizedSimulation(topo, cnn, sgd(lr=0.1))
    X, _ = batches(3, 1)
    with pytest.raises(ValueError, match=r"batch\[1\]: expected a tensor with leading "
                                         r"dimension n = 3.*\(4, 6\)"):
        vs.step(node_loss, X[0], torch.zeros(4, 6, dtype=torch.long))
    with pytest.raises(TypeError, match="batch given without loss_fn"):
        vs.step(None, X[0])
    with pytest.raises(DecommError, match="one scalar tensor per node"):
        vs.step(lambda m, x: m(x), X[0])
    with pytest.raises(ValueError, match="node index 3 out of range"):
        vs.params(3)


def test_tiny_gpu_example_runs_on_cpu():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "vsim_gpu_vgg.py"), "--tiny"],
        capture_output=True, text=True, timeout=240, cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "step 2/2" in out.stdout and "ms/step" in out.stdout
    assert "done" in out.stdout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_mixing_matches_looped(dtype):
    """Pure gossip (lr = 0) of low-precision parameters: both simulators mix in float32
    and round back, so they agree to the dtype's rounding of a float32 result."""
    def lin():
        return nn.Linear(6, 3, dtype=dtype)

    topo = BaseGraph(N, 1)
    torch.manual_seed(0)
    looped = Simulation(topo, lin, sgd(lr=0.0), DSGD, identical_init=False)
    torch.manual_seed(0)
    vec = VectorizedSimulation(topo, lin, sgd(lr=0.0), DSGD, identical_init=False)
    X = looped.param_matrix().double().numpy()
    for t in range(3):
        for p in (p for m in looped.models for p in m.parameters()):
            p.grad = torch.zeros_like(p)
        looped.step()
        vec.step()
        X = topo.matrix(t) @ X
    assert vec.param_matrix().dtype == dtype
    eps = torch.finfo(dtype).eps
    np.testing.assert_allclose(vec.param_matrix().double().numpy(),
                               looped.param_matrix().double().numpy(), rtol=0, atol=2 * eps)
    np.testing.assert_allclose(vec.param_matrix().double().numpy(), X, rtol=0, atol=8 * eps)


class Counting(nn.Module):
    """A model with in-place module state in forward (a step counter, a running mean)."""

    def __init__(self, running_from_data: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 4).double()
        self.register_buffer("state", torch.zeros((), dtype=torch.float64))
        self.running_from_data = running_from_data

    def forward(self, x):
        x = x.flatten(1)
        if self.running_from_data:
            self.state.mul_(0.9).add_(x.mean())  # batched data into a shared buffer
        else:
            self.state.add_(1.0)  # unbatched: vmap allows it, one copy for all nodes
        return self.lin(x)


@pytest.mark.parametrize("from_data", [True, False])
def test_in_place_module_state_is_refused(from_data):
    X, Y = batches(N, 1)
    vs = VectorizedSimulation(RingGraph(N), lambda: Counting(from_data), sgd(lr=0.1), DSGD)
    match = "in place" if from_data else r"modified the module buffer\(s\) \['state'\]"
    with pytest.raises(DecommError, match=match):
        vs.step(node_loss, X[0], Y[0])
    with pytest.raises(DecommError, match=match):
        vs.map(lambda m, x: m(x), X[0])


def test_read_only_buffers_are_shared():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 4).double()
            self.register_buffer("scale", torch.tensor(0.5, dtype=torch.float64))

        def forward(self, x):
            return self.lin(x.flatten(1) * self.scale)

    assert run_both(BaseGraph(N, 1), GradientTracking, sgd(lr=0.1), make_model=Scaled) < TOL


def test_identical_init_matches_looped_and_run_collects_losses():
    X, Y = batches(N, 3)
    torch.manual_seed(0)
    looped = Simulation(RingGraph(N), cnn, sgd(lr=0.1), DSGD)
    torch.manual_seed(0)
    vs = VectorizedSimulation(RingGraph(N), cnn, sgd(lr=0.1), DSGD)
    assert torch.equal(looped.param_matrix(), vs.param_matrix())
    losses = vs.run(node_loss, lambda s: (X[s], Y[s]), 3)
    for s in range(3):
        looped.step(lambda i, m, s=s: node_loss(m, X[s, i], Y[s, i]))
    assert losses.shape == (3, N)
    assert float((looped.param_matrix() - vs.param_matrix()).abs().max()) < TOL


def test_tied_parameters_stay_tied():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(64, 64, bias=False).double()
            self.b = nn.Linear(64, 64).double()
            self.b.weight = self.a.weight  # one parameter used twice
            self.head = nn.Linear(64, 4).double()

        def forward(self, x):
            return self.head(torch.tanh(self.b(torch.tanh(self.a(x.flatten(1))))))

    assert run_both(OnePeerExponentialGraph(N), GradientTracking, sgd(lr=0.05),
                    make_model=Tied) < TOL
    vs = VectorizedSimulation(RingGraph(N), Tied, sgd(lr=0.05), DSGD)
    assert list(vs.stacked_parameters()) == ["a.weight", "b.bias", "head.weight", "head.bias"]
    assert vs.stacked_model.a.weight is vs.stacked_model.b.weight


def test_error_messages_are_not_wrapped_twice():
    vs = VectorizedSimulation(RingGraph(3), cnn, sgd(lr=0.1))
    X, _ = batches(3, 1)
    with pytest.raises(DecommError) as info:
        vs.step(lambda m, x: m(x), X[0])
    assert str(info.value) == ("loss_fn must return one scalar tensor per node, got (6, 4) "
                               "per node")


def test_data_dependent_control_flow_is_explained():
    def loss(m, x, y):
        out = node_loss(m, x, y)
        return out * 2 if out > 1 else out  # Python branch on a tensor value

    vs = VectorizedSimulation(RingGraph(3), cnn, sgd(lr=0.1))
    X, Y = batches(3, 1)
    with pytest.raises(DecommError, match="vmapped over nodes: no .item"):
        vs.step(loss, X[0], Y[0])
    with pytest.raises(RuntimeError, match="should be the same") as info:
        vs.step(node_loss, X[0].float(), Y[0])  # a plain torch error stays torch's
    assert not isinstance(info.value, DecommError)


def test_push_matrix_from_sparse_or_dense_is_the_same():
    topo = Topology.from_matrices(hub_graph(N))
    vs = VectorizedSimulation(topo, cnn, sgd(lr=0.1), PushSum)
    sparse = vs.mixing_matrix(0).clone()
    # P(t) is column-stochastic with the uniform split 1 / (outdeg + 1)
    outdeg = (hub_graph(N) != 0).sum(0) - 1
    np.testing.assert_allclose(sparse.sum(0).numpy(), np.ones(N), atol=1e-15)
    np.testing.assert_allclose(np.diag(sparse.numpy()), 1.0 / (outdeg + 1), atol=1e-15)
    dense_pw = vs._pw.matrix(0).toarray()
    vs._pw.matrix = lambda t: dense_pw  # what PushWeights gives without SciPy
    vs._w_cache.clear()
    assert torch.equal(vs.mixing_matrix(0), sparse)
