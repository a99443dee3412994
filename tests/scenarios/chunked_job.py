"""Large payloads sent in chunks: run with DECOMM_MAX_CHUNK_BYTES small (e.g. 100000).

Each op moves a tensor several chunks long and checks the closed form on every rank
(x_r = r + offset): neighbor_allreduce (ring), neighbor_allgather, allreduce,
broadcast, a DSGD step; then a size mismatch between ranks must still be a clear
error, not garbage. Prints ``OK <checks>`` per rank.
"""

from __future__ import annotations

import sys

import torch

import decomm
from decomm.optim import DSGD

decomm.init(timeout=60)
r, n = decomm.rank(), decomm.size()
decomm.set_topology(decomm.topology.RingGraph(n))
numel = int(sys.argv[1]) if len(sys.argv) > 1 else 250_003  # ~1 MB of float32, odd
ar = torch.arange(numel, dtype=torch.float64)
x = (ar + r).float()
checks = 0

w = torch.as_tensor(decomm.get_topology().matrix(0))
y = decomm.neighbor_allreduce(x, name="nar")
want = sum(float(w[r, j]) * (ar + j) for j in range(n))
torch.testing.assert_close(y.double(), want, rtol=1e-6, atol=1e-3)
checks += 1

g = decomm.neighbor_allgather(x, name="nag")
ins = decomm.in_neighbors()
torch.testing.assert_close(g, torch.cat([(ar + j).float() for j in ins]))
checks += 1

s = decomm.allreduce(x.double(), average=False, name="ar")
torch.testing.assert_close(s, n * ar + n * (n - 1) / 2)
checks += 1

b = x.clone() if r == 0 else torch.zeros_like(x)
decomm.broadcast_(b, 0, name="bc")
torch.testing.assert_close(b, ar.float())
checks += 1

p = torch.nn.Parameter(x.double().clone())
opt = DSGD(torch.optim.SGD([p], lr=0.0), broadcast_parameters=False)
p.grad = torch.zeros_like(p)
opt.step()  # lr 0: one gossip round of x
torch.testing.assert_close(p.detach(), want, rtol=1e-9, atol=1e-9)
checks += 1

bad = torch.zeros(numel + (7 if r == 1 else 0))  # rank 1 sends 28 bytes more
if n > 1:  # on a ring of 2 or 3 every rank is rank 1 or its neighbour: all must raise
    try:
        decomm.neighbor_allreduce(bad, name="mismatch")
    except decomm.DecommError as e:
        msg = str(e)
        assert "called differently" in msg or "payload bytes" in msg, msg
    else:
        raise AssertionError(f"rank {r}: a size mismatch with rank 1 raised nothing")
checks += 1
print(f"OK {checks}", flush=True)
