"""Common machinery of the decentralized optimizer wrappers.

A wrapper holds an existing :class:`torch.optim.Optimizer` (the *inner*
optimizer) and turns its update into a decentralized algorithm.  Writing
``x`` for a node's parameters, ``W(t)`` for round ``t``'s mixing matrix
(``W[i, j]`` = weight node ``i`` gives to node ``j``) and ``u`` for the update
the inner optimizer applies (``x_after = x - u``; for plain SGD ``u = lr * g``),
every algorithm is split into three phases::

    local phase   (node-local algebra, may run the inner optimizer;
                   leaves in the flat communication buffers what must be mixed)
    mix           (buffers <- W(t) @ buffers, across nodes)
    finish phase  (node-local algebra after mixing)

:meth:`DecentralizedOptimizer.step` runs the three phases with the mix done by
the wrapper's :class:`~decomm.optim.comm.Communicator` (one
``neighbor_allreduce_`` per bucket, then one ``advance_round``); the simulator
:mod:`decomm.sim` runs the local phase of all its virtual nodes, mixes their
buffers itself, then runs their finish phases.  The algebra lives only in the
phase methods, so the MPI and the simulated runs share it.

Communication schedule: with ``communicate_every=p`` step ``s`` (0-based)
communicates iff ``(s + 1) % p == 0``; the other steps are *local*: the same
algebra with ``W = I`` (no message, no round advance).  With
``global_every=q`` every ``q``-th communicating step is an exact global
average (``W = 11ᵀ/n``, one ``allreduce_``) instead of a gossip round; a global
step does not advance the topology round, so a finite-time-exact cycle such as
``BaseGraph`` is never cut in the middle.
"""

from __future__ import annotations

import enum
import zlib
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from ._flat import Bucket, build_buckets, collect_params
from .comm import Communicator, Handle, MPICommunicator, decomm_error

__all__ = ["DecentralizedOptimizer", "Mix", "decomm_error"]


class Mix(enum.Enum):
    """What a step does with its communication buffers."""

    NONE = 0  # local step, W = I
    NEIGHBOR = 1  # one gossip round with W(t)
    GLOBAL = 2  # exact average, W = 11ᵀ/n


def _check_int(name: str, value: Any, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


_DTYPE_CODES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.complex64,
    torch.complex128,
]


def _param_names(param_groups: list[dict]) -> dict[int, str]:
    names: dict[int, str] = {}
    for gi, group in enumerate(param_groups):
        pnames = group.get("param_names")
        for k, p in enumerate(group["params"]):
            if id(p) in names:
                continue
            names[id(p)] = repr(pnames[k]) if pnames else f"param_groups[{gi}]['params'][{k}]"
    return names


def check_same_parameters(comm: Communicator, params: list[Tensor], names: list[str]) -> None:
    """Raise ``DecommError`` on every rank if ranks wrap different parameters.

    Cost: one ``allgather`` of two int64 per rank (count and a CRC32 of the
    shapes and dtypes); only on a mismatch a second ``allgather`` of a small
    shape table finds the first offending parameter and rank.
    """
    size = comm.size()
    if size <= 1:
        return
    sig = [(tuple(p.shape), str(p.dtype)) for p in params]
    local = torch.tensor([len(params), zlib.crc32(repr(sig).encode())], dtype=torch.int64)
    table = comm.allgather(local, name="decomm.optim.signature").reshape(size, 2)
    if bool((table == table[0]).all()):
        return
    err = decomm_error()
    counts = table[:, 0].tolist()
    if len(set(counts)) > 1:
        listing = ", ".join(f"rank {r}: {c}" for r, c in enumerate(counts))
        raise err(
            f"ranks wrap different numbers of parameters ({listing}); every rank "
            f"must build the same model"
        )
    width = 10
    rows = torch.full((len(params), width), -1, dtype=torch.int64)
    for k, p in enumerate(params):
        code = _DTYPE_CODES.index(p.dtype) if p.dtype in _DTYPE_CODES else 99
        rows[k, 0] = code
        rows[k, 1] = p.dim()
        dims = list(p.shape)
        if len(dims) > width - 2:
            dims = [*dims[: width - 3], zlib.crc32(repr(tuple(p.shape)).encode())]
        for d, v in enumerate(dims):
            rows[k, 2 + d] = int(v)
    allrows = comm.allgather(rows.reshape(-1), name="decomm.optim.shapes").reshape(
        size, len(params), width
    )
    for k in range(len(params)):
        for r in range(1, size):
            if not bool((allrows[r, k] == allrows[0, k]).all()):
                raise err(
                    f"parameter {names[k]} differs across ranks: "
                    f"{_describe(allrows[0, k])} on rank 0 but "
                    f"{_describe(allrows[r, k])} on rank {r}"
                )
    raise err("ranks wrap parameters with different shapes or dtypes")


def _describe(row: Tensor) -> str:
    code, ndim = int(row[0]), int(row[1])
    dt = str(_DTYPE_CODES[code]) if 0 <= code < len(_DTYPE_CODES) else "other dtype"
    dims = [int(v) for v in row[2 : 2 + min(ndim, len(row) - 2)]]
    return f"shape {tuple(dims)} {dt}"


class DecentralizedOptimizer(torch.optim.Optimizer):
    """Base class: holds an inner optimizer, flat buckets and the schedule.

    Subclasses implement :meth:`_local_phase`, :meth:`_finish_phase`,
    :meth:`_mix_buffers` and, when they carry state, :meth:`_state_tensors` /
    :meth:`_setup` / :meth:`_extra_state`.

    Args (shared by all wrappers):
        optimizer: the torch optimizer to wrap (its update ``u`` is what the
            algorithm mixes); a ``TypeError`` names anything else.
        communicate_every: ``p >= 1``; communicate on every ``p``-th step, the
            steps between are local (``W = I``, no round advance).
        global_every: ``q``; every ``q``-th communicating step averages exactly
            over all ranks (one ``allreduce_``) instead of gossiping.
        broadcast_parameters: copy rank 0's parameters to every rank at
            construction (one ``broadcast_`` per dtype), so that all ranks start
            from the same point.
        check_parameters: verify with one small ``allgather`` that every rank
            wraps parameters of the same shapes and dtypes (``DecommError``
            naming the first differing parameter and rank otherwise).
        communicator: the mixing back-end (default: the decomm MPI runtime,
            ``decomm.init()`` required); :mod:`decomm.sim` passes its own.

    Parameters are moved into one flat buffer per (device, dtype), see
    :mod:`decomm.optim._flat`.  Only parameters held by the optimizer are mixed
    (module buffers such as BatchNorm running statistics are not).

    This class subclasses :class:`torch.optim.Optimizer` only so that
    ``isinstance`` checks (LR schedulers, AMP's GradScaler) accept it; it does
    not call ``Optimizer.__init__``: ``param_groups``, ``state`` and
    ``defaults`` are properties forwarding to the inner optimizer.
    """

    _comm_segments: ClassVar[int] = 1
    _stateful: ClassVar[bool] = True
    _can_prefetch: ClassVar[bool] = False

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        communicate_every: int = 1,
        global_every: int | None = None,
        broadcast_parameters: bool = True,
        check_parameters: bool = True,
        communicator: Communicator | None = None,
    ) -> None:
        if isinstance(optimizer, DecentralizedOptimizer):
            raise TypeError(
                f"{type(self).__name__} cannot wrap another decomm optimizer "
                f"({type(optimizer).__name__}); wrap the torch optimizer once"
            )
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"{type(self).__name__} wraps a torch.optim.Optimizer, got "
                f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"
            )
        self.communicate_every: int = _check_int("communicate_every", communicate_every)  # type: ignore[assignment]
        self.global_every: int | None = _check_int("global_every", global_every, True)
        self.optimizer = optimizer
        self._comm: Communicator = communicator if communicator is not None else MPICommunicator()
        self._check_parameters = check_parameters
        self._steps = 0
        self._comms = 0
        self._inflight: list[Handle] | None = None
        self._hook_handles: list[Any] = []
        self._buckets: list[Bucket] = []
        self._build(broadcast_parameters, list(range(len(optimizer.param_groups))))

    # ------------------------------------------------------------------ setup
    def _build(self, broadcast: bool, new_groups: list[int]) -> None:
        indexed = collect_params(self.optimizer.param_groups)
        if self._check_parameters:
            names = _param_names(self.optimizer.param_groups)
            check_same_parameters(
                self._comm, [p for _, p in indexed], [names[id(p)] for _, p in indexed]
            )
        self._buckets = build_buckets(indexed, self._comm_segments)
        if broadcast and self._comm.size() > 1:
            new = set(new_groups)
            with torch.no_grad():
                for k, b in enumerate(self._buckets):
                    if all(g in new for g in b.group_of):
                        self._comm.broadcast_(b.flat, 0, name=f"decomm.optim.bcast.{k}")
                    else:  # add_param_group: only the new params
                        for p, g in zip(b.params, b.group_of):
                            if g in new:
                                self._comm.broadcast_(p.data, 0, name="decomm.optim.bcast")
        self._setup()

    def _setup(self) -> None:
        """Allocate the algorithm's flat state (once)."""

    # ------------------------------------------------------- torch interface
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @property
    def communicator(self) -> Communicator:
        return self._comm

    @property
    def steps(self) -> int:
        """Number of completed :meth:`step` calls."""
        return self._steps

    @property
    def communication_steps(self) -> int:
        """Number of completed steps that communicated (gossip or global)."""
        return self._comms

    def __repr__(self) -> str:
        opts = f"communicate_every={self.communicate_every}"
        if self.global_every:
            opts += f", global_every={self.global_every}"
        return f"{type(self).__name__}({self.optimizer!r}, {opts})"

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError(f"{type(self).__name__} cannot be pickled; save state_dict() instead")

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def register_step_pre_hook(self, hook: Callable[..., Any]) -> Any:
        """Forwarded to the inner optimizer: runs around its local step."""
        return self.optimizer.register_step_pre_hook(hook)

    def register_step_post_hook(self, hook: Callable[..., Any]) -> Any:
        """Forwarded to the inner optimizer: runs around its local step."""
        return self.optimizer.register_step_post_hook(hook)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to the inner optimizer and re-flatten.

        All ranks must add groups with the same shapes (checked); the new
        parameters are broadcast from rank 0.  Wrappers that carry per-parameter
        state (gradient tracking, D², QG-DSGDm) accept new groups only before
        their first step.
        """
        if self._stateful and self._steps > 0:
            raise RuntimeError(
                f"{type(self).__name__}.add_param_group is only supported before "
                f"the first step (its trackers/iterates would have no history)"
            )
        self._wait_inflight()
        self.optimizer.add_param_group(param_group)
        self._build(True, [len(self.optimizer.param_groups) - 1])
        if self._hook_handles:
            self._remove_hooks()
            self._install_hooks()

    # ---------------------------------------------------------------- phases
    def _plan(self) -> Mix:
        """What the coming step does: local, gossip or global average."""
        if (self._steps + 1) % self.communicate_every != 0:
            return Mix.NONE
        if self.global_every is not None and (self._comms + 1) % self.global_every == 0:
            return Mix.GLOBAL
        return Mix.NEIGHBOR

    def _run_local(self, mix: Mix) -> None:
        for b in self._buckets:
            if not b.is_intact():
                b.repair()
        self._local_phase(mix)

    def _run_finish(self, mix: Mix) -> None:
        self._finish_phase(mix)
        self._steps += 1
        if mix is not Mix.NONE:
            self._comms += 1

    def _local_phase(self, mix: Mix) -> None:
        raise NotImplementedError

    def _finish_phase(self, mix: Mix) -> None:
        raise NotImplementedError

    def _mix_buffers(self) -> list[Tensor]:
        """The flat tensors the mix replaces by ``W(t) @ .`` (one per bucket)."""
        return [b.buffer for b in self._buckets]

    def _buffer_name(self, k: int) -> str:
        return f"decomm.optim.{type(self).__name__}.{k}"

    def _inner_step(self) -> None:
        self.optimizer.step()

    # ------------------------------------------------------------------ step
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One step: local phase, one mix per bucket, finish phase.

        ``closure`` (optional) is evaluated once, with grad enabled, before the
        step; optimizers that re-evaluate it (LBFGS) are not supported.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            mix = self._plan()
            if self._inflight is not None:
                self._wait_inflight()
            else:
                self._run_local(mix)
                if mix is Mix.NEIGHBOR:
                    for k, buf in enumerate(self._mix_buffers()):
                        self._comm.neighbor_allreduce_(buf, name=self._buffer_name(k))
                elif mix is Mix.GLOBAL:
                    for k, buf in enumerate(self._mix_buffers()):
                        self._comm.allreduce_(buf, average=True, name=self._buffer_name(k))
            self._run_finish(mix)
            if mix is Mix.NEIGHBOR:
                self._comm.advance_round()
        return loss

    def begin_communication(self) -> bool:
        """Start this step's exchange now, non-blocking; ``True`` if started.

        Only algorithms whose message does not depend on the new gradient can
        do this (``DSGD(combine_first=True)``); for the others, and on local or
        global-average steps, it returns ``False`` and :meth:`step` exchanges
        synchronously.  Parameters must not be modified between this call and
        :meth:`step`.
        """
        if self._inflight is not None:
            return True
        if not self._can_prefetch or not getattr(self._comm, "supports_nonblocking", False):
            return False
        mix = self._plan()
        if mix is not Mix.NEIGHBOR:
            return False
        with torch.no_grad():
            self._run_local(mix)
            self._inflight = [
                self._comm.neighbor_allreduce_nonblocking_(buf, name=self._buffer_name(k))
                for k, buf in enumerate(self._mix_buffers())
            ]
        return True

    def _wait_inflight(self) -> None:
        if self._inflight is not None:
            handles, self._inflight = self._inflight, None
            for h in handles:
                h.wait()

    def _install_hooks(self) -> None:
        def hook(_: Tensor) -> None:
            if self._inflight is None:
                self.begin_communication()

        for b in self._buckets:
            for p in b.params:
                if p.requires_grad:
                    self._hook_handles.append(p.register_post_accumulate_grad_hook(hook))

    def _remove_hooks(self) -> None:
        for h in self._hook_handles:
            h.remove()
        self._hook_handles = []

    def close(self) -> None:
        """Finish any exchange in flight and remove backward hooks."""
        self._wait_inflight()
        self._remove_hooks()

    # ------------------------------------------------------------ monitoring
    @property
    def params(self) -> list[Tensor]:
        """The wrapped parameters (views into the flat buckets)."""
        return [p for b in self._buckets for p in b.params]

    def flat_params(self) -> list[Tensor]:
        """One flat view of the parameters per bucket (no copy)."""
        return [b.flat for b in self._buckets]

    def consensus_distance(self, *, exact: bool = False) -> float:
        """(1/n) Σ_i ‖x_i − x̄‖² over ranks; see :func:`decomm.optim.consensus_distance`."""
        from .monitor import consensus_distance

        return consensus_distance(self.params, communicator=self._comm, exact=exact)

    # ------------------------------------------------------------ checkpoint
    def _state_tensors(self) -> dict[str, list[Tensor]]:
        """Named per-bucket state vectors saved by :meth:`state_dict`."""
        return {}

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The inner optimizer's state_dict plus a ``"decomm"`` entry.

        The entry holds the step and communication counters, the runtime's
        topology round, and copies of the algorithm's flat state (trackers,
        previous iterates, ...) so that ``load_state_dict`` resumes bitwise.
        Save the model's ``state_dict()`` alongside, as usual.
        """
        sd = self.optimizer.state_dict()
        sd["decomm"] = {
            "format": 1,
            "algorithm": type(self).__name__,
            "steps": self._steps,
            "communication_steps": self._comms,
            "round": self._comm.current_round(),
            "communicate_every": self.communicate_every,
            "global_every": self.global_every,
            "buckets": [(b.numel, str(b.dtype)) for b in self._buckets],
            "state": {k: [t.detach().clone() for t in v] for k, v in self._state_tensors().items()},
            "extra": dict(self._extra_state()),
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Restore a :meth:`state_dict`; also sets the runtime's topology round.

        A plain torch optimizer state_dict (no ``"decomm"`` entry) loads the
        inner optimizer only and leaves the wrapper's own state as is.
        """
        sd = dict(state_dict)
        dc = sd.pop("decomm", None)
        if dc is not None:
            if dc.get("algorithm") != type(self).__name__:
                raise ValueError(
                    f"state_dict was saved by {dc.get('algorithm')}, not {type(self).__name__}"
                )
            mine = [(b.numel, str(b.dtype)) for b in self._buckets]
            theirs = [tuple(x) for x in dc["buckets"]]
            if mine != theirs:
                raise ValueError(
                    f"state_dict has buckets {theirs} but this wrapper has {mine}: "
                    f"different model or param groups"
                )
        self._wait_inflight()
        self.optimizer.load_state_dict(sd)
        if dc is None:
            return
        with torch.no_grad():
            current = self._state_tensors()
            for name, saved in dc["state"].items():
                if name not in current:
                    raise ValueError(f"unexpected state {name!r} in state_dict")
                for dst, src in zip(current[name], saved):
                    dst.copy_(src)
        self._steps = int(dc["steps"])
        self._comms = int(dc["communication_steps"])
        self._load_extra_state(dc.get("extra", {}))
        self._comm.set_round(int(dc["round"]))


def iter_tensors(obj: Any) -> list[Tensor]:
    """Parameters of a module / wrapper / optimizer / iterable of tensors."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, DecentralizedOptimizer):
        return obj.params
    if isinstance(obj, torch.nn.Module):
        return list(obj.parameters())
    if isinstance(obj, torch.optim.Optimizer):
        return [p for _, p in collect_params(obj.param_groups)]
    if isinstance(obj, Iterable):
        out = []
        for t in obj:
            if isinstance(t, tuple) and len(t) == 2 and isinstance(t[1], Tensor):
                t = t[1]  # named_parameters()
            if not isinstance(t, Tensor):
                raise TypeError(f"expected tensors, got {type(t).__name__}")
            out.append(t)
        return out
    raise TypeError(
        f"expected a module, optimizer or iterable of tensors, got {type(obj).__name__}"
    )
