"""Re-planning a topology for the ranks that survive a failure.

After ranks are lost, the survivors need a graph on ``n' < n`` nodes. A graph from a
library constructor (``BaseGraph(n, k)``, ``ExponentialGraph(n)``, ``EquiDyn(n, eta,
seed=...)``, ...) is rebuilt for ``n'`` with the same parameters, so the survivors keep
the graph's guarantees (a Base-(k+1) graph stays finite-time exact). Any other graph (a
user's matrix or networkx graph) becomes the subgraph induced on the survivors, with
Metropolis-Hastings weights (Xiao & Boyd, "Fast linear iterations for distributed
averaging", 2004)::

    W[i, j] = 1 / (1 + max(d_i, d_j))   for each edge {i, j} of the induced graph,
    W[i, i] = 1 - sum_{j != i} W[i, j],

which is symmetric and doubly stochastic whatever the degrees. The induced graph is
made undirected (an edge in either direction counts) and must be connected over the
union of its rounds, or the survivors could never agree: a ValueError says so.

>>> from decomm.topology import RingGraph, BaseGraph
>>> replan(BaseGraph(25, 1), list(range(24))).name
'BaseGraph(n=24, k=1)'
>>> ring = Topology.from_matrices([RingGraph(6).matrix(0)])
>>> w = replan(ring, [0, 1, 2, 4, 5]).matrix(0)   # a path 4-5-0-1-2
>>> float(w[0, 4]), float(w[3, 3])
(0.3333333333333333, 0.6666666666666667)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .core import Topology
from .registry import GRAPHS

__all__ = ["metropolis_hastings", "rebuild", "replan"]


def rebuild(topology: Topology, n: int) -> Topology | None:
    """``topology``'s constructor called again for ``n`` nodes with the same parameters.

    None when the topology was not built by a named library constructor. Raises the
    constructor's ValueError when ``n`` is not admissible for it (e.g. a hypercube).
    """
    for spec in GRAPHS.values():
        if getattr(spec.build, "__name__", None) == topology.kind:
            params = {k: v for k, v in topology.params.items() if k != "n"}
            return spec.build(n, **params)
    return None


def metropolis_hastings(adjacency: np.ndarray) -> np.ndarray:
    """Metropolis-Hastings weights of an undirected 0/1 ``adjacency`` (no self loops)."""
    a = (np.asarray(adjacency) != 0).astype(float)
    np.fill_diagonal(a, 0.0)
    deg = a.sum(axis=1)
    w = a / (1.0 + np.maximum(deg[:, None], deg[None, :]))
    np.fill_diagonal(w, 1.0 - w.sum(axis=1))
    return w


def _connected(adjacency: np.ndarray) -> bool:
    n = adjacency.shape[0]
    seen = np.zeros(n, dtype=bool)
    seen[0] = True
    frontier = [0]
    while frontier:
        nxt = np.flatnonzero(adjacency[frontier].any(axis=0) & ~seen)
        seen[nxt] = True
        frontier = list(nxt)
    return bool(seen.all())


def replan(topology: Topology, survivors: Sequence[int]) -> Topology:
    """The topology for the nodes ``survivors`` (old ids, increasing) of ``topology``.

    Node ``survivors[i]`` becomes node ``i``. A library graph is rebuilt for
    ``len(survivors)`` nodes (see :func:`rebuild`); if that size is not admissible for
    it, or the graph is a user's, the induced subgraph with Metropolis-Hastings weights
    is used instead (one round per round of the original; a random family is sampled
    over its first ``topology.sample_rounds`` rounds and used as that cycle).
    """
    keep = [int(s) for s in survivors]
    if not keep or keep != sorted(set(keep)) or keep[0] < 0 or keep[-1] >= topology.n:
        raise ValueError(f"survivors must be increasing node ids of the {topology.n}-node "
                         f"topology, got {list(survivors)!r}")
    n = len(keep)
    try:
        rebuilt = rebuild(topology, n)
    except ValueError:
        rebuilt = None  # n is not admissible for this family: induced subgraph below
    if rebuilt is not None:
        return rebuilt
    if n == 1:
        return Topology.from_matrices([np.ones((1, 1))], name=f"induced({topology.name}, n=1)")
    rounds = topology.rounds if topology.rounds is not None else topology.sample_rounds
    idx = np.asarray(keep)
    mats, union = [], np.zeros((n, n), dtype=bool)
    for t in range(rounds):
        sub = topology.matrix(t)[np.ix_(idx, idx)] != 0
        sub = sub | sub.T
        np.fill_diagonal(sub, False)
        union |= sub
        mats.append(metropolis_hastings(sub))
    if not _connected(union):
        raise ValueError(f"the survivors {keep} of {topology.name} are not connected in it: "
                         "no re-planned graph can mix their values; give set_topology a "
                         "callable n -> Topology to choose the survivors' graph")
    name = f"induced({topology.name}, n={n}, Metropolis-Hastings)"
    return Topology.from_matrices(mats, name=name)
