"""A small training-like loop in which rank 1 misbehaves; run by tests/unit/test_failure_jobs.py.

Modes: ``exit`` (rank 1 calls os._exit(1) at step 3), ``kill`` (rank 1 SIGKILLs itself),
``stuck`` (rank 1 stops calling and sleeps), ``raise`` (rank 1 raises an uncaught error).
The other ranks keep gossiping over a time-varying Base-(k+1) topology; the job must end
with a non-zero exit code within the decomm timeout, naming the missing rank.
"""

import os
import signal
import sys
import time

import torch

import decomm
from decomm.topology import BaseGraph

mode = sys.argv[1]
decomm.init()
decomm.set_topology(BaseGraph(decomm.size(), 1))
x = torch.full((1000,), float(decomm.rank()))
for step in range(50):
    if decomm.rank() == 1 and step == 3:
        if mode == "exit":
            os._exit(1)
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "stuck":
            time.sleep(600)
        if mode == "raise":
            raise RuntimeError("rank 1 hit a bug")
    x = decomm.neighbor_allreduce(x, name="x")
    decomm.advance_round()
print(f"rank {decomm.rank()} finished", flush=True)
