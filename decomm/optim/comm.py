"""The mixing back-ends the optimizer wrappers talk to.

A wrapper never calls MPI directly: it holds a :class:`Communicator` and uses
only the handful of methods below.  :class:`MPICommunicator` forwards them to
the decomm runtime (``decomm.neighbor_allreduce_`` etc.); the simulator
(:mod:`decomm.sim`) gives each virtual node a communicator of its own and does
the mixing itself, between the wrappers' local and finishing phases.  The
algorithm algebra therefore exists once, in the wrappers.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from .. import ops, runtime
from ..errors import DecommError

__all__ = [
    "MAX_MESSAGE_BYTES",
    "Communicator",
    "LocalCommunicator",
    "MPICommunicator",
    "PendingExchange",
]

#: Largest flat message, in bytes, a wrapper sends in one decomm call. decomm's MPI
#: core sends a larger payload as several messages of under 2 GiB each (MPI counts
#: are C ints), so the only limit is what the process can address; lower it where
#: a transport needs less. The wrappers check their flat messages against it before
#: the first step; communicators with ``limits_message_size = False`` (the
#: simulator's) are exempt.
MAX_MESSAGE_BYTES: int = 2**62


@runtime_checkable
class PendingExchange(Protocol):
    """A started non-blocking exchange: :meth:`wait` finishes it and returns the result.

    :class:`decomm.Handle` (what ``decomm.neighbor_allreduce_nonblocking_`` returns)
    is one; any object with such a ``wait`` will do for a custom communicator.
    """

    def wait(self) -> Tensor: ...


@runtime_checkable
class Communicator(Protocol):
    """What a wrapper needs from the outside world.

    ``supports_nonblocking`` tells a wrapper whether it may start an exchange
    early (``neighbor_allreduce_nonblocking_``) to overlap it with compute.
    """

    supports_nonblocking: bool

    def rank(self) -> int: ...

    def size(self) -> int: ...

    def topology(self) -> Any: ...

    def current_round(self) -> int: ...

    def advance_round(self) -> None: ...

    def set_round(self, round_: int) -> None: ...

    def neighbor_allreduce_(self, tensor: Tensor, name: str | None = None) -> Tensor: ...

    def neighbor_allreduce_nonblocking_(
        self, tensor: Tensor, name: str | None = None
    ) -> PendingExchange: ...

    def allreduce_(
        self, tensor: Tensor, average: bool = True, name: str | None = None
    ) -> Tensor: ...

    def broadcast_(self, tensor: Tensor, root: int = 0, name: str | None = None) -> Tensor: ...

    def allgather(self, tensor: Tensor, name: str | None = None) -> Tensor: ...


class MPICommunicator:
    """Forwards to the process-wide decomm runtime (``decomm.init()`` first)."""

    supports_nonblocking = True

    def __init__(self) -> None:
        if not runtime.is_initialized():
            raise DecommError(
                "decomm is not initialised: call decomm.init() before creating a "
                "decomm.optim wrapper (or pass communicator=... / use decomm.sim)"
            )

    def rank(self) -> int:
        return runtime.rank()

    def size(self) -> int:
        return runtime.size()

    def topology(self) -> Any:
        return runtime.get_topology()

    def current_round(self) -> int:
        return runtime.current_round()

    def advance_round(self) -> None:
        runtime.advance_round()

    def set_round(self, round_: int) -> None:
        runtime.set_round(int(round_))

    def neighbor_allreduce_(self, tensor: Tensor, name: str | None = None) -> Tensor:
        return ops.neighbor_allreduce_(tensor, name=name)

    def neighbor_allreduce_nonblocking_(
        self, tensor: Tensor, name: str | None = None
    ) -> PendingExchange:
        return ops.neighbor_allreduce_nonblocking_(tensor, name=name)

    @property
    def supports_mix_delta(self) -> bool:
        """Whether :meth:`neighbor_mix_delta` mixes as :meth:`neighbor_allreduce_` does: not
        for a subclass that mixes with other weights (unless it says so itself)."""
        return type(self).neighbor_allreduce_ is MPICommunicator.neighbor_allreduce_

    def neighbor_mix_delta(self, tensor: Tensor, out: Tensor, name: str | None = None,
                           nonblocking: bool = False) -> Any:
        """``out ← W(t) x − x`` without writing ``x`` (:func:`decomm.ops.neighbor_mix_delta`).

        Optional in the protocol (``supports_mix_delta``): a wrapper uses it where the
        communicator offers it and otherwise mixes a copy in place (the simulators)."""
        return ops.neighbor_mix_delta(tensor, out, name=name, nonblocking=nonblocking)

    def allreduce_(self, tensor: Tensor, average: bool = True, name: str | None = None) -> Tensor:
        return ops.allreduce_(tensor, average=average, name=name)

    def broadcast_(self, tensor: Tensor, root: int = 0, name: str | None = None) -> Tensor:
        return ops.broadcast_(tensor, root, name=name)

    def allgather(self, tensor: Tensor, name: str | None = None) -> Tensor:
        return ops.allgather(tensor, name=name)


class OwnRoundCounter:
    """The round counter of a communicator that keeps its own (no shared runtime round)."""

    _round: int = 0

    def current_round(self) -> int:
        return self._round

    def advance_round(self) -> None:
        self._round += 1

    def set_round(self, round_: int) -> None:
        self._round = int(round_)


class LocalCommunicator(OwnRoundCounter):
    """A single node with nobody to talk to (``W = [[1]]``): every mix is a no-op.

    Useful to run a wrapper without MPI (n = 1) and in tests.
    """

    supports_nonblocking = False

    def __init__(self) -> None:
        self._round = 0

    def rank(self) -> int:
        return 0

    def size(self) -> int:
        return 1

    def topology(self) -> Any:
        return None

    def neighbor_allreduce_(self, tensor: Tensor, name: str | None = None) -> Tensor:
        return tensor

    def neighbor_allreduce_nonblocking_(
        self, tensor: Tensor, name: str | None = None
    ) -> PendingExchange:
        raise NotImplementedError

    def allreduce_(self, tensor: Tensor, average: bool = True, name: str | None = None) -> Tensor:
        return tensor

    def broadcast_(self, tensor: Tensor, root: int = 0, name: str | None = None) -> Tensor:
        return tensor

    def allgather(self, tensor: Tensor, name: str | None = None) -> Tensor:
        return tensor.clone()


def flatten_float64(tensors: Iterable[Tensor], extra: int = 0) -> Tensor:
    """Concatenate tensors into one new float64 vector with ``extra`` trailing zeros."""
    ts = [t.detach().reshape(-1) for t in tensors]
    total = sum(t.numel() for t in ts)
    out = torch.zeros(total + extra, dtype=torch.float64)
    off = 0
    for t in ts:
        out[off : off + t.numel()].copy_(t)
        off += t.numel()
    return out
