"""Helpers of the GPU tests: start ``mpi_worker.py`` on N ranks under ``mpirun``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "mpi_worker.py"


def _mpirun() -> str | None:
    local = Path(sys.executable).parent / "mpirun"
    return str(local) if local.exists() else shutil.which("mpirun")


def run_ranks(np_: int, scenario: str, *args: str, timeout: float = 300,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``mpi_worker.py SCENARIO ARGS`` on ``np_`` ranks; fail the test on a non-zero
    exit, skip it when the worker printed ``SKIP: reason`` (on any rank)."""
    mpirun = _mpirun()
    if mpirun is None:
        pytest.skip("no mpirun found (run scripts/setup_env.sh)")
    full_env = dict(os.environ)
    full_env.update({"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
                     "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",
                     "OMP_NUM_THREADS": "1",
                     "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")})
    full_env.update(env or {})
    cmd = [mpirun, "-np", str(np_), sys.executable, "-m", "mpi4py", str(WORKER), scenario,
           *args]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{scenario} on {np_} ranks timed out after {timeout} s (a hang):\n"
                    f"{e.stdout}\n{e.stderr}")
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        pytest.fail(f"{scenario} on {np_} ranks exited with {proc.returncode}:\n{out}")
    for line in out.splitlines():
        if line.startswith("SKIP: "):
            pytest.skip(line[len("SKIP: "):])
    return proc
