"""Lifecycle and public accessors: ``init``/``shutdown``, rank and size, the topology in
force and its round counter, timeouts and byte counters.

``init()`` brings up MPI (through mpi4py, which loads the same MPI library the C++
core links against), duplicates the world communicator for decomm's own traffic,
starts the C++ backend and installs the process state (:mod:`decomm._state`), which
the ops read; it hands the rank and backend to the timeline and the CUDA glue. Every
neighbour op uses round ``current_round()`` of the topology, and the optimizer
wrappers call ``advance_round()`` once per communication step, so a time-varying
schedule such as ``BaseGraph(n, k)`` cycles through its rounds during training.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import Any

from . import _agree, _checks, _failure, _state, cuda_ops, timeline
from . import backends as _backends
from .errors import DecommError
from .topology import ExponentialGraph, Topology

__all__ = [
    "advance_round",
    "current_round",
    "get_timeout",
    "get_topology",
    "in_neighbors",
    "init",
    "is_initialized",
    "local_rank",
    "local_size",
    "mpi_library_version",
    "out_neighbors",
    "rank",
    "reset_stats",
    "set_round",
    "set_timeout",
    "set_topology",
    "shutdown",
    "size",
    "stats",
]

DEFAULT_TIMEOUT_S = 300.0


def _env_float(name: str, default: float, allow_zero: bool = False) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'non-negative' if allow_zero else 'positive'}, "
                         f"got {raw!r}")
    return value


def init(backend: str = "auto", *, timeout: float | None = None, check: bool | None = None,
         comm: Any = None, abort_on_error: bool = True,
         fault_tolerant: bool | None = None) -> None:
    """Start decomm on every rank (call once, on all ranks, before any op).

    Args:
        backend: ``"auto"`` (MPI for CPU tensors; NCCL for CUDA tensors when built),
            ``"mpi"``, or ``"nccl"`` (raises if the NCCL backend was not built).
        timeout: seconds a call may wait for its neighbours before raising
            :class:`DecommError` naming the missing ranks; default ``DECOMM_TIMEOUT``
            or 300.
        check: compare each call's op, name, shape, dtype, topology round and call
            count across the ranks involved (default on; ``DECOMM_CHECK=0`` turns it off).
            ``DECOMM_CHECK_FINITE=1`` also makes a rank whose *input* to
            neighbor_allreduce/allreduce holds NaN or Inf raise after the call (the
            values are still exchanged faithfully, so no neighbour is left waiting).
        comm: an mpi4py communicator to run on (default ``MPI.COMM_WORLD``).
        abort_on_error: when an exception escapes the program on one rank, abort the
            whole MPI job (as ``python -m mpi4py`` does) instead of leaving the other
            ranks waiting.
        fault_tolerant: survive the loss of ranks (default ``DECOMM_FAULT_TOLERANT``, off):
            a peer failure raises :class:`~decomm.errors.PeerFailureError` on every
            survivor, naming the lost ranks, and :func:`decomm.recover` (called by the
            optimizer wrappers inside ``step()``) continues on the survivors. The job must
            run under ULFM (``decomm-run --fault-tolerant`` or ``mpirun --with-ft ulfm``);
            an uncaught exception then stops only its own rank. See :mod:`decomm.fault`.

    The initial topology is ``ExponentialGraph(size())``, at round 0. Calling ``init``
    again with the same arguments does nothing; with different ones it raises (call
    :func:`shutdown` first to start over with other settings).
    """
    if backend not in ("auto", "mpi", "nccl"):
        raise ValueError(f"backend must be 'auto', 'mpi' or 'nccl', got {backend!r}")
    if fault_tolerant is None:
        fault_tolerant = os.environ.get("DECOMM_FAULT_TOLERANT", "0") not in ("", "0")
    asked = {"backend": backend, "timeout": timeout, "check": check, "comm": comm,
             "abort_on_error": abort_on_error, "fault_tolerant": bool(fault_tolerant)}
    current = _state.get()
    if current is not None:
        differ = [f"{k}={asked[k]!r} (in force: {current.init_args[k]!r})" for k in asked
                  if asked[k] is not None and k != "backend" and asked[k] != current.init_args[k]]
        if backend != current.init_args["backend"]:
            differ.insert(0, f"backend={backend!r} (in force: {current.init_args['backend']!r})")
        if differ:
            raise DecommError(f"decomm.init() on rank {current.rank}: already initialized with "
                              f"other settings: {', '.join(differ)}; call decomm.shutdown() "
                              "first to start again with new ones")
        return

    if backend == "nccl" and not _backends.nccl_available():
        if _backends.built_with_cuda() and _backends.nccl_built():
            raise DecommError("backend='nccl' requested: this decomm build has the NCCL "
                              "backend, but no CUDA device is visible here "
                              "(torch.cuda.is_available() is False); use backend='auto' or "
                              "'mpi'")
        raise DecommError("backend='nccl' requested, but this decomm build has no NCCL "
                          "backend (built without CUDA); use backend='auto' or 'mpi'")
    _quiet_osc_ucx()
    from mpi4py import MPI

    if timeout is None:
        timeout = _env_float("DECOMM_TIMEOUT", DEFAULT_TIMEOUT_S)
    elif timeout <= 0:
        raise ValueError(f"timeout must be positive seconds, got {timeout!r}")
    if check is None:
        check = os.environ.get("DECOMM_CHECK", "1") != "0"
    world = comm if comm is not None else MPI.COMM_WORLD
    if fault_tolerant and os.environ.get("OMPI_MCA_mpi_ft_enable", "") in ("", "0", "false"):
        sys.stderr.write("[decomm] fault_tolerant=True, but this job does not run under ULFM "
                         "(start it with decomm-run --fault-tolerant or mpirun --with-ft ulfm): "
                         "a lost rank still ends the job\n")
    n = world.Get_size()
    init_args = dict(asked, timeout=float(timeout), check=bool(check), comm=comm)
    state = _install(world, init_args, ExponentialGraph(n), launch_ranks=list(range(n)))
    # A rank that leaves normally (end of script, sys.exit, shutdown()) tells its
    # peers from shutdown(), so a rank still waiting on it raises at once.
    atexit.register(shutdown)
    if fault_tolerant:
        _failure.enable()
        state.excepthook = _failure.excepthook(sys.excepthook)
        sys.excepthook = state.excepthook
    elif abort_on_error and state.size > 1:
        state.excepthook = _install_abort_hook(world)


def _install(world: Any, init_args: dict[str, Any], topo: Topology, *, launch_ranks: list[int],
             lost: list[int] | None = None, round_: int = 0,
             topology_source: Any = None) -> _state.State:
    """Start a backend on ``world`` and install the process state (from :func:`init`,
    and from :func:`decomm.recover` on the survivors' communicator)."""
    from mpi4py import MPI

    from . import _C

    local = world.Split_type(MPI.COMM_TYPE_SHARED, key=world.Get_rank())
    # A background thread progresses non-blocking ops only when the node has a core to
    # spare for it: with every core busy it slowed overlapped work down
    # (benchmarks/results/overlap.md). DECOMM_PROGRESS_THREAD=1/0 forces either way;
    # without the thread, ops progress inside wait()/poll().
    ranks_here, cores = local.Get_size(), os.cpu_count() or 1
    spare_core = ranks_here < cores
    raw = os.environ.get("DECOMM_PROGRESS_THREAD", "")
    progress = spare_core if raw == "" else raw != "0"
    be = _C.MpiBackend(world.py2f(), init_args["timeout"], init_args["check"], progress)
    # A blocking wait spins before it yields when every rank of the node has a core:
    # a yield under load gives the core away for a whole time slice. With more ranks
    # than cores the peer needs the core, so it yields at once. DECOMM_SPIN_US overrides.
    be.spin_us = _env_float("DECOMM_SPIN_US", 1000.0 if ranks_here <= cores else 0.0,
                            allow_zero=True)
    _failure.track(be, init_args["fault_tolerant"])
    state = _state.State(comm=world, backend=be, rank=world.Get_rank(), size=world.Get_size(),
                         local_rank=local.Get_rank(), local_size=local.Get_size(),
                         topology=topo, topo_hash=_agree.topology_digest(topo), round=round_)
    state.check_finite = os.environ.get("DECOMM_CHECK_FINITE", "0") not in ("", "0")
    state.init_args = init_args
    state.fault_tolerant = init_args["fault_tolerant"]
    state.launch_ranks = list(launch_ranks)
    state.lost = list(lost or [])
    state.topology_source = topology_source
    local.Free()
    _state.install(state)
    timeline.attach(state.rank, be)
    try:  # collective: how CUDA tensors travel (NCCL, or MPI via pinned host memory)
        cuda_ops.setup(state, init_args["backend"], check=init_args["check"])
    except BaseException:
        shutdown()
        raise
    return state


def _quiet_osc_ucx() -> None:
    """On one host, keep Open MPI's UCX one-sided component out (before MPI starts).

    Open MPI 5 from the wheel prints an "Error: OSC UCX component priority set inside
    component query failed" line per rank at every ``win_create`` although it then
    uses its shared-memory component anyway. MCA variables are read only when MPI
    initializes, so this runs before mpi4py does, and only for single-host jobs: on a
    UCX cluster (InfiniBand) osc/ucx is the fast one-sided path. A value the user
    set wins. ``decomm-run`` sets the same variable for the ranks.
    """
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized():
        return
    size = os.environ.get("OMPI_COMM_WORLD_SIZE")
    local = os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE")
    if (size is None and "PMIX_RANK" not in os.environ) or (size is not None and local == size):
        os.environ.setdefault("OMPI_MCA_osc", "^ucx")


def _install_abort_hook(world: Any) -> Any:
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        previous(exc_type, exc, tb)
        sys.stderr.write(f"[decomm] rank {world.Get_rank()}: uncaught {exc_type.__name__}; "
                         "aborting the MPI job so the other ranks do not wait forever\n")
        sys.stderr.flush()
        world.Abort(1)

    hook.previous = previous  # type: ignore[attr-defined]
    sys.excepthook = hook
    return hook


def shutdown() -> None:
    """Stop the backend (pending handles fail). Safe to call twice; init() may follow.

    With fault tolerance on, the survivors first meet in one agreement (a failure
    during it is recovered from), and a job that lost ranks then ends this process
    with ``os._exit(0)`` instead of returning (see :func:`decomm._failure.finish`).
    """
    st = _state.get()
    if st is None:
        return
    if st.fault_tolerant and st.size > 1:
        _failure.finish(_close)
    else:
        _close(st)


def _close(state: _state.State) -> None:
    _state.clear()
    _failure.disable()
    if state.excepthook is not None and sys.excepthook is state.excepthook:
        sys.excepthook = state.excepthook.previous
    timeline.detach()
    cuda_ops.teardown(state)
    state.backend.close()


def is_initialized() -> bool:
    """True between :func:`init` and :func:`shutdown`."""
    return _state.get() is not None


def rank() -> int:
    """This process's rank in ``[0, size())``."""
    return _state.require().rank


def size() -> int:
    """Number of ranks (nodes of the topology)."""
    return _state.require().size


def local_rank() -> int:
    """Rank among the processes on this machine (shared-memory node)."""
    return _state.require().local_rank


def local_size() -> int:
    """Number of processes on this machine."""
    return _state.require().local_size


def _as_topology(obj: Any) -> Topology:
    if isinstance(obj, Topology):
        return obj
    if hasattr(obj, "ndim") or isinstance(obj, (list, tuple)):
        return Topology.from_matrices(obj)
    raise TypeError("set_topology expects a decomm.topology.Topology, an n x n mixing matrix "
                    f"(numpy or torch) or a list of them, got {type(obj).__name__}")


def set_topology(topology: Any, *, start_round: int = 0) -> None:
    """Use ``topology`` for every neighbour op from now on, starting at ``start_round``.

    ``topology`` is a :class:`~decomm.topology.Topology` (e.g. ``BaseGraph(size(), 2)``),
    an n x n row-stochastic matrix ``W`` (numpy or torch; ``W[i, j]`` is the weight rank
    i gives to rank j's value), a list of such matrices used in turn, or a callable
    ``n -> Topology`` (called with ``size()`` now, and with the survivors' number after
    a loss under fault tolerance; otherwise the survivors re-plan the topology with
    :func:`decomm.topology.replan.replan`).

    Collective: every rank must call it with the same schedule. The ranks compare the
    topology's fingerprint (one small allgather) and raise :class:`DecommError` naming
    the ranks that differ, instead of hanging later.
    """
    state = _state.require()
    source = None
    if callable(topology) and not isinstance(topology, Topology):
        source = topology  # n -> Topology: also how the survivors re-plan after a loss
        topo = topology(state.size)
        if not isinstance(topo, Topology):
            raise TypeError(f"set_topology: the callable returned {type(topo).__name__} for "
                            f"n={state.size}; it must return a decomm.topology.Topology")
    else:
        topo = _as_topology(topology)
    if topo.n != state.size:
        raise ValueError(f"the topology has n={topo.n} nodes but decomm.size() is {state.size}; "
                         f"build it for {state.size} nodes, e.g. BaseGraph(decomm.size(), k)")
    if isinstance(start_round, bool) or not isinstance(start_round, int) or start_round < 0:
        raise ValueError(f"start_round must be a non-negative int, got {start_round!r}")
    # float32 input rows sum to 1 within a few ulps: the tolerance follows its dtype
    if topo.rounds is not None and not topo.is_row_stochastic(max(1e-9, topo.stochastic_tol)):
        raise ValueError(f"{topo.name}: every round must be row-stochastic")
    digest = _agree.topology_digest(topo)
    _check_same_everywhere(state, digest, start_round, topo)
    with state.lock:
        state.topology = topo
        state.topo_hash = digest
        state.round = start_round
        state.plans = {}
        state.topology_source = source


def _check_same_everywhere(state: _state.State, digest: int, start_round: int,
                           topo: Topology) -> None:
    table = _agree.gather_rows(state.backend.allgather, [digest, start_round], "set_topology")
    differ = _agree.differing_ranks(table)
    if differ:
        raise DecommError(
            f"set_topology on rank {state.rank}: ranks {differ} set a different schedule or "
            f"start_round than rank 0 (this rank: {topo.name}, start_round={start_round}); "
            "every rank must pass the same topology")


def get_topology() -> Topology:
    """The topology in force."""
    return _state.require().topology


def current_round() -> int:
    """The round number neighbour ops use now (the topology applies it modulo its length)."""
    return _state.require().round


def advance_round(steps: int = 1) -> int:
    """Move the round counter forward by ``steps``; returns the new round."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    state = _state.require()
    with state.lock:
        state.round += steps
        return state.round


def set_round(round_: int) -> None:
    """Set the round counter (used when resuming from a checkpoint)."""
    if isinstance(round_, bool) or not isinstance(round_, int) or round_ < 0:
        raise ValueError(f"round must be a non-negative int, got {round_!r}")
    state = _state.require()
    with state.lock:
        state.round = round_


def in_neighbors(rank: int | None = None) -> list[int]:
    """In-neighbours (ranks whose values ``rank`` averages in) of the current round."""
    state = _state.require()
    r = state.rank if rank is None else _checks.check_id(rank, "rank", state.size,
                                                          "in_neighbors")
    return state.topology.in_neighbors(r, state.round)


def out_neighbors(rank: int | None = None) -> list[int]:
    """Out-neighbours (ranks that receive ``rank``'s value) of the current round."""
    state = _state.require()
    r = state.rank if rank is None else _checks.check_id(rank, "rank", state.size,
                                                          "out_neighbors")
    return state.topology.out_neighbors(r, state.round)


def set_timeout(seconds: float) -> None:
    """Change how long a call waits for missing neighbours before raising."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise ValueError(f"timeout must be positive seconds, got {seconds!r}")
    _state.require().backend.timeout = float(seconds)


def get_timeout() -> float:
    """Seconds a call waits for missing neighbours before raising DecommError."""
    return float(_state.require().backend.timeout)


def stats() -> dict[str, int]:
    """Bytes this rank has sent and received through decomm since init or reset_stats()."""
    st = _state.require()
    sent, received = st.stats_base  # counted by backends before a recovery
    return {"bytes_sent": sent + int(st.backend.bytes_sent),
            "bytes_received": received + int(st.backend.bytes_received)}


def reset_stats() -> None:
    """Zero the counters that :func:`stats` reports."""
    st = _state.require()
    st.backend.reset_counters()
    st.stats_base = (0, 0)


def mpi_library_version() -> str:
    """The MPI library decomm's C++ core is running on."""
    from . import _C

    return _C.mpi_library_version().rstrip("\x00").strip()
