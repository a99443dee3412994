"""Mixed precision: GradScaler skips are collective (single process, pretend peers)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import decomm.amp
from decomm.optim import DSGD, GradientTracking, LocalCommunicator
from decomm.sim import Simulation
from decomm.topology import RingGraph

AGREE = "decomm.optim.amp.found_inf"
S = 2.0**10  # a power of two: scaling and unscaling are exact


class PeerComm(LocalCommunicator):
    """Rank 0 of a pretend 2-rank world whose peer holds identical parameters.

    Gossip is the identity (the peer's values equal ours); in the overflow
    agreement the peer contributes ``peer_inf`` (1.0 = it overflowed).
    """

    def __init__(self, peer_inf: float = 0.0) -> None:
        super().__init__()
        self.peer_inf = peer_inf
        self.calls: list[str | None] = []

    def size(self) -> int:
        return 2

    def allreduce_(self, tensor, average=True, name=None):
        self.calls.append(name)
        if name == AGREE:
            tensor.add_(self.peer_inf).div_(2)
        return tensor

    def neighbor_allreduce_(self, tensor, name=None):
        self.calls.append("neighbor")
        return tensor

    def allgather(self, tensor, name=None):
        return torch.cat([tensor, tensor])


C = torch.tensor([[1.0, -2.0, 0.5]])


def setup(cls=DSGD, peer_inf=0.0, scaler_cls=torch.amp.GradScaler, **kw):
    model = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.25, 0.5, -1.0]]))
    comm = PeerComm(peer_inf)
    opt = cls(torch.optim.SGD(model.parameters(), lr=0.5), communicator=comm, **kw)
    scaler = scaler_cls("cpu", init_scale=S, growth_interval=1000)
    return model, opt, comm, scaler


def scaled_step(model, opt, scaler, overflow=False, unscale_first=False):
    opt.zero_grad()
    scaler.scale((model.weight * C).sum()).backward()  # grad = S * C
    if overflow:
        model.weight.grad[0, 1] = float("inf")
    if unscale_first:
        scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()


@pytest.mark.parametrize("cls", [DSGD, GradientTracking])
@pytest.mark.parametrize("scaler_cls", [torch.amp.GradScaler, decomm.amp.GradScaler])
def test_peer_overflow_skips_the_step_here_too(cls, scaler_cls):
    model, opt, comm, scaler = setup(cls, peer_inf=1.0, scaler_cls=scaler_cls)
    x0 = model.weight.detach().clone()
    scaled_step(model, opt, scaler)  # finite gradients here, inf on the peer
    assert torch.equal(model.weight, x0)
    assert opt.steps == 0 and opt.communicator.current_round() == 0
    assert comm.calls == [AGREE]  # agreement only: no exchange
    # this rank did not overflow: the torch scaler keeps S, decomm's backs off like the peer
    expected = S / 2 if scaler_cls is decomm.amp.GradScaler else S
    assert scaler.get_scale() == expected


@pytest.mark.parametrize("scaler_cls", [torch.amp.GradScaler, decomm.amp.GradScaler])
def test_local_overflow_is_agreed_and_skipped(scaler_cls):
    model, opt, comm, scaler = setup(scaler_cls=scaler_cls)
    x0 = model.weight.detach().clone()
    scaled_step(model, opt, scaler, overflow=True)
    assert torch.equal(model.weight, x0) and opt.steps == 0
    assert comm.calls == [AGREE]  # the peer learns of the overflow
    assert scaler.get_scale() == S / 2


@pytest.mark.parametrize("unscale_first", [False, True])
def test_finite_step_unscales_once(unscale_first):
    model, opt, comm, scaler = setup()
    x0 = model.weight.detach().clone()
    scaled_step(model, opt, scaler, unscale_first=unscale_first)
    # x1 = x0 - lr * C (the peer is identical, so W x = x)
    assert torch.equal(model.weight.detach(), x0 - 0.5 * C)
    assert torch.equal(model.weight.grad, C)
    assert opt.steps == 1 and opt.communicator.current_round() == 1
    assert comm.calls == [AGREE, "neighbor"]
    assert scaler.get_scale() == S


def test_gradient_tracking_state_untouched_by_a_skipped_step():
    model, opt, _, scaler = setup(GradientTracking)
    x0 = model.weight.detach().clone()
    scaled_step(model, opt, scaler, overflow=True)  # skipped: y and g_old untouched
    scaler.update(S)
    scaled_step(model, opt, scaler)
    # first real step: y^0 = g^0 = C, x^1 = x^0 - lr C (had the inf step run, y would be inf)
    assert torch.equal(model.weight.detach(), x0 - 0.5 * C)
    scaled_step(model, opt, scaler)
    # y^1 = y^0 + g^1 - g^0 = C, x^2 = x^1 - lr C
    assert torch.equal(model.weight.detach(), x0 - 1.0 * C)


def test_awc_prefetched_exchange_is_dropped_on_skip():
    class Nonblocking(PeerComm):
        supports_nonblocking = True

        def neighbor_allreduce_nonblocking_(self, tensor, name=None):
            self.calls.append("started")

            class Done:
                def wait(self_inner):
                    return tensor

            return Done()

    model = nn.Linear(3, 1, bias=False)
    comm = Nonblocking(peer_inf=1.0)
    opt = DSGD(torch.optim.SGD(model.parameters(), lr=0.5), combine_first=True, communicator=comm)
    scaler = torch.amp.GradScaler("cpu", init_scale=S)
    x0 = model.weight.detach().clone()
    scaled_step(model, opt, scaler)
    assert comm.calls == ["started", AGREE] and opt._inflight is None
    assert torch.equal(model.weight, x0) and opt.steps == 0


def test_plain_step_without_scaler_sends_no_agreement():
    model, opt, comm, _ = setup()
    (model.weight * C).sum().backward()
    opt.step()
    assert comm.calls == ["neighbor"]


def test_single_rank_needs_no_agreement():
    model = nn.Linear(3, 1, bias=False)
    comm = LocalCommunicator()
    opt = DSGD(torch.optim.SGD(model.parameters(), lr=0.5), communicator=comm)
    scaler = torch.amp.GradScaler("cpu", init_scale=S)
    x0 = model.weight.detach().clone()
    scaled_step(model, opt, scaler, overflow=True)
    assert torch.equal(model.weight, x0) and scaler.get_scale() == S / 2


@pytest.mark.parametrize("scaler_cls", [torch.amp.GradScaler, decomm.amp.GradScaler])
def test_simulation_skips_on_every_node(scaler_cls):
    n = 4
    sim = Simulation(RingGraph(n), lambda: nn.Linear(3, 1, bias=False),
                     lambda m: torch.optim.SGD(m.parameters(), lr=0.5))
    scalers = [scaler_cls("cpu", init_scale=S, growth_interval=1000) for _ in range(n)]
    X0 = sim.param_matrix()
    c = torch.stack([C[0] * (i + 1) for i in range(n)])  # node i: loss (i+1) C . x

    def loss_fn(i, m):
        loss = (m.weight * c[i]).sum()
        if i == 2:  # node 2 overflows
            return loss * float("inf")
        return loss

    sim.step(loss_fn, scalers=scalers)
    assert torch.equal(sim.param_matrix(), X0) and sim.round == 0
    assert all(o.steps == 0 for o in sim.optimizers)
    scales = [s.get_scale() for s in scalers]
    if scaler_cls is decomm.amp.GradScaler:
        assert scales == [S / 2] * n
    else:
        assert scales == [S, S, S / 2, S]
    sim.step(lambda i, m: (m.weight * c[i]).sum(), scalers=scalers)
    # ATC from a common x0: x_i = x0 - lr (W c)_i
    W = torch.from_numpy(RingGraph(n).matrix(0)).float()
    assert torch.allclose(sim.param_matrix(), X0 - 0.5 * (W @ c), rtol=0, atol=1e-6)
    assert sim.round == 1
    with pytest.raises(ValueError, match="one GradScaler per node"):
        sim.step(loss_fn, scalers=scalers[:2])
