"""Entry point of one rank in the MPI test run: pytest with this rank's output in a log file.

``mpirun -np N python tests/mpi/rank_main.py LOGDIR -- <pytest args>``. Writing each
rank's console to LOGDIR/rank{r}.log keeps the interleaved output of N sessions off
the terminal; scripts/run_tests.py prints rank 0's log and every failing rank's.
"""

import os
import sys

from mpi4py import MPI

rank = MPI.COMM_WORLD.Get_rank()
logdir = sys.argv[1]
args = sys.argv[3:] if len(sys.argv) > 2 and sys.argv[2] == "--" else sys.argv[2:]
os.makedirs(logdir, exist_ok=True)
log = open(os.path.join(logdir, f"rank{rank}.log"), "w", buffering=1)
os.dup2(log.fileno(), 1)
os.dup2(log.fileno(), 2)
sys.stdout = os.fdopen(1, "w", buffering=1)
sys.stderr = os.fdopen(2, "w", buffering=1)

import pytest  # noqa: E402

sys.exit(pytest.main(args))
