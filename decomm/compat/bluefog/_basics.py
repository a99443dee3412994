"""BlueFog's process-level API (``bluefog.common.basics``) on decomm's runtime.

Lifecycle, identity, and the *virtual topology* as BlueFog keeps it: a
``networkx.DiGraph`` whose edge ``u -> v`` with weight ``a`` means "v receives u's
value with weight a" (BlueFog's adjacency ``A[u, v]``), optionally used for weights
(``is_weighted=True``). decomm's own convention is the mixing matrix ``W[i, j]`` = the
weight i gives to j's value, so the graph's weights are ``W = A^T``.

What is handed to decomm: BlueFog's graphs need not be row-stochastic (a 0/1
adjacency, or weights that only make sense with ``is_weighted``), while
:func:`decomm.set_topology` accepts mixing matrices only. The compat layer therefore
installs in decomm the *uniform* matrix of the graph's edges, ``W[i, j] = 1 /
(indeg(i) + 1)`` for every in-neighbour j and for i itself - exactly BlueFog's
default weights for an unweighted topology - and, when ``is_weighted=True``, passes
the graph's own weights explicitly on every call (as BlueFog's Python layer does with
``GetRecvWeights``). The neighbour sets are the graph's in every case.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import networkx as nx
import numpy as np

from ... import hierarchical, runtime, timeline, win
from ... import topology as _topo
from ...backends import nccl_built as _nccl_built

logger = logging.getLogger("decomm.compat.bluefog")

__all__ = [
    "get_skip_negotiate_stage",
    "in_neighbor_machine_ranks",
    "in_neighbor_ranks",
    "init",
    "is_homogeneous",
    "is_machine_topo_weighted",
    "is_topo_weighted",
    "load_machine_topology",
    "load_topology",
    "local_rank",
    "local_size",
    "machine_rank",
    "machine_size",
    "mpi_threads_supported",
    "nccl_built",
    "out_neighbor_machine_ranks",
    "out_neighbor_ranks",
    "rank",
    "resume",
    "set_machine_topology",
    "set_skip_negotiate_stage",
    "set_topology",
    "shutdown",
    "size",
    "suspend",
    "timeline_context",
    "timeline_end_activity",
    "timeline_start_activity",
    "unified_mpi_window_model_supported",
]


class _Basics:
    """What BlueFog's ``BlueFogBasics`` object holds between calls."""

    def __init__(self) -> None:
        self.topology: nx.DiGraph | None = None
        self.weighted = False
        self.machine_topology: nx.DiGraph | None = None
        self.machine_weighted = False
        self.skip_negotiate = False
        self.grouped: int | None = None  # BLUEFOG_NODES_PER_MACHINE grouping in force
        self.activities: dict[tuple[str, int], Any] = {}
        self.warned_timeline = False
        self.atexit = False
        self.installed: Any = None  # the decomm Topology installed for ``topology``


_b = _Basics()


def _state() -> _Basics:
    return _b


def _require() -> None:
    if not runtime.is_initialized():
        raise ValueError("BlueFog has not been initialized; use bf.init().")


def _topology_util() -> Any:
    from . import topology_util

    return topology_util


# --------------------------------------------------------------- lifecycle
def init(topology_fn: Callable[[int], nx.DiGraph] | None = None,
         is_weighted: bool = False) -> None:
    """Start decomm (if not yet) and set the virtual topology, as ``bf.init`` does.

    ``topology_fn(size)`` gives the graph (default BlueFog's
    ``ExponentialGraph(size)``); ``is_weighted`` makes the neighbour ops use the graph's
    weights. Calling it again (BlueFog's tests do, once per test) keeps decomm running
    and resets the topology. ``BLUEFOG_NODES_PER_MACHINE=L`` groups the ranks into
    machines of L consecutive ranks (``local_size``, ``machine_rank`` and the
    hierarchical ops follow it); ``BLUEFOG_TIMELINE=prefix`` starts decomm's timeline
    writing ``{prefix}{rank}.json``.
    """
    if not runtime.is_initialized():
        runtime.init()
        _b.topology = None
        _b.machine_topology = None
        _b.grouped = None
    prefix = os.environ.get("BLUEFOG_TIMELINE")
    if prefix and not timeline.is_enabled():
        timeline.start(prefix)
    per_machine = os.environ.get("BLUEFOG_NODES_PER_MACHINE", "").strip()
    if per_machine:
        try:
            nodes = int(per_machine)
        except ValueError:
            raise ValueError(f"BLUEFOG_NODES_PER_MACHINE={per_machine!r} is not an int") from None
        if nodes < 1:
            raise ValueError(f"BLUEFOG_NODES_PER_MACHINE must be >= 1, got {per_machine!r}")
        if _b.grouped != nodes:  # collective, like the rest of init
            hierarchical.init_machines(local_size=nodes)
            _b.grouped = nodes
    topo = topology_fn(size()) if topology_fn else _topology_util().ExponentialGraph(size())
    set_topology(topo, is_weighted)
    if not _b.atexit:
        atexit.register(shutdown)
        _b.atexit = True


#: Run by :func:`shutdown` before decomm stops (the window module frees its windows):
#: registered by the modules above this one, which this one does not import.
on_shutdown: list[Callable[[], None]] = []


def shutdown() -> None:
    """Free the windows and stop decomm (BlueFog's ``bf.shutdown``)."""
    if runtime.is_initialized():
        for hook in on_shutdown:
            hook()
        hierarchical.shutdown_machines()
        runtime.shutdown()
    _b.topology = None
    _b.machine_topology = None
    _b.grouped = None


def size() -> int:
    """Number of processes (ValueError before ``init``, as in BlueFog)."""
    _require()
    return runtime.size()


def rank() -> int:
    """This process's rank (ValueError before ``init``)."""
    _require()
    return runtime.rank()


def local_size() -> int:
    """Processes on this machine: ``BLUEFOG_NODES_PER_MACHINE`` if set, else the node's."""
    _require()
    if _b.grouped is not None:
        return hierarchical.machine_local_size()
    return runtime.local_size()


def local_rank() -> int:
    """Rank within this machine (see :func:`local_size`)."""
    _require()
    if _b.grouped is not None:
        return hierarchical.machine_local_rank()
    return runtime.local_rank()


def is_homogeneous() -> bool:
    """True when every machine holds ``local_size()`` consecutive ranks (collective-free:
    decided from this rank's view, as BlueFog assumes the ranks are laid out so)."""
    return size() % local_size() == 0


def machine_rank() -> int:
    """``rank() // local_size()`` (BlueFog supports homogeneous layouts only)."""
    assert is_homogeneous(), "Only supports homogeneous environment now"
    return rank() // local_size()


def machine_size() -> int:
    """``size() // local_size()``."""
    assert is_homogeneous(), "Only supports homogeneous environment now"
    return size() // local_size()


def nccl_built() -> bool:
    """True if this decomm build has its NCCL backend."""
    return bool(_nccl_built())


def mpi_threads_supported() -> bool:
    """True if MPI runs with ``MPI_THREAD_MULTIPLE``."""
    _require()
    from mpi4py import MPI

    return MPI.Query_thread() == MPI.THREAD_MULTIPLE


def unified_mpi_window_model_supported() -> bool:
    """True if MPI windows use the unified memory model (collective: creates and frees a
    one-byte window, as BlueFog does)."""
    _require()
    from mpi4py import MPI

    w = MPI.Win.Allocate(8, 1, comm=MPI.COMM_WORLD)
    try:
        return w.Get_attr(MPI.WIN_MODEL) == MPI.WIN_UNIFIED
    finally:
        w.Free()


def _in_ipython() -> bool:
    return "IPython" in sys.modules and getattr(sys.modules["IPython"], "get_ipython",
                                                lambda: None)() is not None


def suspend() -> None:
    """BlueFog pauses its background thread (IPython only). decomm's ops progress only
    inside calls and wait(), so there is nothing to pause; the IPython-only rule stays."""
    if not _in_ipython():
        raise OSError("This function should be used only when you are under ipython "
                      "environment.")


def resume() -> None:
    """Counterpart of :func:`suspend` (nothing to resume on decomm)."""
    if not _in_ipython():
        raise OSError("This function should be used only when you are under ipython "
                      "environment.")


def set_skip_negotiate_stage(value: bool) -> None:
    """Record BlueFog's "skip negotiation" flag (read back by the getter).

    decomm has no negotiation round trip to skip: its cross-rank checks travel in the
    message headers of the op itself, so they stay on (``DECOMM_CHECK=0`` turns them off).
    """
    _b.skip_negotiate = bool(value)


def get_skip_negotiate_stage() -> bool:
    """The flag set by :func:`set_skip_negotiate_stage` (default False)."""
    return _b.skip_negotiate


# ---------------------------------------------------------------- topology
def _check_digraph(topology: Any, n: int, what: str, counted: str) -> nx.DiGraph:
    if not isinstance(topology, nx.DiGraph):
        raise TypeError(f"{what} must be a networkx.DiGraph obejct.")
    if topology.number_of_nodes() != n:
        raise TypeError(f"{what} must be a networkx.DiGraph obejct with same number of nodes "
                        f"as {counted}.")
    if sorted(topology.nodes()) != list(range(n)):
        raise ValueError(f"{what}: nodes must be the integers 0..{n - 1}")
    return topology


def uniform_matrix(topology: nx.DiGraph) -> np.ndarray:
    """The mixing matrix of BlueFog's unweighted average over ``topology``.

    ``W[i, j] = 1 / (k_i + 1)`` for i itself and each of its k_i in-neighbours j (the
    graph's predecessors other than i, whatever their edge weights), zero elsewhere.
    """
    n = topology.number_of_nodes()
    m = np.eye(n)
    for u, v in topology.edges():
        m[v, u] = 1.0
    return m / m.sum(axis=1, keepdims=True)


def recv_weights(topology: nx.DiGraph, node: int) -> tuple[float, dict[int, float]]:
    """``(self weight, {in-neighbour: weight})`` of ``node`` from the graph's edge weights
    (BlueFog's ``GetRecvWeights``: the weight of edge ``j -> node``; a missing self-loop
    weighs 0)."""
    self_w = 0.0
    nbr: dict[int, float] = {}
    for j in topology.predecessors(node):
        w = float(topology[j][node].get("weight", 1.0))
        if j == node:
            self_w = w
        else:
            nbr[int(j)] = w
    return self_w, nbr


def _equivalent(a: nx.DiGraph | None, b: nx.DiGraph | None) -> bool:
    return _topology_util().IsTopologyEquivalent(a, b) if a is not None and b is not None \
        else False


def set_topology(topology: nx.DiGraph | None = None, is_weighted: bool = False) -> bool:
    """Set the virtual topology; returns True, or False if it cannot be changed now.

    Like BlueFog: ``None`` means ``ExponentialGraph(size())``; a graph equal to the one
    in force is accepted at once; while windows exist the topology is kept and False is
    returned (win_free them first). Collective otherwise (decomm compares the ranks'
    graphs). ``is_weighted`` is recorded even when the graph is unchanged.
    """
    _require()
    n = size()
    if topology is None:
        topology = _topology_util().ExponentialGraph(n)
        if local_rank() == 0:
            logger.info("Topology is not specified. Default Exponential Two topology is used.")
    _check_digraph(topology, n, "topology", "bf.size()")
    if _equivalent(topology, _b.topology):
        _b.weighted = bool(is_weighted)
        ensure_installed()
        return True
    if win.win_names():
        if local_rank() == 0:
            logger.error("Cannot set topology while windows exist (windows: %s); call "
                         "win_free() first.", win.win_names())
        return False
    _install(topology)
    _b.topology = topology
    _b.weighted = bool(is_weighted)
    return True


def _install(topology: nx.DiGraph) -> None:
    label = f"bluefog graph (n={topology.number_of_nodes()}, edges={topology.number_of_edges()})"
    topo = _topo.Topology.from_matrices(uniform_matrix(topology), name=label)
    runtime.set_topology(topo)
    _b.installed = topo


def ensure_installed() -> None:
    """Re-install the graph's uniform matrix if decomm's topology was changed behind the
    compat layer's back (a direct ``decomm.set_topology``; collective like that call, so
    every rank notices it at the same op)."""
    if _b.topology is not None and runtime.get_topology() is not _b.installed:
        _install(_b.topology)


def load_topology() -> nx.DiGraph | None:
    """The graph set last (None before ``init``)."""
    return _b.topology


def is_topo_weighted() -> bool:
    """Whether the neighbour ops use the graph's weights."""
    return _b.weighted


def in_neighbor_ranks() -> list[int]:
    """This rank's in-neighbours (predecessors, self excluded), ascending."""
    if _b.topology is None:
        return []
    me = rank()
    return sorted(int(r) for r in _b.topology.predecessors(me) if r != me)


def out_neighbor_ranks() -> list[int]:
    """This rank's out-neighbours (successors, self excluded), ascending."""
    if _b.topology is None:
        return []
    me = rank()
    return sorted(int(r) for r in _b.topology.successors(me) if r != me)


def default_recv_weights() -> tuple[float, dict[int, float]] | None:
    """The graph's weights for this rank when ``is_weighted``; None for the uniform ones
    (then decomm's topology in force - re-installed here if need be - gives them)."""
    ensure_installed()
    if not _b.weighted or _b.topology is None:
        return None
    return recv_weights(_b.topology, rank())


def set_machine_topology(topology: nx.DiGraph | None, is_weighted: bool = False) -> bool:
    """Set the graph between machines used by ``hierarchical_neighbor_allreduce``."""
    if topology is None:
        raise ValueError("Machine topology shall not be None.")
    _check_digraph(topology, machine_size(), "Machine topology", "bf.machine_size()")
    if _equivalent(topology, _b.machine_topology):
        _b.machine_weighted = bool(is_weighted)
        return True
    _b.machine_topology = topology
    _b.machine_weighted = bool(is_weighted)
    return True


def load_machine_topology() -> nx.DiGraph | None:
    """The machine graph set last (None if never set)."""
    return _b.machine_topology


def is_machine_topo_weighted() -> bool:
    """Whether the hierarchical op uses the machine graph's weights."""
    return _b.machine_weighted


def in_neighbor_machine_ranks() -> list[int]:
    """In-neighbour machines of this machine, ascending."""
    if _b.machine_topology is None:
        return []
    me = machine_rank()
    return sorted(int(r) for r in _b.machine_topology.predecessors(me) if r != me)


def out_neighbor_machine_ranks() -> list[int]:
    """Out-neighbour machines of this machine, ascending."""
    if _b.machine_topology is None:
        return []
    me = machine_rank()
    return sorted(int(r) for r in _b.machine_topology.successors(me) if r != me)


# ---------------------------------------------------------------- timeline
def _timeline_off(what: str) -> bool:
    if timeline.is_enabled():
        return False
    if not _b.warned_timeline:
        logger.error("Cannot %s activity in the timeline: it is not on. Set "
                     "BLUEFOG_TIMELINE=prefix (or DECOMM_TIMELINE) before init, or call "
                     "decomm.timeline.start(prefix).", what)
        _b.warned_timeline = True
    return True


def timeline_start_activity(tensor_name: str, activity_name: str) -> bool:
    """Open a span ``activity_name`` for ``tensor_name`` on this thread's lane.

    Returns False (and logs once) when the timeline is off, as BlueFog does.
    """
    if _timeline_off("start"):
        return False
    key = (tensor_name, threading.get_ident())
    cm = timeline.activity(activity_name, tensor=tensor_name)
    cm.__enter__()
    _b.activities[key] = cm
    return True


def timeline_end_activity(tensor_name: str) -> bool:
    """Close the span opened for ``tensor_name`` on this thread; the file is rewritten
    at once so that the span can be read (BlueFog writes its timeline continuously)."""
    if _timeline_off("end"):
        return False
    cm = _b.activities.pop((tensor_name, threading.get_ident()), None)
    if cm is None:
        return False
    cm.__exit__(None, None, None)
    timeline.flush()
    return True


@contextlib.contextmanager
def timeline_context(tensor_name: str, activity_name: str) -> Iterator[None]:
    """``with bf.timeline_context(name, activity):`` records the block as one span."""
    timeline_start_activity(tensor_name, activity_name)
    try:
        yield
    finally:
        timeline_end_activity(tensor_name)
