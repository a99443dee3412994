"""Timeline: a per-rank Chrome-trace JSON of every decomm op and its phases.

Turn it on for a run with ``DECOMM_TIMELINE=prefix`` (every rank writes
``f"{prefix}{rank}.json"``, e.g. ``DECOMM_TIMELINE=/tmp/tl/rank`` gives
``/tmp/tl/rank0.json`` ...), or from code with :func:`start` / :func:`stop`.
Open the files in ``chrome://tracing`` or https://ui.perfetto.dev (load several
ranks at once: timestamps are ``CLOCK_MONOTONIC``, shared by all processes of a
host, so ranks of one machine line up).

Each op is one complete event (``"ph": "X"``, category ``"op"``) whose children
(category ``"phase"``) split it into

``validate``
    Python-side checks and weight resolution, up to the C++ core's entry;
``pack``
    headers, sender-side scaling (``dst_weights``) and posting every send and
    receive (for collectives: the cross-rank header check and the post);
``send/recv``
    waiting for all messages to arrive and all sends to complete;
``reduce``
    the fused weighted sum (or the averaging of an allreduce);
``unpack``
    copying the result back (non-contiguous / numpy inputs) and returning.

The C++ core takes the four timestamps (begin, posted, arrived, done) only while
the timeline is on. Non-blocking ops are drawn on lanes of their own
(``tid >= 1000``) from the call to the end of ``wait()``, and the caller's lane
gets a ``wait`` event. Each traced op also opens a
``torch.profiler.record_function("decomm::<op>")`` range whenever a PyTorch
profiler is recording, so decomm shows up in ``torch.profiler`` traces too
(with or without the timeline).

Cost when off: ops decorated with :func:`traced` pay one Python call and two
attribute checks (``benchmarks/results/timeline_overhead.md``). The files are
written at :func:`flush`, :func:`stop`, :func:`decomm.shutdown` and at interpreter
exit. With ``DECOMM_TIMELINE`` alone, the exit-time write happens only in a process
that joined the job (called ``decomm.init()``): every process that imports decomm
sees the variable, including ``decomm-run`` itself, which would otherwise replace
rank 0's file with an empty trace when it exits after the ranks.

User code can add its own spans to the same file with :func:`activity`::

    with decomm.timeline.activity("forward"):
        loss = model(x)
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import inspect
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch.autograd.profiler as _ap

__all__ = [
    "activity",
    "enabled",
    "events",
    "flush",
    "is_enabled",
    "path",
    "phase",
    "register_backend",
    "start",
    "stop",
    "traced",
]

#: True while the timeline records. Read by :func:`traced` on every call (the
#: whole cost of the off path together with the profiler check).
enabled: bool = False

MAX_EVENTS = 2_000_000  # beyond this, events are counted but dropped
ASYNC_LANE_BASE = 1000

_prefix: str | None = None
_events: list[tuple] = []
_dropped = 0
_lock = threading.Lock()
_rank: int | None = None  # given by attach() (decomm.init)
_attached: Any = None  # the runtime's backend, whose C++ timestamps follow the timeline
_backends: list[Any] = []  # other backends (hierarchical, ...) to switch with the timeline
_tids: dict[int, int] = {}
_tid_names: dict[int, str] = {}
_lanes_busy: set[int] = set()
_atexit_registered = False
_from_env = False  # started by DECOMM_TIMELINE at import, not by a call to start()
_joined = False  # this process called decomm.init() (or wrote its file)
_local = threading.local()

_now = time.monotonic_ns  # CLOCK_MONOTONIC, the clock of the C++ steady_clock


# ------------------------------------------------------------------ control
def start(prefix: str) -> None:
    """Start recording; :func:`flush` writes ``f"{prefix}{rank}.json"``.

    ``prefix`` may name a directory (``"/tmp/tl/"``) or a file stem
    (``"/tmp/tl/run1-"``); missing directories are created at flush time.
    Calling it again with another prefix keeps the events and changes the file.
    """
    global enabled, _prefix, _atexit_registered, _from_env
    if not isinstance(prefix, (str, os.PathLike)) or not str(prefix):
        raise ValueError(f"timeline prefix must be a non-empty path string, got {prefix!r}")
    _prefix = str(prefix)
    _from_env = False  # an explicit call: this process wants its file
    enabled = True
    _arm(True)
    if not _atexit_registered:
        atexit.register(_at_exit)
        _atexit_registered = True


def stop() -> str | None:
    """Stop recording, write the file and return its path (None if nothing was started)."""
    global enabled
    if _prefix is None:
        return None
    out = flush()
    enabled = False
    _arm(False)
    return out


def is_enabled() -> bool:
    """True while the timeline records."""
    return enabled


def path() -> str | None:
    """The file this rank's timeline goes to (None when never started)."""
    if _prefix is None:
        return None
    return f"{_prefix}{_my_rank()}.json"


def events() -> list[dict[str, Any]]:
    """The events recorded so far, as the Chrome-trace dicts :func:`flush` writes."""
    with _lock:
        raw = list(_events)
    return [_to_json(e) for e in raw]


def flush() -> str | None:
    """Write every event recorded so far to :func:`path` (rewriting it); return the path."""
    global _joined
    if _prefix is None:
        return None
    _joined = True  # written once (e.g. by decomm.shutdown): rewrite it at exit too
    out = path()
    assert out is not None
    rank = _my_rank()
    with _lock:
        raw = list(_events)
        dropped = _dropped
        tid_names = dict(_tid_names)
    trace: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": rank, "tid": 0,
         "args": {"name": f"rank {rank}"}},
        {"name": "process_sort_index", "ph": "M", "pid": rank, "tid": 0,
         "args": {"sort_index": rank}},
    ]
    for tid, tname in sorted(tid_names.items()):
        trace.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": tid,
                      "args": {"name": tname}})
    trace.extend(_to_json(e, rank) for e in raw)
    doc = {
        "traceEvents": trace,
        "displayTimeUnit": "ms",
        "otherData": {"rank": rank, "clock": "CLOCK_MONOTONIC", "dropped_events": dropped,
                      "producer": "decomm.timeline"},
    }
    parent = os.path.dirname(out)
    if parent:
        os.makedirs(parent, exist_ok=True)
    tmp = f"{out}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
    os.replace(tmp, out)
    return out


def attach(rank: int, backend: Any) -> None:
    """From :func:`decomm.init`: this process's rank, and the backend whose C++
    timestamps follow the timeline. (The runtime hands them over, so the timeline never
    looks the runtime up.)"""
    global _rank, _attached, _joined
    _rank, _attached, _joined = int(rank), backend, True
    if enabled:
        with contextlib.suppress(Exception):
            backend.timeline = True


def detach() -> None:
    """From :func:`decomm.shutdown`: write the file if recording, forget the backend."""
    global _attached
    if enabled:
        flush()
    _attached = None


def register_backend(backend: Any) -> None:
    """Switch ``backend``'s C++ timestamps with the timeline (used for sub-communicators)."""
    if backend is None:
        return
    _backends.append(backend)
    if enabled:
        with contextlib.suppress(Exception):
            backend.timeline = True


def _at_exit() -> None:
    if not enabled or _prefix is None:
        return
    if _from_env and not _joined:
        # DECOMM_TIMELINE reached a process that never joined the job (decomm-run, a
        # helper script): it has no trace, and its "rank" (0 by default) would
        # overwrite a real rank's file.
        return
    with contextlib.suppress(Exception):
        flush()


def _arm(on: bool) -> None:
    live = []
    for b in ([_attached] if _attached is not None else []) + _backends:
        try:
            b.timeline = on
            if b is not _attached:
                live.append(b)
        except Exception:  # closed or gone
            pass
    _backends[:] = live


_core_module: Any = None


def _core() -> Any:
    """``decomm._C``, imported on first use: ``import decomm`` works without the build."""
    global _core_module
    if _core_module is None:
        from . import _C

        _core_module = _C
    return _core_module


def _my_rank() -> int:
    return 0 if _rank is None else _rank


# ------------------------------------------------------------------ recording
def _tid() -> int:
    ident = threading.get_ident()
    tid = _tids.get(ident)
    if tid is None:
        with _lock:
            tid = _tids.get(ident)
            if tid is None:
                tid = len(_tids)
                _tids[ident] = tid
                th = threading.current_thread()
                _tid_names[tid] = "main" if th is threading.main_thread() else th.name
    return tid


def _emit(name: str, cat: str, t0: int, t1: int, tid: int, args: dict | None = None) -> None:
    global _dropped
    if len(_events) >= MAX_EVENTS:
        _dropped += 1
        return
    # Only atoms and tuples are stored, so the cyclic GC untracks the events and does
    # not walk hundreds of thousands of them on every full collection.
    _events.append((name, cat, t0, max(t1 - t0, 0), tid,
                    tuple(args.items()) if args else None))


def _to_json(e: tuple, rank: int | None = None) -> dict[str, Any]:
    name, cat, t0, dur, tid, args = e
    d: dict[str, Any] = {"name": name, "cat": cat, "ph": "X", "ts": t0 / 1000.0,
                         "dur": dur / 1000.0, "pid": _my_rank() if rank is None else rank,
                         "tid": tid}
    if args:
        d["args"] = {k: list(v) if isinstance(v, tuple) else v for k, v in args}
    return d


def _c_times_valid(times: Any, lo: int, hi: int) -> bool:
    if times is None:
        return False
    b, p, a, d = times
    return lo <= b <= p <= a <= d <= hi and b > 0 and p > 0 and a > 0


def _phase_events(times: Any, t_call: int, t_end: int, tid: int,
                  unpack_from: int | None = None) -> None:
    b, p, a, d = times
    _emit("validate", "phase", t_call, b, tid)
    _emit("pack", "phase", b, p, tid)
    _emit("send/recv", "phase", p, a, tid)
    _emit("reduce", "phase", a, d, tid)
    _emit("unpack", "phase", d if unpack_from is None else max(d, unpack_from), t_end, tid)


def _describe(args: tuple, kwargs: dict, name_idx: int | None, kind: str) -> tuple[str, dict]:
    name = kwargs.get("name")
    if name is None and name_idx is not None and len(args) > name_idx:
        name = args[name_idx]
    info: dict[str, Any] = {"name": str(name) if name is not None else kind}
    t = args[0] if args else kwargs.get("tensor")
    nbytes = getattr(t, "nbytes", None)
    if nbytes is not None:
        info["bytes"] = int(nbytes)
        info["dtype"] = str(getattr(t, "dtype", "")).replace("torch.", "")
        info["shape"] = tuple(getattr(t, "shape", ()))
    return info["name"], info


def recording() -> bool:
    """True while the timeline or torch's profiler records (ops then take the traced path)."""
    return enabled or _ap._is_profiler_enabled


def traced(kind: str, *, name_param: str = "name",
           phases: bool = True) -> Callable[[Callable], Callable]:
    """Decorator for an op: timeline events and a profiler range around each call.

    ``kind`` names the op (``"neighbor_allreduce"``). The decorated function's
    parameter ``name_param`` labels the event; its first argument, when it has
    ``nbytes``, gives the size. If the function returns a :class:`decomm.Handle`
    (a non-blocking op), the event ends when ``wait()`` returns. ``phases=False``
    for functions that run several C++ ops (the phases of one would mislead).
    """

    def deco(fn: Callable) -> Callable:
        try:
            params = list(inspect.signature(fn).parameters)
            name_idx: int | None = params.index(name_param) if name_param in params else None
        except (TypeError, ValueError):
            name_idx = None
        label = f"decomm::{kind}"

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not enabled and not _ap._is_profiler_enabled:
                return fn(*args, **kwargs)
            return _run_traced(kind, label, fn, name_idx, args, kwargs, phases)

        wrapper.__decomm_traced__ = kind  # type: ignore[attr-defined]
        return wrapper

    return deco


def _run_traced(kind: str, label: str, fn: Callable, name_idx: int | None, args: tuple,
                kwargs: dict, phases: bool) -> Any:
    rf = _ap.record_function(label) if _ap._is_profiler_enabled else None
    if not enabled:  # only a profiler is recording
        with rf:  # type: ignore[union-attr]
            result = fn(*args, **kwargs)
        if _is_handle(result):
            _profile_wait(result, label)
        return result
    name, info = _describe(args, kwargs, name_idx, kind)
    tid = _tid()
    _local.inner = False  # set by any traced op that runs inside this one
    t_call = _now()
    try:
        if rf is not None:
            with rf:
                result = fn(*args, **kwargs)
        else:
            result = fn(*args, **kwargs)
    except BaseException as exc:
        t_end = _now()
        _local.inner = True
        info["error"] = f"{type(exc).__name__}: {exc}"[:300]
        _emit(kind, "op", t_call, t_end, tid, info)
        raise
    t_end = _now()
    had_inner = _local.inner
    _local.inner = True
    if _is_handle(result):
        _trace_handle(kind, label, result, result._c, name, info, t_call, t_end, tid)
        return result
    times = _core().last_op_times()
    if phases and not had_inner and _c_times_valid(times, t_call, t_end):
        _phase_events(times, t_call, t_end, tid)
    _emit(kind, "op", t_call, t_end, tid, info)
    return result


def _is_handle(result: Any) -> bool:
    """A :class:`decomm.Handle`: it offers the ``on_wait`` hook and C++ timestamps."""
    c = getattr(result, "_c", None)
    return c is not None and hasattr(c, "times") and hasattr(result, "on_wait")


def _profile_wait(h: Any, label: str) -> None:
    def around(wait: Callable[[], Any]) -> Any:
        if _ap._is_profiler_enabled:
            with _ap.record_function(f"{label}.wait"):
                return wait()
        return wait()

    h.on_wait = around


def _trace_handle(kind: str, label: str, h: Any, c: Any, name: str, info: dict, t_call: int,
                  t_posted: int, tid: int) -> None:
    with _lock:
        lane = 0
        while lane in _lanes_busy:
            lane += 1
        _lanes_busy.add(lane)
        ltid = ASYNC_LANE_BASE + lane
        _tid_names.setdefault(ltid, f"async {lane}")
    info = dict(info, nonblocking=True)
    done = [False]

    def around(wait: Callable[[], Any]) -> Any:
        if done[0]:
            return wait()
        wtid = _tid()
        t_w0 = _now()
        try:
            if _ap._is_profiler_enabled:
                with _ap.record_function(f"{label}.wait"):
                    res = wait()
            else:
                res = wait()
        finally:
            t_w1 = _now()
            if not done[0]:
                done[0] = True
                with _lock:
                    _lanes_busy.discard(lane)
                if enabled:
                    times = tuple(c.times())
                    if _c_times_valid(times, t_call, t_w1):
                        _phase_events(times, t_call, t_w1, ltid, unpack_from=t_w0)
                    _emit(kind, "op", t_call, t_w1, ltid, info)
                    _emit("wait", "wait", t_w0, t_w1, wtid, {"name": name, "op": kind})
        return res

    h.on_wait = around


@contextlib.contextmanager
def _phase_cm(name: str, args: dict | None) -> Iterator[None]:
    tid = _tid()
    t0 = _now()
    try:
        yield
    finally:
        _emit(name, "phase", t0, _now(), tid, args)


_NULL = contextlib.nullcontext()


def phase(name: str, **args: Any) -> Any:
    """Context manager: a ``"phase"`` event on this thread's lane (no-op when off)."""
    if not enabled:
        return _NULL
    return _phase_cm(name, args or None)


@contextlib.contextmanager
def _activity_cm(name: str, args: dict | None) -> Iterator[None]:
    tid = _tid()
    t0 = _now()
    rf = _ap.record_function(name) if _ap._is_profiler_enabled else _NULL
    try:
        with rf:
            yield
    finally:
        if enabled:
            _emit(name, "activity", t0, _now(), tid, args)


def activity(name: str, **args: Any) -> Any:
    """Context manager: a user span (category ``"activity"``) in the timeline."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"activity name must be a non-empty str, got {name!r}")
    if not enabled and not _ap._is_profiler_enabled:
        return _NULL
    return _activity_cm(name, args or None)


def _reset_for_tests() -> None:
    """Forget every event (tests)."""
    global _dropped
    with _lock:
        _events.clear()
        _dropped = 0
        _lanes_busy.clear()


_env = os.environ.get("DECOMM_TIMELINE", "")
if _env:
    start(_env)
    _from_env = True
