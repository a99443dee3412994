"""decomm.topology: communication topologies for decentralized learning.

Pure numpy (networkx and matplotlib are optional, imported lazily only for interop and
plots); never imports MPI or the decomm runtime.  A :class:`Topology` is a cycle of
sparse mixing matrices ``W(0), ..., W(L-1)`` (``W[i, j]`` = weight node i gives to
node j's value, ``x_new = W @ x``) or a seeded random family.

Constructors: :func:`RingGraph`, :func:`TorusGraph`, :func:`StarGraph`,
:func:`FullyConnectedGraph`, :func:`ExponentialGraph`, :func:`OnePeerExponentialGraph`,
:func:`HypercubeGraph`, :func:`HyperHypercube`, :func:`SimpleBaseGraph`,
:func:`BaseGraph`, :func:`EquiDyn`, :func:`EquiStatic`,
:meth:`Topology.from_matrices`, :meth:`Topology.from_networkx`; by name (the names
every command line uses, e.g. ``"one-peer-exp"``): :func:`by_name`.

>>> from decomm.topology import BaseGraph
>>> t = BaseGraph(25, 2)
>>> t.rounds, t.max_degree(), t.is_finite_time_exact()
(6, 2, True)
"""

from .basegraph import (
    BaseGraph,
    HyperHypercube,
    SimpleBaseGraph,
    base_graph_length,
    hyper_hypercube_factors,
    simple_base_length,
)
from .core import SparseRound, Topology, stochastic_tolerance
from .equitopo import EquiDyn, EquiStatic
from .exponential import ExponentialGraph, HypercubeGraph, OnePeerExponentialGraph
from .plotting import plot_consensus
from .registry import by_name, canonical_name, graph_names, graph_params
from .static import FullyConnectedGraph, RingGraph, StarGraph, TorusGraph

__all__ = [
    "BaseGraph",
    "EquiDyn",
    "EquiStatic",
    "ExponentialGraph",
    "FullyConnectedGraph",
    "HyperHypercube",
    "HypercubeGraph",
    "OnePeerExponentialGraph",
    "RingGraph",
    "SimpleBaseGraph",
    "SparseRound",
    "StarGraph",
    "Topology",
    "TorusGraph",
    "base_graph_length",
    "by_name",
    "canonical_name",
    "graph_names",
    "graph_params",
    "hyper_hypercube_factors",
    "plot_consensus",
    "simple_base_length",
    "stochastic_tolerance",
]
