"""CHOCO-SGD: decentralized SGD with compressed gossip (Koloskova, Stich & Jaggi 2019)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import ops
from ..compression import FLOAT_DTYPES, Compressor, Payload
from ..errors import DecommError
from . import comm as _comm
from ._base import DecentralizedOptimizer, Mix, topology_fingerprint, topology_name
from ._flat import collect_params
from .comm import Communicator, MPICommunicator, PendingExchange

__all__ = ["ChocoSGD"]


class _CompressedGossip:
    """The MPI communicator of a ChocoSGD: its mix sends compressed payloads.

    ``neighbor_allreduce_(q)`` for a ChocoSGD mix buffer holding the dense
    decompressed ``q_i`` sends the payload the wrapper registered for that buffer
    (one ``uint8`` ``decomm.neighbor_allgather``, so only ``payload_bytes`` travel
    to each out-neighbour), decompresses every in-neighbour's payload and leaves
    ``Σ_j W[i, j] q_j`` (self first, then ascending rank) in ``q``.  Everything
    else is forwarded to the MPI communicator.
    """

    supports_nonblocking = False

    def __init__(self, inner: MPICommunicator, owner: ChocoSGD) -> None:
        self._inner = inner
        self._owner = owner

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

    def dense_neighbor_allreduce_(self, tensor: Tensor, name: str | None = None) -> Tensor:
        """An uncompressed ``W x`` (ChocoSGD's re-synchronisation after a topology change)."""
        return self._inner.neighbor_allreduce_(tensor, name=name)

    def neighbor_allreduce_(self, tensor: Tensor, name: str | None = None) -> Tensor:
        comp, payload = self._owner._payload_for(tensor)
        got = ops.neighbor_allgather(payload.to_bytes(), name=name)
        topo = self._inner.topology()
        self_w, nbrs = topo.weights(self.rank(), self.current_round())
        width = comp.payload_bytes(payload.numel, payload.dtype)
        if got.numel() != width * len(nbrs):  # every rank sends a payload of one size
            raise DecommError(
                f"ChocoSGD on rank {self.rank()}: received {got.numel()} payload bytes from "
                f"{len(nbrs)} in-neighbours, expected {width} each (ranks compress "
                f"differently?)")
        tensor.mul_(self_w)
        for row, j in enumerate(sorted(nbrs)):
            theirs = comp.from_bytes(got[row * width:(row + 1) * width], payload.numel,
                                     payload.dtype)
            comp.decompress_add_(tensor, theirs, alpha=nbrs[j])
        return tensor

    def neighbor_allreduce_nonblocking_(
        self, tensor: Tensor, name: str | None = None
    ) -> PendingExchange:
        raise DecommError("ChocoSGD exchanges compressed payloads synchronously")

    def allreduce_(self, tensor: Tensor, average: bool = True, name: str | None = None) -> Tensor:
        return self._inner.allreduce_(tensor, average=average, name=name)

    def broadcast_(self, tensor: Tensor, root: int = 0, name: str | None = None) -> Tensor:
        return self._inner.broadcast_(tensor, root, name=name)

    def allgather(self, tensor: Tensor, name: str | None = None) -> Tensor:
        return self._inner.allgather(tensor, name=name)


class ChocoSGD(DecentralizedOptimizer):
    r"""CHOCO-SGD: decentralized SGD whose gossip sends compressed differences.

    Koloskova, Stich & Jaggi, "Decentralized Stochastic Optimization and Gossip
    Algorithms with Compressed Communication", ICML 2019, Algorithm 2.  Node ``i``
    keeps its iterate ``x_i`` and a *public copy* ``x̂_i`` that every neighbour also
    holds (``x̂^0 = 0``).  With ``u_i^t`` the wrapped optimizer's update, ``Q`` the
    compression operator (:mod:`decomm.compression`) and ``γ`` the consensus step::

        x_i^{t+½}   = x_i^t − u_i^t
        q_i^t       = Q(x_i^{t+½} − x̂_i^t)                 (sent to the out-neighbours)
        x̂_j^{t+1}   = x̂_j^t + q_j^t       for j ∈ {i} ∪ N(i)
        x_i^{t+1}   = x_i^{t+½} + γ Σ_j W[i, j] (x̂_j^{t+1} − x̂_i^{t+1})

    Memory-efficient form (the variant the paper also gives): instead of a copy
    of every neighbour's ``x̂_j`` a node keeps ``s_i = Σ_j W[i, j] x̂_j`` (itself
    included), updated by ``s_i ← s_i + Σ_j W[i, j] q_j``; since the rows of ``W``
    sum to 1, ``Σ_j W[i, j] (x̂_j − x̂_i) = s_i − x̂_i``.  State: ``x̂_i`` and ``s_i``
    (two model-sized vectors) plus one scratch buffer.  For a doubly stochastic
    ``W`` the mix preserves the average, ``Σ_i x_i^{t+1} = Σ_i x_i^{t+½}`` (a
    ``UserWarning`` on rank 0 says when a column does not sum to 1).

    The bytes on the wire really shrink: under MPI each step sends the payload
    (e.g. ``k`` values + ``k`` int32 indices for ``TopK``) as one ``uint8``
    ``decomm.neighbor_allgather`` per (device, dtype) bucket, which
    ``decomm.stats()`` counts; :attr:`payload_bytes` says how many per neighbour.
    Receivers decompress and add ``W[i, j] q_j`` themselves.  In the simulator
    (:mod:`decomm.sim`) the same local and finish phases run and the simulator
    mixes the dense ``q`` with ``W`` (the same numbers; custom communicators do
    the same through their ``neighbor_allreduce_``).

    Topologies: ``s_i`` and every neighbour's ``x̂_j`` must persist across steps,
    so the memory-efficient form is exact only while ``W`` stays the same.  On a
    time-varying graph (a cycle of several rounds, a random family) node ``i``
    would need ``x̂_j`` of every node it is ever linked to, i.e. every ``q_j`` of
    every step, which is gossip over the union graph and defeats the compression;
    ChocoSGD therefore raises :class:`~decomm.DecommError` for a topology with
    more than one round (use a static graph such as ``ExponentialGraph``, or DSGD
    on time-varying graphs).  ``decomm.set_topology`` to another *static* graph
    in the middle of training is exact: the next step rebuilds ``s_i = Σ_j
    W_new[i, j] x̂_j`` with one dense ``neighbor_allreduce`` of ``x̂`` (MPI only;
    also after ``load_state_dict`` under another topology).

    Args:
        optimizer: the torch optimizer to wrap.
        compression: a :class:`decomm.compression.Compressor` instance, e.g.
            ``TopK(0.01)``, ``RandomK(0.01, seed=0)``, ``QSGD(bits=8)``, ``Sign()``.
            Stochastic compressors draw from one generator per (rank, bucket),
            ``compression.make_generator(rank, bucket)``: runs are reproducible
            and the simulator draws what the MPI ranks draw.
        consensus_step: ``γ ∈ (0, 1]``.  The analysis needs ``γ`` of order
            ``δρ`` (``δ`` the compressor's contraction, ``ρ`` the spectral gap);
            in practice tune it (e.g. 0.1 - 0.8 for ``TopK(0.1)`` on a ring).
            ``Identity()`` with ``γ = 1`` is DSGD (adapt-then-combine).
        communicate_every: ``p``; the steps between exchanges run the inner
            optimizer only (no compression, no message, ``x̂`` and ``s`` unchanged).
        broadcast_parameters, check_parameters, communicator: as for every wrapper.

    ``global_every`` (exact averages) is not offered: an allreduce of ``q`` would
    break ``s_i = Σ_j W[i, j] x̂_j``.
    """

    _check_column_sums = True

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        compression: Compressor,
        consensus_step: float,
        communicate_every: int = 1,
        broadcast_parameters: bool = True,
        check_parameters: bool = True,
        communicator: Communicator | None = None,
    ) -> None:
        if isinstance(compression, type) and issubclass(compression, Compressor):
            raise TypeError(f"ChocoSGD: compression must be a Compressor instance, got the "
                            f"class {compression.__name__}; write e.g. TopK(0.1)")
        if not isinstance(compression, Compressor):
            raise TypeError(f"ChocoSGD: compression must be a decomm.compression.Compressor "
                            f"(TopK, RandomK, QSGD, Sign, Identity), got "
                            f"{type(compression).__name__}")
        if isinstance(consensus_step, bool) or not isinstance(consensus_step, (int, float)):
            raise TypeError(f"ChocoSGD: consensus_step must be a float in (0, 1], got "
                            f"{type(consensus_step).__name__}")
        if not (0.0 < float(consensus_step) <= 1.0):
            raise ValueError(f"ChocoSGD: consensus_step must be in (0, 1], got {consensus_step!r}")
        if isinstance(optimizer, torch.optim.Optimizer):
            for _, p in collect_params(optimizer.param_groups):
                if p.dtype not in FLOAT_DTYPES:
                    raise TypeError(f"ChocoSGD compresses float16, bfloat16, float32 or "
                                    f"float64 parameters, got one of dtype {p.dtype}")
        self.compression: Compressor = compression
        self.consensus_step: float = float(consensus_step)
        self._xhat: list[Tensor] = []
        self._s: list[Tensor] = []
        self._m: list[Tensor] = []
        self._gens: list[torch.Generator | None] = []
        self._payloads: list[Payload | None] = []
        self._topo: Any = None  # the topology s was built for
        self._topo_fp: str | None = None
        self._exchanged = False
        inner = communicator if communicator is not None else MPICommunicator()
        if isinstance(inner, MPICommunicator):
            inner = _CompressedGossip(inner, self)
        self._check_static(inner.topology())
        super().__init__(
            optimizer,
            communicate_every=communicate_every,
            broadcast_parameters=broadcast_parameters,
            check_parameters=check_parameters,
            communicator=inner,
        )
        self._remember_topology(self._comm.topology())

    # ----------------------------------------------------------------- setup
    def _setup(self) -> None:
        self._xhat = [b.new_state() for b in self._buckets]
        self._s = [b.new_state() for b in self._buckets]
        self._m = [b.new_state() for b in self._buckets]
        rank = self._comm.rank()
        self._gens = [self.compression.make_generator(rank, k, device=b.device)
                      for k, b in enumerate(self._buckets)]
        self._payloads = [None] * len(self._buckets)
        self._exchanged = False  # x̂ = s = 0 until the first gossip step

    def _check_message_sizes(self, indexed: list[tuple[int, Tensor]]) -> None:
        super()._check_message_sizes(indexed)  # the dense re-synchronisation message
        comm = self._comm
        if comm.size() <= 1 or not getattr(comm, "limits_message_size", True):
            return
        groups: dict[tuple[torch.device, torch.dtype], int] = {}
        for _, p in indexed:
            groups[(p.device, p.dtype)] = groups.get((p.device, p.dtype), 0) + p.numel()
        for (dev, dt), numel in groups.items():
            nbytes = self.compression.payload_bytes(numel, dt)
            if nbytes > _comm.MAX_MESSAGE_BYTES:
                raise DecommError(
                    f"ChocoSGD on rank {comm.rank()}: the compressed payload of the {numel} "
                    f"{dt} parameters on {dev} is {nbytes} bytes, over the per-message limit "
                    f"of {_comm.MAX_MESSAGE_BYTES}; split the model over several wrappers")

    @staticmethod
    def _check_static(topo: Any) -> None:
        if topo is None:
            return
        rounds = getattr(topo, "rounds", 1)
        if rounds != 1:
            what = "a random family" if rounds is None else f"a cycle of {rounds} rounds"
            raise DecommError(
                f"ChocoSGD needs a static topology, but {topology_name(topo)} changes every "
                f"round ({what}): its memory s_i = sum_j W[i, j] x̂_j and the neighbours' "
                f"public copies x̂_j must persist across steps, which on a time-varying graph "
                f"means sending every q_j to every node ever linked to j. Use a static graph "
                f"(e.g. ExponentialGraph, RingGraph) with ChocoSGD, or DSGD / "
                f"GradientTracking on time-varying graphs")

    def _remember_topology(self, topo: Any) -> None:
        self._topo = topo
        self._topo_fp = None if topo is None else topology_fingerprint(topo)

    def _sync_topology(self) -> None:
        """Refuse a time-varying topology; rebuild ``s`` after a change to a static one."""
        topo = self._comm.topology()
        if topo is self._topo:
            return
        self._check_static(topo)
        fp = None if topo is None else topology_fingerprint(topo)
        if fp is not None and fp == self._topo_fp:
            self._topo = topo  # the same W built anew
            return
        if self._exchanged:  # the same on every rank: a collective decision
            resync = getattr(self._comm, "dense_neighbor_allreduce_", None)
            if resync is None:
                raise DecommError(
                    f"ChocoSGD: the topology changed to {topology_name(topo)} after the "
                    f"first exchange; the memory "
                    f"s_i = sum_j W[i, j] x̂_j must be rebuilt with one dense exchange, which "
                    f"this communicator ({type(self._comm).__name__}) does not offer. Create "
                    f"a new ChocoSGD (or simulation) for the new topology")
            for k, (s, h) in enumerate(zip(self._s, self._xhat)):
                s.copy_(h)
                resync(s, name=f"decomm.optim.ChocoSGD.resync.{k}")  # s = W_new x̂
        self._remember_topology(topo)

    # ---------------------------------------------------------------- phases
    def _mix_buffers(self) -> list[Tensor]:
        return self._m

    def _payload_for(self, tensor: Tensor) -> tuple[Compressor, Payload]:
        for k, m in enumerate(self._m):
            if m is tensor:
                p = self._payloads[k]
                if p is None:
                    break
                self._payloads[k] = None
                return self.compression, p
        raise DecommError("ChocoSGD's communicator was asked to mix a tensor that is not one "
                          "of this step's compressed buffers")

    def _local_phase(self, mix: Mix) -> None:
        if mix is Mix.GLOBAL:  # unreachable: global_every is not accepted
            raise DecommError("ChocoSGD does not support global averaging steps")
        if mix is Mix.NEIGHBOR:
            self._sync_topology()
        self._inner_step()  # x^{t+½} = x^t − u^t
        if mix is Mix.NONE:
            return
        comp = self.compression
        for k, (b, h, m) in enumerate(zip(self._buckets, self._xhat, self._m)):
            torch.sub(b.flat, h, out=m)  # x^{t+½} − x̂
            payload = comp.compress(m, generator=self._gens[k])
            m.zero_()
            comp.decompress_add_(m, payload)  # q = Q(x^{t+½} − x̂): the message
            h.add_(m)  # x̂^{t+1} = x̂^t + q
            self._payloads[k] = payload

    def _finish_phase(self, mix: Mix) -> None:
        if mix is Mix.NONE:
            return
        g = self.consensus_step
        for b, h, s, m in zip(self._buckets, self._xhat, self._s, self._m):
            s.add_(m)  # s += Σ_j W[i, j] q_j
            torch.sub(s, h, out=m)  # Σ_j W[i, j] (x̂_j − x̂_i)
            b.flat.add_(m, alpha=g)
        self._payloads = [None] * len(self._buckets)
        self._exchanged = True

    # ------------------------------------------------------------ monitoring
    @property
    def payload_bytes(self) -> int:
        """Bytes one gossip step sends to each out-neighbour (all buckets, no header)."""
        return sum(self.compression.payload_bytes(b.numel, b.dtype) for b in self._buckets)

    @property
    def dense_bytes(self) -> int:
        """Bytes DSGD would send to each out-neighbour per step (the parameters)."""
        return sum(b.numel * b.flat.element_size() for b in self._buckets)

    def public_copies(self) -> list[Tensor]:
        """This rank's public copy ``x̂_i``, one flat tensor per bucket (views)."""
        return list(self._xhat)

    # ------------------------------------------------------------ checkpoint
    def _state_tensors(self) -> dict[str, list[Tensor]]:
        return {"public_copy": self._xhat, "neighbor_sum": self._s}

    def _extra_state(self) -> dict[str, Any]:
        return {
            "generators": [None if g is None else g.get_state() for g in self._gens],
            "topology_fingerprint": self._topo_fp,
            "exchanged": self._exchanged,
        }

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        for g, st in zip(self._gens, extra.get("generators", [])):
            if g is not None and st is not None:
                g.set_state(st)
        self._exchanged = bool(extra.get("exchanged", False))
        if "topology_fingerprint" in extra:
            # s was built for the saved topology: the next step re-synchronises if
            # the current one differs
            self._topo = None
            self._topo_fp = extra["topology_fingerprint"]

    def __repr__(self) -> str:
        r = super().__repr__()
        return r[:-1] + f", compression={self.compression!r}, consensus_step={self.consensus_step})"
