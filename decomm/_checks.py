"""Input validation shared by every entry point: weights, ranks (or machine ids) and
weight maps. One implementation, so that ``neighbor_allreduce``, the hierarchical op
and the window ops accept and refuse the same inputs with the same messages.

Every function takes ``where`` - the start of the message, e.g.
``"neighbor_allreduce 'x' on rank 3"`` - so that an error names the op, the tensor
and the rank. Weights may be any finite number (negative ones included: some
algorithms send signed combinations, as BlueFog allows); booleans, NaN and
infinities are refused.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping
from typing import Any

import numpy as np

__all__ = ["check_id", "check_weight", "resolve_weights", "weight_map", "where"]

_NUMBER = (int, float, np.floating, np.integer)


def where(op: str, name: str | None, rank: int) -> str:
    """``"op 'name' on rank r"`` (``"op on rank r"`` without a name)."""
    return f"{op} '{name}' on rank {rank}" if name is not None else f"{op} on rank {rank}"


def check_weight(w: Any, what: str, where: str) -> float:
    """``w`` as a float; TypeError for a non-number (or bool), ValueError if not finite."""
    if isinstance(w, bool) or not isinstance(w, _NUMBER):
        raise TypeError(f"{where}: {what} must be a number, got {w!r}")
    value = float(w)
    if not math.isfinite(value):
        raise ValueError(f"{where}: {what} = {value} must be finite")
    return value


def check_id(v: Any, what: str, size: int, where: str, unit: str = "rank") -> int:
    """``v`` as an int in ``[0, size)``; TypeError / ValueError naming ``unit``s otherwise."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{where}: {what} must be an int {unit}, got {v!r}")
    if not 0 <= int(v) < size:
        raise ValueError(f"{where}: {what}={v} is out of range for {size} {unit}s")
    return int(v)


def weight_map(obj: Any, what: str, where: str, *, me: int, size: int, unit: str = "rank",
               allowed: Collection[int] | None = None, role: str = "neighbour",
               context: str = "") -> dict[int, float]:
    """Validate ``{id: weight}`` (or an iterable of ids, each weighing 1).

    Keys must be ints in ``[0, size)``, other than ``me`` (this rank's own weight goes
    in ``self_weight``), each named once, and in ``allowed`` when it is given (the
    message then names them by ``role`` and ``context``, and lists them).
    """
    listing = "" if allowed is None else f" ({role}s: {sorted(allowed)})"
    if isinstance(obj, Mapping):
        items = list(obj.items())
    elif isinstance(obj, Iterable) and not isinstance(obj, (str, bytes)):
        items = [(r, 1.0) for r in obj]
    else:
        raise TypeError(f"{where}: {what} must be a dict {{{unit}: weight}} or a list of "
                        f"{unit}s, got {type(obj).__name__}")
    out: dict[int, float] = {}
    for r, w in items:
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)):
            raise TypeError(f"{where}: {what} key {r!r} is not a {unit}")
        r = int(r)
        if not 0 <= r < size:
            raise ValueError(f"{where}: {what} names {unit} {r}, out of range for {size} "
                             f"{unit}s{listing}")
        if r == me:
            raise ValueError(f"{where}: {what} names this {unit} itself (give its weight "
                             f"as self_weight){listing}")
        if r in out:
            raise ValueError(f"{where}: {what} names {unit} {r} twice")
        if allowed is not None and r not in allowed:
            raise ValueError(f"{where}: {what} names {unit} {r}, which is not an {role} of "
                             f"this {unit}{context}{listing}")
        out[r] = check_weight(w, f"{what}[{r}]", where)
    return out


def resolve_weights(plan: Any, self_weight: Any, src_weights: Any, dst_weights: Any,
                    where: str, *, me: int, size: int, unit: str = "rank", prefix: str = "",
                    graph: str = "") -> tuple[float, list[int], list[float], list[int],
                                              list[float]]:
    """One call's ``(self weight, src ids, src weights, dst ids, dst weights)``.

    ``plan`` is the round's :class:`decomm._state.RoundPlan`. With no override the
    topology's weights apply and every message goes out unscaled. ``self_weight`` with
    ``{prefix}src_weights`` re-weights the round's in-neighbours (unnamed ones weigh
    0, since every in-neighbour sends regardless); adding ``{prefix}dst_weights``
    defines the whole graph of this call. ``graph`` names the round for messages
    (``"round 3 of BaseGraph(n=8, k=1)"``).
    """
    src_name, dst_name = f"src_{prefix}weights", f"dst_{prefix}weights"

    def ids(obj: Any, what: str) -> dict[int, float]:
        return weight_map(obj, what, where, me=me, size=size, unit=unit)

    if dst_weights is None:
        if (self_weight is None) != (src_weights is None):
            raise ValueError(f"{where}: give self_weight and {src_name} together (or neither, "
                             "to use the topology's weights)")
        ones = plan.dst_weights
        if self_weight is None:
            return plan.self_weight, plan.src_ranks, plan.src_weights, plan.dst_ranks, ones
        sw = check_weight(self_weight, "self_weight", where)
        given = ids(src_weights, src_name)
        extra = sorted(set(given) - set(plan.src_ranks))
        if extra:
            raise ValueError(
                f"{where}: {src_name} names {unit}(s) {extra}, which are not in-neighbours in "
                f"{graph} (in-neighbours: {plan.src_ranks}); pass {dst_name} too to use a "
                "different graph for one call")
        return (sw, plan.src_ranks, [given.get(j, 0.0) for j in plan.src_ranks],
                plan.dst_ranks, ones)
    if self_weight is None or src_weights is None:
        raise ValueError(f"{where}: with {dst_name}, also give self_weight and {src_name} "
                         "(together they define this call's graph)")
    sw = check_weight(self_weight, "self_weight", where)
    src = ids(src_weights, src_name)
    dst = ids(dst_weights, dst_name)
    sr, dr = sorted(src), sorted(dst)
    return sw, sr, [src[j] for j in sr], dr, [dst[j] for j in dr]
