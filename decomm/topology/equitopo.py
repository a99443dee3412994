"""EquiTopo graphs: EquiDyn (random one-peer rounds) and EquiStatic.

Song, Li, Jin, Shi, Yan, Yin & Yuan, "Communication-efficient topologies for
decentralized learning with O(1) consensus rate", NeurIPS 2022.

Basis matrices (u = 1 .. n-1): ``A(u)[i, j] = (n-1)/n`` if ``i = (j + u) mod n``,
``1/n`` if ``i = j``, else 0.  In decomm's row convention node i receives from
``(i - u) mod n`` and sends to ``(i + u) mod n``.  Each A(u) is doubly stochastic.
"""

from __future__ import annotations

import numpy as np

from ._build import check_n, check_seed, circulant, make
from ._sparse import SparseRound
from .core import Topology, _check_int

__all__ = ["EquiDyn", "EquiStatic", "equidyn_mean_square_rate"]


def _check_eta(eta: float) -> float:
    try:
        eta = float(eta)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"eta must be a number in (0, 1], got {eta!r}") from exc
    if not 0.0 < eta <= 1.0:
        raise ValueError(f"eta must be in (0, 1], got {eta}")
    return eta


def _one_peer_matching(n: int, u: int, shift: int, w: float) -> SparseRound:
    """Undirected one-peer round along label difference u: each cycle
    ``c, c+u, c+2u, ...`` of the map i -> i+u (gcd(n, u) cycles of length n/gcd) is cut
    into consecutive pairs starting at position ``shift``; paired nodes exchange with
    weight w (an odd cycle leaves one node idle)."""
    g = int(np.gcd(n, u))
    length = n // g
    npairs = length // 2
    first = (shift + 2 * np.arange(npairs, dtype=np.int64)) % length
    cyc = np.arange(g, dtype=np.int64)[:, None]
    a = ((cyc + u * first[None, :]) % n).ravel()
    b = ((cyc + u * ((first + 1) % length)[None, :]) % n).ravel()
    partner = np.full(n, -1, dtype=np.int64)
    partner[a], partner[b] = b, a
    # direct CSR: paired rows hold {i, partner} sorted, idle rows hold {i}
    paired = partner >= 0
    width = np.where(paired, 2, 1)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(width, out=indptr[1:])
    i = np.arange(n, dtype=np.int64)
    lo = np.where(paired, np.minimum(i, partner), i)
    hi = np.maximum(i, partner)
    w_lo = np.where(paired & (lo != i), w, np.where(paired, 1.0 - w, 1.0))
    w_hi = np.where(hi == i, 1.0 - w, w)
    cols = np.empty(indptr[-1], dtype=np.int64)
    vals = np.empty(indptr[-1])
    cols[indptr[:-1]], vals[indptr[:-1]] = lo, w_lo
    second = indptr[:-1][paired] + 1
    cols[second], vals[second] = hi[paired], w_hi[paired]
    return SparseRound(n, indptr, cols, vals)


def EquiDyn(n: int, eta: float = 0.5, undirected: bool = False, seed: int = 0) -> Topology:
    """One-peer EquiDyn (Song et al. 2022): a seeded random family, ``rounds is None``.

    Round t draws ``u`` uniformly from ``1 .. n-1`` with ``np.random.default_rng([seed, t])``
    (so every rank gets the same round in O(n), without communication, for any t) and
    uses

    * directed (OD-EquiDyn, default): ``W = (1 - eta) I + eta A(u)``: node i receives
      from ``(i - u) mod n`` with weight ``eta (n-1)/n`` and keeps
      ``1 - eta (n-1)/n``; one in- and one out-neighbour; doubly stochastic.
    * ``undirected=True`` (our one-peer undirected realisation, OU-EquiDyn-like):
      the nodes are paired along label difference u (each cycle of ``i -> i + u`` is cut
      into consecutive pairs from a random start drawn from the same generator) and a
      pair exchanges with the same weight ``eta (n-1)/n``; symmetric, degree <= 1
      (a node of an odd cycle idles).

    Song et al. bound the *mean-square* consensus rate of the directed family: with
    ``rho^2 = ||E[(W - J/n)^T (W - J/n)]||_2`` (the expectation over the random u),
    ``E||W x - xbar||^2 <= rho^2 ||x - xbar||^2`` for every x, and ``rho <= sqrt(2)/2``
    for eta = 1/2, whatever n: the rate does not degrade with n.  Exactly,
    ``rho^2 = (1 - eta)^2 + eta^2 (1 - 2/n)`` (``1/2 - 1/(2n)`` for eta = 1/2).  The
    bound is not on ``E||W - J/n||_2``, which is close to 1: a single round contracts
    some directions hardly at all (n = 16, eta = 1/2: ``||W(u) - J/n||_2`` is 0.981 for
    odd u and 1 for even u, whose graph is disconnected; 0.990 on average); only on
    average over u does the distance shrink.

    ``spectral_gap()`` is ``1 - rho`` computed exactly from the distribution of a round
    (see :meth:`Topology.spectral_gap`): the average over the n - 1 equally likely
    circulants (undirected: and over the uniformly drawn pairing start), not a sample.
    n = 1 gives identity rounds.

    >>> t = EquiDyn(16, seed=3)
    >>> t.rounds is None, t.in_neighbors(0, 5) == EquiDyn(16, seed=3).in_neighbors(0, 5)
    (True, True)
    >>> len(t.in_neighbors(0, 10**12)), t.weights(0, 0)[0]
    (1, 0.53125)
    """
    n, seed = check_n(n), check_seed(seed)
    eta = _check_eta(eta)
    undirected = bool(undirected)
    w = eta * (n - 1) / n

    def generate(t: int) -> SparseRound:
        if n == 1:
            return SparseRound.identity(1)
        rng = np.random.default_rng([seed, t])
        u = int(rng.integers(1, n))
        if not undirected:
            return circulant(n, [u], [w], self_weight=(1.0 - eta) + eta / n)
        shift = int(rng.integers(0, n // int(np.gcd(n, u))))
        return _one_peer_matching(n, u, shift, w)

    params = {"n": n, "eta": eta, "undirected": undirected, "seed": seed}
    name = f"EquiDyn(n={n}, eta={eta:g}{', undirected' if undirected else ''}, seed={seed})"
    return Topology(n, generator=generate, name=name, kind="EquiDyn", params=params,
                    mean_square_rate=lambda: equidyn_mean_square_rate(n, eta, undirected))


def equidyn_mean_square_rate(n: int, eta: float = 0.5, undirected: bool = False) -> float:
    r"""Exact ``rho`` with ``rho^2 = ||E[(W - J/n)^T (W - J/n)]||_2`` for :func:`EquiDyn`.

    The expectation is over one round's random draw: u uniform on ``1 .. n-1`` (and,
    undirected, the pairing start uniform on ``0 .. n/gcd(n, u) - 1``).  Every
    ``W`` is doubly stochastic, so ``(W - J/n)^T (W - J/n) = W^T W - J/n``, and
    ``E[W^T W]`` is circulant; ``rho^2`` is its largest eigenvalue off the all-ones
    vector.

    * Directed: ``W = a I + b S^u`` (``S`` the cyclic shift, ``a = 1 - b``,
      ``b = eta (n-1)/n``) gives ``W^T W = (a^2 + b^2) I + a b (S^u + S^{-u})``; the
      average of ``S^u`` over u is ``(J - I)/(n-1)``, so every eigenvalue off the
      ones vector is ``a^2 + b^2 - 2ab/(n-1) = (1 - eta)^2 + eta^2 (1 - 2/n)``.
    * Undirected: a pair exchanging with weight ``w = b`` has ``W^2 = I - 2w(1-w) L``
      with L the matching's Laplacian, so ``E[W^2] = I - 2w(1-w) E[L]``.  Along a cycle
      of ``i -> i + u`` (length ``m = n / gcd(n, u)``) a node pairs forward (with
      ``i + u``) for ``floor(m/2)`` of the m starts, and backward as often, so nodes i
      and ``i + d`` are paired with probability ``p_d = 2 floor(m_d/2) / (m_d (n-1))``.
      The eigenvalue at frequency k is
      ``1 - 2w(1-w) sum_d p_d (1 - cos(2 pi k d / n))``; ``rho^2`` is its maximum over
      ``k = 1 .. n-1`` (one FFT, O(n log n)).

    >>> round(equidyn_mean_square_rate(16) ** 2, 12) == round(0.5 - 0.5 / 16, 12)
    True
    """
    n = check_n(n)
    eta = _check_eta(eta)
    if n == 1:
        return 0.0
    b = eta * (n - 1) / n
    if not undirected:
        a = 1.0 - b
        rho2 = a * a + b * b - 2.0 * a * b / (n - 1)
    else:
        d = np.arange(1, n, dtype=np.int64)
        m = n // np.gcd(n, d)
        p = np.zeros(n)
        p[1:] = 2.0 * (m // 2) / (m * (n - 1))
        lam = 1.0 - 2.0 * b * (1.0 - b) * (p.sum() - np.fft.fft(p).real[1:])
        rho2 = float(lam.max())
    return float(np.sqrt(max(rho2, 0.0)))


def EquiStatic(n: int, m: int, undirected: bool = False, seed: int = 0) -> Topology:
    """EquiStatic (Song et al. 2022): a static sum of m random basis matrices.

    Draws m *distinct* labels ``u_1..u_m`` from ``1 .. n-1`` with
    ``np.random.default_rng(seed)`` (distinct, so the out-degree is exactly m; the
    paper samples with replacement) and uses

    * directed (D-EquiStatic): ``W = (1/m) sum_l A(u_l)``: node i receives from
      ``(i - u_l) mod n`` with weight ``(n-1)/(n m)`` each; circulant, doubly stochastic;
    * ``undirected=True`` (U-EquiStatic): ``W = (1/(2m)) sum_l (A(u_l) + A(u_l)^T)``,
      symmetric, degree <= 2m.

    Requires ``1 <= m <= n - 1`` (any m for n = 1, which gives the identity).

    >>> t = EquiStatic(8, 2, seed=1)
    >>> t.rounds, t.max_degree(), t.is_doubly_stochastic()
    (1, 2, True)
    """
    n, seed = check_n(n), check_seed(seed)
    m = _check_int(m, "m", 1)
    undirected = bool(undirected)
    if n > 1 and m > n - 1:
        raise ValueError(f"m must be <= n - 1 = {n - 1} (distinct basis labels), got m={m}")
    labels: list[int] = []
    if n == 1:
        rnd = SparseRound.identity(1)
    else:
        labels = sorted(int(u) for u in np.random.default_rng(seed).choice(
            np.arange(1, n), size=m, replace=False))
        w = (n - 1) / (n * m)
        if undirected:
            rnd = circulant(n, labels + [-u for u in labels], [w / 2] * (2 * m))
        else:
            rnd = circulant(n, labels, [w] * m)
    params = {"n": n, "m": m, "undirected": undirected, "seed": seed}
    topo = make("EquiStatic", params, [rnd], n)
    topo.details["labels"] = labels
    return topo
