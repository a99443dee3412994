"""The wrappers' MPI code path (``wrapper.step()`` + a Communicator), run by n threads.

A tiny thread-backed Communicator stands in for the MPI runtime: every
collective is a barrier-synchronised exchange of clones, and
``neighbor_allreduce_`` computes ``sum_j W(t)[i, j] x_j`` with the rank's own
round counter, exactly the contract of ``decomm.neighbor_allreduce_``.  The
wrappers therefore run their real ``step()`` (constructor broadcast, shape
check, one mix per bucket, advance_round, overlap hooks, state_dict/round
restore), and the results are compared with decomm.sim on the same problem.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from decomm.errors import DecommError
from decomm.optim import D2, DSGD, GradientTracking, QGDSGDm, consensus_distance
from decomm.optim._base import check_same_parameters
from decomm.sim import Simulation
from decomm.topology import OnePeerExponentialGraph, RingGraph, Topology


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors: OpenMP threads only contend on the shared 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


TIMEOUT = 30.0


class _Group:
    def __init__(self, n: int, topology: Any) -> None:
        self.n = n
        self.topology = topology
        self.barrier = threading.Barrier(n, timeout=TIMEOUT)
        self.slots: list[Any] = [None] * n


class _Done:
    def __init__(self, t: torch.Tensor) -> None:
        self.t = t

    def wait(self) -> torch.Tensor:
        return self.t


class ThreadComm:
    supports_nonblocking = True

    def __init__(self, group: _Group, rank: int) -> None:
        self.g = group
        self.r = rank
        self._round = 0
        self.calls: list[str] = []

    def _exchange(self, t: torch.Tensor) -> list[torch.Tensor]:
        self.g.slots[self.r] = t.detach().clone()
        self.g.barrier.wait()
        got = list(self.g.slots)
        self.g.barrier.wait()
        return got

    def rank(self) -> int:
        return self.r

    def size(self) -> int:
        return self.g.n

    def topology(self) -> Any:
        return self.g.topology

    def current_round(self) -> int:
        return self._round

    def advance_round(self) -> None:
        self.calls.append("advance_round")
        self._round += 1

    def set_round(self, round_: int) -> None:
        self._round = int(round_)

    def neighbor_allreduce_(self, t: torch.Tensor, name: str | None = None) -> torch.Tensor:
        self.calls.append("neighbor_allreduce_")
        got = self._exchange(t)
        self_w, nb = self.g.topology.weights(self.r, self._round)
        out = got[self.r] * self_w
        for j in sorted(nb):
            out += got[j] * nb[j]
        t.copy_(out)
        return t

    def neighbor_allreduce_nonblocking_(self, t: torch.Tensor, name: str | None = None) -> _Done:
        self.calls.append("nonblocking")
        self.neighbor_allreduce_(t, name)
        self.calls.pop()
        return _Done(t)

    def allreduce_(
        self, t: torch.Tensor, average: bool = True, name: str | None = None
    ) -> torch.Tensor:
        self.calls.append("allreduce_")
        got = self._exchange(t)
        s = torch.stack(got).sum(0)
        t.copy_(s / self.g.n if average else s)
        return t

    def broadcast_(self, t: torch.Tensor, root: int = 0, name: str | None = None) -> torch.Tensor:
        t.copy_(self._exchange(t)[root])
        return t

    def allgather(self, t: torch.Tensor, name: str | None = None) -> torch.Tensor:
        return torch.cat(self._exchange(t))


def run_threads(n: int, topology: Any, fn: Callable[[ThreadComm], Any]) -> list[Any]:
    group = _Group(n, topology)
    results: list[Any] = [None] * n
    errors: list[BaseException | None] = [None] * n

    def body(r: int) -> None:
        try:
            results[r] = fn(ThreadComm(group, r))
        except BaseException as e:
            errors[r] = e
            group.barrier.abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = next(
        (e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)),
        None,
    )
    if first is not None:
        raise first
    if any(e is not None for e in errors):
        raise next(e for e in errors if e is not None)
    return results


# --------------------------------------------------------------------------- problem
N, D, M = 4, 5, 12


def shard(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(M, D, generator=g, dtype=torch.float64), torch.randn(
        M, generator=g, dtype=torch.float64
    ) + i


class Net(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.lin = nn.Linear(D, 2, dtype=torch.float64)
        self.head = nn.Parameter(torch.randn(2, generator=g, dtype=torch.float64))
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(2, D, generator=g, dtype=torch.float64))
            self.lin.bias.copy_(torch.randn(2, generator=g, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) @ self.head


def loss_of(i: int, model: nn.Module) -> torch.Tensor:
    A, b = shard(i)
    return 0.5 * (model(A) - b).square().mean()


CASES = {
    "dsgd": (DSGD, {}, {}),
    "dsgd_adam_every2": (DSGD, {"communicate_every": 2}, {"adam": True}),
    "awc_overlap": (DSGD, {"combine_first": True}, {"momentum": 0.5}),
    "awc_sync": (DSGD, {"combine_first": True, "overlap": False}, {}),
    "gt_global": (GradientTracking, {"global_every": 2}, {"momentum": 0.5}),
    "d2": (D2, {}, {}),
    "qg": (QGDSGDm, {"momentum": 0.8, "communicate_every": 2, "global_every": 3}, {}),
}


def make_opt(model: nn.Module, okw: dict) -> torch.optim.Optimizer:
    okw = dict(okw)
    if okw.pop("adam", False):
        return torch.optim.Adam(model.parameters(), lr=0.01)
    return torch.optim.SGD(model.parameters(), lr=0.05, **okw)


@pytest.mark.filterwarnings("ignore:D2")
@pytest.mark.parametrize("case", list(CASES))
def test_step_path_matches_simulation(case):
    cls, wkw, okw = CASES[case]
    topo = OnePeerExponentialGraph(N)
    steps = 7

    def worker(comm: ThreadComm):
        model = Net(seed=comm.rank())  # different on every rank: the constructor broadcasts
        opt = cls(make_opt(model, okw), communicator=comm, **wkw)
        for _ in range(steps):
            opt.zero_grad()
            loss_of(comm.rank(), model).backward()
            if case == "awc_overlap":
                assert opt._inflight is not None or opt._plan().name != "NEIGHBOR"
            opt.step()
        return (
            torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
            comm.calls,
            comm.current_round(),
        )

    out = run_threads(N, topo, worker)
    sim = Simulation(topo, lambda: Net(seed=0), lambda m: make_opt(m, okw), cls, **wkw)
    for _ in range(steps):
        sim.step(loss_of)
    for r, (x, calls, rnd) in enumerate(out):
        assert torch.allclose(x, sim.params(r), rtol=0, atol=1e-12), (
            r,
            (x - sim.params(r)).abs().max(),
        )
        assert rnd == sim.round
        assert calls.count("advance_round") == sim.round
        # exactly one mix call per communicating step (one bucket: one dtype)
        mixes = sum(calls.count(c) for c in ("neighbor_allreduce_", "allreduce_", "nonblocking"))
        assert mixes == sim.optimizers[r].communication_steps
        if case == "awc_overlap":  # every gossip exchange was started from the backward hook
            assert calls.count("nonblocking") == sim.round == steps


def test_constructor_broadcasts_rank0_parameters():
    def worker(comm: ThreadComm):
        model = Net(seed=10 + comm.rank())
        DSGD(torch.optim.SGD(model.parameters(), lr=0.1), communicator=comm)
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    out = run_threads(3, RingGraph(3), worker)
    ref = torch.cat([p.detach().reshape(-1) for p in Net(seed=10).parameters()])
    for x in out:
        assert torch.equal(x, ref)

    def worker_nob(comm: ThreadComm):
        model = Net(seed=10 + comm.rank())
        DSGD(
            torch.optim.SGD(model.parameters(), lr=0.1),
            communicator=comm,
            broadcast_parameters=False,
        )
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    out = run_threads(3, RingGraph(3), worker_nob)
    assert not torch.equal(out[0], out[1])


def test_shape_mismatch_names_rank_and_parameter():
    def worker(comm: ThreadComm):
        width = 4 if comm.rank() == 2 else 3
        model = nn.Sequential(nn.Linear(2, width), nn.Linear(width, 1))
        DSGD(torch.optim.SGD(model.parameters(), lr=0.1), communicator=comm)

    with pytest.raises(
        DecommError, match=r"param_groups\[0\]\['params'\]\[0\].*\(3, 2\).*rank 0.*\(4, 2\).*rank 2"
    ):
        run_threads(3, RingGraph(3), worker)


def test_parameter_count_mismatch():
    def worker(comm: ThreadComm):
        layers = [nn.Linear(2, 2)] * (2 if comm.rank() == 1 else 1)
        model = nn.Sequential(*[nn.Linear(2, 2) for _ in layers])
        DSGD(torch.optim.SGD(model.parameters(), lr=0.1), communicator=comm)

    with pytest.raises(DecommError, match=r"rank 0: 2, rank 1: 4, rank 2: 2"):
        run_threads(3, RingGraph(3), worker)


def test_dtype_mismatch_is_detected():
    def worker(comm: ThreadComm):
        dt = torch.float64 if comm.rank() == 1 else torch.float32
        p = [torch.zeros(3, dtype=dt, requires_grad=True)]
        check_same_parameters(comm, p, ["w"])

    with pytest.raises(DecommError, match=r"w differs.*float32 on rank 0.*float64 on rank 1"):
        run_threads(2, RingGraph(2), worker)


@pytest.mark.parametrize("exact", [False, True])
def test_consensus_distance_one_collective(exact):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((4, 7)) * 3 + 5
    expected = float(((X - X.mean(0)) ** 2).sum(1).mean())

    def worker(comm: ThreadComm):
        model = nn.Linear(6, 1, dtype=torch.float32)
        with torch.no_grad():
            model.weight.copy_(torch.from_numpy(X[comm.rank(), :6]).reshape(1, 6))
            model.bias.copy_(torch.from_numpy(X[comm.rank(), 6:]))
        value = consensus_distance(model, communicator=comm, exact=exact)
        return value, comm.calls.count("allreduce_")

    out = run_threads(4, RingGraph(4), worker)
    for value, calls in out:
        assert calls == (2 if exact else 1)
        # float32 parameters: the inputs themselves are rounded to ~1e-7 relative
        assert value == pytest.approx(expected, rel=1e-5)
    assert len({v for v, _ in out}) == 1


@pytest.mark.filterwarnings("ignore:D2")
@pytest.mark.parametrize("cls", [DSGD, GradientTracking, D2, QGDSGDm])
def test_resume_restores_round_and_is_bitwise(cls):
    topo = OnePeerExponentialGraph(N)
    kw = {"communicate_every": 2} if cls is GradientTracking else {}

    def train(model, opt, rank, steps):
        for _ in range(steps):
            opt.zero_grad()
            loss_of(rank, model).backward()
            opt.step()

    def worker(comm: ThreadComm):
        r = comm.rank()
        model = Net(seed=r)
        opt = cls(torch.optim.SGD(model.parameters(), lr=0.05), communicator=comm, **kw)
        train(model, opt, r, 5)
        ckpt = ({k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict())
        train(model, opt, r, 4)
        straight = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        # a fresh process: new model/optimizer, runtime round back at 0
        comm.set_round(0)
        model2 = Net(seed=99)
        opt2 = cls(torch.optim.SGD(model2.parameters(), lr=0.05), communicator=comm, **kw)
        model2.load_state_dict(ckpt[0])
        opt2.load_state_dict(ckpt[1])
        assert comm.current_round() == ckpt[1]["decomm"]["round"]
        train(model2, opt2, r, 4)
        resumed = torch.cat([p.detach().reshape(-1) for p in model2.parameters()])
        return straight, resumed

    for straight, resumed in run_threads(N, topo, worker):
        assert torch.equal(straight, resumed)


def test_static_topology_from_matrix_in_threads():
    W = (np.eye(3) + RingGraph(3).matrix(0)) / 2
    topo = Topology.from_matrices([W])

    def worker(comm: ThreadComm):
        x = nn.Parameter(torch.tensor([float(comm.rank())], dtype=torch.float64))
        opt = DSGD(torch.optim.SGD([x], lr=0.0), communicator=comm, broadcast_parameters=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            x.grad = torch.zeros_like(x)
            opt.step()
        return float(x.detach())

    out = run_threads(3, topo, worker)
    assert np.allclose(out, W @ np.arange(3.0), atol=1e-15)
