"""Push-sum / Stochastic Gradient Push for directed (column-stochastic) graphs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import _agree, ops
from ..errors import DecommError
from ._base import DecentralizedOptimizer, Mix
from ._flat import block_elements
from .comm import Communicator, MPICommunicator, PendingExchange

__all__ = ["PushSum", "PushWeights", "push_communicator"]


def _push_topology(weights: Any, n: int, owner: str = "PushSum") -> Any:
    """A Topology whose round t is P(t)ᵀ (row-stochastic iff P(t) is column-stochastic)."""
    from decomm.topology import Topology

    mats = weights
    if isinstance(mats, Tensor) or (hasattr(mats, "ndim") and mats.ndim == 2):
        mats = [mats]
    out = []
    for k, m in enumerate(mats):
        a = m.detach().cpu().numpy() if isinstance(m, Tensor) else np.asarray(m, dtype=np.float64)
        if a.ndim != 2 or a.shape != (n, n):
            raise ValueError(f"{owner} weights[{k}]: expected an {n} x {n} matrix "
                             f"(decomm.size() = {n}), got shape {a.shape}")
        if not np.isfinite(a).all() or (a < 0).any():
            raise ValueError(f"{owner} weights[{k}]: entries must be finite and non-negative")
        cols = a.sum(axis=0)
        bad = np.flatnonzero(np.abs(cols - 1.0) > 1e-9 * max(n, 1))
        if bad.size:
            j = int(bad[0])
            raise ValueError(f"{owner} weights[{k}]: column {j} sums to {cols[j]:.12g}, not 1; "
                             "push-sum needs column-stochastic P (P[i, j] = the share of node "
                             "j's mass sent to node i)")
        out.append(a.T.copy())
    if not out:
        raise ValueError(f"{owner} weights: give at least one matrix")
    return Topology.from_matrices(out, name="push-sum P^T")


class PushWeights:
    """Round ``t``'s column-stochastic push matrix ``P(t)``, per rank or whole.

    ``P[j, i]`` is the share of node i's mass sent to node j.  ``push`` is the
    :class:`~decomm.topology.Topology` of ``P(t)ᵀ`` (the ``weights=`` given to the
    wrapper, see :func:`_push_topology`), or ``None``: the uniform split over the
    graph of round t of ``topology()`` (the runtime's or the simulation's), ``P[j, i]
    = 1 / (outdeg_i(t) + 1)`` for j in ``{i} ∪ out(i)``.  :meth:`of` serves one rank
    (the MPI messages); :meth:`matrix` the whole ``P(t)`` (the simulator's mix).
    """

    def __init__(self, topology: Callable[[], Any], push: Any) -> None:
        self._topology = topology
        self._push = push
        self._cache: dict[tuple, tuple] = {}
        self._matrices: dict[tuple, Any] = {}
        self._held: Any = None  # the topology the caches describe (a strong reference,
        # so that its id, part of the cache keys, cannot be reused by a new topology)

    def _current(self) -> Any:
        topo = self._topology()
        if topo is not self._held:
            self._held = topo
            self._cache.clear()
            self._matrices.clear()
        return topo

    def of(self, i: int, t: int) -> tuple[float, dict[int, float], dict[int, float]]:
        """(``P[i, i]``, src_weights ``{j: 1}``, dst_weights ``{j: P[j, i]}``) of rank i."""
        if self._push is None:
            topo = self._current()
            key = (topo.round_index(t), i)
            hit = self._cache.get(key)
            if hit is None:
                out = topo.out_neighbors(i, t)
                share = 1.0 / (len(out) + 1)
                hit = (share, {j: 1.0 for j in topo.in_neighbors(i, t)},
                       {j: share for j in out})
                if len(self._cache) > 256:
                    self._cache.clear()
                self._cache[key] = hit
            return hit
        key = ("P", self._push.round_index(t), i)
        hit = self._cache.get(key)
        if hit is None:
            keep, sends = self._push.weights(i, t)  # row i of Pᵀ = column i of P
            ins = self._push.out_neighbors(i, t)  # j with Pᵀ[j, i] = P[i, j] > 0
            hit = (keep, {j: 1.0 for j in ins}, dict(sends))
            if len(self._cache) > 256:
                self._cache.clear()
            self._cache[key] = hit
        return hit

    def matrix(self, t: int) -> Any:
        """``P(t)`` as a float64 ``scipy.sparse.csr_matrix`` (a dense numpy array where
        SciPy is not installed), cached per round index.

        The same entries :meth:`of` gives every rank: the uniform split is built
        from the stored pattern of ``W(t)`` (``topology.sparse(t)``), which is what
        ``in_neighbors`` / ``out_neighbors`` read.
        """
        try:
            import scipy.sparse as sp
        except ImportError:  # pragma: no cover - scipy ships with scikit-learn
            sp = None
        if self._push is not None:
            key: tuple = ("P", self._push.round_index(t))
        else:
            topo = self._current()
            key = (topo.round_index(t),)
        hit = self._matrices.get(key)
        if hit is not None:
            return hit
        r = (self._push if self._push is not None else topo).sparse(t)
        n = r.n
        if self._push is not None:  # the stored P(t)ᵀ, transposed back
            if sp is None:
                mat = r.to_dense().T.copy()
            else:
                mat = sp.csr_matrix((np.array(r.data), np.array(r.indices),
                                     np.array(r.indptr)), shape=(n, n)).T.tocsr()
        elif sp is None:
            pattern = np.eye(n, dtype=bool)
            pattern[np.repeat(np.arange(n), np.diff(r.indptr)), r.indices] = True
            mat = pattern / pattern.sum(axis=0, keepdims=True)  # 1 / (outdeg + 1)
        else:
            pattern = sp.csr_matrix((np.ones(len(r.indices)), np.array(r.indices),
                                     np.array(r.indptr)), shape=(n, n))
            pattern = ((pattern + sp.identity(n, format="csr")) > 0).astype(np.float64)
            share = 1.0 / np.asarray(pattern.sum(axis=0)).ravel()  # 1 / (outdeg + 1)
            mat = (pattern @ sp.diags(share)).tocsr()
        if len(self._matrices) > 16:  # random families: keep a few rounds
            self._matrices.clear()
        self._matrices[key] = mat
        return mat


class _PushSumCommunicator:
    """Forwards to the MPI communicator; the mix uses column-stochastic push weights.

    Round ``t``: node i keeps ``P[i, i]`` of its message and sends ``P[j, i] *
    message`` to every out-neighbour j (sender-side scaling, ``dst_weights``); it adds
    what its in-neighbours send unweighted (``src_weights = 1``). With ``P`` the
    default uniform split, ``P[j, i] = 1 / (outdeg_i(t) + 1)`` over the runtime
    topology's out-neighbours of round t plus i itself.

    With ``overlap=True`` (:class:`PushSum` with ``overlap``) :meth:`neighbor_allreduce_`
    only *starts* the exchange, non-blocking and without the self share (``self_weight
    = 0``: the wrapper keeps ``P[i, i]`` of its mass itself), and keeps its handle for
    the wrapper to collect with :meth:`take_started`.
    """

    supports_nonblocking = False

    def __init__(self, inner: MPICommunicator, weights: PushWeights,
                 overlap: bool = False) -> None:
        self._inner = inner
        self._weights = weights
        self.overlap = overlap
        self._started: list[PendingExchange] = []

    def take_started(self) -> list[PendingExchange]:
        """The handles of the exchanges started since the last call (overlap mode)."""
        out, self._started = self._started, []
        return out

    def rank(self) -> int:
        return self._inner.rank()

    def size(self) -> int:
        return self._inner.size()

    def topology(self) -> Any:
        return self._inner.topology()

    def current_round(self) -> int:
        return self._inner.current_round()

    def advance_round(self) -> None:
        self._inner.advance_round()

    def set_round(self, round_: int) -> None:
        self._inner.set_round(round_)

    def weights(self) -> tuple[float, dict[int, float], dict[int, float]]:
        """(self weight, src_weights, dst_weights) of this rank for the current round."""
        return self._weights.of(self.rank(), self.current_round())

    def shared_send_weight(self) -> float | None:
        """The weight ``c`` of the current round's messages when every out-neighbour gets
        the same share and it is not 1 (the default split: ``1 / (outdeg + 1)``), else
        ``None``. With overlap, a message written as ``c · x`` can go out unscaled
        (:meth:`neighbor_allreduce_` with ``prescaled=True``)."""
        shares = set(self.weights()[2].values())
        return shares.pop() if len(shares) == 1 and 1.0 not in shares else None

    def neighbor_allreduce_(self, tensor: Tensor, name: str | None = None,
                            prescaled: bool = False) -> Tensor:
        sw, src, dst = self.weights()
        if self.overlap:  # start only; the wrapper completes it τ steps later
            if prescaled:  # the tensor is c · x already (shared_send_weight)
                dst = dict.fromkeys(dst, 1.0)
            self._started.append(ops.neighbor_allreduce_nonblocking_(
                tensor, self_weight=0.0, src_weights=src, dst_weights=dst, name=name))
            return tensor
        if prescaled:
            raise ValueError("prescaled messages are for the overlap mode only")
        return ops.neighbor_allreduce_(tensor, self_weight=sw, src_weights=src,
                                      dst_weights=dst, name=name)

    def neighbor_allreduce_nonblocking_(
        self, tensor: Tensor, name: str | None = None
    ) -> PendingExchange:
        sw, src, dst = self.weights()
        return ops.neighbor_allreduce_nonblocking_(tensor, self_weight=sw, src_weights=src,
                                                  dst_weights=dst, name=name)

    def allreduce_(self, tensor: Tensor, average: bool = True, name: str | None = None) -> Tensor:
        return self._inner.allreduce_(tensor, average=average, name=name)

    def broadcast_(self, tensor: Tensor, root: int = 0, name: str | None = None) -> Tensor:
        return self._inner.broadcast_(tensor, root, name=name)

    def allgather(self, tensor: Tensor, name: str | None = None) -> Tensor:
        return self._inner.allgather(tensor, name=name)


def push_communicator(owner: str, communicator: Communicator | None, weights: Any,
                      overlap: bool = False) -> tuple[Communicator, PushWeights]:
    """The communicator a push-sum wrapper mixes through, and its :class:`PushWeights`.

    Under MPI (``communicator`` ``None`` or an :class:`MPICommunicator`) the messages
    are sender-scaled by ``P(t)`` (:class:`_PushSumCommunicator`), after checking that
    every rank passed the same ``weights``.  A communicator whose mixing is done in
    process by someone who asks the wrapper for its matrix
    (``honours_mixing_matrix = True``: :mod:`decomm.sim`'s) is used as is; the
    simulator then mixes with the wrapper's ``_sim_mixing_matrix(t)``.  Anything else
    mixes with a row-stochastic ``W`` only: ``TypeError``.
    """
    inner = communicator if communicator is not None else MPICommunicator()
    in_process = bool(getattr(inner, "honours_mixing_matrix", False))
    if not isinstance(inner, MPICommunicator) and not in_process:
        raise TypeError(
            f"{owner} runs on the MPI runtime (decomm.init()) or in decomm.sim; got "
            f"communicator {type(inner).__name__}, which mixes with a row-stochastic W only")
    push = None if weights is None else _push_topology(weights, inner.size(), owner)
    if push is not None and inner.size() > 1 and not in_process:
        table = _agree.gather_rows(inner.allgather, [_agree.topology_digest(push)],
                                   f"decomm.optim.{owner}.weights")
        differ = _agree.differing_ranks(table)
        if differ:
            raise DecommError(f"{owner}: ranks {differ} passed different push weights "
                              "than rank 0; every rank must pass the same P")
    pw = PushWeights(inner.topology, push)
    if in_process:
        return inner, pw
    assert isinstance(inner, MPICommunicator)
    return _PushSumCommunicator(inner, pw, overlap), pw


class _PushMixing:
    """What the push-sum wrappers share: the weights of ``P(t)`` and the simulator hook."""

    _pw: PushWeights
    _comm: Communicator

    def _sim_mixing_matrix(self, t: int) -> Any:
        """The matrix the simulator mixes this wrapper's buffers with in round ``t``."""
        return self._pw.matrix(t)

    def push_sum_weights(self) -> tuple[float, dict[int, float], dict[int, float]]:
        """(kept share ``P[i, i]``, src_weights, dst_weights ``{j: P[j, i]}``) this rank
        uses in the current round."""
        return self._pw.of(self._comm.rank(), self._comm.current_round())

    def _restart_push_sum(self, weights: list[Tensor]) -> None:
        """After lost ranks (fault tolerance): the lost nodes' mass is gone, so the
        survivors' weights no longer sum to their number. Restart push-sum from the
        de-biased iterates (the parameters hold z = x / w): w = 1. A user's ``P`` is
        re-planned for the survivors like the topology (Metropolis-Hastings weights on
        the induced graph, which are doubly - so also column - stochastic)."""
        from ..fault import last_recovery
        from ..topology.replan import replan

        for w in weights:
            w.fill_(1.0)
        rec = last_recovery()
        if self._pw._push is not None and rec is not None:
            self._pw = PushWeights(self._pw._topology, replan(self._pw._push, rec.survivors))
            if isinstance(self._comm, _PushSumCommunicator):
                self._comm._weights = self._pw
        if isinstance(self._comm, _PushSumCommunicator):
            self._comm.take_started()  # in flight with the old communicator: gone


#: dtypes whose sender scaling torch reproduces exactly (the C++ kernel multiplies in the
#: dtype itself; half precision it multiplies in float32 and rounds once)
_PRESCALE_DTYPES = (torch.float32, torch.float64)


def _check_overlap(overlap: Any) -> int:
    if overlap is True:
        return 1
    if overlap is False:
        return 0
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
        raise ValueError(f"PushSum overlap must be a bool or an int tau >= 0 (the number of "
                         f"communicating steps an exchange stays in flight), got {overlap!r}")
    return int(overlap)


class PushSum(_PushMixing, DecentralizedOptimizer):
    r"""Stochastic Gradient Push (push-sum SGD) for directed graphs, optionally overlapped.

    Assran, Loizou, Ballas, Rabbat, "Stochastic Gradient Push for Distributed Deep
    Learning" (ICML 2019); push-sum averaging: Kempe, Dobra, Gehrke (FOCS 2003).
    Every node keeps a numerator ``x_i`` and a scalar weight ``w_i`` (``w^0 = 1``);
    its parameters hold the de-biased ``z_i = x_i / w_i`` (forward/backward run at
    ``z``). With ``P(t)`` column-stochastic (``P[j, i]`` = share of node i's mass
    sent to node j) and ``u`` the wrapped optimizer's update from the gradient at
    ``z``::

        x_i^{t+1/2} = w_i^t z_i^t − u_i^t
        x_i^{t+1}   = Σ_j P(t)[i, j] x_j^{t+1/2}
        w_i^{t+1}   = Σ_j P(t)[i, j] w_j^t
        z_i^{t+1}   = x_i^{t+1} / w_i^{t+1}

    Because ``P`` is column-stochastic, ``Σ_i x_i`` and ``Σ_i w_i = n`` are
    preserved by the mix, so on a strongly connected directed graph every ``z_i``
    converges to the true average ``Σ_i x_i / n`` - where row-stochastic gossip
    (``DSGD``) over the same directed graph converges to a Perron-weighted average,
    biased towards well-connected nodes.

    ``P(t)`` by default splits each node's mass uniformly over itself and its
    out-neighbours in round ``t`` of the runtime topology (``decomm.set_topology``;
    only its graph is used, not its weights): ``P[j, i] = 1 / (outdeg_i + 1)``. Or
    pass ``weights=``: one column-stochastic ``n x n`` matrix, or a list used in turn
    (round ``t`` uses ``weights[t mod len]``); every rank must pass the same.

    **Overlap** (``overlap=True``, or an int ``τ ≥ 1``): Overlap SGP, Algorithm 2 of
    Assran et al. (2019).  The exchange of communicating step ``c`` is *started*
    (non-blocking) at the end of step ``c`` and completed at the end of step
    ``c + τ``, so it runs during the next ``τ`` forward/backward passes; the node
    keeps its own share at once::

        x_i^{c+1/2} = w_i^c z_i^c − u_i^c                  (send P[j, i] x_i^{c+1/2},
                                                             P[j, i] w_i^c to each j)
        x_i^{c+1}   = P(c)[i, i] x_i^{c+1/2} + Σ_{j≠i} P(c−τ)[i, j] x_j^{c−τ+1/2}
        w_i^{c+1}   = P(c)[i, i] w_i^c       + Σ_{j≠i} P(c−τ)[i, j] w_j^{c−τ}
        z_i^{c+1}   = x_i^{c+1} / w_i^{c+1}

    (the sum is empty while ``c < τ``).  Mass is conserved counting what is in
    flight, and the weight ``w`` rides in the same delayed message, so ``z = x / w``
    stays de-biased.  ``τ = 0`` is plain SGP.  Local steps (``communicate_every``)
    neither start nor complete exchanges; a global step (``global_every``) first
    completes every exchange in flight, then averages exactly.  :meth:`flush`
    completes and applies every exchange in flight (``close()`` calls it): call it
    before evaluating the final model.  Under MPI the exchange uses
    ``decomm.neighbor_allreduce_nonblocking_`` (sender-scaled, ``self_weight = 0``);
    in :mod:`decomm.sim` the simulator mixes with ``P(c) − diag(P(c))`` and the
    result waits ``τ`` steps in the same buffer.  The in-flight messages are part of
    :meth:`state_dict` (``"in_flight"``), so a resumed run is exact.  Memory: ``τ + 1``
    message buffers of ``numel + 1`` per dtype.

    The weight travels with the message: one ``neighbor_allreduce_`` per dtype of
    ``numel + 1`` elements (the parameters and ``w``), sender-scaled with
    ``dst_weights``. Without overlap the parameters' flat buffer is the message
    (``w`` rides in one element after the parameters, mixed in place), so a step costs
    two passes over the parameters beyond the inner step and the exchange (``x = w z``
    and ``z = x / w``), none where ``w`` is exactly 1 (every node's in-shares sum to
    1, as on regular graphs with the default split: multiplying and dividing by 1
    change nothing, so they are skipped).  With overlap: ``x = w z``, the copy into
    the message slot (in float32/float64 it also applies the share every out-neighbour
    gets when they all get the same, as with the default split, which the exchange
    would otherwise do in one more pass) and one blocked pass that keeps ``P[i, i]``
    of ``x``, adds the completed message and divides by ``w``. A global step
    (``global_every``) averages ``x`` and ``w`` exactly, giving ``z = x̄ / w̄``.

    Runs under MPI and in :mod:`decomm.sim` (which mixes with ``P(t)`` itself).
    """

    _stateful = True
    _comm_extra = 1  # w, after the parameters

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        weights: Any = None,
        overlap: bool | int = False,
        communicate_every: int = 1,
        global_every: int | None = None,
        broadcast_parameters: bool = True,
        check_parameters: bool = True,
        communicator: Communicator | None = None,
    ) -> None:
        self.overlap: int = _check_overlap(overlap)
        comm, self._pw = push_communicator("PushSum", communicator, weights, self.overlap > 0)
        self._w: list[Tensor] = []
        self._msg: list[Tensor] = []
        self._slots: list[list[Tensor]] = []
        #: exchanges in flight, oldest first: (slot, MPI handles or None when mixed already)
        self._queue: list[tuple[int, list[PendingExchange] | None]] = []
        self._slot = 0
        self._off_diagonal: tuple[Any, Any] | None = None  # (P(t), P(t) − diag)
        self._prescaled: list[bool] = []  # per bucket: this step's message is c · x
        super().__init__(
            optimizer,
            communicate_every=communicate_every,
            global_every=global_every,
            broadcast_parameters=broadcast_parameters,
            check_parameters=check_parameters,
            communicator=comm,
        )

    # ----------------------------------------------------------------- state
    def _message_numel(self, numel: int) -> int:
        return numel + 1  # the parameters and the push-sum weight w

    def _setup(self) -> None:
        self._w = [torch.ones((), dtype=torch.float64) for _ in self._buckets]

        def message() -> list[Tensor]:
            return [torch.zeros(b.numel + 1, dtype=b.dtype, device=b.device)
                    for b in self._buckets]

        # without overlap the bucket buffers are the messages; with it, the messages in
        # flight must outlive the parameters' next updates
        self._slots = [message() for _ in range(self.overlap + 1)] if self.overlap else []
        self._msg = self._slots[0] if self.overlap else []
        self._queue = []
        self._slot = 0
        if isinstance(self._comm, _PushSumCommunicator):
            self._comm.take_started()

    def _state_tensors(self) -> dict[str, list[Tensor]]:
        if not self.overlap:
            return {"push_sum_weight": self._w}
        self._complete_pending()  # the saved messages must be final
        return {"push_sum_weight": self._w,
                "in_flight": [m for slot in self._slots for m in slot]}

    def _extra_state(self) -> dict[str, Any]:
        return {"in_flight_slots": [s for s, _ in self._queue]} if self.overlap else {}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        if self.overlap:
            slots = [int(s) for s in extra.get("in_flight_slots", [])]
            if len(slots) > self.overlap:
                raise ValueError(f"PushSum.load_state_dict: the state_dict has {len(slots)} "
                                 f"exchanges in flight, more than overlap={self.overlap}")
            self._queue = [(s, None) for s in slots]

    @property
    def push_weights(self) -> list[float]:
        """This rank's push-sum weight ``w`` per bucket (all equal; 1 at the start)."""
        return [float(w) for w in self._w]

    @property
    def in_flight(self) -> int:
        """Number of exchanges started and not yet applied (overlap mode; else 0)."""
        return len(self._queue)

    # ---------------------------------------------------------------- phases
    def _sim_mixing_matrix(self, t: int) -> Any:
        mat = self._pw.matrix(t)
        if not self.overlap:
            return mat
        held = self._off_diagonal
        if held is None or held[0] is not mat:
            # the self share is kept at once, only the rest travels
            if isinstance(mat, np.ndarray):
                off = mat - np.diag(np.diag(mat))
            else:
                off = mat.tolil()
                off.setdiag(0.0)
                off = off.tocsr()
            held = self._off_diagonal = (mat, off)
        return held[1]

    def _mix_buffers(self) -> list[Tensor]:
        return self._msg if self.overlap else [b.buffer for b in self._buckets]

    def _local_phase(self, mix: Mix) -> None:
        self._prescaled = []
        with torch.no_grad():
            for b, w in zip(self._buckets, self._w):
                if float(w) != 1.0:  # x · 1 is x: skip a pass over the parameters
                    b.flat.mul_(float(w))  # x = w z
            self._inner_step()  # x − u, u from the gradient at z
            if mix is Mix.NONE:
                return
            if not self.overlap:
                for b, w in zip(self._buckets, self._w):
                    b.buffer[b.numel] = float(w)  # [x | w] is mixed in place
                return
            if mix is Mix.GLOBAL:
                self._drain(len(self._queue))  # an exact average includes all mass
            busy = {s for s, _ in self._queue}
            self._slot = next(s for s in range(self.overlap + 1) if s not in busy)
            self._msg = self._slots[self._slot]
            share = (self._comm.shared_send_weight() if mix is Mix.NEIGHBOR
                     and isinstance(self._comm, _PushSumCommunicator) else None)
            for b, w, m in zip(self._buckets, self._w, self._msg):
                scaled = share is not None and b.dtype in _PRESCALE_DTYPES
                if scaled:  # the sender's scaling done by the copy: one pass less
                    torch.mul(b.flat, share, out=m[: b.numel])
                    m[b.numel] = float(w)
                    m[b.numel :].mul_(share)
                else:
                    m[: b.numel].copy_(b.flat)
                    m[b.numel] = float(w)
                self._prescaled.append(scaled)

    def _exchange_with_neighbors(self, nonblocking: bool) -> list[PendingExchange]:
        if nonblocking or not any(self._prescaled):
            return super()._exchange_with_neighbors(nonblocking)
        assert isinstance(self._comm, _PushSumCommunicator)
        for k, (buf, scaled) in enumerate(zip(self._mix_buffers(), self._prescaled)):
            self._comm.neighbor_allreduce_(buf, name=self._buffer_name(k), prescaled=scaled)
        return []

    def _finish_phase(self, mix: Mix) -> None:
        with torch.no_grad():
            if self.overlap and mix is Mix.NEIGHBOR:
                started = (self._comm.take_started()
                           if isinstance(self._comm, _PushSumCommunicator) else None)
                self._queue.append((self._slot, started or None))
                self._keep_drain_divide(len(self._queue) - self.overlap)
                return
            for k, b in enumerate(self._buckets):
                if mix is Mix.NONE:
                    w = float(self._w[k])
                else:
                    src = self._msg[k] if self.overlap else b.buffer  # GLOBAL with overlap
                    w = float(src[b.numel])
                    self._check_weight(w)
                    self._w[k].fill_(w)
                    if self.overlap:
                        torch.div(src[: b.numel], w, out=b.flat)
                        continue
                if w != 1.0:  # x / 1 is x
                    b.flat.div_(w)  # z = x / w

    # --------------------------------------------------------------- overlap
    def _check_weight(self, w: float) -> None:
        if not w > 0.0:
            raise DecommError(
                f"PushSum: push-sum weight became {w} on rank {self._comm.rank()} "
                "(a node with no incoming mass: is the graph strongly connected?)")

    def _divide(self) -> None:
        for b, w in zip(self._buckets, self._w):
            self._check_weight(float(w))
            b.flat.div_(float(w))  # z = x / w

    def _keep_drain_divide(self, count: int) -> None:
        """Overlap, end of a gossip step: ``x ← (P[i, i] x + Σ m) / w`` with the ``count``
        oldest messages ``m`` in flight (``w`` likewise, undivided).

        The same element-wise operations in the same order as keeping, :meth:`_drain`
        and :meth:`_divide` one after the other, so the same values; but block by block,
        so that each block of ``x`` is read from memory once and its later operations
        find it in cache (the keep is done here, not when the message was copied: the
        exchange in flight reads only its slot)."""
        keep = float(self.push_sum_weights()[0])
        slots = []
        for _ in range(max(count, 0)):
            slot, handles = self._queue.pop(0)
            for h in handles or ():
                h.wait()
            slots.append(self._slots[slot])
        for k, (b, w) in enumerate(zip(self._buckets, self._w)):
            w.mul_(keep)  # P[i, i] w^c
            for msg in slots:
                w.add_(float(msg[k][b.numel]))
            wv = float(w)
            self._check_weight(wv)
            step = block_elements(b.numel, b.flat.element_size())
            for s in range(0, b.numel, step):
                xs = b.flat[s : s + step]
                xs.mul_(keep)  # P[i, i] x^{c+1/2}
                for msg in slots:
                    xs.add_(msg[k][s : min(s + step, b.numel)])
                xs.div_(wv)  # z = x / w

    def _complete_pending(self) -> None:
        """Wait for the MPI exchanges in flight (their results stay in their slots)."""
        for k, (slot, handles) in enumerate(self._queue):
            if handles:
                for h in handles:
                    h.wait()
                self._queue[k] = (slot, None)

    def _drain(self, count: int) -> None:
        """Apply the ``count`` oldest exchanges in flight to the numerator and weight."""
        for _ in range(max(count, 0)):
            slot, handles = self._queue.pop(0)
            for h in handles or ():
                h.wait()
            for b, w, m in zip(self._buckets, self._w, self._slots[slot]):
                b.flat.add_(m[: b.numel])
                w.add_(float(m[b.numel]))

    def _restart_after_loss(self) -> None:
        self._queue = []  # messages in flight went with the old communicator
        self._restart_push_sum(self._w)

    def flush(self) -> None:
        """Complete every exchange in flight and apply it (``z = x / w`` again).

        With ``overlap`` the nodes' parameters miss the mass still in flight; after
        ``flush()`` nothing is in flight and the de-biased parameters include it all.
        Not collective: it only waits for messages the neighbours have already sent,
        so one rank may flush alone (mass is still conserved); to keep the ranks on
        the same recursion, flush on all of them at the same step.  Call it (or
        :meth:`close`) before evaluating the final model and before
        ``decomm.shutdown()``.  No-op without overlap.
        """
        if not self._queue:
            return
        with torch.no_grad():
            for b, w in zip(self._buckets, self._w):
                b.flat.mul_(float(w))
            self._drain(len(self._queue))
            self._divide()

    def close(self) -> None:
        """Complete and apply the exchanges in flight (:meth:`flush`), remove hooks."""
        super().close()
        self.flush()

    def __repr__(self) -> str:
        r = super().__repr__()
        return r[:-1] + f", overlap={self.overlap})" if self.overlap else r
