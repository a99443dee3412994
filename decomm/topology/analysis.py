"""Analysis of topologies: cycle products, exactness, spectral gap, consensus curves.

All functions take a :class:`~decomm.topology.core.Topology` and use its per-round
access (``sparse(t)``, ``analysis_rounds()``), applying rounds sparsely to blocks of
vectors rather than multiplying dense n x n matrices; a random family's exact
mean-square rate, when its constructor gave one (EquiDyn), replaces sampling.

Definitions (x_{t+1} = W(t) x_t, J = 11^T):

* cycle product ``P = W(L-1) ... W(1) W(0)``, so ``x_L = P x_0``;
* finite-time exact: ``P = J/n`` (Takezawa et al. 2023, Def. 2);
* spectral gap ``1 - rho`` with ``rho = |lambda_2(W)|`` (static),
  ``||P - J/n||_2`` (cycles) or the mean-square rate
  ``rho^2 = ||E[(W - J/n)^T (W - J/n)]||_2`` (random families; Song et al. 2022
  bound it by rho^2 <= 1/2 for directed EquiDyn with eta = 1/2, for every n).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .core import Topology

__all__ = [
    "apply_rounds",
    "consensus_curve",
    "cycle_product",
    "is_finite_time_exact",
    "mean_square_rate",
    "spectral_gap",
]

_BLOCK = 256
#: ||P - J/n||_2 below this is rounding error: the sequence is exact, rho = 0.
_EXACT = 1e-12


def apply_rounds(topo: Topology, x: np.ndarray, start: int, steps: int) -> np.ndarray:
    """Return ``W(start+steps-1) ... W(start) x`` (sparse, x of shape (n,) or (n, d))."""
    x = np.asarray(x, dtype=np.float64)
    for s in range(steps):
        x = topo.sparse(start + s).matmul(x)
    return x


def cycle_product(topo: Topology) -> np.ndarray:
    """Dense ``P = W(L-1) @ ... @ W(0)`` of one cycle; ValueError for random families."""
    if topo.rounds is None:
        raise ValueError(f"{topo.name} is a random family: it has no finite cycle to multiply")
    return apply_rounds(topo, np.eye(topo.n), 0, topo.rounds)


def is_finite_time_exact(topo: Topology, tol: float = 1e-10) -> bool:
    """True when ``max |P - J/n| <= tol`` (checked on column blocks of the identity)."""
    if topo.rounds is None:
        return False
    n = topo.n
    for c0 in range(0, n, _BLOCK):
        c1 = min(n, c0 + _BLOCK)
        block = np.zeros((n, c1 - c0))
        block[np.arange(c0, c1), np.arange(c1 - c0)] = 1.0
        out = apply_rounds(topo, block, 0, topo.rounds)
        if np.abs(out - 1.0 / n).max() > tol:
            return False
    return True


def _second_eig_modulus(w: np.ndarray) -> float:
    if np.array_equal(w, w.T):
        ev = np.abs(np.linalg.eigvalsh(w))
    else:
        ev = np.abs(np.linalg.eigvals(w))
    ev.sort()
    return float(ev[-2])


def _dev_norm(m: np.ndarray) -> float:
    """Spectral norm of ``m - J/n``."""
    n = m.shape[0]
    return float(np.linalg.norm(m - 1.0 / n, 2))


def mean_square_rate(topo: Topology, samples: int = 256) -> float:
    """``rho`` with ``rho^2 = || mean_t (W(t) - J/n)^T (W(t) - J/n) ||_2`` over t < samples.

    A Monte-Carlo estimate from sampled rounds (:func:`spectral_gap` uses the exact
    rate instead when the topology knows it: EquiDyn).  For a random family this
    estimates Song et al.'s (2022) mean-square consensus rate,
    ``E ||W x - xbar||^2 <= rho^2 ||x - xbar||^2``.  Each term is formed sparsely
    (O(nnz * n)); one symmetric eigen-solve at the end.
    """
    n = topo.n
    acc = np.zeros((n, n))
    for t in range(samples):
        r = topo.sparse(t)
        c = r.col_sums()
        # (W - J/n)^T (W - J/n) = W^T W - (c 1^T + 1 c^T) / n + J / n
        acc += r.gram_dense()
        acc -= (c[:, None] + c[None, :]) / n
    acc /= samples
    acc += 1.0 / n
    return float(np.sqrt(max(np.linalg.eigvalsh((acc + acc.T) / 2).max(), 0.0)))


def spectral_gap(topo: Topology, per_round: bool = False, samples: int = 256) -> float:
    """See :meth:`Topology.spectral_gap` for the definition per kind of topology."""
    if topo.n == 1:
        return 1.0
    if topo.rounds is None:
        exact = topo._mean_square_rate
        return 1.0 - (exact() if exact is not None else mean_square_rate(topo, samples))
    if topo.rounds == 1:
        return 1.0 - _second_eig_modulus(topo.matrix(0))
    rho = _dev_norm(cycle_product(topo))
    if rho < _EXACT:  # rounding error of an exact sequence
        rho = 0.0
    if per_round:
        return 1.0 - max(rho, 0.0) ** (1.0 / topo.rounds)
    return 1.0 - rho


def consensus_curve(topo: Topology, steps: int, trials: int = 8, seed: int = 0,
                    start: int = 0) -> np.ndarray:
    """``e[s] = mean_trials ||x_s - xbar|| / ||x_0 - xbar||`` for s = 0..steps."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    if isinstance(trials, bool) or not isinstance(trials, (int, np.integer)) or trials < 1:
        raise ValueError(f"trials must be a positive integer, got {trials!r}")
    n = topo.n
    out = np.zeros(steps + 1)
    out[0] = 1.0
    if n == 1:
        return out
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, int(trials)))
    xbar = x.mean(axis=0, keepdims=True)
    norm0 = np.linalg.norm(x - xbar, axis=0)
    for s in range(steps):
        x = topo.sparse(start + s).matmul(x)
        out[s + 1] = float(np.mean(np.linalg.norm(x - xbar, axis=0) / norm0))
    return out
