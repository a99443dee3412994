"""Mixed precision under MPI: a GradScaler overflow on one rank skips the step on all.

Before the wrappers made the skip collective, the overflowing rank skipped its
step alone, its round counter fell one behind the others' and the next exchange
paired mismatched rounds (then hung).  Here rank 1's gradient is set to inf in
the first step; every rank must skip (same parameters, same round), and the
second, finite step must give the closed form ``x_i = x0 - lr (W c)_i`` (ATC,
gradient tracking's first step, push-sum over a one-peer graph) or
``x0 - lr c_i`` (AWC), with ``c_i`` rank i's unscaled gradient.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import decomm
import decomm.amp
from decomm.optim import DSGD, GradientTracking, PushSum
from decomm.topology import OnePeerExponentialGraph

S = 2.0**10
LR = 0.5
D = 3


def grad_of(rank: int) -> torch.Tensor:
    return torch.tensor([[1.0, -2.0, 0.5]]) * (rank + 1)


def scaled_step(model, opt, scaler, overflow: bool) -> None:
    r = decomm.rank()
    opt.zero_grad()
    scaler.scale((model.weight * grad_of(r)).sum()).backward()
    if overflow:
        model.weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()


def gathered(x: float) -> list[float]:
    return decomm.allgather(torch.tensor([x], dtype=torch.float64)).tolist()


@pytest.mark.parametrize("scaler_cls", [torch.amp.GradScaler, decomm.amp.GradScaler])
@pytest.mark.parametrize("case", ["atc", "awc", "gt", "push"])
def test_one_rank_overflow_skips_everywhere(case, scaler_cls):
    n, r = decomm.size(), decomm.rank()
    if n < 2:
        pytest.skip("needs a second rank to fall out of step")
    topo = OnePeerExponentialGraph(n)  # time-varying: a lost round would show
    decomm.set_topology(topo)
    torch.manual_seed(r)  # different on every rank: the wrapper broadcasts rank 0's
    model = nn.Linear(D, 1, bias=False)
    inner = torch.optim.SGD(model.parameters(), lr=LR)
    opt = {
        "atc": lambda: DSGD(inner),
        "awc": lambda: DSGD(inner, combine_first=True),  # exchange starts in backward
        "gt": lambda: GradientTracking(inner),
        # one out-neighbour per round: P = (I + A)/2 = W, so w stays 1 and z = ATC's x
        "push": lambda: PushSum(inner),
    }[case]()
    scaler = scaler_cls("cpu", init_scale=S, growth_interval=1000)
    x0 = model.weight.detach().clone()
    round0 = decomm.current_round()

    scaled_step(model, opt, scaler, overflow=(r == 1))
    assert torch.equal(model.weight.detach(), x0)
    assert opt.steps == 0
    assert gathered(decomm.current_round()) == [float(round0)] * n
    scales = gathered(scaler.get_scale())
    if scaler_cls is decomm.amp.GradScaler:
        assert scales == [S / 2] * n
    else:  # torch's scaler backs off on the overflowing rank only
        assert scales == [S / 2 if j == 1 else S for j in range(n)]

    W = torch.from_numpy(topo.matrix(round0)).float()
    C = torch.cat([grad_of(j) for j in range(n)])  # row j: rank j's gradient
    scaled_step(model, opt, scaler, overflow=False)
    expected = x0[0] - LR * (C[r] if case == "awc" else W[r] @ C)
    assert torch.allclose(model.weight.detach()[0], expected, rtol=0, atol=1e-5)
    assert gathered(decomm.current_round()) == [float(round0 + 1)] * n
    assert opt.steps == 1
    opt.close()
