"""Drawings of topologies and consensus-curve comparisons (matplotlib, imported lazily).

Uses ``matplotlib.figure.Figure`` directly (no pyplot, no global backend change), so
it works headless and does not disturb an interactive session.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .core import Topology

__all__ = ["plot_consensus", "plot_topology"]


def _circle(n: int) -> np.ndarray:
    ang = np.pi / 2 - 2 * np.pi * np.arange(n) / max(n, 1)
    return np.stack([np.cos(ang), np.sin(ang)], axis=1)


def _draw_round(ax, topo: Topology, t: int, pos: np.ndarray) -> None:
    from matplotlib.collections import LineCollection

    r = topo.sparse(t)
    m = r.offdiag_mask
    rows, cols = r.row_ids[m], r.indices[m]
    pairs = set(zip(rows.tolist(), cols.tolist()))
    und, dire = [], []
    for i, j in pairs:
        if (j, i) in pairs:
            if i < j:
                und.append((pos[i], pos[j]))
        else:
            dire.append((j, i))  # j sends to i
    if und:
        ax.add_collection(LineCollection(und, colors="tab:blue", linewidths=1.0, alpha=0.7))
    if len(dire) <= 400:
        for j, i in dire:
            ax.annotate("", xy=pos[i], xytext=pos[j],
                        arrowprops={"arrowstyle": "-|>", "color": "tab:red", "lw": 0.8,
                                    "shrinkA": 4, "shrinkB": 4, "mutation_scale": 7})
    else:
        ax.add_collection(LineCollection([(pos[j], pos[i]) for j, i in dire],
                                         colors="tab:red", linewidths=0.5, alpha=0.5))
    n = topo.n
    ax.scatter(pos[:, 0], pos[:, 1], s=max(8, 120 - 4 * n), c="white", edgecolors="black",
               linewidths=0.8, zorder=3)
    if n <= 32:
        for i in range(n):
            ax.text(pos[i, 0] * 1.16, pos[i, 1] * 1.16, str(i), ha="center", va="center",
                    fontsize=6)
    ax.set_xlim(-1.3, 1.3)
    ax.set_ylim(-1.3, 1.3)
    ax.set_aspect("equal")
    ax.axis("off")


def plot_topology(topo: Topology, path: str, max_rounds: int = 12, dpi: int = 80) -> None:
    """Draw rounds 0 .. min(rounds, max_rounds)-1 of ``topo`` on a circle layout.

    Blue lines are two-way links (W[i, j] and W[j, i] both non-zero), red arrows
    ``j -> i`` one-way links (i receives from j).  A random family shows its first
    ``max_rounds`` rounds.
    """
    from matplotlib.figure import Figure

    total = topo.rounds if topo.rounds is not None else max_rounds
    nr = max(1, min(total, max_rounds))
    ncols = min(4, nr)
    nrows = math.ceil(nr / ncols)
    fig = Figure(figsize=(2.4 * ncols, 2.5 * nrows + 0.4))
    pos = _circle(topo.n)
    for t in range(nr):
        ax = fig.add_subplot(nrows, ncols, t + 1)
        _draw_round(ax, topo, t, pos)
        ax.set_title(f"round {t}", fontsize=8)
    more = "" if topo.rounds is None or nr == topo.rounds else f", first {nr} shown"
    rounds = "random rounds" if topo.rounds is None else f"{topo.rounds} round(s)"
    fig.suptitle(f"{topo.name}: {rounds}{more}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)


def plot_consensus(topologies: Sequence[Topology], path: str, steps: int = 50, trials: int = 8,
                   seed: int = 0, title: str | None = None, dpi: int = 90) -> dict[str, np.ndarray]:
    """Plot ``||x_t - xbar|| / ||x_0 - xbar||`` against t (log scale) for several topologies.

    Returns ``{topology name: curve}`` (see :meth:`Topology.consensus_curve`).  Values
    below 1e-16 (exact averaging) are drawn at 1e-16.
    """
    from matplotlib.figure import Figure

    topologies = list(topologies)
    if not topologies:
        raise ValueError("plot_consensus needs at least one topology")
    curves = {}
    fig = Figure(figsize=(7.6, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    markers = "os^vD<>ph*x+"
    for idx, topo in enumerate(topologies):
        c = topo.consensus_curve(steps, trials=trials, seed=seed)
        curves[topo.name] = c
        ax.semilogy(np.arange(steps + 1), np.maximum(c, 1e-16), label=topo.name,
                    marker=markers[idx % len(markers)], markevery=max(1, steps // 10), markersize=4,
                    lw=1.2)
    ax.set_xlabel("communication round t")
    ax.set_ylabel(r"$\|x_t - \bar{x}\| / \|x_0 - \bar{x}\|$")
    ax.set_ylim(1e-16, 2)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    n = topologies[0].n
    ax.set_title(title or f"consensus error, n = {n} (mean of {trials} random starts)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return curves
