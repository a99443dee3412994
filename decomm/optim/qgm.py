"""Quasi-global momentum DSGD (QG-DSGDm), Lin et al. 2021."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._base import DecentralizedOptimizer, Mix
from ._fused import linear_map_
from .comm import Communicator

__all__ = ["QGDSGDm"]


class QGDSGDm(DecentralizedOptimizer):
    r"""DSGD with quasi-global momentum.

    Lin, Karimireddy, Stich, Jaggi, "Quasi-Global Momentum: Accelerating
    Decentralized Deep Learning on Heterogeneous Data", ICML 2021.  Local heavy
    ball momentum amplifies the drift between heterogeneous nodes; QG-DSGDm
    instead builds its momentum buffer from the *model change after gossip*,
    which approximates the global direction::

        v_i^t       = g_i^t + β m̂_i^{t−1}                    (m̂^{−1} = 0)
        x_i^{t+½}   = x_i^t − η v_i^t                         (Nesterov: − η (g_i^t + β v_i^t))
        x_i^{t+1}   = Σ_j W(t)[i, j] x_j^{t+½}
        d_i^t       = (x_i^t − x_i^{t+1}) / η
        m̂_i^t       = μ m̂_i^{t−1} + (1 − μ) d_i^t             (μ = β by default)

    The wrapped optimizer must be ``torch.optim.SGD`` without momentum: it is
    fed ``v`` (or the Nesterov direction) in place of the gradient, so its
    learning rate ``η`` (per param group, scheduler-driven) and weight decay
    apply as usual (after :meth:`step` ``p.grad`` holds the direction fed to
    it, ``v``).  ``d`` uses the group's current ``lr``; a group with ``lr == 0``
    only decays its buffer.  Local steps use ``W = I``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        momentum: float = 0.9,
        mu: float | None = None,
        nesterov: bool = False,
        communicate_every: int = 1,
        global_every: int | None = None,
        broadcast_parameters: bool = True,
        check_parameters: bool = True,
        communicator: Communicator | None = None,
    ) -> None:
        if isinstance(optimizer, torch.optim.Optimizer) and not isinstance(
            optimizer, torch.optim.SGD
        ):
            raise TypeError(
                f"QGDSGDm wraps torch.optim.SGD (without momentum), got {type(optimizer).__name__}"
            )
        if isinstance(optimizer, torch.optim.SGD):
            for g in optimizer.param_groups:
                if g.get("momentum", 0) != 0 or g.get("nesterov", False):
                    raise ValueError(
                        "QGDSGDm provides the momentum: wrap torch.optim.SGD with "
                        f"momentum=0 (got momentum={g.get('momentum')})"
                    )
        for name, val in (("momentum", momentum), ("mu", mu)):
            if val is not None and not 0.0 <= float(val) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {val!r}")
        self.momentum = float(momentum)
        self.mu = float(momentum if mu is None else mu)
        self.nesterov = bool(nesterov)
        self._m: list[Tensor] = []
        self._x0: list[Tensor] = []
        self._m_views: list[list[Tensor]] = []
        super().__init__(
            optimizer,
            communicate_every=communicate_every,
            global_every=global_every,
            broadcast_parameters=broadcast_parameters,
            check_parameters=check_parameters,
            communicator=communicator,
        )

    def _setup(self) -> None:
        self._m = [b.new_state() for b in self._buckets]
        self._x0 = [b.new_state(None) for b in self._buckets]
        self._m_views = [b.split(m) for b, m in zip(self._buckets, self._m)]

    def _local_phase(self, mix: Mix) -> None:
        beta = self.momentum
        for b, m_views, x0 in zip(self._buckets, self._m_views, self._x0):
            grads = []
            for p in b.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
            if self.nesterov:  # g + β (g + β m̂)
                torch._foreach_mul_(grads, 1.0 + beta)
                torch._foreach_add_(grads, m_views, alpha=beta * beta)
            else:  # g + β m̂
                torch._foreach_add_(grads, m_views, alpha=beta)
            x0.copy_(b.flat)
        self._inner_step()

    def _finish_phase(self, mix: Mix) -> None:
        mu = self.mu
        groups = self.optimizer.param_groups
        for b, m, x0 in zip(self._buckets, self._m, self._x0):
            x = b.flat
            for gi, lo, hi in b.group_ranges:
                # m̂ ← μ m̂ + (1 − μ) (x^t − x^{t+1}) / η in one pass (the kernel's wider
                # accumulator keeps the difference of the two close iterates exact)
                lr = float(groups[gi]["lr"])
                c = (1.0 - mu) / lr if lr != 0.0 else 0.0
                linear_map_([m[lo:hi]], [[mu, c, -c]], [m[lo:hi], x0[lo:hi], x[lo:hi]])

    def _state_tensors(self) -> dict[str, list[Tensor]]:
        return {"momentum": self._m}

    def _extra_state(self) -> dict[str, Any]:
        return {"momentum": self.momentum, "mu": self.mu, "nesterov": self.nesterov}
