"""BlueFog 0.3's distributed optimizers (``bluefog.torch.optimizers``) on decomm.

The factories keep BlueFog's names and signatures
(``Distributed...Optimizer(optimizer, model, ..., num_steps_per_communication=1)``)
and return a decomm optimizer wrapper that holds the given torch optimizer; the
algorithms are decomm's:

* ``DistributedAdaptThenCombineOptimizer``: :class:`decomm.optim.DSGD`;
* ``DistributedAdaptWithCombineOptimizer``: ``DSGD(combine_first=True)``;
* ``CommunicationType.allreduce``: the wrappers' global-average step;
* ``CommunicationType.hierarchical_neighbor_allreduce``:
  :func:`decomm.hierarchical.hierarchical_neighbor_allreduce_`;
* ``DistributedGradientAllreduceOptimizer``: one ``allreduce_`` of the gradients
  per dtype per step;
* ``DistributedWinPutOptimizer``, ``DistributedPullGetOptimizer``,
  ``DistributedPushSumOptimizer``: :mod:`decomm.win` windows.

Writing ``x`` for a rank's parameters, ``u`` for the update the wrapped optimizer
computes from the gradient (``u = lr * g`` for SGD) and ``W`` for this step's
mixing weights (``W[i, i]`` = ``self_weight``, ``W[i, j]`` = ``src_weights[j]``):

* adapt-then-combine (ATC; Sayed, "Adaptation, learning, and optimization over
  networks", 2014): ``x <- W (x - u)``;
* adapt-with-combine (AWC; Lian et al., "Can decentralized algorithms outperform
  centralized algorithms?", NeurIPS 2017): ``x <- W x - u``, the exchange of ``x``
  overlapping the backward pass.

BlueFog's per-step knobs are honoured at every exchange: ``opt.self_weight``,
``opt.src_weights`` (``{rank: weight}``), ``opt.dst_weights`` (``{rank: weight}`` or
a list of ranks, weight 1), ``opt.src_machine_weights`` / ``opt.dst_machine_weights``
(hierarchical) and ``opt.enable_topo_check`` (check with one ``allgather`` that the
ranks' ``dst_weights`` and ``src_weights`` describe the same edges; a
``ValueError`` on every rank names the mismatched edges).  With all knobs ``None``
the weights are BlueFog's defaults: the graph's weights if it was set with
``is_weighted=True``, otherwise the uniform average ``1 / (in-degree + 1)`` over
this rank and its in-neighbours.  The weight arguments are translated by the same
code as ``bf.neighbor_allreduce``'s.

``num_steps_per_communication = J`` has BlueFog's meaning: it counts *passes*
between exchanges - training-mode forward passes of the model (AWC and the window
optimizers) or backward passes (ATC) - not steps.  A ``step()`` after ``J`` passes
communicates, an earlier one is a local update.  So ``J`` micro-batches of
gradient accumulation followed by one ``step()`` communicate at every step
(BlueFog's "scenario 1"), and ``J`` iterations of forward/backward/step
communicate at every ``J``-th step (its "scenario 2", like decomm's
``communicate_every=J``).  More than ``J`` passes before a ``step()`` warns once
("Unexpected behavior: ..."), as BlueFog does.

Differences from BlueFog, on purpose:

* the returned object is a decomm wrapper (a ``torch.optim.Optimizer`` that
  forwards ``param_groups``, ``state``, ``state_dict`` to the optimizer it holds),
  not an instance of a dynamically created subclass of your optimizer's class:
  ``isinstance(opt, torch.optim.Adam)`` is false;
* parameters live in one flat buffer per dtype (``p.data`` becomes a view), and
  one message per dtype is exchanged instead of one per parameter;
* ATC applies the wrapped optimizer's own ``step()`` (any optimizer works,
  ``register_step_function`` is optional) to the accumulated gradient ``p.grad``;
  BlueFog's ATC hook applies its re-implementation of SGD/Adam/... to the
  gradient of the ``J``-th backward pass alone, dropping the first ``J - 1``
  micro-batches of an accumulation;
* :func:`DistributedPushSumOptimizer` carries the push-sum weight from step to
  step (Kempe et al. 2003; Assran et al. 2019), so it converges to the exact
  average on directed graphs; BlueFog resets the weight to 1 before every send,
  which makes it plain row-normalised gossip;
* ``synchronize()`` / ``skip_synchronize()`` exist on
  :func:`DistributedGradientAllreduceOptimizer` only (the Horovod pattern for
  gradient clipping); the parameter-mixing optimizers exchange inside ``step()``.
  ``turn_on_timeline()`` records one forward and one backward span per model
  (BlueFog: per parameter) in decomm's timeline, which records every exchange too.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from ... import hierarchical, ops, runtime, win
from ...errors import DecommError
from ...optim import DSGD
from ...optim._base import DecentralizedOptimizer, Mix
from ...optim.comm import MPICommunicator, PendingExchange
from . import _basics, _ops

__all__ = [
    "CommunicationType",
    "DistributedAdaptThenCombineOptimizer",
    "DistributedAdaptWithCombineOptimizer",
    "DistributedAllreduceOptimizer",
    "DistributedGradientAllreduceOptimizer",
    "DistributedHierarchicalNeighborAllreduceOptimizer",
    "DistributedNeighborAllreduceOptimizer",
    "DistributedPullGetOptimizer",
    "DistributedPushSumOptimizer",
    "DistributedWinPutOptimizer",
]


class CommunicationType(enum.Enum):
    """What the parameter-mixing optimizers exchange (BlueFog's enum, same values)."""

    neighbor_allreduce = "neighbor.allreduce"
    hierarchical_neighbor_allreduce = "hierarchical.neighbor.allreduce"
    allreduce = "allreduce"
    empty = "empty"


_TOO_MANY_PASSES = (
    "Unexpected behavior: {what} ran more than num_steps_per_communication={J} times "
    "before optimizer.step(). The exchange is decided by counting these passes (BlueFog's "
    "meaning of num_steps_per_communication); call step() after every {J} {what}, or "
    "change num_steps_per_communication."
)


# --------------------------------------------------------------------- checks
def _check_models(optimizer: Any, model: Any, who: str) -> list[torch.nn.Module]:
    """The model(s) as a list; every parameter of ``optimizer`` must belong to them."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"{who}: optimizer must be a torch.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")
    models = [model] if isinstance(model, torch.nn.Module) else model
    if not isinstance(models, (list, tuple)) or not models or \
            not all(isinstance(m, torch.nn.Module) for m in models):
        raise TypeError(f"{who}: model must be a torch.nn.Module or a list of them, got "
                        f"{type(model).__name__}")
    named = list(itertools.chain(*[m.named_parameters() for m in models]))
    names = [k for k, _ in named]
    dups = sorted({k for k in names if names.count(k) > 1})
    if dups:
        raise ValueError(f"{who}: parameter names must be unique across the models; "
                         f"duplicates: {', '.join(dups)}")
    owned = {id(p) for _, p in named}
    stray = [k for g in optimizer.param_groups for k, p in enumerate(g["params"])
             if id(p) not in owned]
    if stray:
        raise ValueError(f"{who}: the optimizer holds {len(stray)} parameter(s) that are not "
                         "parameters of the model(s) given; pass the model the optimizer "
                         "was built for")
    return list(models)


def _check_passes(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"num_steps_per_communication must be a positive int, got {value!r}")
    return int(value)


def _check_type(value: Any) -> CommunicationType:
    if not isinstance(value, CommunicationType):
        raise TypeError(f"communication_type must be a CommunicationType, got {value!r}")
    return value


def _uniform_or_graph_weights(ins: list[int]) -> tuple[float, dict[int, float]]:
    """BlueFog's default receive weights: the graph's if set ``is_weighted``, else uniform."""
    given = _basics.default_recv_weights()
    if given is not None:
        return given
    share = 1.0 / (len(ins) + 1)
    return share, {j: share for j in ins}


class _KnobCommunicator(MPICommunicator):
    """The decomm runtime, mixing with the owner's BlueFog knobs at every exchange."""

    def __init__(self, owner: Any) -> None:
        super().__init__()
        self._owner = owner

    @property
    def supports_nonblocking(self) -> bool:  # type: ignore[override]
        return self._owner.communication_type is CommunicationType.neighbor_allreduce

    def _kwargs(self, tensor: Tensor, name: str | None) -> dict[str, Any]:
        # the core's translation of BlueFog's weight arguments (defaults, list-form
        # dst_weights, enable_topo_check), so the optimizers mix exactly as
        # bf.neighbor_allreduce would
        o = self._owner
        return _ops._na_args(tensor, o.self_weight, o.src_weights, o.dst_weights,
                             bool(o.enable_topo_check), name)

    def neighbor_allreduce_(self, tensor: Tensor, name: str | None = None) -> Tensor:
        o = self._owner
        if o.communication_type is CommunicationType.hierarchical_neighbor_allreduce:
            if (o.self_weight is None) != (o.src_machine_weights is None):
                raise ValueError("self_weight and src_machine_weights must be set together "
                                 "(or neither, for the machine topology's weights)")
            sw, src, dst = _ops._hier_args(o.self_weight, o.src_machine_weights,
                                           o.dst_machine_weights)
            if o.enable_topo_check:
                _ops._check_machine_graph(sorted(src), sorted(dst), name or "hierarchical")
            return hierarchical.hierarchical_neighbor_allreduce_(
                tensor, self_weight=sw, src_machine_weights=src, dst_machine_weights=dst,
                name=name)
        return ops.neighbor_allreduce_(tensor, **self._kwargs(tensor, name))

    def neighbor_allreduce_nonblocking_(
        self, tensor: Tensor, name: str | None = None
    ) -> PendingExchange:
        return ops.neighbor_allreduce_nonblocking_(tensor, **self._kwargs(tensor, name))


# -------------------------------------------------------- shared BlueFog state
class _BlueFogKnobs:
    """BlueFog's per-step knobs and pass counting, shared by the compat wrappers."""

    self_weight: float | None
    src_weights: Any
    dst_weights: Any
    src_machine_weights: Any
    dst_machine_weights: Any
    enable_topo_check: bool

    def _init_knobs(self, optimizer: Any, model: Any, passes: Any, who: str,
                    pass_kind: str) -> None:
        self._models = _check_models(optimizer, model, who)
        self._passes_per_comm = _check_passes(passes)
        self._pass_kind = pass_kind
        self._passes = 0
        self._warned = False
        self._bf_hooks: list[Any] = []
        self.self_weight = None
        self.src_weights = None
        self.dst_weights = None
        self.src_machine_weights = None
        self.dst_machine_weights = None
        self.enable_topo_check = False
        self._timeline_hooks: list[Any] = []
        self._timeline_open: set[str] = set()
        if os.environ.get("BLUEFOG_TIMELINE"):  # BlueFog's optimizers turn it on themselves
            self.turn_on_timeline()

    def turn_on_timeline(self) -> None:
        """Record each model's forward pass ("FORWARD") and backward pass ("GRADIENT
        COMPT.", from the first output gradient to the next ``step()``) as activities in
        decomm's timeline (BlueFog's method; the timeline itself must be on:
        ``BLUEFOG_TIMELINE`` / ``DECOMM_TIMELINE`` or ``decomm.timeline.start``)."""
        if self._timeline_hooks:
            return
        for k, m in enumerate(self._models):
            label = f"{type(self).__name__}.{type(m).__name__}.{k}"

            def pre(module: Any, inputs: Any, label: str = label) -> None:
                _basics.timeline_start_activity(label, "FORWARD")

            def post(module: Any, inputs: Any, output: Any, label: str = label) -> None:
                _basics.timeline_end_activity(label)
                first = output[0] if isinstance(output, (tuple, list)) and output else output
                if isinstance(first, Tensor) and first.requires_grad:
                    first.register_hook(lambda g, label=label: self._backward_started(label))

            self._timeline_hooks.append(m.register_forward_pre_hook(pre))
            self._timeline_hooks.append(m.register_forward_hook(post))

    def _backward_started(self, label: str) -> None:
        if label not in self._timeline_open and \
                _basics.timeline_start_activity(label, "GRADIENT COMPT."):
            self._timeline_open.add(label)

    def _timeline_step(self) -> None:
        """The backward spans end where the step begins."""
        for label in sorted(self._timeline_open):
            _basics.timeline_end_activity(label)
        self._timeline_open.clear()

    def turn_off_timeline(self) -> None:
        """Remove the hooks of :meth:`turn_on_timeline`."""
        self._timeline_step()
        for h in self._timeline_hooks:
            h.remove()
        self._timeline_hooks = []

    @property
    def num_steps_per_communication(self) -> int:
        return self._passes_per_comm

    def _count_pass(self) -> bool:
        """Count one pass; True when it is the J-th (the exchange is now due)."""
        if self._passes >= self._passes_per_comm and not self._warned:
            warnings.warn(_TOO_MANY_PASSES.format(what=self._pass_kind,
                                                  J=self._passes_per_comm),
                          UserWarning, stacklevel=3)
            self._warned = True
        self._passes += 1
        return self._passes == self._passes_per_comm

    def _due(self) -> bool:
        return self._passes >= self._passes_per_comm

    def _hook_forward(self, fn: Callable[[], None] | None = None) -> None:
        def hook(module: torch.nn.Module, *_: Any) -> None:
            if module.training and self._count_pass() and fn is not None:
                fn()

        for m in self._models:
            self._bf_hooks.append(m.register_forward_hook(hook))

    def _hook_backward(self, params: list[Tensor]) -> None:
        # one count per backward pass: the hook of the first parameter whose gradient
        # is accumulated in this pass counts it (params reached in one pass share it)
        seen: dict[int, int] = {}

        def hook(p: Tensor) -> None:
            k = seen.get(id(p), 0) + 1
            seen[id(p)] = k
            if k > self._passes:
                self._count_pass()

        self._bf_seen = seen
        for p in params:
            if p.requires_grad:
                self._bf_hooks.append(p.register_post_accumulate_grad_hook(hook))

    def _reset_passes(self) -> None:
        self._passes = 0
        seen = getattr(self, "_bf_seen", None)
        if seen is not None:
            seen.clear()

    def _remove_bf_hooks(self) -> None:
        for h in self._bf_hooks:
            h.remove()
        self._bf_hooks = []
        self.turn_off_timeline()


def _plan_for(kind: CommunicationType) -> Mix:
    if kind is CommunicationType.allreduce:
        return Mix.GLOBAL
    if kind is CommunicationType.empty:
        return Mix.NONE
    return Mix.NEIGHBOR


class _CombineOptimizer(_BlueFogKnobs, DSGD):
    """DSGD with BlueFog's communication type, knobs and pass counting."""

    _who = "DistributedOptimizer"

    def __init__(self, optimizer: torch.optim.Optimizer, model: Any,
                 communication_type: CommunicationType, num_steps_per_communication: int,
                 combine_first: bool) -> None:
        self._communication_type = _check_type(communication_type)
        self._init_knobs(optimizer, model, num_steps_per_communication, self._who,
                         "forward passes" if combine_first else "backward passes")
        self._step_func: Callable[..., None] | None = None
        super().__init__(optimizer, combine_first=combine_first, overlap=True,
                         broadcast_parameters=False, communicator=_KnobCommunicator(self))
        if self._comm.size() > 1:
            if combine_first:
                self._hook_forward()
            else:
                self._hook_backward(self.params)

    @property
    def communication_type(self) -> CommunicationType:
        return self._communication_type

    @communication_type.setter
    def communication_type(self, value: CommunicationType) -> None:
        self._communication_type = _check_type(value)

    def _plan(self) -> Mix:
        if self._comm.size() <= 1 or not self._due():
            return Mix.NONE
        return _plan_for(self._communication_type)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        self._timeline_step()
        due = self._due()
        loss = super().step(closure)
        if due:
            self._reset_passes()
        return loss

    def register_step_function(self, step_func: Callable[..., None]) -> None:
        """Use ``step_func(self, p, grad, param_group)`` per parameter for the local update.

        BlueFog needs it for optimizers other than SGD/Adam/RMSprop/Adagrad/Adadelta;
        here the wrapped optimizer's own ``step()`` is the default for every optimizer,
        and a registered function replaces it.
        """
        if not callable(step_func):
            raise TypeError(f"step_func must be callable, got {type(step_func).__name__}")
        self._step_func = step_func

    def _inner_step(self) -> None:
        if self._step_func is None:
            super()._inner_step()
            return
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._step_func(self, p, p.grad, group)

    def close(self) -> None:
        super().close()
        self._remove_bf_hooks()


class _AdaptThenCombine(_CombineOptimizer):
    _who = "DistributedAdaptThenCombineOptimizer"

    def __init__(self, optimizer: Any, model: Any, communication_type: Any,
                 num_steps_per_communication: int) -> None:
        super().__init__(optimizer, model, communication_type, num_steps_per_communication,
                         combine_first=False)


class _AdaptWithCombine(_CombineOptimizer):
    _who = "DistributedAdaptWithCombineOptimizer"

    def __init__(self, optimizer: Any, model: Any, communication_type: Any,
                 num_steps_per_communication: int) -> None:
        super().__init__(optimizer, model, communication_type, num_steps_per_communication,
                         combine_first=True)


def DistributedAdaptThenCombineOptimizer(
        optimizer: torch.optim.Optimizer, model: Any,
        communication_type: CommunicationType = CommunicationType.neighbor_allreduce,
        num_steps_per_communication: int = 1) -> DecentralizedOptimizer:
    """Adapt-then-combine: ``x <- W (x - u)`` every ``num_steps_per_communication``
    backward passes (decomm's :class:`~decomm.optim.DSGD`).

    ``communication_type``: ``neighbor_allreduce`` (``W`` from the knobs or the
    topology), ``hierarchical_neighbor_allreduce`` (machine average, then machine
    gossip), ``allreduce`` (``W = 11^T/n``) or ``empty`` (local updates only).
    The returned optimizer has the knobs ``self_weight``, ``src_weights``,
    ``dst_weights``, ``src_machine_weights``, ``dst_machine_weights`` and
    ``enable_topo_check``, read at every exchange.
    """
    return _AdaptThenCombine(optimizer, model, communication_type, num_steps_per_communication)


def DistributedAdaptWithCombineOptimizer(
        optimizer: torch.optim.Optimizer, model: Any,
        communication_type: CommunicationType = CommunicationType.neighbor_allreduce,
        num_steps_per_communication: int = 1) -> DecentralizedOptimizer:
    """Adapt-with-combine: ``x <- W x - u`` every ``num_steps_per_communication``
    forward passes, the exchange of ``x`` overlapping the backward pass
    (``DSGD(combine_first=True)``).  Knobs and types as
    :func:`DistributedAdaptThenCombineOptimizer`.
    """
    return _AdaptWithCombine(optimizer, model, communication_type, num_steps_per_communication)


def _deprecated(old: str, kind: str) -> None:
    warnings.warn(f"{old} is deprecated (as in BlueFog); use "
                  f"DistributedAdaptWithCombineOptimizer(opt, model, "
                  f"CommunicationType.{kind})", PendingDeprecationWarning, stacklevel=3)


def DistributedAllreduceOptimizer(optimizer: torch.optim.Optimizer, model: Any,
                                  num_steps_per_communication: int = 1
                                  ) -> DecentralizedOptimizer:
    """Deprecated alias: AWC with ``CommunicationType.allreduce``."""
    _deprecated("DistributedAllreduceOptimizer", "allreduce")
    return _AdaptWithCombine(optimizer, model, CommunicationType.allreduce,
                             num_steps_per_communication)


def DistributedNeighborAllreduceOptimizer(optimizer: torch.optim.Optimizer, model: Any,
                                          num_steps_per_communication: int = 1
                                          ) -> DecentralizedOptimizer:
    """Deprecated alias: AWC with ``CommunicationType.neighbor_allreduce``."""
    _deprecated("DistributedNeighborAllreduceOptimizer", "neighbor_allreduce")
    return _AdaptWithCombine(optimizer, model, CommunicationType.neighbor_allreduce,
                             num_steps_per_communication)


def DistributedHierarchicalNeighborAllreduceOptimizer(
        optimizer: torch.optim.Optimizer, model: Any,
        num_steps_per_communication: int = 1) -> DecentralizedOptimizer:
    """Deprecated alias: AWC with ``CommunicationType.hierarchical_neighbor_allreduce``."""
    _deprecated("DistributedHierarchicalNeighborAllreduceOptimizer",
                "hierarchical_neighbor_allreduce")
    return _AdaptWithCombine(optimizer, model, CommunicationType.hierarchical_neighbor_allreduce,
                             num_steps_per_communication)


# ------------------------------------------------------ gradient allreduce
class _GradientAllreduce(_BlueFogKnobs, DecentralizedOptimizer):
    """Horovod-style data parallelism: ``u`` from the average of all ranks' gradients.

    Every ``step()`` averages the (accumulated) gradients over all ranks - one
    ``allreduce_`` per dtype of a flat copy - and then runs the wrapped optimizer, so
    the ranks' parameters stay identical if they start identical.  As in BlueFog,
    every step averages, whatever ``num_steps_per_communication`` says: it only sets
    after how many backward passes a ``step()`` is expected (more warn).
    """

    _stateful = False

    def __init__(self, optimizer: torch.optim.Optimizer, model: Any,
                 num_steps_per_communication: int) -> None:
        self._init_knobs(optimizer, model, num_steps_per_communication,
                         "DistributedGradientAllreduceOptimizer", "backward passes")
        self._grads: list[Tensor] = []
        self._synchronized = False
        self._should_synchronize = True
        super().__init__(optimizer, broadcast_parameters=False)
        if self._comm.size() > 1:
            self._hook_backward(self.params)

    def _setup(self) -> None:
        self._grads = [b.new_state(None) for b in self._buckets]

    def _mix_buffers(self) -> list[Tensor]:
        return self._grads

    def _plan(self) -> Mix:
        if self._comm.size() <= 1 or self._synchronized:
            return Mix.NONE
        return Mix.GLOBAL

    def _local_phase(self, mix: Mix) -> None:
        if mix is Mix.NONE:
            return
        for g, b in zip(self._grads, self._buckets):
            for v, p in zip(b.split(g), b.params):
                if p.grad is None:
                    v.zero_()  # every rank sends every parameter, used or not
                else:
                    v.copy_(p.grad)

    def _finish_phase(self, mix: Mix) -> None:
        if mix is not Mix.NONE:
            self._write_back()
        self._inner_step()

    def _write_back(self) -> None:
        for g, b in zip(self._grads, self._buckets):
            for v, p in zip(b.split(g), b.params):
                if p.grad is None:
                    p.grad = v.clone()
                else:
                    p.grad.copy_(v)

    def synchronize(self) -> None:
        """Average the gradients over all ranks now (collective), e.g. before clipping.

        Then call ``step()`` inside :meth:`skip_synchronize` so it does not average again.
        """
        if self._comm.size() > 1:
            with torch.no_grad():
                self._local_phase(Mix.GLOBAL)
                for k, buf in enumerate(self._grads):
                    self._comm.allreduce_(buf, average=True, name=self._buffer_name(k))
                self._write_back()
        self._reset_passes()
        self._synchronized = True

    @contextlib.contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        """``step()`` inside this block uses the gradients as they are (after synchronize)."""
        self._should_synchronize = False
        try:
            yield
        finally:
            self._should_synchronize = True

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        self._timeline_step()
        if self._should_synchronize and self._synchronized:
            warnings.warn("optimizer.step() called after optimizer.synchronize() outside "
                          "optimizer.skip_synchronize(): the gradients are averaged again",
                          UserWarning, stacklevel=2)
            self._synchronized = False
        if not self._should_synchronize:
            self._synchronized = True  # step() must not average
        try:
            loss = super().step(closure)
        finally:
            self._synchronized = False
        self._reset_passes()
        return loss

    def close(self) -> None:
        super().close()
        self._remove_bf_hooks()


def DistributedGradientAllreduceOptimizer(optimizer: torch.optim.Optimizer, model: Any,
                                          num_steps_per_communication: int = 1
                                          ) -> DecentralizedOptimizer:
    """Average the gradients over all ranks at every ``step()`` (Horovod's algorithm).

    ``x <- x - u(mean_i g_i)``; ``synchronize()`` and ``skip_synchronize()`` as in
    Horovod/BlueFog for gradient clipping between averaging and stepping.
    """
    return _GradientAllreduce(optimizer, model, num_steps_per_communication)


# ------------------------------------------------------------ window optimizers
_window_ids = itertools.count()  # window names: every rank builds optimizers in one order


class _WindowCommunicator(MPICommunicator):
    """The mix of the window optimizers: a local ``win_update`` of what has arrived."""

    supports_nonblocking = False

    def __init__(self, owner: _WindowOptimizer) -> None:
        super().__init__()
        self._owner = owner

    def neighbor_allreduce_(self, tensor: Tensor, name: str | None = None) -> Tensor:
        return self._owner._collect(tensor)


class _WindowOptimizer(_BlueFogKnobs, DecentralizedOptimizer):
    """One-sided gossip over decomm windows (one window per dtype bucket).

    After every ``J`` training-mode forward passes the forward hook does this rank's
    one-sided part, with the parameters ``x`` of that moment:

    * ``put``: write ``dst_weights[j] * x`` into each out-neighbour ``j``'s window
      (default ``dst_weights``: 1 for every out-neighbour);
    * ``get``: fetch ``src_weights[j] * x_j`` from each in-neighbour (default 1);
    * ``push``: add ``dst_weights[j] * (w x, w)`` into out-neighbour ``j``'s window
      (push-sum with weight ``w``; default share ``1 / (out-degree + 1)``).

    ``step()`` then mixes locally (``put``/``get``: uniform average of this rank and
    the latest values in its window; ``push``: keep ``self_weight`` of its own mass,
    add what arrived, de-bias by the weight) and runs the wrapped optimizer:
    ``x <- mix(x) - u``.  Nobody waits for anybody unless ``force_barrier`` is set
    (a barrier at the start of each ``step()``).
    """

    _stateful = True
    _step_supports_amp_scaling = False

    def __init__(self, optimizer: torch.optim.Optimizer, model: Any,
                 num_steps_per_communication: int, style: str,
                 window_prefix: str | None = None) -> None:
        who = {"put": "DistributedWinPutOptimizer", "get": "DistributedPullGetOptimizer",
               "push": "DistributedPushSumOptimizer"}[style]
        self._init_knobs(optimizer, model, num_steps_per_communication, who, "forward passes")
        if window_prefix is not None and not isinstance(window_prefix, str):
            raise TypeError(f"window_prefix must be a str or None, got {window_prefix!r}")
        self._style = style
        self._prefix = (window_prefix + ".") if window_prefix else ""
        self._names: list[str] = []
        self._msgs: list[Tensor] = []
        self._w: list[Tensor] = []  # push-sum weight per bucket (0-d float64, saved)
        self._issued = False
        self.force_barrier = style == "push"
        super().__init__(optimizer, broadcast_parameters=False,
                         communicator=_WindowCommunicator(self))
        if style == "push":
            out = runtime.out_neighbors()
            share = 1.0 / (len(out) + 1)
            self.self_weight = share
            self.dst_weights = {j: share for j in out}
        if self._comm.size() > 1:
            self._hook_forward(self._issue)

    # ------------------------------------------------------------- windows
    def _setup(self) -> None:
        self.unregister_window()
        wid = next(_window_ids)
        for k, b in enumerate(self._buckets):
            if self._style == "push":
                if b.dtype not in (torch.float32, torch.float64):
                    raise TypeError(f"DistributedPushSumOptimizer: {b.dtype} parameters cannot "
                                    "be accumulated (MPI sums float32/float64 only)")
                msg = torch.zeros(b.numel + 1, dtype=b.dtype, device=b.device)
                msg[: b.numel].copy_(b.flat)
                msg[b.numel] = 1.0
                self._w.append(torch.ones((), dtype=torch.float64))
            else:
                msg = b.buffer
            name = f"{self._prefix}decomm.compat.{self._style}.{wid}.{k}"
            if self._comm.size() > 1:
                # BlueFog's convention: a neighbour's slot starts as this rank's own value
                # (push-sum: zeros, nothing has arrived yet)
                push = self._style == "push"
                win.win_create(msg, name, zero_init=push, self_init=not push)
            self._names.append(name)
            self._msgs.append(msg)

    def unregister_window(self) -> None:
        """Free this optimizer's windows (collective)."""
        existing = set(win.win_names())
        for name in self._names:
            if name in existing:
                win.win_free(name)
        self._names, self._msgs, self._w = [], [], []

    @property
    def window_names(self) -> list[str]:
        return list(self._names)

    # ----------------------------------------------------------- the algorithm
    def _issue(self) -> None:
        """This rank's one-sided part, at the J-th forward pass."""
        with torch.no_grad():
            for k, name in enumerate(self._names):
                if self._style == "put":
                    win.win_put(self._msgs[k], name, dst_weights=self._dst())
                elif self._style == "get":
                    win.win_get(name, src_weights=self.src_weights)
                else:
                    b, msg = self._buckets[k], self._msgs[k]
                    w = float(self._w[k])
                    torch.mul(b.flat, w, out=msg[: b.numel])  # mass x = w z
                    msg[b.numel] = w
                    win.win_accumulate(msg, name, dst_weights=self._dst())
        self._issued = True

    def _dst(self) -> Any:
        d = self.dst_weights
        if isinstance(d, (list, tuple)):
            return {r: 1.0 for r in d}
        return d

    def _plan(self) -> Mix:
        return Mix.NEIGHBOR if self._issued else Mix.NONE

    def _local_phase(self, mix: Mix) -> None:
        pass  # the message is x as it was at the forward pass

    def _mix_buffers(self) -> list[Tensor]:
        return self._msgs

    def _collect(self, msg: Tensor) -> Tensor:
        k = next(i for i, m in enumerate(self._msgs) if m is msg)
        name = self._names[k]
        ins = win.win_in_neighbors(name)
        if self._style == "push":
            sw = self.self_weight if self.self_weight is not None else 1.0
            win.win_update(name, self_weight=float(sw), neighbor_weights={j: 1.0 for j in ins},
                           reset=True)
            b = self._buckets[k]
            w = float(msg[b.numel])
            if not w > 0.0:
                raise DecommError(f"DistributedPushSumOptimizer on rank {runtime.rank()}: the "
                                  f"push-sum weight became {w} (no mass arrived and none kept)")
            self._w[k].fill_(w)
            torch.div(msg[: b.numel], w, out=b.flat)
            return msg
        sw, nb = _uniform_or_graph_weights(ins)
        return win.win_update(name, self_weight=sw, neighbor_weights=nb)

    def _finish_phase(self, mix: Mix) -> None:
        self._inner_step()
        if self._style == "get" and mix is not Mix.NONE:
            for k, name in enumerate(self._names):  # expose the new x to the pullers
                win.win_put(self._buckets[k].buffer, name, dst_weights={})

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        self._timeline_step()
        if self.force_barrier and self._comm.size() > 1:
            ops.barrier()
        loss = super().step(closure)
        if self._issued or self._due():
            self._issued = False
            self._reset_passes()
        return loss

    def _state_tensors(self) -> dict[str, list[Tensor]]:
        if self._style != "push":
            return {}
        return {"push_sum_weight": self._w}

    def close(self) -> None:
        """Remove the hooks and free the windows (collective)."""
        super().close()
        self._remove_bf_hooks()
        self.unregister_window()


def DistributedWinPutOptimizer(optimizer: torch.optim.Optimizer, model: Any,
                               num_steps_per_communication: int = 1,
                               window_prefix: str | None = None) -> DecentralizedOptimizer:
    """Asynchronous gossip: put ``x`` to the out-neighbours' windows at the forward pass,
    ``x <- mean(x, window) - u`` at ``step()``.

    Knobs: ``dst_weights`` (per step: whom to write and with which scale) and
    ``force_barrier``.  ``unregister_window()`` frees the windows (collective).
    """
    return _WindowOptimizer(optimizer, model, num_steps_per_communication, "put",
                            window_prefix)


def DistributedPullGetOptimizer(optimizer: torch.optim.Optimizer, model: Any,
                                num_steps_per_communication: int = 1
                                ) -> DecentralizedOptimizer:
    """Asynchronous gossip by pulling: fetch the in-neighbours' ``x`` at the forward pass,
    ``x <- mean(x, fetched) - u`` at ``step()``.  Knobs: ``src_weights``, ``force_barrier``.
    """
    return _WindowOptimizer(optimizer, model, num_steps_per_communication, "get")


def DistributedPushSumOptimizer(optimizer: torch.optim.Optimizer, model: Any,
                                num_steps_per_communication: int = 1
                                ) -> DecentralizedOptimizer:
    """Push-sum SGD over windows (Kempe et al. 2003; Assran et al., ICML 2019).

    State: parameters ``z`` and weight ``w`` (1 at the start).  At the forward pass
    rank i adds ``dst_weights[j] * (w z, w)`` into each out-neighbour's window; at
    ``step()`` it keeps ``self_weight * (w z, w)`` plus everything that arrived,
    sets ``z = x / w`` and runs the wrapped optimizer on ``z``.  Mass is conserved when
    ``self_weight + sum(dst_weights)`` is 1 on every rank (the default shares
    ``1 / (out-degree + 1)``), so ``z`` reaches the exact average on directed graphs.
    ``force_barrier`` defaults to True, as in BlueFog.
    """
    return _WindowOptimizer(optimizer, model, num_steps_per_communication, "push")
