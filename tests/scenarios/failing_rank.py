"""A small training-like loop in which rank 1 misbehaves; run by tests/unit/test_failure_jobs.py.

Dead or stuck rank (the job must end non-zero within the decomm timeout, naming it):
``exit`` (rank 1 calls os._exit(1) at step 3), ``kill`` (rank 1 SIGKILLs itself),
``stuck`` (rank 1 stops calling and sleeps), ``raise`` (rank 1 raises an uncaught error).

Out-of-step rank (the job must end non-zero in seconds, long before the timeout, with
an error naming rank 1 and the call counts): ``sys_exit`` (rank 1 calls sys.exit(0) at
step 3), ``shutdown`` (rank 1 calls decomm.shutdown() at step 3, then idles),
``extra_step`` / ``skip_step`` (rank 1 makes one extra / one fewer DSGD ``opt.step()`` at
step 3), ``extra_call`` (rank 1 makes one extra unnamed neighbor_allreduce at step 3).
The other ranks keep gossiping over a time-varying Base-(k+1) topology.
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
me = decomm.rank()
x = torch.full((1000,), float(me))
model = torch.nn.Linear(4, 1)
opt = decomm.optim.DSGD(torch.optim.SGD(model.parameters(), lr=0.01))
for step in range(30):
    misbehave = me == 1 and step == 3
    if misbehave:
        if mode == "exit":
            os._exit(1)
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "stuck":
            time.sleep(600)
        if mode == "raise":
            raise RuntimeError("rank 1 hit a bug")
        if mode == "sys_exit":
            sys.exit(0)
        if mode == "shutdown":
            decomm.shutdown()
            time.sleep(600)
        if mode == "extra_call":
            decomm.neighbor_allreduce(x)
    if mode in ("extra_step", "skip_step"):
        model(torch.ones(2, 4)).sum().backward()
        if not (misbehave and mode == "skip_step"):
            opt.step()
        if misbehave and mode == "extra_step":
            opt.step()
        opt.zero_grad()
    else:
        x = decomm.neighbor_allreduce(x, name="x")
        decomm.advance_round()
print(f"rank {me} finished", flush=True)
