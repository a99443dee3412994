"""Gossip averaging: each rank starts at x_i = rank and averages with its neighbours.

Run: ``decomm-run -np 8 python examples/gossip.py --topology base --k 1``.
Rank 0 prints the consensus error ||x - mean|| / ||x_0 - mean|| after every round;
finite-time exact topologies (Base-(k+1), one-peer exponential for powers of 2) reach
machine precision after one cycle, the ring decays geometrically.
"""

from __future__ import annotations

import argparse
import math

import torch

import decomm
from decomm import topology as T

GRAPHS = {
    "ring": lambda n, k: T.RingGraph(n),
    "exp": lambda n, k: T.ExponentialGraph(n),
    "one-peer-exp": lambda n, k: T.OnePeerExponentialGraph(n),
    "base": lambda n, k: T.BaseGraph(n, k),
    "full": lambda n, k: T.FullyConnectedGraph(n),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--topology", choices=sorted(GRAPHS), default="base")
    ap.add_argument("--k", type=int, default=1, help="max degree for --topology base")
    ap.add_argument("--rounds", type=int, default=12)
    args = ap.parse_args()

    decomm.init()
    n, r = decomm.size(), decomm.rank()
    topo = GRAPHS[args.topology](n, args.k)
    decomm.set_topology(topo)
    x = torch.tensor([float(r)], dtype=torch.float64)
    mean = (n - 1) / 2
    err0 = math.sqrt(sum((j - mean) ** 2 for j in range(n))) or 1.0
    if r == 0:
        print(f"gossip over {topo.name} ({topo.rounds} round(s) per cycle) on {n} ranks; "
              f"x_i = rank, target mean {mean}", flush=True)
    for t in range(args.rounds):
        x = decomm.neighbor_allreduce(x, name="x")
        decomm.advance_round()
        err = math.sqrt(decomm.allreduce((x - mean) ** 2, average=False, name="err").item())
        if r == 0:
            print(f"round {t + 1:3d}: consensus error {err / err0:.3e}", flush=True)
    decomm.shutdown()


if __name__ == "__main__":
    main()
