"""Process state of decomm: this rank's identity, its backends, the topology in force,
the round counter and the round-plan cache (the bottom layer under every op).

Nothing here talks to MPI. :func:`decomm.init` builds a :class:`State` and
:func:`install`\\ s it; the ops, the hierarchical and window modules and the timeline
read it through :func:`require`; :func:`decomm.shutdown` clears it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from .errors import DecommError
from .topology import Topology

__all__ = ["RoundPlan", "State", "clear", "get", "install", "plan_for", "require"]


@dataclass
class RoundPlan:
    """One node's part of one round: whom it receives from (with weights) and sends to."""

    self_weight: float
    src_ranks: list[int]
    src_weights: list[float]
    dst_ranks: list[int]
    dst_weights: list[float] = field(default_factory=list)  # 1.0 each: sent unscaled
    #: the same plan converted for the C++ core (``decomm._C.RoundPeers``), made by the
    #: first op that needs it (decomm/ops.py); plans are never modified after creation
    native: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.dst_weights:
            self.dst_weights = [1.0] * len(self.dst_ranks)


def plan_for(topology: Topology, node: int, t: int, cache: dict[int, RoundPlan]) -> RoundPlan:
    """``node``'s :class:`RoundPlan` for round ``t`` of ``topology``, cached per distinct round.

    A random family (no finite cycle) has a new round at every ``t``; its cache is
    emptied past 64 entries so that it stays small.
    """
    key = topology.round_index(t)
    plan = cache.get(key)
    if plan is None:
        self_w, inw = topology.weights(node, t)
        src = sorted(inw)
        plan = RoundPlan(self_w, src, [inw[j] for j in src], topology.out_neighbors(node, t))
        if topology.rounds is None and len(cache) > 64:
            cache.clear()
        cache[key] = plan
    return plan


@dataclass
class State:
    """Everything one initialized rank holds (one per :func:`decomm.init`)."""

    comm: Any  # mpi4py.MPI.Comm
    backend: Any  # decomm._C.MpiBackend
    rank: int
    size: int
    local_rank: int
    local_size: int
    topology: Topology
    topo_hash: int
    round: int = 0
    check_finite: bool = False
    init_args: dict[str, Any] = field(default_factory=dict)
    excepthook: Any = None  # the hook init() installed, removed again by shutdown()
    fault_tolerant: bool = False
    launch_ranks: list[int] = field(default_factory=list)  # current rank -> rank at launch
    lost: list[int] = field(default_factory=list)  # launch ranks lost so far
    topology_source: Any = None  # set_topology's ``n -> Topology`` callable, if one was given
    stats_base: tuple[int, int] = (0, 0)  # bytes sent/received by backends before a recovery
    plans: dict[int, RoundPlan] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _last_plan: tuple[Any, ...] | None = field(default=None, repr=False)

    def plan(self) -> tuple[RoundPlan, int]:
        """This rank's plan for the current round, and the round."""
        t = self.round
        last = self._last_plan
        # The same round as the previous op (every op of a step): skip round_index. Valid
        # while topology, rank and plan cache are the ones it was made for (set_topology
        # and a recovery replace the cache).
        if (last is not None and last[0] == t and last[1] is self.topology
                and last[2] is self.plans and last[3] == self.rank):
            return last[4], t
        plan = plan_for(self.topology, self.rank, t, self.plans)
        self._last_plan = (t, self.topology, self.plans, self.rank, plan)
        return plan, t


_current: State | None = None


def get() -> State | None:
    """The state of this process, or None before init / after shutdown."""
    return _current


def require() -> State:
    """The state of this process; raises :class:`DecommError` before :func:`decomm.init`."""
    if _current is None:
        raise DecommError("decomm is not initialized: call decomm.init() first")
    return _current


def install(state: State) -> None:
    """Make ``state`` the process's state (from :func:`decomm.init`)."""
    global _current
    _current = state


def clear() -> State | None:
    """Forget the process's state and return it (from :func:`decomm.shutdown`)."""
    global _current
    state, _current = _current, None
    return state
