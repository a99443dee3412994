"""Mixed precision with the decomm.optim wrappers: a GradScaler that keeps ranks in step.

``torch.amp.GradScaler`` already works with every synchronous wrapper: the
wrappers declare ``_step_supports_amp_scaling``, so ``scaler.step(opt)`` always
calls ``opt.step()``, which agrees on the overflow flag across ranks (one
8-byte allreduce) and skips the step on every rank if any rank overflowed (see
:meth:`decomm.optim.DecentralizedOptimizer.step`).  What the plain scaler still
does per rank is :meth:`update`: only the rank that overflowed halves its scale,
so the ranks' scales drift apart (harmless for the maths - each rank unscales by
its own scale - but every later overflow on any rank skips a step everywhere).

:class:`GradScaler` here is the torch scaler plus one thing: after a step that
the ranks skipped together it records the overflow on every rank, so
``update()`` backs off (and resets the growth counter) on every rank and the
scales stay identical.  It costs no communication beyond the wrapper's
allreduce.  Use it exactly like the torch one::

    scaler = decomm.amp.GradScaler("cuda")
    for x, y in loader:
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)        # collective when opt is a decomm.optim wrapper
        scaler.update()
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["GradScaler"]


class GradScaler(torch.amp.GradScaler):
    """``torch.amp.GradScaler`` whose scale stays identical on every rank.

    With ``S`` the scale, ``b`` the backoff and ``γ`` the growth factor, every
    rank applies ``S ← b S`` (growth counter reset) after a step that any rank's
    overflow made every rank skip, and ``S ← γ S`` after ``growth_interval``
    consecutive steps without: the torch rule, fed the agreed overflow flag
    instead of the local one.  Optimizers that are not decomm wrappers (or
    ``AsyncGossip``, whose ranks skip independently) keep the local flag.
    """

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        retval = super().step(optimizer, *args, **kwargs)
        if self.is_enabled() and getattr(optimizer, "_amp_found_inf", None):
            self.record_found_inf(optimizer, True)
        return retval

    def record_found_inf(self, optimizer: torch.optim.Optimizer, found_inf: bool) -> None:
        """Make :meth:`update` see ``found_inf`` for ``optimizer`` in this iteration.

        Used for the ranks' (or simulated nodes') agreed overflow flag; only
        ``True`` changes anything (a local overflow is already recorded).
        """
        if not found_inf or not self.is_enabled():
            return
        state = self._per_optimizer_states[id(optimizer)]
        per_device = state["found_inf_per_device"]
        if not per_device:
            scale = self._scale
            device = scale.device if scale is not None else torch.device(self._device)
            per_device[device] = torch.ones((), dtype=torch.float32, device=device)
            return
        for t in per_device.values():
            t.fill_(1.0)
