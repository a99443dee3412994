"""decomm.optim wrappers over real MPI (run with N = 4 and 5 ranks).

Each rank owns one shard (A_i, b_i) of a heterogeneous least-squares problem,
generated from seed 1234 + rank, so every rank can also run the whole problem
in decomm.sim locally: the MPI run must agree with the simulation (the same
wrapper code, mixed by decomm.neighbor_allreduce_ instead of the simulator),
and gradient tracking / D² must reach the closed-form optimum
x* = (sum A_i^T A_i)^{-1} sum A_i^T b_i while DSGD keeps a bias.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import decomm
from decomm.optim import D2, DSGD, GradientTracking, QGDSGDm, consensus_distance
from decomm.sim import Simulation
from decomm.topology import OnePeerExponentialGraph, RingGraph, Topology

D, M = 5, 20


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """4-5 ranks share 2 cores: OpenMP threads would only contend."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def shard(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234 + i)
    A = torch.randn(M, D, generator=g, dtype=torch.float64)
    return A, torch.randn(M, generator=g, dtype=torch.float64) + i


def optimum(n: int) -> torch.Tensor:
    shards = [shard(i) for i in range(n)]
    return torch.linalg.solve(sum(A.T @ A for A, _ in shards), sum(A.T @ b for A, b in shards))


def lazy_ring(n: int) -> Topology:
    return Topology.from_matrices((np.eye(n) + RingGraph(n).matrix(0)) / 2)


def ls_loss(i: int, model: nn.Module) -> torch.Tensor:
    A, b = shard(i)
    dt = next(model.parameters()).dtype
    return 0.5 * (model(A.to(dt)).squeeze(-1) - b.to(dt)).square().mean()


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, loss_fn=ls_loss) -> list[float]:
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(decomm.rank(), model)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def linear() -> nn.Module:
    torch.manual_seed(decomm.rank())  # different on every rank: the wrapper broadcasts rank 0's
    return nn.Linear(D, 1, bias=False, dtype=torch.float64)


def test_least_squares_matches_simulation_and_optimum():
    n, r = decomm.size(), decomm.rank()
    if n < 2:
        pytest.skip("one node has no consensus bias to show")
    topo = lazy_ring(n)
    xs = optimum(n)
    check_every = 50
    errors = {}
    # DSGD sits at its biased fixed point long before 100 steps; GT / D2 need ~170
    for cls, steps in ((DSGD, 100), (GradientTracking, 200), (D2, 200)):
        decomm.set_topology(topo)
        model = linear()
        opt = cls(torch.optim.SGD(model.parameters(), lr=0.2))
        torch.manual_seed(0)
        sim = Simulation(
            topo,
            lambda: nn.Linear(D, 1, bias=False, dtype=torch.float64),
            lambda m: torch.optim.SGD(m.parameters(), lr=0.2),
            cls,
        )
        with torch.no_grad():  # the simulation starts where rank 0 started
            sim.models[0].weight.copy_(model.weight)
            for m in sim.models[1:]:
                m.weight.copy_(model.weight)
        for _ in range(steps // check_every):
            train(model, opt, check_every)
            sim.run(ls_loss, check_every)
            diff = float((flat(model) - sim.params(r)).abs().max())
            assert diff < 1e-6 * max(1.0, float(xs.abs().max())), (cls.__name__, diff)
        assert decomm.current_round() == steps == sim.round
        errors[cls.__name__] = float((flat(model) - xs).norm() / xs.norm())
    assert errors["GradientTracking"] < 1e-6, errors
    assert errors["D2"] < 1e-6, errors
    assert errors["DSGD"] > 1e-3, errors


@pytest.mark.parametrize("cls", [DSGD, GradientTracking, D2])
def test_one_message_per_communication_step(cls):
    """communicate_every=3: bytes move only on every 3rd step, one flat buffer each time."""
    n = decomm.size()
    decomm.set_topology(RingGraph(n) if cls is not D2 else lazy_ring(n))
    model = nn.Sequential(
        nn.Linear(D, 3, dtype=torch.float64), nn.Linear(3, 1, dtype=torch.float64)
    )
    numel = sum(p.numel() for p in model.parameters())
    opt = cls(torch.optim.SGD(model.parameters(), lr=0.01), communicate_every=3)
    segments = 2 if cls is GradientTracking else 1
    # the floor: what ONE neighbor_allreduce_ of one flat buffer of that size moves
    decomm.reset_stats()
    decomm.neighbor_allreduce_(torch.zeros(numel * segments, dtype=torch.float64))
    per_exchange = decomm.stats()["bytes_received"]
    assert per_exchange >= len(decomm.in_neighbors()) * numel * segments * 8
    decomm.reset_stats()
    for s in range(7):
        train(model, opt, 1)
        comms = (s + 1) // 3
        assert decomm.current_round() == comms
        assert decomm.stats()["bytes_received"] == comms * per_exchange


def test_global_every_does_not_advance_round():
    n = decomm.size()
    decomm.set_topology(OnePeerExponentialGraph(n))
    model = linear()
    opt = GradientTracking(torch.optim.SGD(model.parameters(), lr=0.05), global_every=2)
    rounds = []
    for _ in range(6):
        train(model, opt, 1)
        rounds.append(decomm.current_round())
    assert rounds == [1, 1, 2, 2, 3, 3]
    # after a global step every rank holds the same average
    train(model, opt, 1)
    train(model, opt, 1)
    x = flat(model)
    allx = decomm.allgather(x.reshape(1, -1))
    assert torch.equal(allx, x.expand_as(allx))


@pytest.mark.parametrize("inner", ["adam", "momentum"])
@pytest.mark.parametrize("cls", [DSGD, GradientTracking, D2])
def test_inner_optimizers_decrease_loss_on_every_rank(inner, cls):
    n = decomm.size()
    decomm.set_topology(lazy_ring(n))
    x_true = torch.linspace(-1.0, 1.0, D)

    def teacher(i: int, model: nn.Module) -> torch.Tensor:
        A, _ = shard(i)
        A = A.float()
        return 0.5 * (model(A).squeeze(-1) - A @ x_true).square().mean()

    torch.manual_seed(decomm.rank())
    model = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, 1))
    base = (
        torch.optim.Adam(model.parameters(), lr=0.05)
        if inner == "adam"
        else torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    )
    opt = cls(base)
    losses = train(model, opt, 40, teacher)
    assert losses[-1] < 0.5 * losses[0], (decomm.rank(), losses[0], losses[-1])


@pytest.mark.parametrize("case", ["dsgd", "awc", "gt", "d2", "qg"])
def test_resume_is_bitwise_exact(case):
    """Stop after 5 steps, reload into a fresh model/optimizer, continue: same bits."""
    n = decomm.size()
    topo = OnePeerExponentialGraph(n)  # time-varying: the round counter matters
    decomm.set_topology(topo)

    def build():
        model = nn.Sequential(
            nn.Linear(D, 4, dtype=torch.float64), nn.Linear(4, 1, dtype=torch.float64)
        )
        if case == "qg":
            return model, QGDSGDm(torch.optim.SGD(model.parameters(), lr=0.02), momentum=0.8)
        base = torch.optim.Adam(model.parameters(), lr=0.01)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # D2 on a non-symmetric graph: fine for 9 steps
            wrapper = {
                "dsgd": lambda: DSGD(base, communicate_every=2),
                "awc": lambda: DSGD(base, combine_first=True),
                "gt": lambda: GradientTracking(base),
                "d2": lambda: D2(base),
            }[case]()
        return model, wrapper

    torch.manual_seed(0)
    model, opt = build()
    train(model, opt, 5)
    # torch's state_dict holds references to the live state: copy, as torch.save would
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    train(model, opt, 4)
    opt.close()
    straight = flat(model)

    decomm.set_topology(topo)  # a new process would start at round 0
    model2, opt2 = build()
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    assert decomm.current_round() == saved[1]["decomm"]["round"]
    train(model2, opt2, 4)
    opt2.close()
    assert torch.equal(flat(model2), straight)


@pytest.mark.parametrize("overlap", [True, False])
def test_awc_overlap_matches_simulation(overlap):
    """MPI's AWC receives s = W x - x from the weighted sum (neighbor_mix_delta); the
    simulator mixes a copy of x in place: the same algebra, to round-off."""
    n, r = decomm.size(), decomm.rank()
    topo = OnePeerExponentialGraph(n)
    decomm.set_topology(topo)
    model = linear()
    opt = DSGD(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5), combine_first=True,
               overlap=overlap)
    assert opt._delta  # the MPI communicator offers the delta
    sim = Simulation(
        topo,
        lambda: nn.Linear(D, 1, bias=False, dtype=torch.float64),
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.5),
        DSGD,
        combine_first=True,
    )
    with torch.no_grad():
        for m in sim.models:
            m.weight.copy_(model.weight)
    for _ in range(10):
        opt.zero_grad()
        ls_loss(r, model).backward()
        assert (opt._inflight is not None) == overlap  # started by the backward hook
        opt.step()
        sim.step(ls_loss)
    opt.close()
    assert float((flat(model) - sim.params(r)).abs().max()) < 1e-10


@pytest.mark.parametrize("exact", [False, True])
def test_consensus_distance(exact):
    n, r = decomm.size(), decomm.rank()
    X = np.stack([np.arange(6, dtype=np.float64) * (j + 1) + j for j in range(n)])
    expected = float(((X - X.mean(0)) ** 2).sum(1).mean())
    params = [torch.from_numpy(X[r, :4].copy()), torch.from_numpy(X[r, 4:].copy())]
    assert consensus_distance(params, exact=exact) == pytest.approx(expected, rel=1e-12)


def test_mismatched_parameter_shapes_raise_on_every_rank():
    if decomm.size() < 2:
        pytest.skip("needs two ranks to disagree")
    width = 4 if decomm.rank() == 1 else 3
    model = nn.Sequential(nn.Linear(2, width), nn.Linear(width, 1))
    with pytest.raises(decomm.DecommError, match=r"\(4, 2\).*rank 1"):
        DSGD(torch.optim.SGD(model.parameters(), lr=0.1))


def test_d2_warns_on_eigenvalue_minus_one_third():
    n = decomm.size()
    if n < 3:
        pytest.skip("RingGraph(n) for n < 3 is not the three-point ring (weights 1/2 at n = 2)")
    decomm.set_topology(RingGraph(n))  # eigenvalue -1/3 exactly when n is even
    model = linear()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        D2(torch.optim.SGD(model.parameters(), lr=0.1))
    msgs = [str(w.message) for w in rec if "D2" in str(w.message)]
    if n % 2 == 0 and decomm.rank() == 0:  # one warning per job, not one per rank
        assert len(msgs) == 1 and "-0.333333" in msgs[0]
    else:
        assert not msgs


def star_in(n: int) -> Topology:
    """Row-stochastic, not column-stochastic: every rank listens to rank 0, rank 0 to nobody."""
    w = np.eye(n) * 0.5
    w[0, 0] = 1.0
    w[1:, 0] = 0.5
    return Topology.from_matrices([w], name="star-in")


@pytest.mark.parametrize("cls", [DSGD, GradientTracking])
def test_column_sum_warning_on_rank_0_only(cls):
    n = decomm.size()
    if n < 2:
        pytest.skip("one rank: W = [[1]]")
    decomm.set_topology(star_in(n))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        cls(torch.optim.SGD(linear().parameters(), lr=0.1))
    msgs = [str(w.message) for w in rec if "doubly stochastic" in str(w.message)]
    if decomm.rank() == 0:
        assert len(msgs) == 1
        assert f"column 0 of W(0) of the topology star-in sums to {1 + (n - 1) / 2:.6g}" in msgs[0]
    else:
        assert not msgs


def test_state_dict_world_is_recorded_and_checked():
    n, r = decomm.size(), decomm.rank()
    topo = OnePeerExponentialGraph(n)
    decomm.set_topology(topo)
    model = linear()
    opt = GradientTracking(torch.optim.SGD(model.parameters(), lr=0.1))
    train(model, opt, 2)
    sd = copy.deepcopy(opt.state_dict())
    dc = sd["decomm"]
    assert (dc["size"], dc["rank"]) == (n, r)
    assert dc["topology_fingerprint"] == topo.fingerprint() and dc["topology"] == topo.name
    opt.load_state_dict(sd)  # same world: fine
    sd["decomm"]["size"] = n + 1
    with pytest.raises(ValueError, match=rf"rank {r} of {n}: the state_dict was saved by "
                                         rf"rank {r} of {n + 1}"):
        opt.load_state_dict(sd)
    opt.load_state_dict(sd, strict_world=False)
    assert opt.steps == 2 and not opt._initialized
    train(model, opt, 1)  # restarts with y^0 = g^0 on every rank
    assert opt.steps == 3


def test_consensus_distance_with_buffers():
    n, r = decomm.size(), decomm.rank()
    model = nn.Sequential(nn.Linear(2, 2, dtype=torch.float64),
                          nn.BatchNorm1d(2, dtype=torch.float64))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)  # equal on every rank
        model[1].running_mean.fill_(float(r))
        model[1].running_var.fill_(2.0 * r)
    assert consensus_distance(model) == 0.0
    # 4 buffer entries: r, r, 2r, 2r; (1/n) sum_r ||b_r - b̄||^2 = (1 + 1 + 4 + 4) Var(r)
    var = float(np.var(np.arange(n)))
    got = consensus_distance(model, include_buffers=True, exact=True)
    assert got == pytest.approx(10.0 * var, rel=1e-12, abs=1e-15)


def test_message_size_limit_names_the_rank(monkeypatch):
    from decomm.optim import PushSum

    n, r = decomm.size(), decomm.rank()
    if n < 2:
        pytest.skip("a single rank sends no message")
    monkeypatch.setattr("decomm.optim.comm.MAX_MESSAGE_BYTES", 40)
    model = linear()  # 5 float64 = 40 bytes; push-sum adds the weight: 48
    DSGD(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(decomm.DecommError, match=rf"PushSum on rank {r}: the 1 torch\.float64 "
                                                 r"parameters on cpu form one flat message of 48"):
        PushSum(torch.optim.SGD(linear().parameters(), lr=0.1))


def test_mix_delta_only_where_the_communicator_mixes_with_the_topology():
    """A communicator subclass that mixes with other weights (BlueFog's knobs) must not
    inherit the topology-weighted delta: AWC then mixes a copy with its own weights."""
    from decomm.compat.bluefog.optimizers import _KnobCommunicator
    from decomm.optim.comm import MPICommunicator

    assert MPICommunicator().supports_mix_delta
    assert not _KnobCommunicator(owner=None).supports_mix_delta
