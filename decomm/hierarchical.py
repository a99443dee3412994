"""Hierarchical neighbour averaging: exact inside a machine, gossip between machines.

Ranks are grouped into *machines*. ``hierarchical_neighbor_allreduce`` on rank r of
machine m returns

    sum_{m'} Wm[m, m'] * mean(x_s for s in machine m')

where ``Wm`` is round ``current_round()`` of the *machine topology*
(:func:`set_machine_topology`, default ``ExponentialGraph(machine_size())``):

1. average over the ranks of the machine (an allreduce on a machine-local
   communicator: shared memory, cheap);
2. the machine leaders (local rank 0) gossip over the machine topology (a
   ``neighbor_allreduce`` on the leaders' communicator: the only traffic that
   crosses machines, one message per machine edge instead of one per rank edge);
3. each leader broadcasts the result inside its machine.

It is opt-in: nothing here is created until the first call, and the ordinary
``neighbor_allreduce`` is untouched. Every function of this module is
**collective on first use** (all ranks must make it): that call builds the two
sub-communicators, each with its own decomm C++ backend.

Grouping, in order of precedence:

* ``init_machines(local_size=L)``: machine ``m`` = ranks ``[m*L, (m+1)*L)``;
* ``DECOMM_LOCAL_SIZE=L`` in the environment: the same (to test on one host:
  ``DECOMM_LOCAL_SIZE=2 mpirun -np 4 ...`` gives 2 "machines" of 2 ranks);
* otherwise the real shared-memory nodes (``MPI_COMM_TYPE_SHARED``), machines
  numbered by their lowest rank.

If ``size()`` is not a multiple of ``L`` the last machine is smaller. All ranks
must agree on the grouping (checked: a ``DecommError`` names the ranks that differ).
"""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import _agree, _checks, _failure, _state, timeline
from .errors import DecommError
from .topology import ExponentialGraph, Topology

__all__ = [
    "get_machine_topology",
    "hierarchical_neighbor_allreduce",
    "hierarchical_neighbor_allreduce_",
    "init_machines",
    "machine_in_neighbors",
    "machine_local_rank",
    "machine_local_size",
    "machine_of",
    "machine_out_neighbors",
    "machine_rank",
    "machine_size",
    "set_machine_topology",
    "shutdown_machines",
]

_OP = "hierarchical_neighbor_allreduce"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class _Hier:
    owner: Any  # the _state.State this grouping was built for
    rank: int
    size: int
    machine: int  # this rank's machine id (= its leader's rank on the leaders' comm)
    machines: int  # number of machines
    local_rank: int
    local_size: int
    machine_of: list[int]  # machine id of every rank
    grouping: str  # how the machines were formed (for messages)
    local_be: Any  # MpiBackend over this machine's ranks
    leaders_be: Any  # MpiBackend over the leaders (None on other ranks)
    topology: Topology
    topo_hash: int
    plans: dict[int, _state.RoundPlan] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    seq: int = 0
    check: bool = True  # cross-rank header checks (DECOMM_CHECK)
    requested: int | None = None  # init_machines' local_size (None: shared-memory nodes)


_hier: _Hier | None = None
_atexit_registered = False


# ------------------------------------------------------------------ grouping
def _env_local_size() -> int | None:
    raw = os.environ.get("DECOMM_LOCAL_SIZE", "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"DECOMM_LOCAL_SIZE={raw!r} is not an int") from None
    if value < 1:
        raise ValueError(f"DECOMM_LOCAL_SIZE must be >= 1, got {raw!r}")
    return value


def _check_local_size(local_size: Any) -> int:
    if isinstance(local_size, bool) or not isinstance(local_size, (int, np.integer)) \
            or int(local_size) < 1:
        raise ValueError(f"local_size must be a positive int, got {local_size!r}")
    return int(local_size)


def init_machines(local_size: int | None = None) -> None:
    """Group the ranks into machines and build the sub-communicators (collective).

    ``local_size=L`` groups consecutive ranks ``L`` at a time; ``None`` uses
    ``DECOMM_LOCAL_SIZE`` or, without it, the shared-memory nodes. Calling it again
    regroups (and resets the machine topology to ``ExponentialGraph``).
    """
    global _hier, _atexit_registered
    rt = _state.require()
    if local_size is not None:
        local_size = _check_local_size(local_size)
    else:
        local_size = _env_local_size()
    shutdown_machines()
    from mpi4py import MPI

    from . import _C

    world = rt.comm
    rank, size = rt.rank, rt.size
    if local_size is not None:
        machine = rank // local_size
        grouping = f"local_size={local_size}"
        requested = local_size
    else:
        shm = world.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
        leader = shm.allreduce(rank, op=MPI.MIN)
        shm.Free()
        leaders = sorted(set(world.allgather(leader)))
        machine = leaders.index(leader)
        grouping = "shared-memory nodes"
        requested = 0
    # Every rank must group the same way: compare (requested L, machine id) tables.
    table = _agree.gather_rows(rt.backend.allgather, [requested, machine],
                               "decomm.hierarchical.grouping")
    req = [row[0] for row in table]
    differ = _agree.differing_ranks(table, columns=[0])
    if differ:
        raise DecommError(
            f"init_machines on rank {rank}: ranks {differ} group ranks into machines "
            f"differently from rank 0 (local_size {req[0] or 'shared-memory'} on rank 0, "
            f"{req[rank] or 'shared-memory'} here); set DECOMM_LOCAL_SIZE / local_size "
            "the same on every rank")
    machine_of = [row[1] for row in table]
    machines = max(machine_of) + 1
    members = [r for r in range(size) if machine_of[r] == machine]
    lrank = members.index(rank)
    timeout = float(rt.backend.timeout)
    check = os.environ.get("DECOMM_CHECK", "1") != "0"
    local = world.Split(color=machine, key=rank)
    leaders_comm = world.Split(color=0 if lrank == 0 else MPI.UNDEFINED, key=rank)
    try:
        local_be = _backend(_C, local, timeout, check)
        leaders_be = None
        if leaders_comm != MPI.COMM_NULL:
            leaders_be = _backend(_C, leaders_comm, timeout, check)
            if leaders_be.rank != machine:  # leaders are ordered by their (ascending) rank
                raise DecommError(f"init_machines: leader of machine {machine} got rank "
                                  f"{leaders_be.rank} on the leaders' communicator")
    finally:
        local.Free()
        if leaders_comm != MPI.COMM_NULL:
            leaders_comm.Free()
    topo = ExponentialGraph(machines)
    _hier = _Hier(owner=rt, rank=rank, size=size, machine=machine, machines=machines,
                   local_rank=lrank, local_size=len(members), machine_of=machine_of,
                   grouping=grouping, local_be=local_be, leaders_be=leaders_be,
                   topology=topo, topo_hash=_agree.topology_digest(topo), check=check,
                   requested=local_size)
    timeline.register_backend(local_be)
    timeline.register_backend(leaders_be)
    if not _atexit_registered:
        atexit.register(shutdown_machines)
        _atexit_registered = True


def _backend(_C: Any, comm: Any, timeout: float, check: bool) -> Any:
    """A C++ backend on ``comm`` (it duplicates it); blocking ops only: no progress thread."""
    st = _state.get()
    return _failure.track(_C.MpiBackend(comm.py2f(), float(timeout), bool(check), False),
                          st is not None and st.fault_tolerant)


def shutdown_machines() -> None:
    """Close the sub-communicators' backends (also done at exit). Safe to call twice."""
    global _hier
    st, _hier = _hier, None
    if st is None:
        return
    for be in (st.leaders_be, st.local_be):
        if be is not None:
            try:
                be.close()
            except Exception:  # MPI already finalized
                pass


def _detach_for_recovery() -> tuple[bool, int | None]:
    """After a peer failure: drop the machine backends (their communicators hold the lost
    rank; they are abandoned, not closed). Returns (was grouped, local_size asked)."""
    global _hier
    st, _hier = _hier, None
    if st is None:
        return False, None
    for be in (st.leaders_be, st.local_be):
        if be is not None:
            be.abandon()
    return True, st.requested


def _reattach_after_recovery(grouping: tuple[bool, int | None]) -> None:
    """Group the survivors again as before the failure (the machine topology restarts
    as ``ExponentialGraph`` of the new number of machines)."""
    if grouping[0]:
        init_machines(grouping[1])


def _require() -> _Hier:
    rt = _state.require()
    st = _hier
    if st is None or st.owner is not rt:
        init_machines()
        st = _hier
    assert st is not None
    return st


# ----------------------------------------------------------------- accessors
def machine_rank() -> int:
    """This rank's machine id in ``[0, machine_size())`` (collective on first use)."""
    return _require().machine


def machine_size() -> int:
    """Number of machines (collective on first use)."""
    return _require().machines


def machine_local_rank() -> int:
    """Rank inside this machine under the hierarchical grouping (0 = the machine leader).

    Not :func:`decomm.local_rank`, which is the rank on the shared-memory node: the two
    differ when ``DECOMM_LOCAL_SIZE`` / ``init_machines(local_size=...)`` groups ranks
    otherwise than the hardware does.
    """
    return _require().local_rank


def machine_local_size() -> int:
    """Number of ranks in this machine under the hierarchical grouping."""
    return _require().local_size


def machine_of(rank: int | None = None) -> int:
    """The machine id of ``rank`` (default: this rank)."""
    st = _require()
    if rank is None:
        return st.machine
    return st.machine_of[_checks.check_id(rank, "rank", st.size,
                                          _checks.where("machine_of", None, st.rank))]


def get_machine_topology() -> Topology:
    """The machine-level topology in force (``n = machine_size()``)."""
    return _require().topology


def set_machine_topology(topology: Any) -> None:
    """Gossip between machines over ``topology`` from now on (collective).

    ``topology``: a :class:`~decomm.topology.Topology` with ``n = machine_size()``,
    a row-stochastic ``machine_size() x machine_size()`` matrix, or a list of them.
    Its round ``t`` is used at the runtime's ``current_round() == t`` (so the
    optimizer wrappers' ``advance_round`` drives it too). Every rank must pass the
    same schedule: the ranks compare fingerprints (one small allgather) and raise
    :class:`DecommError` naming those that differ.
    """
    st = _require()
    if isinstance(topology, Topology):
        topo = topology
    elif hasattr(topology, "ndim") or isinstance(topology, (list, tuple)):
        if isinstance(topology, torch.Tensor):
            topology = topology.detach().cpu().numpy()
        topo = Topology.from_matrices(topology)
    else:
        raise TypeError("set_machine_topology expects a decomm.topology.Topology, a "
                        "machine_size() x machine_size() mixing matrix or a list of them, got "
                        f"{type(topology).__name__}")
    if topo.n != st.machines:
        raise ValueError(f"the machine topology has n={topo.n} nodes but there are "
                         f"{st.machines} machines ({st.grouping}); build it for "
                         "decomm.hierarchical.machine_size() nodes")
    if topo.rounds is not None and not topo.is_row_stochastic(max(1e-9, topo.stochastic_tol)):
        raise ValueError(f"{topo.name}: every round must be row-stochastic")
    digest = _agree.topology_digest(topo)
    table = _agree.gather_rows(_state.require().backend.allgather, [digest],
                               "decomm.hierarchical.set_machine_topology")
    differ = _agree.differing_ranks(table)
    if differ:
        raise DecommError(
            f"set_machine_topology on rank {st.rank}: ranks {differ} set a different machine "
            f"topology than rank 0 (this rank: {topo.name}); every rank must pass the same one")
    with st.lock:
        st.topology = topo
        st.topo_hash = digest
        st.plans = {}


def machine_in_neighbors(machine: int | None = None) -> list[int]:
    """In-neighbour machines of ``machine`` (default: this one) in the current round."""
    st = _require()
    m = st.machine if machine is None else _check_machine(machine, st, "machine")
    return st.topology.in_neighbors(m, _state.require().round)


def machine_out_neighbors(machine: int | None = None) -> list[int]:
    """Out-neighbour machines of ``machine`` (default: this one) in the current round."""
    st = _require()
    m = st.machine if machine is None else _check_machine(machine, st, "machine")
    return st.topology.out_neighbors(m, _state.require().round)


def _check_machine(m: Any, st: _Hier, what: str) -> int:
    return _checks.check_id(m, what, st.machines, _checks.where(_OP, None, st.rank), "machine")


def _plan(st: _Hier, t: int) -> _state.RoundPlan:
    return _state.plan_for(st.topology, st.machine, t, st.plans)


def _resolve(st: _Hier, self_weight: Any, src_w: Any, dst_w: Any, name: str, t: int):
    return _checks.resolve_weights(_plan(st, t), self_weight, src_w, dst_w,
                                   _checks.where(_OP, name, st.rank), me=st.machine,
                                   size=st.machines, unit="machine", prefix="machine_",
                                   graph=f"round {t} of the machine topology {st.topology.name}")


# ------------------------------------------------------------------------ op
def _to_torch(obj: Any, name: str, rank: int) -> tuple[torch.Tensor, Any]:
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.device.type != "cpu":
            raise DecommError(f"{_OP} '{name}' on rank {rank}: tensor is on {t.device}; the "
                              "hierarchical op runs on CPU tensors (move it to the CPU)")
        return t, lambda r: r
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj)), lambda r: r.numpy()
    raise TypeError(f"{_OP} '{name}': expected a torch.Tensor or numpy.ndarray, got "
                    f"{type(obj).__name__}")


def _local_broadcast(st: _Hier, work: torch.Tensor, name: str) -> None:
    """Leader -> machine. The allreduce just before, in the same call, already compared
    the machine's headers (op, name, shape, dtype), so the broadcast skips its own check."""
    if st.check:
        st.local_be.set_check(False)
    try:
        st.local_be.broadcast(work, 0, name)
    finally:
        if st.check:
            st.local_be.set_check(True)


@timeline.traced(_OP, phases=False)
def _hierarchical(tensor: Any, self_weight: Any, src_machine_weights: Any,
                  dst_machine_weights: Any, name: Any, inplace: bool) -> Any:
    with timeline.phase("validate"):
        if name is None:
            name = "hierarchical"
        elif not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        st = _require()
        t, back = _to_torch(tensor, name, st.rank)
        if t.dtype not in _FLOATS:
            raise TypeError(f"{_OP} '{name}' on rank {st.rank}: dtype {t.dtype} is not "
                            "supported; use float16, bfloat16, float32 or float64")
        rnd = _state.require().round
        sw, src, srcw, dst, dstw = _resolve(st, self_weight, src_machine_weights,
                                            dst_machine_weights, name, rnd)
        # Half precision is summed in float32 (MPI has no float16 sum; also more exact).
        # One extra trailing element carries a failure flag through the gossip and the
        # broadcast, so that a machine whose local phase failed makes its neighbour
        # machines and its own members raise too, instead of leaving them waiting.
        wdtype = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype
        numel = t.numel()
        work = torch.empty(numel + 1, dtype=wdtype)
        work[:numel].copy_(t.reshape(-1))
        work[numel] = 0.0
    failed: BaseException | None = None
    if st.local_size > 1:
        with timeline.phase("local_allreduce"):
            try:
                st.local_be.allreduce(work, work, True, name, False)
            except DecommError as exc:  # raised on every rank of this machine
                failed = exc
    local_failed = failed is not None
    if st.leaders_be is None:  # a member: the leader does the rest
        if failed is not None:
            raise failed
        with timeline.phase("local_broadcast"):
            _local_broadcast(st, work, name)
        if float(work[numel]) != 0.0:
            leader = st.machine_of.index(st.machine)
            raise DecommError(
                f"{_OP} '{name}' on rank {st.rank}: the gossip between machines failed on this "
                f"machine's leader (rank {leader}, machine {st.machine}); see its error")
    else:
        if st.machines > 1 or sw != 1.0:
            with timeline.phase("machine_gossip"):
                if failed is not None:
                    work.zero_()
                    work[numel] = 1.0  # poison: tell the out-neighbour machines
                mixed = torch.empty_like(work)
                try:
                    st.leaders_be.neighbor_allreduce(work, mixed, sw, src, srcw, dst, dstw, name,
                                                     rnd, st.topo_hash, False)
                    if failed is None and float(mixed[numel]) != 0.0:
                        failed = DecommError(
                            f"{_OP} '{name}' on rank {st.rank}: an in-neighbour machine of "
                            f"machine {st.machine} (in-neighbours {src}) failed its local "
                            "average and sent no data; see the errors on its ranks")
                except DecommError as exc:
                    failed = failed or exc
                work = mixed
        if st.local_size > 1 and not local_failed:
            with timeline.phase("local_broadcast"):
                work[numel] = 0.0 if failed is None else 1.0
                _local_broadcast(st, work, name)
        if failed is not None:
            raise failed
    with timeline.phase("unpack"):
        result = work[:numel].view(t.shape)
        if inplace:
            t.copy_(result)
            return tensor
        return back(result.to(t.dtype) if wdtype != t.dtype else result)


def hierarchical_neighbor_allreduce(tensor: Any, *, self_weight: float | None = None,
                                    src_machine_weights: Mapping[int, float] | None = None,
                                    dst_machine_weights: Mapping[int, float] | None = None,
                                    name: str | None = None) -> Any:
    """Machine-local average, then gossip between machines; returns a new tensor.

    Rank r of machine m gets ``sw * xbar_m + sum_{m'} src_machine_weights[m'] *
    (dst_machine_weights_{m'}[m] * xbar_{m'})`` where ``xbar_m`` is the mean of
    machine m's ranks' tensors. By default the weights come from round
    ``current_round()`` of the machine topology (``(Wm @ xbar)_m``) and messages are
    sent unscaled. The three weight arguments mirror ``neighbor_allreduce``'s
    ``self_weight`` / ``src_weights`` / ``dst_weights`` with machine ids as keys; every
    rank of a machine must pass the same ones (only the leader's are used).

    float16 / bfloat16 are averaged in float32 and rounded once at the end. Blocking;
    collective over all ranks. The first call groups the ranks (see the module doc).
    """
    return _hierarchical(tensor, self_weight, src_machine_weights, dst_machine_weights, name,
                         False)


def hierarchical_neighbor_allreduce_(tensor: Any, *, self_weight: float | None = None,
                                     src_machine_weights: Mapping[int, float] | None = None,
                                     dst_machine_weights: Mapping[int, float] | None = None,
                                     name: str | None = None) -> Any:
    """In-place :func:`hierarchical_neighbor_allreduce`: writes into ``tensor``, returns it."""
    return _hierarchical(tensor, self_weight, src_machine_weights, dst_machine_weights, name,
                         True)
