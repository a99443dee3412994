"""Checkpoint on N ranks, restart on another number: ``ckpt_job.py save|resume PATH``.

save: DSGD on f_i(x) = ||x - b_i||^2 / 2 for 10 steps, then decomm.checkpoint.save; each
rank prints its parameters. resume: decomm.checkpoint.load into a fresh model, print the
loaded parameters, then train 5 more steps. Prints ``RESULT {json}`` per rank.
"""

from __future__ import annotations

import json
import sys

import torch

import decomm
import decomm.checkpoint
from decomm.optim import DSGD

mode, path = sys.argv[1], sys.argv[2]
decomm.init()
r = decomm.rank()
model = torch.nn.Linear(4, 1, bias=True).double()
b = torch.tensor([r, 2.0 * r, -r, 1.0], dtype=torch.float64)
inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
start = 0
if mode == "resume":
    info = decomm.checkpoint.load(path, model, inner)
    start = info["step"]
    loaded = [p.detach().reshape(-1).tolist() for p in model.parameters()]
    print("RESULT " + json.dumps({"rank": r, "loaded": loaded, "info": info}), flush=True)
opt = DSGD(inner)
for _ in range(start, start + (10 if mode == "save" else 5)):
    opt.zero_grad()
    (0.5 * (model.weight.reshape(-1) - b).square().sum() + model.bias.square().sum()).backward()
    opt.step()
if mode == "save":
    decomm.checkpoint.save(path, model, inner, step=start + 10)
    params = [p.detach().reshape(-1).tolist() for p in model.parameters()]
    print("RESULT " + json.dumps({"rank": r, "params": params}), flush=True)
decomm.shutdown()
