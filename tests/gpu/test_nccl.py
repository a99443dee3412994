"""The NCCL backend.

* 1 rank (any machine with a GPU): point-to-point with itself (a self-loop), stream
  ordering with the caller's stream, non-blocking handles, collectives of one rank.
* N = min(#GPUs, 4) >= 2 ranks, one GPU each: every topology and dtype against the
  closed form and bitwise against the CPU path (float32/float64), collectives, a shape
  mismatch raising DecommError, and the timeouts (header exchange and watchdog).
"""

from __future__ import annotations

import pytest
from gpu_util import run_ranks


def test_single_rank_self_loop(nccl_ext):
    proc = run_ranks(1, "nccl_single")
    assert "NCCL self-loop (1 rank) ok" in proc.stdout


def test_multi_rank(nccl_ext, gpu_count):
    if gpu_count < 2:
        pytest.skip(f"needs 2 GPUs for 2 NCCL ranks, found {gpu_count}")
    proc = run_ranks(min(gpu_count, 4), "nccl")
    assert "mismatch raises" in proc.stdout


def test_timeouts(nccl_ext, gpu_count):
    if gpu_count < 2:
        pytest.skip(f"needs 2 GPUs, found {gpu_count}")
    proc = run_ranks(2, "nccl_timeout", timeout=240)
    assert "watchdog timeout ok" in proc.stdout
