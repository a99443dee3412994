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

Mixed precision: the wrappers declare ``_step_supports_amp_scaling``, so
``torch.amp.GradScaler.step(opt)`` always calls :meth:`DecentralizedOptimizer.step`
(handing it ``opt.grad_scale`` and ``opt.found_inf``) instead of skipping the
step on the one rank whose gradients overflowed, which would desynchronise the
ranks for good.  The step agrees on ``found_inf`` with one 8-byte allreduce and
skips on every rank or on none; see :meth:`DecentralizedOptimizer.step`.
"""

from __future__ import annotations

import enum
import functools
import warnings
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from .. import _agree, _state, fault
from ..errors import DecommError, PeerFailureError
from . import comm as _comm
from ._flat import Bucket, build_buckets, collect_params
from .comm import Communicator, MPICommunicator, PendingExchange
from .monitor import consensus_distance

__all__ = ["BUFFER_MODES", "DecentralizedOptimizer", "Mix", "ModuleBuffers"]


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


def check_same_parameters(comm: Communicator, params: list[Tensor], names: list[str],
                          what: str = "parameter") -> None:
    """Raise ``DecommError`` on every rank if ranks wrap different parameters
    (``what`` names them in the message: ``"parameter"``, ``"module buffer"``).

    Cost: one ``allgather`` of two int64 per rank (count and a CRC32 of the
    shapes and dtypes); only on a mismatch a second ``allgather`` of a small
    shape table finds the first offending parameter and rank.
    """
    size = comm.size()
    if size <= 1:
        return
    sig = [(tuple(p.shape), str(p.dtype)) for p in params]
    table = _agree.gather_rows(comm.allgather, [len(params), _agree.digest(sig)],
                               "decomm.optim.signature")
    if not _agree.differing_ranks(table):
        return
    err = DecommError
    counts = [row[0] for row in table]
    if len(set(counts)) > 1:
        listing = ", ".join(f"rank {r}: {c}" for r, c in enumerate(counts))
        raise err(
            f"ranks wrap different numbers of {what}s ({listing}); every rank "
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
            dims = [*dims[: width - 3], _agree.digest(tuple(p.shape))]
        for d, v in enumerate(dims):
            rows[k, 2 + d] = int(v)
    allrows = comm.allgather(rows.reshape(-1), name="decomm.optim.shapes").reshape(
        size, len(params), width
    )
    for k in range(len(params)):
        for r in range(1, size):
            if not bool((allrows[r, k] == allrows[0, k]).all()):
                raise err(
                    f"{what} {names[k]} differs across ranks: "
                    f"{_describe(allrows[0, k])} on rank 0 but "
                    f"{_describe(allrows[r, k])} on rank {r}"
                )
    raise err(f"ranks wrap {what}s with different shapes or dtypes")


def _describe(row: Tensor) -> str:
    code, ndim = int(row[0]), int(row[1])
    dt = str(_DTYPE_CODES[code]) if 0 <= code < len(_DTYPE_CODES) else "other dtype"
    dims = [int(v) for v in row[2 : 2 + min(ndim, len(row) - 2)]]
    return f"shape {tuple(dims)} {dt}"


#: rounds inspected by :func:`worst_column_sum` for random families (no finite cycle)
RANDOM_ROUNDS_CHECKED = 8
#: |column sum − 1| above which a mixing matrix counts as not column-stochastic
COLUMN_SUM_TOL = 1e-9
_column_cache: dict[str, tuple[float, int, int] | None] = {}


def topology_name(topology: Any) -> str:
    return str(getattr(topology, "name", type(topology).__name__))


def topology_fingerprint(topology: Any) -> str | None:
    """``topology.fingerprint()`` where it has one (decomm topologies), else ``None``."""
    fp = getattr(topology, "fingerprint", None)
    if fp is None:
        return None
    try:
        return str(fp())
    except Exception:  # a duck-typed topology whose fingerprint needs more than it has
        return None


def worst_column_sum(topology: Any) -> tuple[float, int, int] | None:
    """The column sum of ``W(t)`` farthest from 1, as ``(sum, column, round)``.

    ``None`` if every inspected column sums to 1 within :data:`COLUMN_SUM_TOL`, or
    if the topology exposes neither ``sparse(t)`` nor ``matrix(t)``.  A finite cycle
    is inspected completely (O(nnz) per round with ``sparse``); a random family
    (``rounds is None``) on its first :data:`RANDOM_ROUNDS_CHECKED` rounds.  Cached
    per topology fingerprint, so re-creating wrappers over one topology is free.
    """
    key = topology_fingerprint(topology)
    if key is not None and key in _column_cache:
        return _column_cache[key]
    rounds = getattr(topology, "rounds", None)
    count = RANDOM_ROUNDS_CHECKED if rounds is None else int(rounds)
    worst: tuple[float, int, int] | None = None
    # a float32 W sums to 1 only within its own precision
    dev = max(COLUMN_SUM_TOL, float(getattr(topology, "stochastic_tol", 0.0)))
    for t in range(count):
        if hasattr(topology, "sparse"):
            cols = np.asarray(topology.sparse(t).col_sums(), dtype=np.float64)
        elif hasattr(topology, "matrix"):
            cols = np.asarray(topology.matrix(t), dtype=np.float64).sum(axis=0)
        else:
            return None
        j = int(np.argmax(np.abs(cols - 1.0)))
        if abs(cols[j] - 1.0) > dev:
            dev, worst = abs(cols[j] - 1.0), (float(cols[j]), j, t)
    if key is not None:
        _column_cache[key] = worst
    return worst


def _bucket_message_bytes(indexed: list[tuple[int, Tensor]], message_numel: Callable[[int], int]
                          ) -> list[tuple[torch.device, torch.dtype, int, int]]:
    """``(device, dtype, parameter count, message bytes)`` per flat bucket, as built."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for _, p in indexed:
        groups.setdefault((p.device, p.dtype), []).append(p.numel())
    out = []
    for (dev, dt), sizes in groups.items():
        itemsize = torch.empty((), dtype=dt).element_size()
        out.append((dev, dt, len(sizes), message_numel(sum(sizes)) * itemsize))
    return out


#: what ``buffers=`` does with the floating-point module buffers (see :class:`ModuleBuffers`)
BUFFER_MODES = ("mix", "average")
#: the keyword arguments every wrapper's constructor accepts for module buffers
_BUFFER_KWARGS = ("buffers", "buffer_mode", "buffer_every")


class ModuleBuffers:
    """The floating-point buffers of some modules, packed for one exchange per dtype.

    Holds the modules, not the tensors: every :meth:`pack` reads the buffers
    afresh (``module.<name>``), so a buffer that user code re-assigns (``bn.reset_
    running_stats()``, ``load_state_dict``, ``bn.running_mean = t``) is still the
    one mixed.  The buffers are *copied* into one flat tensor per (device, dtype)
    for the exchange and back after it, rather than re-pointed into flat storage
    as the parameters are: they are small (BatchNorm: two vectors per layer), and
    a copy keeps ``model.state_dict()`` and in-place updates by the forward pass
    exactly as without decomm.  Integer buffers (``num_batches_tracked``) are not
    included: they count local steps and stay local.

    Raises ``TypeError`` for anything but an ``nn.Module`` or a non-empty iterable
    of them, ``ValueError`` for an unknown mode or a bad ``every``.
    """

    def __init__(self, modules: Any, mode: str = "mix", every: int = 1,
                 owner: str = "DecentralizedOptimizer") -> None:
        if isinstance(modules, torch.nn.Module):
            mods = [modules]
        elif isinstance(modules, Iterable) and not isinstance(modules, (str, bytes, Tensor)):
            mods = list(modules)
            bad = [m for m in mods if not isinstance(m, torch.nn.Module)]
            if bad or not mods:
                what = f"a {type(bad[0]).__name__}" if bad else "an empty iterable"
                raise TypeError(f"{owner}: buffers= takes an nn.Module or a list of "
                                f"nn.Module, got {what}")
        else:
            raise TypeError(f"{owner}: buffers= takes an nn.Module or a list of nn.Module "
                            f"(whose floating-point buffers are mixed), got "
                            f"{type(modules).__name__}")
        if mode not in BUFFER_MODES:
            raise ValueError(f"{owner}: buffer_mode must be one of {BUFFER_MODES}, got "
                             f"{mode!r}")
        self.mode: str = mode
        self.every: int = _check_int("buffer_every", every)  # type: ignore[assignment]
        self.modules: list[torch.nn.Module] = mods
        # (module, attribute, qualified name) of every floating buffer, each once
        self.entries: list[tuple[torch.nn.Module, str, str]] = []
        seen: set[tuple[int, str]] = set()
        for k, mod in enumerate(mods):
            prefix = f"buffers[{k}]." if len(mods) > 1 else ""
            for mname, m in mod.named_modules(remove_duplicate=False):
                for key, b in m.named_buffers(recurse=False):
                    if (id(m), key) in seen or b is None or not b.is_floating_point():
                        continue
                    seen.add((id(m), key))
                    self.entries.append((m, key, prefix + (f"{mname}.{key}" if mname else key)))
        # one flat tensor per (device, dtype), allocated once, reused every exchange
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, t in enumerate(self.tensors()):
            groups.setdefault((t.device, t.dtype), []).append(i)
        self._groups: list[list[int]] = list(groups.values())
        self._shapes: list[tuple[torch.Size, torch.dtype, torch.device]] = [
            (t.shape, t.dtype, t.device) for t in self.tensors()]
        self.flats: list[Tensor] = [
            torch.zeros(sum(self._shapes[i][0].numel() for i in idx), dtype=dt, device=dev)
            for (dev, dt), idx in groups.items()]

    def tensors(self) -> list[Tensor]:
        """The buffers as the modules hold them now."""
        return [getattr(m, key) for m, key, _ in self.entries]

    @property
    def numel(self) -> int:
        return sum(f.numel() for f in self.flats)

    def names(self) -> list[str]:
        return [name for _, _, name in self.entries]

    def _current(self) -> list[Tensor]:
        ts = self.tensors()
        for t, (shape, dt, dev), (_, _, name) in zip(ts, self._shapes, self.entries):
            if not isinstance(t, Tensor) or (t.shape, t.dtype, t.device) != (shape, dt, dev):
                now = (f"{tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, Tensor)
                       else type(t).__name__)
                raise DecommError(
                    f"module buffer {name} changed after the optimizer was created (was "
                    f"{tuple(shape)} {dt} on {dev}, now {now}); call sync_buffers(...) "
                    f"again on every rank after changing the model")
        return ts

    def pack(self) -> list[Tensor]:
        """Copy the buffers into the flat tensors (one per (device, dtype)); return them."""
        ts = self._current()
        for flat, idx in zip(self.flats, self._groups):
            torch.cat([ts[i].detach().reshape(-1) for i in idx], out=flat)
        return self.flats

    def unpack(self) -> None:
        """Copy the (mixed) flat tensors back into the buffers, in place."""
        ts = self._current()
        for flat, idx in zip(self.flats, self._groups):
            dst = [ts[i] for i in idx]
            src = list(flat.split([t.numel() for t in dst]))
            torch._foreach_copy_(dst, [v.view_as(t) for v, t in zip(src, dst)])

    def plan(self, mix: Mix, comms_before: int) -> Mix:
        """What this step does with the buffers, given the step's own ``mix`` and the
        number of communicating steps completed before it.

        Only communicating steps touch the buffers (a local step is ``W = I`` for
        them too, and the fault-tolerance catch-up steps stay non-collective), and
        only every ``every``-th of them: ``"mix"`` then uses the step's own mix
        (``W(t)``, or the exact average on a ``global_every`` step), ``"average"``
        always the exact average.
        """
        if mix is Mix.NONE or (comms_before + 1) % self.every != 0:
            return Mix.NONE
        return Mix.GLOBAL if self.mode == "average" else mix

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "every": self.every, "buffers": len(self.entries),
                "numel": self.numel}


def _dense_communicator(comm: Any) -> Any:
    """The communicator that mixes with the topology's plain ``W(t)``.

    Wrappers whose communicator changes the mix (push-sum's column-stochastic
    sender scaling, ChocoSGD's compressed payloads) wrap an :class:`MPICommunicator`
    as ``_inner``; the module buffers bypass that and gossip with ``W(t)`` itself
    (running statistics need no push-sum de-biasing, nor compression).
    """
    inner = getattr(comm, "_inner", None)
    return inner if isinstance(inner, MPICommunicator) else comm


_BUFFER_DOC = """

    Module buffers: ``buffers=model`` (or a list of modules) with
    ``buffer_mode="mix"`` (gossip them with ``W(t)``, default) or ``"average"``
    (exact allreduce mean) and ``buffer_every=k`` also exchanges the model's
    floating-point buffers (BatchNorm running statistics) every ``k``-th
    communicating step; default ``None``: they stay local.  See
    :meth:`DecentralizedOptimizer.sync_buffers`.
"""


def _with_buffer_kwargs(init: Callable[..., None]) -> Callable[..., None]:
    """Wrap a wrapper's ``__init__`` so it accepts ``buffers=``, ``buffer_mode=``,
    ``buffer_every=`` (applied by :meth:`DecentralizedOptimizer.sync_buffers` once
    the outermost constructor has finished).  The signature shown by ``help()`` and
    Sphinx stays the wrapper's own (``functools.wraps``); the class docstring
    documents the three keywords."""

    @functools.wraps(init)
    def __init__(self: DecentralizedOptimizer, *args: Any, **kwargs: Any) -> None:
        opts = {k: kwargs.pop(k) for k in _BUFFER_KWARGS if k in kwargs}
        mb = None
        if opts.get("buffers") is not None:  # validate before anything is built or sent
            mb = type(self)._module_buffers_for(opts["buffers"], opts.get("buffer_mode", "mix"),
                                                opts.get("buffer_every", 1))
        elif set(opts) - {"buffers"}:
            raise ValueError(f"{type(self).__name__}: buffer_mode / buffer_every need "
                             f"buffers= (the modules whose buffers to exchange)")
        init(self, *args, **kwargs)
        if mb is not None:
            self._attach_buffers(mb)

    __init__._decomm_buffer_kwargs = True  # type: ignore[attr-defined]
    return __init__


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
    :mod:`decomm.optim._flat`.  By default only parameters held by the optimizer
    are mixed: module buffers such as BatchNorm running statistics stay
    rank-local, as in BlueFog (measure their disagreement with
    ``decomm.optim.consensus_distance(model, include_buffers=True)``).

    Module buffers (every wrapper's constructor, or :meth:`sync_buffers` later):
        buffers: an ``nn.Module`` or a list of them (default ``None``: buffers stay
            local).  Their floating-point buffers ``b`` (BatchNorm's ``running_mean``
            and ``running_var``; integer ones such as ``num_batches_tracked`` stay
            local) are exchanged on the communicating steps, one flat tensor and
            one extra collective per (device, dtype), before the parameters.
        buffer_mode: ``"mix"`` (default): ``b_i ← Σ_j W(t)[i, j] b_j``, the same
            round as the parameters (the exact average on ``global_every``
            steps); ``"average"``: ``b_i ← (1/n) Σ_j b_j``, one ``allreduce_``.
        buffer_every: ``k >= 1``: only every ``k``-th communicating step
            exchanges the buffers (with ``communicate_every=p``: every ``k p``
            steps).

    Each flat message (one per (device, dtype), of ``numel`` times the number of
    state segments the algorithm sends) may be of any size: past 2 GiB the C++ core
    sends it as several messages. A lower limit can be set in
    :data:`decomm.optim.comm.MAX_MESSAGE_BYTES`: the constructor and
    :meth:`add_param_group` then raise ``DecommError`` naming the rank, the dtype
    group and its size, before anything is sent or stepped.

    Mixed precision: ``torch.amp.GradScaler`` (or :class:`decomm.amp.GradScaler`)
    works unchanged, ``scaler.step(opt)`` included; see :meth:`step`.

    This class subclasses :class:`torch.optim.Optimizer` only so that
    ``isinstance`` checks (LR schedulers, AMP's GradScaler) accept it; it does
    not call ``Optimizer.__init__``: ``param_groups``, ``state`` and
    ``defaults`` are properties forwarding to the inner optimizer.
    """

    _comm_segments: ClassVar[int] = 1
    #: elements after the segments in every bucket's buffer (see build_buckets)
    _comm_extra: ClassVar[int] = 0
    _stateful: ClassVar[bool] = True
    _can_prefetch: ClassVar[bool] = False
    #: GradScaler calls step() even after an overflow, handing over grad_scale and
    #: found_inf, so that step() can make the skip collective (see step()).
    _step_supports_amp_scaling: ClassVar[bool] = True
    #: warn when W(t) is not column-stochastic (algorithms that need doubly stochastic W)
    _check_column_sums: ClassVar[bool] = False
    #: why decomm.sim cannot run this wrapper (None: it can)
    _simulation_unsupported: ClassVar[str | None] = None
    #: why this wrapper cannot exchange module buffers (None: it can; see sync_buffers)
    _buffers_unsupported: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # One implementation for every wrapper: each constructor accepts buffers=,
        # buffer_mode=, buffer_every= without declaring them (see sync_buffers).
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None and not getattr(init, "_decomm_buffer_kwargs", False):
            cls.__init__ = _with_buffer_kwargs(init)  # type: ignore[method-assign]
        if cls.__doc__ and cls.__module__.startswith("decomm.") and \
                "sync_buffers" not in cls.__doc__:
            cls.__doc__ = cls.__doc__.rstrip() + _BUFFER_DOC

    @_with_buffer_kwargs
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
        self._inflight: list[PendingExchange] | None = None
        self._hook_handles: list[Any] = []
        self._buckets: list[Bucket] = []
        self._columns_checked: Any = None
        #: found_inf as agreed by all ranks in the last GradScaler step (None: no scaler)
        self._amp_found_inf: bool | None = None
        self._catch_up = 0  # local steps left to reach the survivors' step after a loss
        self._deferred_failure: PeerFailureError | None = None
        self._local_ran = False  # this step's local phase has run (for a failure mid-step)
        self._module_buffers: ModuleBuffers | None = None  # buffers=: see sync_buffers
        self._build(broadcast_parameters, list(range(len(optimizer.param_groups))))
        if self._check_column_sums:
            self._warn_if_not_column_stochastic()
        st = _state.get()
        on_mpi = isinstance(self._comm, MPICommunicator) or isinstance(
            getattr(self._comm, "_inner", None), MPICommunicator)  # push-sum, CHOCO, windows
        if st is not None and st.fault_tolerant and on_mpi:
            fault.register(self)

    # ------------------------------------------------------------------ setup
    def _check_new_params(self, indexed: list[tuple[int, Tensor]]) -> None:
        """Same parameters on every rank, messages under the limit; moves nothing."""
        if self._check_parameters:
            names = _param_names(self.optimizer.param_groups)
            check_same_parameters(
                self._comm, [p for _, p in indexed], [names[id(p)] for _, p in indexed]
            )
        self._check_message_sizes(indexed)

    def _build(self, broadcast: bool, new_groups: list[int], checked: bool = False) -> None:
        indexed = collect_params(self.optimizer.param_groups)
        if not checked:
            self._check_new_params(indexed)  # before anything moves, is sent or stepped
        self._buckets = build_buckets(indexed, self._comm_segments, self._comm_extra)
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

    def _message_numel(self, numel: int) -> int:
        """Elements of the message that mixes a bucket of ``numel`` parameters."""
        return numel * self._comm_segments

    def _check_message_sizes(self, indexed: list[tuple[int, Tensor]]) -> None:
        """Raise ``DecommError`` if a bucket's message exceeds the per-message limit.

        Runs before the parameters are moved, broadcast or stepped, so nothing
        has changed when it raises.  Every rank raises (the parameter check has
        made the shapes equal).  Communicators that do not go through MPI (the
        simulator's, ``limits_message_size = False``) and single ranks skip it.
        """
        comm = self._comm
        if comm.size() <= 1 or not getattr(comm, "limits_message_size", True):
            return
        limit = _comm.MAX_MESSAGE_BYTES
        for dev, dt, count, nbytes in _bucket_message_bytes(indexed, self._message_numel):
            if nbytes > limit:
                raise DecommError(
                    f"{type(self).__name__} on rank {comm.rank()}: the {count} {dt} "
                    f"parameters on {dev} form one flat message of {nbytes} bytes "
                    f"({nbytes / 2**30:.2f} GiB), over the per-message limit of {limit} "
                    f"bytes; every (device, dtype) group is one message, so split the "
                    f"model's parameters over several wrappers (each wrapping its own "
                    f"torch optimizer over a part of the model) so that each part's "
                    f"{dt} parameters stay under the limit (param groups of one wrapper "
                    f"share one message per dtype and do not help)"
                )

    def _warn_if_not_column_stochastic(self) -> None:
        """Warn once per topology, on rank 0 only, if some W(t) column does not sum to 1."""
        topo = self._comm.topology()
        if topo is None or topo is self._columns_checked:
            return
        self._columns_checked = topo
        if self._comm.rank() != 0:
            return
        worst = worst_column_sum(topo)
        if worst is None:
            return
        total, j, t = worst
        name = type(self).__name__
        warnings.warn(
            f"{name} needs a doubly stochastic mixing matrix, but column {j} of W({t}) of "
            f"the topology {topology_name(topo)} sums to {total:.6g}, not 1: the ranks "
            f"then converge to a weighted average biased towards the nodes whose columns "
            f"sum to more than 1 (GradientTracking converges to a wrong point). Use "
            f"PushSum for directed graphs, or a W whose columns also sum to 1.",
            UserWarning,
            stacklevel=4,
        )

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
        try:
            self._check_new_params(collect_params(self.optimizer.param_groups))
        except Exception:
            self.optimizer.param_groups.pop()  # nothing moved yet: undo, keep the buckets
            raise
        self._build(True, [len(self.optimizer.param_groups) - 1], checked=True)
        if self._hook_handles:
            self._remove_hooks()
            self._install_hooks()

    # ---------------------------------------------------------------- phases
    def _plan(self) -> Mix:
        """What the coming step does: local, gossip or global average."""
        if self._catch_up > 0 or (self._steps + 1) % self.communicate_every != 0:
            return Mix.NONE
        if self.global_every is not None and (self._comms + 1) % self.global_every == 0:
            return Mix.GLOBAL
        return Mix.NEIGHBOR

    def _run_local(self, mix: Mix) -> None:
        self._local_ran = True
        if self._check_column_sums and mix is Mix.NEIGHBOR:
            self._warn_if_not_column_stochastic()  # set_topology may have changed it
        for b in self._buckets:
            if not b.is_intact():
                b.repair()
        self._local_phase(mix)

    def _run_finish(self, mix: Mix) -> None:
        self._finish_phase(mix)
        self._local_ran = False
        self._steps += 1
        if mix is not Mix.NONE:
            self._comms += 1
        elif self._catch_up > 0:
            self._catch_up -= 1

    # ------------------------------------------------------ surviving a loss
    def _survive(self, err: PeerFailureError) -> None:
        """A peer failed during this step (fault tolerance on): finish the step as a
        local one, recover on the survivors, and restore what the algorithm relies on.

        The exchange that failed changed nothing (a neighbour op writes its output only
        once every message has arrived), so the step's local update stands as a local
        step. :func:`decomm.recover` agrees on the survivors' maximum step and
        communication counts; a rank behind it takes local steps until it gets there,
        so that every survivor makes the same exchanges from then on.
        """
        if not _state.require().fault_tolerant:
            raise err
        self._inflight = None  # failed with the old communicator
        if self._local_ran:
            self._run_finish(Mix.NONE)
        fault.recover()

    def _fault_progress(self) -> list[int]:
        return [self._steps, self._comms]

    def _fault_resume(self, agreed: list[int]) -> None:
        """Called by :func:`decomm.recover` with the survivors' maximum counters."""
        steps, comms = agreed
        self._catch_up = max(0, steps - self._steps)
        # Local catch-up steps do not count as communication; start them from the
        # count the furthest survivor reached, so that global_every stays in step.
        self._comms = comms
        self._inflight = None
        self._restart_after_loss()

    def _restart_after_loss(self) -> None:
        """Restore the algorithm's invariants on the survivors (default: nothing to do:
        the iterate and the inner optimizer's state, e.g. momentum, are local)."""

    def _local_phase(self, mix: Mix) -> None:
        raise NotImplementedError

    def _finish_phase(self, mix: Mix) -> None:
        raise NotImplementedError

    def _mix_buffers(self) -> list[Tensor]:
        """The flat tensors the mix replaces by ``W(t) @ .`` (one per bucket)."""
        return [b.buffer for b in self._buckets]

    def _exchange_with_neighbors(self, nonblocking: bool) -> list[PendingExchange]:
        """One gossip round: every mix buffer replaced by ``W(t) @ .`` (in place).

        Returns the handles when ``nonblocking`` (the exchange is then in flight)."""
        bufs = self._mix_buffers()
        if nonblocking:
            return [self._comm.neighbor_allreduce_nonblocking_(buf, name=self._buffer_name(k))
                    for k, buf in enumerate(bufs)]
        for k, buf in enumerate(bufs):
            self._comm.neighbor_allreduce_(buf, name=self._buffer_name(k))
        return []

    def _buffer_name(self, k: int) -> str:
        return f"decomm.optim.{type(self).__name__}.{k}"

    def _inner_step(self) -> None:
        self.optimizer.step()

    # ------------------------------------------------------------------ step
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One step: local phase, one mix per bucket, finish phase.

        ``closure`` (optional) is evaluated once, with grad enabled, before the
        step; optimizers that re-evaluate it (LBFGS) are not supported.

        Under ``torch.amp.GradScaler`` (``scaler.step(opt)``; the scaler sets
        ``opt.grad_scale`` = the scale ``S`` or ``None`` if ``scaler.unscale_``
        already ran, and ``opt.found_inf`` = this rank's overflow flag):

        * all ranks agree on ``found_inf`` with one allreduce of one float64
          through the wrapper's communicator (also on local steps, whose step
          counter must stay in step too);
        * if any rank overflowed, every rank skips the whole step: no local
          update, no exchange (an exchange already started by
          ``begin_communication`` is completed and its result dropped), step
          counters and topology round unchanged;
        * otherwise the gradients are multiplied by ``1/S`` (the scaler's own
          unscaling kernel, so bitwise what ``scaler.unscale_`` gives) and the
          step runs as usual.

        ``scaler.update()`` then backs off the scale on the rank that overflowed
        only; :class:`decomm.amp.GradScaler` backs it off on every rank, keeping
        the scales identical.  Every rank must use the scaler the same way (all
        or none, same ``enabled``), or the agreement allreduce does not pair up.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            while True:
                try:
                    self._step_body()
                    break
                except PeerFailureError as err:
                    ran = self._local_ran
                    self._survive(err)
                    if ran:  # the step ran as a local one; else run it on the survivors
                        break
        return loss

    def _step_body(self) -> None:
        if self._deferred_failure is not None:  # from begin_communication (a backward hook)
            err, self._deferred_failure = self._deferred_failure, None
            raise err
        prefetched = self._inflight is not None
        if prefetched:
            self._wait_inflight()
        if self._amp_skip():
            return
        mix = self._plan()
        # Before the parameters (and before the local phase): a peer failure in it
        # leaves the step untouched, and step() re-runs it on the survivors.
        self._exchange_module_buffers(mix)
        if not prefetched:
            self._run_local(mix)
            if mix is Mix.NEIGHBOR:
                self._exchange_with_neighbors(nonblocking=False)
            elif mix is Mix.GLOBAL:
                for k, buf in enumerate(self._mix_buffers()):
                    self._comm.allreduce_(buf, average=True, name=self._buffer_name(k))
        self._run_finish(mix)
        if mix is Mix.NEIGHBOR:
            self._comm.advance_round()

    # --------------------------------------------------------- module buffers
    def sync_buffers(self, buffers: Any, *, mode: str = "mix", every: int = 1) -> None:
        """Exchange the floating-point buffers of ``buffers`` along with the parameters.

        ``buffers``: an ``nn.Module`` (usually the model) or a list of them;
        ``None`` turns the exchange off again (buffers stay local, the default).
        On every ``every``-th communicating step, before the parameters, each
        (device, dtype) group of the floating-point buffers is copied into one
        flat tensor, exchanged, and copied back:

        * ``mode="mix"``: ``b_i ← Σ_j W(t)[i, j] b_j`` with the step's own round
          ``W(t)`` (one ``neighbor_allreduce_`` per dtype; on a ``global_every``
          step the exact average).  Push-sum wrappers and ChocoSGD mix the
          buffers with the topology's plain ``W(t)`` too: running statistics
          need neither push-sum de-biasing nor compression.
        * ``mode="average"``: ``b_i ← (1/n) Σ_j b_j`` (one ``allreduce_`` per
          dtype), the exact average - what evaluating the consensus model wants.

        Local steps (``communicate_every``) leave the buffers local, as they do
        the parameters.  Integer buffers (``num_batches_tracked``) always stay
        local.  The buffers themselves are saved by ``model.state_dict()``, and
        the schedule follows the wrapper's communication counter, which
        :meth:`state_dict` saves, so a resumed run exchanges on the same steps.

        Collective when the parameters are checked (``check_parameters=True``,
        the default): one small ``allgather`` verifies that every rank has
        buffers of the same shapes and dtypes (``DecommError`` otherwise).  Every
        rank must pass the same ``mode`` and ``every``.  ``TypeError`` for
        anything but modules, ``ValueError`` for a bad ``mode`` or ``every``, or
        for a wrapper that cannot exchange buffers (``AsyncGossip``, whose steps
        are not collective).
        """
        if buffers is None:
            self._module_buffers = None
            return
        self._attach_buffers(self._module_buffers_for(buffers, mode, every))

    @classmethod
    def _module_buffers_for(cls, buffers: Any, mode: str, every: int) -> ModuleBuffers:
        if cls._buffers_unsupported:
            raise ValueError(f"{cls.__name__} cannot exchange module buffers (buffers=): "
                             f"{cls._buffers_unsupported}")
        return ModuleBuffers(buffers, mode, every, owner=cls.__name__)

    def _attach_buffers(self, mb: ModuleBuffers) -> None:
        if self._check_parameters:
            check_same_parameters(self._comm, mb.tensors(), mb.names(), what="module buffer")
        self._module_buffers = mb

    @property
    def module_buffers(self) -> ModuleBuffers | None:
        """What :meth:`sync_buffers` set up (``None``: module buffers stay local)."""
        return self._module_buffers

    def _buffer_plan(self, mix: Mix) -> Mix:
        """What this step does with the module buffers (``Mix.NONE``: nothing)."""
        mb = self._module_buffers
        return Mix.NONE if mb is None else mb.plan(mix, self._comms)

    def _exchange_module_buffers(self, mix: Mix) -> None:
        mb = self._module_buffers
        bmix = self._buffer_plan(mix)
        if mb is None or bmix is Mix.NONE or self._comm.size() <= 1:
            return
        comm = _dense_communicator(self._comm)
        for k, flat in enumerate(mb.pack()):
            name = f"decomm.optim.{type(self).__name__}.buffers.{k}"
            if bmix is Mix.NEIGHBOR:
                comm.neighbor_allreduce_(flat, name=name)
            else:
                comm.allreduce_(flat, average=True, name=name)
        mb.unpack()  # only once every exchange has completed

    def _amp_skip(self) -> bool:
        """GradScaler protocol: agree on overflow across ranks, unscale; True = skip."""
        found_inf = getattr(self, "found_inf", None)
        self._amp_found_inf = None
        if found_inf is None:  # not called by an enabled GradScaler
            return False
        grad_scale = getattr(self, "grad_scale", None)
        skip = self._agree_found_inf(bool(float(found_inf) > 0.0))
        self._amp_found_inf = skip
        if skip:
            return True
        if grad_scale is not None:
            inv = grad_scale.double().reciprocal().float()
            per_key: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
            for p in self.params:
                if p.grad is not None:
                    per_key.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
            dummy: dict[torch.device, Tensor] = {}
            for (dev, _), grads in per_key.items():
                if dev not in dummy:
                    dummy[dev] = torch.zeros((), dtype=torch.float32, device=dev)
                torch._amp_foreach_non_finite_check_and_unscale_(grads, dummy[dev], inv.to(dev))
        return False

    def _agree_found_inf(self, found_inf: bool) -> bool:
        """``True`` iff ``found_inf`` is true on any rank (collective: one float64 allreduce)."""
        if self._comm.size() <= 1:
            return found_inf
        flag = torch.tensor([1.0 if found_inf else 0.0], dtype=torch.float64)
        self._comm.allreduce_(flag, average=True, name="decomm.optim.amp.found_inf")
        return bool(float(flag[0]) > 0.0)

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
            try:
                self._inflight = self._exchange_with_neighbors(nonblocking=True)
            except PeerFailureError as err:  # raised in a backward hook: step() handles it
                self._inflight = []
                self._deferred_failure = err
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

        return consensus_distance(self.params, communicator=self._comm, exact=exact)

    # ------------------------------------------------------------ checkpoint
    def _state_tensors(self) -> dict[str, list[Tensor]]:
        """Named per-bucket state vectors saved by :meth:`state_dict`."""
        return {}

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        pass

    def _world(self) -> dict[str, Any]:
        topo = self._comm.topology()
        return {
            "size": self._comm.size(),
            "rank": self._comm.rank(),
            "topology": None if topo is None else topology_name(topo),
            "topology_fingerprint": None if topo is None else topology_fingerprint(topo),
        }

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The inner optimizer's state_dict plus a ``"decomm"`` entry.

        The entry holds the step and communication counters, the runtime's
        topology round, copies of the algorithm's flat state (trackers,
        previous iterates, ...) so that ``load_state_dict`` resumes bitwise, and
        the world it was saved in: ``"size"``, ``"rank"``, ``"topology"`` (name)
        and ``"topology_fingerprint"``.  The algorithm state is this rank's, so
        save one file per rank.  Save the model's ``state_dict()`` alongside, as
        usual.
        """
        sd = self.optimizer.state_dict()
        sd["decomm"] = {
            "format": 2,
            "algorithm": type(self).__name__,
            "steps": self._steps,
            "communication_steps": self._comms,
            "round": self._comm.current_round(),
            "communicate_every": self.communicate_every,
            "global_every": self.global_every,
            "buckets": [(b.numel, str(b.dtype)) for b in self._buckets],
            "state": {k: [t.detach().clone() for t in v] for k, v in self._state_tensors().items()},
            "extra": dict(self._extra_state()),
            **self._world(),
        }
        return sd

    def load_state_dict(  # type: ignore[override]
        self, state_dict: dict[str, Any], *, strict_world: bool = True
    ) -> None:
        """Restore a :meth:`state_dict`; also sets the runtime's topology round.

        A plain torch optimizer state_dict (no ``"decomm"`` entry) loads the
        inner optimizer only and leaves the wrapper's own state as is.

        World checks (state_dicts that record their world; older ones load as
        before):

        * saved at another world size, or by another rank: ``ValueError`` naming
          both, unless ``strict_world=False``;
        * saved under another topology (different fingerprint) at the same size
          and rank: a ``UserWarning`` (rank 0 only) and a normal load, round
          included - changing the topology on resume is legitimate, but the
          trackers were built under the old one.

        ``strict_world=False`` on a different size or rank is the deliberate
        "resume on another world" path: it loads the inner optimizer's state
        (momenta, Adam moments: per-parameter, meaningful anywhere) and the step
        counters, but **re-initialises the algorithm's per-rank state** as a new
        wrapper would (gradient tracker ``y^0 = g^0`` at the next step, D²'s
        first step uncorrected, push-sum weight 1, QG momentum 0) and does not
        restore the topology round (the current topology keeps its own).  Those
        states satisfy the algorithms' invariants (e.g. ``Σ_i y_i = Σ_i g_i``)
        only together with the other ranks of the saved world, so carrying one
        rank's copy into another world would silently bias the run.  Load the
        model's parameters as you see fit (e.g. every rank rank 0's, or the
        average) before continuing.  On the same size and rank,
        ``strict_world=False`` is a normal load.
        """
        sd = dict(state_dict)
        dc = sd.pop("decomm", None)
        other_world = False
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
            other_world = self._check_world(dc, strict_world)
        self._wait_inflight()
        self.optimizer.load_state_dict(sd)
        if dc is None:
            return
        self._steps = int(dc["steps"])
        self._comms = int(dc["communication_steps"])
        if other_world:
            if self._state_tensors():
                self._setup()  # fresh algorithm state, as at construction
            return
        with torch.no_grad():
            current = self._state_tensors()
            for name, saved in dc["state"].items():
                if name not in current:
                    raise ValueError(f"unexpected state {name!r} in state_dict")
                for dst, src in zip(current[name], saved):
                    dst.copy_(src)
        self._load_extra_state(dc.get("extra", {}))
        self._comm.set_round(int(dc["round"]))

    def _check_world(self, dc: dict[str, Any], strict: bool) -> bool:
        """Compare the saved world with this one; True = load across worlds."""
        if "size" not in dc:  # saved before the world was recorded (format 1)
            return False
        now = self._world()
        name = type(self).__name__
        if (dc["size"], dc["rank"]) != (now["size"], now["rank"]):
            if strict:
                raise ValueError(
                    f"{name}.load_state_dict on rank {now['rank']} of {now['size']}: the "
                    f"state_dict was saved by rank {dc['rank']} of {dc['size']} (topology "
                    f"{dc['topology']}); its trackers and round belong to that world. Load "
                    f"each rank's own file, or pass strict_world=False to load the inner "
                    f"optimizer's state and the step counters only and restart the "
                    f"algorithm's state (see load_state_dict)"
                )
            return True
        fp_then, fp_now = dc.get("topology_fingerprint"), now["topology_fingerprint"]
        if fp_then is not None and fp_now is not None and fp_then != fp_now and now["rank"] == 0:
            warnings.warn(
                f"{name}.load_state_dict: the state_dict was saved under the topology "
                f"{dc['topology']} but the current topology is {now['topology']}; loading "
                f"it anyway (round {dc['round']} included)",
                UserWarning,
                stacklevel=3,
            )
        return False
