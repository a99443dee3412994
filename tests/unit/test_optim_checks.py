"""Input checks of the wrappers: mixing-matrix columns, checkpoint world, message size,
simulator support, buffers in the consensus distance (single process)."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import decomm.optim._base as base
from decomm.errors import DecommError
from decomm.optim import (
    D2,
    DSGD,
    AsyncGossip,
    GradientTracking,
    LocalCommunicator,
    QGDSGDm,
    consensus_distance,
)
from decomm.sim import Simulation
from decomm.topology import BaseGraph, EquiDyn, ExponentialGraph, RingGraph, Topology


class FakeComm(LocalCommunicator):
    """Rank ``rank`` of a pretend ``size``-rank world of identical peers."""

    def __init__(self, size: int = 2, rank: int = 0, topo=None) -> None:
        super().__init__()
        self._size, self._rank, self.topo = size, rank, topo

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank

    def topology(self):
        return self.topo

    def allgather(self, tensor, name=None):
        return torch.cat([tensor] * self._size)


def directed4() -> np.ndarray:
    """Row-stochastic, not column-stochastic: nodes 1-3 listen to node 0, node 0 to nobody."""
    w = np.eye(4) * 0.5
    w[0, 0] = 1.0
    w[1:, 0] = 0.5
    return w  # column 0 sums to 2.5, columns 1-3 to 0.5


def sgd(model, lr=0.1):
    return torch.optim.SGD(model.parameters(), lr=lr)


def column_warnings(rec):
    return [str(w.message) for w in rec if "doubly stochastic" in str(w.message)]


# ------------------------------------------------------------ item: W's columns
@pytest.mark.parametrize("cls", [DSGD, GradientTracking])
def test_warns_once_on_rank_0_when_columns_do_not_sum_to_one(cls):
    topo = Topology.from_matrices([directed4()], name="directed4")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        model = nn.Linear(2, 1)
        opt = cls(sgd(model), communicator=FakeComm(4, 0, topo))
        for _ in range(3):
            model(torch.ones(1, 2)).sum().backward()
            opt.step()
        cls(sgd(nn.Linear(2, 1)), communicator=FakeComm(4, 1, topo))  # rank 1: silent
    msgs = column_warnings(rec)
    assert len(msgs) == 1
    assert f"{cls.__name__} needs" in msgs[0] and "column 0 of W(0)" in msgs[0]
    assert "directed4" in msgs[0] and "sums to 2.5" in msgs[0] and "PushSum" in msgs[0]


@pytest.mark.parametrize(
    "topo", [RingGraph(4), ExponentialGraph(6), BaseGraph(5, 1), EquiDyn(6, seed=3)]
)
def test_doubly_stochastic_topologies_do_not_warn(topo):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GradientTracking(sgd(nn.Linear(2, 1)), communicator=FakeComm(topo.n, 0, topo))


def test_time_varying_cycle_is_checked_whole_and_cached():
    ring = RingGraph(4).matrix(0)
    topo = Topology.from_matrices([ring, ring, directed4()], name="cycle3")
    assert base.worst_column_sum(topo) == (2.5, 0, 2)  # (sum, column, round)
    calls = []
    real = topo.sparse
    topo.sparse = lambda t: calls.append(t) or real(t)  # type: ignore[method-assign]
    assert base.worst_column_sum(topo) == (2.5, 0, 2)
    assert calls == []  # cached per fingerprint
    with pytest.warns(UserWarning, match=r"column 0 of W\(2\) of the topology cycle3"):
        DSGD(sgd(nn.Linear(2, 1)), communicator=FakeComm(4, 0, topo))


def test_random_family_checks_its_first_rounds():
    topo = EquiDyn(6, seed=3)
    seen = []
    real = topo.sparse
    topo.sparse = lambda t: seen.append(t) or real(t)  # type: ignore[method-assign]
    base._column_cache.pop(topo.fingerprint(), None)
    assert base.worst_column_sum(topo) is None
    assert seen == list(range(base.RANDOM_ROUNDS_CHECKED))


def test_set_topology_change_is_checked_at_the_next_gossip_step():
    comm = FakeComm(4, 0, RingGraph(4))
    model = nn.Linear(2, 1)
    opt = DSGD(sgd(model), communicator=comm)
    comm.topo = Topology.from_matrices([directed4()], name="later")
    model(torch.ones(1, 2)).sum().backward()
    with pytest.warns(UserWarning, match="topology later sums to 2.5"):
        opt.step()


def test_simulation_warns_once_not_once_per_node():
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        sim = Simulation(directed4(), lambda: nn.Linear(2, 1), sgd, GradientTracking)
        sim.step(lambda i, m: m(torch.ones(1, 2)).sum())
    assert len(column_warnings(rec)) == 1


def test_gradient_tracking_on_the_directed_graph_is_biased_as_warned():
    """f_i(x) = (x - c_i)^2 / 2: node 0 hears nobody, so GT converges to c_0, not mean(c)."""
    c = torch.tensor([1.0, 3.0, 5.0, 7.0], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sim = Simulation(directed4(), lambda: nn.Linear(1, 1, bias=False, dtype=torch.float64),
                         lambda m: sgd(m, 0.2), GradientTracking)
    sim.run(lambda i, m: 0.5 * (m.weight.sum() - c[i]) ** 2, 300)
    x = sim.param_matrix()[:, 0]
    assert torch.allclose(x, torch.full((4,), 1.0, dtype=torch.float64), atol=1e-8)
    assert float(c.mean()) == 4.0  # where it should have gone


# ------------------------------------------------------------- item: D2 warnings
def test_d2_warns_on_rank_0_only():
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        D2(sgd(nn.Linear(2, 1)), communicator=FakeComm(4, 1, RingGraph(4)))
        D2(sgd(nn.Linear(2, 1)), communicator=FakeComm(4, 3, RingGraph(4)))
    assert not [w for w in rec if "D2" in str(w.message)]
    with pytest.warns(UserWarning, match="eigenvalue -0.333333"):
        D2(sgd(nn.Linear(2, 1)), communicator=FakeComm(4, 0, RingGraph(4)))


def test_d2_warns_once_in_the_simulator():
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        sim = Simulation(RingGraph(4), lambda: nn.Linear(2, 1), sgd, D2)
        sim.step(lambda i, m: m(torch.ones(1, 2)).sum())
    assert len([w for w in rec if "eigenvalue -0.333333" in str(w.message)]) == 1


# ------------------------------------------------------- item: checkpoint world
def gt_state(size=4, rank=1, topo=None):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    comm = FakeComm(size, rank, topo if topo is not None else ExponentialGraph(size))
    opt = GradientTracking(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                           communicator=comm)
    for _ in range(3):
        opt.zero_grad()
        model(torch.ones(2, 3)).square().sum().backward()
        opt.step()
    return copy.deepcopy(opt.state_dict())


def fresh_gt(size, rank, topo=None):
    model = nn.Linear(3, 1)
    comm = FakeComm(size, rank, topo if topo is not None else ExponentialGraph(size))
    return GradientTracking(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                            communicator=comm)


def test_state_dict_records_world():
    dc = gt_state(4, 1)["decomm"]
    assert (dc["size"], dc["rank"]) == (4, 1)
    assert dc["topology"] == "ExponentialGraph(n=4)"
    assert dc["topology_fingerprint"] == ExponentialGraph(4).fingerprint()


def test_load_on_another_world_size_or_rank_raises():
    sd = gt_state(4, 1)
    with pytest.raises(ValueError, match=r"on rank 1 of 2: the state_dict was saved by rank 1 "
                                         r"of 4.*strict_world=False"):
        fresh_gt(2, 1).load_state_dict(sd)
    with pytest.raises(ValueError, match="saved by rank 1 of 4"):
        fresh_gt(4, 2).load_state_dict(sd)


def test_strict_world_false_restarts_the_algorithm_state():
    sd = gt_state(4, 1)
    opt = fresh_gt(2, 1)
    opt.communicator.set_round(7)
    opt.load_state_dict(sd, strict_world=False)
    assert opt.steps == 3 and opt.communication_steps == 3
    assert opt.communicator.current_round() == 7  # the saved round 3 is not restored
    assert opt._initialized is False  # next step: y^0 = g^0
    assert all(float(g.abs().sum()) == 0.0 for g in opt._g_old)
    # the inner optimizer's momentum is loaded
    saved_mom = [s["momentum_buffer"] for s in sd["state"].values()]
    mom = [opt.state[p]["momentum_buffer"] for p in opt.params]
    assert all(torch.equal(a, b) for a, b in zip(sorted(saved_mom, key=lambda t: t.numel()),
                                                 sorted(mom, key=lambda t: t.numel())))


def test_same_world_loads_fully_and_other_topology_warns():
    sd = gt_state(4, 1)
    opt = fresh_gt(4, 1)
    opt.load_state_dict(sd)
    assert opt._initialized is True and opt.communicator.current_round() == 3
    ring = RingGraph(4)
    rank0 = fresh_gt(4, 1, ring)
    rank0.communicator._rank = 0  # as if rank 0 loaded rank 0's file
    sd0 = copy.deepcopy(sd)
    sd0["decomm"]["rank"] = 0
    with pytest.warns(UserWarning, match=r"saved under the topology ExponentialGraph\(n=4\) but "
                                         r"the current topology is RingGraph\(n=4\)"):
        rank0.load_state_dict(sd0)
    assert rank0._initialized is True


def test_format_1_state_dict_without_world_still_loads():
    sd = gt_state(4, 1)
    for key in ("size", "rank", "topology", "topology_fingerprint"):
        del sd["decomm"][key]
    opt = fresh_gt(2, 0)
    opt.load_state_dict(sd)
    assert opt.steps == 3


# --------------------------------------------------- item: simulator support
@pytest.mark.parametrize("cls", [AsyncGossip])
def test_simulation_names_the_unsupported_wrapper(cls):
    with pytest.raises(TypeError, match=rf"Simulation cannot run {cls.__name__}: .*"
                                        r"DSGD, GradientTracking, D2, QGDSGDm"):
        Simulation(RingGraph(3), lambda: nn.Linear(2, 1), sgd, cls)


def test_simulation_runs_every_synchronous_wrapper():
    for cls in (DSGD, GradientTracking, D2, QGDSGDm):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Simulation(RingGraph(3), lambda: nn.Linear(2, 1), sgd, cls)


# --------------------------------------------------- item: message size limit
class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)  # 20 float32: 80 bytes
        self.b = nn.Linear(4, 2, dtype=torch.float64)  # 10 float64: 80 bytes


def test_oversized_message_raises_before_anything_happens(monkeypatch):
    monkeypatch.setattr("decomm.optim.comm.MAX_MESSAGE_BYTES", 100)
    m = Mixed()
    DSGD(sgd(m), communicator=FakeComm(2, 0))  # 80 bytes per dtype: fits
    m = Mixed()
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(DecommError, match=r"GradientTracking on rank 1: the 2 torch\.float32 "
                                          r"parameters on cpu form one flat message of 160 "
                                          r"bytes .*limit of 100 bytes.*several wrappers"):
        GradientTracking(sgd(m), communicator=FakeComm(2, 1))  # [x | y]: 160 bytes
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))


def test_oversized_add_param_group_is_undone(monkeypatch):
    monkeypatch.setattr("decomm.optim.comm.MAX_MESSAGE_BYTES", 100)
    m = Mixed()
    opt = DSGD(torch.optim.SGD(m.a.parameters(), lr=0.1), communicator=FakeComm(2, 0))
    extra = nn.Linear(4, 1)  # 5 more float32: 100 bytes, fits exactly
    opt.add_param_group({"params": extra.parameters()})
    with pytest.raises(DecommError, match=r"rank 0: the 5 torch\.float32 parameters on cpu "
                                          r"form one flat message of 104 bytes"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))]})
    assert len(opt.param_groups) == 2
    m.a(torch.ones(1, 4)).sum().backward()
    opt.step()  # the wrapper is intact


def test_simulator_and_single_rank_have_no_message_limit(monkeypatch):
    monkeypatch.setattr("decomm.optim.comm.MAX_MESSAGE_BYTES", 10)
    GradientTracking(sgd(Mixed()), communicator=LocalCommunicator())
    Simulation(RingGraph(3), Mixed, sgd, GradientTracking)


# ------------------------------------------------------- item: buffers
def test_consensus_distance_can_include_buffers():
    """Two ranks with equal parameters, BatchNorm statistics b_0 = (1, 2, 3, 4) and b_1 = 0."""

    def packed(m, buffers):
        ts = list(m.parameters()) + ([b for b in m.buffers() if b.is_floating_point()]
                                     if buffers else [])
        x = torch.cat([t.detach().reshape(-1).double() for t in ts])
        return torch.cat([x, (x @ x).reshape(1)])

    class Peer(FakeComm):
        """allreduce_ averages with the peer's packed vector of the same length."""

        peers: dict[int, torch.Tensor]

        def allreduce_(self, tensor, average=True, name=None):
            return tensor.add_(self.peers[tensor.numel()]).div_(2)

    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    peer = copy.deepcopy(model)
    with torch.no_grad():
        model[1].running_mean.copy_(torch.tensor([1.0, 2.0]))
        model[1].running_var.copy_(torch.tensor([3.0, 4.0]))
        peer[1].running_mean.zero_()
        peer[1].running_var.zero_()
    comm = Peer(2, 0)
    comm.peers = {len(packed(peer, b)): packed(peer, b) for b in (False, True)}
    assert consensus_distance(model, communicator=comm) == 0.0  # the parameters agree
    # (1/2) sum_i ||x_i - x̄||^2 = ||x_0 - x_1||^2 / 4 = (1 + 4 + 9 + 16) / 4
    got = consensus_distance(model, communicator=comm, include_buffers=True)
    assert got == pytest.approx(7.5, rel=1e-12)
    with pytest.raises(TypeError, match="needs the nn.Module"):
        consensus_distance(list(model.parameters()), communicator=comm, include_buffers=True)


def test_simulation_consensus_distance_can_include_buffers():
    sim = Simulation(RingGraph(3), lambda: nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)),
                     lambda m: sgd(m, 0.0))  # lr 0: the parameters stay identical
    x = [torch.full((4, 2), float(i)) + torch.arange(8.0).reshape(4, 2) * i for i in range(3)]
    sim.step(lambda i, m: m(x[i]).sum())
    assert sim.consensus_distance() == 0.0
    B = torch.stack([torch.cat([m[1].running_mean, m[1].running_var]).double()
                     for m in sim.models])
    expected = float((B - B.mean(0)).square().sum(1).mean())
    assert expected > 0.1
    assert sim.consensus_distance(include_buffers=True) == pytest.approx(expected, rel=1e-12)
