"""init/shutdown on every rank of a small job; run by tests/unit/test_failure_jobs.py.

Checks, on each rank, that the abort-on-uncaught-exception hook is installed by init()
and removed by shutdown(), that init() after shutdown() installs it again, and that
one-sided windows print no Open MPI error line (osc/ucx kept out on one host).
Prints ``rank R lifecycle ok`` when every check holds.
"""

import sys

import torch

import decomm

original = sys.excepthook
decomm.init()
assert sys.excepthook is not original, "init() did not install the abort hook"
decomm.win_create(torch.zeros(3), "lifecycle.w")
decomm.win_free("lifecycle.w")
decomm.shutdown()
assert sys.excepthook is original, "shutdown() left the abort hook installed"
decomm.init()
assert sys.excepthook is not original, "a second init() did not install the hook again"
decomm.shutdown()
assert sys.excepthook is original
from mpi4py import MPI  # noqa: E402  (decomm is shut down: ask MPI for the rank)

print(f"rank {MPI.COMM_WORLD.Get_rank()} lifecycle ok", flush=True)
