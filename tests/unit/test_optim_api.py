"""Wrapper interface: flat buffers, schedule, schedulers, state_dict, errors (single process)."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from decomm.errors import DecommError
from decomm.optim import (
    D2,
    DSGD,
    DecentralizedOptimizer,
    GradientTracking,
    LocalCommunicator,
    MPICommunicator,
    QGDSGDm,
    consensus_distance,
)
from decomm.sim import Simulation
from decomm.topology import OnePeerExponentialGraph, RingGraph, Topology


@pytest.fixture(autouse=True)
def _one_torch_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


class Recorder(LocalCommunicator):
    """n = 1 communicator that records every call (mixing is the identity)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int, int]] = []

    def neighbor_allreduce_(self, tensor, name=None):
        self.calls.append(("neighbor", tensor.data_ptr(), tensor.numel()))
        return tensor

    def allreduce_(self, tensor, average=True, name=None):
        self.calls.append(("global", tensor.data_ptr(), tensor.numel()))
        return tensor

    def advance_round(self):
        self.calls.append(("advance", 0, 0))
        super().advance_round()


class Mixed(nn.Module):
    """Parameters of two dtypes: two buckets."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2)  # float32
        self.b = nn.Linear(2, 1, dtype=torch.float64)

    def forward(self, x):
        return self.b(self.a(x).double())


def mixed_loss(model: Mixed) -> torch.Tensor:
    x = torch.linspace(-1, 1, 12).reshape(4, 3)
    return model(x).square().mean()


def step(model, opt):
    opt.zero_grad()
    mixed_loss(model).backward()
    opt.step()


ALL = [
    (DSGD, {}),
    (DSGD, {"combine_first": True}),
    (GradientTracking, {}),
    (D2, {}),
    (QGDSGDm, {"momentum": 0.9}),
]


@pytest.mark.parametrize(("cls", "kw"), ALL)
def test_one_flat_buffer_per_dtype_reused(cls, kw):
    torch.manual_seed(0)
    model = Mixed()
    comm = Recorder()
    opt = cls(torch.optim.SGD(model.parameters(), lr=0.1), communicator=comm, **kw)
    # the parameters live in the flat buckets
    buckets = opt._buckets
    assert [b.dtype for b in buckets] == [torch.float32, torch.float64]
    for b in buckets:
        lo, hi = (
            b.buffer.data_ptr(),
            b.buffer.data_ptr() + b.buffer.numel() * b.buffer.element_size(),
        )
        for p in b.params:
            assert lo <= p.data_ptr() < hi
    ptrs = None
    for _s in range(4):
        comm.calls.clear()
        step(model, opt)
        kinds = [c[0] for c in comm.calls]
        assert kinds == ["neighbor", "neighbor", "advance"], kinds  # one per dtype, one round
        step_ptrs = [c[1] for c in comm.calls[:2]]
        sizes = [c[2] for c in comm.calls[:2]]
        segs = 2 if cls is GradientTracking else 1
        assert sizes == [8 * segs, 3 * segs]  # 3*2+2 float32, 2+1 float64
        assert ptrs is None or step_ptrs == ptrs  # same buffers every step: no reallocation
        ptrs = step_ptrs
    assert comm.current_round() == 4 and opt.steps == 4 and opt.communication_steps == 4


@pytest.mark.parametrize(("cls", "kw"), ALL)
def test_communicate_every_and_global_every_schedule(cls, kw):
    model = Mixed()
    comm = Recorder()
    opt = cls(
        torch.optim.SGD(model.parameters(), lr=0.01),
        communicator=comm,
        communicate_every=3,
        global_every=2,
        **kw,
    )
    log = []
    for _s in range(12):
        comm.calls.clear()
        step(model, opt)
        kinds = {c[0] for c in comm.calls}
        log.append("".join(sorted(k[0] for k in kinds)))
    # steps 2, 5, 8, 11 communicate; every 2nd of those is a global average (no round advance)
    assert log == ["", "", "an", "", "", "g", "", "", "an", "", "", "g"]
    assert comm.current_round() == 2
    assert opt.communication_steps == 4


@pytest.mark.parametrize("inner", ["sgd", "momentum", "nesterov", "adam", "adamw"])
def test_single_node_dsgd_equals_inner_optimizer_bitwise(inner):
    make = {
        "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
        "momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        "nesterov": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
        "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
        "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01),
    }[inner]
    torch.manual_seed(1)
    ref = Mixed()
    mine = copy.deepcopy(ref)
    ref_opt = make(ref.parameters())
    for cls, kw in [(DSGD, {}), (DSGD, {"combine_first": True})]:
        m = copy.deepcopy(mine)
        opt = cls(make(m.parameters()), communicator=LocalCommunicator(), **kw)
        r = copy.deepcopy(ref)
        ro = make(r.parameters())
        for _ in range(5):
            step(r, ro)
            step(m, opt)
        for p, q in zip(r.parameters(), m.parameters()):
            if cls is DSGD and not kw:
                assert torch.equal(p, q)
            else:  # AWC computes (x - u) + (Wx - x): equal up to rounding
                assert torch.allclose(p, q, rtol=0, atol=1e-6)
    del ref_opt


@pytest.mark.parametrize("cls", [GradientTracking, D2])
def test_single_node_exact_methods_reduce_to_inner_optimizer(cls):
    torch.manual_seed(2)
    ref = Mixed()
    m = copy.deepcopy(ref)
    ro = torch.optim.Adam(ref.parameters(), lr=0.01)
    opt = cls(torch.optim.Adam(m.parameters(), lr=0.01), communicator=LocalCommunicator())
    for _ in range(6):
        step(ref, ro)
        step(m, opt)
    for p, q in zip(ref.parameters(), m.parameters()):
        # y = (y + g_new) - g_old is g_new up to float32 rounding, which feeds the float64 layer
        assert torch.allclose(p.double(), q.double(), rtol=0, atol=1e-5)


def test_gradient_tracking_leaves_raw_gradient_in_grad():
    model = Mixed()
    opt = GradientTracking(torch.optim.SGD(model.parameters(), lr=0.1), communicator=Recorder())
    for _ in range(3):
        opt.zero_grad()
        mixed_loss(model).backward()
        raw = [p.grad.clone() for p in model.parameters()]
        opt.step()
        for p, g in zip(model.parameters(), raw):
            assert torch.equal(p.grad, g)  # restored after feeding the tracker


def test_lr_scheduler_drives_the_wrapper():
    model = Mixed()
    opt = GradientTracking(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), communicator=LocalCommunicator()
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=0.0)
    assert opt.param_groups is opt.optimizer.param_groups
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "scheduler.step() before optimizer.step()"
        for k in range(1, 6):
            step(model, opt)
            sched.step()
            expected = 0.1 * (1 + math.cos(math.pi * k / 10)) / 2
            assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)
            assert opt.optimizer.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert sched.get_last_lr()[0] == pytest.approx(0.05, rel=1e-12)


def test_interface_forwarding():
    model = Mixed()
    inner = torch.optim.Adam(model.parameters(), lr=0.01)
    opt = DSGD(inner, communicator=LocalCommunicator())
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.defaults is inner.defaults
    step(model, opt)
    assert opt.state is inner.state and len(opt.state) == 4
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert "DSGD(Adam" in repr(opt)
    called = []
    h = opt.register_step_post_hook(lambda o, a, k: called.append(o))
    step(model, opt)
    assert called == [inner]
    h.remove()
    assert opt.begin_communication() is False  # ATC: the message needs the new gradient
    loss = opt.step(lambda: mixed_loss(model))
    assert isinstance(loss, torch.Tensor)
    with pytest.raises(TypeError, match="pickled"):
        copy.copy(opt)


def test_add_param_group():
    model = Mixed()
    extra = nn.Parameter(torch.ones(3))
    opt = DSGD(torch.optim.SGD(model.a.parameters(), lr=0.1), communicator=LocalCommunicator())
    step(model, opt)
    opt.add_param_group({"params": [*list(model.b.parameters()), extra], "lr": 0.5})
    assert len(opt.param_groups) == 2 and len(opt._buckets) == 2
    before = [p.detach().clone() for p in model.b.parameters()]
    step(model, opt)
    for p, q in zip(model.b.parameters(), before):
        assert torch.allclose(p, q - 0.5 * p.grad)
    gt = GradientTracking(
        torch.optim.SGD(Mixed().a.parameters(), lr=0.1), communicator=LocalCommunicator()
    )
    gt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})  # before the first step: fine
    m2 = Mixed()
    gt2 = GradientTracking(
        torch.optim.SGD(m2.parameters(), lr=0.1), communicator=LocalCommunicator()
    )
    step(m2, gt2)
    with pytest.raises(RuntimeError, match="before the first step"):
        gt2.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})


def test_replaced_parameter_data_is_repaired():
    model = Mixed()
    opt = DSGD(torch.optim.SGD(model.parameters(), lr=0.1), communicator=LocalCommunicator())
    w = model.a.weight
    w.data = torch.full_like(w, 2.0)  # user code breaks the view
    step(model, opt)
    b = opt._buckets[0]
    assert w.data_ptr() == b.ptrs[0]
    assert torch.allclose(b.flat[:6].reshape(2, 3), w.detach())
    assert float(w.detach().mean()) != 2.0  # the step was applied to the new values
    w.data = torch.zeros(5)
    with pytest.raises(RuntimeError, match="changed dtype/device/shape"):
        opt.step()


RESUME = [
    (cls, kw, inner)
    for cls, kw in [*ALL, (DSGD, {"communicate_every": 2}), (GradientTracking, {"global_every": 2})]
    for inner in ("sgd", "adam")
    if not (cls is QGDSGDm and inner == "adam")  # QG-DSGDm wraps plain SGD
]


@pytest.mark.parametrize(("cls", "kw", "inner"), RESUME)
def test_simulation_resume_is_bitwise(cls, kw, inner):
    n = 5
    topo = OnePeerExponentialGraph(n)  # time-varying (3 rounds)

    def make_sim():
        torch.manual_seed(3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Simulation(
                topo,
                lambda: nn.Sequential(
                    nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1, dtype=torch.float32)
                ),
                (lambda m: torch.optim.Adam(m.parameters(), lr=0.01))
                if inner == "adam"
                else (lambda m: torch.optim.SGD(m.parameters(), lr=0.05)),
                cls,
                **kw,
            )

    def loss_fn(i, model):
        x = torch.linspace(-1, 1, 9).reshape(3, 3) + i
        return (model(x) - i).square().mean()

    a = make_sim()
    a.run(loss_fn, 5)
    ckpt = a.state_dict()
    a.run(loss_fn, 4)
    b = make_sim()
    b.load_state_dict(ckpt)
    assert b.round == ckpt["round"]
    b.run(loss_fn, 4)
    assert torch.equal(a.param_matrix(), b.param_matrix())
    assert a.round == b.round


def test_state_dict_contents_and_validation():
    model = Mixed()
    opt = GradientTracking(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), communicator=LocalCommunicator()
    )
    step(model, opt)
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups", "decomm"}
    dc = sd["decomm"]
    assert dc["algorithm"] == "GradientTracking" and dc["steps"] == 1 and dc["round"] == 1
    assert set(dc["state"]) == {"tracker", "previous_gradient"}
    assert [t.numel() for t in dc["state"]["tracker"]] == [8, 3]
    assert dc["extra"] == {"initialized": True}
    with pytest.raises(ValueError, match="saved by GradientTracking, not D2"):
        D2(
            torch.optim.SGD(Mixed().parameters(), lr=0.1), communicator=LocalCommunicator()
        ).load_state_dict(sd)
    other = nn.Linear(4, 1)
    with pytest.raises(ValueError, match="buckets"):
        GradientTracking(
            torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9),
            communicator=LocalCommunicator(),
        ).load_state_dict(sd)
    # a plain torch state_dict loads the inner optimizer only
    plain = torch.optim.SGD(model.parameters(), lr=0.3).state_dict()
    opt.load_state_dict(plain)
    assert opt.param_groups[0]["lr"] == 0.3 and opt.steps == 1


def test_errors():
    model = nn.Linear(2, 1)
    with pytest.raises(
        TypeError, match=r"DSGD wraps a torch.optim.Optimizer, got torch.nn.modules.linear.Linear"
    ):
        DSGD(model)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"builtins\.list"):
        GradientTracking(list(model.parameters()))  # type: ignore[arg-type]
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped = DSGD(inner, communicator=LocalCommunicator())
    with pytest.raises(TypeError, match="cannot wrap another decomm optimizer"):
        D2(wrapped, communicator=LocalCommunicator())
    for bad in (0, -2, 1.5, True, "3", None):
        with pytest.raises(ValueError, match="communicate_every must be a positive int"):
            DSGD(inner, communicate_every=bad, communicator=LocalCommunicator())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="global_every"):
        DSGD(inner, global_every=0, communicator=LocalCommunicator())
    with pytest.raises(TypeError, match=r"QGDSGDm wraps torch\.optim\.SGD"):
        QGDSGDm(torch.optim.Adam(model.parameters()), communicator=LocalCommunicator())
    with pytest.raises(ValueError, match="momentum=0"):
        QGDSGDm(
            torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
            communicator=LocalCommunicator(),
        )
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        QGDSGDm(inner, momentum=1.0, communicator=LocalCommunicator())
    with pytest.raises(TypeError, match="sparse"):
        DSGD(
            torch.optim.SGD([nn.Parameter(torch.eye(2).to_sparse())], lr=0.1),
            communicator=LocalCommunicator(),
        )
    with pytest.raises(TypeError, match="expected a module"):
        consensus_distance(3, communicator=LocalCommunicator())


def test_pending_exchange_protocol_does_not_shadow_decomm_handle():
    """decomm.optim's protocol for a started exchange is PendingExchange; the name Handle
    belongs to decomm.Handle alone (and DecommError comes from decomm.errors)."""
    import decomm
    import decomm.optim as optim
    from decomm.optim import comm

    assert "PendingExchange" in optim.__all__ and "Handle" not in optim.__all__
    assert not hasattr(optim, "Handle") and not hasattr(comm, "Handle")
    assert not hasattr(comm, "decomm_error")

    class Started:
        def wait(self):
            return torch.zeros(1)

    assert isinstance(Started(), optim.PendingExchange)
    assert decomm.Handle is not optim.PendingExchange


def test_mpi_communicator_requires_init():
    import decomm

    if decomm.is_initialized():
        pytest.skip("decomm already initialised in this process")
    with pytest.raises(DecommError, match=r"decomm.init\(\)"):
        MPICommunicator()
    with pytest.raises(DecommError, match="not initialised"):
        DSGD(torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1))


def test_d2_warns_about_eigenvalue_and_asymmetry():
    model = nn.Linear(2, 1)

    class Comm(LocalCommunicator):
        def __init__(self, topo):
            super().__init__()
            self.topo = topo

        def topology(self):
            return self.topo

    with pytest.warns(UserWarning, match=r"eigenvalues > -1/3.*eigenvalue -0.333333 in round 0"):
        D2(torch.optim.SGD(model.parameters(), lr=0.1), communicator=Comm(RingGraph(4)))
    directed_ring = [[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [0.5, 0.0, 0.5]]  # static, asymmetric
    with pytest.warns(UserWarning, match="not symmetric"):
        D2(
            torch.optim.SGD(model.parameters(), lr=0.1),
            communicator=Comm(Topology.from_matrices(directed_ring)),
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        D2(torch.optim.SGD(model.parameters(), lr=0.1), communicator=Comm(RingGraph(5)))
        lazy = Topology.from_matrices((torch.eye(4).numpy() + RingGraph(4).matrix(0)) / 2)
        D2(torch.optim.SGD(model.parameters(), lr=0.1), communicator=Comm(lazy))
        D2(
            torch.optim.SGD(model.parameters(), lr=0.1),
            communicator=Comm(RingGraph(4)),
            check_topology=False,
        )


def test_base_class_is_abstract():
    opt = DecentralizedOptimizer(
        torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1), communicator=LocalCommunicator()
    )
    with pytest.raises(NotImplementedError):
        opt.step()


def test_d2_warns_on_time_varying_topology():
    import warnings as _warnings

    from decomm.optim import D2
    from decomm.sim import Simulation
    from decomm.topology import BaseGraph

    with _warnings.catch_warnings(record=True) as rec:
        _warnings.simplefilter("always")
        sim = Simulation(BaseGraph(4, 1), lambda: torch.nn.Linear(2, 1),
                         lambda m: torch.optim.SGD(m.parameters(), lr=0.1), D2)
        sim.step(lambda i, m: m(torch.ones(1, 2)).sum())
    assert any("changes every round" in str(w.message) for w in rec)


class _TopologyComm(LocalCommunicator):
    def __init__(self, topo):
        super().__init__()
        self.topo = topo

    def topology(self):
        return self.topo


def _d2_warnings(topo) -> list[str]:
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        D2(torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1),
           communicator=_TopologyComm(topo))
    return [str(w.message) for w in rec]


def _lazy(topo) -> Topology:
    eye = np.eye(topo.n)
    return Topology.from_matrices([(eye + topo.matrix(t)) / 2 for t in range(topo.rounds)],
                                  name="lazy " + topo.name)


def test_d2_time_varying_warning_points_to_gradient_tracking_not_lazy_w():
    from decomm.topology import BaseGraph

    base = BaseGraph(25, 1)  # 9 rounds; a round with weights 4/9, 5/9... eigenvalue < -1/3
    assert min(np.linalg.eigvalsh(base.matrix(t)).min() for t in range(base.rounds)) < -1 / 3
    for topo in (base, _lazy(base)):
        (msg,) = _d2_warnings(topo)
        assert "static mixing matrix" in msg and "a cycle of 9 rounds" in msg
        assert "Use GradientTracking" in msg and "e.g. (I + W) / 2" not in msg
    # a static W keeps the eigenvalue advice, where the lazy W does help
    (msg,) = _d2_warnings(RingGraph(4))
    assert "eigenvalue -0.333333" in msg and "(I + W) / 2" in msg


def test_d2_diverges_over_lazy_base_graph_and_gradient_tracking_does_not():
    """The fact behind the warning: (I + W(t))/2 of BaseGraph(25, 1) has every eigenvalue
    in [0, 1], yet D2 over it diverges on a heterogeneous quadratic, while gradient tracking
    converges to the minimiser of the average loss, mean_i b_i."""
    from decomm.topology import BaseGraph

    lazy = _lazy(BaseGraph(25, 1))
    assert min(np.linalg.eigvalsh(lazy.matrix(t)).min() for t in range(lazy.rounds)) >= -1e-12
    b = torch.randn(25, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3

    def run(cls):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sim = Simulation(lazy, lambda: nn.Linear(5, 1, bias=False, dtype=torch.float64),
                             lambda m: torch.optim.SGD(m.parameters(), lr=0.1), cls)
        for _ in range(600):
            sim.step(lambda i, m: 0.5 * (m.weight[0] - b[i]).square().sum())
        return float((sim.param_matrix() - b.mean(0)).norm(dim=1).max())

    assert run(D2) > 1e6  # |b_i| ~ 3-10: a distance above 1e6 is divergence
    assert run(GradientTracking) < 1e-2  # from about 5 at the start
