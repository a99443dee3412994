"""Topologies by name: the one list of names every command line uses.

``python -m decomm.topology NAME``, ``examples/train.py --topology NAME`` and user
scripts build graphs through :func:`by_name`, so a graph has one spelling everywhere:

==================  ===================================  ==========================
name                constructor                          aliases (older spellings)
==================  ===================================  ==========================
``base``            :func:`BaseGraph` (n, k)
``simple-base``     :func:`SimpleBaseGraph` (n, k)       ``simple``
``hyper-hypercube`` :func:`HyperHypercube` (n, k)        ``hh``
``exp``             :func:`ExponentialGraph` (n)
``one-peer-exp``    :func:`OnePeerExponentialGraph` (n)  ``onepeer``
``hypercube``       :func:`HypercubeGraph` (n)
``ring``            :func:`RingGraph` (n)
``torus``           :func:`TorusGraph` (n)
``star``            :func:`StarGraph` (n)
``full``            :func:`FullyConnectedGraph` (n)
``equidyn``         :func:`EquiDyn` (n, eta, undirected, seed)
``equistatic``      :func:`EquiStatic` (n, m, undirected, seed)
==================  ===================================  ==========================

Names are matched case-insensitively, with ``_`` read as ``-`` (``one_peer_exp``).

>>> by_name("one-peer-exp", 8).name == by_name("onepeer", 8).name
True
>>> by_name("base", 25, k=2).rounds
6
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .basegraph import BaseGraph, HyperHypercube, SimpleBaseGraph
from .core import Topology
from .equitopo import EquiDyn, EquiStatic
from .exponential import ExponentialGraph, HypercubeGraph, OnePeerExponentialGraph
from .static import FullyConnectedGraph, RingGraph, StarGraph, TorusGraph

__all__ = ["GRAPHS", "GraphSpec", "by_name", "canonical_name", "graph_names", "graph_params"]


@dataclass(frozen=True)
class GraphSpec:
    """One named graph family.

    ``params`` are the keyword parameters :func:`by_name` passes on besides ``n``;
    ``required`` those without a default; ``defaults`` values used when a parameter
    is not given (on top of the constructor's own defaults).
    """

    name: str
    build: Callable[..., Topology]
    help: str
    params: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    defaults: dict[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()


_SPECS = (
    GraphSpec("base", BaseGraph, "Base-(k+1) graph: exact average after a finite cycle",
              ("k",), ("k",)),
    GraphSpec("simple-base", SimpleBaseGraph, "Simple Base-(k+1) graph", ("k",), ("k",),
              aliases=("simple",)),
    GraphSpec("hyper-hypercube", HyperHypercube,
              "k-peer hyper-hypercube (every prime factor of n <= k+1)", ("k",), ("k",),
              aliases=("hh",)),
    GraphSpec("exp", ExponentialGraph, "static exponential graph"),
    GraphSpec("one-peer-exp", OnePeerExponentialGraph, "one-peer exponential graph",
              aliases=("onepeer",)),
    GraphSpec("hypercube", HypercubeGraph, "one-peer hypercube (n a power of 2)"),
    GraphSpec("ring", RingGraph, "ring, weights 1/3"),
    GraphSpec("torus", TorusGraph, "2-D torus"),
    GraphSpec("star", StarGraph, "star centred on node 0"),
    GraphSpec("full", FullyConnectedGraph, "fully connected, J/n"),
    GraphSpec("equidyn", EquiDyn, "EquiDyn random one-peer family",
              ("eta", "undirected", "seed")),
    GraphSpec("equistatic", EquiStatic, "EquiStatic (m basis matrices)",
              ("m", "undirected", "seed"), defaults={"m": 2}),
)

#: Every named graph, canonical name -> spec, in the order command lines list them.
GRAPHS: dict[str, GraphSpec] = {s.name: s for s in _SPECS}

_ALIASES: dict[str, str] = {a: s.name for s in _SPECS for a in s.aliases}


def graph_names() -> tuple[str, ...]:
    """The canonical names, e.g. ``("base", "simple-base", ..., "equistatic")``."""
    return tuple(GRAPHS)


def canonical_name(name: str) -> str:
    """The canonical spelling of ``name`` (an alias such as ``"hh"`` or ``"onepeer"``,
    any case, ``_`` for ``-``); ValueError listing the names for an unknown one."""
    if not isinstance(name, str):
        raise ValueError(f"topology name must be a str, got {name!r}")  # noqa: TRY004
    key = name.strip().lower().replace("_", "-")
    if key in GRAPHS:
        return key
    if key in _ALIASES:
        return _ALIASES[key]
    raise ValueError(f"unknown topology {name!r}; choose from {', '.join(GRAPHS)} "
                     f"(aliases: {', '.join(f'{a}={c}' for a, c in _ALIASES.items())})")


def graph_params(name: str) -> tuple[str, ...]:
    """The parameters besides n that the graph ``name`` takes (``("k",)`` for ``base``)."""
    return GRAPHS[canonical_name(name)].params


def by_name(name: str, n: int, **params: Any) -> Topology:
    """Build the graph called ``name`` (canonical or alias) for ``n`` nodes.

    ``params`` go to its constructor: ``k`` for ``base``, ``simple-base`` and
    ``hyper-hypercube`` (required); ``eta``, ``undirected``, ``seed`` for ``equidyn``;
    ``m`` (default 2), ``undirected``, ``seed`` for ``equistatic``.  A parameter the
    graph does not take, or a missing required one, is a ValueError naming it.
    """
    spec = GRAPHS[canonical_name(name)]
    extra = sorted(set(params) - set(spec.params))
    if extra:
        takes = ", ".join(spec.params) if spec.params else "only n"
        raise ValueError(f"topology {spec.name!r} takes no parameter {', '.join(extra)} "
                         f"(it takes: {takes})")
    missing = [p for p in spec.required if params.get(p) is None]
    if missing:
        raise ValueError(f"topology {spec.name!r} needs {', '.join(missing)}, e.g. "
                         f"by_name({spec.name!r}, {n!r}, {missing[0]}=1)")
    kwargs = {**spec.defaults, **{k: v for k, v in params.items() if v is not None}}
    return spec.build(n, **kwargs)
