"""GPU tests: skipped as a whole, cleanly, on machines without a usable CUDA device.

Run on a GPU machine with ``python -m pytest -q tests/gpu``. Tests that need the CUDA
extension (``decomm._C_cuda``), NCCL, several GPUs or cupy skip on their own with the
reason. Multi-rank tests start ``mpirun`` themselves (``gpu_util.run_ranks``).
"""

from __future__ import annotations

from pathlib import Path

import pytest


def _no_cuda_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} has no CUDA support"
    if not torch.cuda.is_available():
        return "no CUDA device visible (torch.cuda.is_available() is False)"
    return None


def pytest_collection_modifyitems(config, items) -> None:
    reason = _no_cuda_reason()
    if reason is None:
        return
    here = str(Path(__file__).resolve().parent)
    skip = pytest.mark.skip(reason=f"GPU test: {reason}")
    for item in items:
        if str(Path(str(item.fspath)).resolve()).startswith(here):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cuda_ext():
    """decomm._C_cuda, or skip when this install was built without it."""
    import decomm

    if not decomm.built_with_cuda():
        pytest.skip("decomm was built without its CUDA extension (decomm._C_cuda); rebuild "
                    "with a CUDA torch and nvcc (or DECOMM_WITH_CUDA=1)")
    import decomm._C_cuda as ext

    return ext


@pytest.fixture(scope="session")
def nccl_ext(cuda_ext):
    if not cuda_ext.has_nccl():
        pytest.skip("decomm._C_cuda was built without NCCL")
    return cuda_ext


@pytest.fixture(scope="session")
def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()
