"""BlueFog's model helpers (``bluefog.torch.utility``): make parameters and optimizer
state equal on every rank."""

from __future__ import annotations

import pickle
from typing import Any

import torch

from ... import ops

__all__ = ["allreduce_parameters", "broadcast_optimizer_state", "broadcast_parameters"]


def _named(params: Any) -> list[tuple[str, torch.Tensor]]:
    """BlueFog's accepted forms: a dict (sorted by key) or a list of tensors or of
    ``(name, tensor)`` pairs (``model.named_parameters()`` as a list)."""
    if isinstance(params, dict):
        items = sorted(params.items())
    elif isinstance(params, list):
        items = [p if isinstance(p, tuple) else (None, p) for p in params]
    else:
        raise ValueError(f"invalid params of type: {type(params)}")  # noqa: TRY004
    out = []
    for i, (key, p) in enumerate(items):
        if not isinstance(p, torch.Tensor):
            raise ValueError(f"invalid params: entry {key if key is not None else i!r} is a "  # noqa: TRY004
                             f"{type(p).__name__}, not a tensor")
        out.append((f"{i}:{key}" if key is not None else f"{i}", p))
    return out


def broadcast_parameters(params: Any, root_rank: int) -> None:
    """Overwrite every rank's parameters with root's (in place; one broadcast per dtype).

    ``params``: ``model.state_dict()``, ``list(model.named_parameters())`` or
    ``list(model.parameters())``.
    """
    ops.broadcast_parameters(_named(params), root_rank)


def allreduce_parameters(params: Any) -> None:
    """Replace every rank's parameters by their average over all ranks (in place)."""
    named = _named(params)
    with torch.no_grad():
        handles = [ops.allreduce_nonblocking_(p, average=True, name=f"allreduce_parameters.{k}")
                   for k, p in named]
        for h in handles:
            h.wait()


def _init_state(optimizer: torch.optim.Optimizer) -> None:
    """Give a fresh optimizer its state by one step on zero gradients, stepping the
    plain torch optimizer underneath a distributed wrapper (whose own step would
    communicate)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    cls = type(optimizer)
    if cls.__module__.startswith("decomm.compat.bluefog"):
        super(cls, optimizer).step()  # the wrapped torch optimizer's step
    else:
        optimizer.step()


def _bcast_object(obj: Any, root_rank: int, label: str) -> Any:
    """Root's picklable ``obj`` on every rank (its length, then its bytes)."""
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    length = ops.broadcast(torch.tensor([data.numel()], dtype=torch.int64), root_rank,
                           name=f"{label}.len")
    buf = data if int(length) == data.numel() else torch.zeros(int(length), dtype=torch.uint8)
    buf = ops.broadcast(buf, root_rank, name=f"{label}.bytes")
    return pickle.loads(buf.numpy().tobytes())


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, root_rank: int) -> None:
    """Make every rank's optimizer state and hyper-parameters equal to root's.

    A fresh optimizer is given its state first (one step on zero gradients, as BlueFog
    does). Tensor state (momentum buffers, Adam moments, ``step``) is broadcast in
    place; every other value - hyper-parameters in ``param_groups`` (lr, betas, ...)
    and non-tensor state - travels as one pickled object from root.
    """
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ValueError("cannot broadcast torch.optim.LBFGS state")  # noqa: TRY004
    if not optimizer.state_dict()["state"]:
        _init_state(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    tensors: list[tuple[str, torch.Tensor]] = []
    scalars: dict[tuple[int, str], Any] = {}
    for i, p in enumerate(params):
        for key, value in sorted(optimizer.state.get(p, {}).items()):
            if torch.is_tensor(value):
                tensors.append((f"{i}.{key}", value))
            else:
                scalars[(i, key)] = value
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    if tensors:
        ops.broadcast_parameters(tensors, root_rank)
    groups, scalars = _bcast_object((groups, scalars), root_rank, "broadcast_optimizer_state")
    for g, options in zip(optimizer.param_groups, groups):
        g.update(options)
    for (i, key), value in scalars.items():
        optimizer.state[params[i]][key] = value
