"""Fault tolerance under ULFM: whole jobs in which ranks die, and the survivors go on.

Each case runs ``decomm-run --fault-tolerant -np N python tests/scenarios/ft_job.py ...``
(its own mpirun, an outer time limit), so the launcher's exit status is checked too. The
survivors' numbers are checked against the closed form over the survivors. The pure
parts (topology re-planning, the launcher's status logic) are tested in-process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from decomm import launcher
from decomm.topology import (
    BaseGraph,
    EquiDyn,
    ExponentialGraph,
    HypercubeGraph,
    RingGraph,
    Topology,
)
from decomm.topology.replan import metropolis_hastings, replan

ROOT = Path(__file__).resolve().parents[2]
MPIRUN = Path(sys.executable).parent / "mpirun"
if not MPIRUN.exists():
    MPIRUN = Path(shutil.which("mpirun") or "mpirun")
needs_mpi = pytest.mark.skipif(not MPIRUN.exists(), reason="no mpirun")


def run_ft(mode: str, n: int = 4, victims: str = "1", death: str = "kill",
           extra: tuple[str, ...] = (), limit: float = 240.0) -> tuple[int, list[dict], str]:
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("DECOMM_FAULT_TOLERANT", None)
    cmd = [sys.executable, "-m", "decomm.launcher", "--mpirun", str(MPIRUN), "--oversubscribe",
           "--fault-tolerant", *extra, "-np", str(n), sys.executable,
           str(ROOT / "tests" / "scenarios" / "ft_job.py"), mode, victims, death]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, env=env)
    out = proc.stdout + proc.stderr
    results = [json.loads(line.split("RESULT ", 1)[1]) for line in out.splitlines()
               if line.startswith("RESULT ")]
    return proc.returncode, results, out


def survivors_b_mean(n: int, lost: list[int]) -> np.ndarray:
    keep = [i for i in range(n) if i not in lost]
    return np.mean([[i, 2.0 * i, -i, 1.0] for i in keep], axis=0)


# ------------------------------------------------------------- pure parts
def test_library_graphs_rebuild_for_the_survivors():
    assert replan(BaseGraph(25, 1), list(range(24))).name == BaseGraph(24, 1).name
    assert replan(ExponentialGraph(8), [0, 1, 2, 4, 5, 6, 7]).fingerprint() == \
        ExponentialGraph(7).fingerprint()
    assert replan(EquiDyn(8, seed=3), range(6)).fingerprint() == EquiDyn(6, seed=3).fingerprint()


def test_inadmissible_size_and_user_graphs_use_the_induced_metropolis_hastings_graph():
    # a hypercube needs a power of two: 7 survivors get the induced graph
    t = replan(HypercubeGraph(8), [0, 1, 2, 3, 4, 5, 6])
    assert t.name.startswith("induced(HypercubeGraph")
    assert t.is_doubly_stochastic() and t.is_symmetric()
    ring = Topology.from_matrices([RingGraph(6).matrix(0)])
    w = replan(ring, [0, 1, 2, 4, 5]).matrix(0)
    # the induced path 3-4-0-1-2 (old 4,5,0,1,2): MH weights 1/(1+max degree)
    adj = np.zeros((5, 5))
    for i, j in [(3, 4), (4, 0), (0, 1), (1, 2)]:
        adj[i, j] = adj[j, i] = 1
    np.testing.assert_allclose(w, metropolis_hastings(adj))
    np.testing.assert_allclose(w[3], [0, 0, 0, 2 / 3, 1 / 3])
    np.testing.assert_allclose(w.sum(0), 1.0)
    np.testing.assert_allclose(w.sum(1), 1.0)


def test_disconnected_survivors_are_a_clear_error():
    star = Topology.from_matrices([np.full((4, 4), 0.0) + np.diag([0.25, 0.75, 0.75, 0.75])
                                   + np.array([[0, .25, .25, .25], [.25, 0, 0, 0],
                                               [.25, 0, 0, 0], [.25, 0, 0, 0]])])
    with pytest.raises(ValueError, match="not connected"):
        replan(star, [1, 2, 3])  # the centre died
    with pytest.raises(ValueError, match="increasing node ids"):
        replan(star, [2, 1])


def test_launcher_adds_ulfm_and_tcp(tmp_path):
    args = launcher.parse_args(["--fault-tolerant", "-np", "4", "python", "x.py"])
    plan = launcher.build_plan(args, "mpirun", cpu_count=2, uid=1000, env={})
    line = plan.shell_line()
    assert "--with-ft ulfm" in line and "--mca btl self,tcp" in line
    assert "DECOMM_FAULT_TOLERANT=1" in line
    args = launcher.parse_args(["--fault-tolerant", "-np", "4", "python", "x.py"])
    plan = launcher.build_plan(args, "mpirun", cpu_count=2, uid=1000,
                               env={"OMPI_MCA_btl": "self,sm"})
    assert "--mca btl" not in plan.shell_line()


def test_launcher_status_from_the_ranks_lines(tmp_path):
    p = tmp_path / "status"
    p.write_text("lost 0 2\nfinished 0\nfinished 1\nfinished 3\n")
    assert launcher.fault_tolerant_status(0, str(p), 4, False) == 0
    assert launcher.fault_tolerant_status(0, str(p), 4, True) == 3
    assert launcher.fault_tolerant_status(7, str(p), 4, False) == 7
    p.write_text("lost 0 2\nfinished 0\nfinished 3\n")  # rank 1 neither finished nor lost
    assert launcher.fault_tolerant_status(0, str(p), 4, False) == 1


# ------------------------------------------------------------ whole jobs
@needs_mpi
@pytest.mark.parametrize("mode", ["raw", "raw_nonblocking", "raw_allreduce"])
def test_raw_ops_raise_peer_failure_everywhere_then_recover(mode):
    rc, results, out = run_ft(mode)
    assert rc == 0, out
    assert sorted(r["launch"] for r in results) == [0, 2, 3], out
    for r in results:
        assert r["failed"] == [1] and r["size"] == 3, r
        assert r["named"] == [[1]], r  # every survivor was told [1], never a mismatch
        assert r["recoveries"] == 1
    assert "called differently" not in out
    assert "lost rank(s) [1]" in out


@needs_mpi
@pytest.mark.parametrize("death", ["kill", "segv", "exit0", "raise", "sysexit"])
def test_gradient_tracking_reaches_the_survivors_optimum(death):
    rc, results, out = run_ft("gt", death=death)
    assert rc == 0, out
    assert sorted(r["launch"] for r in results) == [0, 2, 3], out
    want = survivors_b_mean(4, [1])
    for r in results:
        assert r["failed"] == [1], r
        np.testing.assert_allclose(r["x"], want, atol=1e-8, err_msg=out)
    assert "continuing on 3 ranks over BaseGraph(n=3, k=1)" in out


@needs_mpi
@pytest.mark.parametrize("mode", ["atc", "awc"])
def test_dsgd_average_reaches_the_survivors_optimum(mode):
    rc, results, out = run_ft(mode, n=5, victims="2")
    assert rc == 0, out
    want = survivors_b_mean(5, [2])
    assert len(results) == 4, out
    for r in results:
        np.testing.assert_allclose(r["mean"], want, atol=1e-8, err_msg=out)


@needs_mpi
def test_push_sum_weights_are_renormalised_on_the_survivors():
    """Push-sum conserves mass: the survivors' weights must sum to their number again
    (without the restart they would sum to n minus the lost node's weight)."""
    rc, results, out = run_ft("pushsum", n=5, victims="3")
    assert rc == 0, out
    assert len(results) == 4, out
    for r in results:
        assert abs(r["push_weight_sum"] - 4.0) < 1e-9, r
        assert r["failed"] == [3]


@needs_mpi
@pytest.mark.parametrize("mode", ["win", "hier"])
def test_windows_and_machine_grouping_are_rebuilt_on_the_survivors(mode):
    """Windows: re-created on the survivors, the failure noticed by a two-sided call (RMA
    gives none); hierarchical: the machines regrouped (5 ranks in machines of 2 lose
    launch rank 1: 4 survivors, 2 machines), results against the closed form."""
    rc, results, out = run_ft(mode, n=5)
    assert rc == 0, out
    assert sorted(r["launch"] for r in results) == [0, 2, 3, 4], out
    for r in results:
        assert r["failed"] == [1] and r["recoveries"] == 1, r
        if mode == "hier":
            assert r["machines"] == 2, r


@needs_mpi
def test_two_failures_at_once():
    rc, results, out = run_ft("gt", n=6, victims="1,4")
    assert rc == 0, out
    want = survivors_b_mean(6, [1, 4])
    assert sorted(r["launch"] for r in results) == [0, 2, 3, 5], out
    for r in results:
        assert sorted(r["failed"]) == [1, 4], r
        np.testing.assert_allclose(r["x"], want, atol=1e-8, err_msg=out)


@needs_mpi
def test_a_failure_during_recovery():
    rc, results, out = run_ft("raw_die_in_recovery", n=5)
    assert rc == 0, out
    assert sorted(r["launch"] for r in results) == [0, 2, 4], out
    for r in results:
        assert sorted(r["failed"]) == [1, 3], r


@needs_mpi
def test_a_topology_callable_plans_the_survivors_graph():
    rc, results, out = run_ft("raw_callable")
    assert rc == 0, out
    assert len(results) == 3, out
    for r in results:
        assert r["topology"] == "FullyConnectedGraph(n=3)", r
        assert r["failed"] == [1] and r["recoveries"] == 1, r


@needs_mpi
def test_fail_on_loss_makes_the_status_nonzero():
    rc, results, out = run_ft("raw", extra=("--fail-on-loss",))
    assert rc == 3, out
    assert len(results) == 3


@needs_mpi
def test_checkpoint_restart_on_fewer_ranks_starts_from_the_average(tmp_path):
    """The fallback for a lost host: a checkpoint of 4 ranks restarts 3 from their mean."""
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    path = str(tmp_path / "ckpt.pt")
    script = str(ROOT / "tests" / "scenarios" / "ckpt_job.py")

    def job(n: int, mode: str) -> list[dict]:
        proc = subprocess.run([str(MPIRUN), "--oversubscribe", "-np", str(n), sys.executable,
                               script, mode, path], capture_output=True, text=True,
                              timeout=180, env=env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return [json.loads(ln.split("RESULT ", 1)[1]) for ln in proc.stdout.splitlines()
                if ln.startswith("RESULT ")]

    saved = job(4, "save")
    assert len(saved) == 4
    mean = [np.mean([np.asarray(s["params"][k]) for s in saved], axis=0) for k in range(2)]
    resumed = job(3, "resume")
    assert len(resumed) == 3
    for r in resumed:
        assert r["info"]["step"] == 10 and r["info"]["size"] == 4
        for k in range(2):
            np.testing.assert_allclose(r["loaded"][k], mean[k], rtol=0, atol=1e-12)
