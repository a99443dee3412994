"""How CUDA tensors travel (``decomm.cuda_ops.setup``), decided from mocked devices.

The rule under test: NCCL only when every rank has CUDA, every rank's build has NCCL,
and no two ranks use the same physical GPU (same UUID); otherwise the staged MPI path,
with a reason that names the ranks. The job is simulated from one rank's point of
view: the allgather that setup makes returns the rows every rank would contribute,
built here from a list of (logical device, GPU UUID) per rank and checked against the
row this rank sent. No GPU, MPI or CUDA build of
decomm is needed: torch's CUDA queries, the NCCL build check and ``decomm._C_cuda``
are replaced.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch

import decomm
from decomm import cuda_ops


@dataclass
class _Gpu:
    device: int  # the logical CUDA index the rank uses
    uuid: str  # the physical GPU


@dataclass
class _FakeMpi:
    """decomm._C.MpiBackend as setup uses it: one allgather of a [1, 3] int64 row
    (has CUDA, NCCL built, digest of the GPU's identity). The other ranks' rows are
    made from ``gpus``: a rank on the same physical GPU as this one gets this rank's
    digest, every other GPU its own distinct value, so the test does not depend on
    which digest setup uses."""

    gpus: list  # per rank: _Gpu or None
    nccl_built: list  # per rank
    rank: int
    timeout: float = 30.0
    rows_seen: list = field(default_factory=list)

    def allgather(self, mine: torch.Tensor, name: str) -> torch.Tensor:
        assert name == "decomm.cuda_setup" and tuple(mine.shape) == (1, 3)
        row = [int(v) for v in mine.reshape(-1).tolist()]
        self.rows_seen.append(row)
        me = self.gpus[self.rank]
        want_nccl = me is not None and self.nccl_built[self.rank]
        assert row[:2] == [int(me is not None), int(want_nccl)], row
        assert (row[2] != 0) == want_nccl, row  # a GPU digest only where NCCL could run
        other = {}
        table = []
        for g, built in zip(self.gpus, self.nccl_built):
            nccl = g is not None and bool(built)
            if not nccl:
                digest = 0
            elif me is not None and g.uuid == me.uuid and want_nccl:
                digest = row[2]
            else:
                digest = other.setdefault(g.uuid, (1 << 59) + 17 * (len(other) + 1))
            table.append([int(g is not None), int(nccl), digest])
        assert table[self.rank] == row
        return torch.tensor(table, dtype=torch.int64)


class _FakeComm:
    def py2f(self) -> int:
        return 7


class _FakeNccl:
    """decomm._C_cuda.NcclBackend: records how it was made."""

    made: ClassVar[list[tuple]] = []
    fail_with: ClassVar[str | None] = None

    def __init__(self, comm_f: int, device: int, timeout: float, check: bool) -> None:
        if _FakeNccl.fail_with is not None:
            raise decomm.DecommError(_FakeNccl.fail_with)
        _FakeNccl.made.append((comm_f, device, timeout, check))
        self.timeout = timeout
        self.closed = False

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def job(monkeypatch):
    """``job(gpus, rank=0, nccl_built=None, has_cuda=None, backend="auto")`` runs setup
    as ``rank`` of a job whose rank r uses ``gpus[r]`` (None: no CUDA on that rank)."""
    _FakeNccl.made = []
    _FakeNccl.fail_with = None
    fake_ext = types.ModuleType("decomm._C_cuda")
    fake_ext.NcclBackend = _FakeNccl
    monkeypatch.setitem(sys.modules, "decomm._C_cuda", fake_ext)
    monkeypatch.setattr(decomm, "_C_cuda", fake_ext, raising=False)
    monkeypatch.delenv("DECOMM_CUDA_DEVICE", raising=False)
    monkeypatch.delenv("DECOMM_CHECK", raising=False)

    def run(gpus, rank=0, nccl_built=None, backend="auto"):
        n = len(gpus)
        nccl_built = [g is not None for g in gpus] if nccl_built is None else nccl_built
        me = gpus[rank]
        monkeypatch.setattr(torch.cuda, "is_available", lambda: me is not None)
        monkeypatch.setattr(cuda_ops, "_nccl_built", lambda: bool(nccl_built[rank]))
        # the device was chosen before init (torch.cuda.set_device): setup keeps it
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: me.device)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)

        def set_device(d):
            raise AssertionError(f"set_device({d}) called although device {me.device} is "
                                 "current")

        monkeypatch.setattr(torch.cuda, "set_device", set_device)

        def props(d):
            assert me is not None and d == me.device, (d, me)
            return types.SimpleNamespace(uuid=me.uuid)

        monkeypatch.setattr(torch.cuda, "get_device_properties", props)
        fake = _FakeMpi(gpus=gpus, nccl_built=nccl_built, rank=rank)
        state = types.SimpleNamespace(rank=rank, size=n, local_rank=rank, backend=fake,
                                      comm=_FakeComm())
        plan = cuda_ops.setup(state, backend)
        assert len(fake.rows_seen) == 1  # one collective, made once
        return plan, state

    yield run
    cuda_ops.teardown()


def _cuda_tensor(dtype=torch.float32):
    """What backend_for reads of a tensor: whether it is on CUDA, its device and dtype."""
    return types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), dtype=dtype)


def test_one_gpu_per_rank_uses_nccl(job):
    gpus = [_Gpu(0, "GPU-a"), _Gpu(1, "GPU-b"), _Gpu(2, "GPU-c")]
    plan, state = job(gpus, rank=1)
    assert plan.mode == "nccl" and plan.reason == "" and plan.device == 1
    assert _FakeNccl.made == [(7, 1, 30.0, True)]
    assert cuda_ops.backend_for(state, _cuda_tensor(), "neighbor_allreduce") is plan.nccl
    # CPU tensors stay on the MPI backend
    assert cuda_ops.backend_for(state, torch.zeros(1), "neighbor_allreduce") is state.backend
    # NCCL cannot sum int16: that allreduce takes the staged path
    assert cuda_ops.backend_for(state, _cuda_tensor(torch.int16), "allreduce") is plan.staged


def test_four_ranks_on_one_gpu_take_the_staged_path(job, capsys):
    gpus = [_Gpu(0, "GPU-only")] * 4
    plan, state = job(gpus, rank=0)
    assert plan.mode == "mpi" and plan.nccl is None and _FakeNccl.made == []
    assert "4 ranks but only 1 distinct GPU(s): ranks [0, 1, 2, 3] share one GPU" in plan.reason
    assert "NCCL needs one GPU per rank" in plan.reason
    assert capsys.readouterr().err.count("NCCL needs one GPU per rank") == 1  # said at init
    assert cuda_ops.backend_for(state, _cuda_tensor(), "neighbor_allreduce") is plan.staged
    assert "NCCL needs one GPU per rank" not in capsys.readouterr().err  # not again per call


def test_only_rank_zero_announces(job, capsys):
    plan, _ = job([_Gpu(0, "GPU-only")] * 2, rank=1)
    assert plan.mode == "mpi"
    assert capsys.readouterr().err == ""


def test_shared_gpus_are_found_by_uuid_not_by_index(job):
    # ranks 0 and 2 see the same physical GPU as different logical indices
    # (CUDA_VISIBLE_DEVICES differs per rank); ranks 1 and 3 share another
    gpus = [_Gpu(0, "GPU-a"), _Gpu(0, "GPU-b"), _Gpu(1, "GPU-a"), _Gpu(1, "GPU-b")]
    plan, _ = job(gpus, rank=2)
    assert plan.mode == "mpi"
    assert "ranks [0, 2] share one GPU; ranks [1, 3] share one GPU" in plan.reason
    # same logical index on every rank, but distinct physical GPUs: NCCL
    distinct = [_Gpu(0, f"GPU-{r}") for r in range(4)]
    plan, _ = job(distinct, rank=3)
    assert plan.mode == "nccl" and plan.device == 0


def test_backend_nccl_refuses_a_shared_gpu_with_the_reason(job):
    with pytest.raises(decomm.DecommError, match=r"backend='nccl'.*ranks \[0, 1\] share one GPU"):
        job([_Gpu(0, "GPU-only")] * 2, rank=0, backend="nccl")


def test_backend_mpi_never_uses_nccl(job):
    plan, _ = job([_Gpu(0, "GPU-a"), _Gpu(1, "GPU-b")], rank=0, nccl_built=[False, False],
                  backend="mpi")
    assert plan.mode == "mpi" and "backend='mpi'" in plan.reason and _FakeNccl.made == []


def test_a_rank_without_nccl_or_cuda_means_mpi_for_all(job):
    gpus = [_Gpu(0, "GPU-a"), _Gpu(1, "GPU-b")]
    plan, _ = job(gpus, rank=0, nccl_built=[True, False])
    assert plan.mode == "mpi" and "without the NCCL backend on rank(s) [1]" in plan.reason
    plan, _ = job([_Gpu(0, "GPU-a"), None], rank=0)
    assert plan.mode == "mpi" and "rank(s) [1] have no usable CUDA device" in plan.reason
    with pytest.raises(decomm.DecommError, match=r"rank\(s\) \[1\] have no usable CUDA"):
        job([_Gpu(0, "GPU-a"), None], rank=0, backend="nccl")


def test_a_failed_nccl_communicator_falls_back_to_mpi(job, capsys):
    _FakeNccl.fail_with = "ncclCommInitRank failed"
    plan, _ = job([_Gpu(0, "GPU-a"), _Gpu(1, "GPU-b")], rank=0)
    assert plan.mode == "mpi" and "could not be created (ncclCommInitRank failed)" in plan.reason
    assert "could not be created" in capsys.readouterr().err
    with pytest.raises(decomm.DecommError, match="ncclCommInitRank failed"):
        job([_Gpu(0, "GPU-a"), _Gpu(1, "GPU-b")], rank=0, backend="nccl")


def test_the_gpu_digest_a_rank_sends_follows_the_uuid(job):
    """What makes 'same GPU' visible across ranks: the row's digest is a function of the
    physical GPU (UUID), whatever logical index the rank reaches it by."""
    def sent(gpu):
        _, state = job([gpu, _Gpu(5, "GPU-other")], rank=0)
        return state.backend.rows_seen[0][2]

    assert sent(_Gpu(0, "GPU-a")) == sent(_Gpu(3, "GPU-a"))
    assert sent(_Gpu(0, "GPU-a")) != sent(_Gpu(0, "GPU-b"))
