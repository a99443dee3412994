"""The one exception type decomm raises for misuse and communication failures."""


class DecommError(RuntimeError):
    """A decomm call failed: ranks disagreed, a neighbour never arrived, or bad input.

    The message names the op, the tensor name, this rank, and the ranks and
    fields involved (shape, dtype, topology round, ...).
    """


class PeerFailureError(DecommError):
    """A peer process died (or was lost) while this rank communicated with it.

    Raised on every surviving rank (a rank that is not a neighbour of the lost one
    learns of it through the revoked communicator). ``failed_ranks`` lists the lost
    processes by their *launch* rank (the rank they had when the job started), once
    known on every rank; with fault tolerance on (``decomm.init(fault_tolerant=True)``)
    the survivors have agreed on it before the error is raised. Call
    :func:`decomm.recover` to continue on the survivors; the optimizer wrappers do so
    inside ``step()``.
    """

    def __init__(self, message: str, failed_ranks: list[int] | None = None) -> None:
        super().__init__(message)
        self.failed_ranks: list[int] = list(failed_ranks or [])


#: Set by :mod:`decomm.fault` while fault tolerance is on: builds the error raised
#: for a peer failure (after agreeing with the survivors on who failed).
_peer_failure_hook = None


def _peer_failure(message: str) -> PeerFailureError:
    """The exception the C++ core raises for a peer failure (called by its translator)."""
    if _peer_failure_hook is not None:
        return _peer_failure_hook(message)
    return PeerFailureError(message)
