"""``python -m decomm``: print what this decomm install is built with and can use.

::

    python -m decomm              # version, Python/torch, MPI library, CUDA/NCCL status
    python -m decomm --version    # just "decomm X.Y.Z"

Nothing here starts MPI or touches a GPU beyond asking torch whether one is
visible, so it is safe to run on a login node, in a container build, or outside
``mpirun``. The exit status is 0 when the C++ core imports, 1 when it does not
(the report then says why).
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
from collections.abc import Sequence

from ._version import __version__

__all__ = ["collect_info", "format_info", "main"]


def _first_line(text: str) -> str:
    """First line of an MPI library banner (some end in a NUL byte)."""
    lines = text.replace("\x00", "").strip().splitlines()
    return lines[0].strip() if lines else "unknown"


def _mpi4py_info() -> tuple[str, str]:
    """(mpi4py version, the MPI library mpi4py loads), without initializing MPI."""
    try:
        import mpi4py
    except ImportError as exc:
        return "not installed", f"unknown ({exc})"
    mpi4py.rc.initialize = False  # only ask for the library's name
    mpi4py.rc.finalize = False
    try:
        from mpi4py import MPI

        library = _first_line(MPI.Get_library_version())
    except Exception as exc:  # a broken MPI install must not crash the report
        library = f"cannot load ({type(exc).__name__}: {exc})"
    return mpi4py.__version__, library


def collect_info() -> dict[str, str]:
    """The facts ``python -m decomm`` prints, as a dict of strings (label -> value)."""
    info: dict[str, str] = {
        "decomm": __version__,
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch CUDA"] = (f"{torch.version.cuda}, {torch.cuda.device_count()} device(s) visible"
                              if torch.version.cuda else "no (CPU build)")
    except ImportError as exc:
        info["torch"] = f"not installed ({exc})"
    mpi4py_version, mpi4py_library = _mpi4py_info()
    info["mpi4py"] = mpi4py_version
    info["MPI library (mpi4py)"] = mpi4py_library
    try:
        core = importlib.import_module("decomm._C")
        info["C++ core (decomm._C)"] = f"built ({core.__file__})"
        info["MPI library (decomm)"] = _first_line(core.mpi_library_version())
    except Exception as exc:
        info["C++ core (decomm._C)"] = (
            f"NOT BUILT ({type(exc).__name__}: {exc}); run scripts/setup_env.sh or "
            "pip install --no-build-isolation .")
    lib = info.get("MPI library (decomm)")
    if lib is not None and lib != mpi4py_library:
        info["WARNING"] = ("mpi4py and decomm load different MPI libraries; rebuild decomm "
                           "against mpi4py's MPI (see DECOMM_MPICC in the installation docs)")
    try:
        from . import backends

        info["CUDA extension built"] = _yes_no(backends.built_with_cuda())
        info["CUDA usable"] = _yes_no(backends.cuda_available())
        info["NCCL backend"] = _yes_no(backends.nccl_available())
    except Exception as exc:
        info["CUDA extension built"] = f"unknown ({type(exc).__name__}: {exc})"
    return info


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def format_info(info: dict[str, str]) -> str:
    """Align ``info`` as ``label : value`` lines."""
    width = max(len(k) for k in info)
    return "\n".join(f"{k.ljust(width)} : {v}" for k, v in info.items())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m decomm``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m decomm",
        description="Show decomm's version and what this install is built with "
                    "(MPI library, CUDA / NCCL availability).")
    parser.add_argument("--version", action="version", version=f"decomm {__version__}")
    parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    info = collect_info()
    print(format_info(info))
    return 0 if info["C++ core (decomm._C)"].startswith("built") else 1


if __name__ == "__main__":
    sys.exit(main())
