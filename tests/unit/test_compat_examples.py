"""BlueFog's own examples (tests/bluefog_suite/examples) run on decomm.compat.bluefog.

Each case launches ``mpirun -np 2`` on one vendored example (import lines changed,
offline data; see the README there) for a few iterations and checks what the example
itself prints: the invariants its authors print to be checked (push-sum mass 1,
exact consensus of two ranks, global gradient norm below the local one) or a
learning signal (test accuracy well above chance).  Each job is bounded at 150 s
(a few seconds of work; the rest is two Python start-ups with torch on a loaded
2-core machine).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "tests" / "bluefog_suite" / "examples"
MPIRUN = Path(sys.executable).parent / "mpirun"
if not MPIRUN.exists():
    MPIRUN = Path(shutil.which("mpirun") or "mpirun")
LIMIT_S = 150.0

pytestmark = pytest.mark.skipif(not MPIRUN.exists(), reason="no mpirun")


def run_example(script: str, *args: str, tmp_path: Path, n: int = 2) -> str:
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MPLBACKEND="Agg",
               OMPI_MCA_osc="^ucx")
    env.pop("BLUEFOG_TIMELINE", None)
    cmd = [str(MPIRUN), "-np", str(n), "--oversubscribe", "--bind-to", "none",
           sys.executable, str(EXAMPLES / script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=LIMIT_S, env=env,
                          cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def floats_after(label: str, out: str) -> list[float]:
    num = r"([-+0-9.eE]+|nan|inf)"
    return [float(m) for m in re.findall(re.escape(label) + r"\s*(?:tensor\(\[?)?" + num, out)]


def test_average_consensus_two_ranks_is_exact(tmp_path):
    # two ranks on BlueFog's default ExponentialGraph: each averages with the other
    # (weights 1/2), so one iteration reaches the exact mean
    out = run_example("pytorch_average_consensus.py", "--max-iters", "5", "--data-size", "1000",
                      tmp_path=tmp_path)
    mse = floats_after("MSE at last iteration:", out)
    assert len(mse) == 2 and max(mse) < 1e-12, out[-2000:]


def test_average_consensus_dynamic_one_peer(tmp_path):
    out = run_example("pytorch_average_consensus.py", "--max-iters", "5", "--data-size", "1000",
                      "--enable-dynamic-topology", "--virtual-topology", "ring",
                      tmp_path=tmp_path)
    mse = floats_after("MSE at last iteration:", out)
    assert len(mse) == 2 and max(mse) < 1e-12, out[-2000:]


def test_average_consensus_push_sum_keeps_the_mass(tmp_path):
    # asynchronous push-sum over windows: the ranks' weights p always average to 1
    out = run_example("pytorch_average_consensus.py", "--max-iters", "20", "--data-size", "1000",
                      "--asynchronous-mode", tmp_path=tmp_path)
    p = floats_after("Actuall value is", out)
    assert len(p) == 1 and abs(p[0] - 1.0) < 1e-12, out[-2000:]


@pytest.mark.parametrize("method", ["exact_diffusion", "gradient_tracking"])
def test_optimization_reaches_the_global_solution(method, tmp_path):
    # the example's own check: at the global optimum the global gradient vanishes
    # while each rank's local gradient does not
    out = run_example("pytorch_optimization.py", "--max-iter", "40", "--method", method,
                      "--save-plot-file", str(tmp_path / "plot.png"), tmp_path=tmp_path)
    glob = floats_after(f"[{method}] Rank 0: global gradient norm:", out)
    local = floats_after(f"[{method}] Rank 0: local gradient norm:", out)
    assert len(glob) == 1 and len(local) == 1, out[-2000:]
    assert glob[0] < 0.5 * local[0], out[-2000:]
    assert (tmp_path / "plot.png").exists()


@pytest.mark.parametrize("extra", [[], ["--atc-style"], ["--dist-optimizer", "win_put"]],
                         ids=["awc-dynamic", "atc-dynamic", "win-put"])
def test_mnist_on_offline_digits_learns(extra, tmp_path):
    out = run_example("pytorch_mnist.py", "--data", "digits", "--epochs", "1",
                      "--log-interval", "100", *extra, tmp_path=tmp_path)
    acc = [float(a) for a in re.findall(r"Accuracy: ([0-9.]+)%", out)]
    # one epoch over 1437 training digits; chance is 10 %
    assert len(acc) == 1 and acc[0] > 30.0, out[-2000:]


@pytest.mark.parametrize("opt", ["neighbor_allreduce", "gradient_allreduce"])  # win_put: mnist
def test_benchmark_lenet_runs(opt, tmp_path):
    out = run_example("pytorch_benchmark.py", "--model", "lenet", "--num-warmup-batches", "1",
                      "--num-batches-per-iter", "2", "--num-iters", "2", "--dist-optimizer",
                      opt, tmp_path=tmp_path)
    rates = floats_after("Total img/sec on 2 CPU(s):", out)
    assert len(rates) == 1 and rates[0] > 0, out[-2000:]
