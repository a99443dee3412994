"""Push-sum / Stochastic Gradient Push for directed (column-stochastic) graphs."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import _agree, ops
from ..errors import DecommError
from ._base import DecentralizedOptimizer, Mix
from .comm import Communicator, MPICommunicator, PendingExchange

__all__ = ["PushSum"]


def _push_topology(weights: Any, n: int) -> Any:
    """A Topology whose round t is P(t)ᵀ (row-stochastic iff P(t) is column-stochastic)."""
    from decomm.topology import Topology

    mats = weights
    if isinstance(mats, Tensor) or (hasattr(mats, "ndim") and mats.ndim == 2):
        mats = [mats]
    out = []
    for k, m in enumerate(mats):
        a = m.detach().cpu().numpy() if isinstance(m, Tensor) else np.asarray(m, dtype=np.float64)
        if a.ndim != 2 or a.shape != (n, n):
            raise ValueError(f"PushSum weights[{k}]: expected an {n} x {n} matrix "
                             f"(decomm.size() = {n}), got shape {a.shape}")
        if not np.isfinite(a).all() or (a < 0).any():
            raise ValueError(f"PushSum weights[{k}]: entries must be finite and non-negative")
        cols = a.sum(axis=0)
        bad = np.flatnonzero(np.abs(cols - 1.0) > 1e-9 * max(n, 1))
        if bad.size:
            j = int(bad[0])
            raise ValueError(f"PushSum weights[{k}]: column {j} sums to {cols[j]:.12g}, not 1; "
                             "push-sum needs column-stochastic P (P[i, j] = the share of node "
                             "j's mass sent to node i)")
        out.append(a.T.copy())
    if not out:
        raise ValueError("PushSum weights: give at least one matrix")
    return Topology.from_matrices(out, name="push-sum P^T")


class _PushSumCommunicator:
    """Forwards to the MPI communicator; the mix uses column-stochastic push weights.

    Round ``t``: node i keeps ``P[i, i]`` of its message and sends ``P[j, i] *
    message`` to every out-neighbour j (sender-side scaling, ``dst_weights``); it adds
    what its in-neighbours send unweighted (``src_weights = 1``). With ``P`` the
    default uniform split, ``P[j, i] = 1 / (outdeg_i(t) + 1)`` over the runtime
    topology's out-neighbours of round t plus i itself.
    """

    supports_nonblocking = False

    def __init__(self, inner: MPICommunicator, push: Any) -> None:
        self._inner = inner
        self._push = push  # None = uniform split over the runtime topology; else P(t)ᵀ
        self._cache: dict[tuple, tuple] = {}

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
        t = self.current_round()
        i = self.rank()
        if self._push is None:
            topo = self._inner.topology()
            key = (id(topo), topo.round_index(t))
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
        key = ("P", self._push.round_index(t))
        hit = self._cache.get(key)
        if hit is None:
            keep, sends = self._push.weights(i, t)  # row i of Pᵀ = column i of P
            ins = self._push.out_neighbors(i, t)  # j with Pᵀ[j, i] = P[i, j] > 0
            hit = (keep, {j: 1.0 for j in ins}, dict(sends))
            self._cache[key] = hit
        return hit

    def neighbor_allreduce_(self, tensor: Tensor, name: str | None = None) -> Tensor:
        sw, src, dst = self.weights()
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


class PushSum(DecentralizedOptimizer):
    r"""Stochastic Gradient Push (push-sum SGD) for directed graphs.

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

    The weight travels with the message: one ``neighbor_allreduce_`` per dtype of
    ``numel + 1`` elements (the parameters and ``w``), sender-scaled with
    ``dst_weights``. Cost per step beyond the inner step: three passes over the
    parameters (``x = w z``, the copy into the message, ``z = x / w``). A global
    step (``global_every``) averages ``x`` and ``w`` exactly, giving ``z = x̄ / w̄``.

    Needs the MPI runtime (the simulator mixes with row-stochastic ``W`` only).
    """

    _stateful = True
    _simulation_unsupported = (
        "PushSum mixes with a column-stochastic P through sender-scaled MPI messages; "
        "the simulator mixes with a row-stochastic W only"
    )

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        weights: Any = None,
        communicate_every: int = 1,
        global_every: int | None = None,
        broadcast_parameters: bool = True,
        check_parameters: bool = True,
        communicator: Communicator | None = None,
    ) -> None:
        inner = communicator if communicator is not None else MPICommunicator()
        if not isinstance(inner, MPICommunicator):
            raise TypeError(
                f"PushSum runs on the MPI runtime (decomm.init()); got communicator "
                f"{type(inner).__name__}, which mixes with a row-stochastic W only")
        push = None if weights is None else _push_topology(weights, inner.size())
        if push is not None and inner.size() > 1:
            table = _agree.gather_rows(inner.allgather, [_agree.topology_digest(push)],
                                       "decomm.optim.PushSum.weights")
            differ = _agree.differing_ranks(table)
            if differ:
                raise DecommError(f"PushSum: ranks {differ} passed different push weights "
                                     "than rank 0; every rank must pass the same P")
        self._w: list[Tensor] = []
        self._msg: list[Tensor] = []
        super().__init__(
            optimizer,
            communicate_every=communicate_every,
            global_every=global_every,
            broadcast_parameters=broadcast_parameters,
            check_parameters=check_parameters,
            communicator=_PushSumCommunicator(inner, push),
        )

    # ----------------------------------------------------------------- state
    def _message_numel(self, numel: int) -> int:
        return numel + 1  # the parameters and the push-sum weight w

    def _setup(self) -> None:
        self._w = [torch.ones((), dtype=torch.float64) for _ in self._buckets]
        self._msg = [torch.zeros(b.numel + 1, dtype=b.dtype, device=b.device)
                     for b in self._buckets]

    def _state_tensors(self) -> dict[str, list[Tensor]]:
        return {"push_sum_weight": self._w}

    @property
    def push_weights(self) -> list[float]:
        """This rank's push-sum weight ``w`` per bucket (all equal; 1 at the start)."""
        return [float(w) for w in self._w]

    def push_sum_weights(self) -> tuple[float, dict[int, float], dict[int, float]]:
        """(kept share, src_weights, dst_weights) this rank uses in the current round."""
        comm = self._comm
        assert isinstance(comm, _PushSumCommunicator)
        return comm.weights()

    # ---------------------------------------------------------------- phases
    def _mix_buffers(self) -> list[Tensor]:
        return self._msg

    def _local_phase(self, mix: Mix) -> None:
        with torch.no_grad():
            for b, w in zip(self._buckets, self._w):
                b.flat.mul_(float(w))  # x = w z
            self._inner_step()  # x − u, u from the gradient at z
            if mix is Mix.NONE:
                return
            for b, w, m in zip(self._buckets, self._w, self._msg):
                m[: b.numel].copy_(b.flat)
                m[b.numel] = float(w)

    def _finish_phase(self, mix: Mix) -> None:
        with torch.no_grad():
            for k, (b, m) in enumerate(zip(self._buckets, self._msg)):
                if mix is not Mix.NONE:
                    w = float(m[b.numel])
                    if not w > 0.0:
                        raise DecommError(
                            f"PushSum: push-sum weight became {w} on rank {self._comm.rank()} "
                            "(a node with no incoming mass: is the graph strongly connected?)")
                    self._w[k].fill_(w)
                    torch.div(m[: b.numel], w, out=b.flat)
                else:
                    b.flat.div_(float(self._w[k]))
