"""One-sided neighbour ops over MPI RMA windows (BlueFog's ``win_*`` API).

A *window* is created collectively for one tensor. On every rank it holds

* slot 0: this rank's own value (what in-neighbours read with :func:`win_get`);
* one slot per in-neighbour ``j``: the latest value ``j`` wrote there
  (:func:`win_put` / :func:`win_accumulate`) or this rank fetched from ``j``
  (:func:`win_get`).

Writes and reads are *passive-target* one-sided operations: the target does not
call anything, so ranks progress at their own pace (asynchronous gossip).
:func:`win_update` then mixes locally: ``x <- self_weight * x + sum_j w_j * slot_j``.

Neighbours are fixed at :func:`win_create`: the in-/out-neighbours of the topology
in force then, over all its rounds (every other rank for a random family), and the
default weights come from that topology's round ``current_round()``. Default
weights and neighbour sets of later calls are taken from that same topology, so a
later ``set_topology`` does not invalidate a window.

Implementation and why (measured on this repo's Open MPI 5.0.11 wheel, see
``docs``/the report of issue 10): windows are allocated by MPI
(``MPI_Win_allocate``), which lets Open MPI pick ``osc/sm`` (shared memory, direct
load/store) on one host and ``osc/rdma`` across hosts; a put to a target that is
busy computing completes in microseconds with both. Windows over user memory
(``MPI_Win_create``) needed the target to enter MPI first (2 s stalls in the
probe), so they are not used. Every access is one lock epoch:
``MPI_Win_lock(SHARED)`` for remote writes/reads (they touch disjoint slots) and
``MPI_Win_lock(EXCLUSIVE)`` on this rank's own window for local reads and writes,
so a local :func:`win_update` never sees a half-written slot. No rank ever holds
two locks at once (no lock-order deadlock). Every value carries a version (an int64
before the data in each slot, bumped whenever a rank's own value changes), so a
:func:`win_get` whose fetch raced with a newer :func:`win_put` from the same
neighbour never overwrites it with the older value (the soak test caught that race
under ``osc/rdma``); it fetches again instead.

Measured on this host (2 ranks; the target sleeps 1 s in Python, making no MPI call):
a 1 MB ``win_put`` completes in 0.14 ms (``osc/sm``) / 0.66 ms (``osc/rdma`` over TCP),
while a two-sided ``Isend`` of 1 MB waits for the target: 20 ms / 58 ms per message
(the whole second spread over the messages). A two-sided emulation would need a
polling service thread on every rank (competing for the cores) to match that, so the
one-sided ops use RMA; the soak test passes under both ``osc/sm`` and ``osc/rdma``.

Accumulate (``MPI_SUM``) supports float32 and float64 (MPI has no float16 sum);
put/get move bytes and take every float dtype.

Open MPI 5 asks every one-sided component at each window creation; on a host without
UCX transports ``osc/ucx`` declines and prints ``osc_ucx_component.c:375  Error: OSC
UCX component priority set inside component query failed`` on every rank, every
:func:`win_create`. It is noise: ``osc/sm`` (one host) or ``osc/rdma`` is selected
and the ops work. ``OMPI_MCA_osc=^ucx`` (``decomm-run`` sets it unless you chose
``OMPI_MCA_osc``; with plain ``mpirun`` pass ``-x OMPI_MCA_osc=^ucx``) removes it. It
must be in the environment before MPI initializes: set from Python after
``decomm.init()`` it has no effect (measured: the line is still printed). Keep
``osc/ucx`` on clusters whose network is driven by UCX (InfiniBand), where it is the
fast one-sided path.
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import _agree, _checks, _state, errors, timeline
from .errors import DecommError

__all__ = [
    "win_accumulate",
    "win_create",
    "win_free",
    "win_get",
    "win_in_neighbors",
    "win_names",
    "win_out_neighbors",
    "win_put",
    "win_update",
    "win_update_then_collect",
]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_UPDATE_BLOCK_BYTES = 1 << 20  # win_update's in-place blocks: a few of them fit in cache


@dataclass
class _Window:
    name: str
    tensor: torch.Tensor  # the registered tensor (contiguous); win_update writes it
    shape: tuple
    dtype: torch.dtype
    numel: int
    nbytes: int
    stride: int  # bytes per slot: an int64 sequence number, then the data (8-aligned)
    win: Any  # mpi4py.MPI.Win
    data: list[torch.Tensor]  # per slot: (numel,) view of the window memory
    seqs: list[torch.Tensor]  # per slot: (1,) int64 view: version of the value it holds
    slot_of: dict[int, int]  # in-neighbour rank -> slot index on this rank
    remote_slot: dict[int, int]  # out-neighbour rank -> my slot index on that rank
    topology: Any  # the topology the window was built for
    rank: int
    owner: Any  # the _state.State at creation
    lock: threading.RLock = field(default_factory=threading.RLock)
    accum_dtype: Any = None  # MPI datatype for MPI_SUM (float32/64) or None
    exposed: int = 0  # version of this rank's own value (slot 0)


_windows: dict[str, _Window] = {}
_atexit_registered = False


def _mpi():
    from mpi4py import MPI

    return MPI


def _bytes(t: torch.Tensor) -> np.ndarray:
    """A writable uint8 numpy view of a contiguous tensor's memory (any dtype)."""
    return t.reshape(-1).view(torch.uint8).numpy()


def _neighbor_sets(topo: Any, r: int, n: int) -> tuple[list[int], list[int]]:
    """(in-neighbours, out-neighbours) of r over every round of ``topo``."""
    if topo.rounds is None or topo.rounds > 4 * n:
        others = [j for j in range(n) if j != r]
        return others, others
    ins: set[int] = set()
    outs: set[int] = set()
    for t in range(topo.rounds):
        ins.update(topo.in_neighbors(r, t))
        outs.update(topo.out_neighbors(r, t))
    return sorted(ins), sorted(outs)


def _get(name: Any, op: str) -> _Window:
    st = _state.require()
    rank = st.rank
    if st.fault_tolerant and st.backend.revoked:
        # RMA gives no failure signal of its own: a window op after another rank saw a
        # failure (and revoked decomm's communicator) joins the survivors' agreement.
        raise errors._peer_failure(f"{op} on rank {rank}: decomm's communicator was revoked "
                                   "after a peer failure")
    if not isinstance(name, str):
        raise TypeError(f"{op} on rank {rank}: the window name must be a str, got "
                        f"{type(name).__name__} {name!r}")
    w = _windows.get(name)
    if w is None:
        known = sorted(_windows) or "none"
        raise DecommError(f"{op} on rank {rank}: no window named {name!r} "
                          f"(windows: {known}); create it with decomm.win_create first")
    return w


def _cpu_tensor(t: Any, where: str) -> torch.Tensor:
    """``t`` if it is a CPU torch tensor (windows live in host memory), else raise."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise DecommError(f"{where}: windows hold CPU tensors, got one on {t.device}")
    return t


def _check_tensor(t: Any, w: _Window, op: str) -> torch.Tensor:
    _cpu_tensor(t, _checks.where(op, w.name, w.rank))
    if t.dtype != w.dtype or tuple(t.shape) != w.shape:
        raise DecommError(f"{op} '{w.name}' on rank {w.rank}: tensor is {tuple(t.shape)} "
                          f"{t.dtype}, but the window holds {w.shape} {w.dtype}")
    return t.detach().contiguous()


def _weight(v: Any, what: str, op: str, w: _Window) -> float:
    return _checks.check_weight(v, what, _checks.where(op, w.name, w.rank))


def _ranks_map(obj: Any, what: str, op: str, w: _Window, allowed: Mapping[int, int] | list,
               direction: str) -> dict[int, float]:
    """A ``{rank: weight}`` map over ``allowed`` (this window's in- or out-neighbours)."""
    return _checks.weight_map(obj, what, _checks.where(op, w.name, w.rank), me=w.rank,
                              size=w.owner.size, allowed=list(allowed),
                              role=f"{direction}-neighbour",
                              context=f" in the window's topology ({w.topology.name})")


# -------------------------------------------------------------- create / free
@timeline.traced("win_create", phases=False)
def win_create(tensor: torch.Tensor, name: str, zero_init: bool = False, *,
               self_init: bool = False) -> bool:
    """Create window ``name`` for ``tensor`` on every rank (collective); returns True.

    ``tensor`` (float16/bfloat16/float32/float64, the same shape and dtype on every
    rank) is registered: :func:`win_update` writes the mixed value into it. Each
    in-neighbour slot starts as that neighbour's ``tensor`` (one exchange at
    creation), or zeros with ``zero_init=True``, or - ``self_init=True``, BlueFog's
    convention - a copy of this rank's own ``tensor`` (no exchange; such a slot holds
    no value of the neighbour yet, so any later put or get from it replaces it).
    Ranks must agree on the name, shape and dtype (checked: a :class:`DecommError`
    names the ranks that differ).
    """
    global _atexit_registered
    st = _state.require()
    if not isinstance(name, str) or not name:
        raise TypeError(f"win_create on rank {st.rank}: name must be a non-empty str, got "
                        f"{name!r}")
    if zero_init and self_init:
        raise ValueError(f"win_create '{name}' on rank {st.rank}: zero_init and self_init "
                         "exclude each other (slots start as zeros or as this rank's tensor)")
    _cpu_tensor(tensor, _checks.where("win_create", name, st.rank))
    if tensor.dtype not in _FLOATS:
        raise TypeError(f"win_create '{name}' on rank {st.rank}: dtype {tensor.dtype} is not "
                        "supported; use float16, bfloat16, float32 or float64")
    if not tensor.is_contiguous():
        raise ValueError(f"win_create '{name}' on rank {st.rank}: the registered tensor must be "
                         "contiguous (win_update writes into it in place)")
    exists = name in _windows
    sig = _agree.digest((name, tuple(tensor.shape), str(tensor.dtype)))
    table = _agree.gather_rows(st.backend.allgather, [sig, int(exists)], "decomm.win_create")
    differ = _agree.differing_ranks(table, columns=[0])
    if differ:
        raise DecommError(f"win_create '{name}' on rank {st.rank}: ranks {differ} create a "
                          f"window with a different name, shape or dtype than rank 0 (this rank: "
                          f"{tuple(tensor.shape)} {tensor.dtype}); every rank must create the "
                          "same windows in the same order")
    dup = [r for r, row in enumerate(table) if row[1]]
    if dup:
        raise DecommError(f"win_create '{name}' on rank {st.rank}: a window of that name "
                          f"already exists on ranks {dup}; win_free it first")
    MPI = _mpi()
    topo = st.topology
    ins, outs = _neighbor_sets(topo, st.rank, st.size)
    slot_of = {j: k + 1 for k, j in enumerate(ins)}
    remote_slot = {}
    for j in outs:
        their_ins, _ = _neighbor_sets(topo, j, st.size)
        remote_slot[j] = their_ins.index(st.rank) + 1
    numel = tensor.numel()
    nbytes = numel * tensor.element_size()
    stride = 8 + (nbytes + 7) // 8 * 8
    total = (1 + len(ins)) * stride
    win = MPI.Win.Allocate(total, 1, comm=st.comm)
    try:
        raw = torch.frombuffer(win.tomemory(), dtype=torch.uint8)[:total]
        raw.zero_()  # nobody accesses the new window before the fence
        data = [raw[k * stride + 8: k * stride + 8 + nbytes].view(tensor.dtype)
                for k in range(1 + len(ins))]
        seqs = [raw[k * stride: k * stride + 8].view(torch.int64) for k in range(1 + len(ins))]
        accum = {torch.float32: MPI.FLOAT, torch.float64: MPI.DOUBLE}.get(tensor.dtype)
        w = _Window(name=name, tensor=tensor, shape=tuple(tensor.shape), dtype=tensor.dtype,
                    numel=numel, nbytes=nbytes, stride=stride, win=win, data=data, seqs=seqs,
                    slot_of=slot_of, remote_slot=remote_slot, topology=topo, rank=st.rank,
                    owner=st, accum_dtype=accum, exposed=1)
        x = tensor.detach().reshape(-1)
        data[0].copy_(x)
        seqs[0].fill_(1)
        if self_init:  # version 0: older than any value a neighbour ever exposes
            for k in range(1, 1 + len(ins)):
                data[k].copy_(x)
        # One active-target epoch for the initial exchange, closed with NOSUCCEED so
        # that every later access can use passive-target locks.
        win.Fence(MPI.MODE_NOPRECEDE)  # every rank's memory is initialised
        if not (zero_init or self_init):
            src = _bytes(torch.cat([seqs[0].view(torch.uint8), x.view(-1).clone()
                                    .view(torch.uint8)]))
            for j, k in remote_slot.items():
                win.Put([src, MPI.BYTE], j, target=(k * stride, 8 + nbytes, MPI.BYTE))
        win.Fence(MPI.MODE_NOSUCCEED)
    except BaseException:
        win.Free()
        raise
    _windows[name] = w
    if not _atexit_registered:
        atexit.register(_free_all_at_exit)
        _atexit_registered = True
    return True


def _detach_all() -> list[tuple[str, torch.Tensor, bool]]:
    """After a peer failure: forget every window without freeing it (MPI_Win_free is
    collective over the old communicator, which holds the lost rank). Returns what
    :func:`_reattach_all` needs to create them again, in creation order."""
    out = []
    for name, w in list(_windows.items()):
        with w.lock:
            out.append((name, w.tensor, False))
            w.data, w.seqs = [], []
    _windows.clear()
    return out


def _reattach_all(saved: list[tuple[str, torch.Tensor, bool]]) -> None:
    """Create the windows again on the survivors (collective; the neighbour slots start
    as each new in-neighbour's current value)."""
    for name, tensor, zero in saved:
        win_create(tensor, name, zero_init=zero)


@timeline.traced("win_free", phases=False)
def win_free(name: str | None = None) -> bool:
    """Free window ``name`` (or every window when ``None``); collective. Returns True."""
    _state.require()
    if name is None:
        names = sorted(_windows)
    else:
        _get(name, "win_free")
        names = [name]
    for nm in names:
        w = _windows.pop(nm)
        with w.lock:
            w.data, w.seqs = [], []
            w.win.Free()
    return True


def _free_all_at_exit() -> None:
    try:
        MPI = _mpi()
        if MPI.Is_finalized():
            return
    except ImportError:
        return
    for nm in sorted(_windows):
        w = _windows.pop(nm)
        try:
            w.win.Free()
        except Exception:
            pass


def win_names() -> list[str]:
    """Names of the windows that exist on this rank."""
    return sorted(_windows)


def win_in_neighbors(name: str) -> list[int]:
    """Ranks that have a slot in window ``name`` on this rank."""
    return sorted(_get(name, "win_in_neighbors").slot_of)


def win_out_neighbors(name: str) -> list[int]:
    """Ranks in whose window ``name`` this rank has a slot (targets of put/accumulate)."""
    return sorted(_get(name, "win_out_neighbors").remote_slot)


# ------------------------------------------------------------------ put / acc
def _default_dst(w: _Window) -> dict[int, float]:
    t = _state.require().round
    return {j: 1.0 for j in w.topology.out_neighbors(w.rank, t)}


def _write(tensor: Any, name: str, self_weight: Any, dst_weights: Any, op: str,
           accumulate: bool) -> torch.Tensor:
    w = _get(name, op)
    x = _check_tensor(tensor, w, op)
    if accumulate and w.accum_dtype is None:
        raise TypeError(f"{op} '{name}' on rank {w.rank}: accumulate needs float32 or float64 "
                        f"(MPI has no {w.dtype} sum); use win_put")
    dst = _default_dst(w) if dst_weights is None else \
        _ranks_map(dst_weights, "dst_weights", op, w, w.remote_slot, "out")
    sw = None if self_weight is None else _weight(self_weight, "self_weight", op, w)
    MPI = _mpi()
    flat = x.reshape(-1)
    with w.lock:
        with timeline.phase("expose"):
            seq = _expose(w, flat, MPI)
        with timeline.phase("accumulate" if accumulate else "put", targets=len(dst)):
            hdr = np.array([seq], dtype=np.int64)
            for j in sorted(dst):
                wt = dst[j]
                buf = flat if wt == 1.0 else flat * wt
                disp = w.remote_slot[j] * w.stride
                w.win.Lock(j, MPI.LOCK_SHARED)
                try:
                    if accumulate:
                        if w.numel:
                            w.win.Accumulate([buf.numpy(), w.accum_dtype], j,
                                             target=(disp + 8, w.numel, w.accum_dtype),
                                             op=MPI.SUM)
                    else:  # the version, then the data: one epoch, seen whole by readers
                        w.win.Put([hdr, MPI.BYTE], j, target=(disp, 8, MPI.BYTE))
                        if w.nbytes:
                            w.win.Put([_bytes(buf), MPI.BYTE], j,
                                      target=(disp + 8, w.nbytes, MPI.BYTE))
                finally:
                    w.win.Unlock(j)  # the write is complete at the target here
    if sw is not None and sw != 1.0:
        with torch.no_grad():
            tensor.mul_(sw)
    return tensor


def _expose(w: _Window, flat: torch.Tensor, MPI: Any) -> int:
    """Make ``flat`` this rank's own value (slot 0) under a new version; return it."""
    w.exposed += 1
    w.win.Lock(w.rank, MPI.LOCK_EXCLUSIVE)
    try:
        w.data[0].copy_(flat)
        w.seqs[0].fill_(w.exposed)
    finally:
        w.win.Unlock(w.rank)
    return w.exposed


@timeline.traced("win_put", phases=False)
def win_put(tensor: torch.Tensor, name: str, *, self_weight: float | None = None,
            dst_weights: Mapping[int, float] | None = None) -> torch.Tensor:
    """Write ``dst_weights[j] * tensor`` into this rank's slot on every out-neighbour ``j``.

    One-sided: returns once the writes are complete at the targets, which need not
    make any call. ``dst_weights`` defaults to ``{j: 1}`` over the out-neighbours of
    round ``current_round()`` of the window's topology. This rank's own slot (read
    by :func:`win_get`) is set to ``tensor`` too. ``self_weight``: afterwards multiply
    ``tensor`` in place by it (push-sum style). Returns ``tensor``.
    """
    return _write(tensor, name, self_weight, dst_weights, "win_put", False)


@timeline.traced("win_accumulate", phases=False)
def win_accumulate(tensor: torch.Tensor, name: str, *, self_weight: float | None = None,
                   dst_weights: Mapping[int, float] | None = None) -> torch.Tensor:
    """Add ``dst_weights[j] * tensor`` into this rank's slot on every out-neighbour ``j``.

    Like :func:`win_put` but atomic element-wise addition (``MPI_Accumulate`` with
    ``MPI_SUM``), so several additions from this rank add up. float32/float64 only.
    """
    return _write(tensor, name, self_weight, dst_weights, "win_accumulate", True)


# ------------------------------------------------------------------------ get
#: How often :func:`win_get` re-fetches from a neighbour whose newer :func:`win_put`
#: landed in the slot while the fetch was in flight (see ``win_get``).
_GET_ATTEMPTS = 4


def _fetch(w: _Window, j: int, MPI: Any) -> tuple[int, torch.Tensor]:
    """(version, value) of rank ``j``'s own slot, read in one shared-lock epoch."""
    hdr = np.zeros(1, dtype=np.int64)
    tmp = torch.empty(w.numel, dtype=w.dtype)
    w.win.Lock(j, MPI.LOCK_SHARED)
    try:
        w.win.Get([hdr, MPI.BYTE], j, target=(0, 8, MPI.BYTE))
        if w.nbytes:
            w.win.Get([_bytes(tmp), MPI.BYTE], j, target=(8, w.nbytes, MPI.BYTE))
    finally:
        w.win.Unlock(j)
    return int(hdr[0]), tmp


@timeline.traced("win_get", phases=False)
def win_get(name: str, *, src_weights: Mapping[int, float] | None = None) -> bool:
    """Set slot ``j`` here to ``src_weights[j] * x_j``, ``x_j`` being ``j``'s own value.

    ``x_j`` is what ``j`` exposes in its slot 0 when the fetch runs (its last
    :func:`win_put` / :func:`win_accumulate` tensor or :func:`win_update` result).
    The slot is overwritten whatever it held before (an earlier put or get, or zeros
    after ``win_update(reset=True)``), so the weight always applies to what is stored.
    ``src_weights`` defaults to ``{j: 1}`` over the in-neighbours of the current round
    of the window's topology. One-sided: ``j`` makes no call. Returns True.

    Race with a put: if a :func:`win_put` from ``j`` carrying a newer value of ``j``
    than the one fetched lands in the slot while the fetch is in flight, the fetched
    value is stale; it is dropped and ``j`` is fetched again, so the slot ends up
    holding ``src_weights[j]`` times that newer value. Only if ``j`` keeps outrunning
    the fetch (``_GET_ATTEMPTS`` times in a row) does the slot keep ``j``'s put, which
    is newer than anything fetched.
    """
    w = _get(name, "win_get")
    if src_weights is None:
        src = {j: 1.0 for j in w.topology.in_neighbors(w.rank, _state.require().round)}
    else:
        src = _ranks_map(src_weights, "src_weights", "win_get", w, w.slot_of, "in")
    if not src:
        return True
    MPI = _mpi()
    with w.lock:
        pending = sorted(src)
        for _attempt in range(_GET_ATTEMPTS):
            with timeline.phase("get", sources=len(pending)):
                got = {j: _fetch(w, j, MPI) for j in pending}
            stale = []
            w.win.Lock(w.rank, MPI.LOCK_EXCLUSIVE)
            try:
                for j, (seq, tmp) in got.items():
                    k = w.slot_of[j]
                    # Versions of j only grow, and j exposes a value before putting it,
                    # so seq < slot version means a put from j landed after the fetch
                    # read j: a newer value of j than the fetched one. Equal versions are
                    # the same value of j: overwrite (the slot may hold it with another
                    # weight, or zeros after a reset).
                    if seq < int(w.seqs[k]):
                        stale.append(j)
                        continue
                    w.data[k].copy_(tmp if src[j] == 1.0 else tmp.mul_(src[j]))
                    w.seqs[k].fill_(seq)
            finally:
                w.win.Unlock(w.rank)
            if not stale:
                break
            pending = stale
    return True


# --------------------------------------------------------------------- update
@timeline.traced("win_update", phases=False)
def win_update(name: str, *, self_weight: float | None = None,
               neighbor_weights: Mapping[int, float] | None = None, reset: bool = False,
               clone: bool = False) -> torch.Tensor:
    """Mix locally: ``self_weight * x + sum_j neighbor_weights[j] * slot_j``.

    ``x`` is the tensor registered at :func:`win_create`. Defaults: the weights of
    round ``current_round()`` of the window's topology (``W[i, i]``, ``W[i, j]``);
    give both or neither. ``reset=True`` zeroes the slots used (accumulate-style
    protocols). The result is written into the registered tensor (and this rank's
    own slot) and returned; with ``clone=True`` it is returned as a new tensor and
    neither the registered tensor nor this rank's own slot changes (``reset=True``
    still zeroes the slots used). Purely local: no other rank is involved.
    """
    from . import _C

    w = _get(name, "win_update")
    if (self_weight is None) != (neighbor_weights is None):
        raise ValueError(f"win_update '{name}' on rank {w.rank}: give self_weight and "
                         "neighbor_weights together (or neither, for the topology's weights)")
    if self_weight is None:
        sw, nb = w.topology.weights(w.rank, _state.require().round)
        missing = sorted(set(nb) - set(w.slot_of))
        if missing:  # cannot happen for the creation topology; guards odd families
            raise DecommError(f"win_update '{name}' on rank {w.rank}: the topology's weights "
                              f"name ranks {missing}, which have no slot here")
    else:
        sw = _weight(self_weight, "self_weight", "win_update", w)
        nb = _ranks_map(neighbor_weights, "neighbor_weights", "win_update", w, w.slot_of, "in")
    order = sorted(nb)
    slots = [w.data[w.slot_of[j]] for j in order]
    weights = [float(nb[j]) for j in order]
    MPI = _mpi()
    with w.lock:
        # Into the registered tensor itself when it is contiguous: block by block, each
        # block summed in place and copied into the exposed slot while in cache, so a
        # model-sized window costs one pass and no new tensor per call.
        in_place = not clone and w.numel > 0 and w.tensor.is_contiguous()
        x = w.tensor.detach().reshape(-1)
        w.win.Lock(w.rank, MPI.LOCK_EXCLUSIVE)
        try:
            with timeline.phase("reduce", neighbors=len(order)):
                if in_place:
                    step = max(1, _UPDATE_BLOCK_BYTES // x.element_size())
                    own = w.data[0]
                    for lo in range(0, w.numel, step):
                        hi = min(lo + step, w.numel)
                        xs = x[lo:hi]
                        _C.weighted_sum(xs, float(sw), [d[lo:hi] for d in slots], weights, xs)
                        own[lo:hi].copy_(xs)
                    out = x
                elif w.numel:
                    out = _C.weighted_sum(x.contiguous(), float(sw), slots, weights,
                                          None if clone else w.data[0])
                else:
                    out = x.clone()
            if reset:
                for d in slots:
                    d.zero_()
            if not clone:
                w.exposed += 1
                if not in_place and out.data_ptr() != w.data[0].data_ptr():
                    w.data[0].copy_(out)
                w.seqs[0].fill_(w.exposed)
        finally:
            w.win.Unlock(w.rank)
        if clone:
            return out.view(w.shape)
        if in_place:
            torch.autograd.graph.increment_version(w.tensor)  # written in place, as torch ops do
        else:
            with torch.no_grad():
                w.tensor.copy_(out.view(w.shape))
    return w.tensor


def win_update_then_collect(name: str) -> torch.Tensor:
    """``x <- x + sum_j slot_j`` over every slot, then zero the slots (push-sum collect)."""
    w = _get(name, "win_update_then_collect")
    return win_update(name, self_weight=1.0, neighbor_weights={j: 1.0 for j in w.slot_of},
                      reset=True)
