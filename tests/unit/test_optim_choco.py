"""ChocoSGD in one process: decomm.sim (n nodes) and LocalCommunicator (one node).

Expected numbers come from closed forms (the average of the initial values, the
least-squares solution x*) or from an independent numpy implementation of
Algorithm 2 of Koloskova, Stich & Jaggi (2019) in its explicit form (every node
holds a copy x̂_j of each public value), which the wrapper's memory-efficient form
(s_i = Σ_j W_ij x̂_j) must reproduce.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import decomm
from decomm.compression import QSGD, Identity, RandomK, Sign, TopK
from decomm.optim import DSGD, ChocoSGD, LocalCommunicator
from decomm.sim import Simulation
from decomm.topology import ExponentialGraph, OnePeerExponentialGraph, RingGraph, Topology

D = 20
# γ tuned in the simulator: 300 gossip steps shrink the consensus distance by
# > 1e7 on rings / exponential graphs of 2..8 nodes (larger γ stalls or diverges)
CASES = {
    "topk": (lambda: TopK(0.25), 0.3),
    "randomk": (lambda: RandomK(0.5, seed=7), 0.3),
    "qsgd8": (lambda: QSGD(bits=8, seed=3), 0.8),
    "qsgd2_rescaled": (lambda: QSGD(1, seed=1, rescale=True), 0.3),
    "sign": (lambda: Sign(), 0.2),
}
X_STAR = torch.linspace(-1.0, 1.0, D, dtype=torch.float64)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def start(i: int) -> torch.Tensor:
    return torch.randn(D, generator=torch.Generator().manual_seed(500 + i), dtype=torch.float64)


def shard(i: int, realisable: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(900 + i)
    A = torch.randn(100, D, generator=g, dtype=torch.float64)
    b = A @ X_STAR
    if not realisable:
        b = b + torch.randn(100, generator=g, dtype=torch.float64) + i
    return A, b


SHARDS = {r: [shard(i, r) for i in range(8)] for r in (True, False)}


def ls_loss(realisable: bool = True):
    def f(i: int, model: nn.Module) -> torch.Tensor:
        A, b = SHARDS[realisable][i]
        dt = model.weight.dtype
        return 0.5 * (model(A.to(dt)).squeeze(-1) - b.to(dt)).square().mean()
    return f


def zero_loss(i: int, model: nn.Module) -> torch.Tensor:
    return (model.weight * 0.0).sum()


def simulation(topo, lr, wrapper=ChocoSGD, dtype=torch.float64, **kw) -> Simulation:
    sim = Simulation(topo, lambda: nn.Linear(D, 1, bias=False, dtype=dtype),
                     lambda m: torch.optim.SGD(m.parameters(), lr=lr), wrapper,
                     identical_init=False, **kw)
    with torch.no_grad():
        for i, m in enumerate(sim.models):
            m.weight.copy_(start(i))
    return sim


# ----------------------------------------------------------- closed forms
@pytest.mark.parametrize("name", list(CASES))
def test_gossip_preserves_the_sum_and_reaches_the_average(name):
    """lr = 0 on a ring of 8: Σ_i x_i is invariant at every step (W doubly
    stochastic) and every x_i tends to mean_i x_i(0)."""
    n = 8
    make, gamma = CASES[name]
    sim = simulation(RingGraph(n), 0.0, compression=make(), consensus_step=gamma)
    x0 = sim.param_matrix().double()
    mean0, c0 = x0.mean(0), sim.consensus_distance()
    for t in range(300):
        sim.step(zero_loss)
        if t % 50 == 0:  # the invariant holds at every step, not only at the end
            assert float((sim.average_params() - mean0).abs().max()) < 1e-12
    assert float((sim.average_params() - mean0).abs().max()) < 1e-12
    assert sim.consensus_distance() < 1e-6 * c0, (name, sim.consensus_distance(), c0)
    assert float((sim.param_matrix() - mean0).abs().max()) < 1e-3 * float(mean0.abs().max())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(CASES))
def test_least_squares_reaches_the_optimum(name, dtype):
    """b_i = A_i x*: x* minimises every node's loss, so with a constant learning rate
    Choco converges to x* itself (no heterogeneity bias)."""
    make, gamma = CASES[name]
    sim = simulation(ExponentialGraph(6), 0.5, dtype=dtype, compression=make(),
                     consensus_step=gamma)
    sim.run(ls_loss(), 200)
    err = float((sim.param_matrix().double() - X_STAR).norm(dim=1).max() / X_STAR.norm())
    assert err < (1e-6 if dtype == torch.float64 else 1e-5), (name, err)


def numpy_choco(w, x0, lr, gamma, steps, compress, realisable, every=1):
    """Algorithm 2, explicit form: xhat[j] is the copy of node j's public value that
    all its neighbours hold; W·xhat is formed from those copies each step."""
    shards = [(A.numpy(), b.numpy()) for A, b in SHARDS[realisable][: len(x0)]]
    x, xhat = x0.copy(), np.zeros_like(x0)
    for t in range(steps):
        grad = np.stack([A.T @ (A @ x[i] - b) / len(b) for i, (A, b) in enumerate(shards)])
        xh = x - lr * grad
        if (t + 1) % every:
            x = xh  # a local step: the inner optimizer only
            continue
        q = np.stack([compress(xh[i] - xhat[i]) for i in range(len(x))])
        xhat = xhat + q
        x = xh + gamma * (w @ xhat - xhat)
    return x


def np_topk(k):
    def c(v):
        out = np.zeros_like(v)
        idx = np.argsort(-np.abs(v), kind="stable")[:k]
        out[idx] = v[idx]
        return out
    return c


def np_sign(v):
    return np.abs(v).sum() / v.size * np.where(v >= 0, 1.0, -1.0)


@pytest.mark.parametrize("every", [1, 3])
@pytest.mark.parametrize("comp, ref", [(TopK(0.25), np_topk(5)), (Sign(), np_sign)],
                         ids=["topk", "sign"])
def test_memory_efficient_form_equals_the_explicit_algorithm(comp, ref, every):
    """Heterogeneous data, 40 steps, communicate_every 1 and 3: the wrapper's
    (x̂_i, s_i) form gives the explicit algorithm's iterates."""
    topo = RingGraph(5)
    sim = simulation(topo, 0.1, compression=comp, consensus_step=0.3, communicate_every=every)
    sim.run(ls_loss(realisable=False), 40)
    x0 = torch.stack([start(i) for i in range(5)]).numpy()
    want = numpy_choco(topo.matrix(0), x0, 0.1, 0.3, 40, ref, False, every)
    assert np.abs(sim.param_matrix().numpy() - want).max() < 1e-10
    assert sim.round == 40 // every


def test_identity_with_unit_consensus_step_is_dsgd():
    """Q = I, γ = 1: x̂ = x^{t+½}, so x^{t+1} = Σ_j W_ij x_j^{t+½}, DSGD's ATC step."""
    topo = ExponentialGraph(6)
    choco = simulation(topo, 0.2, compression=Identity(), consensus_step=1.0)
    dsgd = simulation(topo, 0.2, wrapper=DSGD)
    choco.run(ls_loss(realisable=False), 60)
    dsgd.run(ls_loss(realisable=False), 60)
    assert float((choco.param_matrix() - dsgd.param_matrix()).abs().max()) < 1e-12


def test_one_node_is_the_inner_optimizer_bitwise():
    """n = 1 (W = [[1]]): s_i and x̂_i receive the same q, so s − x̂ = 0 exactly."""
    torch.manual_seed(0)
    a = nn.Linear(D, 1, bias=False, dtype=torch.float64)
    b = copy.deepcopy(a)
    opt_a = ChocoSGD(torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9),
                     compression=QSGD(bits=8), consensus_step=0.5,
                     communicator=LocalCommunicator())
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    for _ in range(10):
        for m, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad()
            ls_loss(False)(0, m).backward()
            o.step()
    assert torch.equal(a.weight, b.weight)
    assert opt_a.payload_bytes == QSGD(bits=8).payload_bytes(D, torch.float64) == D + 8
    assert opt_a.dense_bytes == D * 8
    assert len(opt_a.public_copies()) == 1


def test_resume_is_bitwise_exact_with_random_draws():
    """The generator states, x̂ and s are in the state_dict: a resumed run equals
    the uninterrupted one bit for bit."""
    def build():
        return simulation(RingGraph(4), 0.1, compression=RandomK(0.25, seed=2),
                          consensus_step=0.3)
    sim = build()
    sim.run(ls_loss(False), 6)
    saved = sim.state_dict()
    sim.run(ls_loss(False), 6)
    resumed = build()
    resumed.load_state_dict(saved)
    resumed.run(ls_loss(False), 6)
    assert torch.equal(sim.param_matrix(), resumed.param_matrix())
    sd = saved["optimizers"][1]["decomm"]
    assert set(sd["state"]) == {"public_copy", "neighbor_sum"}
    assert sd["extra"]["exchanged"] is True


def test_nodes_draw_different_coordinates():
    """One RandomK instance shared by all simulated nodes: each node has its own
    stream (rank, bucket), so the nodes keep different coordinates."""
    sim = simulation(RingGraph(3), 0.0, compression=RandomK(0.1, seed=0), consensus_step=0.2)
    sim.step(zero_loss)
    kept = [set(torch.nonzero(o.public_copies()[0]).reshape(-1).tolist())
            for o in sim.optimizers]
    assert all(len(k) == 2 for k in kept)
    assert len({frozenset(k) for k in kept}) > 1


# ------------------------------------------------------------------ errors
def local(**kw):
    model = nn.Linear(D, 1, bias=False)
    kw.setdefault("compression", TopK(0.1))
    kw.setdefault("consensus_step", 0.5)
    return ChocoSGD(torch.optim.SGD(model.parameters(), lr=0.1),
                    communicator=LocalCommunicator(), **kw)


@pytest.mark.parametrize("compression, match", [
    ("topk", "must be a decomm.compression.Compressor"),
    (None, "must be a decomm.compression.Compressor"),
    (TopK, "instance, got the class TopK"),
])
def test_bad_compression(compression, match):
    with pytest.raises(TypeError, match=match):
        local(compression=compression)


@pytest.mark.parametrize("step", [0, 0.0, -0.1, 1.01, float("nan")])
def test_bad_consensus_step(step):
    with pytest.raises(ValueError, match="consensus_step must be in"):
        local(consensus_step=step)


@pytest.mark.parametrize("step", ["0.5", True, None])
def test_consensus_step_of_wrong_type(step):
    with pytest.raises(TypeError, match="consensus_step must be a float"):
        local(consensus_step=step)


def test_complex_parameters_and_global_every_are_refused():
    p = nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        ChocoSGD(torch.optim.SGD([p], lr=0.1), compression=Sign(), consensus_step=0.5,
                 communicator=LocalCommunicator())
    with pytest.raises(TypeError, match="global_every"):
        local(global_every=2)
    with pytest.raises(TypeError, match="wraps a torch.optim.Optimizer"):
        ChocoSGD(object(), compression=Sign(), consensus_step=0.5,  # type: ignore[arg-type]
                 communicator=LocalCommunicator())


@pytest.mark.parametrize("topo", [OnePeerExponentialGraph(4),
                                  Topology.from_matrices([np.eye(3), RingGraph(3).matrix(0)])],
                         ids=["one-peer-exponential", "two-round-cycle"])
def test_time_varying_topology_is_refused(topo):
    with pytest.raises(decomm.DecommError, match="needs a static topology"):
        simulation(topo, 0.1, compression=TopK(0.5), consensus_step=0.5)


def test_topology_change_after_the_first_exchange_needs_a_dense_exchange():
    """The simulator's communicator has no dense exchange: changing sim.topology
    after the first step is refused (before: nothing to rebuild, x̂ = s = 0)."""
    sim = simulation(ExponentialGraph(4), 0.1, compression=TopK(0.5), consensus_step=0.5)
    sim.topology = RingGraph(4)
    sim.step(zero_loss)  # before any exchange: accepted
    sim.topology = ExponentialGraph(4)
    with pytest.raises(decomm.DecommError, match="rebuilt with one dense exchange"):
        sim.step(zero_loss)


def test_not_column_stochastic_warns():
    w = np.array([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.5, 0.5]])
    with pytest.warns(UserWarning, match="doubly stochastic"):
        simulation(Topology.from_matrices(w), 0.1, compression=Sign(), consensus_step=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        simulation(RingGraph(3), 0.1, compression=Sign(), consensus_step=0.5)


def test_repr_names_the_compressor():
    r = repr(local(compression=QSGD(bits=8), consensus_step=0.25))
    assert "QSGD(levels=127, bits=8, seed=0)" in r and "consensus_step=0.25" in r
