"""BlueFog's one-sided window ops on :mod:`decomm.win`.

The data path is decomm's: one MPI window per tensor, a slot per in-neighbour,
passive-target puts, accumulates and gets, and a local ``win_update``. What BlueFog
adds on top is kept here, in a small *companion window* per tensor (8-byte words on
every rank, all accessed through MPI RMA under locks):

``word 0``
    the window's mutex on this rank (0 free, 1 held), taken with
    ``MPI_Compare_and_swap`` and released with an atomic ``MPI_REPLACE`` (a spin lock
    with a short sleep between tries). ``win_mutex`` and ``require_mutex=True`` take
    the mutexes of the ranks written to (or read from), or this rank's own for
    ``win_update``; several are always taken in ascending rank order, so two ranks
    never wait on each other.
``word 1``
    this rank's associated ``p`` (push-sum weight, starts at 1.0).
``words 2 .. n+1``
    ``version[j]``: how many times slot j was written (a put or accumulate from j adds
    1 atomically at this rank; a get from j adds 1 here) since this rank last read it
    with ``win_update`` (which zeroes the versions of the slots it used).
``words n+2 .. 2n+1``
    ``p`` of slot j (what j's put / accumulate carried, or this rank's get fetched).

With ``turn_on_win_ops_with_associated_p()`` every put, accumulate, get and update
applies to ``p`` exactly what it applies to the tensor (scaled by the same weights,
summed with the same update), so ``x / p`` is the push-sum estimate (Kempe, Dobra and
Gehrke, "Gossip-based computation of aggregate information", FOCS 2003). The data
and its ``p`` travel in two epochs on two windows: hold the mutex
(``require_mutex=True``) when a concurrent update at the target must see both.

Window creation follows BlueFog: each neighbour slot starts as *this rank's own*
tensor (``decomm.win.win_create(self_init=True)``), or zeros with ``zero_init``;
``p`` slots start at 0. A topology cannot change while windows exist
(``set_topology`` returns False). ``*_nonblocking`` window ops complete inside the
call (decomm's one-sided ops return once the data is at the target); their handles
are for ``win_wait`` / ``win_poll``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ... import _state, ops, win
from . import _basics as B
from . import _handles as H

logger = logging.getLogger("decomm.compat.bluefog")

__all__ = [
    "get_current_created_window_names",
    "get_win_version",
    "neighbor_win_accumulate",
    "neighbor_win_accumulate_nonblocking",
    "neighbor_win_get",
    "neighbor_win_get_nonblocking",
    "neighbor_win_put",
    "neighbor_win_put_nonblocking",
    "turn_off_win_ops_with_associated_p",
    "turn_on_win_ops_with_associated_p",
    "win_accumulate",
    "win_accumulate_nonblocking",
    "win_associated_p",
    "win_create",
    "win_fence",
    "win_free",
    "win_get",
    "win_get_nonblocking",
    "win_lock",
    "win_mutex",
    "win_poll",
    "win_put",
    "win_put_nonblocking",
    "win_update",
    "win_update_then_collect",
    "win_wait",
]

MUTEX_SLEEP_S = 0.0005  # between two failed tries of a mutex


@dataclass
class _Aux:
    win: Any  # mpi4py.MPI.Win of (2 + 2n) 8-byte words
    words: np.ndarray  # int64 view of this rank's memory
    floats: np.ndarray  # float64 view of the same memory
    n: int
    rank: int

    def version_disp(self, j: int) -> int:
        return (2 + j) * 8

    def p_disp(self, j: int) -> int:
        return (2 + self.n + j) * 8


_aux: dict[str, _Aux] = {}
_with_p = False
_win_handles: dict[int, str] = {}
_win_ids = itertools.count()


def _mpi() -> Any:
    from mpi4py import MPI

    return MPI


def _get_aux(name: Any) -> _Aux:
    aux = _aux.get(name)
    if aux is None:
        raise ValueError(f"{name!r} is not found in the registered window object "
                         f"(windows: {sorted(_aux) or 'none'}).")
    return aux


@contextlib.contextmanager
def _own(aux: _Aux) -> Iterator[None]:
    """An exclusive epoch on this rank's companion memory (local reads and writes)."""
    MPI = _mpi()
    aux.win.Lock(aux.rank, MPI.LOCK_EXCLUSIVE)
    try:
        yield
    finally:
        aux.win.Unlock(aux.rank)


# --------------------------------------------------------------------- mutex
def _acquire(aux: _Aux, ranks: list[int]) -> None:
    MPI = _mpi()
    one = np.ones(1, dtype=np.int64)
    zero = np.zeros(1, dtype=np.int64)
    got = np.zeros(1, dtype=np.int64)
    for r in sorted(set(ranks)):
        while True:
            aux.win.Lock(r, MPI.LOCK_SHARED)
            try:
                aux.win.Compare_and_swap([one, MPI.INT64_T], [zero, MPI.INT64_T],
                                         [got, MPI.INT64_T], r, 0)
            finally:
                aux.win.Unlock(r)
            if int(got[0]) == 0:
                break
            time.sleep(MUTEX_SLEEP_S)


def _release(aux: _Aux, ranks: list[int]) -> None:
    MPI = _mpi()
    zero = np.zeros(1, dtype=np.int64)
    for r in sorted(set(ranks), reverse=True):
        aux.win.Lock(r, MPI.LOCK_SHARED)
        try:
            aux.win.Accumulate([zero, MPI.INT64_T], r, target=(0, 1, MPI.INT64_T),
                               op=MPI.REPLACE)
        finally:
            aux.win.Unlock(r)


@contextlib.contextmanager
def _held(aux: _Aux, ranks: list[int], on: bool) -> Iterator[None]:
    if not on or not ranks:
        yield
        return
    _acquire(aux, ranks)
    try:
        yield
    finally:
        _release(aux, ranks)


@contextlib.contextmanager
def win_mutex(name: str, for_self: bool = False,
              ranks: list[int] | None = None) -> Iterator[None]:
    """Hold window ``name``'s mutex on ``ranks`` (default: the out-neighbours) - or on
    this rank with ``for_self=True`` - for the duration of the block."""
    aux = _get_aux(name)
    if for_self:
        targets = [aux.rank]
    else:
        targets = B.out_neighbor_ranks() if ranks is None else [int(r) for r in ranks]
    with _held(aux, targets, True):
        yield


# ------------------------------------------------------------ create / free
def win_create(tensor: torch.Tensor, name: str, zero_init: bool = False) -> bool:
    """Create window ``name`` for ``tensor`` (collective); True on success.

    Neighbour slots start as this rank's ``tensor`` (zeros with ``zero_init``), like
    BlueFog. A name already in use returns False.
    """
    if name in _aux or name in win.win_names():
        logger.error("win_create: a window named %r already exists; win_free it first", name)
        return False
    st = _state.require()
    MPI = _mpi()
    B.ensure_installed()  # the window's neighbours are the graph's
    win.win_create(tensor, name, zero_init=zero_init, self_init=not zero_init)
    n = st.size
    try:
        w = MPI.Win.Allocate((2 + 2 * n) * 8, 1, comm=st.comm)  # byte displacements
    except BaseException:
        win.win_free(name)
        raise
    raw = np.frombuffer(w.tomemory(), dtype=np.uint8)[: (2 + 2 * n) * 8]
    words = raw.view(np.int64)
    floats = raw.view(np.float64)
    words[:] = 0
    floats[1] = 1.0
    w.Fence(MPI.MODE_NOPRECEDE)  # every rank's companion memory is initialised
    w.Fence(MPI.MODE_NOSUCCEED)  # from here on: passive-target locks only
    _aux[name] = _Aux(win=w, words=words, floats=floats, n=n, rank=st.rank)
    return True


def win_free(name: str | None = None) -> bool:
    """Free window ``name``, or every window when None (collective); returns True."""
    names = sorted(_aux) if name is None else [name]
    for nm in names:
        aux = _get_aux(nm)
        if nm in win.win_names():  # decomm frees its own windows at exit, maybe first
            win.win_free(nm)
        _aux.pop(nm)
        aux.win.Free()
    if name is None and win.win_names():  # windows made with decomm.win directly
        win.win_free()
    return True


def free_all_local() -> None:
    """Free every window (from ``shutdown``; collective like it)."""
    if _aux or win.win_names():
        win_free()


B.on_shutdown.append(free_all_local)


def get_current_created_window_names() -> list[str]:
    """Names of the windows that exist, sorted."""
    return sorted(_aux)


# ------------------------------------------------------------- weights
def _weights(obj: Any, allowed: list[int], what: str, role: str) -> dict[int, float]:
    if not isinstance(obj, Mapping):
        raise ValueError(f"Argument {what} has to be a dictionary map from the {role} rank to "  # noqa: TRY004
                         "the weights.")
    out = {int(k): float(v) for k, v in obj.items()}
    extra = sorted(set(out) - set(allowed))
    if extra:
        raise ValueError(f"The key of {what} should only contain ranks that belong to "
                         f"{role}s {allowed}: {extra} do not.")
    return out


def _self_weight(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
        raise ValueError(f"Argument self_weight has to be a float for self rank, got {v!r}.")  # noqa: TRY004
    return float(v)


# ---------------------------------------------------------------- put / acc
def _write(tensor: torch.Tensor, name: str, self_weight: Any, dst_weights: Any,
           require_mutex: bool, accumulate: bool) -> bool:
    aux = _get_aux(name)
    outs = B.out_neighbor_ranks()
    dst = {r: 1.0 for r in outs} if dst_weights is None else \
        _weights(dst_weights, outs, "dst_weights", "out-neighbor")
    sw = 1.0 if self_weight is None else _self_weight(self_weight)
    MPI = _mpi()
    with _held(aux, list(dst), require_mutex):
        if accumulate:
            win.win_accumulate(tensor, name, dst_weights=dst)
        else:
            win.win_put(tensor, name, dst_weights=dst)
        with _own(aux):
            p = float(aux.floats[1])
        one = np.ones(1, dtype=np.int64)
        for j in sorted(dst):
            aux.win.Lock(j, MPI.LOCK_SHARED)
            try:
                aux.win.Accumulate([one, MPI.INT64_T], j,
                                   target=(aux.version_disp(aux.rank), 1, MPI.INT64_T),
                                   op=MPI.SUM)
                if _with_p:
                    pv = np.array([p * dst[j]], dtype=np.float64)
                    aux.win.Accumulate([pv, MPI.DOUBLE], j,
                                       target=(aux.p_disp(aux.rank), 1, MPI.DOUBLE),
                                       op=MPI.SUM if accumulate else MPI.REPLACE)
            finally:
                aux.win.Unlock(j)
        if sw != 1.0:  # BlueFog scales after sending: x <- sw * x (and p alike)
            with torch.no_grad():
                tensor.mul_(sw)
            if _with_p:
                with _own(aux):
                    aux.floats[1] *= sw
    return True


def _handle(name: str) -> int:
    h = next(_win_ids)
    _win_handles[h] = name
    return h


def win_put_nonblocking(tensor: torch.Tensor, name: str, self_weight: float | None = None,
                        dst_weights: dict[int, float] | None = None,
                        require_mutex: bool = False) -> int:
    """Write ``dst_weights[j] * tensor`` into this rank's slot at each out-neighbour j
    (default: all, weight 1), then ``tensor *= self_weight``; returns a win handle."""
    H.traced_run("WIN_PUT", name, lambda: _write(tensor, name, self_weight, dst_weights,
                                                  require_mutex, False))
    return _handle(name)


def win_put(tensor: torch.Tensor, name: str, self_weight: float | None = None,
            dst_weights: dict[int, float] | None = None, require_mutex: bool = False) -> bool:
    """Blocking :func:`win_put_nonblocking`; returns True."""
    return win_wait(win_put_nonblocking(tensor, name, self_weight, dst_weights, require_mutex))


def win_accumulate_nonblocking(tensor: torch.Tensor, name: str,
                               self_weight: float | None = None,
                               dst_weights: dict[int, float] | None = None,
                               require_mutex: bool = False) -> int:
    """Add ``dst_weights[j] * tensor`` into this rank's slot at each out-neighbour j, then
    ``tensor *= self_weight``; returns a win handle."""
    H.traced_run("WIN_ACCUMULATE", name, lambda: _write(tensor, name, self_weight,
                                                         dst_weights, require_mutex, True))
    return _handle(name)


def win_accumulate(tensor: torch.Tensor, name: str, self_weight: float | None = None,
                   dst_weights: dict[int, float] | None = None,
                   require_mutex: bool = False) -> bool:
    """Blocking :func:`win_accumulate_nonblocking`; returns True."""
    return win_wait(win_accumulate_nonblocking(tensor, name, self_weight, dst_weights,
                                               require_mutex))


# ------------------------------------------------------------------------ get
def _get(name: str, src_weights: Any, require_mutex: bool) -> bool:
    aux = _get_aux(name)
    ins = B.in_neighbor_ranks()
    src = {r: 1.0 for r in ins} if src_weights is None else \
        _weights(src_weights, ins, "src_weights", "in-neighbor")
    MPI = _mpi()
    with _held(aux, list(src), require_mutex):
        win.win_get(name, src_weights=src)
        fetched = {}
        if _with_p:
            for j in sorted(src):
                pv = np.zeros(1, dtype=np.float64)
                aux.win.Lock(j, MPI.LOCK_SHARED)
                try:
                    aux.win.Get([pv, MPI.DOUBLE], j, target=(8, 1, MPI.DOUBLE))
                finally:
                    aux.win.Unlock(j)
                fetched[j] = float(pv[0]) * src[j]
        with _own(aux):
            for j in src:
                aux.words[2 + j] += 1
                if _with_p:
                    aux.floats[2 + aux.n + j] = fetched[j]
    return True


def win_get_nonblocking(name: str, src_weights: dict[int, float] | None = None,
                        require_mutex: bool = False) -> int:
    """Fetch ``src_weights[j] * x_j`` from each in-neighbour j (default: all, weight 1) into
    slot j here (read later by ``win_update``); returns a win handle."""
    H.traced_run("WIN_GET", name, lambda: _get(name, src_weights, require_mutex))
    return _handle(name)


def win_get(name: str, src_weights: dict[int, float] | None = None,
            require_mutex: bool = False) -> bool:
    """Blocking :func:`win_get_nonblocking`; returns True."""
    return win_wait(win_get_nonblocking(name, src_weights, require_mutex))


neighbor_win_put = win_put
neighbor_win_put_nonblocking = win_put_nonblocking
neighbor_win_accumulate = win_accumulate
neighbor_win_accumulate_nonblocking = win_accumulate_nonblocking
neighbor_win_get = win_get
neighbor_win_get_nonblocking = win_get_nonblocking


def win_poll(handle: int) -> bool:
    """True when the window op behind ``handle`` is done (they finish inside the call)."""
    return True


def win_wait(handle: int) -> bool:
    """Wait for a window op's handle; False (with a warning) for an unknown handle."""
    if _win_handles.pop(handle, None) is None:
        logger.warning("Win wait is called but the handle is not found in the "
                       "_win_handle_map.")
        return False
    return True


# --------------------------------------------------------------------- update
def win_update(name: str, self_weight: float | None = None,
               neighbor_weights: dict[int, float] | None = None, reset: bool = False,
               clone: bool = False, require_mutex: bool = False) -> torch.Tensor:
    """``x <- self_weight * x + sum_j neighbor_weights[j] * slot_j`` on this rank.

    Defaults: the graph's weights with ``is_weighted``, else the uniform
    ``1 / (in_degree + 1)``. ``reset`` zeroes the slots used; ``clone`` returns a new
    tensor and leaves the registered one as it is; ``require_mutex`` holds this rank's
    mutex. Returns the registered tensor (updated in place) or the clone.
    """
    aux = _get_aux(name)
    if (self_weight is None) != (neighbor_weights is None):
        raise ValueError("Arguments self_weight and neighbor_weights have to be presented at "
                         "the same time")
    ins = B.in_neighbor_ranks()
    if self_weight is None:
        given = B.default_recv_weights()
        if given is None:
            sw = 1.0 / (len(ins) + 1)
            nb = {r: sw for r in ins}
        else:
            sw, nb = given
    else:
        nb = _weights(neighbor_weights, ins, "neighbor_weights", "in-neighbor")
        sw = _self_weight(self_weight)
    with _held(aux, [aux.rank], require_mutex):
        out = win.win_update(name, self_weight=sw, neighbor_weights=nb, reset=reset,
                             clone=clone)
        with _own(aux):
            for j in nb:
                aux.words[2 + j] = 0
            if _with_p and not clone:
                p = sw * float(aux.floats[1])
                for j in sorted(nb):
                    p += nb[j] * float(aux.floats[2 + aux.n + j])
                aux.floats[1] = p
            if _with_p and reset:
                for j in nb:
                    aux.floats[2 + aux.n + j] = 0.0
    return out


def win_update_then_collect(name: str, require_mutex: bool = True) -> torch.Tensor:
    """``x <- x + sum_j slot_j`` over the in-neighbours, then zero those slots."""
    return win_update(name, 1.0, {r: 1.0 for r in B.in_neighbor_ranks()}, reset=True,
                      require_mutex=require_mutex)


# ----------------------------------------------------------------- metadata
def get_win_version(name: str) -> dict[int, int]:
    """``{in-neighbour j: writes into slot j since this rank last read it}``."""
    aux = _get_aux(name)
    with _own(aux):
        return {r: int(aux.words[2 + r]) for r in B.in_neighbor_ranks()}


def win_associated_p(name: str) -> float:
    """This rank's associated ``p`` of window ``name`` (starts at 1.0)."""
    aux = _get_aux(name)
    with _own(aux):
        return float(aux.floats[1])


def turn_on_win_ops_with_associated_p() -> None:
    """From now on, window ops also apply to each window's associated ``p``."""
    global _with_p
    _with_p = True


def turn_off_win_ops_with_associated_p() -> None:
    """Window ops leave ``p`` alone again (the default)."""
    global _with_p
    _with_p = False


@contextlib.contextmanager
def win_lock(name: str) -> Iterator[None]:
    """BlueFog opens an RMA access epoch here. decomm's window ops each open and close
    their own lock epoch, so this only checks that the window exists."""
    _get_aux(name)
    yield


def win_fence(name: str) -> bool:
    """Collective: every window op any rank issued before it is complete everywhere after
    it (decomm's ops complete at return, so a barrier suffices). Returns True."""
    _get_aux(name)
    ops.barrier()
    return True
