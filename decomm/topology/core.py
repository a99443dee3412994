"""The :class:`Topology` type: a cycle of sparse mixing matrices, or a seeded random family.

Convention (the documentation's Concepts page, ``docs/concepts.rst``): round ``t`` is
an n x n row-stochastic matrix ``W(t)`` with ``W[i, j]`` = the weight node ``i`` gives
to the value it receives from node ``j``; one gossip step is ``x_new = W(t) @ x``, i.e.
``x_new[i] = W[i, i] x[i] + sum_j W[i, j] x[j]``.
In-neighbours of ``i`` are ``{j != i : W[i, j] != 0}`` (row ``i``), out-neighbours are
``{j != i : W[j, i] != 0}`` (column ``i``).

A topology is either

* a **finite cycle** ``W(0), ..., W(L-1)`` (``rounds == L``; a static graph has
  ``L == 1``) and round ``t`` means ``W(t mod L)``; or
* a **seeded random family** (``rounds is None``, e.g. EquiDyn) whose round ``t`` is
  a pure function of ``(seed, t)``, computed in O(n) on every rank with no
  communication.

Rounds are stored in CSR form (see :class:`~decomm.topology._sparse.SparseRound`),
never densely unless :meth:`Topology.matrix` is called.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from . import analysis as _analysis
from ._sparse import SparseRound

__all__ = ["SparseRound", "Topology", "stochastic_tolerance"]

#: Number of rounds (t = 0 .. SAMPLE_ROUNDS-1) that analysis of a random family
#: (max degree, stochasticity, symmetry, expected spectral gap) looks at.
SAMPLE_ROUNDS = 64


def _check_int(value: Any, what: str, minimum: int = 0) -> int:
    """Return ``value`` as an int, or raise ValueError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{what} must be an integer, got {value!r}")  # noqa: TRY004 - API contract: ValueError
    value = int(value)
    if value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value}")
    return value


#: Machine epsilon of float64, the precision of every built-in constructor.
FLOAT64_EPS = float(np.finfo(np.float64).eps)

#: Largest row-sum error ever put down to rounding: beyond it a row is wrong, whatever
#: the input precision (reached only for float16/bfloat16 input or float32 with n > 4e4).
MAX_STOCHASTIC_TOL = 1e-2


def stochastic_tolerance(n: int, eps: float = FLOAT64_EPS) -> float:
    """How far from 1 a row (or column) sum of an n x n mixing matrix may be, for input
    given with machine epsilon ``eps``: ``min(n * max(1e-12, 2 eps), 1e-2)``.

    Rounding an exactly stochastic row to a binary format moves each weight by at most
    ``eps/2`` of itself, hence the row sum by at most ``eps/2``; a matrix computed in
    that format (``A / A.sum(1)``) accumulates up to about ``n eps/2``.  So float64 keeps
    ``1e-12 n`` and float32 gets ``2.4e-7 n`` (the 1/3 ring stored as float32 sums to
    ``1 + 2.98e-8``), float16 ``0.002 n``; the result is capped at ``1e-2``, which is
    still above the ``2^-8`` by which rounding to bfloat16 can move a row sum.
    """
    return min(n * max(1e-12, 2.0 * max(float(eps), FLOAT64_EPS)), MAX_STOCHASTIC_TOL)


def _dtype_eps(dtype: Any) -> float:
    """Machine epsilon of a numpy or torch dtype; float64's for exact (integer, bool)
    and unknown types."""
    if getattr(dtype, "is_floating_point", False) and getattr(dtype, "itemsize", 8) < 8:
        import torch  # a torch dtype: torch is already imported by whoever made it

        return float(torch.finfo(dtype).eps)
    try:
        np_dtype = np.dtype(dtype)
    except TypeError:
        return FLOAT64_EPS
    if np.issubdtype(np_dtype, np.floating):
        return max(float(np.finfo(np_dtype).eps), FLOAT64_EPS)
    return FLOAT64_EPS


def _as_numpy_matrix(m: Any, index: int) -> tuple[np.ndarray, float]:
    """Convert a numpy array / torch tensor / nested list into a float64 ndarray.

    Returns the array and the machine epsilon of the input's dtype (float32 input:
    ``2**-23``), which sets how close to 1 its row sums can be expected to be.  The
    float64 array holds exactly the given values (a float32 1/3 stays 0.3333333432...).
    """
    if hasattr(m, "detach") and hasattr(m, "cpu"):  # torch.Tensor, without importing torch
        eps = _dtype_eps(m.dtype)
        m = m.detach().cpu()
        m = (m.double() if hasattr(m, "double") else m).numpy()  # bfloat16 has no numpy twin
    else:
        try:
            eps = _dtype_eps(np.asarray(m).dtype)  # lists of np.float32 scalars too
        except (TypeError, ValueError):
            eps = FLOAT64_EPS
    try:
        arr = np.asarray(m, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"round {index}: cannot convert {type(m).__name__} to a float matrix") from exc
    return arr, eps


def _precision_label(eps: float) -> str:
    return {FLOAT64_EPS: "float64", 2.0**-23: "float32", 2.0**-10: "float16",
            2.0**-7: "bfloat16"}.get(eps, f"eps={eps:.3g}")


#: Weights enter the fingerprint rounded to multiples of this (2^-40 ~ 9.1e-13), so that
#: constructions that differ only in rounding (1/3 against 1 - 2/3) agree, while any
#: difference above the grid is caught.
FINGERPRINT_GRID = 2.0**-40


def _fingerprint_weights(data: np.ndarray) -> np.ndarray:
    """Weights on the fingerprint grid, as little-endian float64 (integers up to 2^53
    exactly; larger weights of hand-built rounds keep their own value)."""
    q = np.rint(np.asarray(data, dtype=np.float64) / FINGERPRINT_GRID) + 0.0  # no -0.0
    return q.astype("<f8")


class Topology:
    """A (time-varying) communication topology for decentralized averaging.

    Build one with a constructor (``RingGraph(8)``, ``BaseGraph(25, 2)``, ...),
    :meth:`from_matrices` or :meth:`from_networkx`.

    Attributes:
        n: number of nodes.
        rounds: cycle length L (round ``t`` uses ``W(t mod L)``), or ``None`` for an
            infinite seeded random family.
        name: human-readable name, e.g. ``"BaseGraph(n=25, k=2)"``.
        params: the constructor parameters (includes ``seed`` for random families).
        kind: the constructor's name, e.g. ``"BaseGraph"``.
        details: construction notes (e.g. hyper-hypercube factors, torus shape).
        stochastic_tol: how far from 1 a row or column sum may be given the precision
            the matrices were given in (:func:`stochastic_tolerance`): ``1e-12 * n`` for
            the constructors and float64 input, ``2.4e-7 * n`` for float32 input.
            :meth:`is_row_stochastic` and :meth:`is_doubly_stochastic` use it by default.

    >>> W = [[0.5, 0.5], [0.5, 0.5]]
    >>> topo = Topology.from_matrices([W])
    >>> topo.rounds, topo.weights(0, 10**6)
    (1, (0.5, {1: 0.5}))
    """

    def __init__(
        self,
        n: int,
        round_list: Sequence[SparseRound] | None = None,
        *,
        generator: Callable[[int], SparseRound] | None = None,
        name: str | None = None,
        kind: str = "Topology",
        params: Mapping[str, Any] | None = None,
        sample_rounds: int = SAMPLE_ROUNDS,
        stochastic_tol: float | None = None,
        mean_square_rate: Callable[[], float] | None = None,
    ) -> None:
        """Low-level constructor; prefer the graph constructors or :meth:`from_matrices`.

        Give either ``round_list`` (the cycle, as :class:`SparseRound` objects) or
        ``generator`` (``t -> SparseRound``, a pure function of t for a random family;
        its identity must be fully described by ``params``, which the fingerprint
        hashes).  Rounds are not validated here.  ``stochastic_tol`` (default
        ``stochastic_tolerance(n)``, float64 precision) is kept as an attribute.
        ``mean_square_rate`` (random families only) returns the exact rate ``rho`` of
        :meth:`spectral_gap` from the family's distribution; without it the rate is
        estimated from sampled rounds.
        """
        self.n = _check_int(n, "n", 1)
        if (round_list is None) == (generator is None):
            raise ValueError(
                "give exactly one of round_list (a cycle) or generator (a random family)")
        self.kind = kind
        self.params: dict[str, Any] = dict(params) if params is not None else {"n": self.n}
        self.name = name if name is not None else kind + "(" + ", ".join(
            f"{k}={v!r}" for k, v in self.params.items()) + ")"
        self._generator = generator
        if mean_square_rate is not None and generator is None:
            raise ValueError("mean_square_rate is for random families (generator=...)")
        self._mean_square_rate = mean_square_rate
        self._cache: OrderedDict[int, SparseRound] = OrderedDict()
        self._cache_lock = threading.Lock()
        self.sample_rounds = int(sample_rounds)
        self.stochastic_tol = (stochastic_tolerance(self.n) if stochastic_tol is None
                               else float(stochastic_tol))
        if round_list is not None:
            rl = list(round_list)
            if not rl:
                raise ValueError("a topology needs at least one round")
            for idx, r in enumerate(rl):
                if not isinstance(r, SparseRound) or r.n != self.n:
                    raise ValueError(f"round {idx}: expected a SparseRound of size n={self.n}")
            self._rounds: list[SparseRound] | None = rl
            self.rounds: int | None = len(rl)
        else:
            self._rounds = None
            self.rounds = None
        self._fingerprint: str | None = None
        #: Construction notes (e.g. the chosen factorisation); not part of the fingerprint.
        self.details: dict[str, Any] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_matrices(cls, matrices: Any, name: str | None = None) -> Topology:
        """A cycle of the given mixing matrices (numpy arrays, torch tensors or lists).

        A single 2-D matrix is accepted as a static topology.  Each matrix is
        validated: 2-D, square, all of the same size, finite, non-negative, and every
        row sums to 1 within the tolerance of its dtype, ``stochastic_tolerance(n, eps)``
        (``1e-12 * n`` for float64, ``2.4e-7 * n`` for float32 tensors or arrays, so the
        1/3 ring written as a default float32 tensor is accepted).  The matrices are
        stored as float64 (the given values, converted exactly) and the topology's
        ``stochastic_tol`` is that of its least precise round.  The ValueError names the
        round index and the row / entry at fault.

        >>> Topology.from_matrices([[[1.0, 0.0], [0.5, 0.5]]]).in_neighbors(1, 0)
        [0]
        """
        if hasattr(matrices, "ndim") and matrices.ndim == 2:
            matrices = [matrices]
        elif isinstance(matrices, (list, tuple)) and matrices and not hasattr(matrices[0], "ndim") \
                and isinstance(matrices[0], (list, tuple)) and matrices[0] \
                and isinstance(matrices[0][0], numbers.Real):
            matrices = [matrices]  # a single nested-list matrix
        try:
            mats = list(matrices)
        except TypeError as exc:
            raise ValueError("from_matrices expects a list of 2-D matrices") from exc
        if not mats:
            raise ValueError("from_matrices needs at least one matrix")
        return cls._from_arrays([_as_numpy_matrix(m, idx) for idx, m in enumerate(mats)], name)

    @classmethod
    def _from_arrays(cls, arrays: Sequence[tuple[np.ndarray, float]],
                     name: str | None) -> Topology:
        """Validate (float64 array, input eps) pairs and build the cycle."""
        n = None
        rounds = []
        worst_eps = FLOAT64_EPS
        for idx, (arr, eps) in enumerate(arrays):
            worst_eps = max(worst_eps, eps)
            if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
                raise ValueError(f"round {idx}: matrix must be square 2-D, got shape {arr.shape}")
            if n is None:
                n = arr.shape[0]
                if n < 1:
                    raise ValueError("round 0: matrix is empty")
            elif arr.shape[0] != n:
                raise ValueError(f"round {idx}: size {arr.shape[0]} differs from round 0 size {n}")
            bad = ~np.isfinite(arr)
            if bad.any():
                i, j = map(int, np.argwhere(bad)[0])
                raise ValueError(
                    f"round {idx}: entry W[{i}, {j}] = {float(arr[i, j])} is not finite")
            if (arr < 0).any():
                i, j = map(int, np.argwhere(arr < 0)[0])
                raise ValueError(f"round {idx}: negative weight W[{i}, {j}] = {float(arr[i, j])!r}")
            sums = arr.sum(axis=1)
            tol = stochastic_tolerance(n, eps)
            off = np.abs(sums - 1.0) > tol
            if off.any():
                i = int(np.argmax(off))
                raise ValueError(
                    f"round {idx}: row {i} sums to {float(sums[i])!r}, not 1 within {tol:.3g} "
                    f"(the tolerance for {_precision_label(eps)} input with n={n}; rows must "
                    "be stochastic: x_new[i] = sum_j W[i, j] x[j])")
            rounds.append(SparseRound.from_dense(arr))
        assert n is not None
        if name is None:
            name = f"Topology.from_matrices(n={n}, rounds={len(rounds)})"
        return cls(n, rounds, name=name, kind="FromMatrices",
                   params={"n": n, "rounds": len(rounds)},
                   stochastic_tol=stochastic_tolerance(n, worst_eps))

    @classmethod
    def from_networkx(cls, graph: Any, name: str | None = None) -> Topology:
        """A static topology from a networkx graph.

        * Undirected ``nx.Graph``: Metropolis-Hastings weights (Xiao & Boyd 2004),
          ``W[i, j] = 1 / (1 + max(deg i, deg j))`` for every edge and
          ``W[i, i] = 1 - sum_j W[i, j]``; symmetric and doubly stochastic.
          Self-loops are ignored.
        * Directed ``nx.DiGraph``: the edge attribute ``weight`` of ``u -> v`` is taken as
          ``W[v, u]`` (v receives from u; a self-loop ``i -> i`` is ``W[i, i]``) and the
          result is validated like :meth:`from_matrices` (weights given as float32
          scalars get the float32 tolerance).  This is the inverse of
          :meth:`to_networkx`.

        Nodes must be the integers ``0 .. n-1`` (use
        ``nx.convert_node_labels_to_integers`` otherwise).  Only the graph's own
        methods are used (``nodes``, ``edges``, ``is_directed``): decomm itself does
        not import networkx, an optional dependency (``pip install 'decomm[networkx]'``).

        >>> import networkx as nx
        >>> Topology.from_networkx(nx.path_graph(3)).matrix(0).round(4).tolist()
        [[0.6667, 0.3333, 0.0], [0.3333, 0.3333, 0.3333], [0.0, 0.3333, 0.6667]]
        """
        nodes = sorted(graph.nodes())
        n = len(nodes)
        if n == 0:
            raise ValueError("graph has no nodes")
        if nodes != list(range(n)):
            raise ValueError("graph nodes must be the integers 0..n-1 "
                             "(relabel with networkx.convert_node_labels_to_integers)")
        if graph.is_directed():
            mat = np.zeros((n, n))
            eps = FLOAT64_EPS
            for u, v, w in graph.edges(data="weight"):
                if w is None:
                    raise ValueError(f"directed edge {u} -> {v} has no 'weight' attribute")
                if hasattr(w, "dtype"):  # a numpy / torch scalar keeps its precision
                    eps = max(eps, _dtype_eps(w.dtype))
                    w = float(w)
                mat[v, u] = w
            topo = cls._from_arrays([(mat, eps)],
                                    name or f"Topology.from_networkx(n={n}, directed)")
            topo.kind = "FromNetworkx"
            return topo
        edges = np.array([(u, v) for u, v in graph.edges() if u != v], dtype=np.int64)
        edges = edges.reshape(-1, 2)
        edges = np.unique(np.sort(edges, axis=1), axis=0)
        deg = np.bincount(edges.ravel(), minlength=n)
        w = 1.0 / (1.0 + np.maximum(deg[edges[:, 0]], deg[edges[:, 1]]))
        rows = np.concatenate([edges[:, 0], edges[:, 1]])
        cols = np.concatenate([edges[:, 1], edges[:, 0]])
        rnd = SparseRound.from_coo(n, rows, cols, np.concatenate([w, w]))
        return cls(n, [rnd], name=name or f"Topology.from_networkx(n={n}, edges={len(edges)})",
                   kind="FromNetworkx", params={"n": n, "edges": len(edges)})

    def to_networkx(self, t: int = 0) -> Any:
        """Round ``t`` as a ``networkx.DiGraph``.

        Edge ``j -> i`` (j sends to i) carries ``weight = W[i, j]``; every node has a
        self-loop ``i -> i`` with ``weight = W[i, i]`` when that is non-zero.
        ``Topology.from_networkx`` of the result gives the same round back.

        networkx is an optional dependency (``pip install 'decomm[networkx]'``);
        nothing else in decomm imports it.
        """
        try:
            import networkx as nx
        except ImportError as exc:
            raise ImportError(
                "Topology.to_networkx needs networkx, an optional dependency of decomm: "
                "pip install 'decomm[networkx]' (or pip install networkx)") from exc

        r = self.sparse(t)
        g = nx.DiGraph()
        g.add_nodes_from(range(self.n))
        g.add_weighted_edges_from(
            zip(r.indices.tolist(), r.row_ids.tolist(), r.data.tolist()))
        return g

    # ------------------------------------------------------------------ per-round access
    @property
    def is_random(self) -> bool:
        """True for an infinite seeded random family (``rounds is None``)."""
        return self.rounds is None

    def round_index(self, t: int) -> int:
        """The index of the matrix used at absolute round ``t`` (``t mod rounds``)."""
        t = _check_int(t, "round t", 0)
        return t % self.rounds if self.rounds is not None else t

    def sparse(self, t: int) -> SparseRound:
        """Round ``t`` in CSR form (read-only arrays)."""
        t = self.round_index(t)
        if self._rounds is not None:
            return self._rounds[t]
        with self._cache_lock:  # the runtime may query from a progress thread
            r = self._cache.get(t)
            if r is not None:
                self._cache.move_to_end(t)
                return r
        assert self._generator is not None
        r = self._generator(t)  # pure function of (seed, t): safe to compute twice
        with self._cache_lock:
            self._cache[t] = r
            while len(self._cache) > 16:
                self._cache.popitem(last=False)
        return r

    def _check_node(self, i: int) -> int:
        i = _check_int(i, "node index i", 0)
        if i >= self.n:
            raise ValueError(f"node index i={i} out of range for n={self.n}")
        return i

    def weights(self, i: int, t: int) -> tuple[float, dict[int, float]]:
        """``(W[i, i], {j: W[i, j] for in-neighbours j != i})`` of round ``t``.

        Node i's update is ``x_i <- W[i, i] x_i + sum_j W[i, j] x_j``.
        """
        i = self._check_node(i)
        cols, vals = self.sparse(t).row(i)
        self_w = 0.0
        nb: dict[int, float] = {}
        for j, w in zip(cols.tolist(), vals.tolist()):
            if j == i:
                self_w = w
            else:
                nb[j] = w
        return self_w, nb

    def out_weights(self, i: int, t: int) -> dict[int, float]:
        """``{j: W[j, i]}`` for the out-neighbours j != i of node i in round ``t``
        (the weight each receiver gives to what i sends)."""
        i = self._check_node(i)
        cols, vals = self.sparse(t).T.row(i)
        return {j: w for j, w in zip(cols.tolist(), vals.tolist()) if j != i}

    def in_neighbors(self, i: int, t: int) -> list[int]:
        """Sorted in-neighbours of node i in round ``t``: ``{j != i : W[i, j] != 0}``."""
        i = self._check_node(i)
        cols, _ = self.sparse(t).row(i)
        return [j for j in cols.tolist() if j != i]

    def out_neighbors(self, i: int, t: int) -> list[int]:
        """Sorted out-neighbours of node i in round ``t``: ``{j != i : W[j, i] != 0}``."""
        i = self._check_node(i)
        cols, _ = self.sparse(t).T.row(i)
        return [j for j in cols.tolist() if j != i]

    def matrix(self, t: int = 0) -> np.ndarray:
        """Round ``t`` as a dense float64 n x n array (materialises O(n^2) memory)."""
        return self.sparse(t).to_dense()

    def mix(self, x: np.ndarray, t: int) -> np.ndarray:
        """One gossip step ``W(t) @ x`` for x of shape (n,) or (n, d), computed sparsely."""
        x = np.asarray(x, dtype=np.float64)
        if x.shape[:1] != (self.n,):
            raise ValueError(f"x must have leading dimension n={self.n}, got shape {x.shape}")
        return self.sparse(t).matmul(x)

    def analysis_rounds(self) -> range:
        """Round indices that analysis inspects: the whole cycle, or for a random
        family its first ``sample_rounds`` (64) rounds."""
        return range(self.rounds if self.rounds is not None else self.sample_rounds)

    def _iter_rounds(self) -> Iterable[SparseRound]:
        for t in self.analysis_rounds():
            yield self.sparse(t)

    # ------------------------------------------------------------------ identity
    def fingerprint(self) -> str:
        """A stable SHA-256 hex digest of the schedule, for ranks to check they share it.

        For a cycle: of n, the number of rounds and every round's CSR arrays (the
        sparsity pattern exactly, the weights rounded to multiples of
        :data:`FINGERPRINT_GRID` = 2^-40 ~ 9.1e-13), i.e. of the matrices
        ``W(0), ..., W(L-1)`` themselves; how they were built (``RingGraph(4)``,
        :meth:`from_matrices`, :meth:`from_networkx`), the name and the kind do not
        enter, so the same W built two ways has one fingerprint.  Weights that differ
        by more than the grid always change it; a difference of a few ulps (``1/3``
        against ``1 - 2/3``, one ulp apart) does not, unless the two values straddle
        the midpoint between two grid points (chance ~1e-4 per entry for arbitrary
        weights, none for 1/k with k < 1000).  For a random family
        (no stored rounds): of kind, parameters (seed included) and n, which determine
        every round.  Deterministic across processes, machines and Python versions.
        """
        if self._fingerprint is None:
            h = hashlib.sha256()
            if self._rounds is not None:
                header: dict[str, Any] = {"schedule": "cycle", "n": self.n,
                                          "rounds": self.rounds}
            else:
                header = {"schedule": "random", "kind": self.kind, "n": self.n,
                          "params": {k: repr(v) for k, v in sorted(self.params.items())}}
            h.update(json.dumps(header, sort_keys=True).encode())
            if self._rounds is not None:
                for r in self._rounds:
                    h.update(r.indptr.astype("<i8").tobytes())
                    h.update(r.indices.astype("<i8").tobytes())
                    h.update(_fingerprint_weights(r.data).tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def __repr__(self) -> str:
        rounds = "random" if self.rounds is None else str(self.rounds)
        return f"Topology({self.name}, rounds={rounds})"

    def __str__(self) -> str:
        return self.name

    # ------------------------------------------------------------------ analysis
    def max_degree(self) -> int:
        """Max over rounds and nodes of max(in-degree, out-degree), self-loops excluded.

        For a random family: over rounds 0 .. ``sample_rounds``-1 (64).
        """
        best = 0
        for r in self._iter_rounds():
            if r.n > 1:
                best = max(best, int(r.in_degrees().max()), int(r.out_degrees().max()))
        return best

    def is_row_stochastic(self, tol: float | None = None) -> bool:
        """Every inspected round is non-negative with rows summing to 1 within ``tol``
        (default :attr:`stochastic_tol`, the tolerance of the input's precision)."""
        tol = self.stochastic_tol if tol is None else tol
        return all(bool((r.data >= 0).all() and np.abs(r.row_sums() - 1).max() <= tol)
                   for r in self._iter_rounds())

    def is_doubly_stochastic(self, tol: float | None = None) -> bool:
        """Every inspected round is non-negative with rows and columns summing to 1
        within ``tol`` (default :attr:`stochastic_tol`).

        For a random family: rounds 0 .. ``sample_rounds``-1.
        """
        tol = self.stochastic_tol if tol is None else tol
        return all(bool((r.data >= 0).all()
                        and np.abs(r.row_sums() - 1).max() <= tol
                        and np.abs(r.col_sums() - 1).max() <= tol)
                   for r in self._iter_rounds())

    def is_symmetric(self, tol: float = 1e-12) -> bool:
        """Every inspected round satisfies ``W == W^T`` within ``tol``."""
        return all(r.is_symmetric(tol) for r in self._iter_rounds())

    def cycle_product(self) -> np.ndarray:
        """``P = W(L-1) @ ... @ W(1) @ W(0)`` (dense n x n), so ``x_L = P @ x_0``.

        Computed by applying the rounds in order to the identity, sparsely
        (O(L * nnz * n)).  Raises ValueError for a random family (no cycle).
        """
        return _analysis.cycle_product(self)

    def is_finite_time_exact(self, tol: float = 1e-10) -> bool:
        """True when one cycle averages exactly: ``max |P - J/n| <= tol``.

        Checked blockwise over columns of the identity, so memory stays O(n * 256)
        even for large n.  Always False for a random family.
        """
        return _analysis.is_finite_time_exact(self, tol)

    def spectral_gap(self, per_round: bool = False, samples: int = 256) -> float:
        """Consensus speed as ``1 - rho``: the fraction of the distance to the average
        that one round (static, random) or one cycle removes, in the worst case over
        starting points; 1 means exact averaging.

        ``rho`` is the contraction factor of the deviation from the average, ``x - xbar``
        (``xbar = J x / n``, ``J = 1 1^T``):

        * static (``rounds == 1``): ``rho = |lambda_2(W)|``, the second largest
          eigenvalue modulus (``= ||W - J/n||_2`` for symmetric doubly stochastic W);
        * cycles (``rounds = L > 1``): ``rho = ||P - J/n||_2`` for the cycle product
          ``P = W(L-1) ... W(0)``, so ``||x_L - xbar|| <= rho ||x_0 - xbar||``; exact
          sequences have gap 1 (rho below 1e-12 counts as 0).  With ``per_round=True``
          returns ``1 - rho ** (1 / L)``, comparable with static graphs;
        * random families (``rounds is None``, rounds drawn independently from one
          distribution): the root-mean-square contraction of one round,
          ``rho^2 = ||E[(W - J/n)^T (W - J/n)]||_2 = max_x E||(W - J/n) x||^2 / ||x||^2``,
          so ``E||x_t - xbar||^2 <= rho^(2t) ||x_0 - xbar||^2`` (the mean-square rate
          of Song et al., 2022).  For a single deterministic W this is the cycle
          definition with L = 1, ``||W - J/n||_2``.  It is not ``E||W - J/n||_2``,
          which is close to 1 for EquiDyn.  Exact for :func:`EquiDyn` (the average
          over all its equally likely rounds, in closed form); for other families
          estimated from rounds t = 0 .. ``samples``-1 of this topology's seed.
          Directed EquiDyn: ``rho^2 = (1 - eta)^2 + eta^2 (1 - 2/n)``, i.e.
          ``1/2 - 1/(2n)`` for eta = 1/2.

        Uses dense linear algebra, O(n^3) (plus O(samples * nnz * n) for sampled random
        families; O(n log n) for EquiDyn).
        """
        return _analysis.spectral_gap(self, per_round=per_round, samples=samples)

    def consensus_curve(self, steps: int, trials: int = 8, seed: int = 0,
                        start: int = 0) -> np.ndarray:
        """Relative consensus error over ``steps`` rounds from random starts.

        Returns an array e of length ``steps + 1`` with
        ``e[s] = mean over trials of ||x_s - xbar|| / ||x_0 - xbar||``, where
        ``x_{s+1} = W(start + s) x_s`` and ``x_0`` is standard normal (seeded by
        ``seed``).  Computed sparsely: O(steps * nnz * trials).
        """
        return _analysis.consensus_curve(self, steps, trials=trials, seed=seed, start=start)

    def plot(self, path: str, max_rounds: int = 12) -> None:
        """Draw each round (up to ``max_rounds``) on a circle into ``path`` (PNG, SVG, PDF)."""
        from .plotting import plot_topology

        plot_topology(self, path, max_rounds=max_rounds)
