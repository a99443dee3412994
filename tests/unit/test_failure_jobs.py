"""Whole MPI jobs in which one rank dies, hangs or raises: the job must end non-zero, fast.

Each case launches its own ``mpirun`` (so a broken communicator cannot affect other
tests) with ``DECOMM_TIMEOUT=3`` and an outer time limit.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MPIRUN = Path(sys.executable).parent / "mpirun"
if not MPIRUN.exists():
    MPIRUN = Path(shutil.which("mpirun") or "mpirun")


def run_job(mode: str, n: int = 3, limit: float = 120.0, timeout: str = "3",
            script: str = "failing_rank.py") -> tuple[int, str, float]:
    env = dict(os.environ, DECOMM_TIMEOUT=timeout, OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT))
    cmd = [str(MPIRUN), "-np", str(n), "--oversubscribe", "--bind-to", "none", sys.executable,
           str(ROOT / "tests" / "scenarios" / script), mode]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, env=env)
    return proc.returncode, proc.stdout + proc.stderr, time.time() - t0


@pytest.mark.skipif(not MPIRUN.exists(), reason="no mpirun")
@pytest.mark.parametrize("mode", ["exit", "kill", "raise"])
def test_dead_rank_ends_the_job_nonzero(mode):
    rc, out, elapsed = run_job(mode)
    assert rc != 0, out
    assert "finished" not in out
    assert elapsed < 90, f"took {elapsed:.1f} s"


@pytest.mark.skipif(not MPIRUN.exists(), reason="no mpirun")
def test_stuck_rank_times_out_naming_it():
    rc, out, elapsed = run_job("stuck")
    assert rc != 0, out
    assert "timed out after 3 s" in out, out
    assert "neighbour(s) [1]" in out, out
    assert "DecommError" in out
    assert elapsed < 90, f"took {elapsed:.1f} s"


@pytest.mark.skipif(not MPIRUN.exists(), reason="no mpirun")
@pytest.mark.parametrize("mode", ["sys_exit", "shutdown", "extra_step", "skip_step"])
def test_out_of_step_rank_ends_the_job_at_once(mode):
    """With a 600 s timeout, the job still ends fast, by the shut-down notice, not a timeout."""
    rc, out, elapsed = run_job(mode, limit=300.0, timeout="600")
    assert rc != 0, out
    assert "has shut down after" in out, out
    assert "timed out" not in out, out
    if mode in ("sys_exit", "shutdown", "skip_step"):
        assert "rank 1 has shut down after" in out, out
    assert elapsed < 250, f"took {elapsed:.1f} s"


@pytest.mark.skipif(not MPIRUN.exists(), reason="no mpirun")
def test_extra_unnamed_call_is_caught_at_the_call():
    rc, out, elapsed = run_job("extra_call", limit=300.0, timeout="600")
    assert rc != 0, out
    assert "called differently" in out, out
    assert "timed out" not in out, out
    assert elapsed < 250, f"took {elapsed:.1f} s"


@pytest.mark.skipif(not MPIRUN.exists(), reason="no mpirun")
def test_shutdown_removes_the_abort_hook_and_windows_print_no_mpi_error():
    rc, out, _ = run_job("-", n=2, script="lifecycle.py")
    assert rc == 0, out
    assert out.count("lifecycle ok") == 2, out
    assert "Error" not in out, out  # Open MPI's osc/ucx line at win_create
