"""BlueFog's collective ops (``bluefog.torch.mpi_ops``) translated to decomm's.

Argument names, defaults and return types are BlueFog's; the arithmetic is decomm's
(:mod:`decomm.ops`, :mod:`decomm.hierarchical`). Where the two libraries differ the
compat layer reproduces what a BlueFog program observes:

* default weights of ``neighbor_allreduce`` on an unweighted graph are uniform,
  ``1 / (in_degree + 1)`` for self and every in-neighbour (decomm's topology in force
  is that uniform matrix, see :mod:`._basics`); on a weighted graph the graph's own
  weights are passed explicitly;
* with ``dst_weights`` (a per-call graph) and ``enable_topo_check=True``, the ranks
  exchange their (sources, destinations) in one small allgather and every rank raises
  ``ValueError`` at once if some ``j -> i`` edge is listed on one side only - BlueFog
  checks the same with one collective - instead of waiting for a message that never
  comes;
* handles are integers (:mod:`._handles`);
* in-place ops run under ``torch.no_grad()``, so they accept parameters that require
  grad, as BlueFog's do;
* malformed weight arguments raise ``ValueError`` as in BlueFog (where decomm itself
  would raise ``TypeError``; hence the ``noqa: TRY004`` marks).

The self-weighted mix BlueFog computes for rank i is
``x_i' = self_weight * x_i + sum_j src_weights[j] * dst_weights_j[i] * x_j``
(Lian et al., "Can decentralized algorithms outperform centralized algorithms?",
NeurIPS 2017, for the gossip step; the per-sender scaling is BlueFog's extension).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import torch

from ... import hierarchical, ops, timeline
from . import _basics as B
from . import _handles as H

__all__ = [
    "allgather",
    "allgather_nonblocking",
    "allreduce",
    "allreduce_",
    "allreduce_nonblocking",
    "allreduce_nonblocking_",
    "barrier",
    "broadcast",
    "broadcast_",
    "broadcast_nonblocking",
    "broadcast_nonblocking_",
    "hierarchical_neighbor_allreduce",
    "hierarchical_neighbor_allreduce_nonblocking",
    "neighbor_allgather",
    "neighbor_allgather_nonblocking",
    "neighbor_allreduce",
    "neighbor_allreduce_nonblocking",
    "pair_gossip",
    "pair_gossip_nonblocking",
    "poll",
    "synchronize",
    "wait",
]

poll = H.poll
synchronize = H.synchronize
wait = H.wait


def _ranks(obj: Any, what: str) -> list[int]:
    """A list of int ranks from a list / tuple / numpy array of ints."""
    try:
        items = list(obj)
    except TypeError:
        raise ValueError(f"{what} must be a list of ranks, got {type(obj).__name__}") from None
    out = []
    for r in items:
        if isinstance(r, bool) or not isinstance(r, numbers.Integral):
            raise ValueError(f"{what} must hold int ranks, got {r!r}")  # noqa: TRY004
        out.append(int(r))
    return out


def _check_self_weight(self_weight: Any) -> float:
    if isinstance(self_weight, bool) or not isinstance(self_weight, numbers.Real):
        raise ValueError(f"Argument self_weight has to be a float for self rank, got "  # noqa: TRY004
                         f"{self_weight!r}.")
    return float(self_weight)


def topology_rows(src: list[int], dst: list[int], n: int) -> torch.Tensor:
    """This rank's row of the per-call graph check: ``[sources | destinations]`` as 0/1
    over ``n`` ranks, or all -1 if a rank is out of range (so that every rank raises)."""
    row = torch.zeros(2 * n, dtype=torch.int64)
    if any(not 0 <= j < n for j in list(src) + list(dst)):
        row[:] = -1
        return row
    for j in src:
        row[j] = 1
    for j in dst:
        row[n + j] = 1
    return row


def topology_errors(table: torch.Tensor, label: str) -> str | None:
    """What is wrong with the per-call graph gathered in ``table`` (n rows of
    :func:`topology_rows`), or None. The edge ``j -> i`` must be listed by i as a source
    exactly when j lists i as a destination, and no rank may name itself."""
    n = table.shape[0]
    bad = [i for i in range(n) if bool((table[i] < 0).any())]
    if bad:
        return f"per-call topology check ({label}): ranks {bad} name ranks out of range " \
               f"0..{n - 1}"
    srcm, dstm = table[:, :n], table[:, n:]
    selfs = [i for i in range(n) if srcm[i, i] or dstm[i, i]]
    if selfs:
        return (f"per-call topology check ({label}): ranks {selfs} list themselves as a "
                "source or destination (the self weight is self_weight)")
    # srcm[i, j] = 1: i receives from j; dstm[j, i] = 1: j sends to i.
    diff = (srcm != dstm.T).nonzero().tolist()
    if diff:
        shown = ", ".join(f"{j}->{i} ({'only receiver' if srcm[i, j] else 'only sender'} lists "
                          "it)" for i, j in diff[:6])
        return (f"per-call topology check ({label}): sources and destinations do not match "
                f"for edges {shown}{' ...' if len(diff) > 6 else ''}")
    return None


def check_topology(src: list[int], dst: list[int], label: str) -> None:
    """Raise ValueError on every rank if the per-call graph is inconsistent anywhere.

    One allgather of each rank's (sources, destinations) row (:func:`topology_rows`);
    every rank sees the same table, so every rank raises (or none does).
    """
    n = B.size()
    table = ops.allgather(topology_rows(src, dst, n).reshape(1, -1),
                          name=f"bluefog.topo_check.{label}")
    problem = topology_errors(table, label)
    if problem is not None:
        raise ValueError(f"{problem} (seen on rank {B.rank()})")


# ---------------------------------------------------------- neighbor_allreduce
def _na_args(tensor: Any, self_weight: Any, src_weights: Any, dst_weights: Any,
             enable_topo_check: bool, name: Any) -> dict[str, Any]:
    """decomm keyword arguments for one BlueFog ``neighbor_allreduce`` call."""
    B.ensure_installed()
    if (self_weight is None) != (src_weights is None):
        raise ValueError("Arguments self_weight and src_weights have to be presented at "
                         "the same time")
    if dst_weights is not None:
        if isinstance(dst_weights, Mapping):
            dst = {int(k): v for k, v in dst_weights.items()}
        else:
            listed = _ranks(dst_weights, "dst_weights")
            if len(set(listed)) != len(listed):
                raise ValueError("Argument dst_weights should only contain the unique ranks.")
            dst = {r: 1.0 for r in listed}
        if self_weight is None:
            raise ValueError("Arguments self_weight and src_weights should be presented if "
                             "enabling dynamic topology.")
    else:
        dst = None
    if self_weight is None:
        given = B.default_recv_weights()
        if given is None:  # uniform: decomm's topology in force is that matrix
            return {"name": name}
        sw, src = given
        return {"self_weight": sw, "src_weights": src, "name": name}
    if not isinstance(src_weights, Mapping):
        raise ValueError("Argument src_weights has to be a dictionary map from the "  # noqa: TRY004
                         "(in-)neighbor rank to the weights.")
    sw = _check_self_weight(self_weight)
    src = {int(k): v for k, v in src_weights.items()}
    if dst is None:
        extra = sorted(set(src) - set(B.in_neighbor_ranks()))
        if extra:
            raise ValueError(f"The key of weights should only contain the ranks that belong to "
                             f"in-neighbors and self rank: {extra} are not in-neighbors "
                             f"{B.in_neighbor_ranks()}.")
        return {"self_weight": sw, "src_weights": src, "name": name}
    if enable_topo_check:
        check_topology(sorted(src), sorted(dst), name or "neighbor_allreduce")
    return {"self_weight": sw, "src_weights": src, "dst_weights": dst, "name": name}


def neighbor_allreduce_nonblocking(tensor: torch.Tensor, *, self_weight: float | None = None,
                                   src_weights: dict[int, float] | None = None,
                                   dst_weights: dict[int, float] | list[int] | None = None,
                                   enable_topo_check: bool = True,
                                   name: str | None = None) -> int:
    """Start a weighted average with the in-neighbours; returns an int handle.

    ``self_weight`` with ``src_weights`` ({rank: weight}) override the topology's
    weights; adding ``dst_weights`` ({rank: weight}, or a list: weight 1) makes the
    call's own graph (this rank sends ``dst_weights[j] * x`` to each j). Without
    weights: uniform average, or the graph's weights if set with ``is_weighted``.
    """
    kw = _na_args(tensor, self_weight, src_weights, dst_weights, enable_topo_check, name)
    return H.traced_call("NEIGHBOR_ALLREDUCE", name,
                         lambda: ops.neighbor_allreduce_nonblocking(tensor, **kw))


def neighbor_allreduce(tensor: torch.Tensor, *, self_weight: float | None = None,
                       src_weights: dict[int, float] | None = None,
                       dst_weights: dict[int, float] | list[int] | None = None,
                       enable_topo_check: bool = True,
                       name: str | None = None) -> torch.Tensor:
    """Blocking :func:`neighbor_allreduce_nonblocking`; returns a new tensor."""
    return synchronize(neighbor_allreduce_nonblocking(
        tensor, self_weight=self_weight, src_weights=src_weights, dst_weights=dst_weights,
        enable_topo_check=enable_topo_check, name=name))


# ---------------------------------------------------- hierarchical variant
def _hier_args(self_weight: Any, src_machine_weights: Any, dst_machine_weights: Any
               ) -> tuple[float, dict[int, float], dict[int, float]]:
    if B.local_size() <= 1:
        raise ValueError("hierarchical_neighbor_allreduce: local_size() is 1; use "
                         "neighbor_allreduce directly")
    if self_weight is None and src_machine_weights is None and dst_machine_weights is None:
        topo = B.load_machine_topology()
        if topo is None:
            raise RuntimeError("Machine topology must be set before the use of hierarchical "
                               "neighbor allreduce")
        if B.is_machine_topo_weighted():
            sw, src = B.recv_weights(topo, B.machine_rank())
        else:
            ins = B.in_neighbor_machine_ranks()
            sw = 1.0 / (len(ins) + 1)
            src = {m: sw for m in ins}
        return sw, src, {m: 1.0 for m in B.out_neighbor_machine_ranks()}
    if self_weight is None or src_machine_weights is None or dst_machine_weights is None:
        raise ValueError("Arguments self_weight, src_machine_weights, dst_machine_weights have "
                         "to be presented at the same time.")
    if not isinstance(src_machine_weights, Mapping):
        raise ValueError("Argument src_machine_weights has to be a dictionary map from the "  # noqa: TRY004
                         "(in-)neighbor rank to the weights.")
    sw = _check_self_weight(self_weight)
    src = {int(k): v for k, v in src_machine_weights.items()}
    if not set(src) <= set(B.in_neighbor_machine_ranks()):
        raise ValueError("The key of weights should only contain the ranks that belong to "
                         " in-neighbors and self rank.")
    if isinstance(dst_machine_weights, Mapping):
        dst = {int(k): v for k, v in dst_machine_weights.items()}
    else:
        listed = _ranks(dst_machine_weights, "dst_machine_weights")
        if len(set(listed)) != len(listed):
            raise ValueError("Argument dst_machine_weights should only contain the unique "
                             "ranks.")
        dst = {m: 1.0 for m in listed}
    if not set(dst) <= set(B.out_neighbor_machine_ranks()):
        raise ValueError("The key of dst_machine_weights should only contain the ranks that "
                         "belong to out-neighbors and self rank.")
    return sw, src, dst


def hierarchical_neighbor_allreduce_nonblocking(
        tensor: torch.Tensor, *, self_weight: float | None = None,
        src_machine_weights: dict[int, float] | None = None,
        dst_machine_weights: dict[int, float] | list[int] | None = None,
        enable_topo_check: bool = False, name: str | None = None) -> int:
    """Average inside each machine, then gossip between machines; returns a handle.

    Machine m's ranks get ``self_weight * xbar_m + sum_{m'} src_machine_weights[m'] *
    dst_machine_weights_{m'}[m] * xbar_{m'}``, ``xbar`` being a machine's mean. Without
    weights the machine topology (``set_machine_topology``) gives them. Runs at once
    (decomm's hierarchical op is blocking). ``enable_topo_check`` checks the machine
    graph as :func:`neighbor_allreduce` does.
    """
    if (self_weight is None) != (src_machine_weights is None):
        raise ValueError("Arguments self_weight and src_machine_weights have to be presented "
                         "at the same time")
    sw, src, dst = _hier_args(self_weight, src_machine_weights, dst_machine_weights)
    if enable_topo_check:
        _check_machine_graph(sorted(src), sorted(dst), name or "hierarchical")
    return H.traced_call("NEIGHBOR_ALLREDUCE", name, lambda: H.Done(
        hierarchical.hierarchical_neighbor_allreduce(
            tensor, self_weight=sw, src_machine_weights=src, dst_machine_weights=dst,
            name=name)))


def _check_machine_graph(src: list[int], dst: list[int], label: str) -> None:
    """The machine graph of one call, checked like :func:`check_topology` (the leaders'
    rows are compared; every rank of a machine passes the same lists)."""
    ls = B.local_size()
    check_topology([m * ls for m in src if m * ls != B.rank()] if B.local_rank() == 0 else [],
                   [m * ls for m in dst if m * ls != B.rank()] if B.local_rank() == 0 else [],
                   label)


def hierarchical_neighbor_allreduce(
        tensor: torch.Tensor, *, self_weight: float | None = None,
        src_machine_weights: dict[int, float] | None = None,
        dst_machine_weights: dict[int, float] | list[int] | None = None,
        enable_topo_check: bool = False, name: str | None = None) -> torch.Tensor:
    """Blocking :func:`hierarchical_neighbor_allreduce_nonblocking`."""
    return synchronize(hierarchical_neighbor_allreduce_nonblocking(
        tensor, self_weight=self_weight, src_machine_weights=src_machine_weights,
        dst_machine_weights=dst_machine_weights, enable_topo_check=enable_topo_check,
        name=name))


# ----------------------------------------------------------------- allreduce
def _local_allreduce(tensor: torch.Tensor, average: bool, name: Any) -> torch.Tensor:
    """Allreduce among the ranks of this machine: the machine mean is the hierarchical op
    with no machine neighbours and self weight 1."""
    if not torch.is_floating_point(tensor):
        raise TypeError("allreduce(is_hierarchical_local=True) needs a floating tensor, got "
                        f"{tensor.dtype}")
    mean = hierarchical.hierarchical_neighbor_allreduce(
        tensor, self_weight=1.0, src_machine_weights={}, dst_machine_weights={},
        name=name or "bluefog.local_allreduce")
    return mean if average else mean * hierarchical.machine_local_size()


def allreduce_nonblocking(tensor: torch.Tensor, average: bool = True,
                          is_hierarchical_local: bool = False, name: str | None = None) -> int:
    """Start a sum (or mean) over all ranks - or, with ``is_hierarchical_local``, over
    this machine's ranks; returns a handle whose result is a new tensor."""
    if is_hierarchical_local:
        return H.traced_call("ALLREDUCE", name,
                             lambda: H.Done(_local_allreduce(tensor, average, name)))
    return H.traced_call("ALLREDUCE", name, lambda: ops.allreduce_nonblocking(
        tensor, average=average, name=name))


def allreduce(tensor: torch.Tensor, average: bool = True, is_hierarchical_local: bool = False,
              name: str | None = None) -> torch.Tensor:
    """Sum or mean of ``tensor`` over all ranks (a new tensor; the input is unchanged)."""
    return synchronize(allreduce_nonblocking(tensor, average, is_hierarchical_local, name))


def allreduce_nonblocking_(tensor: torch.Tensor, average: bool = True,
                           is_hierarchical_local: bool = False, name: str | None = None) -> int:
    """In-place :func:`allreduce_nonblocking`; the result is written into ``tensor``."""
    if is_hierarchical_local:
        def local() -> H.Done:
            out = _local_allreduce(tensor, average, name)
            with torch.no_grad():
                tensor.copy_(out)
            return H.Done(tensor)
        return H.traced_call("ALLREDUCE", name, local)
    with torch.no_grad():
        return H.traced_call("ALLREDUCE", name, lambda: ops.allreduce_nonblocking_(
            tensor, average=average, name=name))


def allreduce_(tensor: torch.Tensor, average: bool = True, is_hierarchical_local: bool = False,
               name: str | None = None) -> torch.Tensor:
    """In-place :func:`allreduce`; returns ``tensor``."""
    return synchronize(allreduce_nonblocking_(tensor, average, is_hierarchical_local, name))


# ----------------------------------------------------------------- broadcast
def broadcast_nonblocking(tensor: torch.Tensor, root_rank: int, name: str | None = None) -> int:
    """Root's ``tensor`` on every rank as a new tensor (any dtype); returns a handle."""
    return H.traced_call("BROADCAST", name,
                         lambda: H.Done(ops.broadcast(tensor, root_rank, name=name)))


def broadcast(tensor: torch.Tensor, root_rank: int, name: str | None = None) -> torch.Tensor:
    """Blocking :func:`broadcast_nonblocking`."""
    return synchronize(broadcast_nonblocking(tensor, root_rank, name))


def broadcast_nonblocking_(tensor: torch.Tensor, root_rank: int,
                           name: str | None = None) -> int:
    """Overwrite ``tensor`` with root's value (in place); returns a handle."""
    def run() -> H.Done:
        with torch.no_grad():
            return H.Done(ops.broadcast_(tensor, root_rank, name=name))
    return H.traced_call("BROADCAST", name, run)


def broadcast_(tensor: torch.Tensor, root_rank: int, name: str | None = None) -> torch.Tensor:
    """Blocking :func:`broadcast_nonblocking_`; returns ``tensor``."""
    return synchronize(broadcast_nonblocking_(tensor, root_rank, name))


# ----------------------------------------------------------------- allgather
def allgather_nonblocking(tensor: torch.Tensor, name: str | None = None) -> int:
    """Every rank's tensor concatenated on dim 0 in rank order; returns a handle."""
    return H.traced_call("ALLGATHER", name, lambda: H.Done(ops.allgather(tensor, name=name)))


def allgather(tensor: torch.Tensor, name: str | None = None) -> torch.Tensor:
    """Blocking :func:`allgather_nonblocking`."""
    return synchronize(allgather_nonblocking(tensor, name))


def neighbor_allgather_nonblocking(tensor: torch.Tensor, *, src_ranks: list[int] | None = None,
                                   dst_ranks: list[int] | None = None,
                                   enable_topo_check: bool = True,
                                   name: str | None = None) -> int:
    """The in-neighbours' tensors concatenated on dim 0; returns a handle.

    Order: ``in_neighbor_ranks()`` (ascending), or ``src_ranks`` as given. ``src_ranks``
    and ``dst_ranks`` come together and define this call's graph (checked across ranks
    with ``enable_topo_check``).
    """
    if (src_ranks is None) != (dst_ranks is None):
        raise ValueError("Argument dst_ranks and src_ranks have to be presented at the same "
                         "time")
    if src_ranks is None:
        B.ensure_installed()
        return H.traced_call("NEIGHBOR_ALLGATHER", name,
                             lambda: H.Done(ops.neighbor_allgather(tensor, name=name)))
    src = _ranks(src_ranks, "src_ranks")
    dst = _ranks(dst_ranks, "dst_ranks")
    if enable_topo_check:
        check_topology(src, dst, name or "neighbor_allgather")
    return H.traced_call("NEIGHBOR_ALLGATHER", name, lambda: H.Done(
        ops.neighbor_allgather(tensor, src_ranks=src, dst_ranks=dst, name=name)))


def neighbor_allgather(tensor: torch.Tensor, *, src_ranks: list[int] | None = None,
                       dst_ranks: list[int] | None = None, enable_topo_check: bool = True,
                       name: str | None = None) -> torch.Tensor:
    """Blocking :func:`neighbor_allgather_nonblocking`."""
    return synchronize(neighbor_allgather_nonblocking(
        tensor, src_ranks=src_ranks, dst_ranks=dst_ranks, enable_topo_check=enable_topo_check,
        name=name))


# --------------------------------------------------------------- pair gossip
def pair_gossip_nonblocking(tensor: torch.Tensor, target_rank: int,
                            self_weight: float | None = None, pair_weight: float | None = None,
                            name: str | None = None) -> int:
    """Exchange with ``target_rank`` (which must call it back) and mix:
    ``self_weight * x + pair_weight * x_target`` (default: the average)."""
    if (self_weight is None) != (pair_weight is None):
        raise ValueError("self_weight and pair_weight have to be set at same time.")
    target = _ranks([target_rank], "target_rank")[0]
    if not 0 <= target < B.size() or target == B.rank():
        raise ValueError(f"pair_gossip: target_rank {target_rank} must be another rank in "
                         f"0..{B.size() - 1}")
    sw = 0.5 if self_weight is None else _check_self_weight(self_weight)
    pw = 0.5 if pair_weight is None else _check_self_weight(pair_weight)
    return H.traced_call("PAIR_GOSSIP", name, lambda: ops.neighbor_allreduce_nonblocking(
        tensor, self_weight=sw, src_weights={target: pw}, dst_weights={target: 1.0},
        name=name))


def pair_gossip(tensor: torch.Tensor, target_rank: int, self_weight: float | None = None,
                pair_weight: float | None = None, name: str | None = None) -> torch.Tensor:
    """Blocking :func:`pair_gossip_nonblocking`."""
    return synchronize(pair_gossip_nonblocking(tensor, target_rank, self_weight, pair_weight,
                                               name))


def barrier() -> None:
    """Wait until every rank has called it. With the timeline on, the file is rewritten
    first, so that it holds every op this rank made before the barrier."""
    if timeline.is_enabled():
        timeline.flush()
    ops.barrier()
