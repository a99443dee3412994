"""BlueFog 0.3's ``bluefog.common.topology_util`` on decomm.

``from decomm.compat.bluefog import topology_util`` replaces
``from bluefog.common import topology_util``; every public function of BlueFog's
module is here with its signature, and the two collective helpers of
``bluefog.torch.topology_util`` (:func:`InferSourceFromDestinationRanks`,
:func:`InferDestinationFromSourceRanks`) as well.

Convention.  BlueFog describes a topology as a :class:`networkx.DiGraph` whose
edge ``i -> j`` carries the weight node ``i`` *sends* to node ``j``: its adjacency
matrix ``A`` (``nx.to_numpy_array``) is the **transpose** of decomm's mixing
matrix ``W`` (``W[i, j]`` = weight node ``i`` gives to node ``j``'s value,
``x <- W x``)::

    A = W.T        A[i, j] = W[j, i]

The constructors return such graphs (self-loops carry the self weights), built
from the decomm constructor where decomm has the same graph with the same
weights (:func:`ExponentialTwoGraph` and :func:`ExponentialGraph` with
``base=2`` are decomm's :func:`decomm.topology.ExponentialGraph`; the
bidirectional :func:`RingGraph` and :func:`FullyConnectedGraph` are decomm's
graphs of those names) and computed directly from BlueFog's definition otherwise
(:func:`StarGraph` is decomm's up to the last bit of one weight, so it is computed
directly too).  The unit tests check every
constructor against an independent evaluation of BlueFog's formula.

Differences from BlueFog (deliberate, each a fix of a corner case):

* bad arguments raise ``ValueError`` / ``TypeError`` naming the argument, where
  BlueFog raises ``AssertionError`` (or, for a node whose only successor is
  itself, ``ZeroDivisionError``);
* "is ``i`` a power of ``base``" is decided with integers; BlueFog's
  ``base ** int(math.log(i, base)) == i`` misses some exact powers to float
  rounding (``math.log(243, 3) = 4.999...``), so for ``base=3`` BlueFog's graphs
  of more than 243 nodes lack the edges at distance 243 that the definition asks
  for;
* the adjacency matrix of the ``Infer*`` helpers is normalised so that every
  *column* sums to 1 (the receiving weights, as their docstring promises and
  BlueFog's own tests expect); BlueFog divides by the row sums, which is the same
  only when every node has as many in- as out-neighbours;
* :func:`GetInnerOuterExpo2DynamicSendRecvRanks` on a single machine raises
  ``ValueError`` (BlueFog: ``OverflowError`` from ``int(log2(0))``).
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any

import networkx as nx
import numpy as np
import torch

from ... import ops, runtime
from ... import topology as _topo

__all__ = [
    "ExponentialGraph",
    "ExponentialTwoGraph",
    "FullyConnectedGraph",
    "GetDynamicOnePeerSendRecvRanks",
    "GetExp2DynamicSendRecvMachineRanks",
    "GetInnerOuterExpo2DynamicSendRecvRanks",
    "GetInnerOuterRingDynamicSendRecvRanks",
    "GetRecvWeights",
    "GetSendWeights",
    "InferDestinationFromSourceRanks",
    "InferSourceFromDestinationRanks",
    "IsRegularGraph",
    "IsTopologyEquivalent",
    "MeshGrid2DGraph",
    "RingGraph",
    "StarGraph",
    "SymmetricExponentialGraph",
    "isPowerOf",
]


# ------------------------------------------------------------------ helpers
def _int(value: Any, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{what} must be an int, got {value!r}")
    if int(value) < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value}")
    return int(value)


def _size(size: Any) -> int:
    return _int(size, "size", 1)


def _graph(A: np.ndarray) -> nx.DiGraph:
    """The DiGraph of a BlueFog (sender-row) weight matrix: edge i -> j iff A[i, j] != 0."""
    return nx.from_numpy_array(np.asarray(A, dtype=np.float64), create_using=nx.DiGraph)


def _from_decomm(topology: _topo.Topology) -> nx.DiGraph:
    """A static decomm topology as a BlueFog graph (``A = W.T``)."""
    return _graph(np.asarray(topology.matrix(0), dtype=np.float64).T)


def _circulant(first_row: np.ndarray) -> nx.DiGraph:
    """Row ``i`` is ``first_row`` rolled by ``i``: node i sends ``first_row[d]`` to i + d."""
    x = np.asarray(first_row, dtype=np.float64)
    n = x.size
    A = np.empty((n, n))
    for i in range(n):
        A[i] = np.roll(x, i)
    return _graph(A)


def _check_graph(topo: Any, what: str = "topo") -> nx.DiGraph:
    if not isinstance(topo, nx.DiGraph):
        raise TypeError(f"{what} must be a networkx.DiGraph, got {type(topo).__name__}")
    return topo


def _check_node(topo: nx.DiGraph, rank: Any, what: str = "rank") -> int:
    r = _int(rank, what, 0)
    if r not in topo:
        raise ValueError(f"{what}={r} is not a node of the topology "
                         f"({topo.number_of_nodes()} nodes)")
    return r


def _weight(topo: nx.DiGraph, u: int, v: int) -> float:
    # networkx's to_numpy_array counts an edge without a 'weight' attribute as 1
    return float(topo.edges[u, v].get("weight", 1.0))


# ------------------------------------------------------------- comparisons
def IsTopologyEquivalent(topo1: nx.DiGraph | None, topo2: nx.DiGraph | None) -> bool:
    """True iff the two graphs have the same weighted adjacency matrix.

    Not an isomorphism test: node ``k`` of one graph is compared with node ``k``
    of the other (node order of ``networkx.to_numpy_array``), weights exactly.
    ``None`` on either side gives ``False``.
    """
    if topo1 is None or topo2 is None:
        return False
    _check_graph(topo1, "topo1")
    _check_graph(topo2, "topo2")
    if topo1.number_of_nodes() != topo2.number_of_nodes():
        return False
    if topo1.number_of_edges() != topo2.number_of_edges():
        return False
    return bool(np.array_equal(nx.to_numpy_array(topo1), nx.to_numpy_array(topo2)))


def GetRecvWeights(topo: nx.DiGraph, rank: int) -> tuple[float, dict[int, float]]:
    """``(self_weight, {src: weight})``: what ``rank`` gives to itself and each in-neighbour.

    The weights are those of the edges ``src -> rank`` (``A[src, rank]``, i.e.
    decomm's ``W[rank, src]``); the self weight is the self-loop's, 0.0 without one.
    """
    _check_graph(topo)
    r = _check_node(topo, rank)
    self_weight, weights = 0.0, {}
    for src in topo.predecessors(r):
        if src == r:
            self_weight = _weight(topo, r, r)
        else:
            weights[src] = _weight(topo, src, r)
    return self_weight, weights


def GetSendWeights(topo: nx.DiGraph, rank: int) -> tuple[float, dict[int, float]]:
    """``(self_weight, {dst: weight})``: the weights on the edges ``rank -> dst``."""
    _check_graph(topo)
    r = _check_node(topo, rank)
    self_weight, weights = 0.0, {}
    for dst in topo.successors(r):
        if dst == r:
            self_weight = _weight(topo, r, r)
        else:
            weights[dst] = _weight(topo, r, dst)
    return self_weight, weights


def IsRegularGraph(topo: nx.DiGraph) -> bool:
    """True iff every node has the same degree (in + out, a self-loop counting twice)."""
    _check_graph(topo)
    if topo.number_of_nodes() == 0:
        raise ValueError("IsRegularGraph: the topology has no nodes")
    degree = topo.degree(0)
    return all(topo.degree(r) == degree for r in range(1, topo.number_of_nodes()))


# ------------------------------------------------------------ constructors
def isPowerOf(x: int, base: int) -> bool:
    """True iff ``x = base**k`` for an integer ``k >= 0`` (exact integer test)."""
    base = _int(base, "base", 2)
    x = _int(x, "x", 1)
    while x % base == 0:
        x //= base
    return x == 1


def ExponentialTwoGraph(size: int) -> nx.DiGraph:
    """Node i sends to ``(i + 2^k) mod size`` for every power ``2^k < size``; uniform weights.

    Each node has ``m = ceil(log2 size)`` out-neighbours and the self-loop, all with
    weight ``1 / (m + 1)`` (Ying et al., "Exponential graph is provably efficient for
    decentralized deep training", NeurIPS 2021).  The graph is decomm's
    :func:`decomm.topology.ExponentialGraph`, transposed into BlueFog's convention.
    """
    return _from_decomm(_topo.ExponentialGraph(_size(size)))


def ExponentialGraph(size: int, base: int = 2) -> nx.DiGraph:
    """Node i sends to ``(i + base^k) mod size`` for every power ``base^k < size``.

    Uniform weights ``1 / (m + 1)`` over the ``m`` such offsets and the self-loop.
    ``base=2`` is :func:`ExponentialTwoGraph`.
    """
    n = _size(size)
    base = _int(base, "base", 2)
    if base == 2:
        return ExponentialTwoGraph(n)
    x = np.array([1.0] + [1.0 if isPowerOf(d, base) else 0.0 for d in range(1, n)])
    return _circulant(x / x.sum())


def SymmetricExponentialGraph(size: int, base: int = 4) -> nx.DiGraph:
    """Node i links to ``i ± base^k`` (mod size): the offsets ``d <= size // 2`` that are
    powers of ``base``, mirrored (``d -> size - d``); uniform weights over those and itself.

    The offset set is symmetric, so the matrix is symmetric and doubly stochastic.
    """
    n = _size(size)
    base = _int(base, "base", 2)
    x = [1.0]
    for d in range(1, n):
        dist = d if d <= n // 2 else n - d
        x.append(1.0 if isPowerOf(dist, base) else 0.0)
    v = np.array(x)
    return _circulant(v / v.sum())


def MeshGrid2DGraph(size: int, shape: tuple[int, int] | None = None) -> nx.DiGraph:
    """2-D grid (no wrap-around) of ``nrow x ncol`` nodes, Metropolis-Hastings weights.

    Node ``i`` (row-major) links to its left/right/up/down grid neighbours.  With
    ``N_i`` the neighbours of i *including i*, the weight between neighbours is
    ``1 / max(|N_i|, |N_j|)`` and the self weight is what makes the row sum 1
    (Metropolis-Hastings rule; Xiao & Boyd, "Fast linear iterations for distributed
    averaging", 2004): symmetric and doubly stochastic.  Without ``shape``,
    ``nrow`` is the largest divisor of ``size`` not above ``sqrt(size)``
    (``size`` prime gives a line).
    """
    n = _size(size)
    if shape is None:
        r = int(np.sqrt(n))
        while n % r:
            r -= 1
        nrow, ncol = r, n // r
    else:
        if not isinstance(shape, (tuple, list)) or len(shape) != 2:
            raise TypeError(f"shape must be a pair (nrow, ncol), got {shape!r}")
        nrow, ncol = _int(shape[0], "shape[0]", 1), _int(shape[1], "shape[1]", 1)
        if nrow * ncol != n:
            raise ValueError(f"shape {nrow} x {ncol} = {nrow * ncol} does not match size={n}")
    adj = np.eye(n, dtype=bool)
    for i in range(n):
        if (i + 1) % ncol:  # right neighbour in the same row
            adj[i, i + 1] = adj[i + 1, i] = True
        if i + ncol < n:  # neighbour below
            adj[i, i + ncol] = adj[i + ncol, i] = True
    closed = adj.sum(axis=1)  # |N_i|, self included
    A = np.zeros((n, n))
    for i in range(n):
        for j in np.flatnonzero(adj[i]):
            if j != i:
                A[i, j] = 1.0 / max(closed[i], closed[j])
        A[i, i] = 1.0 - A[i].sum()
    return _graph(A)


def StarGraph(size: int, center_rank: int = 0) -> nx.DiGraph:
    """Star around ``center_rank``: every other node links both ways to the centre.

    Edge weights ``1/size`` each way; self weights ``1 - 1/size`` for the leaves and
    ``1/size`` for the centre (Metropolis-Hastings; symmetric, doubly stochastic).
    ``center_rank=0`` is decomm's :func:`decomm.topology.StarGraph` up to the last bit
    of the centre's self weight (decomm computes it as ``1 - (n-1)/n``, BlueFog sets
    ``1/n``), so the graph is built directly, with BlueFog's numbers.
    """
    n = _size(size)
    c = _int(center_rank, "center_rank", 0)
    if c >= n:
        raise ValueError(f"center_rank={c} is out of range for size={n}")
    A = np.diag(np.full(n, 1.0 - 1.0 / n))
    A[c, :] = 1.0 / n
    A[:, c] = 1.0 / n
    return _graph(A)


def RingGraph(size: int, connect_style: int = 0) -> nx.DiGraph:
    """Ring: ``connect_style`` 0 = both directions (weights 1/3), 1 = node i sends to
    ``i - 1`` only, 2 = to ``i + 1`` only (weights 1/2 for the neighbour and itself).

    One node is the identity and two nodes the single edge with weights 1/2, whatever
    the style.  Style 0 is decomm's :func:`decomm.topology.RingGraph`.
    """
    n = _size(size)
    if isinstance(connect_style, bool) or connect_style not in (0, 1, 2):
        raise ValueError(f"connect_style must be 0 (both directions), 1 (left) or 2 "
                         f"(right), got {connect_style!r}")
    if connect_style == 0 or n <= 2:
        return _from_decomm(_topo.RingGraph(n))
    x = np.zeros(n)
    x[0] = 0.5
    x[-1 if connect_style == 1 else 1] = 0.5
    return _circulant(x)


def FullyConnectedGraph(size: int) -> nx.DiGraph:
    """Every node sends ``1/size`` to every node, itself included (exact average)."""
    return _from_decomm(_topo.FullyConnectedGraph(_size(size)))


# ------------------------------------------------- dynamic send/recv patterns
def GetDynamicOnePeerSendRecvRanks(
        topo: nx.DiGraph, self_rank: int) -> Iterator[tuple[list[int], list[int]]]:
    """Yield ``([send_rank], recv_ranks)`` for one-peer rounds cycling through ``topo``.

    Every node sorts its out-neighbours (self excluded) clockwise, i.e. by
    ``(j - i) mod size``; in round ``t`` node ``i`` sends to the ``t mod deg_i``-th
    of them.  ``recv_ranks`` are the nodes that send to ``self_rank`` in that round
    (ascending).  Over ``lcm`` of the degrees the rounds use every edge of ``topo``.
    Typical use: set ``dst_weights``/``src_weights`` of a neighbour_allreduce (or of
    an optimizer's knobs) from each yielded pair.
    """
    _check_graph(topo)
    me = _check_node(topo, self_rank, "self_rank")
    size = topo.number_of_nodes()
    order = []
    for r in range(size):
        succ = sorted((s for s in topo.successors(r) if s != r),
                      key=lambda s, r=r: (s - r) % size)
        if not succ:
            raise ValueError(f"GetDynamicOnePeerSendRecvRanks: node {r} has no out-neighbour "
                             f"other than itself, so it has nobody to send to")
        order.append(succ)

    def gen() -> Iterator[tuple[list[int], list[int]]]:
        index = 0
        while True:
            send = order[me][index % len(order[me])]
            recv = [r for r in range(size)
                    if r != me and order[r][index % len(order[r])] == me]
            yield [send], recv
            index += 1

    return gen()


def _homogeneous(world_size: Any, local_size: Any) -> tuple[int, int]:
    w = _int(world_size, "world_size", 1)
    loc = _int(local_size, "local_size", 1)
    if w % loc:
        raise ValueError(f"world_size={w} is not a multiple of local_size={loc}: these "
                         "patterns need the same number of processes on every machine")
    return w, loc


def GetExp2DynamicSendRecvMachineRanks(
        world_size: int, local_size: int, self_rank: int, local_rank: int
) -> Iterator[tuple[list[int], list[int]]]:
    """Yield ``([send_machine], [recv_machine])``: one-peer exponential-2 rounds over machines.

    With ``M = world_size / local_size`` machines and ``m`` this rank's machine,
    round ``t`` sends to machine ``(m + 2^k) mod M`` and receives from
    ``(m - 2^k) mod M`` with ``k = t mod (floor(log2(M - 1)) + 1)``.  For
    ``hierarchical_neighbor_allreduce``'s machine weights; homogeneous machines only
    (rank = machine * local_size + local_rank), at least two machines.
    """
    w, loc = _homogeneous(world_size, local_size)
    me = _int(self_rank, "self_rank", 0)
    lr = _int(local_rank, "local_rank", 0)
    if me >= w:
        raise ValueError(f"self_rank={me} is out of range for world_size={w}")
    if me % loc != lr:
        raise ValueError(f"self_rank={me} is not local rank {lr} of a machine of {loc} "
                         "processes (ranks must be placed machine by machine)")
    if w <= loc:
        raise ValueError(f"GetExp2DynamicSendRecvMachineRanks needs at least two machines "
                         f"(world_size={w}, local_size={loc})")
    machine, machines = me // loc, w // loc
    period = (machines - 1).bit_length()  # floor(log2(M - 1)) + 1, exactly

    def gen() -> Iterator[tuple[list[int], list[int]]]:
        index = 0
        while True:
            dist = 1 << (index % period)
            yield [(machine + dist) % machines], [(machine - dist) % machines]
            index += 1

    return gen()


def _inner_outer_args(world_size: Any, local_size: Any, self_rank: Any,
                      who: str) -> tuple[int, int, int]:
    w, loc = _homogeneous(world_size, local_size)
    me = _int(self_rank, "self_rank", 0)
    if me >= w:
        raise ValueError(f"self_rank={me} is out of range for world_size={w}")
    if loc <= 2:
        raise ValueError(f"{who} needs more than 2 processes per machine (local_size={loc}); "
                         "use hierarchical_neighbor_allreduce or GetDynamicOnePeerSendRecvRanks")
    return w, loc, me


def GetInnerOuterRingDynamicSendRecvRanks(
        world_size: int, local_size: int, self_rank: int
) -> Iterator[tuple[list[int], list[int]]]:
    """Yield ``([send_rank], [recv_rank])`` for the inner-ring/outer-ring pattern.

    In round ``t`` the process with local rank ``t mod local_size`` on every machine
    talks across machines (sends to the same local rank on the next machine,
    receives from the previous one); the others form a ring inside their machine
    that skips it.  Homogeneous machines, more than 2 processes each.
    """
    w, loc, me = _inner_outer_args(world_size, local_size, self_rank,
                                   "GetInnerOuterRingDynamicSendRecvRanks")
    machines = w // loc
    machine, local = me // loc, me % loc

    def gen() -> Iterator[tuple[list[int], list[int]]]:
        index = 0
        while True:
            outside = index % loc
            if outside == local:
                send = ((machine + 1) % machines) * loc + local
                recv = ((machine - 1) % machines) * loc + local
            else:
                nxt = (local + 1) % loc
                if nxt == outside:
                    nxt = (nxt + 1) % loc
                prv = (local - 1) % loc
                if prv == outside:
                    prv = (prv - 1) % loc
                send, recv = machine * loc + nxt, machine * loc + prv
            yield [send], [recv]
            index += 1

    return gen()


def GetInnerOuterExpo2DynamicSendRecvRanks(
        world_size: int, local_size: int, self_rank: int
) -> Iterator[tuple[list[int], list[int]]]:
    """Yield ``([send_rank], [recv_rank])`` for the inner-exp2/outer-exp2 pattern.

    As :func:`GetInnerOuterRingDynamicSendRecvRanks`, but the process going outside
    sends to the same local rank ``2^k`` machines ahead (``k = t mod
    (floor(log2(M - 1)) + 1)``), and the others send ``2^k`` places ahead inside the
    machine (``k = t mod (floor(log2(local_size - 2)) + 1)``), one further when that
    would land on or pass the outgoing process.  At least two machines.
    """
    w, loc, me = _inner_outer_args(world_size, local_size, self_rank,
                                   "GetInnerOuterExpo2DynamicSendRecvRanks")
    machines = w // loc
    if machines < 2:
        raise ValueError(f"GetInnerOuterExpo2DynamicSendRecvRanks needs at least two machines "
                         f"(world_size={w}, local_size={loc}); use "
                         "GetInnerOuterRingDynamicSendRecvRanks or GetDynamicOnePeerSendRecvRanks")
    out_period = (machines - 1).bit_length()  # floor(log2(M - 1)) + 1
    in_period = (loc - 2).bit_length()  # floor(log2(local_size - 2)) + 1
    machine, local = me // loc, me % loc

    def gen() -> Iterator[tuple[list[int], list[int]]]:
        index = 0
        while True:
            outside = index % loc
            if outside == local:
                dist = 1 << (index % out_period)
                send = ((machine + dist) % machines) * loc + local
                recv = ((machine - dist) % machines) * loc + local
            else:
                fwd = 1 << (index % in_period)
                if fwd >= (outside - local) % loc:
                    fwd += 1
                back = 1 << (index % in_period)
                if back >= (local - outside) % loc:
                    back += 1
                send = machine * loc + (local + fwd) % loc
                recv = machine * loc + (local - back) % loc
            yield [send], [recv]
            index += 1

    return gen()


# ---------------------------------------------------- collective inference
def _check_ranks(ranks: Any, what: str, me: int, size: int) -> list[int]:
    if isinstance(ranks, (str, bytes)) or not hasattr(ranks, "__iter__"):
        raise TypeError(f"{what} must be a list of ranks, got {type(ranks).__name__}")
    out = list(ranks)
    for r in out:
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)):
            raise TypeError(f"{what} on rank {me}: {r!r} is not an int rank")
        if not 0 <= int(r) < size:
            raise ValueError(f"{what} on rank {me}: rank {r} is out of range for {size} ranks")
    if len(set(out)) != len(out):
        raise ValueError(f"{what} on rank {me}: {out} names a rank twice")
    if me in out:
        raise ValueError(f"{what} on rank {me}: {out} contains this rank itself")
    return [int(r) for r in out]


def _infer(ranks: list[int], transpose: bool, construct_adjacency_matrix: bool) -> Any:
    me, size = runtime.rank(), runtime.size()
    degrees = ops.allgather(torch.tensor([len(ranks)], dtype=torch.int64),
                            name="decomm.compat.infer.degrees").tolist()
    flat = ops.allgather(torch.tensor(ranks, dtype=torch.int64),
                         name="decomm.compat.infer.ranks").tolist()
    lists, off = {}, 0
    for k, d in enumerate(degrees):
        lists[k] = sorted(flat[off:off + d])
        off += d
    inverse = collections.defaultdict(list)
    for k in range(size):
        for v in lists[k]:
            inverse[v].append(k)
    result = list(inverse.get(me, []))
    if not construct_adjacency_matrix:
        return result
    A = np.eye(size)
    for k, adj in lists.items():
        A[k, adj] = 1.0
    if transpose:
        A = A.T
    return result, A / A.sum(axis=0)


def InferSourceFromDestinationRanks(
        dst_ranks: list[int], construct_adjacency_matrix: bool = False) -> Any:
    """Every rank names whom it sends to; return whom this rank receives from.

    Collective (two ``allgather`` calls): every rank must call it.  The result is
    ascending.  With ``construct_adjacency_matrix=True`` also return the
    ``size x size`` matrix ``A`` of the whole graph in BlueFog's convention
    (``A[i, j]`` = weight ``i`` sends to ``j``, self-loops included) with uniform
    receiving weights: every column sums to 1.  ``dst_ranks`` must be distinct
    ints in ``[0, size)`` other than this rank (``ValueError``/``TypeError``).
    """
    ranks = _check_ranks(dst_ranks, "dst_ranks", runtime.rank(), runtime.size())
    return _infer(ranks, False, construct_adjacency_matrix)


def InferDestinationFromSourceRanks(
        src_ranks: list[int], construct_adjacency_matrix: bool = False) -> Any:
    """Every rank names whom it receives from; return whom this rank sends to.

    The mirror of :func:`InferSourceFromDestinationRanks` (same matrix convention,
    same checks); collective.
    """
    ranks = _check_ranks(src_ranks, "src_ranks", runtime.rank(), runtime.size())
    return _infer(ranks, True, construct_adjacency_matrix)
