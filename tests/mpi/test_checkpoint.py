"""decomm.checkpoint: the saved model is the ranks' consensus average; load works anywhere.

Rank r's parameters are filled with r (and its SGD momentum with 10 r), so the checkpoint
must hold the mean over ranks, (n - 1) / 2 (and 10 (n - 1) / 2), on every rank that loads it.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

import decomm
import decomm.checkpoint as ckpt

pytestmark = pytest.mark.mpi


def _model(value: float) -> torch.nn.Module:
    m = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(value)
        m[1].running_mean.fill_(value)
    return m


def _shared_path(name: str) -> str:
    """One file name for every rank (they share this host's /tmp): rank 0's pid."""
    token = decomm.broadcast(torch.tensor([os.getpid()]), 0, name="ckpt.token")
    return os.path.join(tempfile.gettempdir(), f"decomm-ckpt-{int(token)}-{name}.pt")


def test_save_stores_the_consensus_average_and_load_restores_it():
    decomm.init()
    n, r = decomm.size(), decomm.rank()
    model = _model(float(r))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        opt.state[p]["momentum_buffer"] = torch.full_like(p, 10.0 * r)
    path = _shared_path("avg")
    ckpt.save(path, model, opt, step=7, note="hello")
    fresh = _model(-1.0)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    info = ckpt.load(path, fresh, fresh_opt)
    mean = (n - 1) / 2
    assert info["step"] == 7 and info["size"] == n and info["extra"] == {"note": "hello"}
    for p in fresh.parameters():
        torch.testing.assert_close(p.detach(), torch.full_like(p, mean))
        torch.testing.assert_close(fresh_opt.state[p]["momentum_buffer"],
                                   torch.full_like(p, 10.0 * mean))
    torch.testing.assert_close(fresh[1].running_mean, torch.full((2,), mean))
    assert int(fresh[1].num_batches_tracked) == 0  # integers are rank 0's, not averaged
    decomm.barrier()
    if r == 0:
        os.unlink(path)


def test_error_paths_name_what_is_wrong():
    decomm.init()
    path = _shared_path("err")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        ckpt.save(path, torch.zeros(3))
    with pytest.raises(ValueError, match="step must be a non-negative int"):
        ckpt.save(path, _model(0.0), step=-1)
    with pytest.raises(decomm.DecommError, match="no checkpoint at"):
        ckpt.load(path + ".missing", _model(0.0))
    ckpt.save(path, _model(1.0))
    with pytest.raises(decomm.DecommError, match="does not match the checkpoint"):
        ckpt.load(path, torch.nn.Linear(3, 5))
    with pytest.raises(decomm.DecommError, match="holds no optimizer state"):
        m = _model(0.0)
        ckpt.load(path, m, torch.optim.SGD(m.parameters(), lr=0.1))
    decomm.barrier()
    if decomm.rank() == 0:
        torch.save({"x": 1}, path)
    decomm.barrier()
    with pytest.raises(decomm.DecommError, match="is not a decomm checkpoint"):
        ckpt.load(path, _model(0.0))
    decomm.barrier()
    if decomm.rank() == 0:
        os.unlink(path)
