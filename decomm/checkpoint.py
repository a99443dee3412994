"""Checkpoints of a decentralized run, restartable on any number of ranks.

Losing a whole host (its MPI daemon too) cannot be survived in-job with the runtime
decomm ships with, so the fallback is a checkpoint every few steps and a restart. A
decentralized run has one model per rank; :func:`save` stores their *consensus average*

.. math::  \\bar{x} = \\frac{1}{n} \\sum_{i=1}^{n} x_i

(one allreduce per tensor), which is what every rank would converge to with exact
averaging, and from which a restart on ``n'`` ranks - any ``n'`` - starts every rank. The
inner torch optimizer's floating state (momentum buffers, Adam moments) is averaged the
same way; the decentralized wrapper's own state (trackers, previous iterates) belongs to
the old graph and starts afresh in the new run.

Typical use::

    if args.resume:
        info = decomm.checkpoint.load(path, model, opt.optimizer)   # all ranks
        start = info["step"]
    opt = decomm.optim.DSGD(torch.optim.SGD(model.parameters(), lr=0.1))
    for step in range(start, steps):
        ...
        if (step + 1) % 100 == 0:
            decomm.checkpoint.save(path, model, opt.optimizer, step=step + 1)

The file is written by rank 0, atomically (a temporary file then a rename), so a
crash during :func:`save` leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from . import _state, ops
from .errors import DecommError

__all__ = ["load", "save"]

_FORMAT = "decomm.checkpoint/1"


def _averaged(tensors: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    out = {}
    for key in sorted(tensors):
        t = tensors[key]
        if torch.is_tensor(t) and t.is_floating_point():
            out[key] = ops.allreduce(t.detach().to("cpu").contiguous(), average=True,
                                     name=f"decomm.checkpoint.{what}.{key}")
        else:
            out[key] = t.detach().to("cpu").clone() if torch.is_tensor(t) else t
    return out


def _optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    sd = optimizer.state_dict()
    flat = {f"{pid}.{name}": v for pid, st in sd["state"].items() for name, v in st.items()}
    avg = _averaged(flat, "optimizer")
    state = {pid: {name: avg[f"{pid}.{name}"] for name in st} for pid, st in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def save(path: str | os.PathLike, model: torch.nn.Module,
         optimizer: torch.optim.Optimizer | None = None, *, step: int = 0,
         **extra: Any) -> None:
    """Save the ranks' consensus-average model (and inner optimizer state); collective.

    ``optimizer`` is the *torch* optimizer (``wrapper.optimizer``), ``step`` the number
    of steps done; ``extra`` values (picklable) are stored as given on rank 0.
    """
    st = _state.require()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"decomm.checkpoint.save on rank {st.rank}: model must be a "
                        f"torch.nn.Module, got {type(model).__name__}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"decomm.checkpoint.save on rank {st.rank}: step must be a "
                         f"non-negative int, got {step!r}")
    payload = {
        "format": _FORMAT,
        "model": _averaged(model.state_dict(), "model"),
        "optimizer": None if optimizer is None else _optimizer_state(optimizer),
        "step": step,
        "size": st.size,
        "lost": list(st.lost),
        "extra": extra,
    }
    if st.rank == 0:
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        torch.save(payload, tmp)
        os.replace(tmp, path)
    ops.barrier()  # the file exists once save() returns on any rank


def load(path: str | os.PathLike, model: torch.nn.Module,
         optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Load a checkpoint of :func:`save` into ``model`` (and ``optimizer``) on every rank.

    Works on any number of ranks. Returns ``{"step", "size" (ranks that saved it),
    "lost", "extra"}``. Every rank must see the file (a shared file system, or a copy
    per host); a rank that cannot read it raises :class:`DecommError`, naming itself.
    """
    st = _state.get()
    who = f"rank {st.rank}" if st is not None else "this process"
    try:
        payload = torch.load(os.fspath(path), map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise DecommError(f"decomm.checkpoint.load on {who}: no checkpoint at {path!s} "
                          "(every rank must see the file)") from None
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise DecommError(f"decomm.checkpoint.load on {who}: {path!s} is not a decomm "
                          "checkpoint (written by decomm.checkpoint.save)")
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as e:
        raise DecommError(f"decomm.checkpoint.load on {who}: the model does not match the "
                          f"checkpoint: {e}") from None
    if optimizer is not None:
        if payload["optimizer"] is None:
            raise DecommError(f"decomm.checkpoint.load on {who}: {path!s} holds no optimizer "
                              "state (saved without one)")
        optimizer.load_state_dict(payload["optimizer"])
    return {k: payload[k] for k in ("step", "size", "lost", "extra")}
