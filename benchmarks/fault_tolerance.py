"""Fault tolerance: its failure-free cost, and the time from a kill to every survivor resumed.

1. Failure-free cost. ``neighbor_allreduce_`` on a ring, 4 ranks, 4 KiB and 1 MiB and
   16 MiB float32, in three kinds of job: plain (shared memory), fault tolerant as
   ``decomm-run --fault-tolerant`` starts it (ULFM, TCP on the node), and fault tolerant
   over shared memory (ULFM + decomm's fault-tolerant mode, the transport unchanged: the
   cost of ULFM and decomm's checks alone). Jobs alternate A/B/C several times; the table
   gives the median time per call of each and the ratios to the plain job.
2. Recovery time. A job of N ranks (4, 8, 25) runs neighbor_allreduce in a loop; launch
   rank 1 records the wall-clock time and SIGKILLs itself; every survivor records when
   ``decomm.recover()`` returned. Kill to the last survivor resumed, in ms.

Usage: ``flock /tmp/decomm-bench.lock python benchmarks/fault_tolerance.py [--quick]``;
writes ``benchmarks/results/fault_tolerance.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MPIRUN = Path(sys.executable).parent / "mpirun"
SIZES = {"4 KiB": 1024, "1 MiB": 1 << 18, "16 MiB": 1 << 22}  # float32 elements

WORKER = r'''
import json, os, signal, sys, time, torch
import decomm
mode = sys.argv[1]
decomm.init(timeout=120)
n = decomm.size()
decomm.set_topology(decomm.topology.RingGraph(n))
if mode == "cost":
    out = {}
    for label, numel in json.loads(sys.argv[2]).items():
        x = torch.ones(numel)
        reps = max(20, min(2000, int(2e8 / (numel * 4 + 4096))))
        for _ in range(5):
            decomm.neighbor_allreduce_(x, name="w")
        decomm.barrier()
        t0 = time.perf_counter()
        for _ in range(reps):
            decomm.neighbor_allreduce_(x, name="b")
        dt = (time.perf_counter() - t0) / reps
        out[label] = decomm.allreduce(torch.tensor([dt], dtype=torch.float64), average=True,
                                      name="t").item()
    if decomm.rank() == 0:
        print("RESULT " + json.dumps(out), flush=True)
else:
    x = torch.ones(1024)
    for step in range(400):
        if step == 50 and decomm.launch_rank() == 1:
            print("KILL " + repr(time.time()), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            decomm.neighbor_allreduce_(x, name="x")
        except decomm.PeerFailureError:
            decomm.recover()
            print("RESUMED " + repr(time.time()), flush=True)
            break
'''


def job(np_: int, kind: str, args: list[str], limit: float = 300) -> str:
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    script = Path("/tmp/decomm_ft_bench_worker.py")
    script.write_text(WORKER)
    pre = [str(MPIRUN), "--oversubscribe", "--bind-to", "none", "-np", str(np_)]
    if kind == "ft-tcp":  # what decomm-run --fault-tolerant does
        pre += ["--with-ft", "ulfm", "--mca", "btl", "self,tcp", "-x", "DECOMM_FAULT_TOLERANT=1"]
    elif kind == "ft-sm":
        pre += ["--with-ft", "ulfm", "-x", "DECOMM_FAULT_TOLERANT=1"]
    proc = subprocess.run([*pre, sys.executable, str(script), *args], capture_output=True,
                          text=True, timeout=limit, env=env)
    return proc.stdout + proc.stderr


def cost(reps: int) -> dict[str, dict[str, list[float]]]:
    times: dict[str, dict[str, list[float]]] = {}
    for r in range(reps):
        for kind in ("plain", "ft-tcp", "ft-sm"):
            out = job(4, kind, ["cost", json.dumps(SIZES)])
            line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
            if not line:
                raise SystemExit(f"{kind} job failed:\n{out}")
            for label, dt in json.loads(line[0][7:]).items():
                times.setdefault(kind, {}).setdefault(label, []).append(dt)
            print(f"  cost rep {r + 1}/{reps} {kind}: "
                  + ", ".join(f"{k} {v[-1] * 1e6:.1f} us" for k, v in times[kind].items()),
                  flush=True)
    return times


def recovery(np_: int, reps: int, kind: str = "ft-tcp") -> tuple[list[float], int]:
    """Kill-to-resumed times of the runs that recovered, and how many did not."""
    out_ms, failed = [], 0
    for r in range(reps):
        try:
            out = job(np_, kind, ["recover"], limit=120)
        except subprocess.TimeoutExpired:
            out = ""
        kills = [float(ln.split()[1]) for ln in out.splitlines() if ln.startswith("KILL ")]
        res = [float(ln.split()[1]) for ln in out.splitlines() if ln.startswith("RESUMED ")]
        if len(kills) != 1 or len(res) != np_ - 1:
            failed += 1
            print(f"  recovery {kind} np={np_} rep {r + 1}: did not recover ({len(res)} of "
                  f"{np_ - 1} resumed)", flush=True)
            continue
        out_ms.append((max(res) - kills[0]) * 1e3)
        print(f"  recovery {kind} np={np_} rep {r + 1}/{reps}: {out_ms[-1]:.0f} ms", flush=True)
    return out_ms, failed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = ap.parse_args()
    load0 = os.getloadavg()
    reps = 2 if args.quick else 5
    print(f"[bench] failure-free cost, {reps} alternating repetitions of 3 jobs", flush=True)
    times = cost(reps)
    rec = {np_: recovery(np_, 2 if args.quick else 5) for np_ in (4, 8, 25)}
    sm = {np_: recovery(np_, 2 if args.quick else 6, "ft-sm") for np_ in (8, 25)}
    load1 = os.getloadavg()
    lines = ["# Fault tolerance: failure-free cost and recovery time", "",
             f"Generated by `benchmarks/fault_tolerance.py` on {time.strftime('%Y-%m-%d')}; "
             f"load average at start {load0[0]:.2f}, at end {load1[0]:.2f} (2-core machine).",
             "", "## Failure-free cost (4 ranks, ring, `neighbor_allreduce_`, median per call)",
             "", "| size | plain (sm) | FT over TCP | FT over sm | FT-TCP / plain | "
             "FT-sm / plain |", "|---|---|---|---|---|---|"]
    for label in SIZES:
        med = {k: statistics.median(times[k][label]) for k in times}
        lines.append(f"| {label} | {med['plain'] * 1e6:.1f} us | {med['ft-tcp'] * 1e6:.1f} us "
                     f"| {med['ft-sm'] * 1e6:.1f} us | {med['ft-tcp'] / med['plain']:.2f} | "
                     f"{med['ft-sm'] / med['plain']:.2f} |")
    lines += ["", "## Kill to every survivor resumed", "",
              "Launch rank 1 SIGKILLs itself; wall clock from just before the kill to the "
              "last survivor's return from `decomm.recover()`.", "",
              "| transport | ranks | recovered | did not | median | min | max |",
              "|---|---|---|---|---|---|---|"]
    for kind, table in (("TCP (decomm-run --fault-tolerant)", rec), ("shared memory", sm)):
        for np_, (v, bad) in table.items():
            if v:
                lines.append(f"| {kind} | {np_} | {len(v)} | {bad} | {statistics.median(v):.0f}"
                             f" ms | {min(v):.0f} ms | {max(v):.0f} ms |")
            else:
                lines.append(f"| {kind} | {np_} | 0 | {bad} | - | - | - |")
    text = "\n".join(lines) + "\n"
    print(text)
    path = ROOT / "benchmarks" / "results" / "fault_tolerance.md"
    path.write_text(text)
    print(f"[bench] wrote {path}")


if __name__ == "__main__":
    main()
