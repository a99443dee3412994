"""Classic static topologies: ring, 2-D torus, star, fully connected.

Each returns a :class:`~decomm.topology.core.Topology` with one round (``rounds == 1``).
Ring and torus use uniform weights over the closed neighbourhood,
``W[i, j] = 1 / (deg + 1)`` for j in N(i) plus i itself; both graphs are
vertex-transitive, so W is symmetric and doubly stochastic. The star uses
Metropolis-Hastings weights (Xiao & Boyd, "Fast linear iterations for distributed
averaging", 2004).  See Nedic, Olshevsky & Rabbat, "Network topology and
communication-computation tradeoffs in decentralized optimization" (Proc. IEEE 2018)
for their spectral gaps.
"""

from __future__ import annotations

import math

import numpy as np

from ._build import check_n, circulant, make
from ._sparse import SparseRound
from .core import Topology

__all__ = ["FullyConnectedGraph", "RingGraph", "StarGraph", "TorusGraph", "torus_shape"]


def RingGraph(n: int) -> Topology:
    """Undirected ring: node i averages with i - 1 and i + 1 (mod n), weights 1/3.

    ``W = (I + S + S^T) / 3`` with S the cyclic shift; eigenvalues
    ``(1 + 2 cos(2 pi m / n)) / 3``, so the spectral gap is
    ``1 - (1 + 2 cos(2 pi / n)) / 3`` for n >= 3 (Nedic et al. 2018).
    Small n follow the same rule "1 / (number of distinct neighbours + 1)":
    n = 1 is the identity, n = 2 is the single edge with weights 1/2 (exact average).

    >>> RingGraph(5).weights(0, 0)
    (0.3333333333333333, {1: 0.3333333333333333, 4: 0.3333333333333333})
    >>> RingGraph(2).matrix(0).tolist()
    [[0.5, 0.5], [0.5, 0.5]]
    """
    n = check_n(n)
    offs = sorted({o % n for o in (1, -1)} - {0})
    w = 1.0 / (len(offs) + 1)
    rnd = circulant(n, offs, [w] * len(offs), self_weight=w)
    return make("RingGraph", {"n": n}, [rnd], n)


def torus_shape(n: int) -> tuple[int, int]:
    """Near-square factorisation ``n = r * c`` with r the largest divisor <= sqrt(n).

    >>> torus_shape(12), torus_shape(16), torus_shape(7)
    ((3, 4), (4, 4), (1, 7))
    """
    n = check_n(n)
    r = math.isqrt(n)
    while n % r:
        r -= 1
    return r, n // r


def TorusGraph(n: int) -> Topology:
    """2-D torus (wrap-around grid) on the near-square factorisation n = r x c.

    Node ``i = a * c + b`` (row a < r, column b < c) averages with
    ``((a +- 1) mod r, b)`` and ``(a, (b +- 1) mod c)`` with uniform weights
    ``1 / (deg + 1)`` (1/5 when r, c >= 3).  Neighbours that coincide are merged, so
    r = 2 gives one vertical neighbour and r = 1 (n prime) gives the ring.  For
    r, c >= 3 the eigenvalues are ``(1 + 2 cos(2 pi p / r) + 2 cos(2 pi q / c)) / 5``.
    (Torus topologies: Nedic et al. 2018; Ying et al., NeurIPS 2021.)

    >>> t = TorusGraph(12)          # 3 x 4
    >>> t.in_neighbors(0, 0)
    [1, 3, 4, 8]
    """
    n = check_n(n)
    r, c = torus_shape(n)
    i = np.arange(n, dtype=np.int64)
    a, b = i // c, i % c
    cand = np.stack([((a + 1) % r) * c + b, ((a - 1) % r) * c + b,
                     a * c + (b + 1) % c, a * c + (b - 1) % c], axis=1)
    cand = np.sort(cand, axis=1)
    keep = (cand != i[:, None])
    keep[:, 1:] &= cand[:, 1:] != cand[:, :-1]
    deg = keep.sum(axis=1)
    rows = np.broadcast_to(i[:, None], cand.shape)[keep]
    w = 1.0 / (deg[rows] + 1.0)
    rnd = SparseRound.from_coo(n, rows, cand[keep], w, diag=1.0 / (deg + 1.0))
    topo = make("TorusGraph", {"n": n}, [rnd], n)
    topo.details["shape"] = (r, c)
    return topo


def StarGraph(n: int) -> Topology:
    """Star centred on node 0, Metropolis-Hastings weights (Xiao & Boyd 2004).

    ``W[0, j] = W[j, 0] = 1/n`` for every leaf j, ``W[0, 0] = 1/n`` and
    ``W[j, j] = 1 - 1/n``.  Symmetric, doubly stochastic; the centre has degree n - 1.
    For n >= 3 the spectral gap is ``1/n`` (leaf-difference vectors have eigenvalue
    ``1 - 1/n``).  n = 1 is the identity.

    >>> StarGraph(4).weights(2, 0)
    (0.75, {0: 0.25})
    """
    n = check_n(n)
    leaves = np.arange(1, n, dtype=np.int64)
    zeros = np.zeros_like(leaves)
    w = np.full(2 * (n - 1), 1.0 / n)
    rows, cols = np.concatenate([zeros, leaves]), np.concatenate([leaves, zeros])
    rnd = SparseRound.from_coo(n, rows, cols, w)
    return make("StarGraph", {"n": n}, [rnd], n)


def FullyConnectedGraph(n: int) -> Topology:
    """Complete graph with uniform weights: ``W = J / n`` (one round of exact averaging).

    Degree n - 1, spectral gap 1.  Dense by nature: n^2 stored weights.

    >>> FullyConnectedGraph(3).is_finite_time_exact()
    True
    """
    n = check_n(n)
    rnd = SparseRound.from_dense(np.full((n, n), 1.0 / n))
    return make("FullyConnectedGraph", {"n": n}, [rnd], n)
