"""DSGD vs gradient tracking vs D² on heterogeneous data, simulated in one process.

Sixteen nodes; node i minimises ``f_i(x) = 0.5 * ||x - c_i||^2`` with its own,
very different centre ``c_i``. The minimiser of the average loss is the mean of
the centres, ``x* = mean_i c_i``. Every node runs plain SGD with a constant
learning rate, wrapped by one of decomm's decentralized optimizers, on the
simulator (:mod:`decomm.sim`) — the same wrapper classes as under MPI, no
``mpirun`` needed::

    python docs/examples/heterogeneity.py
"""

from __future__ import annotations

import numpy as np
import torch

from decomm.optim import D2, DSGD, GradientTracking
from decomm.sim import Simulation
from decomm.topology import BaseGraph, RingGraph, Topology

N, DIM, STEPS, LR = 16, 5, 500, 0.1

gen = torch.Generator().manual_seed(0)
centres = 5.0 * torch.randn(N, DIM, generator=gen)  # node i's private optimum
x_star = centres.mean(0)  # optimum of the average loss


def loss_fn(i: int, model: torch.nn.Module) -> torch.Tensor:
    return 0.5 * (model.weight.squeeze(0) - centres[i]).square().sum()


def error(topology: Topology, wrapper: type) -> float:
    """Mean distance of the nodes' parameters to x* after STEPS steps."""
    torch.manual_seed(0)  # the initial model (node 0's, copied to all): same for every run
    sim = Simulation(
        topology,
        make_model=lambda: torch.nn.Linear(DIM, 1, bias=False),
        make_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=LR),
        wrapper_cls=wrapper,
    )
    for _ in range(STEPS):
        sim.step(loss_fn)
    return (sim.param_matrix() - x_star).norm(dim=1).mean().item()


def main() -> None:
    # A lazy ring (I + W) / 2: static, symmetric, eigenvalues in [0, 1] (what D² needs).
    ring = RingGraph(N).matrix(0)
    lazy_ring = Topology.from_matrices([(np.eye(N) + ring) / 2], name="lazy ring")
    base = BaseGraph(N, 1)  # time-varying, one peer per round, exact after 4 rounds
    spread = (centres - x_star).norm(dim=1).mean().item()
    print(f"mean ||c_i - x*|| = {spread:.2f} (distance of a node that never communicates)")
    print(f"{'topology':22s} {'optimizer':18s} mean ||x_i - x*||")
    for topology, wrappers in ((lazy_ring, (DSGD, GradientTracking, D2)),
                               (base, (DSGD, GradientTracking))):
        for wrapper in wrappers:
            print(f"{topology.name:22s} {wrapper.__name__:18s} {error(topology, wrapper):.1e}")


if __name__ == "__main__":
    main()
