"""Module buffers (BatchNorm running statistics) exchanged by the wrappers, over MPI.

Every rank runs ``Linear(3, 4) -> BatchNorm1d(4)`` (float64) on its own batch,
generated from seed ``100 + rank``, so every rank can compute all ranks' local
statistics in numpy from BatchNorm's update rule (``r ← (1 − m) r + m · stat``,
batch mean and unbiased batch variance, ``m = 0.1``).  The closed forms: with
``buffers=model, buffer_mode="mix"`` rank ``i``'s statistics after the step are row
``i`` of ``W(t) @ S``, with ``"average"`` the mean of ``S``'s rows, by default row
``i`` of ``S``.  Runs for any number of ranks (CI: 1 to 5).  The tolerance 1e-12
absorbs the difference in summation order between MPI's weighted sum and numpy.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from batchnorm_case import C, data, local_stats, make_model  # tests/batchnorm_case.py

import decomm
from decomm.compression import Identity
from decomm.errors import DecommError
from decomm.optim import D2, DSGD, AsyncGossip, ChocoSGD, GradientTracking, PushSum, QGDSGDm
from decomm.topology import Topology

TOL = 1e-12


def shift(n: int) -> np.ndarray:
    """P[i, i − 1] = 1: rank i receives from rank i − 1."""
    return np.roll(np.eye(n), 1, axis=1)


def lazy_cycle(n: int) -> Topology:
    """Two rounds, both doubly stochastic and different for n >= 3."""
    return Topology.from_matrices([0.5 * np.eye(n) + 0.5 * shift(n),
                                   0.75 * np.eye(n) + 0.25 * shift(n).T])


def lazy_static(n: int) -> Topology:
    """One round (ChocoSGD needs a static graph): W = (I + P) / 2."""
    return Topology.from_matrices(0.5 * np.eye(n) + 0.5 * shift(n))




def first_step_stats(n: int) -> tuple[np.ndarray, np.ndarray]:
    m = make_model()
    w, b = m[0].weight.detach().numpy(), m[0].bias.detach().numpy()
    per = [local_stats(w, b, np.zeros(C), np.ones(C), i) for i in range(n)]
    return np.stack([p[0] for p in per]), np.stack([p[1] for p in per])


def one_step(opt, model) -> None:
    opt.zero_grad()
    model(data(decomm.rank())).square().mean().backward()
    opt.step()


WRAPPERS = [
    (DSGD, {}),
    (DSGD, {"combine_first": True}),  # the exchange is prefetched by a backward hook
    (GradientTracking, {}),
    (D2, {}),
    (QGDSGDm, {"momentum": 0.9}),
    (PushSum, {}),
    (PushSum, {"overlap": True}),
    (ChocoSGD, {"compression": Identity(), "consensus_step": 1.0}),
]
IDS = ["DSGD", "DSGD-AWC", "GradientTracking", "D2", "QGDSGDm", "PushSum", "PushSum-overlap",
       "ChocoSGD"]


def wrap(cls, kw, model, **extra):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # D2's and the column-sum advice: not under test
        return cls(torch.optim.SGD(model.parameters(), lr=0.1), **kw, **extra)


@pytest.mark.parametrize(("cls", "kw"), WRAPPERS, ids=IDS)
@pytest.mark.parametrize("mode", ["mix", "average", None])
def test_closed_forms(cls, kw, mode):
    n, r = decomm.size(), decomm.rank()
    topo = lazy_static(n)
    decomm.set_topology(topo)
    model = make_model()
    extra = {} if mode is None else {"buffers": model, "buffer_mode": mode}
    opt = wrap(cls, kw, model, **extra)
    one_step(opt, model)
    S_mean, S_var = first_step_stats(n)
    if mode == "mix":
        W = topo.matrix(0)
        want = (W @ S_mean)[r], (W @ S_var)[r]
    elif mode == "average":
        want = S_mean.mean(0), S_var.mean(0)
    else:
        want = S_mean[r], S_var[r]
    np.testing.assert_allclose(model[1].running_mean.numpy(), want[0], rtol=0, atol=TOL)
    np.testing.assert_allclose(model[1].running_var.numpy(), want[1], rtol=0, atol=TOL)
    assert int(model[1].num_batches_tracked) == 1  # integer buffers stay local
    opt.close()


def test_two_rounds_with_lr_zero_and_buffer_every():
    """Round t mixes with W(t); buffer_every=2 exchanges on the 2nd and 4th steps only."""
    n, r = decomm.size(), decomm.rank()
    topo = lazy_cycle(n)
    decomm.set_topology(topo)
    model = make_model()
    opt = DSGD(torch.optim.SGD(model.parameters(), lr=0.0), buffers=model, buffer_every=2)
    m0 = make_model()
    w, b = m0[0].weight.detach().numpy(), m0[0].bias.detach().numpy()
    mean, var = np.zeros((n, C)), np.ones((n, C))
    for t in range(4):
        one_step(opt, model)
        per = [local_stats(w, b, mean[i], var[i], i) for i in range(n)]
        mean, var = np.stack([p[0] for p in per]), np.stack([p[1] for p in per])
        if t % 2 == 1:
            W = topo.matrix(t)  # the parameters' round of that step
            mean, var = W @ mean, W @ var
        np.testing.assert_allclose(model[1].running_mean.numpy(), mean[r], rtol=0, atol=TOL)
        np.testing.assert_allclose(model[1].running_var.numpy(), var[r], rtol=0, atol=TOL)
    assert decomm.current_round() == 4


def test_sync_buffers_after_construction_and_global_every():
    """mode 'mix' on a global_every step is the exact average, like the parameters."""
    n = decomm.size()
    decomm.set_topology(lazy_cycle(n))
    model = make_model()
    opt = GradientTracking(torch.optim.SGD(model.parameters(), lr=0.1), global_every=1)
    opt.sync_buffers(model, mode="mix")
    one_step(opt, model)
    S_mean, _ = first_step_stats(n)
    np.testing.assert_allclose(model[1].running_mean.numpy(), S_mean.mean(0), rtol=0, atol=TOL)


def test_async_gossip_refuses_on_every_rank():
    model = make_model()
    with pytest.raises(ValueError, match="AsyncGossip cannot exchange module buffers"):
        AsyncGossip(torch.optim.SGD(model.parameters(), lr=0.1), buffers=model)


@pytest.mark.skipif("decomm.size() < 2")
def test_ranks_with_different_buffers_are_told_which():
    model = make_model()
    model.register_buffer("extra", torch.zeros(3 + (decomm.rank() == 1), dtype=torch.float64))
    want = r"module buffer extra differs across ranks: shape \(3,\).*rank 0 but shape \(4,\)"
    with pytest.raises(DecommError, match=want):
        DSGD(torch.optim.SGD(model.parameters(), lr=0.1), buffers=model)
