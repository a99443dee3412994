"""Asynchronous gossip SGD over one-sided windows (no rank ever waits for another)."""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import Tensor

from decomm import timeline
from decomm.errors import DecommError

from ._base import DecentralizedOptimizer, Mix
from ._flat import block_elements
from .comm import MPICommunicator, OwnRoundCounter, PendingExchange

__all__ = ["AsyncGossip"]

_counter = itertools.count()  # window names: every rank creates wrappers in the same order
#: dtypes whose weighted sum torch ops reproduce exactly (the C++ kernel accumulates in
#: the dtype itself; half precision it sums in float32 and rounds once)
_IN_PLACE_DTYPES = (torch.float32, torch.float64)


@timeline.traced("win_update", phases=False)
def _win_update_in_place(name: str, self_weight: float, neighbor_weights: dict[int, float],
                         scratch: Tensor) -> Tensor:
    """``decomm.win.win_update(name, self_weight=..., neighbor_weights=...)``, computed in
    the registered tensor itself.

    ``win_update`` sums into a new tensor, then copies it into this rank's own slot and
    into the registered tensor: for a model-sized window a fresh allocation (page faults
    on every page) and two more passes over memory per step. Here the same products and
    sums, in the same order (``W[i, i] x``, then ``+ W[i, j] slot_j`` for ``j``
    ascending, each rounded in the dtype as the kernel does), run block by block in
    place, each block copied into the own slot while in cache, under the same locks and
    with the same version bump. ``scratch``: at least one block of the window's dtype.
    """
    from decomm import win

    w = win._get(name, "win_update")
    order = sorted(neighbor_weights)
    slots = [(w.data[w.slot_of[j]], float(neighbor_weights[j])) for j in order]
    sw = float(self_weight)
    MPI = win._mpi()
    with w.lock:
        x = w.tensor.detach().view(-1)
        own = w.data[0]
        w.win.Lock(w.rank, MPI.LOCK_EXCLUSIVE)  # no put lands in a slot while it is read
        try:
            with timeline.phase("reduce", neighbors=len(order)):
                step = block_elements(w.numel, x.element_size())
                for s in range(0, w.numel, step):
                    e = min(s + step, w.numel)
                    xs = x[s:e]
                    if sw != 1.0:
                        xs.mul_(sw)
                    for data, wt in slots:
                        if wt == 1.0:
                            xs.add_(data[s:e])
                        else:
                            tmp = scratch[: e - s]
                            torch.mul(data[s:e], wt, out=tmp)
                            xs.add_(tmp)
                    own[s:e].copy_(xs)
            w.exposed += 1
            w.seqs[0].fill_(w.exposed)
        finally:
            w.win.Unlock(w.rank)
    return w.tensor


class _WinCommunicator(OwnRoundCounter):
    """Mixes through RMA windows: put to out-neighbours, mix what has arrived.

    The round counter is this rank's own (ranks run at different speeds); collectives
    (allgather/broadcast, used only at construction) go to the MPI runtime.
    """

    supports_nonblocking = False

    def __init__(self, inner: MPICommunicator) -> None:
        self._inner = inner
        self._round = 0
        self._names: dict[int, str] = {}  # id(buffer) -> window name
        self._scratch: dict[torch.dtype, Tensor] = {}  # one block per dtype, for the mix

    def rank(self) -> int:
        return self._inner.rank()

    def size(self) -> int:
        return self._inner.size()

    def topology(self) -> Any:
        return self._inner.topology()

    def create(self, buf: Tensor, name: str) -> None:
        from decomm import win

        win.win_create(buf, name)
        self._names[id(buf)] = name

    def free(self) -> None:
        from decomm import win

        for name in self._names.values():
            if name in win.win_names():
                win.win_free(name)
        self._names = {}

    def neighbor_allreduce_(self, tensor: Tensor, name: str | None = None) -> Tensor:
        from decomm import win

        wname = self._names[id(tensor)]
        w = win._windows[wname]
        topo, r, t = w.topology, self.rank(), self._round
        sw, nb = topo.weights(r, t)
        win.win_put(tensor, wname, dst_weights={j: 1.0 for j in topo.out_neighbors(r, t)})
        if tensor.dtype not in _IN_PLACE_DTYPES or not set(nb) <= set(w.slot_of):
            return win.win_update(wname, self_weight=sw, neighbor_weights=nb)
        need = block_elements(w.numel, tensor.element_size())
        scratch = self._scratch.get(tensor.dtype)
        if scratch is None or scratch.numel() < need:
            scratch = self._scratch[tensor.dtype] = torch.empty(need, dtype=tensor.dtype)
        return _win_update_in_place(wname, sw, nb, scratch)

    def neighbor_allreduce_nonblocking_(
        self, tensor: Tensor, name: str | None = None
    ) -> PendingExchange:
        raise NotImplementedError("AsyncGossip never blocks; there is nothing to overlap")

    def allreduce_(self, tensor: Tensor, average: bool = True, name: str | None = None) -> Tensor:
        raise DecommError("AsyncGossip: a global average would synchronise the ranks")

    def broadcast_(self, tensor: Tensor, root: int = 0, name: str | None = None) -> Tensor:
        return self._inner.broadcast_(tensor, root, name=name)

    def allgather(self, tensor: Tensor, name: str | None = None) -> Tensor:
        return self._inner.allgather(tensor, name=name)


class AsyncGossip(DecentralizedOptimizer):
    r"""Asynchronous decentralized SGD: one-sided puts, mix whatever has arrived.

    Each rank runs at its own pace; a step never waits for a neighbour. With
    ``W(t)`` the topology in force at construction (round ``t`` = this rank's own
    count of communicating steps) and ``\hat x_j`` the latest parameters that
    in-neighbour ``j`` has written into this rank's window (possibly several steps
    old - that staleness is the price of never waiting)::

        x_i ← x_i − u_i                                  (inner optimizer step)
        put x_i into every out-neighbour's window        (one-sided, MPI RMA)
        x_i ← W[i, i] x_i + Σ_j W[i, j] \hat x_j          (local, from the window)

    This is BlueFog's ``DistributedWinPutOptimizer`` algorithm (asynchronous
    adapt-then-combine; cf. Lian et al., "Asynchronous Decentralized Parallel SGD",
    ICML 2018). Only in lock-step - every put of step t has landed before any rank
    mixes in step t, and no put of step t+1 lands before that - is ``\hat x_j`` the
    value ``x_j − u_j`` of the same step, which makes it exactly DSGD
    (adapt-then-combine) over the same ``W(t)``. Equal speeds alone do not give
    that: nothing orders a neighbour's put against this rank's read, so ``\hat x_j``
    may be a step or more old (or newer, from a rank running ahead). With uneven
    speeds faster ranks take more gradient steps, which biases the consensus
    towards their data - use it where waiting for stragglers costs more than that.

    Cost per step beyond the inner step: the put (``x`` copied into this rank's own
    slot, then written into the out-neighbours' windows) and the mix, computed in place
    in the parameters' flat buffer block by block (float32 and float64: the same
    numbers as ``decomm.win.win_update``, without its new model-sized tensor per call;
    other dtypes go through ``win_update``).

    Construction and :meth:`close` are collective (they create / free one MPI
    window per dtype bucket); :meth:`step` is not. ``global_every`` is not
    supported (a global average would synchronise the ranks). Call :meth:`close`
    on every rank when done (windows are otherwise freed at exit).
    """

    _stateful = False
    # Ranks never wait for each other, so a rank whose gradients overflowed may skip
    # its step alone (GradScaler's default): nothing to agree on, no allreduce.
    _step_supports_amp_scaling = False
    _buffers_unsupported = (
        "its steps are not collective (each rank runs at its own pace), and a per-step "
        "buffer exchange would make every rank wait for its neighbours; average the "
        "buffers yourself before evaluating (decomm.allreduce_(b) for each floating "
        "buffer, on every rank)"
    )
    _simulation_unsupported = (
        "AsyncGossip mixes through one-sided MPI windows, each rank at its own pace "
        "and with stale neighbour values; the simulator steps all nodes in lock-step "
        "with one W(t) per round, so it would compute a different algorithm (DSGD)"
    )

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        communicate_every: int = 1,
        broadcast_parameters: bool = True,
        check_parameters: bool = True,
    ) -> None:
        self._win_comm = _WinCommunicator(MPICommunicator())
        self._win_id = next(_counter)
        super().__init__(
            optimizer,
            communicate_every=communicate_every,
            global_every=None,
            broadcast_parameters=broadcast_parameters,
            check_parameters=check_parameters,
            communicator=self._win_comm,
        )

    def _setup(self) -> None:
        self._win_comm.free()
        for k, b in enumerate(self._buckets):
            self._win_comm.create(b.buffer, f"decomm.optim.AsyncGossip.{self._win_id}.{k}")

    def _local_phase(self, mix: Mix) -> None:
        self._inner_step()

    def _finish_phase(self, mix: Mix) -> None:
        pass

    def close(self) -> None:
        """Free the windows (collective: every rank must call it)."""
        super().close()
        self._win_comm.free()

    @property
    def window_names(self) -> list[str]:
        """The RMA windows this optimizer mixes through (one per dtype bucket)."""
        return list(self._win_comm._names.values())
