"""Single-process simulation of n decentralized nodes running decomm.optim wrappers.

Each virtual node has its own model copy, its own torch optimizer wrapped by
the same wrapper class used under MPI (``DSGD``, ``GradientTracking``, ``D2``,
``QGDSGDm``, ``ExactDiffusion``, ``PushSum``, ``PushDIGing``, ``ChocoSGD``), and
its own data (the loss function receives the node index).  ChocoSGD compresses
per node, as under MPI: node ``i``'s wrapper compresses its own message, drawing
stochastic compressors' numbers from the stream ``(rank i, bucket)``, and the
simulator mixes the dense decompressed messages (the same numbers a rank adds
from its in-neighbours' payloads).
A step runs the wrappers' *local phase* on every node, mixes the n flat
communication buffers with the topology's sparse ``W(t)`` (``Y = W(t) @ X``, X
the n buffers stacked as rows), runs the *finish phase* on every node and
advances the simulation's own round counter.  The algorithm algebra is the
wrappers' (one code path with the MPI run); only the mixing differs, so a
simulation is an oracle for an MPI run with the same data, topology and seed
(equal up to floating-point summation order).

Example: 1000 nodes, heterogeneous linear regression, one-peer exponential graph::

    import torch
    from decomm.sim import Simulation
    from decomm.optim import GradientTracking
    from decomm.topology import OnePeerExponentialGraph

    n, d = 1000, 10
    g = torch.Generator().manual_seed(0)
    A = torch.randn(n, 32, d, generator=g)           # node i owns (A[i], b[i])
    b = torch.randn(n, 32, generator=g)

    sim = Simulation(
        OnePeerExponentialGraph(n),
        make_model=lambda: torch.nn.Linear(d, 1, bias=False),
        make_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.05),
        wrapper_cls=GradientTracking,
    )

    def loss_fn(i, model):
        return 0.5 * (model(A[i]).squeeze(1) - b[i]).square().mean()

    for _ in range(200):
        losses = sim.step(loss_fn)                   # one list of n floats
    print(sim.consensus_distance(), sim.average_params())

All nodes start from identical parameters (node 0's; ``identical_init=False``
calls ``make_model()`` once per node instead).  Cost per step: n local
forward/backward/optimizer steps in Python plus one sparse
``(n × n) @ (n × D)`` product per dtype: the example above takes about 3 s to
build and 0.6 s per step on one core of a loaded 2-core machine (call
``torch.set_num_threads(1)`` for such tiny models: OpenMP threads only add
contention).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

try:
    import scipy.sparse as _sp
except ImportError:  # pragma: no cover - scipy ships with scikit-learn
    _sp = None
from torch import Tensor, nn

from decomm.errors import DecommError
from decomm.optim import DSGD, DecentralizedOptimizer, Mix, PendingExchange
from decomm.topology import Topology

__all__ = ["SimNodeCommunicator", "Simulation", "as_topology"]

#: the wrapper classes of decomm.optim that the simulator runs
SUPPORTED_WRAPPERS = ("DSGD", "GradientTracking", "D2", "QGDSGDm", "PushSum", "PushDIGing",
                      "ExactDiffusion", "ChocoSGD")


def as_topology(topology: Any) -> Topology:
    """A :class:`~decomm.topology.Topology` as is; an n×n matrix (numpy array, torch
    tensor, nested list) or a list of them via ``Topology.from_matrices``.

    Raises:
        TypeError: for anything else (the simulator mixes with ``Topology.sparse``,
            which only a Topology has).
    """
    if isinstance(topology, Topology):
        return topology
    if not isinstance(topology, (np.ndarray, Tensor, list, tuple)):
        raise TypeError(
            f"topology must be a decomm.topology.Topology, an n x n matrix or a list of "
            f"them, got {type(topology).__name__}")
    return Topology.from_matrices(topology)


class SimNodeCommunicator:
    """The communicator of one simulated node: mixing is done by the Simulation."""

    supports_nonblocking = False
    limits_message_size = False  # mixing is in-process: no MPI message size limit
    #: the Simulation mixes with a wrapper's ``_sim_mixing_matrix(t)`` where it has one
    #: (the push-sum wrappers' column-stochastic P(t)) instead of the topology's W(t)
    honours_mixing_matrix = True

    def __init__(self, sim: Simulation, node: int) -> None:
        self._sim = sim
        self._node = node

    def rank(self) -> int:
        return self._node

    def size(self) -> int:
        return self._sim.n

    def topology(self) -> Any:
        return self._sim.topology

    def current_round(self) -> int:
        return self._sim.round

    def advance_round(self) -> None:
        self._refuse("advance_round")

    def set_round(self, round_: int) -> None:
        self._sim.round = int(round_)

    def _refuse(self, what: str) -> Any:
        raise DecommError(
            f"simulated node {self._node} cannot call {what} on its own: drive all "
            f"nodes with Simulation.step()"
        )

    def neighbor_allreduce_(self, tensor: Tensor, name: str | None = None) -> Tensor:
        return self._refuse("neighbor_allreduce_")  # type: ignore[no-any-return]

    def neighbor_allreduce_nonblocking_(
        self, tensor: Tensor, name: str | None = None
    ) -> PendingExchange:
        return self._refuse("neighbor_allreduce_nonblocking_")  # type: ignore[no-any-return]

    def allreduce_(self, tensor: Tensor, average: bool = True, name: str | None = None) -> Tensor:
        return self._refuse("allreduce_")  # type: ignore[no-any-return]

    def broadcast_(self, tensor: Tensor, root: int = 0, name: str | None = None) -> Tensor:
        return self._refuse("broadcast_")  # type: ignore[no-any-return]

    def allgather(self, tensor: Tensor, name: str | None = None) -> Tensor:
        return self._refuse("allgather")  # type: ignore[no-any-return]


class Simulation:
    """n virtual nodes, each a model + a wrapped optimizer, mixed in-process.

    Args:
        topology: a :class:`decomm.topology.Topology` (or an n×n matrix, or a list
            of them, taken as a cycle).  ``n = topology.n``.
        make_model: ``() -> nn.Module``; called once (then deep-copied) or once
            per node with ``identical_init=False``.
        make_optimizer: ``(model) -> torch.optim.Optimizer`` for one node.
        wrapper_cls: the decomm.optim wrapper class (default ``DSGD``): one of
            the synchronous wrappers ``DSGD``, ``GradientTracking``, ``D2``,
            ``QGDSGDm``, ``ExactDiffusion``, ``PushSum`` (``overlap`` included),
            ``PushDIGing``, ``ChocoSGD`` (static topologies, as under MPI) or a
            subclass; the push-sum wrappers are mixed with
            their column-stochastic ``P(t)`` (built from the topology's graph or
            their ``weights=``), not with ``W(t)``.  ``AsyncGossip`` (one-sided
            windows, no common round) needs the MPI runtime; a ``TypeError`` says so.
        identical_init: start every node from node 0's parameters (what the
            MPI wrappers' constructor broadcast does).
        buffers: ``None`` (default; module buffers such as BatchNorm running
            statistics stay local to each node), ``"mix"`` or ``"average"``:
            every node's wrapper exchanges its own model's floating-point
            buffers, as ``buffers=model, buffer_mode=...`` does under MPI (see
            :meth:`decomm.optim.DecentralizedOptimizer.sync_buffers`); the
            simulator mixes them with ``W(t)`` (also for the push-sum wrappers,
            as under MPI) or averages them exactly.
        buffer_every: exchange the buffers on every ``k``-th communicating step.
        **wrapper_kwargs: passed to every wrapper (``communicate_every``,
            ``combine_first``, ``global_every``, ``momentum``, ...).

    Attributes: ``models``, ``optimizers`` (the wrappers), ``topology``, ``n``,
    ``round`` (the topology round of the next gossip step).
    """

    def __init__(
        self,
        topology: Any,
        make_model: Callable[[], nn.Module],
        make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
        wrapper_cls: type[DecentralizedOptimizer] = DSGD,
        *,
        identical_init: bool = True,
        buffers: str | None = None,
        buffer_every: int = 1,
        **wrapper_kwargs: Any,
    ) -> None:
        if not (isinstance(wrapper_cls, type) and issubclass(wrapper_cls, DecentralizedOptimizer)):
            raise TypeError(
                f"wrapper_cls must be a decomm.optim wrapper class, got {wrapper_cls!r}"
            )
        reason = getattr(wrapper_cls, "_simulation_unsupported", None)
        if reason:
            raise TypeError(
                f"Simulation cannot run {wrapper_cls.__name__}: {reason}. The simulator "
                f"supports the synchronous wrappers whose step is local phase, one mix "
                f"with W(t), finish phase: {', '.join(SUPPORTED_WRAPPERS)} (and their "
                f"subclasses); run {wrapper_cls.__name__} under MPI (decomm-run / mpirun)"
            )
        for key in ("communicator", "broadcast_parameters", "check_parameters"):
            if key in wrapper_kwargs:
                raise TypeError(f"Simulation sets {key!r} itself")
        if "buffer_mode" in wrapper_kwargs:
            raise TypeError("Simulation: pass buffers='mix' or buffers='average' (each "
                            "node's wrapper then exchanges its own model's buffers)")
        if buffers is not None and not isinstance(buffers, str):
            raise TypeError(
                f"Simulation(buffers=...) takes the mode, 'mix' or 'average' (every node "
                f"exchanges its own model's buffers), got {type(buffers).__name__}")
        self.topology = as_topology(topology)
        self.n: int = int(self.topology.n)
        self.round: int = 0
        self._w_cache: dict[tuple[int, torch.dtype], Any] = {}
        self.models: list[nn.Module] = []
        self.optimizers: list[DecentralizedOptimizer] = []
        first = make_model()
        for i in range(self.n):
            if i == 0:
                model = first
            elif identical_init:
                model = copy.deepcopy(first)
            else:
                model = make_model()
            self.models.append(model)
            self.optimizers.append(
                wrapper_cls(
                    make_optimizer(model),
                    communicator=SimNodeCommunicator(self, i),
                    broadcast_parameters=False,
                    check_parameters=False,
                    **wrapper_kwargs,
                )
            )
            if buffers is not None:
                self.optimizers[-1].sync_buffers(model, mode=buffers, every=buffer_every)
        shapes = [tuple((b.numel, b.dtype) for b in o._buckets) for o in self.optimizers]
        if any(s != shapes[0] for s in shapes):
            i = next(k for k, s in enumerate(shapes) if s != shapes[0])
            raise DecommError(
                f"simulated node {i} has parameter buckets {shapes[i]} but node 0 has "
                f"{shapes[0]}: every node must build the same model"
            )

    # ----------------------------------------------------------------- mixing
    def _csr(self, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Round ``t`` in CSR arrays ``(indptr, indices, data)``, float64."""
        sr = self.topology.sparse(t)
        return np.array(sr.indptr), np.array(sr.indices), np.array(sr.data, dtype=np.float64)

    def mixing_matrix(self, t: int, dtype: torch.dtype = torch.float64) -> Any:
        """Round ``t``'s W in sparse form (cached per cycle index and dtype).

        A ``scipy.sparse.csr_matrix`` when SciPy is available (fastest on CPU),
        else a coalesced torch sparse COO tensor.
        """
        rounds = self.topology.rounds
        key = (t % rounds if rounds else t, dtype)
        w = self._w_cache.get(key)
        if w is not None:
            return w
        indptr, indices, data = self._csr(t)
        if _sp is not None:
            np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
            w = _sp.csr_matrix((data.astype(np_dtype), indices, indptr), shape=(self.n, self.n))
        else:
            rows = np.repeat(np.arange(self.n), np.diff(indptr))
            w = torch.sparse_coo_tensor(
                torch.as_tensor(np.stack([rows, indices])),
                torch.as_tensor(data).to(dtype),
                (self.n, self.n),
                check_invariants=True,
            ).coalesce()
        if not rounds and len(self._w_cache) > 8:  # random family: keep a few rounds
            self._w_cache.clear()
        self._w_cache[key] = w
        return w

    def _apply(self, x: Tensor, wrapper_matrix: bool = True) -> Tensor:
        """``W(round) @ x`` for the stacked ``(n, D)`` buffers ``x``.

        A wrapper with a ``_sim_mixing_matrix(t)`` (push-sum: a column-stochastic
        ``P(t)`` as a float64 ``scipy.sparse`` matrix) is mixed with that instead,
        unless ``wrapper_matrix=False`` (module buffers: always ``W(t)``).
        """
        custom = (getattr(self.optimizers[0], "_sim_mixing_matrix", None)
                  if wrapper_matrix else None)
        if custom is not None:
            m = custom(self.round)
            np_dtype = torch.empty(0, dtype=x.dtype).numpy().dtype
            return torch.from_numpy(np.ascontiguousarray(
                m.astype(np_dtype) @ x.cpu().numpy())).to(x.device)
        w = self.mixing_matrix(self.round, x.dtype)
        if _sp is not None and x.device.type == "cpu":
            return torch.from_numpy(np.ascontiguousarray(w @ x.numpy()))
        if _sp is not None:
            w = self._torch_matrix(w)
        return torch.sparse.mm(w.to(x.device), x)

    @staticmethod
    def _torch_matrix(w: Any) -> Tensor:
        coo = w.tocoo()
        return torch.sparse_coo_tensor(
            torch.as_tensor(np.stack([coo.row, coo.col]).astype(np.int64)),
            torch.as_tensor(coo.data),
            coo.shape,
            check_invariants=True,
        ).coalesce()

    def _mix(self, mix: Mix, per_node: list[list[Tensor]] | None = None,
             wrapper_matrix: bool = True) -> None:
        if per_node is None:
            per_node = [o._mix_buffers() for o in self.optimizers]
        for k in range(len(per_node[0])):
            bufs = [b[k] for b in per_node]
            x = torch.stack(bufs)
            work = x if x.dtype in (torch.float32, torch.float64) else x.float()
            if mix is Mix.GLOBAL:
                y = work.mean(dim=0, keepdim=True).expand_as(work)
            else:
                y = self._apply(work, wrapper_matrix)
            y = y.to(x.dtype)
            for buf, row in zip(bufs, y):
                buf.copy_(row)

    def _mix_module_buffers(self, mix: Mix) -> None:
        """The module buffers' exchange of this step (``sync_buffers``), as under MPI:
        before the local phase, with ``W(t)`` or the exact average."""
        bmix = self.optimizers[0]._buffer_plan(mix)
        if bmix is Mix.NONE:
            return
        held = [o.module_buffers for o in self.optimizers]
        if any(mb is None for mb in held):
            raise DecommError("simulated nodes disagree on sync_buffers: call it on every "
                              "node's wrapper (or pass Simulation(buffers=...))")
        self._mix(bmix, [mb.pack() for mb in held], wrapper_matrix=False)  # type: ignore[union-attr]
        for mb in held:
            mb.unpack()  # type: ignore[union-attr]

    # ------------------------------------------------------------------- step
    def step(
        self,
        loss_fn: Callable[[int, nn.Module], Tensor] | None = None,
        *,
        scalers: Sequence[torch.amp.GradScaler] | None = None,
    ) -> list[float] | None:
        """One synchronous step of all nodes.

        ``loss_fn(i, model)`` returns node ``i``'s loss (its own data shard);
        the simulation zeroes the node's gradients, calls it, back-propagates,
        then runs the wrappers' local phase, the mix, and the finish phase.  With
        ``loss_fn=None`` the gradients already in ``.grad`` are used.  Returns
        the n losses (or ``None``).

        ``scalers``: one ``torch.amp.GradScaler`` per node, for mixed precision,
        doing what ``scaler.scale(loss).backward(); scaler.step(opt);
        scaler.update()`` does on every rank under MPI: node ``i``'s loss is
        scaled by ``scalers[i]`` before ``backward`` (with ``loss_fn``), its
        gradients are unscaled (``scalers[i].unscale_``); if any node's
        gradients are not finite, **every** node skips the step (no update, no
        mix, round unchanged); then every ``scalers[i].update()`` runs.  With a
        plain torch scaler only the overflowing nodes back off their scale;
        :class:`decomm.amp.GradScaler` backs off on every node.
        """
        if scalers is not None and len(scalers) != self.n:
            raise ValueError(f"scalers: expected one GradScaler per node ({self.n}), "
                             f"got {len(scalers)}")
        losses: list[float] | None = None
        if loss_fn is not None:
            losses = []
            for i, (model, opt) in enumerate(zip(self.models, self.optimizers)):
                opt.zero_grad()
                loss = loss_fn(i, model)
                (loss if scalers is None else scalers[i].scale(loss)).backward()
                losses.append(float(loss.detach()))
        if scalers is not None and self._amp_skip(scalers):
            return losses
        self._step_all()
        if scalers is not None:
            for s in scalers:
                s.update()
        return losses

    def _amp_skip(self, scalers: Sequence[torch.amp.GradScaler]) -> bool:
        """Unscale every node's gradients; if any node overflowed, skip on all."""
        from decomm.amp import GradScaler as AgreeingScaler

        overflow = False
        for s, o in zip(scalers, self.optimizers):
            s.unscale_(o)
            grads = [p.grad for p in o.params if p.grad is not None]
            overflow |= not all(bool(torch.isfinite(g).all()) for g in grads)
        if not overflow:
            return False
        for s, o in zip(scalers, self.optimizers):
            if isinstance(s, AgreeingScaler):
                s.record_found_inf(o, True)
            s.update()
        return True

    def _step_all(self) -> None:
        with torch.no_grad():
            mix = self.optimizers[0]._plan()
            self._mix_module_buffers(mix)
            for o in self.optimizers:
                o._run_local(mix)
            if mix is not Mix.NONE:
                self._mix(mix)
            for o in self.optimizers:
                o._run_finish(mix)
        if mix is Mix.NEIGHBOR:
            self.round += 1

    def run(self, loss_fn: Callable[[int, nn.Module], Tensor], steps: int) -> list[list[float]]:
        """``steps`` calls of :meth:`step`; returns the per-step loss lists."""
        return [self.step(loss_fn) or [] for _ in range(steps)]

    # -------------------------------------------------------------- inspection
    def params(self, i: int) -> Tensor:
        """Node ``i``'s parameters, flattened in ``model.parameters()`` order (a copy)."""
        return torch.cat([p.detach().reshape(-1) for p in self.models[i].parameters()])

    def param_matrix(self) -> Tensor:
        """All nodes' parameters as an ``(n, d)`` tensor (a copy)."""
        return torch.stack([self.params(i) for i in range(self.n)])

    def average_params(self) -> Tensor:
        """``x̄ = (1/n) Σ_i x_i`` (flat)."""
        return self.param_matrix().double().mean(dim=0)

    def consensus_distance(self, *, include_buffers: bool = False) -> float:
        """``(1/n) Σ_i ‖x_i − x̄‖²``, computed directly in float64 (no cancellation).

        ``x_i`` is node ``i``'s parameters; module buffers (BatchNorm running
        statistics) are local unless ``buffers=`` is set, and nodes that differ
        only there report 0.0.  ``include_buffers=True`` appends each model's
        floating-point buffers to ``x_i``.
        """
        x = self.param_matrix().double()
        if include_buffers:
            bufs = torch.stack([
                torch.cat([b.detach().reshape(-1).double() for b in m.buffers()
                           if b.is_floating_point()] + [torch.zeros(0, dtype=torch.float64)])
                for m in self.models
            ])
            x = torch.cat([x, bufs], dim=1)
        return float((x - x.mean(dim=0)).square().sum(dim=1).mean())

    # ------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Models, wrappers and the round counter (deep copies)."""
        return {
            "round": self.round,
            "models": [
                {k: v.detach().clone() for k, v in m.state_dict().items()} for m in self.models
            ],
            "optimizers": [copy.deepcopy(o.state_dict()) for o in self.optimizers],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["models"]) != self.n:
            raise ValueError(
                f"state has {len(state['models'])} nodes, this simulation has {self.n}"
            )
        for m, sd in zip(self.models, state["models"]):
            m.load_state_dict(sd)
        for o, sd in zip(self.optimizers, state["optimizers"]):
            o.load_state_dict(sd)
        self.round = int(state["round"])

    def __repr__(self) -> str:
        cls = type(self.optimizers[0]).__name__ if self.optimizers else "?"
        name = self.topology.name
        return f"Simulation(n={self.n}, topology={name}, wrapper={cls}, round={self.round})"

