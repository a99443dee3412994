"""Exact diffusion (adapt, correct, combine), Yuan, Ying, Zhao & Sayed 2019."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ._base import Mix, topology_name
from ._fused import linear_map_
from .comm import Communicator
from .d2 import D2, min_eigenvalue

__all__ = ["ExactDiffusion"]


class ExactDiffusion(D2):
    r"""Exact diffusion: diffusion with a correction step, exact under heterogeneous data.

    Yuan, Ying, Zhao & Sayed, "Exact Diffusion for Distributed Optimization and
    Learning - Part I: Algorithm Development", IEEE Trans. Signal Process. 67(3),
    2019 (Algorithm 1).  With ``W̄ = (I + W)/2`` and ``u(w)`` the wrapped optimizer's
    update at ``w`` (``u = μ ∇J_i(w)`` for plain SGD), ``ψ_i^{−1} = w_i^{−1}`` (the
    initial parameters)::

        ψ_i^k = w_i^{k−1} − u_i(w_i^{k−1})        (adapt)
        φ_i^k = ψ_i^k + w_i^{k−1} − ψ_i^{k−1}      (correct)
        w_i^k = Σ_j W̄[i, j] φ_j^k                  (combine)

    Eliminating ``ψ`` gives ``w^k = W̄ (2 w^{k−1} − w^{k−2} − u^{k−1} + u^{k−2})``:
    exact diffusion is :class:`D2` run over ``W̄ = (I + W)/2``, and this class is that
    (D²'s state and local phase; only the combine differs).  With a constant step
    size the fixed point is the exact minimiser of the average loss, where DSGD
    (diffusion without the correction) keeps an ``O(μ)`` bias under heterogeneous
    data.  Any symmetric doubly stochastic ``W`` qualifies: ``W̄`` has eigenvalues in
    ``(0, 1]``, so D²'s condition ``λ(W̄) > −1/3`` always holds (a bipartite ring,
    eigenvalue −1, is fine).

    **Static graphs only.**  The analysis is for one fixed symmetric ``W``; over a
    time-varying cycle D² (hence exact diffusion) can diverge even with lazy rounds
    (docs/optimizers.rst gives the measured growth factors).  Like :class:`D2`, the
    constructor (and a step after ``set_topology`` changed the topology) warns with
    a :class:`UserWarning` on rank 0 when the topology has more than one round, or
    its ``W`` is not symmetric; ``check_topology=False`` silences it.  Use
    :class:`GradientTracking` (or :class:`PushDIGing` on directed graphs) for
    time-varying topologies.

    Implementation: the message ``φ`` is mixed in place with the runtime's ``W``
    (one ``neighbor_allreduce_`` per dtype of ``numel`` elements, as D²) and the
    finish phase forms ``(φ + W φ)/2``; cost beyond D²: one copy of ``φ`` into a
    scratch buffer and one fused add-and-scale.  A global step (``global_every``)
    averages exactly (``W̄ = 11ᵀ/n``, not ``(I + 11ᵀ/n)/2``); local steps
    (``communicate_every``) use ``W̄ = I``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        communicate_every: int = 1,
        global_every: int | None = None,
        check_topology: bool = True,
        broadcast_parameters: bool = True,
        check_parameters: bool = True,
        communicator: Communicator | None = None,
    ) -> None:
        self._phi: list[Tensor] = []
        self._keep_message = False
        super().__init__(
            optimizer,
            communicate_every=communicate_every,
            global_every=global_every,
            check_topology=check_topology,
            broadcast_parameters=broadcast_parameters,
            check_parameters=check_parameters,
            communicator=communicator,
        )

    def _setup(self) -> None:
        super()._setup()
        self._phi = [b.new_state(None) for b in self._buckets]

    def _warn_if_unstable(self) -> None:
        topo = self._comm.topology()
        if topo is None or topo is self._checked:
            return
        self._checked = topo
        if self._comm.rank() != 0:  # one warning per job, not one per rank
            return
        name = topology_name(topo)
        rounds = getattr(topo, "rounds", 1)
        if rounds != 1:
            what = "a random family" if rounds is None else f"a cycle of {rounds} rounds"
            warnings.warn(
                f"ExactDiffusion needs one static mixing matrix W (it is D2 over (I + W)/2), "
                f"but the topology {name} changes every round ({what}); it may diverge over "
                f"it (D2 over the lazy rounds (I + W(t))/2 of BaseGraph(25, 1) grows by a "
                f"factor 1.13 per round at lr = 0). Use GradientTracking (PushDIGing on "
                f"directed graphs) for time-varying topologies, or a static topology.",
                UserWarning,
                stacklevel=3,
            )
            return
        _, _, symmetric = min_eigenvalue(topo)
        if not symmetric:
            warnings.warn(
                f"ExactDiffusion's analysis assumes a symmetric (doubly stochastic) mixing "
                f"matrix, but the topology {name} is not symmetric; it may not reach the "
                f"exact optimum. Use PushDIGing on directed graphs.",
                UserWarning,
                stacklevel=3,
            )

    def _local_phase(self, mix: Mix) -> None:
        self._keep_message = mix is Mix.NEIGHBOR
        super()._local_phase(mix)  # the parameters now hold φ (D²'s message), kept in _phi

    def _message_outputs(self, k: int) -> tuple[list[Tensor], list[list[float]]]:
        if not self._keep_message:
            return [], []
        return [self._phi[k]], [[1.0, 1.0]]  # φ, written in D²'s message pass

    def _finish_phase(self, mix: Mix) -> None:
        if mix is Mix.NEIGHBOR:
            for s, b in zip(self._phi, self._buckets):
                x = b.flat  # W̄ φ = (W φ + φ)/2, one pass (halving is exact)
                linear_map_([x], [[0.5, 0.5]], [x, s])
