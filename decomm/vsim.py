r"""Vectorized simulation of n decentralized nodes: one batched step for all of them.

:class:`decomm.sim.Simulation` runs a Python loop of n forward/backward passes
and n wrapped-optimizer steps per step.  :class:`VectorizedSimulation` runs the
same algorithms with every node's state *stacked*: each parameter of shape
``s`` is one tensor of shape ``(n, *s)`` (node ``i`` is ``p[i]``), and

* the n forward passes are one ``torch.func.vmap`` of
  ``torch.func.functional_call`` over the stacked parameters and the per-node
  data batches (leading dimension n), giving the n losses ``L_i(θ_i)``; the n
  backward passes are one backward of ``Σ_i L_i``, whose gradient with respect
  to the stacked parameters is ``∇L_i(θ_i)`` in row i (node i's loss depends on
  its own parameters only);
* the n optimizer steps are **one** step of the user's torch optimizer over the
  stacked parameters.  For optimizers whose update is elementwise with shared
  hyper-parameters (SGD with momentum / Nesterov / weight decay, Adam, AdamW,
  ...: see :data:`ELEMENTWISE_OPTIMIZERS`) that *is* n independent optimizers,
  because every node's entries only ever meet their own state;
* the wrapper's algebra is the wrapper's own: the same ``decomm.optim`` class
  (``DSGD``, ``GradientTracking``, ``D2``, ``QGDSGDm``, ``ExactDiffusion``,
  ``ChocoSGD``) wraps the stacked optimizer and runs its local and finish
  phases once, on the stacked flat buffers (their algebra is elementwise, so it
  acts on each node's entries as it would on that node alone);
* the mix is a matrix product on the flat buffers themselves.  A wrapper's
  bucket stores each stacked parameter contiguously, so every parameter's part
  of a flat buffer (per segment: parameters, trackers, ...) *is* an
  ``(n, d_k)`` matrix ``X_k`` whose row ``i`` is node ``i``'s message, and one
  round of gossip ``x_i ← Σ_j W(t)[i, j] x_j`` is

  .. math::  X_k \leftarrow W(t)\, X_k \quad \text{for every block } k

  (a dense ``torch.mm`` for n ≤ :data:`DENSE_MAX_NODES`, a sparse product
  above), with no stacking or unstacking: the stacked parameters are views of
  the buffers.  Node-first stacking (rather than node-last, which would make
  a whole buffer one ``(D, n)`` matrix and the mix one product) is what
  ``vmap``'s batching rules handle without copies: on a loaded 2-core machine
  the forward/backward of 25 nodes was as fast for a 2k-parameter CNN and 9%
  faster for a 38k-parameter one (linear layers need no transposed weights);
  the mix is a negligible part of a step either way.

What is restated rather than run as the wrapper's own code, and why:

* **Push-sum weights.**  :class:`decomm.optim.PushSum` (Assran et al., ICML
  2019) and :class:`decomm.optim.PushDIGing` (Nedić, Olshevsky & Shi, SIAM J.
  Optim. 2017) keep one scalar weight per wrapper, sent in the last element of
  their message, so their phases cannot run once for all nodes.  The stacked
  wrapper is the base algorithm's (PushSum: DSGD's adapt phase, the inner
  optimizer step; PushDIGing: GradientTracking's tracker update and inner step
  fed the tracker), and the simulator frames it with the ``(n,)`` weights
  :attr:`push_weights` (``w^0 = 1``) as the wrappers do per rank: ``x = w z``,
  the base phases, ``[buffers, w] ← P(t) [buffers, w]``, ``z = x / w``.
  ``P(t)`` is the wrappers' own (:class:`decomm.optim.push_sum.PushWeights`: the
  uniform split ``P[j, i] = 1/(outdeg_i(t) + 1)`` over the topology's
  out-neighbours and ``i`` itself, or the explicit ``weights=``), and ``w``
  travels in the first bucket's dtype, as in the message.
* **Overlapped PushSum** (``overlap=τ``, Overlap SGP, Alg. 2 of Assran et al.):
  PushSum's in-flight queue is per wrapper too, so the simulator keeps it, with
  PushSum's own bookkeeping: ``τ + 1`` message slots of the stacked numerators
  and weights; gossip step ``c`` copies ``[x^{c+1/2}, w^c]`` into the first free
  slot, every node keeps ``P(c)[i, i]`` of its mass at once (the share
  :meth:`~decomm.optim.push_sum.PushWeights.of` gives each rank), the slot is
  mixed with ``P(c) − diag P(c)`` (what the looped simulator mixes) and queued,
  and the exchange started at step ``c − τ`` is added to ``x`` and ``w`` before
  ``z = x / w``; a global step first applies every exchange in flight, local
  steps neither start nor apply any.  :meth:`flush` applies what is in flight
  (``PushSum.flush``); :meth:`state_dict` holds the slots and the queue.
* **ChocoSGD's compression** (Koloskova, Stich & Jaggi, ICML 2019) is per node:
  the stacked :class:`~decomm.optim.ChocoSGD` runs its own phases (public copy
  ``x̂``, memory ``s``, consensus step) on the stacked buffers, and its
  compressor is wrapped to compress each node's vector (row ``i`` of every
  parameter's block, concatenated: node ``i``'s bucket) separately, drawing
  from the stream ``(rank i, bucket k)`` that rank ``i`` draws from under MPI
  (:meth:`decomm.compression.Compressor.make_generator`).  Top-k selection and
  random draws do not batch over nodes, so this is a loop of n compressions per
  step.  Static topologies only, as for ChocoSGD everywhere;
  ``optimizer.payload_bytes`` counts all n nodes' payloads.

The trajectories equal the looped simulator's (and so an MPI run's) up to
floating-point summation order; ``tests/unit/test_vsim.py`` checks this for
every supported wrapper and optimizer on static and time-varying topologies.

Example: 25 nodes of a small CNN on a Base-2 graph, each with its own batch::

    import torch
    from torch import nn
    from decomm.vsim import VectorizedSimulation
    from decomm.optim import GradientTracking
    from decomm.topology import BaseGraph

    n = 25
    def make_model():
        return nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(),
                             nn.Flatten(), nn.Linear(8 * 4 * 4, 10))

    vs = VectorizedSimulation(
        BaseGraph(n, 1), make_model,
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
        GradientTracking)

    def loss_fn(model, x, y):            # one node's loss, written for one node
        return nn.functional.cross_entropy(model(x), y)

    x = torch.randn(n, 32, 1, 8, 8)      # node i's batch is x[i], y[i]
    y = torch.randint(0, 10, (n, 32))
    for _ in range(100):
        losses = vs.step(loss_fn, x, y)  # tensor of n losses
    print(vs.consensus_distance(), vs.params(0)[:5])

Module buffers are not stacked: one copy serves all nodes, read-only.  What
does not vectorize (a clear error says so): modules that update state in place
in forward (BatchNorm / InstanceNorm with running statistics are refused at
construction, any other buffer written during forward at the first step), random
ops unless ``randomness="different"`` or ``"same"`` (vmap's modes: different
dropout masks per node, or one shared mask; neither reproduces the looped
simulator's global-RNG sequence), optimizers whose update is not elementwise
(LBFGS, anything with per-tensor norms), wrappers whose algebra is not checked
to be elementwise over nodes (subclasses of the supported ones, user wrappers;
use :class:`decomm.sim.Simulation`), ``AsyncGossip`` (one-sided windows, no
common round: neither simulator runs it), and GradScaler mixed precision.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from decomm.compression import Compressor, Payload
from decomm.errors import DecommError
from decomm.optim import (
    D2,
    DSGD,
    ChocoSGD,
    DecentralizedOptimizer,
    ExactDiffusion,
    GradientTracking,
    Mix,
    PushDIGing,
    PushSum,
    QGDSGDm,
)
from decomm.optim._flat import Bucket
from decomm.optim.push_sum import PushWeights, _check_overlap, _push_topology
from decomm.sim import SimNodeCommunicator, as_topology
from decomm.topology import Topology

__all__ = [
    "DENSE_MAX_NODES",
    "ELEMENTWISE_OPTIMIZERS",
    "SUPPORTED_WRAPPERS",
    "VectorizedSimulation",
]

#: the wrapper classes whose phases the vectorized simulator runs on stacked buffers
#: (their algebra is elementwise over nodes); PushSum, PushDIGing and ChocoSGD's
#: compression run as described in the module docstring
SUPPORTED_WRAPPERS: tuple[type[DecentralizedOptimizer], ...] = (
    DSGD, GradientTracking, D2, QGDSGDm, ExactDiffusion, PushSum, PushDIGing, ChocoSGD)

#: torch optimizers whose step is elementwise with hyper-parameters shared by all
#: entries, so one optimizer over stacked ``(n, *s)`` parameters is n independent ones
ELEMENTWISE_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad,
    torch.optim.RMSprop, torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam,
)

#: up to this many nodes W(t) is a dense n x n matrix (one GEMM); above, sparse
DENSE_MAX_NODES = 256


class _PushSumAdapt(DSGD):
    """DSGD's adapt-then-combine phases (the inner step), mixed with push-sum's P(t).

    Push-sum's P is column-stochastic by construction, its rows need not be, and
    the mixed quantity is the numerator x = w z: DSGD's doubly-stochastic warning
    does not apply.
    """

    _check_column_sums = False


class _PushDIGingAdapt(GradientTracking):
    """GradientTracking's phases (tracker update, inner step fed the tracker), mixed with
    Push-DIGing's P(t): :class:`~decomm.optim.PushDIGing` with its scalar weight ``v``
    kept by the simulator (``u = v x`` before, ``x = u / v`` after the step).

    P is column-stochastic by construction, its rows need not be: GradientTracking's
    doubly-stochastic warning does not apply (PushDIGing turns it off too).
    """

    _check_column_sums = False


class _NodePayloads(Payload):
    """The n nodes' payloads of one stacked ChocoSGD message (bucket ``bucket``)."""

    __slots__ = ("bucket", "nodes")

    def __init__(self, nodes: list[Payload], bucket: int) -> None:
        parts = {f"{i}.{name}": t for i, p in enumerate(nodes) for name, t in p.parts.items()}
        super().__init__(parts, sum(p.numel for p in nodes), nodes[0].dtype)
        self.nodes = nodes
        self.bucket = bucket


class _PerNodeCompressor(Compressor):
    """ChocoSGD's compressor applied to each node's part of a stacked message.

    In a bucket of the stacked parameters node ``i``'s message is row ``i`` of the
    ``(n, d_k)`` blocks of its parameters; node ``i``'s own bucket (what its wrapper
    compresses under MPI or in :mod:`decomm.sim`) is those rows concatenated.
    :meth:`compress` gathers every node's vector and compresses it with ``base``,
    drawing from the stream ``(rank i, bucket k)`` that rank ``i``'s ChocoSGD draws
    from (:meth:`Compressor.make_generator`); :meth:`decompress_add_` scatters the n
    dense ``Q(·)`` back into the blocks.  A Python loop of n compressions per step:
    ``TopK``'s selection and the random draws are per node, so they do not batch.
    """

    def __init__(self, base: Compressor, n: int) -> None:
        self.base = base
        self.n = n
        self.seed = base.seed
        self._owner: DecentralizedOptimizer | None = None
        self._gens: dict[int, list[torch.Generator | None]] = {}

    def bind(self, owner: DecentralizedOptimizer) -> None:
        """The stacked ChocoSGD whose messages (``owner._m``) this compresses."""
        self._owner = owner

    def _bucket(self, k: int) -> Bucket:
        assert self._owner is not None, "bind() the stacked ChocoSGD first"
        return self._owner._buckets[k]

    def make_generator(self, *stream: int, device: torch.device | str = "cpu"
                       ) -> torch.Generator | None:
        """ChocoSGD's ``_setup`` asks for the stream ``(rank, k)`` of its bucket ``k``;
        the stacked wrapper is every rank: the n streams ``(i, k)`` are made here and
        the wrapper gets ``None`` (:meth:`compress` draws from the node's own)."""
        if len(stream) != 2:
            raise ValueError(f"expected the stream (rank, bucket), got {stream!r}")
        k = int(stream[1])
        self._gens[k] = [self.base.make_generator(i, k, device=device) for i in range(self.n)]
        return None

    def layout(self, numel: int, dtype: torch.dtype) -> list[tuple[str, torch.dtype, int]]:
        """The n nodes' payload layouts of ``numel / n`` elements each, end to end."""
        d = numel // self.n
        return [(f"{i}.{name}", dt, c) for i in range(self.n)
                for name, dt, c in self.base.layout(d, dtype)]

    def _node_rows(self, flat: Tensor, bucket: Bucket) -> Tensor:
        """``(n, d)``: row ``i`` is node ``i``'s flat bucket (a copy)."""
        return torch.cat([flat[o:o + p.numel()].view(self.n, -1)
                          for o, p in zip(bucket.offsets, bucket.params)], dim=1)

    def compress(self, tensor: Tensor, *, generator: torch.Generator | None = None) -> Payload:
        """Every node's row of the stacked message ``tensor``, compressed by ``base``."""
        owner = self._owner
        k = next((k for k, m in enumerate(getattr(owner, "_m", ())) if m is tensor), None)
        if k is None:
            raise DecommError("the per-node compressor of VectorizedSimulation compresses "
                              "the stacked ChocoSGD's messages only")
        rows = self._node_rows(tensor.detach(), self._bucket(k))
        gens = self._gens[k]
        return _NodePayloads([self.base.compress(rows[i], generator=gens[i])
                              for i in range(self.n)], k)

    def decompress_add_(self, out: Tensor, payload: Payload, alpha: float = 1.0) -> Tensor:
        """``out += alpha · Q(x_i)`` in every node's rows of the stacked ``out``."""
        if not isinstance(payload, _NodePayloads):
            raise TypeError("expected the payloads of a stacked ChocoSGD message")
        bucket = self._bucket(payload.bucket)
        rows = torch.zeros(self.n, bucket.numel // self.n, dtype=out.dtype, device=out.device)
        for row, p in zip(rows, payload.nodes):
            self.base.decompress_add_(row, p, alpha=alpha)
        col = 0
        for o, p in zip(bucket.offsets, bucket.params):
            d = p.numel() // self.n
            out[o:o + p.numel()].view(self.n, -1).add_(rows[:, col:col + d])
            col += d
        return out

    def decompress(self, payload: Payload, shape: Sequence[int] | torch.Size | None = None
                   ) -> Tensor:
        """The dense stacked ``Q(·)`` of all nodes (the bucket's layout), shaped ``shape``."""
        if not isinstance(payload, _NodePayloads):
            raise TypeError("expected the payloads of a stacked ChocoSGD message")
        out = torch.zeros(payload.numel, dtype=payload.dtype,
                          device=self._bucket(payload.bucket).device)
        self.decompress_add_(out, payload)
        return out if shape is None else out.view(torch.Size(shape))

    def _compress(self, flat: Tensor, generator: torch.Generator | None) -> dict[str, Tensor]:
        return self.base._compress(flat, generator)  # one node's vector, as base does

    def _decompress(self, payload: Payload) -> Tensor:
        return self.base._decompress(payload)

    def generator_states(self) -> list[list[Tensor | None]]:
        """The n nodes' generator states per bucket (for a checkpoint)."""
        return [[None if g is None else g.get_state() for g in self._gens[k]]
                for k in sorted(self._gens)]

    def load_generator_states(self, states: list[list[Tensor | None]]) -> None:
        for k, row in zip(sorted(self._gens), states):
            for g, st in zip(self._gens[k], row):
                if g is not None and st is not None:
                    g.set_state(st)

    def __repr__(self) -> str:
        return f"{self.base!r} per node"


class _NodeModel:
    """What ``loss_fn`` receives: calling it runs the model with one node's parameters."""

    def __init__(self, module: nn.Module, params: dict[str, Tensor],
                 buffers: dict[str, Tensor]) -> None:
        self.module = module
        self._tensors = (params, buffers)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(self.module, self._tensors, args, kwargs)


def _stateful_norms(module: nn.Module) -> list[str]:
    """Modules that update running statistics in place during forward."""
    from torch.nn.modules.batchnorm import _NormBase

    return [f"{name or '<root>'} ({type(m).__name__})" for name, m in module.named_modules()
            if isinstance(m, _NormBase) and m.track_running_stats]


class VectorizedSimulation:
    """n virtual nodes with stacked parameters, stepped by one batched computation.

    Args:
        topology: a :class:`decomm.topology.Topology`, an n×n matrix or a list of
            them (a cycle); ``n = topology.n``.  PushSum and PushDIGing use only its
            graph, like the wrappers (or their ``weights=``).
        make_model: ``() -> nn.Module``, the model of one node; called once (all
            nodes start from its parameters) or n times with ``identical_init=False``
            (in the same order as :class:`decomm.sim.Simulation`, so seeded calls
            give the same initial nodes).  Its parameters' device is the
            simulation's device.
        make_optimizer: ``(model) -> torch.optim.Optimizer``, called **once** with a
            copy of the model whose parameters are the stacked ``(n, *s)`` tensors
            (param groups built from ``model.parameters()`` or submodules work as
            usual; rules that look at ``p.ndim`` see one extra dimension).  One of
            :data:`ELEMENTWISE_OPTIMIZERS`.
        wrapper_cls: one of :data:`SUPPORTED_WRAPPERS` (default ``DSGD``).
        identical_init: start every node from the first model's parameters.
        randomness: ``torch.func.vmap``'s mode for random ops in forward
            (``"error"``, ``"different"``, ``"same"``).
        **wrapper_kwargs: passed to the wrapper (``combine_first``,
            ``communicate_every``, ``global_every``, ``momentum``, PushSum's
            ``weights`` and ``overlap``, ChocoSGD's ``compression`` and
            ``consensus_step``, ...).

    Attributes: ``model`` (the functional template, node 0's module structure:
    call ``.train()`` / ``.eval()`` on it), ``stacked_model`` (the module whose
    parameters are the stacked tensors), ``optimizer`` (the wrapper: give it to
    LR schedulers; for PushSum / PushDIGing it is the base algorithm's, see the
    module docstring), ``topology``, ``n``, ``round``, ``push_weights``
    (PushSum and PushDIGing only: the ``(n,)`` float64 push-sum weights),
    ``in_flight`` (overlapped PushSum: exchanges not yet applied).
    """

    def __init__(
        self,
        topology: Any,
        make_model: Callable[[], nn.Module],
        make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
        wrapper_cls: type[DecentralizedOptimizer] = DSGD,
        *,
        identical_init: bool = True,
        randomness: str = "error",
        **wrapper_kwargs: Any,
    ) -> None:
        if wrapper_cls not in SUPPORTED_WRAPPERS:
            names = ", ".join(c.__name__ for c in SUPPORTED_WRAPPERS)
            what = getattr(wrapper_cls, "__name__", repr(wrapper_cls))
            reason = getattr(wrapper_cls, "_simulation_unsupported", None)
            if reason:  # neither simulator can (AsyncGossip: no common round)
                raise TypeError(
                    f"VectorizedSimulation cannot run {what}: {reason}. Neither simulator "
                    f"runs it (it supports {names}); run {what} under MPI (decomm-run / "
                    f"mpirun)")
            raise TypeError(
                f"VectorizedSimulation cannot run {what}: it runs a wrapper's algebra "
                f"once over all nodes' stacked buffers, which is exact only for "
                f"algebra that is elementwise over nodes, checked for {names} "
                f"(exactly these classes, not subclasses); use decomm.sim.Simulation "
                f"(one wrapper per node) for others")
        if randomness not in ("error", "different", "same"):
            raise ValueError(
                f"randomness must be 'error', 'different' or 'same', got {randomness!r}")
        for key in ("communicator", "broadcast_parameters", "check_parameters"):
            if key in wrapper_kwargs:
                raise TypeError(f"VectorizedSimulation sets {key!r} itself")
        if {"buffers", "buffer_mode", "buffer_every"} & set(wrapper_kwargs):
            raise TypeError(
                "VectorizedSimulation does not exchange module buffers (buffers=): its "
                "nodes share one functional model; use decomm.sim.Simulation(..., "
                "buffers='mix' or 'average')")
        self.topology: Topology = as_topology(topology)
        self.n: int = int(self.topology.n)
        self.round: int = 0
        self.randomness = randomness
        self._w_cache: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}
        self._scratch: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}

        first = make_model()
        if not isinstance(first, nn.Module):
            raise TypeError(f"make_model must return an nn.Module, got {type(first).__name__}")
        stateful = _stateful_norms(first)
        if stateful:
            raise TypeError(
                f"VectorizedSimulation cannot vectorize modules that update running "
                f"statistics in place during forward: {', '.join(stateful)}. Use "
                f"GroupNorm/LayerNorm, BatchNorm with track_running_stats=False, or "
                f"decomm.sim.Simulation")
        self.model = first
        self._names = [k for k, _ in first.named_parameters()]
        if not self._names:
            raise ValueError("the model has no parameters")
        models = [first] + ([make_model() for _ in range(self.n - 1)]
                            if not identical_init else [])
        self._stacked: dict[str, nn.Parameter] = {}
        with torch.no_grad():
            for name, p in first.named_parameters():
                if identical_init:
                    data = p.detach().unsqueeze(0).expand(self.n, *p.shape)
                else:
                    others = [dict(m.named_parameters()).get(name) for m in models]
                    if any(q is None or q.shape != p.shape or q.dtype != p.dtype
                           for q in others):
                        raise DecommError(
                            f"every node must build the same model: parameter {name!r} "
                            f"differs between the calls of make_model")
                    data = torch.stack([q.detach() for q in others])  # type: ignore[union-attr]
                self._stacked[name] = nn.Parameter(data.contiguous(),
                                                   requires_grad=p.requires_grad)
        self._buffers = dict(first.named_buffers())
        self.stacked_model = self._stacked_copy(first)

        inner = make_optimizer(self.stacked_model)
        if type(inner) not in ELEMENTWISE_OPTIMIZERS:
            names = ", ".join(c.__name__ for c in ELEMENTWISE_OPTIMIZERS)
            raise TypeError(
                f"VectorizedSimulation steps one optimizer over the stacked parameters, "
                f"which equals n independent optimizers only for elementwise updates "
                f"with shared hyper-parameters: {names}; got "
                f"{type(inner).__module__}.{type(inner).__qualname__} (use "
                f"decomm.sim.Simulation)")
        stacked_ids = {id(p) for p in self._stacked.values()}
        for gi, group in enumerate(inner.param_groups):
            for p in group["params"]:
                if id(p) not in stacked_ids:
                    raise ValueError(
                        f"make_optimizer: param_groups[{gi}] holds a tensor of shape "
                        f"{tuple(p.shape)} that is not a parameter of the model it was "
                        f"given; build the optimizer from that model's parameters")
        self._wrapper_name = wrapper_cls.__name__
        kwargs = dict(wrapper_kwargs)
        self._push_source: Topology | None = None
        self._pw: PushWeights | None = None
        self._tau = 0  # overlapped PushSum: rounds a message stays in flight
        self._compressor: _PerNodeCompressor | None = None
        if wrapper_cls in (PushSum, PushDIGing):
            allowed = {"weights", "communicate_every", "global_every"}
            if wrapper_cls is PushSum:
                allowed.add("overlap")
            extra = sorted(set(kwargs) - allowed)
            if extra:
                raise TypeError(
                    f"VectorizedSimulation runs {self._wrapper_name} with {sorted(allowed)} "
                    f"only, got {extra}")
            self._tau = _check_overlap(kwargs.pop("overlap", False))  # PushSum's rule
            weights = kwargs.pop("weights", None)
            if weights is not None:
                # the wrapper's own validation; its round t is P(t)ᵀ
                self._push_source = _push_topology(weights, self.n, self._wrapper_name)
            # the wrappers' own rule for P(t): one definition for MPI, sim and vsim
            self._pw = PushWeights(lambda: self.topology, self._push_source)
            wrapper_cls = _PushSumAdapt if wrapper_cls is PushSum else _PushDIGingAdapt
        elif wrapper_cls is ChocoSGD and isinstance(kwargs.get("compression"), Compressor):
            # anything else reaches ChocoSGD's own TypeError
            self._compressor = kwargs["compression"] = _PerNodeCompressor(
                kwargs["compression"], self.n)
        self.optimizer: DecentralizedOptimizer = wrapper_cls(
            inner, communicator=SimNodeCommunicator(self, 0),  # type: ignore[arg-type]
            broadcast_parameters=False, check_parameters=False, **kwargs)
        if self._compressor is not None:
            self._compressor.bind(self.optimizer)
        for k, (buf, b) in enumerate(zip(self.optimizer._mix_buffers(), self.optimizer._buckets)):
            if buf.numel() % b.numel:  # pragma: no cover - every supported wrapper's is
                raise DecommError(f"mix buffer {k} of {buf.numel()} elements is not made "
                                  f"of whole segments of its bucket ({b.numel})")
        device = next(iter(self._stacked.values())).device
        self.push_weights: Tensor | None = (
            torch.ones(self.n, dtype=torch.float64, device=device)
            if self._pw is not None else None)
        # overlapped PushSum: tau + 1 message slots (numerators per bucket, weights in the
        # first bucket's dtype) and the slots in flight, oldest first, as PushSum keeps them
        self._slots: list[list[Tensor]] = []
        self._slot_w: list[Tensor] = []
        self._queue: list[int] = []
        if self._tau:
            buckets = self.optimizer._buckets
            self._slots = [[torch.zeros_like(b.flat) for b in buckets]
                           for _ in range(self._tau + 1)]
            self._slot_w = [torch.zeros(self.n, dtype=buckets[0].dtype, device=device)
                            for _ in range(self._tau + 1)]
        self._keep_cache: dict[int, Tensor] = {}

    def _stacked_copy(self, template: nn.Module) -> nn.Module:
        """A copy of ``template`` whose parameters are the stacked tensors (tied kept tied)."""
        by_id = {id(p): self._stacked[name] for name, p in template.named_parameters()}
        clone = copy.deepcopy(template)
        originals = dict(template.named_modules())
        for mod_name, mod in clone.named_modules():
            src = originals[mod_name]
            for pname, p in list(src._parameters.items()):
                if p is not None:
                    mod._parameters[pname] = by_id[id(p)]
        return clone

    # ----------------------------------------------------------------- mixing
    def _round_coo(self, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(rows, cols, values)`` of round ``t``'s matrix in the receiver convention."""
        if self._pw is not None:  # the wrapper's own P(t) (uniform split or its weights=)
            m = self._pw.matrix(t)
            if hasattr(m, "tocoo"):  # scipy.sparse
                c = m.tocoo()
                rows, cols, vals = np.asarray(c.row), np.asarray(c.col), np.asarray(c.data)
            else:
                dense = np.asarray(m, dtype=np.float64)  # a dense array without SciPy
                rows, cols = np.nonzero(dense)
                vals = dense[rows, cols]
            if self._tau:  # overlapped PushSum: the self share is kept at once, not sent
                sent = rows != cols
                rows, cols, vals = rows[sent], cols[sent], vals[sent]
            return rows, cols, vals
        r = self.topology.sparse(t)
        return r.row_ids, r.indices, r.data

    def _round_index(self, t: int) -> tuple[int, int | None]:
        """``(cache key of round t, rounds of the cycle or None for a random family)``."""
        rounds = self.topology.rounds if self._push_source is None else self._push_source.rounds
        return (t % rounds if rounds else t), rounds

    def _keep_shares(self, t: int, device: torch.device) -> Tensor:
        """``P(t)[i, i]`` of every node (float64): what overlapped PushSum keeps at once,
        by :meth:`PushWeights.of`, the rule each rank's wrapper uses (cached per round)."""
        assert self._pw is not None
        idx, rounds = self._round_index(t)
        hit = self._keep_cache.get(idx)
        if hit is None or hit.device != device:
            hit = torch.tensor([self._pw.of(i, t)[0] for i in range(self.n)],
                               dtype=torch.float64, device=device)
            if not rounds and len(self._keep_cache) > 8:  # random family: a few rounds
                self._keep_cache.clear()
            self._keep_cache[idx] = hit
        return hit

    def mixing_matrix(self, t: int, dtype: torch.dtype = torch.float64,
                      device: torch.device | str = "cpu") -> Tensor:
        """Round ``t``'s mixing matrix ``W(t)`` (PushSum, PushDIGing: ``P(t)``; overlapped
        PushSum: ``P(t) − diag P(t)``, the part that travels), receiver convention.

        Dense ``(n, n)`` for n ≤ :data:`DENSE_MAX_NODES`, else sparse COO; cached
        per cycle index, dtype and device (a few rounds for random families).
        """
        device = torch.device(device)
        idx, rounds = self._round_index(t)
        key = (idx, dtype, device)
        w = self._w_cache.get(key)
        if w is not None:
            return w
        rows, cols, vals = self._round_coo(t)
        index = torch.from_numpy(np.stack([rows, cols]).astype(np.int64))
        values = torch.from_numpy(np.array(vals, dtype=np.float64)).to(dtype)
        sp = torch.sparse_coo_tensor(index, values, (self.n, self.n),
                                     check_invariants=True).coalesce()
        w = sp.to_dense() if self.n <= DENSE_MAX_NODES else sp
        w = w.to(device)
        if not rounds and len(self._w_cache) > 8:  # random family: keep a few rounds
            self._w_cache.clear()
        self._w_cache[key] = w
        return w

    def _blocks(self, buf: Tensor, bucket: Any) -> list[Tensor]:
        """``buf`` (a mix buffer of ``bucket``) as ``(n, d_k)`` blocks, one per parameter
        per segment: row ``i`` of a block is node ``i``'s part of the message."""
        n = self.n
        out = []
        for seg in range(buf.numel() // bucket.numel):
            base = seg * bucket.numel
            for off, p in zip(bucket.offsets, bucket.params):
                out.append(buf[base + off: base + off + p.numel()].view(n, -1))
        return out

    def _mix_blocks(self, blocks: list[Tensor], mix: Mix) -> None:
        """``X ← W(t) X`` (or the exact average) for every ``(n, d)`` block, in place."""
        if not blocks:
            return
        x0 = blocks[0]
        dtype = x0.dtype if x0.dtype in (torch.float32, torch.float64) else torch.float32
        w = None if mix is Mix.GLOBAL else self.mixing_matrix(self.round, dtype, x0.device)
        for x in blocks:
            work = x if x.dtype == dtype else x.to(dtype)
            if w is None:
                y = work.mean(dim=0, keepdim=True).expand_as(work)
            elif w.is_sparse:
                y = torch.sparse.mm(w, work)
            else:
                key = (work.shape[1], dtype, work.device)
                y = self._scratch.get(key)
                if y is None:
                    y = self._scratch[key] = torch.empty_like(work)
                torch.mm(w, work, out=y)
            x.copy_(y)

    def _mix(self, mix: Mix) -> None:
        bufs = self.optimizer._mix_buffers()
        for buf, bucket in zip(bufs, self.optimizer._buckets, strict=True):
            self._mix_blocks(self._blocks(buf, bucket), mix)

    def _mix_push_weights(self, mix: Mix) -> None:
        """``w ← P(t) w`` in the first bucket's dtype (the weight travels in its message)."""
        assert self.push_weights is not None
        dtype = self.optimizer._buckets[0].dtype
        w = self.push_weights.to(dtype).unsqueeze(1)
        self._mix_blocks([w], mix)
        self.push_weights.copy_(w.squeeze(1).double())

    def _scale_rows(self, factors: Tensor, divide: bool = False) -> None:
        """Node ``i``'s parameters times (or divided by) ``factors[i]``, in place."""
        for p in self._stacked.values():
            f = factors.to(p.dtype).view(-1, *([1] * (p.dim() - 1)))
            if divide:
                p.data.div_(f)
            else:
                p.data.mul_(f)

    def _scale_by_push_weights(self, divide: bool) -> None:
        """``x = w z`` (``divide=False``) or ``z = x / w`` on every node's parameters."""
        assert self.push_weights is not None
        if divide:
            bad = torch.nonzero(~(self.push_weights > 0.0)).flatten().tolist()
            if bad:
                raise DecommError(
                    f"{self._wrapper_name}: push-sum weight became non-positive on node(s) "
                    f"{bad[:8]} (a node with no incoming mass: is the graph strongly "
                    f"connected?)")
        self._scale_rows(self.push_weights, divide)

    def _start_delayed_exchange(self) -> None:
        """Overlapped PushSum's gossip step ``c`` (Assran et al. 2019, Alg. 2), as
        :class:`~decomm.optim.PushSum` runs it on each rank: the message
        ``[x^{c+1/2}, w^c]`` goes into a free slot, every node keeps ``P(c)[i, i]`` of
        its mass at once, the slot is mixed with ``P(c) − diag P(c)`` and waits in the
        queue; the exchange started ``τ`` steps ago is applied."""
        assert self.push_weights is not None
        busy = set(self._queue)
        slot = next(s for s in range(self._tau + 1) if s not in busy)
        buckets = self.optimizer._buckets
        msg, msg_w = self._slots[slot], self._slot_w[slot]
        for b, m in zip(buckets, msg):
            m.copy_(b.flat)
        msg_w.copy_(self.push_weights)
        keep = self._keep_shares(self.round, self.push_weights.device)
        self._scale_rows(keep)  # P[i, i] x^{c+1/2}, kept
        self.push_weights.mul_(keep)
        for b, m in zip(buckets, msg):
            self._mix_blocks(self._blocks(m, b), Mix.NEIGHBOR)  # (P(c) − diag) x^{c+1/2}
        self._mix_blocks([msg_w.unsqueeze(1)], Mix.NEIGHBOR)
        self._queue.append(slot)
        self._drain(len(self._queue) - self._tau)

    def _drain(self, count: int) -> None:
        """Apply the ``count`` oldest exchanges in flight to the numerators and weights."""
        assert self.push_weights is not None
        for _ in range(max(count, 0)):
            slot = self._queue.pop(0)
            for b, m in zip(self.optimizer._buckets, self._slots[slot]):
                b.flat.add_(m)
            self.push_weights.add_(self._slot_w[slot].double())

    @property
    def in_flight(self) -> int:
        """Overlapped PushSum: exchanges started and not yet applied (else 0)."""
        return len(self._queue)

    def flush(self) -> None:
        """Overlapped PushSum: complete and apply every exchange in flight, as
        :meth:`decomm.optim.PushSum.flush` does on every rank (call it before
        evaluating the final model); a no-op otherwise."""
        if not self._queue:
            return
        with torch.no_grad():
            self._scale_by_push_weights(divide=False)
            self._drain(len(self._queue))
            self._scale_by_push_weights(divide=True)

    # ------------------------------------------------------------------- step
    def _grads(self, loss_fn: Callable[..., Tensor], batch: Sequence[Tensor]) -> Tensor:
        """Per-node gradients into ``.grad`` of the stacked parameters; the n losses.

        The vmapped forward gives the n losses ``L_i(θ_i)``; node i's loss depends on
        its own slice ``θ_i`` only, so one backward of ``Σ_i L_i`` through the stacked
        parameters yields every node's own gradient ``∇L_i(θ_i)`` in row i.  (Faster
        than ``vmap(grad(L))``: the backward runs on the batched kernels the forward
        recorded instead of through vmap's batching rules again.)
        """
        module = self.model

        def node_loss(params: dict[str, Tensor], buffers: dict[str, Tensor],
                      *data: Tensor) -> Tensor:
            return loss_fn(_NodeModel(module, params, buffers), *data)

        for p in self._stacked.values():
            p.grad = None
        fn = torch.func.vmap(node_loss, in_dims=(0, None, *([0] * len(batch))),
                             randomness=self.randomness)
        versions = {k: b._version for k, b in self._buffers.items()}
        try:
            with torch.enable_grad():
                losses = fn(dict(self._stacked), self._buffers, *batch)
                self._check_buffers(versions)
                if not isinstance(losses, Tensor) or losses.shape != (self.n,):
                    got = (tuple(losses.shape[1:]) if isinstance(losses, Tensor)
                           else type(losses).__name__)
                    raise DecommError(
                        f"loss_fn must return one scalar tensor per node, got {got} per "
                        f"node")
                if losses.requires_grad:
                    losses.sum().backward()
        except DecommError:
            raise
        except RuntimeError as e:
            raise _explain(e) from e
        return losses.detach()

    def _check_buffers(self, versions: dict[str, int]) -> None:
        """Refuse a forward that wrote to a module buffer: one copy is shared by all nodes."""
        changed = [k for k, b in self._buffers.items() if b._version != versions[k]]
        if changed:
            raise DecommError(
                f"the forward modified the module buffer(s) {changed} in place; buffers are "
                f"not stacked (one copy is shared by all nodes), so per-node module state "
                f"cannot be vectorized: keep the forward functional or use "
                f"decomm.sim.Simulation")

    def step(self, loss_fn: Callable[..., Tensor] | None = None, *batch: Tensor) -> Tensor | None:
        """One synchronous step of all nodes; returns the ``(n,)`` losses (or ``None``).

        ``loss_fn(model, *node_batch)`` is one node's loss, written for a single
        node: ``model(x)`` runs the model with that node's parameters, and each
        ``node_batch[k]`` is ``batch[k][i]`` (every batch tensor has leading
        dimension n).  It is vmapped, so it must be functional: no ``.item()``,
        no data-dependent Python control flow, no in-place updates of captured
        tensors.  With ``loss_fn=None`` the gradients already in ``.grad`` of the
        stacked parameters are used (``None`` counts as zero).
        """
        losses: Tensor | None = None
        if loss_fn is not None:
            for k, t in enumerate(batch):
                if not isinstance(t, Tensor) or t.dim() == 0 or t.shape[0] != self.n:
                    got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                    raise ValueError(
                        f"batch[{k}]: expected a tensor with leading dimension n = "
                        f"{self.n} (node i's data at index i), got {got}")
            losses = self._grads(loss_fn, batch)
        elif batch:
            raise TypeError("batch given without loss_fn")
        self._step_all()
        return losses

    def _step_all(self) -> None:
        opt = self.optimizer
        push = self._pw is not None
        with torch.no_grad():
            mix = opt._plan()
            if push:
                self._scale_by_push_weights(divide=False)  # x = w z (PushDIGing: u = v x)
            opt._run_local(mix)
            if self._tau and mix is Mix.NEIGHBOR:
                self._start_delayed_exchange()
            elif mix is not Mix.NONE:
                if self._tau:  # a global step's exact average includes all mass in flight
                    self._drain(len(self._queue))
                self._mix(mix)
                if push:
                    self._mix_push_weights(mix)
            opt._run_finish(mix)
            if push:
                self._scale_by_push_weights(divide=True)  # z = x / w
        if mix is Mix.NEIGHBOR:
            self.round += 1

    def run(self, loss_fn: Callable[..., Tensor], batches: Callable[[int], Sequence[Tensor]],
            steps: int) -> Tensor:
        """``steps`` calls of :meth:`step` with ``batches(s)``; the ``(steps, n)`` losses."""
        out = [self.step(loss_fn, *batches(s)) for s in range(steps)]
        return torch.stack([t for t in out if t is not None])

    def map(self, fn: Callable[..., Tensor], *batch: Tensor) -> Tensor:
        """``fn(model, *node_batch)`` for every node at once, without gradients.

        E.g. per-node accuracies: ``vs.map(lambda m, x, y: (m(x).argmax(1) == y)
        .float().mean(), X, Y)`` with ``X``, ``Y`` of leading dimension n (use
        ``X.expand(n, ...)`` for one shared test set).
        """
        module = self.model

        def node_fn(params: dict[str, Tensor], buffers: dict[str, Tensor],
                    *data: Tensor) -> Tensor:
            return fn(_NodeModel(module, params, buffers), *data)

        params = {k: p.detach() for k, p in self._stacked.items()}
        versions = {k: b._version for k, b in self._buffers.items()}
        with torch.no_grad():
            try:
                out = torch.func.vmap(node_fn, in_dims=(0, None, *([0] * len(batch))),
                                      randomness=self.randomness)(params, self._buffers, *batch)
            except RuntimeError as e:
                raise _explain(e) from e
        self._check_buffers(versions)
        return out

    # -------------------------------------------------------------- inspection
    def stacked_parameters(self) -> dict[str, Tensor]:
        """The stacked parameters by name, shape ``(n, *s)`` (the live tensors)."""
        return dict(self._stacked)

    def params(self, i: int) -> Tensor:
        """Node ``i``'s parameters, flattened in ``model.parameters()`` order (a copy)."""
        if not 0 <= int(i) < self.n:
            raise ValueError(f"node index {i} out of range for n = {self.n}")
        return torch.cat([p.detach()[int(i)].reshape(-1) for p in self._stacked.values()])

    def param_matrix(self) -> Tensor:
        """All nodes' parameters as an ``(n, d)`` tensor (a copy)."""
        return torch.cat([p.detach().reshape(self.n, -1) for p in self._stacked.values()], dim=1)

    def average_params(self) -> Tensor:
        """``x̄ = (1/n) Σ_i x_i`` (flat, float64)."""
        return self.param_matrix().double().mean(dim=0)

    def consensus_distance(self) -> float:
        """``(1/n) Σ_i ‖x_i − x̄‖²``, in float64, one parameter at a time (no ``(n, d)``
        float64 copy of the whole model: 25 VGG-11 nodes would need 1.8 GB for it)."""
        total = 0.0
        for p in self._stacked.values():
            x = p.detach().reshape(self.n, -1).double()
            total += float((x - x.mean(dim=0)).square().sum())
        return total / self.n

    def node_model(self, i: int) -> nn.Module:
        """A standalone copy of the model with node ``i``'s parameters (e.g. to save)."""
        if not 0 <= int(i) < self.n:
            raise ValueError(f"node index {i} out of range for n = {self.n}")
        m = copy.deepcopy(self.model)
        with torch.no_grad():
            for name, p in m.named_parameters():
                p.copy_(self._stacked[name][int(i)])
        return m

    # ------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Stacked parameters, the wrapper's state, round, push weights, overlapped
        PushSum's messages in flight and ChocoSGD's per-node generators (copies)."""
        return {
            "round": self.round,
            "n": self.n,
            "params": {k: p.detach().clone() for k, p in self._stacked.items()},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "push_weights": None if self.push_weights is None else self.push_weights.clone(),
            "in_flight": None if not self._tau else {
                "slots": [[m.clone() for m in slot] for slot in self._slots],
                "weights": [w.clone() for w in self._slot_w],
                "queue": list(self._queue)},
            "compression_generators": (None if self._compressor is None
                                       else self._compressor.generator_states()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["n"]) != self.n:
            raise ValueError(f"state has {state['n']} nodes, this simulation has {self.n}")
        if set(state["params"]) != set(self._stacked):
            raise ValueError("state holds different parameters than this model")
        with torch.no_grad():
            for k, p in self._stacked.items():
                p.copy_(state["params"][k])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.push_weights is not None:
            self.push_weights.copy_(state["push_weights"])
        if self._tau:
            held = state.get("in_flight")
            if held is None or len(held["slots"]) != self._tau + 1:
                raise ValueError(f"state holds no in-flight messages of PushSum with "
                                 f"overlap={self._tau}")
            with torch.no_grad():
                for slot, saved in zip(self._slots, held["slots"]):
                    for m, v in zip(slot, saved):
                        m.copy_(v)
                for w, v in zip(self._slot_w, held["weights"]):
                    w.copy_(v)
            self._queue = [int(s) for s in held["queue"]]
        if self._compressor is not None and state.get("compression_generators") is not None:
            self._compressor.load_generator_states(state["compression_generators"])
        self.round = int(state["round"])

    def __repr__(self) -> str:
        extra = f", overlap={self._tau}" if self._tau else ""
        return (f"VectorizedSimulation(n={self.n}, topology={self.topology.name}, "
                f"wrapper={self._wrapper_name}{extra}, round={self.round})")


def _explain(err: RuntimeError) -> Exception:
    """vmap's errors for the usual causes, with what to do about them."""
    msg = str(err)
    low = msg.lower()
    if "randomness" in low:
        return DecommError(
            f"the model or loss uses random operations (dropout, ...): pass "
            f"randomness='different' (independent per node) or 'same' to "
            f"VectorizedSimulation (torch.func.vmap: {msg})")
    if ("inplace" in low or "in-place" in low or "mutat" in low
            or "doesn't match the broadcast shape" in low):
        return DecommError(
            f"the model or loss modifies a tensor in place that is shared by all nodes "
            f"(module state or a captured tensor), which cannot be vectorized over "
            f"nodes; keep the forward functional or use decomm.sim.Simulation "
            f"(torch.func.vmap: {msg})")
    if ".item()" in low or "data-dependent" in low:
        return DecommError(
            f"loss_fn and the model's forward are vmapped over nodes: no .item(), no "
            f"Python control flow that depends on tensor values (torch.func.vmap: {msg})")
    return err
