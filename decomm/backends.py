"""Which backends this decomm build and this machine provide."""

from __future__ import annotations

import importlib

__all__ = ["built_with_cuda", "cuda_available", "nccl_available", "nccl_built"]


def built_with_cuda() -> bool:
    """True when the CUDA/NCCL extension (``decomm._C_cuda``) was compiled into this install."""
    try:
        importlib.import_module("decomm._C_cuda")
    except ImportError:
        return False
    return True


def cuda_available() -> bool:
    """True when decomm was built with CUDA and a CUDA device is visible."""
    if not built_with_cuda():
        return False
    import torch

    return torch.cuda.is_available()


def nccl_built() -> bool:
    """True when the CUDA extension was compiled with the NCCL backend (GPU or not)."""
    if not built_with_cuda():
        return False
    mod = importlib.import_module("decomm._C_cuda")
    return bool(getattr(mod, "has_nccl", lambda: False)()) and hasattr(mod, "NcclBackend")


def nccl_available() -> bool:
    """True when the NCCL backend was built and CUDA is usable here."""
    return cuda_available() and nccl_built()
