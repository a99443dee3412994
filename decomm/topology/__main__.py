"""Command line: inspect and compare topologies.

Examples::

    python -m decomm.topology base --n 25 --k 2 --plot base25.png
    python -m decomm.topology one-peer-exp --n 12
    python -m decomm.topology equidyn --n 64 --seed 1
    python -m decomm.topology compare --n 25 --k 2 --steps 40 --out curves.png

The graph names are those of decomm.topology.by_name (the same as examples/train.py
--topology); the older spellings onepeer, simple and hh still work.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import numpy as np

from . import (
    BaseGraph,
    EquiDyn,
    EquiStatic,
    ExponentialGraph,
    HypercubeGraph,
    OnePeerExponentialGraph,
    RingGraph,
    SimpleBaseGraph,
    Topology,
    TorusGraph,
    plot_consensus,
)
from .analysis import apply_rounds
from .registry import GRAPHS, by_name

#: Above this n, dense analyses (spectral gap, full exactness check) are skipped.
DENSE_LIMIT = 3000

#: Command-line flag of each by_name parameter: (type or action, default, help).
_PARAM_FLAGS: dict[str, tuple[Any, Any, str]] = {
    "k": (int, None, "maximum degree per round"),
    "seed": (int, 0, "seed of the random rounds / basis"),
    "undirected": ("store_true", False, "undirected variant (symmetric rounds)"),
    "eta": (float, 0.5, "weight moved to the peer in each round (0 < eta <= 1)"),
    "m": (int, 2, "number of basis matrices"),
}


def _exactness(topo: Topology) -> str:
    if topo.rounds is None:
        return "no (random family)"
    if topo.n <= DENSE_LIMIT:
        return "yes" if topo.is_finite_time_exact() else "no"
    x = np.random.default_rng(0).standard_normal((topo.n, 8))
    y = apply_rounds(topo, x, 0, topo.rounds)
    ok = np.abs(y - x.mean(axis=0)).max() <= 1e-10
    return ("yes" if ok else "no") + " (checked on 8 random vectors; n is large)"


def _gap(topo: Topology) -> str:
    if topo.n > DENSE_LIMIT:
        return f"skipped (n > {DENSE_LIMIT}: dense O(n^3))"
    g = topo.spectral_gap()
    if topo.rounds is None:
        how = ("1 - rho, rho^2 = ||E[(W-J/n)^T (W-J/n)]||, "
               + ("exact" if topo._mean_square_rate is not None else "256 sampled rounds"))
    elif topo.rounds == 1:
        how = "1 - |lambda_2(W)|"
    else:
        per = topo.spectral_gap(per_round=True)
        how = f"1 - ||P - J/n||_2 of the cycle product; per round {per:.6f}"
    return f"{g:.6f}  ({how})"


def describe(topo: Topology, out: TextIO | None = None) -> None:
    """Print rounds, degree, stochasticity, exactness and spectral gap of ``topo``."""
    out = out if out is not None else sys.stdout
    rounds = "infinite (seeded random family)" if topo.rounds is None else str(topo.rounds)
    rows = [
        ("topology", topo.name),
        ("rounds", rounds),
        ("max degree", str(topo.max_degree()) + (" (rounds 0..63)" if topo.rounds is None else "")),
        ("doubly stochastic", str(topo.is_doubly_stochastic())),
        ("symmetric", str(topo.is_symmetric())),
        ("finite-time exact", _exactness(topo)),
        ("spectral gap", _gap(topo)),
        ("fingerprint", topo.fingerprint()[:16]),
    ]
    if topo.n > 1 and topo.kind in ("BaseGraph", "SimpleBaseGraph"):
        bound = 2 * math.log(topo.n, topo.params["k"] + 1) + 2
        rows.insert(2, ("Theorem-1 bound", f"2 log_(k+1) n + 2 = {bound:.2f}"))
    for key, val in topo.details.items():
        rows.append((key, str(val)))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}", file=out)


def _compare(args: argparse.Namespace) -> int:
    n, k = args.n, args.k
    topos: list[Topology] = [RingGraph(n), TorusGraph(n), ExponentialGraph(n),
                             OnePeerExponentialGraph(n)]
    if n & (n - 1) == 0:
        topos.append(HypercubeGraph(n))
    topos += [SimpleBaseGraph(n, k), BaseGraph(n, k), EquiDyn(n, seed=args.seed)]
    if n > 2:
        topos.append(EquiStatic(n, min(k, n - 1), seed=args.seed))
    err = f"err@{args.steps}"
    header = (f"{'topology':<50} {'rounds':>7} {'maxdeg':>6} {'exact':>5} {err:>10} "
              f"{'t(1e-8)':>8}")
    print(header)
    print("-" * len(header))
    curves: dict[str, np.ndarray] = {}
    for t in topos:
        c = t.consensus_curve(args.steps, trials=args.trials, seed=args.seed)
        curves[t.name] = c
        hit = np.nonzero(c < 1e-8)[0]
        t_hit = str(int(hit[0])) if hit.size else f">{args.steps}"
        rounds = "rand" if t.rounds is None else str(t.rounds)
        exact = "-" if t.rounds is None else ("yes" if t.is_finite_time_exact() else "no")
        print(f"{t.name:<50} {rounds:>7} {t.max_degree():>6} {exact:>5} {c[-1]:>10.2e} {t_hit:>8}")
    if args.out:
        plot_consensus(topos, args.out, steps=args.steps, trials=args.trials, seed=args.seed)
        print(f"wrote {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m decomm.topology", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="GRAPH")
    for spec in GRAPHS.values():
        p = sub.add_parser(spec.name, aliases=list(spec.aliases), help=spec.help)
        p.set_defaults(graph=spec.name)
        p.add_argument("--n", type=int, required=True, help="number of nodes")
        for param in spec.params:
            kind, default, help_ = _PARAM_FLAGS[param]
            default = spec.defaults.get(param, default)
            if kind == "store_true":
                p.add_argument(f"--{param}", action="store_true", help=help_)
            elif param in spec.required:
                p.add_argument(f"--{param}", type=kind, required=True, help=help_)
            else:
                p.add_argument(f"--{param}", type=kind, default=default,
                               help=f"{help_} (default {default})")
        p.add_argument("--plot", metavar="PNG", help="draw every round into this file")
    p = sub.add_parser("compare", help="consensus curves of several topologies")
    p.set_defaults(graph=None)
    p.add_argument("--n", type=int, required=True, help="number of nodes")
    p.add_argument("--k", type=int, default=1,
                   help="maximum degree of the Base-(k+1) graphs and EquiStatic (default 1)")
    p.add_argument("--steps", type=int, default=40, help="gossip rounds to run (default 40)")
    p.add_argument("--trials", type=int, default=8,
                   help="random starting vectors averaged per curve (default 8)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the starting vectors and random topologies (default 0)")
    p.add_argument("--out", metavar="PNG", help="plot the curves into this file")
    args = parser.parse_args(argv)
    try:
        if args.command == "compare":
            return _compare(args)
        spec = GRAPHS[args.graph]
        topo = by_name(spec.name, args.n, **{p: getattr(args, p) for p in spec.params})
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    describe(topo)
    if args.plot:
        topo.plot(args.plot)
        print(f"  wrote {args.plot}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
