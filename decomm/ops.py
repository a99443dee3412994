"""Communication ops: a thin Python layer over decomm's C++ core.

Every op validates its input here (dtype, device, weights, ranks) and hands a
contiguous CPU tensor to ``decomm._C``, which does the messaging and the fused
arithmetic. Ops are collective: every rank involved must make the same calls in
the same order; ranks that disagree (op, name, shape, dtype, topology round, call
count) get a :class:`~decomm.errors.DecommError` naming the ranks and fields, and a
neighbour that never arrives raises after the timeout set at ``init``.

Tensors may be torch tensors or numpy arrays; results come back as the type given.
Ops do not record autograd history (they act on ``tensor.detach()``). The in-place
ops behave as torch's own in-place ops do towards autograd: they bump the tensor's
version counter (so a tensor saved for backward and then overwritten makes
``backward()`` raise instead of using the new values), and with grad mode on they
refuse a tensor that requires grad (call them under ``torch.no_grad()``).

Calls made without ``name=`` are named after their call site (``'@train.py:42'``):
two ranks pairing different unnamed calls - one rank skipped or added a call - get a
:class:`~decomm.errors.DecommError` at once instead of silently exchanging the wrong
tensors. Ranks that make the same logical call from different lines must name it.

Convention (docs/concepts.rst): with ``W`` the current round's mixing matrix, rank i's
``neighbor_allreduce`` returns ``W[i, i] x_i + sum_j W[i, j] x_j`` over its
in-neighbours j, summed in a fixed order (self, then ascending rank), so the result
is bitwise identical on every run.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from . import _checks, _state, cuda_ops, interop, timeline
from .errors import DecommError

__all__ = [
    "Handle",
    "allgather",
    "allreduce",
    "allreduce_",
    "allreduce_nonblocking",
    "allreduce_nonblocking_",
    "barrier",
    "broadcast",
    "broadcast_",
    "broadcast_parameters",
    "neighbor_allgather",
    "neighbor_allreduce",
    "neighbor_allreduce_",
    "neighbor_allreduce_nonblocking",
    "neighbor_allreduce_nonblocking_",
    "neighbor_mix_delta",
    "poll",
    "synchronize",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_REDUCIBLE_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


class Handle:
    """A non-blocking op in flight. ``wait()`` returns its result; ``poll()`` says if done.

    Do not read or write the tensor given to the op until ``wait()`` returns.
    """

    def __init__(self, c_handle: Any, finish: Any, keep: tuple = ()) -> None:
        self._c = c_handle
        self._finish = finish
        self._keep = keep  # tensors the C++ side reads or writes until completion
        self._result: Any = None
        self._done = False
        #: ``around(wait)``: runs the wait (the timeline and the profiler time it here)
        self.on_wait: Callable[[Callable[[], Any]], Any] | None = None

    def poll(self) -> bool:
        """True once the op has completed (successfully or not); never blocks."""
        return self._done or bool(self._c.poll())

    def wait(self) -> Any:
        """Block until done and return the result; raises DecommError if the op failed."""
        if self.on_wait is not None:
            return self.on_wait(self._wait)
        return self._wait()

    def _wait(self) -> Any:
        if not self._done:
            out = self._c.wait()
            self._result = self._finish(out)
            self._done = True
            self._keep = ()
        return self._result


def synchronize(handle: Handle) -> Any:
    """Wait for ``handle`` and return its result (same as ``handle.wait()``)."""
    return handle.wait()


def poll(handle: Handle) -> bool:
    """True when ``handle`` has completed (same as ``handle.poll()``)."""
    return handle.poll()


# ----------------------------------------------------------------- validation
# Frames of these files are decomm's own op plumbing, never a call site.
_PLUMBING = {_f.__code__.co_filename for _f in (lambda: None, timeline.traced)}
# Keyed by (code object, bytecode offset): O(1) to read, unlike f_lineno.
_SITE_NAMES: dict[tuple[Any, int], str] = {}
_HEADER_NAME_LEN = 47  # csrc/common.h kHeaderNameLen - 1: what the header carries


def _site_label(frame: Any) -> str:
    line = f":{frame.f_lineno}"
    base = os.path.basename(frame.f_code.co_filename)
    return "@" + base[-(_HEADER_NAME_LEN - 1 - len(line)):] + line


def _name(name: Any, default: str) -> str:
    """The call's name: ``name``, or ``'@file.py:line'`` of the call site when None."""
    if name is None:
        f = sys._getframe(1)
        while f.f_back is not None and f.f_code.co_filename in _PLUMBING:
            f = f.f_back
        key = (f.f_code, f.f_lasti)
        label = _SITE_NAMES.get(key)
        if label is None:
            label = _SITE_NAMES[key] = _site_label(f)
        return label
    if not isinstance(name, str):
        raise TypeError(f"{default}: name must be a str, got {type(name).__name__}")
    return name


def _check_inplace(obj: Any, op: str, name: str) -> None:
    """Refuse what torch's in-place ops refuse: writing a tensor autograd tracks."""
    if isinstance(obj, torch.Tensor) and obj.requires_grad and torch.is_grad_enabled():
        kind = "a leaf tensor" if obj.is_leaf else "a tensor"
        raise RuntimeError(
            f"{op} '{name}' on rank {_state.require().rank}: in-place op on {kind} that requires "
            "grad; decomm ops record no autograd history, so call it under torch.no_grad() "
            "(as optimizer steps do) or use the out-of-place op")


def _bump_version(obj: Any) -> None:
    """Mark ``obj`` as modified in place, as torch's in-place ops do."""
    if isinstance(obj, torch.Tensor):
        torch.autograd.graph.increment_version(obj)


def _identity(r: Any) -> Any:
    return r


def _to_torch(obj: Any, op: str, name: str) -> tuple[torch.Tensor, Any]:
    """(torch view of obj (CPU or CUDA), function turning a torch result back into obj's type)."""
    if isinstance(obj, torch.Tensor):
        # detach() and device.type cost ~0.6 us of a ~5 us small-message call: skip them
        # where they change nothing (no autograd history to cut; a CPU or CUDA tensor)
        t = obj.detach() if obj.requires_grad else obj
        if not (t.is_cpu or t.is_cuda):  # the message is built only when needed
            cuda_ops.check_device(t, _checks.where(op, name, _state.require().rank))
        return t, _identity
    if isinstance(obj, np.ndarray):
        if obj.dtype == np.float16 or obj.dtype.kind in "fiub":
            return torch.from_numpy(np.ascontiguousarray(obj)), lambda r: r.numpy()
        raise TypeError(f"{op} '{name}': numpy dtype {obj.dtype} is not supported")
    converted = interop.as_torch(obj)  # cupy arrays: zero-copy, returned as cupy
    if converted is not None:
        return converted
    raise TypeError(f"{op} '{name}': expected a torch.Tensor or numpy.ndarray, "
                    f"got {type(obj).__name__}")


def _nonfinite_report(t: torch.Tensor, op: str, name: str, state: Any, rnd: int) -> str | None:
    """With DECOMM_CHECK_FINITE=1: a message if this rank's input holds NaN/Inf."""
    if not state.check_finite or t.dtype not in FLOAT_DTYPES:
        return None
    bad = ~torch.isfinite(t.reshape(-1))
    if not bool(bad.any()):
        return None
    first = int(bad.nonzero()[0, 0])
    return (f"{op} '{name}' on rank {state.rank}: this rank's input holds {int(bad.sum())} "
            f"non-finite value(s) (first at flat index {first}: {t.reshape(-1)[first].item()}) "
            f"at round {rnd}; it was exchanged as is (DECOMM_CHECK_FINITE=1)")


def _check_float(t: torch.Tensor, op: str, name: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op} '{name}' on rank {_state.require().rank}: dtype {t.dtype} is not "
                        "supported; use float16, bfloat16, float32 or float64")


def _resolve(self_weight: Any, src_weights: Any, dst_weights: Any, name: str,
             op: str = "neighbor_allreduce") -> tuple[float, list[int], list[float], list[int],
                                                       list[float], int]:
    """(self weight, src ranks, src weights, dst ranks, dst weights, round) for this call."""
    state = _state.require()
    plan, t = state.plan()
    if self_weight is None and src_weights is None and dst_weights is None:  # the hot path
        return (plan.self_weight, plan.src_ranks, plan.src_weights, plan.dst_ranks,
                plan.dst_weights, t)
    return (*_checks.resolve_weights(plan, self_weight, src_weights, dst_weights,
                                     _checks.where(op, name, state.rank), me=state.rank,
                                     size=state.size,
                                     graph=f"round {t} of {state.topology.name}"), t)


def _finisher(tensor: Any, t: torch.Tensor, back: Any, inplace: bool, nonfinite: str | None,
              cast_to: torch.dtype | None = None) -> Callable[[torch.Tensor], Any]:
    """What turns the C++ result into the op's return value (now or at ``wait()``).

    In place: the result is copied into ``tensor``'s storage when it was computed
    elsewhere, and the version counter bumped; otherwise the result (cast back to
    ``cast_to`` when it was computed wider) in the caller's type. A non-finite input
    report (``DECOMM_CHECK_FINITE``) raises here, after the exchange.
    """
    def finish(result: torch.Tensor) -> Any:
        if nonfinite:
            raise DecommError(nonfinite)
        if inplace:
            if result.data_ptr() != t.data_ptr():
                t.copy_(result)
            _bump_version(tensor)
            return tensor
        return back(result.to(cast_to) if cast_to is not None else result)

    return finish


# --------------------------------------------------------- neighbor_allreduce
def _native_peers(plan: _state.RoundPlan) -> Any:
    from . import _C

    return _C.RoundPeers(plan.self_weight, plan.src_ranks, plan.src_weights, plan.dst_ranks,
                         plan.dst_weights)


def _neighbor_allreduce_now(tensor: Any, name: Any, inplace: bool) -> Any:
    """The blocking call with the topology's weights, handed to C++ in one call.

    A training loop makes this call with small buffers thousands of times per second,
    and the general path's Python (conversions, the result closure, the version bump)
    cost as much as the exchange itself with more ranks than cores. This path runs
    only where it changes nothing: a plain torch tensor, no timeline or profiler, no
    finiteness check, and (decided in C++) a contiguous float CPU tensor without
    autograd history. Anything else returns None and takes the general path, which
    also owns every error message.
    """
    state = _state.get()
    if (state is None or state.check_finite or type(tensor) is not torch.Tensor
            or timeline.recording()):
        return None
    run = getattr(state.backend, "neighbor_allreduce_now", None)
    if run is None:  # a backend of another kind (a test's stand-in)
        return None
    plan, rnd = state.plan()
    peers = plan.native
    if peers is None:
        peers = plan.native = _native_peers(plan)
    return run(tensor, inplace, peers, _name(name, "neighbor_allreduce"), rnd, state.topo_hash)


@timeline.traced("neighbor_allreduce")
def _neighbor_allreduce(tensor: Any, self_weight: Any, src_weights: Any, dst_weights: Any,
                        name: Any, inplace: bool, nonblocking: bool) -> Any:
    name = _name(name, "neighbor_allreduce")
    state = _state.require()
    if inplace:
        _check_inplace(tensor, "neighbor_allreduce", name)
    t, back = _to_torch(tensor, "neighbor_allreduce", name)
    _check_float(t, "neighbor_allreduce", name)
    sw, src, src_w, dst, dst_w, rnd = _resolve(self_weight, src_weights, dst_weights, name)
    x = t if t.is_contiguous() else t.contiguous()
    if inplace:
        out = x
    else:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    nonfinite = _nonfinite_report(x, "neighbor_allreduce", name, state, rnd)
    be = cuda_ops.backend_for(state, x, "neighbor_allreduce")
    h = be.neighbor_allreduce(x, out, sw, src, src_w, dst, dst_w, name, rnd,
                              state.topo_hash, nonblocking)
    if inplace and nonblocking:  # the C++ side writes it from now on
        _bump_version(tensor)

    finish = _finisher(tensor, t, back, inplace, nonfinite)

    if nonblocking:
        return Handle(h, finish, (x, out, t))
    return finish(out)


def neighbor_allreduce(tensor: Any, *, self_weight: float | None = None,
                       src_weights: Mapping[int, float] | None = None,
                       dst_weights: Mapping[int, float] | None = None,
                       name: str | None = None) -> Any:
    """Weighted average with the in-neighbours of the current round; returns a new tensor.

    Rank i gets ``self_weight * x_i + sum_j src_weights[j] * (dst_weights_j[i] * x_j)``;
    by default ``self_weight = W[i, i]``, ``src_weights = {j: W[i, j]}`` from the topology
    at ``current_round()`` and every message is sent unscaled, i.e. ``(W @ x)_i``.

    Args:
        tensor: float16/bfloat16/float32/float64 tensor (any shape, contiguous or not,
            0-d and empty included), the same shape and dtype on every rank.
        self_weight, src_weights: override the topology's weights for this call; give both.
            ``src_weights`` keys must be in-neighbours (unnamed ones get weight 0).
        dst_weights: ``{rank: w}`` - send ``w * x_i`` to exactly these ranks, overriding the
            topology's out-neighbours for this call (a per-call dynamic graph, as in
            BlueFog); then ``src_weights`` names exactly the ranks this rank receives from.
        name: a label; ranks must agree on it (it appears in error messages).

    Returns:
        A new contiguous tensor of the input's shape and dtype (numpy in, numpy out).
    """
    if self_weight is None and src_weights is None and dst_weights is None:
        out = _neighbor_allreduce_now(tensor, name, False)
        if out is not None:
            return out
    return _neighbor_allreduce(tensor, self_weight, src_weights, dst_weights, name, False, False)


def neighbor_allreduce_(tensor: Any, *, self_weight: float | None = None,
                        src_weights: Mapping[int, float] | None = None,
                        dst_weights: Mapping[int, float] | None = None,
                        name: str | None = None) -> Any:
    """In-place :func:`neighbor_allreduce`: writes the result into ``tensor`` and returns it."""
    if self_weight is None and src_weights is None and dst_weights is None:
        out = _neighbor_allreduce_now(tensor, name, True)
        if out is not None:
            return out
    return _neighbor_allreduce(tensor, self_weight, src_weights, dst_weights, name, True, False)


def neighbor_allreduce_nonblocking(tensor: Any, *, self_weight: float | None = None,
                                   src_weights: Mapping[int, float] | None = None,
                                   dst_weights: Mapping[int, float] | None = None,
                                   name: str | None = None) -> Handle:
    """Start :func:`neighbor_allreduce` and return a :class:`Handle` at once.

    The exchange and the weighted sum progress on decomm's background thread while
    Python computes; ``handle.wait()`` returns the new tensor. Do not modify
    ``tensor`` before then.
    """
    return _neighbor_allreduce(tensor, self_weight, src_weights, dst_weights, name, False, True)


def neighbor_allreduce_nonblocking_(tensor: Any, *, self_weight: float | None = None,
                                    src_weights: Mapping[int, float] | None = None,
                                    dst_weights: Mapping[int, float] | None = None,
                                    name: str | None = None) -> Handle:
    """In-place non-blocking :func:`neighbor_allreduce`; ``wait()`` returns ``tensor``."""
    return _neighbor_allreduce(tensor, self_weight, src_weights, dst_weights, name, True, True)


@timeline.traced("neighbor_mix_delta")
def neighbor_mix_delta(tensor: torch.Tensor, out: torch.Tensor, *, name: str | None = None,
                       nonblocking: bool = False) -> Any:
    r"""``out ← (W(t) x)_i − x_i``, the change one round of gossip would make, in one pass.

    The weighted sum of :func:`neighbor_allreduce` with self weight ``W[i, i] − 1``:
    ``out = (W[i, i] − 1) x_i + Σ_j W[i, j] x_j``, written straight into ``out`` while
    ``tensor`` is left as it is.  Adapt-with-combine
    (``x^{t+1} = W x^t − u^t``, :class:`decomm.optim.DSGD` with ``combine_first=True``)
    needs exactly this: the parameters are sent as they are (no copy into a send
    buffer) and, once the local step has made them ``x^t − u^t``, one ``x += out``
    finishes the step.

    Args:
        tensor: a contiguous float CPU/CUDA tensor, the message (not written).
        out: a tensor of the same shape, dtype and device, contiguous, not
            overlapping ``tensor``.
        name: as for :func:`neighbor_allreduce`.
        nonblocking: return a :class:`Handle` at once (``wait()`` returns ``out``);
            do not modify ``tensor`` or read ``out`` before then.
    """
    name = _name(name, "neighbor_mix_delta")
    state = _state.require()
    if not isinstance(tensor, torch.Tensor) or not isinstance(out, torch.Tensor):
        raise TypeError(f"neighbor_mix_delta '{name}' on rank {state.rank}: tensor and out "
                        f"must be torch tensors, got {type(tensor).__name__} and "
                        f"{type(out).__name__}")
    _check_float(tensor, "neighbor_mix_delta", name)
    if (out.shape != tensor.shape or out.dtype != tensor.dtype or out.device != tensor.device
            or not tensor.is_contiguous() or not out.is_contiguous()):
        raise ValueError(
            f"neighbor_mix_delta '{name}' on rank {state.rank}: tensor and out must be "
            f"contiguous with the same shape, dtype and device, got {tuple(tensor.shape)} "
            f"{tensor.dtype} {tensor.device} and {tuple(out.shape)} {out.dtype} {out.device}")
    if tensor.numel() and (out.data_ptr() < tensor.data_ptr() + tensor.nbytes
                           and tensor.data_ptr() < out.data_ptr() + out.nbytes):
        raise ValueError(f"neighbor_mix_delta '{name}' on rank {state.rank}: out overlaps "
                         f"tensor; the message must stay intact while it is sent")
    sw, src, src_w, dst, dst_w, rnd = _resolve(None, None, None, name)
    nonfinite = _nonfinite_report(tensor, "neighbor_mix_delta", name, state, rnd)
    be = cuda_ops.backend_for(state, tensor, "neighbor_allreduce")
    h = be.neighbor_allreduce(tensor, out, sw - 1.0, src, src_w, dst, dst_w, name, rnd,
                              state.topo_hash, nonblocking)
    finish = _finisher(out, out, _identity, False, nonfinite)
    if nonblocking:
        return Handle(h, finish, (tensor, out))
    return finish(out)


# ------------------------------------------------------------------ allreduce
@timeline.traced("allreduce")
def _allreduce(tensor: Any, average: bool, name: Any, inplace: bool, nonblocking: bool) -> Any:
    name = _name(name, "allreduce")
    state = _state.require()
    if inplace:
        _check_inplace(tensor, "allreduce", name)
    t, back = _to_torch(tensor, "allreduce", name)
    if t.dtype in _REDUCIBLE_INT_DTYPES:
        if average:
            raise TypeError(f"allreduce '{name}' on rank {state.rank}: average=True needs a "
                            f"floating tensor, got {t.dtype}; use average=False for a sum")
    elif t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"allreduce '{name}' on rank {state.rank}: dtype {t.dtype} is not "
                        "supported")
    # Half precision is summed in float32 (MPI has no float16 sum; it is also more exact).
    wide = t.dtype in (torch.float16, torch.bfloat16)
    x = t.float() if wide else (t if t.is_contiguous() else t.contiguous())
    out = x if (inplace or wide) else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    nonfinite = _nonfinite_report(x, "allreduce", name, state, -1)
    be = cuda_ops.backend_for(state, x, "allreduce")
    h = be.allreduce(x, out, bool(average), name, nonblocking)
    if inplace and nonblocking:
        _bump_version(tensor)

    finish = _finisher(tensor, t, back, inplace, nonfinite, t.dtype if wide else None)

    if nonblocking:
        return Handle(h, finish, (x, out, t))
    return finish(out)


def allreduce(tensor: Any, *, average: bool = True, name: str | None = None) -> Any:
    """Sum (or mean, ``average=True``) of ``tensor`` over all ranks; returns a new tensor.

    Floating tensors (half precision summed in float32) or, with ``average=False``,
    integer tensors. Same shape and dtype on every rank.
    """
    return _allreduce(tensor, average, name, False, False)


def allreduce_(tensor: Any, *, average: bool = True, name: str | None = None) -> Any:
    """In-place :func:`allreduce`."""
    return _allreduce(tensor, average, name, True, False)


def allreduce_nonblocking(tensor: Any, *, average: bool = True,
                          name: str | None = None) -> Handle:
    """Start :func:`allreduce`; ``handle.wait()`` returns the result."""
    return _allreduce(tensor, average, name, False, True)


def allreduce_nonblocking_(tensor: Any, *, average: bool = True,
                           name: str | None = None) -> Handle:
    """Start an in-place :func:`allreduce`."""
    return _allreduce(tensor, average, name, True, True)


# ------------------------------------------------------------------ broadcast
def _check_root(root: Any, op: str, name: str) -> int:
    state = _state.require()
    return _checks.check_id(root, "root", state.size, _checks.where(op, name, state.rank))


@timeline.traced("broadcast")
def broadcast_(tensor: Any, root: int, *, name: str | None = None) -> Any:
    """Overwrite ``tensor`` on every rank with root's value; returns ``tensor``.

    Any dtype; same shape and dtype on every rank.
    """
    name = _name(name, "broadcast")
    root = _check_root(root, "broadcast", name)
    _check_inplace(tensor, "broadcast", name)
    t, _ = _to_torch(tensor, "broadcast", name)
    x = t if t.is_contiguous() else t.contiguous()
    cuda_ops.backend_for(_state.require(), x, "broadcast").broadcast(x, root, name)
    if x.data_ptr() != t.data_ptr():
        t.copy_(x)
    _bump_version(tensor)
    return tensor


@timeline.traced("broadcast")
def broadcast(tensor: Any, root: int, *, name: str | None = None) -> Any:
    """Root's ``tensor`` on every rank, as a new tensor (the input is left unchanged)."""
    name = _name(name, "broadcast")
    root = _check_root(root, "broadcast", name)
    t, back = _to_torch(tensor, "broadcast", name)
    out = t.clone(memory_format=torch.contiguous_format)
    cuda_ops.backend_for(_state.require(), out, "broadcast").broadcast(out, root, name)
    return back(out)


@timeline.traced("broadcast_parameters", phases=False)
def broadcast_parameters(params: Any, root: int = 0) -> None:
    """Make every rank's parameters equal to root's, in place.

    ``params``: a ``state_dict``-like mapping name -> tensor, an iterable of
    ``(name, tensor)`` pairs (``model.named_parameters()``), or a ``torch.nn.Module``.
    Tensors of one dtype travel in one flat buffer (one broadcast per dtype).
    """
    if isinstance(params, torch.nn.Module):
        items = list(params.state_dict().items())
    elif isinstance(params, Mapping):
        items = list(params.items())
    else:
        items = list(params)
    named: list[tuple[str, torch.Tensor]] = []
    for entry in items:
        if not (isinstance(entry, tuple) and len(entry) == 2):
            raise TypeError("broadcast_parameters expects a mapping or (name, tensor) pairs")
        key, value = entry
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"broadcast_parameters: {key!r} is a {type(value).__name__}, "
                            "not a tensor")
        named.append((str(key), value))
    root = _check_root(root, "broadcast_parameters", "parameters")
    by_dtype: dict[tuple[torch.dtype, str], list[tuple[str, torch.Tensor]]] = {}
    for key, value in named:
        by_dtype.setdefault((value.dtype, value.device.type), []).append((key, value))
    with torch.no_grad():
        for dtype, device_type in sorted(by_dtype, key=str):
            group = by_dtype[(dtype, device_type)]
            flat = torch.cat([v.detach().reshape(-1) for _, v in group]) if group else None
            label = f"broadcast_parameters.{str(dtype).replace('torch.', '')}.{len(group)}"
            be = cuda_ops.backend_for(_state.require(), flat, "broadcast")
            be.broadcast(flat, root, label)
            offset = 0
            for _, v in group:
                n = v.numel()
                v.copy_(flat[offset:offset + n].view(v.shape))
                offset += n


# ------------------------------------------------------------------ allgather
@timeline.traced("allgather")
def allgather(tensor: Any, *, name: str | None = None) -> Any:
    """Concatenate every rank's tensor along dim 0, in rank order.

    Ranks may differ in the first dimension only. A 0-d tensor counts as shape (1,),
    so the result has shape (size(),).
    """
    name = _name(name, "allgather")
    t, back = _to_torch(tensor, "allgather", name)
    x = t.reshape(1) if t.dim() == 0 else (t if t.is_contiguous() else t.contiguous())
    return back(cuda_ops.backend_for(_state.require(), x, "allgather").allgather(x, name))


@timeline.traced("neighbor_allgather")
def neighbor_allgather(tensor: Any, *, src_ranks: Any = None, dst_ranks: Any = None,
                       name: str | None = None) -> Any:
    """Concatenate the in-neighbours' tensors (ascending rank, this rank excluded) on dim 0.

    Uses the current round's topology; ranks may differ in the first dimension. With no
    in-neighbours the result has first dimension 0.

    ``src_ranks`` and ``dst_ranks`` (give both, as in BlueFog) override the topology for
    this call: this rank receives from ``src_ranks``, concatenated in the order given,
    and sends to ``dst_ranks``. Every rank's lists must match (j in src of i exactly when
    i in dst of j); an unmatched receive waits until the timeout.
    """
    name = _name(name, "neighbor_allgather")
    state = _state.require()
    t, back = _to_torch(tensor, "neighbor_allgather", name)
    x = t.reshape(1) if t.dim() == 0 else (t if t.is_contiguous() else t.contiguous())
    plan, rnd = state.plan()
    src, dst = plan.src_ranks, plan.dst_ranks
    if (src_ranks is None) != (dst_ranks is None):
        raise ValueError(f"{_checks.where('neighbor_allgather', name, state.rank)}: give "
                         "src_ranks and dst_ranks together (or neither, for the topology's)")
    if src_ranks is not None:
        where = _checks.where("neighbor_allgather", name, state.rank)
        src = list(_checks.weight_map(src_ranks, "src_ranks", where, me=state.rank,
                                      size=state.size))
        dst = sorted(_checks.weight_map(dst_ranks, "dst_ranks", where, me=state.rank,
                                        size=state.size))
    be = cuda_ops.backend_for(state, x, "neighbor_allgather")
    return back(be.neighbor_allgather(x, src, dst, name, rnd, state.topo_hash))


@timeline.traced("barrier")
def barrier() -> None:
    """Wait until every rank has called barrier() (bounded by the timeout)."""
    _state.require().backend.barrier()
