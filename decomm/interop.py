"""Arrays of other libraries in decomm's ops, returned as the type they came in.

:func:`as_torch` turns what a user passes to an op into a torch tensor that shares its
memory (no copy where the layout allows), plus a function that turns the op's torch
result back into the caller's type:

* ``torch.Tensor``: itself (detached);
* ``numpy.ndarray``: ``torch.from_numpy`` (a copy only when the array is not C-contiguous);
  results come back as numpy arrays;
* ``cupy.ndarray``: ``torch.from_dlpack`` (DLPack; the producer orders its stream with
  torch's current stream), or ``__cuda_array_interface__`` where DLPack is refused;
  results come back as cupy arrays over the same device memory (``cupy.from_dlpack``).

cupy is never imported here unless the caller already did (an object can only be a cupy
array if cupy is loaded), so this module is safe on machines without cupy or CUDA.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

__all__ = ["as_torch", "from_cupy", "is_cupy_array", "to_cupy"]


def _identity(r: Any) -> Any:
    return r


def is_cupy_array(obj: Any) -> bool:
    """True for a ``cupy.ndarray`` (without importing cupy)."""
    cp = sys.modules.get("cupy")
    return cp is not None and isinstance(obj, cp.ndarray)


def from_cupy(arr: Any) -> torch.Tensor:
    """A torch CUDA tensor over ``arr``'s memory (zero-copy)."""
    try:
        return torch.from_dlpack(arr)
    except (BufferError, RuntimeError, TypeError, ValueError):
        # e.g. layouts or versions DLPack refuses: the CUDA array interface also maps
        # the memory without copying.
        return torch.as_tensor(arr, device=torch.device("cuda", arr.device.id))


def to_cupy(t: torch.Tensor) -> Any:
    """A cupy array over the CUDA tensor ``t``'s memory (zero-copy)."""
    import cupy

    if hasattr(cupy, "from_dlpack"):
        try:
            return cupy.from_dlpack(t)
        except (BufferError, RuntimeError, TypeError, ValueError):
            pass
    return cupy.asarray(t)  # through t.__cuda_array_interface__


def as_torch(obj: Any) -> tuple[torch.Tensor, Callable[[torch.Tensor], Any]] | None:
    """``(tensor, back)`` for a torch tensor, numpy array or cupy array, else ``None``.

    ``tensor`` shares ``obj``'s memory when the layout allows, so an in-place op on it
    updates ``obj``; ``back(result)`` returns a torch result as ``obj``'s type.
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach(), _identity
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "fiub":
            raise TypeError(f"numpy dtype {obj.dtype} is not supported")
        return torch.from_numpy(np.ascontiguousarray(obj)), _to_numpy
    if is_cupy_array(obj):
        if obj.dtype.kind not in "fiub":
            raise TypeError(f"cupy dtype {obj.dtype} is not supported")
        return from_cupy(obj), to_cupy
    return None


def _to_numpy(r: torch.Tensor) -> np.ndarray:
    return r.numpy() if r.device.type == "cpu" else r.cpu().numpy()
