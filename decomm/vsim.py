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
  (``DSGD``, ``GradientTracking``, ``D2``, ``QGDSGDm``) wraps the stacked
  optimizer and runs its local and finish phases once, on the stacked flat
  buffers (their algebra is elementwise, so it acts on each node's entries as
  it would on that node alone);
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

Push-sum (:class:`decomm.optim.PushSum`, Assran et al., ICML 2019) with its
column-stochastic ``P(t)`` runs as DSGD's adapt phase (the inner optimizer
step) framed by the push-sum weights ``w`` (one per node, ``w^0 = 1``), as
:class:`~decomm.optim.PushSum` does per rank: ``x = w z``, ``x ← x − u``,
``[x, w] ← P(t) [x, w]``, ``z = x / w``.  ``P(t)`` is PushSum's own
(:class:`decomm.optim.push_sum.PushWeights`: the uniform split
``P[j, i] = 1/(outdeg_i(t) + 1)`` over the topology's out-neighbours and ``i``
itself, or the explicit ``weights=``).  PushSum's ``w`` is one scalar per
wrapper, so its phases cannot run once for all nodes; this framing is the one
place where the vectorized simulator restates an algorithm's equations
(overlapped PushSum, ``overlap=``, is not vectorized).

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
to be elementwise over nodes (subclasses, ``AsyncGossip``, compressed or other
wrappers; use :class:`decomm.sim.Simulation`), and GradScaler mixed precision.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from decomm.errors import DecommError
from decomm.optim import D2, DSGD, DecentralizedOptimizer, GradientTracking, Mix, PushSum, QGDSGDm
from decomm.optim.push_sum import PushWeights, _push_topology
from decomm.sim import SimNodeCommunicator, as_topology
from decomm.topology import Topology

__all__ = [
    "DENSE_MAX_NODES",
    "ELEMENTWISE_OPTIMIZERS",
    "SUPPORTED_WRAPPERS",
    "VectorizedSimulation",
]

#: the wrapper classes whose phases the vectorized simulator runs on stacked buffers
#: (their algebra is elementwise over nodes); PushSum runs as described in the module
SUPPORTED_WRAPPERS: tuple[type[DecentralizedOptimizer], ...] = (
    DSGD, GradientTracking, D2, QGDSGDm, PushSum)

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
            them (a cycle); ``n = topology.n``.  PushSum uses only its graph, like
            :class:`~decomm.optim.PushSum` (or ``weights=``).
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
            ``weights``, ...).

    Attributes: ``model`` (the functional template, node 0's module structure:
    call ``.train()`` / ``.eval()`` on it), ``stacked_model`` (the module whose
    parameters are the stacked tensors), ``optimizer`` (the wrapper: give it to
    LR schedulers), ``topology``, ``n``, ``round``, ``push_weights`` (PushSum
    only: the ``(n,)`` float64 push-sum weights).
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
        self._push = wrapper_cls is PushSum
        kwargs = dict(wrapper_kwargs)
        self._push_source: Topology | None = None
        self._pw: PushWeights | None = None
        if self._push:
            allowed = {"weights", "communicate_every", "global_every"}
            extra = sorted(set(kwargs) - allowed)
            if extra:
                raise TypeError(
                    f"VectorizedSimulation runs PushSum with {sorted(allowed)} only, got "
                    f"{extra} (overlap=: its delayed messages are per node; use "
                    f"decomm.sim.Simulation)")
            weights = kwargs.pop("weights", None)
            if weights is not None:
                # PushSum's own validation; its round t is P(t)ᵀ
                self._push_source = _push_topology(weights, self.n)
            # PushSum's own rule for P(t): one definition for MPI, sim and vsim
            self._pw = PushWeights(lambda: self.topology, self._push_source)
            wrapper_cls = _PushSumAdapt
        self.optimizer: DecentralizedOptimizer = wrapper_cls(
            inner, communicator=SimNodeCommunicator(self, 0),  # type: ignore[arg-type]
            broadcast_parameters=False, check_parameters=False, **kwargs)
        for k, (buf, b) in enumerate(zip(self.optimizer._mix_buffers(), self.optimizer._buckets)):
            if buf.numel() % b.numel:  # pragma: no cover - every supported wrapper's is
                raise DecommError(f"mix buffer {k} of {buf.numel()} elements is not made "
                                  f"of whole segments of its bucket ({b.numel})")
        device = next(iter(self._stacked.values())).device
        self.push_weights: Tensor | None = (
            torch.ones(self.n, dtype=torch.float64, device=device) if self._push else None)

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
        if self._pw is not None:  # PushSum's own P(t) (uniform split or its weights=)
            m = self._pw.matrix(t)
            if hasattr(m, "tocoo"):  # scipy.sparse
                c = m.tocoo()
                return np.asarray(c.row), np.asarray(c.col), np.asarray(c.data)
            dense = np.asarray(m, dtype=np.float64)  # a dense array without SciPy
            rows, cols = np.nonzero(dense)
            return rows, cols, dense[rows, cols]
        r = self.topology.sparse(t)
        return r.row_ids, r.indices, r.data

    def mixing_matrix(self, t: int, dtype: torch.dtype = torch.float64,
                      device: torch.device | str = "cpu") -> Tensor:
        """Round ``t``'s mixing matrix ``W(t)`` (PushSum: ``P(t)``), receiver convention.

        Dense ``(n, n)`` for n ≤ :data:`DENSE_MAX_NODES`, else sparse COO; cached
        per cycle index, dtype and device (a few rounds for random families).
        """
        device = torch.device(device)
        rounds = self.topology.rounds if self._push_source is None else self._push_source.rounds
        idx = t % rounds if rounds else t
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
        new = w.squeeze(1).double()
        bad = torch.nonzero(~(new > 0.0)).flatten().tolist()
        if bad:
            raise DecommError(
                f"PushSum: push-sum weight became non-positive on node(s) {bad[:8]} "
                f"(a node with no incoming mass: is the graph strongly connected?)")
        self.push_weights.copy_(new)

    def _scale_by_push_weights(self, divide: bool) -> None:
        """``x = w z`` (``divide=False``) or ``z = x / w`` on every node's parameters."""
        assert self.push_weights is not None
        for p in self._stacked.values():
            w = self.push_weights.to(p.dtype).view(-1, *([1] * (p.dim() - 1)))
            if divide:
                p.data.div_(w)
            else:
                p.data.mul_(w)

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
        with torch.no_grad():
            mix = opt._plan()
            if self._push:
                self._scale_by_push_weights(divide=False)  # x = w z
            opt._run_local(mix)
            if mix is not Mix.NONE:
                self._mix(mix)
                if self._push:
                    self._mix_push_weights(mix)
            opt._run_finish(mix)
            if self._push:
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
        """Stacked parameters, the wrapper's state, round and push weights (copies)."""
        return {
            "round": self.round,
            "n": self.n,
            "params": {k: p.detach().clone() for k, p in self._stacked.items()},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "push_weights": None if self.push_weights is None else self.push_weights.clone(),
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
        self.round = int(state["round"])

    def __repr__(self) -> str:
        cls = "PushSum" if self._push else type(self.optimizer).__name__
        return (f"VectorizedSimulation(n={self.n}, topology={self.topology.name}, "
                f"wrapper={cls}, round={self.round})")


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
