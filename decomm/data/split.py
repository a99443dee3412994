"""Heterogeneous (non-IID) splits of a labelled dataset across ranks.

:func:`dirichlet_split` is the label-skew model used by the Base-(k+1) paper and
most of the decentralized-learning literature: a concentration parameter ``alpha``
interpolates between "every rank sees one class" (``alpha -> 0``) and "every rank
sees the global label distribution" (``alpha -> inf``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "dirichlet_split",
    "iid_split",
    "label_histograms",
    "split_summary",
]


def _check_labels(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise ValueError("labels must be integers (class ids)")
        arr = arr.astype(np.int64)
    return arr


def _part_sizes(n: int, n_parts: int, rng: np.random.Generator) -> np.ndarray:
    """Sizes differing by at most one; the parts that get the extra sample are random."""
    sizes = np.full(n_parts, n // n_parts, dtype=np.int64)
    sizes[rng.permutation(n_parts)[: n % n_parts]] += 1
    return sizes


def _round_shares(weights: np.ndarray, total: int, cap: np.ndarray) -> np.ndarray:
    """Integer shares of ``total`` close to ``weights * total``, each at most ``cap``.

    Largest-remainder rounding: floors first, then one more sample to each class in
    order of decreasing remainder; whatever the caps still leave over goes to the
    other classes of positive weight with room, largest weight first. The result
    can fall short of ``total`` only when those classes are full.
    """
    exact = weights * total
    draw = np.minimum(np.floor(exact).astype(np.int64), cap)
    short = total - int(draw.sum())
    for c in np.argsort(-(exact - draw), kind="stable"):
        if short <= 0:
            break
        if draw[c] < cap[c] and weights[c] > 0:
            draw[c] += 1
            short -= 1
    for c in np.argsort(-weights, kind="stable"):
        if short <= 0 or weights[c] <= 0:
            break
        extra = min(short, int(cap[c] - draw[c]))
        draw[c] += extra
        short -= extra
    return draw


def _fresh_weights(
    rng: np.random.Generator, alpha: float, base: np.ndarray, avail: np.ndarray
) -> np.ndarray:
    """A new Dirichlet(alpha * base) draw over the classes that still have samples."""
    live = avail > 0
    w = np.zeros(avail.size)
    if math.isinf(alpha):
        w[live] = base[live]
    else:
        w[live] = rng.dirichlet(alpha * base[live])
    if not (np.isfinite(w).all() and w.sum() > 0):
        w = np.zeros(avail.size)
        w[int(np.argmax(avail))] = 1.0
    return w


def dirichlet_split(
    labels: Sequence[int] | np.ndarray,
    n_parts: int,
    alpha: float,
    seed: int = 0,
) -> list[np.ndarray]:
    """Split sample indices into ``n_parts`` disjoint shards with Dirichlet label skew.

    The parts are filled one after another, in random order. Part ``i`` draws its
    label distribution ``q_i ~ Dirichlet(alpha * C * r_i)``, where ``C`` is the
    number of classes and ``r_i`` the class frequencies of the samples not yet
    assigned (``r_1`` is the global distribution; for a balanced dataset this is
    ``Dirichlet(alpha, ..., alpha)``, the usual label-skew model), then takes its
    share of samples class by class according to ``q_i``. When a class runs out,
    the part's remaining demand goes to its other classes in proportion to ``q_i``;
    only if all of those are exhausted is a fresh ``q_i`` drawn over the classes
    that still have samples (so a small ``alpha`` stays concentrated).

    Guarantees:

    * the shards are disjoint and together cover every index exactly once;
    * shard sizes differ by at most one (so every shard is non-empty whenever
      ``len(labels) >= n_parts``): equal work per rank, as in the paper's setup;
    * ``alpha -> 0``: each shard is (almost) a single class; a shard spans two
      classes only where a class is used up part-way through it;
    * ``alpha = 10``: every shard's label histogram is close to the global one;
      ``alpha = inf``: a stratified IID split.

    Args:
        labels: class id of every sample (any integers; need not be 0..C-1).
        n_parts: number of shards (ranks), >= 1.
        alpha: Dirichlet concentration, > 0 (``math.inf`` for IID).
        seed: seed of the generator; the same inputs always give the same split,
            so every rank can compute the split itself and take ``shards[rank]``.

    Returns:
        ``n_parts`` sorted ``int64`` index arrays.
    """
    y = _check_labels(labels)
    if not isinstance(n_parts, (int, np.integer)) or n_parts < 1:
        raise ValueError(f"n_parts must be a positive integer, got {n_parts!r}")
    if not (alpha > 0):  # also rejects NaN
        raise ValueError(f"alpha must be > 0 (use math.inf for an IID split), got {alpha!r}")
    n = y.size
    rng = np.random.default_rng(seed)
    if n == 0:
        return [np.empty(0, dtype=np.int64) for _ in range(n_parts)]

    classes, inverse = np.unique(y, return_inverse=True)
    n_classes = classes.size
    pools = [rng.permutation(np.flatnonzero(inverse == c)) for c in range(n_classes)]
    remaining = np.array([len(p) for p in pools], dtype=np.int64)
    used = np.zeros(n_classes, dtype=np.int64)

    sizes = _part_sizes(n, n_parts, rng)
    shards: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * n_parts
    for i in rng.permutation(n_parts):  # random order: no part is always served last
        need = int(sizes[i])
        take = np.zeros(n_classes, dtype=np.int64)
        # this part's label distribution, centred on what is still unassigned
        q = _fresh_weights(rng, alpha, n_classes * remaining / remaining.sum(), remaining)
        while need > 0:
            avail = remaining - take
            weights = q * (avail > 0)
            if weights.sum() <= 0:  # the classes this part drew are used up: draw again
                q = _fresh_weights(rng, alpha, n_classes * avail / avail.sum(), avail)
                weights = q
            weights = weights / weights.sum()
            draw = _round_shares(weights, need, avail)  # may fall short: loop again
            take += draw
            need -= int(draw.sum())
        parts = [pools[c][used[c] : used[c] + take[c]] for c in range(n_classes)]
        used += take
        remaining -= take
        shards[i] = np.sort(np.concatenate(parts)).astype(np.int64)
    return shards


def iid_split(n_samples: int, n_parts: int, seed: int = 0) -> list[np.ndarray]:
    """A uniformly random split of ``range(n_samples)`` into near-equal sorted shards."""
    if n_parts < 1:
        raise ValueError(f"n_parts must be >= 1, got {n_parts}")
    perm = np.random.default_rng(seed).permutation(n_samples)
    return [np.sort(s).astype(np.int64) for s in np.array_split(perm, n_parts)]


def label_histograms(
    labels: Sequence[int] | np.ndarray, shards: Sequence[np.ndarray], num_classes: int | None = None
) -> np.ndarray:
    """Count matrix ``H[i, c]`` = number of samples of class ``c`` in shard ``i``.

    Labels must be ``0..num_classes-1`` (``num_classes`` defaults to ``max + 1``).
    """
    y = _check_labels(labels)
    k = int(y.max()) + 1 if num_classes is None else num_classes
    return np.stack([np.bincount(y[s], minlength=k) for s in shards]) if len(shards) else \
        np.zeros((0, k), dtype=np.int64)


def split_summary(
    labels: Sequence[int] | np.ndarray, shards: Sequence[np.ndarray]
) -> dict[str, float]:
    """Scalar heterogeneity measures of a split (for logging and tests).

    Returns a dict with:

    * ``tv``: mean total-variation distance between a shard's label distribution and
      the global one (0 = IID; near 1 - 1/C for one class per shard);
    * ``classes``: mean effective number of classes per shard, ``exp(entropy)``
      (1 = a single class, C = uniform);
    * ``dominant``: mean share of the most frequent class in a shard;
    * ``min_size`` / ``max_size``: smallest and largest shard.
    """
    y = _check_labels(labels)
    _, y = np.unique(y, return_inverse=True)
    hist = label_histograms(y, shards).astype(np.float64)
    sizes = hist.sum(axis=1)
    nonempty = sizes > 0
    p = hist[nonempty] / sizes[nonempty, None]
    glob = np.bincount(y).astype(np.float64) / y.size
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    return {
        "tv": float(0.5 * np.abs(p - glob).sum(axis=1).mean()),
        "classes": float(np.exp(ent).mean()),
        "dominant": float(p.max(axis=1).mean()),
        "min_size": float(sizes.min()),
        "max_size": float(sizes.max()),
    }
