"""Failure agreement under ULFM: the part of fault tolerance below the ops.

The C++ core's error translator calls :func:`_on_peer_failure` (through
``decomm.errors._peer_failure_hook``) on the thread that sees a peer failure. It revokes
decomm's communicator and shrinks the job's one with the other survivors, so the
:class:`~decomm.errors.PeerFailureError` it returns names the same lost ranks on every
rank. :func:`decomm.recover` (in :mod:`decomm.fault`) then builds on the result.
Also here: how a rank ends after a loss (:func:`finish`), the exception hook that turns
an uncaught exception into a detected failure, and the status lines ``decomm-run
--fault-tolerant`` reads.
"""

from __future__ import annotations

import array
import os
import sys
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import _state, errors, timeline
from .errors import PeerFailureError

__all__ = ["agreed", "disable", "enable", "finish", "pending", "status_file", "survivor_comm",
           "track", "write_status"]


def _mpi() -> Any:
    from mpi4py import MPI

    return MPI


@dataclass
class Pending:
    comm: Any  # the survivors' communicator (mpi4py)
    survivors: list[int]  # their ranks in the old communicator
    lost: list[int]  # launch ranks
    message: str
    detected_s: float


#: The survivors' agreement of a failure not yet recovered from (set by the hook).
pending: Pending | None = None
_backends: list[weakref.ref] = []


def track(backend: Any, fault_tolerant: bool) -> Any:
    """Set up a new C++ backend (the world's, the machine grouping's) for fault tolerance
    and remember it, so that a failure seen on any of them revokes them all: a rank
    waiting on another communicator (another machine's leaders) stops waiting too.
    Returns ``backend``."""
    backend.fault_tolerant = bool(fault_tolerant)
    _backends[:] = [r for r in _backends if r() is not None]
    _backends.append(weakref.ref(backend))
    return backend


# ------------------------------------------------------------ the agreement
def survivor_comm(comm: Any) -> tuple[Any, list[int]]:
    """Shrink ``comm`` until an agreement over the result succeeds (another failure
    during it shrinks again); returns the new communicator and its old ranks."""
    MPI = _mpi()
    cur = comm
    while True:
        new = cur.Shrink()
        try:
            new.Agree(1)
        except MPI.Exception:
            cur = new
            continue
        old = MPI.Group.Translate_ranks(new.Get_group(), list(range(new.Get_size())),
                                        comm.Get_group())
        return new, [int(r) for r in old]


def agreed(st: _state.State, comm: Any, survivors: list[int], message: str,
           detected_s: float) -> Pending:
    """The :class:`Pending` recovery of ``st``'s job shrunk to ``comm`` (``survivors``:
    their ranks in ``st.comm``); the lost ones by launch rank."""
    gone = sorted(set(range(st.size)) - set(survivors))
    return Pending(comm, survivors, [st.launch_ranks[r] for r in gone], message, detected_s)


def _on_peer_failure(message: str) -> PeerFailureError:
    """The hook the C++ core's translator calls for a peer failure (fault tolerance on).

    Revokes decomm's communicators, agrees with the survivors on who is lost (once per
    failure: a later error before :func:`recover` reports the same), and returns the
    error to raise.
    """
    global pending
    st = _state.get()
    if st is None:
        return PeerFailureError(message)
    if pending is None:
        t0 = time.monotonic()
        for ref in _backends:  # st.backend among them
            be = ref()
            if be is not None:
                be.revoke()
        comm, survivors = survivor_comm(st.comm)
        pending = agreed(st, comm, survivors, message, t0)
    p = pending
    return PeerFailureError(
        f"rank {st.launch_ranks[st.rank]} (launch id): lost rank(s) {p.lost} (launch ids), "
        f"{len(p.survivors)} of {st.size} survive; call decomm.recover() to continue on "
        f"them (the optimizer wrappers do it inside step()). First error here: {p.message}",
        p.lost)


# ----------------------------------------------------------------- ending
def status_file() -> str | None:
    """Where ``decomm-run --fault-tolerant`` collects each rank's end (``DECOMM_FT_STATUS``)."""
    return os.environ.get("DECOMM_FT_STATUS") or None


def write_status(kind: str, ranks: list[int]) -> None:
    path = status_file()
    if not path:
        return
    st = _state.get()
    me = st.launch_ranks[st.rank] if st is not None else -1
    with open(path, "a") as f:  # one short line per event, appended atomically
        f.write(f"{kind} {me} {' '.join(map(str, ranks))}\n")


#: decomm.fault.recover, set when decomm.fault is imported (it sits above this module).
recover_hook: Callable[[], Any] | None = None


def finish(close: Callable[[_state.State], None]) -> None:
    """End this rank (``decomm.shutdown`` with fault tolerance on).

    The rank tells its peers it is done (the byes), then waits for the others in one
    non-blocking agreement: a rank inside MPI_Finalize would never join the shrink of a
    rank that is still training when another fails. While it waits:

    * the agreement fails (a rank died): it joins the survivors' shrink and recovery,
      then waits again on the new communicator;
    * decomm's communicator is revoked: a peer still needed this rank (it left early -
      ``sys.exit`` or the end of the script while the others train - or a rank failed
      elsewhere); it stops with SIGKILL, so that it counts as a lost rank and the others
      continue without it.

    A job without losses then closes as usual (``close``); after a loss the rank leaves
    with ``os._exit(0)``, since MPI_Finalize may hang then.
    """
    MPI = _mpi()
    while True:
        st = _state.require()
        if pending is None:
            st.backend.say_goodbye()
            flag = array.array("i", [1])
            try:
                req = st.comm.Iagree(flag)
                while not req.Test():
                    if st.backend.revoked:
                        write_status("left", [])
                        _die()
                    time.sleep(0.001)
                break
            except MPI.Exception as e:
                _on_peer_failure(f"during decomm.shutdown(): {e}")
        if recover_hook is None:
            break
        recover_hook()
    st = _state.require()
    write_status("finished", [])
    if not st.lost:
        close(st)
        return
    timeline.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _die() -> None:
    timeline.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), 9)


def excepthook(previous: Any) -> Any:
    """An uncaught exception on a rank: print it, then SIGKILL this rank, so the others
    see a normal, detected failure (a rank held by mpi4py's exit-time MPI_Finalize
    would never count as failed, and the job would deadlock)."""

    def hook(exc_type, exc, tb):
        previous(exc_type, exc, tb)
        st = _state.get()
        who = st.launch_ranks[st.rank] if st is not None else "?"
        sys.stderr.write(f"[decomm] rank {who}: uncaught {exc_type.__name__}; fault tolerance "
                         "is on, so this rank stops and the others continue without it\n")
        _die()

    hook.previous = previous  # type: ignore[attr-defined]
    return hook


def enable() -> None:
    """Route peer failures through the survivors' agreement (from ``decomm.init``)."""
    errors._peer_failure_hook = _on_peer_failure


def disable() -> None:
    errors._peer_failure_hook = None
