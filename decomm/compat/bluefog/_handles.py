"""BlueFog-style integer handles over decomm's :class:`~decomm.ops.Handle` objects.

BlueFog's non-blocking ops return an ``int``; ``poll(h)`` / ``synchronize(h)`` /
``wait(h)`` look it up in a table and drop it once waited. Ops that decomm runs only
blocking (broadcast, allgather, the hierarchical op, window ops) complete inside the
call and are stored as already-finished entries: every rank makes the same calls in
the same order, so finishing a collective early changes no result (it only forgoes
overlap).

Timeline: with the timeline on, every compat op is also recorded under BlueFog's
activity names (``ENQUEUE_<OP>`` for the call, ``MPI_<OP>`` for the wait), and the
file is rewritten shortly after (BlueFog's timeline is a continuously written file;
decomm's is written on flush): within 50 ms of an op, and at once by ``barrier`` and
``timeline_end_activity``.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from typing import Any

from ... import timeline

__all__ = ["Done", "poll", "register", "schedule_flush", "synchronize", "traced_call",
           "traced_run", "wait"]


class Done:
    """An entry whose result is already there."""

    def __init__(self, result: Any) -> None:
        self._result = result

    def poll(self) -> bool:
        return True

    def wait(self) -> Any:
        return self._result


class _Traced:
    """Wraps a decomm handle so that its wait is an ``MPI_<OP>`` span."""

    def __init__(self, inner: Any, op: str, name: str | None) -> None:
        self._inner, self._op, self._name = inner, op, name

    def poll(self) -> bool:
        return self._inner.poll()

    def wait(self) -> Any:
        if not timeline.is_enabled():
            return self._inner.wait()
        with timeline.activity(f"MPI_{self._op}", tensor=self._name or ""):
            out = self._inner.wait()
        schedule_flush()
        return out


_ids = itertools.count()
_table: dict[int, Any] = {}
_lock = threading.Lock()


def register(entry: Any) -> int:
    """Store ``entry`` (``poll()``/``wait()``) and return its new integer handle."""
    h = next(_ids)
    with _lock:
        _table[h] = entry
    return h


def traced_call(op: str, name: str | None, start: Callable[[], Any]) -> int:
    """Run ``start()`` (returning a decomm handle, or a :class:`Done`) and register it.

    ``op`` is BlueFog's activity suffix, e.g. ``"NEIGHBOR_ALLREDUCE"``.
    """
    if not timeline.is_enabled():
        return register(start())
    with timeline.activity(f"ENQUEUE_{op}", tensor=name or ""):
        entry = start()
    if isinstance(entry, Done):  # finished inside the call: its communication is there
        with timeline.activity(f"MPI_{op}", tensor=name or ""):
            pass
        schedule_flush()
        return register(entry)
    return register(_Traced(entry, op, name))


def traced_run(op: str, name: str | None, fn: Callable[[], Any]) -> Any:
    """Run a blocking ``fn()`` recorded as ``ENQUEUE_<op>`` + ``MPI_<op>`` spans (when the
    timeline is on) and return its result."""
    if not timeline.is_enabled():
        return fn()
    with timeline.activity(f"ENQUEUE_{op}", tensor=name or ""):
        pass
    with timeline.activity(f"MPI_{op}", tensor=name or ""):
        out = fn()
    schedule_flush()
    return out


def _lookup(handle: Any, what: str) -> Any:
    with _lock:
        entry = _table.get(handle)
    if entry is None:
        raise ValueError(f"Cannot find handle to {what}: {handle!r} is not a pending handle "
                         "(already waited, or not returned by a *_nonblocking op)")
    return entry


def poll(handle: int) -> bool:
    """True once the op behind ``handle`` has completed; never blocks."""
    return bool(_lookup(handle, "poll").poll())


def synchronize(handle: int) -> Any:
    """Wait for ``handle`` and return the op's output; the handle is then dropped."""
    entry = _lookup(handle, "synchronize")
    try:
        return entry.wait()
    finally:
        with _lock:
            _table.pop(handle, None)


def wait(handle: int) -> Any:
    """Alias of :func:`synchronize`."""
    return synchronize(handle)


_flush_timer: threading.Timer | None = None
_flush_lock = threading.Lock()
FLUSH_DELAY_S = 0.05


def _flush() -> None:
    global _flush_timer
    with _flush_lock:
        _flush_timer = None
    if timeline.is_enabled():
        timeline.flush()


def schedule_flush() -> None:
    """Rewrite the timeline file within ``FLUSH_DELAY_S`` (one pending rewrite at most)."""
    global _flush_timer
    with _flush_lock:
        if _flush_timer is not None:
            return
        _flush_timer = threading.Timer(FLUSH_DELAY_S, _flush)
        _flush_timer.daemon = True
        _flush_timer.start()
