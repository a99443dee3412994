"""The quickstart: a plain PyTorch loop made decentralized by three lines.

Run on 4 ranks::

    decomm-run -np 4 python docs/examples/quickstart.py

Every rank fits its own linear model to its own data (rank r's targets are
shifted by r, so the ranks disagree); after each local SGD step it averages
its parameters with its neighbours of the current Base-(k+1) round.
"""

from __future__ import annotations

import torch

import decomm
import decomm.optim
from decomm.topology import BaseGraph

decomm.init()  # 1. join the MPI job
decomm.set_topology(BaseGraph(decomm.size(), 2))  # 2. at most 2 peers per round

torch.manual_seed(decomm.rank())  # different data on every rank
x = torch.randn(256, 10)
y = x.sum(dim=1, keepdim=True) + decomm.rank()
model = torch.nn.Linear(10, 1)
opt = decomm.optim.DSGD(torch.optim.SGD(model.parameters(), lr=0.05))  # 3. wrap the optimizer

for _ in range(200):
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()  # local SGD step, then one neighbor_allreduce, then advance_round()

dist = decomm.optim.consensus_distance(model)  # collective: every rank calls it
if decomm.rank() == 0:
    print(f"{decomm.size()} ranks, round {decomm.current_round()}: loss {loss.item():.3f}, "
          f"bias {model.bias.item():.3f} (mean of the shifts: {(decomm.size() - 1) / 2}), "
          f"consensus distance {dist:.2e}")
