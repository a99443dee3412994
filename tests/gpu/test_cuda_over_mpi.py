"""CUDA tensors over the MPI backend (staged through pinned host memory), 2-4 ranks
sharing one GPU; and the more-ranks-than-GPUs detection at init."""

from __future__ import annotations

import pytest
from gpu_util import run_ranks


@pytest.mark.parametrize("np_", [2, 3, 4])
def test_cuda_tensors_over_mpi(np_):
    proc = run_ranks(np_, "staged", env={"CUDA_VISIBLE_DEVICES": "0"})
    assert "neighbor_allreduce over mpi: random ok" in proc.stdout


@pytest.mark.parametrize("np_", [2, 4])
def test_more_ranks_than_gpus_falls_back_to_mpi_and_says_so_once(np_):
    import decomm

    proc = run_ranks(np_, "oversubscribed", env={"CUDA_VISIBLE_DEVICES": "0"})
    out = proc.stdout + proc.stderr
    assert "NCCL's" not in out and "invalid usage" not in out.lower()
    if decomm.nccl_available():
        assert out.count("NCCL needs one GPU per rank") == 1, out
