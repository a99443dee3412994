"""Flat parameter storage shared by all optimizer wrappers.

Every parameter handled by a wrapper is re-pointed (``p.data = view``) into one
contiguous *bucket* per ``(device, dtype)``.  A bucket's buffer is laid out as
``segments`` consecutive blocks of ``numel`` elements:

* segment 0 holds the parameters themselves (``p`` is a view of it), ordered by
  param group and then by position inside the group, so every param group owns
  one contiguous range of the segment;
* further segments hold algorithm state that travels with the parameters in the
  same message (gradient tracking puts its tracker ``y`` in segment 1);
* ``extra`` trailing elements after the segments carry per-bucket scalars in the
  same message (push-sum's weight ``w``).

Because the parameters *are* the communication buffer, packing and unpacking
cost nothing: one in-place ``neighbor_allreduce_`` of ``bucket.buffer`` mixes
the model (and the trackers) with no copy and no per-step allocation.

The one user-visible consequence: ``p.data`` is a view into a larger storage,
so ``torch.save(model.state_dict())`` stores the whole bucket; save
``{k: v.clone() for k, v in model.state_dict().items()}`` for minimal files.
If user code replaces ``p.data`` after wrapping (e.g. ``module.to()`` on the
same device and dtype, or an explicit ``p.data = t``), :meth:`Bucket.repair`
copies the new values back into the bucket and re-points the parameter.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["Bucket", "build_buckets", "collect_params"]


#: bytes per block of a blocked pass (see block_elements): well inside a core's cache
BLOCK_BYTES = 1 << 20
#: vectors up to this size are done in one block (they stay in cache anyway)
WHOLE_BYTES = 8 << 20


def block_elements(numel: int, element_size: int) -> int:
    """Elements per block when several element-wise ops run over one flat vector.

    Done block by block, each block is read from memory once and the later ops find
    it in cache; per element the ops and their order are the same, so are the
    results. Vectors of up to :data:`WHOLE_BYTES` are one block (fewer calls).
    """
    if numel * element_size <= WHOLE_BYTES:
        return max(numel, 1)
    return max(BLOCK_BYTES // element_size, 1)


def collect_params(param_groups: list[dict]) -> list[tuple[int, Tensor]]:
    """Return ``(group_index, param)`` for every distinct parameter, in order."""
    seen: set[int] = set()
    out: list[tuple[int, Tensor]] = []
    for gi, group in enumerate(param_groups):
        for p in group["params"]:
            if id(p) in seen:
                continue
            seen.add(id(p))
            out.append((gi, p))
    return out


def iter_tensors(obj: Any) -> list[Tensor]:
    """Parameters of a module / wrapper / optimizer / iterable of tensors."""
    if isinstance(obj, Tensor):
        return [obj]
    if hasattr(obj, "flat_params"):  # a decomm wrapper: its parameters, bucket order
        return list(obj.params)
    if isinstance(obj, torch.nn.Module):
        return list(obj.parameters())
    if isinstance(obj, torch.optim.Optimizer):
        return [p for _, p in collect_params(obj.param_groups)]
    if isinstance(obj, Iterable):
        out = []
        for t in obj:
            if isinstance(t, tuple) and len(t) == 2 and isinstance(t[1], Tensor):
                t = t[1]  # named_parameters()
            if not isinstance(t, Tensor):
                raise TypeError(f"expected tensors, got {type(t).__name__}")
            out.append(t)
        return out
    raise TypeError(
        f"expected a module, optimizer or iterable of tensors, got {type(obj).__name__}"
    )


@dataclass
class Bucket:
    """All parameters of one ``(device, dtype)`` in one flat buffer."""

    device: torch.device
    dtype: torch.dtype
    params: list[Tensor]
    group_of: list[int]
    offsets: list[int]
    numel: int
    segments: int
    buffer: Tensor
    views: list[Tensor] = field(default_factory=list)
    ptrs: list[int] = field(default_factory=list)
    group_ranges: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def flat(self) -> Tensor:
        """Segment 0: the parameters as one flat tensor (a view, no copy)."""
        return self.buffer[: self.numel]

    def segment(self, k: int) -> Tensor:
        """Segment ``k`` of the buffer as a flat view."""
        return self.buffer[k * self.numel : (k + 1) * self.numel]

    def split(self, flat: Tensor) -> list[Tensor]:
        """Per-parameter views (shaped like the params) of a flat ``numel`` tensor."""
        return [flat[o : o + p.numel()].view_as(p) for o, p in zip(self.offsets, self.params)]

    def new_state(self, fill: float | None = 0.0) -> Tensor:
        """Allocate a flat state vector of ``numel`` elements (once, at setup)."""
        t = torch.empty(self.numel, dtype=self.dtype, device=self.device)
        if fill is not None:
            t.fill_(fill)
        return t

    def repair(self) -> None:
        """Re-point parameters whose ``.data`` was replaced after wrapping."""
        for k, (p, v) in enumerate(zip(self.params, self.views)):
            if p.data_ptr() == self.ptrs[k] and p.shape == v.shape:
                continue
            if p.dtype != self.dtype or p.device != self.device or p.shape != v.shape:
                raise RuntimeError(
                    f"a wrapped parameter changed dtype/device/shape after wrapping "
                    f"(was {tuple(v.shape)} {self.dtype} on {self.device}, now "
                    f"{tuple(p.shape)} {p.dtype} on {p.device}); create the decomm "
                    f"optimizer after moving the model"
                )
            with torch.no_grad():
                v.copy_(p.data)
            p.data = v

    def is_intact(self) -> bool:
        return all(p.data_ptr() == q for p, q in zip(self.params, self.ptrs))


def build_buckets(indexed_params: list[tuple[int, Tensor]], segments: int = 1,
                  extra: int = 0) -> list[Bucket]:
    """Move parameters into flat buckets (one per device/dtype), keeping values.

    ``segments`` is the number of model-sized blocks in each bucket's buffer
    (1 = parameters only), ``extra`` the number of elements after them.  Extra
    segments and elements are zero-initialised.
    """
    order: list[tuple[torch.device, torch.dtype]] = []
    members: dict[tuple[torch.device, torch.dtype], list[tuple[int, Tensor]]] = {}
    for gi, p in indexed_params:
        if p.is_sparse:
            raise TypeError("decomm.optim does not support sparse parameters")
        if not (p.is_floating_point() or p.is_complex()):
            raise TypeError(f"decomm.optim cannot mix a parameter of dtype {p.dtype}")
        key = (p.device, p.dtype)
        if key not in members:
            members[key] = []
            order.append(key)
        members[key].append((gi, p))
    buckets: list[Bucket] = []
    for key in order:
        # stable sort by group index so every group owns one contiguous range
        items = sorted(members[key], key=lambda it: it[0])
        offsets, off = [], 0
        for _, p in items:
            offsets.append(off)
            off += p.numel()
        buf = torch.zeros(off * segments + extra, dtype=key[1], device=key[0])
        b = Bucket(
            device=key[0],
            dtype=key[1],
            params=[p for _, p in items],
            group_of=[g for g, _ in items],
            offsets=offsets,
            numel=off,
            segments=segments,
            buffer=buf,
        )
        b.views = b.split(b.flat)
        with torch.no_grad():
            for p, v in zip(b.params, b.views):
                v.copy_(p.data)
                p.data = v
        b.ptrs = [p.data_ptr() for p in b.params]
        ranges: list[tuple[int, int, int]] = []
        for g, o, p in zip(b.group_of, b.offsets, b.params):
            if ranges and ranges[-1][0] == g:
                ranges[-1] = (g, ranges[-1][1], o + p.numel())
            else:
                ranges.append((g, o, o + p.numel()))
        b.group_ranges = ranges
        buckets.append(b)
    return buckets
