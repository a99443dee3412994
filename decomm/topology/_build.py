"""Small vectorised building blocks shared by the constructors (internal)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ._sparse import SparseRound
from .core import Topology, _check_int

_INT = np.int64

#: An off-diagonal COO triple (rows, cols, vals) for one round.
Coo = tuple[np.ndarray, np.ndarray, np.ndarray]


def check_n(n: Any) -> int:
    """Validate the number of nodes (an int >= 1)."""
    return _check_int(n, "n", 1)


def check_k(k: Any) -> int:
    """Validate the maximum degree k (an int >= 1)."""
    return _check_int(k, "k", 1)


def check_seed(seed: Any) -> int:
    """Validate a seed (an int >= 0)."""
    return _check_int(seed, "seed", 0)


def empty_coo() -> Coo:
    return (np.zeros(0, _INT), np.zeros(0, _INT), np.zeros(0))


def concat_coo(parts: Iterable[Coo]) -> Coo:
    parts = list(parts)
    if not parts:
        return empty_coo()
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            np.concatenate([p[2] for p in parts]))


def circulant(n: int, offsets: Sequence[int], weights: Sequence[float],
              self_weight: float | None = None) -> SparseRound:
    """Round where node i receives from ``(i - o) mod n`` with weight w, for each (o, w).

    Equivalently node i sends to ``i + o``.  Offsets that are 0 mod n are skipped;
    repeated offsets add up.  The diagonal is ``self_weight`` when given (it must make
    the rows sum to 1), else 1 - (sum of the weights kept).
    """
    acc: dict[int, float] = {}
    for o, w in zip(offsets, weights):
        if o % n:
            acc[o % n] = acc.get(o % n, 0.0) + float(w)
    if not acc:
        return SparseRound.identity(n)
    offs = np.array(list(acc), dtype=_INT)
    ws = np.array(list(acc.values()))
    diag = 1.0 - ws.sum() if self_weight is None else float(self_weight)
    if diag == 0.0 or np.any(ws == 0.0):  # rare: entries to drop, take the general path
        i = np.repeat(np.arange(n, dtype=_INT), offs.size)
        return SparseRound.from_coo(n, i, (i - np.tile(offs, n)) % n, np.tile(ws, n),
                                    diag=np.full(n, diag))
    # direct CSR: row i holds columns (i - o) mod n and i, sorted per row
    i = np.arange(n, dtype=_INT)[:, None]
    cols = (i - np.concatenate([[0], offs])[None, :]) % n
    vals = np.broadcast_to(np.concatenate([[diag], ws])[None, :], cols.shape)
    order = np.argsort(cols, axis=1, kind="stable")
    cols = np.take_along_axis(cols, order, axis=1)
    vals = np.take_along_axis(vals, order, axis=1)
    width = offs.size + 1
    return SparseRound(n, np.arange(n + 1, dtype=_INT) * width, cols.ravel(), vals.ravel())


def stride_cliques(start: int, length: int, stride: int, f: int, step: int = 1) -> Coo:
    """Uniform cliques of size f along one mixed-radix digit (one hyper-hypercube round).

    Local indices u = 0..length-1 map to node ``start + step * u``; ``length`` must be a
    multiple of ``stride * f``.  The clique of u is ``{b + stride * d : d = 0..f-1}``
    with ``b = u - stride * ((u // stride) mod f)``; every member, u included, gets
    weight 1/f (the self entry is returned too).
    """
    if f <= 1 or length == 0:
        return empty_coo()
    u = np.arange(length, dtype=_INT)
    digit = (u // stride) % f
    base = u - stride * digit
    d = np.arange(f, dtype=_INT)
    members = base[:, None] + stride * d[None, :]
    rows = np.broadcast_to(u[:, None], members.shape).ravel()
    cols = members.ravel()
    return (start + step * rows, start + step * cols, np.full(rows.size, 1.0 / f))


def block_cliques(nodes: np.ndarray, size: int) -> Coo:
    """Cut ``nodes`` (in the given order) into consecutive blocks of ``size`` (the last
    one possibly smaller) and make each block a uniform clique (weight 1/|block|, self
    included; a final singleton gets no entries and so keeps weight 1)."""
    m = nodes.size
    if m < 2 or size < 2:
        return empty_coo()
    pos = np.arange(m, dtype=_INT)
    base = (pos // size) * size
    bsize = np.minimum(size, m - base)
    d = np.arange(size, dtype=_INT)
    members = base[:, None] + d[None, :]
    mask = d[None, :] < bsize[:, None]  # self entries included
    rows = np.broadcast_to(pos[:, None], members.shape)[mask]
    cols = members[mask]
    w = 1.0 / np.broadcast_to(bsize[:, None], members.shape)[mask]
    return nodes[rows], nodes[cols], w


def make(kind: str, params: dict[str, Any], rounds: list[SparseRound], n: int) -> Topology:
    """Wrap a list of rounds into a named Topology."""
    name = kind + "(" + ", ".join(f"{k}={v}" for k, v in params.items()) + ")"
    return Topology(n, rounds, name=name, kind=kind, params=params)
