"""Surviving a dead rank: detect, agree, shrink, re-plan the topology, continue.

With fault tolerance on (``decomm.init(fault_tolerant=True)``, ``DECOMM_FAULT_TOLERANT=1``
or ``decomm-run --fault-tolerant``; the MPI job must run with ULFM, ``mpirun --with-ft
ulfm``) a peer failure goes through these steps:

1. *Detect*: only the dead rank's neighbours see the MPI error (``MPI_ERR_PROC_FAILED``);
   the C++ core reads its class and raises a typed failure.
2. *Revoke*: the first rank that sees it revokes decomm's communicator, so every pending
   and later call fails on every rank (``MPI_ERR_REVOKED``), neighbours or not.
3. *Shrink and agree*: before the error reaches Python, every survivor shrinks the job's
   communicator (``MPIX_Comm_shrink``) and confirms with an agreement; if another rank
   fails meanwhile the loop shrinks again. The shrunk group is the same on every survivor,
   so :class:`~decomm.errors.PeerFailureError` names the same lost ranks everywhere.
4. :func:`recover` (the optimizer wrappers call it inside ``step()``) builds a new backend
   on the survivors, agrees on the topology round and on every wrapper's step counters
   (the maximum over the survivors), re-plans the topology for the new size
   (:func:`decomm.topology.replan.replan`, or the user's ``n -> Topology`` callable), and
   rebuilds the windows and the machine grouping. Rank 0 of the survivors prints one line.

Ids: :func:`decomm.rank`/:func:`decomm.size` are the current ones; :func:`launch_rank` is
the rank a process had at launch (stable: use it for data shards and logs);
:func:`failed_ranks` lists the launch ranks lost so far.

Ending: after a loss, MPI_Finalize can hang (Open MPI issue 11404), so :func:`finish`
(run by ``decomm.shutdown()`` at exit) ends a job that lost ranks with one agreement and
``os._exit``; a job without losses ends as usual.
"""

from __future__ import annotations

import sys
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

from . import _failure, _state, hierarchical, timeline, win
from .errors import DecommError
from .topology import Topology
from .topology.replan import replan

__all__ = ["Recovery", "failed_ranks", "last_recovery", "launch_rank", "recover", "register"]


@dataclass
class Recovery:
    """What one recovery found and did (see :func:`last_recovery`)."""

    lost: list[int]  # launch ranks lost in this failure
    size: int  # survivors
    topology: str  # the re-planned topology's name
    round: int  # the agreed topology round
    detected_s: float  # time.monotonic() when this rank raised the failure
    resumed_s: float = 0.0  # time.monotonic() when recover() returned
    progress: list[int] = field(default_factory=list)  # agreed wrapper counters
    survivors: list[int] = field(default_factory=list)  # their ranks before the failure


_history: list[Recovery] = []
_recoverables: list[weakref.ref] = []


# ------------------------------------------------------------------ identity
def launch_rank(rank: int | None = None) -> int:
    """The rank this process (or current rank ``rank``) had when the job started."""
    st = _state.require()
    r = st.rank if rank is None else int(rank)
    return st.launch_ranks[r] if st.launch_ranks else r


def failed_ranks() -> list[int]:
    """Launch ranks lost so far (empty in a job without failures)."""
    return list(_state.require().lost)


def last_recovery() -> Recovery | None:
    """The most recent :class:`Recovery` of this process, or None."""
    return _history[-1] if _history else None


def register(obj: Any) -> None:
    """Register a recoverable object (an optimizer wrapper).

    It provides ``_fault_progress() -> list[int]`` (counters that must agree across
    ranks, e.g. completed steps) and ``_fault_resume(agreed: list[int])``, called by
    :func:`recover` with the survivors' element-wise maximum.
    """
    _recoverables[:] = [r for r in _recoverables if r() is not None]
    _recoverables.append(weakref.ref(obj))


def _live_recoverables() -> list[Any]:
    return [o for o in (r() for r in _recoverables) if o is not None]


def _agree_max(comm: Any, values: list[int], what: str) -> list[int]:
    """Element-wise maximum of ``values`` over ``comm`` (every rank the same length)."""
    rows = comm.allgather(values)
    if len({len(r) for r in rows}) != 1:
        raise DecommError(f"decomm.recover(): the survivors hold different numbers of {what} "
                          f"({[len(r) for r in rows]} by rank); every rank must create the "
                          "same optimizer wrappers")
    return [max(col) for col in zip(*rows)] if rows and rows[0] else []


def _agree_on_counters(p: Any, st: _state.State, mine: list[int]) -> tuple[Any, list[int]]:
    """The survivors' element-wise maximum of ``mine`` (the round, then the wrappers'
    counters). A rank that fails meanwhile is lost too: shrink again and retry."""
    from mpi4py import MPI

    while True:
        try:
            return p, _agree_max(p.comm, mine, "optimizer-wrapper counters")
        except MPI.Exception:
            comm, survivors = _failure.survivor_comm(p.comm)
            p = _failure.agreed(st, comm, [p.survivors[r] for r in survivors], p.message,
                                p.detected_s)


def recover() -> tuple[int, int]:
    """Continue on the survivors of a peer failure; returns the new ``(rank, size)``.

    Collective over the survivors, after :class:`~decomm.errors.PeerFailureError`. Builds
    the backend on the survivors' communicator, re-plans the topology (see the module
    docstring), agrees on the topology round and the optimizer wrappers' counters, and
    re-creates the one-sided windows (with each rank's current tensor) and the machine
    grouping. Handles of the old communicator fail; the tensors they were writing keep
    their values from before the call.
    """
    from . import runtime

    st = _state.require()
    if _failure.pending is None:
        if not st.fault_tolerant:
            raise DecommError(f"decomm.recover() on rank {st.rank}: fault tolerance is off; "
                              "start with decomm.init(fault_tolerant=True) (or decomm-run "
                              "--fault-tolerant)")
        raise DecommError(f"decomm.recover() on rank {st.rank}: no peer failure to recover "
                          "from (call it after catching decomm.PeerFailureError)")
    p, _failure.pending = _failure.pending, None
    windows = win._detach_all()
    machines = hierarchical._detach_for_recovery()
    st.backend.abandon()
    timeline.detach()
    live = _live_recoverables()
    counts = [len(o._fault_progress()) for o in live]
    mine = [st.round] + [v for o in live for v in o._fault_progress()]
    p, agreed = _agree_on_counters(p, st, mine)
    rnd, flat = agreed[0], agreed[1:]
    new_launch = [st.launch_ranks[r] for r in p.survivors]
    new_size = len(p.survivors)
    if st.topology_source is not None:
        topo = st.topology_source(new_size)
        if not isinstance(topo, Topology) or topo.n != new_size:
            raise DecommError(f"decomm.recover(): the topology callable returned "
                              f"{topo!r} for n={new_size}; it must return a Topology of "
                              f"{new_size} nodes")
    else:
        topo = replan(st.topology, p.survivors)
    new = runtime._install(p.comm, st.init_args, topo, launch_ranks=new_launch,
                           lost=st.lost + p.lost, round_=rnd, topology_source=st.topology_source)
    new.excepthook = st.excepthook
    sent, received = st.stats_base  # decomm.stats() keeps counting across the recovery
    new.stats_base = (sent + int(st.backend.bytes_sent), received + int(st.backend.bytes_received))
    rec = Recovery(lost=p.lost, size=new_size, topology=topo.name, round=rnd,
                   detected_s=p.detected_s, progress=flat, survivors=list(p.survivors))
    _history.append(rec)
    at = 0
    for o, k in zip(live, counts):
        o._fault_resume(flat[at:at + k])
        at += k
    hierarchical._reattach_after_recovery(machines)
    win._reattach_all(windows)
    rec.resumed_s = time.monotonic()
    if new.rank == 0:
        where = f"at step {flat[0]}" if flat else f"at round {rnd}"
        sys.stderr.write(f"[decomm] lost rank(s) {p.lost} {where} (process failure); "
                         f"continuing on {new_size} ranks over {topo.name}\n")
        sys.stderr.flush()
        _failure.write_status("lost", p.lost)
    return new.rank, new.size


_failure.recover_hook = recover
