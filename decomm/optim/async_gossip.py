"""Asynchronous gossip SGD over one-sided windows (no rank ever waits for another)."""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import Tensor

from decomm.errors import DecommError

from ._base import DecentralizedOptimizer, Mix
from .comm import MPICommunicator, OwnRoundCounter, PendingExchange

__all__ = ["AsyncGossip"]

_counter = itertools.count()  # window names: every rank creates wrappers in the same order


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
        return win.win_update(wname, self_weight=sw, neighbor_weights=nb)

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
    slot, then written into the out-neighbours' windows) and the mix, which
    :func:`decomm.win.win_update` computes in the parameters' flat buffer itself,
    block by block (no new model-sized tensor per step).

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
