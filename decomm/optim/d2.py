"""D² (decentralized training over decentralized data), Tang et al. 2018."""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._base import DecentralizedOptimizer, Mix
from ._fused import linear_map_
from .comm import Communicator

__all__ = ["D2", "min_eigenvalue"]

#: number of rounds inspected for topologies without a finite cycle (random families)
RANDOM_ROUNDS_CHECKED = 8
_cache: weakref.WeakKeyDictionary[Any, tuple[float, int]] = weakref.WeakKeyDictionary()


def min_eigenvalue(topology: Any) -> tuple[float, int, bool]:
    """Smallest real part of an eigenvalue of ``W(t)`` over one cycle, its round,
    and whether every inspected round is symmetric.

    Finite cycles are inspected completely; random families (``rounds is
    None``) on their first :data:`RANDOM_ROUNDS_CHECKED` rounds.  Cached per
    topology object.  Cost: one dense eigen-decomposition per round, O(n³).
    """
    try:
        return _cache[topology]
    except (KeyError, TypeError):
        pass
    rounds = getattr(topology, "rounds", None)
    count = RANDOM_ROUNDS_CHECKED if rounds is None else int(rounds)
    best, where, symmetric = np.inf, 0, True
    for t in range(count):
        w = np.asarray(topology.matrix(t), dtype=np.float64)
        if np.allclose(w, w.T, rtol=0.0, atol=1e-12):
            ev = np.linalg.eigvalsh(w)
        else:
            symmetric = False
            ev = np.linalg.eigvals(w).real
        m = float(np.min(ev))
        if m < best:
            best, where = m, t
    result = (best, where, symmetric)
    try:
        _cache[topology] = result
    except TypeError:
        pass
    return result


class D2(DecentralizedOptimizer):
    r"""D²: decentralized training robust to data heterogeneity.

    Tang, Lian, Yan, Zhang, Liu, "D²: Decentralized Training over Decentralized
    Data", ICML 2018.  With ``u^t`` the wrapped optimizer's update at ``x^t``::

        x^1     = W(0) (x^0 − u^0)
        x^{t+1} = W(t) (2 x^t − x^{t−1} − u^t + u^{t−1})

    The correction ``x^t − x^{t−1} + u^{t−1}`` cancels DSGD's heterogeneity bias,
    so with a constant learning rate the fixed point is the exact minimiser of
    the average loss.  The analysis needs one static, symmetric ``W`` with all
    eigenvalues ``> −1/3``.  The constructor (and a step after ``set_topology``
    changed the topology) issues a :class:`UserWarning`, on rank 0 only (in the
    simulator: once), when that fails:

    * the topology has more than one round (a cycle of L > 1 rounds, or a random
      family): D² needs a static ``W``; use :class:`~decomm.optim.GradientTracking` there.
      Making each round lazier does not help: D² over ``(I + W(t))/2`` of
      ``BaseGraph(25, 1)`` (9 rounds, all eigenvalues ≥ 0) still diverges;
    * a static ``W`` has an eigenvalue ``≤ −1/3`` (e.g. a 4-node ring with weights
      1/3 has −1/3): the warning names it; use the lazier ``(I + W)/2``;
    * a static ``W`` is not symmetric.

    Implementation: one flat state vector ``h^t = x^{t−1} − u^{t−1}`` (``h^0 = x^0``)
    per dtype.  Local phase: ``h ← x − h`` (``= x^t − x^{t−1} + u^{t−1}``), inner
    step (``x ← x − u``), then one fused pass ``x, h ← x + h, x`` (the next ``h`` is
    ``x^t − u^t`` exactly); the parameters, now ``2x^t − x^{t−1} − u^t + u^{t−1}``,
    are mixed in place.  Local steps (``communicate_every > 1``) use ``W = I``.
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
        self._h: list[Tensor] = []
        self._started = False
        super().__init__(
            optimizer,
            communicate_every=communicate_every,
            global_every=global_every,
            broadcast_parameters=broadcast_parameters,
            check_parameters=check_parameters,
            communicator=communicator,
        )
        self._checked: Any = None
        self._check_topology = check_topology
        if check_topology:
            self._warn_if_unstable()

    def _warn_if_unstable(self) -> None:
        topo = self._comm.topology()
        if topo is None or topo is self._checked:
            return
        self._checked = topo
        if self._comm.rank() != 0:  # one warning per job, not one per rank
            return
        name = getattr(topo, "name", type(topo).__name__)
        rounds = getattr(topo, "rounds", 1)
        if rounds != 1:
            # Checked first: over a cycle, making every round lazier does not help.
            # Measured (tests/unit/test_optim_api.py): D2 over (I + W(t))/2 of
            # BaseGraph(25, 1), every eigenvalue >= 0, still diverges.
            what = "a random family" if rounds is None else f"a cycle of {rounds} rounds"
            warnings.warn(
                f"D2 needs one static mixing matrix W, but the topology {name} changes "
                f"every round ({what}); D2 may diverge over it, even with every round "
                f"made lazier, (I + W(t)) / 2. Use GradientTracking for time-varying "
                f"topologies, or a static topology for D2.",
                UserWarning,
                stacklevel=3,
            )
            return
        lam, t, symmetric = min_eigenvalue(topo)
        if lam <= -1.0 / 3.0 + 1e-12:
            warnings.warn(
                f"D2 needs mixing matrices with eigenvalues > -1/3, but the topology "
                f"{name} has eigenvalue {lam:.6g} in round {t}; D2 may diverge. Use a "
                f"lazier topology, e.g. (I + W) / 2.",
                UserWarning,
                stacklevel=3,
            )
        elif not symmetric:
            warnings.warn(
                f"D2's analysis assumes symmetric mixing matrices, but the topology "
                f"{name} is not symmetric; D2 may diverge.",
                UserWarning,
                stacklevel=3,
            )

    def _setup(self) -> None:
        self._h = [b.new_state() for b in self._buckets]
        self._started = False

    def _local_phase(self, mix: Mix) -> None:
        if self._check_topology and mix is Mix.NEIGHBOR:
            self._warn_if_unstable()
        for h, b in zip(self._h, self._buckets):
            if self._started:
                torch.sub(b.flat, h, out=h)  # x^t − x^{t−1} + u^{t−1}
            else:
                h.zero_()  # h^0 = x^0: no correction in the first step
        self._started = True
        self._inner_step()  # x ← x^t − u^t
        for k, (h, b) in enumerate(zip(self._h, self._buckets)):
            # one pass: x ← x + h (2x^t − x^{t−1} − u^t + u^{t−1}, the message) and
            # h ← x (x^t − u^t, kept for the next step), plus what a subclass keeps
            outs, rows = self._message_outputs(k)
            linear_map_([b.flat, h, *outs], [[1.0, 1.0], [1.0, 0.0], *rows], [b.flat, h])

    def _message_outputs(self, k: int) -> tuple[list[Tensor], list[list[float]]]:
        """Further buffers the message pass of bucket ``k`` writes: each row gives
        its coefficients on (x^t − u^t, h) (ExactDiffusion keeps a copy of the message)."""
        return [], []

    def _finish_phase(self, mix: Mix) -> None:
        pass

    def _restart_after_loss(self) -> None:
        # x^{t-1} belongs to the old graph (its mix had the dead nodes' values): restart
        # with the first-step form x^1 = W(x^0 - u^0) on the survivors' graph.
        self._started = False

    def _state_tensors(self) -> dict[str, list[Tensor]]:
        return {"previous": self._h}

    def _extra_state(self) -> dict[str, Any]:
        return {"started": self._started}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        self._started = bool(extra.get("started", False))
