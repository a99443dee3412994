"""ChocoSGD over real MPI (run for N = 1..5 ranks).

Every rank's data comes from a seed of its own rank, so every rank can also run the
whole problem in decomm.sim: the MPI run (compressed payloads sent with
neighbor_allgather) must agree with the simulation (dense q mixed with W) to 1e-6.
The bytes a step sends are read from decomm.stats() and compared with closed forms.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import decomm
from decomm.compression import QSGD, RandomK, Sign, TopK
from decomm.optim import DSGD, ChocoSGD
from decomm.sim import Simulation
from decomm.topology import ExponentialGraph, RingGraph, Topology

D = 20
# (compressor, consensus step γ): γ tuned in the simulator so that 150 gossip steps
# shrink the consensus distance by >= 5e5 (Sign; the others by > 1e8) on ring and
# exponential graphs of 2..8 nodes (a larger γ stalls or diverges, as the theory's
# γ ~ δρ predicts); the test asks for 1e5
COMPRESSORS = {
    "topk": (lambda: TopK(0.25), 0.3),
    "randomk": (lambda: RandomK(0.5, seed=7), 0.3),
    "qsgd8": (lambda: QSGD(bits=8, seed=3), 0.8),
    "sign": (lambda: Sign(), 0.2),
}


def start(i: int) -> torch.Tensor:
    return torch.randn(D, generator=torch.Generator().manual_seed(500 + i), dtype=torch.float64)


def shard(i: int, x_star: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Realisable least squares: b_i = A_i x*, so x* minimises every local loss."""
    A = torch.randn(100, D, generator=torch.Generator().manual_seed(900 + i), dtype=torch.float64)
    return A, A @ x_star


X_STAR = torch.linspace(-1.0, 1.0, D, dtype=torch.float64)


def ls_loss(i: int, model: nn.Module) -> torch.Tensor:
    A, b = shard(i, X_STAR)
    return 0.5 * (model(A).squeeze(-1) - b).square().mean()


def zero_loss(i: int, model: nn.Module) -> torch.Tensor:
    return (model.weight * 0.0).sum()


def make_model() -> nn.Module:
    return nn.Linear(D, 1, bias=False, dtype=torch.float64)


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def simulation(topo, comp, gamma, lr, init) -> Simulation:
    sim = Simulation(topo, make_model, lambda m: torch.optim.SGD(m.parameters(), lr=lr),
                     ChocoSGD, identical_init=False, compression=comp, consensus_step=gamma)
    with torch.no_grad():
        for i, m in enumerate(sim.models):
            m.weight.copy_(init(i))
    return sim


def mpi_run(comp, gamma, lr, init, steps, loss_fn):
    model = make_model()
    with torch.no_grad():
        model.weight.copy_(init(decomm.rank()))
    opt = ChocoSGD(torch.optim.SGD(model.parameters(), lr=lr), compression=comp,
                   consensus_step=gamma, broadcast_parameters=False)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(decomm.rank(), model).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("name", list(COMPRESSORS))
def test_consensus_matches_simulation_and_preserves_the_average(name):
    """lr = 0: Choco is compressed gossip; Σ_i x_i is invariant (W doubly stochastic),
    every x_i tends to mean_i x_i(0), and the MPI numbers equal the simulator's."""
    n, r = decomm.size(), decomm.rank()
    topo = ExponentialGraph(n)
    decomm.set_topology(topo)
    make, gamma = COMPRESSORS[name]
    steps = 150
    model, opt = mpi_run(make(), gamma, 0.0, start, steps, zero_loss)
    sim = simulation(topo, make(), gamma, 0.0, start)
    sim.run(zero_loss, steps)
    assert float((flat(model) - sim.params(r)).abs().max()) < 1e-6
    mean0 = torch.stack([start(i) for i in range(n)]).mean(0)
    total = decomm.allreduce(flat(model), average=True)
    assert float((total - mean0).abs().max()) < 1e-12
    c0 = float(torch.stack([start(i) for i in range(n)]).var(0, correction=0).sum())
    dist = opt.consensus_distance(exact=True)
    assert dist <= 1e-5 * c0, (name, dist, c0)
    assert decomm.current_round() == steps


@pytest.mark.parametrize("name", list(COMPRESSORS))
def test_least_squares_matches_simulation_and_reaches_the_optimum(name):
    """b_i = A_i x*: every rank's loss is minimised by x*, so Choco with a constant
    learning rate converges to x* itself (no heterogeneity bias)."""
    n, r = decomm.size(), decomm.rank()
    topo = RingGraph(n)
    decomm.set_topology(topo)
    make, gamma = COMPRESSORS[name]
    steps = 150  # the simulator reaches a relative error <= 3e-10 by then (n <= 8)
    model, _ = mpi_run(make(), gamma, 0.5, start, steps, ls_loss)
    sim = simulation(topo, make(), gamma, 0.5, start)
    sim.run(ls_loss, steps)
    assert float((flat(model) - sim.params(r)).abs().max()) < 1e-6
    err = float((flat(model) - X_STAR).norm() / X_STAR.norm())
    assert err < 1e-6, (name, err)


def test_bytes_on_the_wire_topk_is_at_most_a_quarter_of_dsgd():
    """decomm.stats(): DSGD sends the dense model, Choco+TopK(0.1) its payload."""
    n = decomm.size()
    decomm.set_topology(RingGraph(n))
    out_deg = len(decomm.out_neighbors())
    d = 2000
    sent = {}
    for name in ("dsgd", "choco"):
        model = nn.Linear(d, 1, bias=False, dtype=torch.float64)
        inner = torch.optim.SGD(model.parameters(), lr=0.01)
        opt = (DSGD(inner) if name == "dsgd"
               else ChocoSGD(inner, compression=TopK(0.1), consensus_step=0.5))
        decomm.reset_stats()
        for _ in range(3):
            opt.zero_grad()
            model(torch.ones(1, d, dtype=torch.float64)).sum().backward()
            opt.step()
        sent[name] = decomm.stats()["bytes_sent"] / 3
    if out_deg == 0:
        assert sent == {"dsgd": 0, "choco": 0}
        return
    # DSGD: one header + the d float64 parameters per out-neighbour and step
    header = sent["dsgd"] / out_deg - d * 8
    assert 0 <= header <= 1024
    # Choco: one header + k = 200 float64 values + 200 int32 indices
    assert opt.payload_bytes == 200 * (8 + 4)
    assert sent["choco"] == out_deg * (opt.payload_bytes + header)
    assert sent["choco"] <= 0.25 * sent["dsgd"], sent


def choco_reference(ws, switch, x0, grads, lr, gamma, steps, k):
    """Algorithm 2 in its explicit form (a copy x̂_j of every node's public value),
    numpy, TopK; W switches from ws[0] to ws[1] before step ``switch``."""
    x, xhat = x0.copy(), np.zeros_like(x0)
    for t in range(steps):
        w = ws[0] if t < switch else ws[1]
        xh = x - lr * grads(x)
        diff = xh - xhat
        q = np.zeros_like(diff)
        for i in range(len(x)):
            idx = np.argsort(-np.abs(diff[i]), kind="stable")[:k]
            q[i, idx] = diff[i, idx]
        xhat = xhat + q
        x = xh + gamma * (w @ xhat - xhat)
    return x


def test_static_topology_change_resynchronises_exactly():
    """set_topology to another static graph mid-run: s_i is rebuilt from x̂ with one
    dense exchange, so the run equals the explicit algorithm with W switching."""
    n, r = decomm.size(), decomm.rank()
    topos = [ExponentialGraph(n), RingGraph(n)]
    ws = [t.matrix(0) for t in topos]
    decomm.set_topology(topos[0])
    lr, gamma, switch, steps = 0.1, 0.3, 20, 40
    model = make_model()
    with torch.no_grad():
        model.weight.copy_(start(r))
    opt = ChocoSGD(torch.optim.SGD(model.parameters(), lr=lr), compression=TopK(0.25),
                   consensus_step=gamma, broadcast_parameters=False)
    for t in range(steps):
        if t == switch:
            decomm.set_topology(topos[1])
        opt.zero_grad()
        ls_loss(r, model).backward()
        opt.step()
    shards = [shard(i, X_STAR) for i in range(n)]

    def grads(x):
        return np.stack([(A.T @ (A @ torch.from_numpy(x[i]) - b)).numpy() / A.shape[0]
                         for i, (A, b) in enumerate(shards)])

    x0 = torch.stack([start(i) for i in range(n)]).numpy()
    ref = choco_reference(ws, switch, x0, grads, lr, gamma, steps, k=5)
    assert float(np.abs(flat(model).numpy() - ref[r]).max()) < 1e-6


def test_time_varying_topology_is_refused_on_every_rank():
    n = decomm.size()
    decomm.set_topology(Topology.from_matrices([np.eye(n), RingGraph(n).matrix(0)]))
    model = make_model()
    with pytest.raises(decomm.DecommError, match="static topology"):
        ChocoSGD(torch.optim.SGD(model.parameters(), lr=0.1), compression=Sign(),
                 consensus_step=0.5)
    # changed to a time-varying one after construction: refused at the next step
    decomm.set_topology(RingGraph(n))
    opt = ChocoSGD(torch.optim.SGD(model.parameters(), lr=0.1), compression=Sign(),
                   consensus_step=0.5)
    decomm.set_topology(Topology.from_matrices([np.eye(n), RingGraph(n).matrix(0)]))
    model(torch.ones(1, D, dtype=torch.float64)).sum().backward()
    with pytest.raises(decomm.DecommError, match="static topology"):
        opt.step()
