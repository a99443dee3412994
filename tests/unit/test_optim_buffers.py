"""Module buffers (BatchNorm running statistics) exchanged by the optimizer wrappers.

Every node of a :class:`decomm.sim.Simulation` runs ``Linear(3, 4) -> BatchNorm1d(4)``
on its own data.  The expected running statistics are computed independently in
numpy from BatchNorm's update rule (PyTorch's documented form: ``r ← (1 − m) r +
m · stat`` with the batch mean and the *unbiased* batch variance, ``m = 0.1``) and
the topology's matrices: with ``buffers="mix"`` the statistics after a step are
``W(t) @ S`` (``S`` the stacked local statistics after the forward pass), with
``"average"`` the row mean of ``S``, by default ``S`` itself.  float64 throughout,
so the tolerance 1e-12 only absorbs summation order.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from batchnorm_case import MOMENTUM, C, data, local_stats, make_model  # tests/batchnorm_case.py
from torch import nn

from decomm.compression import Identity
from decomm.errors import DecommError
from decomm.optim import (
    D2,
    DSGD,
    AsyncGossip,
    ChocoSGD,
    GradientTracking,
    PushSum,
    QGDSGDm,
)
from decomm.optim.comm import LocalCommunicator
from decomm.sim import Simulation
from decomm.topology import OnePeerExponentialGraph, RingGraph, Topology

N = 4
TOL = 1e-12

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def loss_fn(i: int, model: nn.Module) -> torch.Tensor:
    return model(data(i)).square().mean()


def lazy_ring(n: int = N) -> Topology:
    return Topology.from_matrices((np.eye(n) + RingGraph(n).matrix(0)) / 2)


def sgd(lr: float = 0.0):
    return lambda m: torch.optim.SGD(m.parameters(), lr=lr)




def stats(sim: Simulation) -> tuple[np.ndarray, np.ndarray]:
    return (np.stack([m[1].running_mean.numpy() for m in sim.models]),
            np.stack([m[1].running_var.numpy() for m in sim.models]))


def linear0() -> tuple[np.ndarray, np.ndarray]:
    m = make_model()
    return m[0].weight.detach().numpy().copy(), m[0].bias.detach().numpy().copy()


def expected_first_step(combine=None) -> tuple[np.ndarray, np.ndarray]:
    """Local statistics of all nodes after one forward from the initial state, combined."""
    w, b = linear0()
    per = [local_stats(w, b, np.zeros(C), np.ones(C), i) for i in range(N)]
    S_mean, S_var = np.stack([p[0] for p in per]), np.stack([p[1] for p in per])
    if combine is None:
        return S_mean, S_var
    return combine(S_mean), combine(S_var)


WRAPPERS = [
    (DSGD, {}),
    (DSGD, {"combine_first": True}),
    (GradientTracking, {}),
    (D2, {}),
    (QGDSGDm, {"momentum": 0.9}),
    (PushSum, {}),
    (ChocoSGD, {"compression": Identity(), "consensus_step": 1.0}),
]
IDS = ["DSGD", "DSGD-AWC", "GradientTracking", "D2", "QGDSGDm", "PushSum", "ChocoSGD"]


def build(cls=DSGD, kw=None, topology=None, lr=0.1, **sim_kw) -> Simulation:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # D2 / column-sum advice is not under test here
        return Simulation(topology if topology is not None else lazy_ring(), make_model,
                          sgd(lr), cls, **(kw or {}), **sim_kw)


@pytest.mark.parametrize(("cls", "kw"), WRAPPERS, ids=IDS)
def test_mix_is_W_times_local_statistics(cls, kw):
    sim = build(cls, kw, buffers="mix")
    sim.step(loss_fn)
    W = lazy_ring().matrix(0)
    want_mean, want_var = expected_first_step(lambda S: W @ S)
    got_mean, got_var = stats(sim)
    np.testing.assert_allclose(got_mean, want_mean, rtol=0, atol=TOL)
    np.testing.assert_allclose(got_var, want_var, rtol=0, atol=TOL)


@pytest.mark.parametrize(("cls", "kw"), WRAPPERS, ids=IDS)
def test_average_is_the_mean(cls, kw):
    sim = build(cls, kw, buffers="average")
    sim.step(loss_fn)
    want_mean, want_var = expected_first_step(lambda S: np.broadcast_to(S.mean(0), S.shape))
    got_mean, got_var = stats(sim)
    np.testing.assert_allclose(got_mean, want_mean, rtol=0, atol=TOL)
    np.testing.assert_allclose(got_var, want_var, rtol=0, atol=TOL)


def test_default_leaves_statistics_local_and_different():
    sim = build()
    assert all(o.module_buffers is None for o in sim.optimizers)
    sim.step(loss_fn)
    want_mean, want_var = expected_first_step()
    got_mean, got_var = stats(sim)
    np.testing.assert_allclose(got_mean, want_mean, rtol=0, atol=TOL)
    np.testing.assert_allclose(got_var, want_var, rtol=0, atol=TOL)
    assert np.ptp(got_mean, axis=0).min() > 0.01  # the nodes really disagree
    assert sim.consensus_distance(include_buffers=True) > sim.consensus_distance()


def test_two_rounds_of_a_time_varying_graph_with_lr_zero():
    """Round t mixes with W(t): stats_2 = W(1) @ ((1 − m) W(0) @ S_1 + m · batch stats)."""
    topo = OnePeerExponentialGraph(N)
    sim = build(topology=topo, lr=0.0, buffers="mix")
    sim.step(loss_fn)
    sim.step(loss_fn)
    w, b = linear0()  # lr = 0: the linear layer never changes
    mean, var = np.zeros((N, C)), np.ones((N, C))
    for t in range(2):
        per = [local_stats(w, b, mean[i], var[i], i) for i in range(N)]
        W = topo.matrix(t)
        mean, var = W @ np.stack([p[0] for p in per]), W @ np.stack([p[1] for p in per])
    assert not np.allclose(topo.matrix(0), topo.matrix(1))
    got_mean, got_var = stats(sim)
    np.testing.assert_allclose(got_mean, mean, rtol=0, atol=TOL)
    np.testing.assert_allclose(got_var, var, rtol=0, atol=TOL)


def run_schedule(**kw) -> list[np.ndarray]:
    sim = build(lr=0.0, **kw)
    out = []
    for _ in range(4):
        sim.step(loss_fn)
        out.append(stats(sim)[0])
    return out


def reference_schedule(exchanges: dict[int, str]) -> list[np.ndarray]:
    """numpy: 4 steps at lr 0, step s exchanges as exchanges[s] ('W' or 'mean')."""
    w, b = linear0()
    mean, var = np.zeros((N, C)), np.ones((N, C))
    W = lazy_ring().matrix(0)
    out = []
    for s in range(4):
        per = [local_stats(w, b, mean[i], var[i], i) for i in range(N)]
        mean, var = np.stack([p[0] for p in per]), np.stack([p[1] for p in per])
        how = exchanges.get(s)
        if how == "W":
            mean, var = W @ mean, W @ var
        elif how == "mean":
            mean = np.broadcast_to(mean.mean(0), mean.shape).copy()
            var = np.broadcast_to(var.mean(0), var.shape).copy()
        out.append(mean)
    return out


@pytest.mark.parametrize(("kw", "exchanges"), [
    ({"buffers": "average", "buffer_every": 2}, {1: "mean", 3: "mean"}),
    ({"buffers": "mix", "buffer_every": 3}, {2: "W"}),
    ({"buffers": "mix", "communicate_every": 2}, {1: "W", 3: "W"}),
    ({"buffers": "average", "buffer_every": 2, "communicate_every": 2}, {3: "mean"}),
    ({"buffers": "mix", "global_every": 2}, {0: "W", 1: "mean", 2: "W", 3: "mean"}),
], ids=["average-every-2", "mix-every-3", "communicate-every-2", "both-every-2",
        "mix-global-every-2"])
def test_schedule(kw, exchanges):
    for got, want in zip(run_schedule(**kw), reference_schedule(exchanges), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


def test_integer_buffers_stay_local():
    sim = build(buffers="average")
    sim.models[0][1].num_batches_tracked.fill_(7)
    sim.step(loss_fn)
    counts = [int(m[1].num_batches_tracked) for m in sim.models]
    assert counts == [8, 1, 1, 1]
    names = sim.optimizers[0].module_buffers.names()
    assert names == ["1.running_mean", "1.running_var"]


def test_reassigned_buffer_is_still_the_one_mixed():
    """pack() reads the module's attribute afresh: a new tensor of the same shape is mixed."""
    sim = build(buffers="average")
    for i, m in enumerate(sim.models):
        m[1].running_mean = torch.full((C,), float(i), dtype=torch.float64)
    sim.models[0].eval()  # freeze node 0's statistics; the others update theirs
    for m in sim.models[1:]:
        m.eval()
    sim.step(loss_fn)
    for m in sim.models:
        np.testing.assert_allclose(m[1].running_mean.numpy(), np.full(C, 1.5), atol=TOL)


def test_resume_keeps_the_buffer_schedule():
    """The schedule follows the saved communication counter: a resumed run is exact."""
    kw = {"buffers": "average", "buffer_every": 2}
    full = build(lr=0.1, **kw)
    for _ in range(3):
        full.step(loss_fn)
    part = build(lr=0.1, **kw)
    part.step(loss_fn)
    saved = part.state_dict()
    resumed = build(lr=0.1, **kw)
    resumed.load_state_dict(saved)
    resumed.step(loss_fn)
    resumed.step(loss_fn)
    for a, b in zip(stats(full), stats(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    assert "module_buffers" not in saved["optimizers"][0]["decomm"]  # format unchanged


def test_mpi_style_construction_and_sync_buffers_on_one_node():
    """buffers= on any wrapper's constructor; n = 1 (LocalCommunicator) is W = [[1]]."""
    model = make_model()
    opt = DSGD(torch.optim.SGD(model.parameters(), lr=0.1), communicator=LocalCommunicator(),
               buffers=model, buffer_mode="average", buffer_every=2)
    mb = opt.module_buffers
    assert (mb.mode, mb.every, mb.numel) == ("average", 2, 2 * C)
    loss_fn(0, model).backward()
    opt.step()
    want_mean, _ = local_stats(*linear0(), np.zeros(C), np.ones(C), 0)
    np.testing.assert_allclose(model[1].running_mean.numpy(), want_mean, atol=TOL)
    opt.sync_buffers(None)
    assert opt.module_buffers is None
    opt.sync_buffers([model[1]], mode="mix")
    assert opt.module_buffers.names() == ["running_mean", "running_var"]


@pytest.mark.parametrize("cls", [DSGD, GradientTracking, D2, QGDSGDm, PushSum, ChocoSGD,
                                 AsyncGossip])
def test_every_wrapper_documents_buffers(cls):
    assert "buffers=model" in cls.__doc__
    assert "buffer_mode" in cls.__doc__ and "buffer_every" in cls.__doc__


@pytest.mark.parametrize(("buffers", "kw", "exc", "match"), [
    (3, {}, TypeError, "buffers= takes an nn.Module or a list of nn.Module"),
    ("model", {}, TypeError, "got str"),
    ([], {}, TypeError, "empty iterable"),
    ("LIST_WITH_INT", {}, TypeError, "got a int"),
    ("MODEL", {"buffer_mode": "sum"}, ValueError, "buffer_mode must be one of"),
    ("MODEL", {"buffer_every": 0}, ValueError, "buffer_every must be a positive int"),
    (None, {"buffer_mode": "average"}, ValueError, "need buffers="),
])
def test_bad_arguments(buffers, kw, exc, match):
    model = make_model()
    if buffers == "MODEL":
        buffers = model
    elif buffers == "LIST_WITH_INT":
        buffers = [model, 5]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    args = {} if buffers is None else {"buffers": buffers}
    with pytest.raises(exc, match=match):
        DSGD(opt, communicator=LocalCommunicator(), **args, **kw)
    plain = DSGD(torch.optim.SGD(model.parameters(), lr=0.1), communicator=LocalCommunicator())
    if buffers is not None:
        with pytest.raises(exc, match=match):
            plain.sync_buffers(buffers, **{k.removeprefix("buffer_"): v for k, v in kw.items()})
        assert plain.module_buffers is None


def test_async_gossip_refuses_before_building_anything():
    model = make_model()
    # refused before AsyncGossip needs the MPI runtime (no decomm.init() here)
    with pytest.raises(ValueError, match="AsyncGossip cannot exchange module buffers"):
        AsyncGossip(torch.optim.SGD(model.parameters(), lr=0.1), buffers=model)


def test_simulation_argument_errors():
    with pytest.raises(TypeError, match="takes the mode"):
        build(buffers=make_model())
    with pytest.raises(TypeError, match="pass buffers='mix'"):
        build(buffer_mode="mix")
    with pytest.raises(ValueError, match="buffer_mode must be one of"):
        build(buffers="gossip")


def test_changed_buffer_shape_is_a_clear_error():
    sim = build(buffers="mix")
    sim.models[2][1].running_var = torch.ones(C + 1, dtype=torch.float64)
    with pytest.raises(DecommError, match=r"module buffer 1\.running_var changed"):
        sim.step()  # no forward (it would fail on the shape itself): the exchange checks


def test_simulated_nodes_must_agree():
    sim = build(buffers="mix")
    sim.optimizers[1].sync_buffers(None)
    with pytest.raises(DecommError, match="disagree on sync_buffers"):
        sim.step(loss_fn)


def test_mixed_dtypes_one_flat_per_dtype():
    """A float32 and a float64 BatchNorm: two flat tensors, each mixed with W."""
    def two_dtype_model() -> nn.Module:
        torch.manual_seed(0)
        m = nn.Module()
        m.a = nn.BatchNorm1d(2).double()
        m.b = nn.BatchNorm1d(3).float()
        return m

    def two_loss(i: int, m: nn.Module) -> torch.Tensor:
        x = data(i)
        return m.a(x[:, :2]).sum() + m.b(x.float()).double().sum()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sim = Simulation(lazy_ring(), two_dtype_model, sgd(0.0), DSGD, buffers="mix")
    assert [f.dtype for f in sim.optimizers[0].module_buffers.flats] == [torch.float64,
                                                                          torch.float32]
    sim.step(two_loss)
    W = lazy_ring().matrix(0)
    S = np.stack([(1 - MOMENTUM) * 0 + MOMENTUM * data(i).numpy().mean(0) for i in range(N)])
    np.testing.assert_allclose(np.stack([m.a.running_mean.numpy() for m in sim.models]),
                               W @ S[:, :2], atol=TOL)
    np.testing.assert_allclose(np.stack([m.b.running_mean.numpy() for m in sim.models]),
                               W @ S, rtol=1e-6, atol=1e-6)  # float32 buffers


def test_vectorized_simulation_refuses_buffers():
    from decomm.vsim import VectorizedSimulation

    with pytest.raises(TypeError, match="does not exchange module buffers"):
        VectorizedSimulation(lazy_ring(), make_model, sgd(0.1), DSGD, buffers="mix")
