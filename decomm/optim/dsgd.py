"""Decentralized SGD (DSGD), adapt-then-combine and adapt-with-combine."""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import DecentralizedOptimizer, Mix
from .comm import Communicator, PendingExchange

__all__ = ["DSGD"]


class DSGD(DecentralizedOptimizer):
    r"""Decentralized SGD over any torch optimizer.

    Node ``i`` keeps its own parameters ``x_i``; ``u_i^t`` is the update the
    wrapped optimizer computes from the local stochastic gradient
    (``u = lr * g`` for plain SGD; momentum, Nesterov, Adam, AdamW all compose
    because only ``u`` is used).  With the round's mixing matrix ``W(t)``:

    * adapt-then-combine (ATC, default), the diffusion form of Sayed and
      co-authors (Lopes & Sayed, "Diffusion least-mean squares over adaptive
      networks", IEEE Trans. Signal Process. 2008; the ATC ordering: Cattivelli &
      Sayed, "Diffusion LMS strategies for distributed estimation", IEEE Trans.
      Signal Process. 2010; survey: Sayed, "Adaptation, learning, and optimization
      over networks", Found. Trends Mach. Learn. 2014)::

          x_i^{t+1} = Σ_j W(t)[i, j] (x_j^t − u_j^t)

    * adapt-with-combine (AWC, ``combine_first=True``), the D-PSGD of Lian et
      al., "Can Decentralized Algorithms Outperform Centralized Algorithms?",
      NeurIPS 2017::

          x_i^{t+1} = Σ_j W(t)[i, j] x_j^t − u_i^t

      The message ``x^t`` does not depend on the new gradient, so its exchange
      can run during the forward/backward pass.  With ``overlap=True``
      (default) a post-accumulate-grad hook on the parameters starts it
      (non-blocking) as soon as the first gradient of the backward pass is
      ready; call :meth:`begin_communication` yourself (e.g. right after
      ``step()``, to also hide it behind the forward pass) for earlier starts.
      Without either, :meth:`step` exchanges synchronously.  Do not modify the
      parameters between the start of the exchange and :meth:`step`.

    Cost per communicating step: ATC mixes the parameters in place (they live
    in one flat buffer per dtype), so beyond the inner step it costs exactly one
    ``neighbor_allreduce_`` per dtype.  AWC sends the parameters as they are and
    receives the change ``s = W x^t − x^t`` into a scratch buffer in the same
    weighted-sum pass (:func:`decomm.ops.neighbor_mix_delta`); the inner step
    then makes ``x = x^t − u^t`` and one more pass ``x ← x + s`` finishes.  So
    AWC costs ATC plus that one pass and the scratch buffer, and what the
    overlap hides comes on top of that: with a spare core (the progress thread,
    ``DECOMM_PROGRESS_THREAD=1``) the exchange runs during the backward pass;
    without one it completes in :meth:`step`, as ATC's does.  Communicators
    without ``supports_mix_delta`` (the simulators) mix a copy of ``x^t`` in place
    instead: same algebra, two more passes.

    ``W(t)`` should be doubly stochastic: if some column does not sum to 1 the
    ranks reach a weighted, biased consensus, and the constructor (and the first
    gossip step after ``set_topology`` changed the topology) issues one
    ``UserWarning`` on rank 0 naming the topology and the worst column sum (the
    whole cycle is checked; random families their first rounds).  Use
    :class:`~decomm.optim.PushSum` on directed graphs.
    """

    _stateful = False
    _check_column_sums = True

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        combine_first: bool = False,
        communicate_every: int = 1,
        global_every: int | None = None,
        overlap: bool = True,
        broadcast_parameters: bool = True,
        check_parameters: bool = True,
        communicator: Communicator | None = None,
    ) -> None:
        self.combine_first = bool(combine_first)
        self._scratch: list[Tensor] = []
        super().__init__(
            optimizer,
            communicate_every=communicate_every,
            global_every=global_every,
            broadcast_parameters=broadcast_parameters,
            check_parameters=check_parameters,
            communicator=communicator,
        )
        if self.combine_first and overlap and getattr(self._comm, "supports_nonblocking", False):
            self._install_hooks()

    @property
    def _can_prefetch(self) -> bool:  # type: ignore[override]
        return self.combine_first

    def _setup(self) -> None:
        self._scratch = [b.new_state(None) for b in self._buckets] if self.combine_first else []
        # s = W x - x straight from the weighted sum: no send copy, one pass fewer
        self._delta = self.combine_first and bool(getattr(self._comm, "supports_mix_delta", False))

    def _mix_buffers(self) -> list[Tensor]:
        if self.combine_first:
            return self._scratch
        return [b.buffer for b in self._buckets]

    def _exchange_with_neighbors(self, nonblocking: bool) -> list[PendingExchange]:
        if not self._delta:
            return super()._exchange_with_neighbors(nonblocking)
        started = []
        for k, (s, b) in enumerate(zip(self._scratch, self._buckets)):
            h = self._comm.neighbor_mix_delta(b.flat, s, name=self._buffer_name(k),
                                              nonblocking=nonblocking)
            if nonblocking:
                started.append(h)
        return started

    def _local_phase(self, mix: Mix) -> None:
        if not self.combine_first:
            self._inner_step()  # x ← x − u; the parameters are the message
        elif mix is not Mix.NONE and not (self._delta and mix is Mix.NEIGHBOR):
            for s, b in zip(self._scratch, self._buckets):
                s.copy_(b.flat)  # message: x^t

    def _finish_phase(self, mix: Mix) -> None:
        if not self.combine_first:
            return
        if mix is Mix.NONE:
            self._inner_step()
            return
        if not (self._delta and mix is Mix.NEIGHBOR):
            for s, b in zip(self._scratch, self._buckets):
                s.sub_(b.flat)  # s = W x − x
        self._inner_step()  # x ← x − u
        for s, b in zip(self._scratch, self._buckets):
            b.flat.add_(s)  # x ← W x − u

    def __repr__(self) -> str:
        r = super().__repr__()
        return r[:-1] + ", combine_first=True)" if self.combine_first else r
