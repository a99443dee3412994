"""Exponential-type topologies: static exponential, one-peer exponential, hypercube.

Direction convention: node i **sends to** ``(i + 2^j) mod n`` and therefore
**receives from** ``(i - 2^j) mod n``, i.e. ``W[i, (i - 2^j) mod n] != 0`` (rows
receive, ``x <- W x``, as everywhere in decomm; see ``docs/concepts.rst``).  Round t of
the one-peer graph links i -> i + 2^t.

References: Ying, Yuan, Chen, Hu, Pan & Yin, "Exponential graph is provably
efficient for decentralized deep training", NeurIPS 2021; Shi, Li, Johansson &
Johansson, "Finite-time convergent gossiping", IEEE/ACM ToN 2016 (hypercube).
"""

from __future__ import annotations

import numpy as np

from ._build import check_n, circulant, make
from ._sparse import SparseRound
from .core import Topology

__all__ = ["ExponentialGraph", "HypercubeGraph", "OnePeerExponentialGraph", "ceil_log2"]


def ceil_log2(n: int) -> int:
    """``ceil(log2 n)`` computed exactly with integers (0 for n = 1).

    >>> [ceil_log2(n) for n in (1, 2, 3, 4, 5, 1024, 1025)]
    [0, 1, 2, 2, 3, 10, 11]
    """
    return (n - 1).bit_length()


def ExponentialGraph(n: int) -> Topology:
    """Static exponential graph (Ying et al. 2021).

    Node i receives from ``(i - 2^j) mod n`` for ``j = 0 .. ceil(log2 n) - 1`` (all
    powers of two below n, which are distinct mod n) with weight
    ``1 / (ceil(log2 n) + 1)``; the self weight is the same.  The matrix is circulant,
    hence doubly stochastic, and directed (not symmetric) for n >= 3.
    In- and out-degree are ``ceil(log2 n)``.

    >>> ExponentialGraph(8).weights(0, 0)
    (0.25, {4: 0.25, 6: 0.25, 7: 0.25})
    """
    n = check_n(n)
    tau = ceil_log2(n)
    offs = [1 << j for j in range(tau)]
    rnd = circulant(n, offs, [1.0 / (tau + 1)] * tau, self_weight=1.0 / (tau + 1))
    return make("ExponentialGraph", {"n": n}, [rnd], n)


def OnePeerExponentialGraph(n: int) -> Topology:
    """One-peer exponential graph (Ying et al. 2021): ``ceil(log2 n)`` rounds.

    Round t (t = 0 .. ceil(log2 n) - 1): node i sends to ``(i + 2^t) mod n`` and
    receives from ``(i - 2^t) mod n``; ``W[i, i] = W[i, (i - 2^t) mod n] = 1/2``.
    Doubly stochastic, in/out-degree 1.  The cycle averages exactly **iff n is a
    power of 2**.  n = 1 is a single identity round.

    >>> t = OnePeerExponentialGraph(8)
    >>> t.rounds, t.in_neighbors(0, 2), t.out_neighbors(0, 2), t.is_finite_time_exact()
    (3, [4], [4], True)
    >>> OnePeerExponentialGraph(6).is_finite_time_exact()
    False
    """
    n = check_n(n)
    tau = max(ceil_log2(n), 1)
    rounds = [circulant(n, [1 << t], [0.5], self_weight=0.5) for t in range(tau)]
    return make("OnePeerExponentialGraph", {"n": n}, rounds, n)


def HypercubeGraph(n: int) -> Topology:
    """One-peer hypercube (Shi et al. 2016): ``log2 n`` rounds, n a power of 2.

    Round t pairs node i with ``i XOR 2^t``, weights 1/2: after round t every
    sub-cube of dimension t + 1 holds its average, so the cycle is exact.  Symmetric,
    degree 1.  n = 1 is a single identity round; other n raise ValueError.

    >>> HypercubeGraph(8).in_neighbors(5, 1)
    [7]
    """
    n = check_n(n)
    if n & (n - 1):
        raise ValueError(f"HypercubeGraph needs n to be a power of 2, got n={n} "
                         "(use BaseGraph(n, 1) for any n)")
    i = np.arange(n, dtype=np.int64)
    dims = max(ceil_log2(n), 1)
    rounds = [SparseRound.from_coo(n, i, i ^ (1 << t), np.full(n, 0.5)) if n > 1
              else SparseRound.identity(n) for t in range(dims)]
    return make("HypercubeGraph", {"n": n}, rounds, n)
