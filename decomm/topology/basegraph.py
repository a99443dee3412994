"""Base-(k+1) graphs: finite-time exact averaging for every n with at most k peers.

Takezawa, Sato, Niwa, Yamada, "Beyond Exponential Graph: Communication-Efficient
Topologies for Decentralized Learning via Finite-time Convergence", NeurIPS 2023
(Sec. 4, Alg. 1-3).  The constructions, why they are exact, and where decomm departs
from the authors' reference code are written out in the documentation page "The
Base-(k+1) construction" (``docs/basegraph.rst``); the reference code's bugs are fixed:

* float64 weights (the product of one cycle is J/n to ~1e-15, not 1e-8);
* base-(k+1) digits by exact integer arithmetic (no ``int(math.log(243, 3)) == 4``:
  no degree k+1 rounds, no crash for k = 2 and n in 325..485);
* a non-smooth n passed to the hyper-hypercube raises ValueError instead of
  silently returning a sequence that does not average;
* the hyper-hypercube uses a *minimum* number of factors (the paper's requirement);
  the reference code's greedy largest-first factorisation is kept whenever it is
  already minimal (always for k <= 6 and n <= 5000), so lengths match the paper.

All matrices are symmetric and doubly stochastic; every node talks to at most k
peers per round; ``BaseGraph`` is never longer than ``SimpleBaseGraph`` and both
satisfy the paper's Theorem 1, ``length <= 2 log_{k+1}(n) + 2``.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from ._build import (
    Coo,
    block_cliques,
    check_k,
    check_n,
    concat_coo,
    empty_coo,
    make,
    stride_cliques,
)
from ._sparse import SparseRound
from .core import Topology

__all__ = [
    "BaseGraph",
    "HyperHypercube",
    "SimpleBaseGraph",
    "base_digits",
    "base_graph_length",
    "hyper_hypercube_factors",
    "simple_base_length",
    "smooth_part",
]


# ----------------------------------------------------------------------------- arithmetic
def base_digits(n: int, b: int) -> list[tuple[int, int]]:
    """Non-zero base-b digits of n as ``[(a_0, p_0), (a_1, p_1), ...]`` with
    ``n = sum a_l b^{p_l}`` and ``p_0 > p_1 > ...`` (exact integer arithmetic).

    >>> base_digits(25, 3)          # 25 = 2*9 + 2*3 + 1
    [(2, 2), (2, 1), (1, 0)]
    >>> base_digits(243 + 1, 3)     # the case the reference code gets wrong
    [(1, 5), (1, 0)]
    """
    out = []
    p = 0
    while n:
        n, a = divmod(n, b)
        if a:
            out.append((a, p))
        p += 1
    return out[::-1]


def smooth_part(n: int, k: int) -> int:
    """The (k+1)-smooth part of n: the product of its prime powers with prime <= k+1.

    >>> smooth_part(10, 1), smooth_part(10, 2), smooth_part(10, 4), smooth_part(7, 5)
    (2, 2, 10, 1)
    """
    m = n
    for f in range(2, min(k + 1, n) + 1):
        while m % f == 0:
            m //= f
    return n // m


def _smallest_prime_factor(m: int) -> int:
    f = 2
    while f * f <= m:
        if m % f == 0:
            return f
        f += 1
    return m


def _greedy_factors(n: int, k: int) -> list[int]:
    """The reference code's factorisation: divide by k+1, k, ..., 2 as often as possible."""
    out = []
    for f in range(min(k + 1, n), 1, -1):
        while n % f == 0:
            n //= f
            out.append(f)
    return out


@lru_cache(maxsize=4096)
def _min_count(m: int, k: int) -> int:
    """Fewest factors in [2, k+1] whose product is m (m must be (k+1)-smooth)."""
    if m == 1:
        return 0
    return 1 + min(_min_count(m // f, k) for f in range(2, min(k + 1, m) + 1) if m % f == 0)


def hyper_hypercube_factors(n: int, k: int) -> list[int]:
    """Factors ``f_1 <= ... <= f_L`` (each in 2..k+1, product n) of the k-peer
    hyper-hypercube, with L as small as possible.

    The reference code's greedy rule (largest factor first) is used when it is
    minimal; otherwise (first case: k = 7, n = 216 = 6*6*6, greedy 3*3*3*8) a minimal
    factorisation is found by dynamic programming over the divisors of n, taking the
    largest admissible factor first.  Raises ValueError naming a prime factor > k+1.

    >>> hyper_hypercube_factors(12, 3), hyper_hypercube_factors(256, 2)
    ([3, 4], [2, 2, 2, 2, 2, 2, 2, 2])
    >>> hyper_hypercube_factors(216, 7)
    [6, 6, 6]
    """
    n, k = check_n(n), check_k(k)
    rest = n // smooth_part(n, k)
    if rest != 1:
        p = _smallest_prime_factor(rest)
        raise ValueError(
            f"HyperHypercube(n={n}, k={k}): n has the prime factor {p} > k+1 = {k + 1}; "
            "the k-peer hyper-hypercube needs every prime factor of n to be <= k+1 "
            "(use BaseGraph(n, k) for any n)")
    greedy = _greedy_factors(n, k)
    best = _min_count(n, k)
    if len(greedy) == best:
        return sorted(greedy)
    out, m = [], n
    while m > 1:
        f = next(f for f in range(min(k + 1, m), 1, -1)
                 if m % f == 0 and _min_count(m // f, k) == _min_count(m, k) - 1)
        out.append(f)
        m //= f
    return sorted(out)


def _hh_coo(factors: list[int], start: int, length: int, step: int = 1) -> list[Coo]:
    """Rounds of the hyper-hypercube with these factors on ``start + step * u``,
    u < length (length a multiple of prod(factors): independent copies are tiled)."""
    out, stride = [], 1
    for f in factors:
        out.append(stride_cliques(start, length, stride, f, step))
        stride *= f
    return out or [empty_coo()]


# ----------------------------------------------------------------------------- lengths
def simple_base_length(n: int, k: int) -> int:
    """Length of SimpleBaseGraph(n, k): the hyper-hypercube length when n is
    (k+1)-smooth, else ``2 p_0 + 1 + [a_0 > 1]`` for the leading base-(k+1) digit
    ``a_0 (k+1)^{p_0}`` of n.

    >>> [simple_base_length(n, 1) for n in (5, 10, 16, 25, 50)]
    [5, 7, 4, 9, 11]
    """
    n, k = check_n(n), check_k(k)
    if smooth_part(n, k) == n:
        return max(len(hyper_hypercube_factors(n, k)), 1)
    a0, p0 = base_digits(n, k + 1)[0]
    return 2 * p0 + 1 + (a0 > 1)


def _composite_length(n: int, k: int) -> tuple[int, int, int]:
    p = smooth_part(n, k)
    q = n // p
    return simple_base_length(q, k) + max(len(hyper_hypercube_factors(p, k)), 1), p, q


def base_graph_length(n: int, k: int) -> int:
    """Length of BaseGraph(n, k) = min(Simple(n), Simple(q) + HH(p)), p the smooth part.

    >>> [base_graph_length(n, 1) for n in (5, 10, 16, 25, 50, 1000)]
    [5, 6, 4, 9, 10, 16]
    """
    return min(simple_base_length(n, k), _composite_length(n, k)[0])


# ----------------------------------------------------------------------------- constructions
def _simple_base_coo(n: int, k: int) -> list[Coo]:
    """Rounds of the Simple Base-(k+1) graph on nodes 0..n-1 (Alg. 2; docs/basegraph.rst §2)."""
    if smooth_part(n, k) == n:
        return _hh_coo(hyper_hypercube_factors(n, k), 0, n)
    b = k + 1
    digits = base_digits(n, b)
    nchunks = len(digits)
    sizes = [a * b ** p for a, p in digits]
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64).tolist()
    chunk_fac = [hyper_hypercube_factors(s, k) for s in sizes]
    # phase C: HH(b^p) on every sub-chunk (p >= 1), or HH(a) on the chunk (p == 0)
    sub_fac = [hyper_hypercube_factors(b ** p if p else a, k) for a, p in digits]
    p0 = digits[0][1]
    t_a = len(chunk_fac[0])  # phase A length, = p0 + [a0 > 1]
    length = t_a + 1 + p0

    def hh_round(factors: list[int], idx: int, c: int) -> Coo:
        # round idx (cyclic) of the hyper-hypercube with these factors on chunk c
        if not factors:
            return empty_coo()
        idx %= len(factors)
        stride = int(np.prod(factors[:idx], dtype=np.int64))
        return stride_cliques(starts[c], sizes[c], stride, factors[idx])

    def absorb(r: int) -> list[Coo]:
        a_r, p_r = digits[r]
        s = b ** p_r
        later = np.concatenate([np.arange(starts[c], starts[c] + sizes[c], dtype=np.int64)
                                for c in range(nchunks - 1, r, -1)])
        c = later.size
        partners = (starts[r] + np.arange(a_r, dtype=np.int64)[:, None] * s
                    + (s - 1 - np.arange(c, dtype=np.int64))[None, :])
        src = np.broadcast_to(later[None, :], partners.shape).ravel()
        dst = partners.ravel()
        w = np.full(2 * dst.size, sizes[r] / ((sizes[r] + c) * a_r))
        unmatched = (starts[r] + np.arange(a_r, dtype=np.int64)[:, None] * s
                     + np.arange(s - c, dtype=np.int64)[None, :]).ravel()
        return [(np.concatenate([src, dst]), np.concatenate([dst, src]), w),
                block_cliques(unmatched, k + 1)]

    rounds: list[Coo] = []
    for m in range(length):
        parts: list[Coo] = []
        if m < t_a:  # phase A: every chunk averages internally
            parts = [hh_round(chunk_fac[c], m, c) for c in range(nchunks)]
        else:
            r = m - t_a
            for c in range(nchunks):
                c_start = t_a + c + 1 if c <= nchunks - 2 else t_a + nchunks - 1
                if m >= c_start:  # phase C of chunk c
                    parts.append(hh_round(sub_fac[c], m - c_start, c))
            if r <= nchunks - 2:  # phase B: absorb round r
                parts.extend(absorb(r))
        rounds.append(concat_coo(parts))
    return rounds


def _topology(kind: str, n: int, k: int, coos: list[Coo], details: dict) -> Topology:
    rounds = [SparseRound.from_coo(n, *c) for c in coos]
    topo = make(kind, {"n": n, "k": k}, rounds, n)
    topo.details.update(details)
    return topo


def HyperHypercube(n: int, k: int) -> Topology:
    """k-peer hyper-hypercube graph (Takezawa et al. 2023, Sec. 4.1, Alg. 1).

    Needs every prime factor of n to be <= k+1 (else ValueError naming the factor).
    With ``n = f_1 f_2 ... f_L`` (:func:`hyper_hypercube_factors`, each f <= k+1),
    round t writes node ids in mixed radix ``(f_1, ..., f_L)`` and makes uniform
    cliques (weight ``1/f_t``, self included) of the ``f_t`` nodes that differ only in
    digit t (stride ``f_1 ... f_{t-1}``).  After round t every group agreeing on digits
    > t holds its average, so the L-round cycle is exact.  Degree ``f_t - 1 <= k``.
    n = 1 is one identity round.

    >>> t = HyperHypercube(12, 3)           # factors [3, 4]
    >>> t.rounds, t.in_neighbors(0, 0), t.in_neighbors(0, 1), t.is_finite_time_exact()
    (2, [1, 2], [3, 6, 9], True)
    """
    n, k = check_n(n), check_k(k)
    fac = hyper_hypercube_factors(n, k)
    return _topology("HyperHypercube", n, k, _hh_coo(fac, 0, n), {"factors": fac})


def SimpleBaseGraph(n: int, k: int) -> Topology:
    """Simple Base-(k+1) graph (Takezawa et al. 2023, Sec. 4.2, Alg. 2): exact for any n.

    If n is (k+1)-smooth this is :func:`HyperHypercube`. Otherwise write
    ``n = sum_l a_l (k+1)^{p_l}`` (non-zero base-(k+1) digits, ``p_0 > p_1 > ...``)
    and split the nodes into consecutive chunks ``V_l`` of size ``a_l (k+1)^{p_l}``,
    each cut into ``a_l`` sub-chunks of ``(k+1)^{p_l}`` nodes:

    A. every chunk averages internally with its hyper-hypercube
       (``T = p_0 + [a_0 > 1]`` rounds; shorter ones repeat);
    B. absorb round r (round T + r): every node of ``V_{>r}`` links to one node of
       each sub-chunk of ``V_r`` with weight ``|V_r| / (S_r a_r)``,
       ``S_r = |V_r| + |V_{>r}|``; afterwards every sub-chunk of ``V_r`` sums to its
       size times the global mean, and so does ``V_{>r}``; unmatched ``V_r`` nodes form
       (k+1)-cliques (harmless, they hold equal values);
    C. from round T + r + 1, chunk ``V_r`` runs the hyper-hypercube on each sub-chunk.

    Length ``2 p_0 + 1 + [a_0 > 1]``; at most k peers per node and round.

    >>> t = SimpleBaseGraph(5, 1)       # 5 = 4 + 1
    >>> t.rounds, t.weights(4, 2), t.is_finite_time_exact()
    (5, (0.19999999999999996, {3: 0.8}), True)
    """
    n, k = check_n(n), check_k(k)
    return _topology("SimpleBaseGraph", n, k, _simple_base_coo(n, k),
                     {"digits": base_digits(n, k + 1), "smooth": smooth_part(n, k) == n})


def BaseGraph(n: int, k: int) -> Topology:
    """Base-(k+1) graph (Takezawa et al. 2023, Sec. 4.3, Alg. 3): exact, <= k peers, any n.

    Let p be the (k+1)-smooth part of n and ``q = n / p``.  The *composite* sequence
    runs ``SimpleBaseGraph(q, k)`` on each of the p consecutive blocks
    ``G_i = {iq, ..., iq + q - 1}`` in parallel, then ``HyperHypercube(p, k)`` on each
    strided set ``H_j = {j, j + q, ..., j + (p-1) q}``: after the first phase every
    block holds its own mean, and ``H_j`` takes one node from each block.  The
    result is the composite sequence, unless ``SimpleBaseGraph(n, k)`` is strictly
    shorter, in which case that is returned (as in the reference code; ties go to the
    composite).  Hence ``len(BaseGraph) <= len(SimpleBaseGraph)`` always.

    >>> t = BaseGraph(6, 1)              # SB(3) on {0,1,2}, {3,4,5}, then pairs {j, j+3}
    >>> t.rounds, SimpleBaseGraph(6, 1).rounds, t.in_neighbors(1, 3), t.max_degree()
    (4, 5, [4], 1)
    >>> [BaseGraph(25, k).rounds for k in (1, 2, 3, 4)]
    [9, 6, 5, 2]
    """
    n, k = check_n(n), check_k(k)
    len_simple = simple_base_length(n, k)
    len_comp, p, q = _composite_length(n, k)
    if len_simple < len_comp:
        return _topology("BaseGraph", n, k, _simple_base_coo(n, k),
                         {"variant": "simple", "p": p, "q": q})
    offsets = np.arange(p, dtype=np.int64)[:, None] * q
    coos: list[Coo] = []
    for rows, cols, vals in _simple_base_coo(q, k):  # SB(q) tiled over the p blocks
        coos.append(((offsets + rows[None, :]).ravel(), (offsets + cols[None, :]).ravel(),
                     np.tile(vals, p)))
    fac = hyper_hypercube_factors(p, k)
    stride = 1
    for f in fac:  # HH(p) on every strided set H_j (stride of H_j is q)
        coos.append(stride_cliques(0, n, stride * q, f))
        stride *= f
    if not fac:
        coos.append(empty_coo())
    return _topology("BaseGraph", n, k, coos,
                     {"variant": "composite", "p": p, "q": q, "hh_factors": fac})
