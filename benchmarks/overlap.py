"""How much of a non-blocking neighbor_allreduce hides behind computation.

Run: ``python benchmarks/overlap.py`` (launches itself under mpirun -np 2, once with
decomm's background progress thread and once with progress only inside wait(),
``DECOMM_PROGRESS_THREAD=0``).

Per message size it measures, on the same ranks and in the same run:
  t_comm     blocking neighbor_allreduce alone,
  t_compute  a fixed matmul workload alone,
  t_overlap  start the non-blocking op, run the workload, wait.
overlap = (t_comm + t_compute - t_overlap) / min(t_comm, t_compute): 1 means the
shorter of the two was completely hidden, 0 means no overlap at all.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from mpi_launch import run_workers

ROOT = Path(__file__).resolve().parent.parent
SIZES = [1 << 20, 16 << 20]


def worker(out: str, reps: int) -> None:
    import numpy as np
    import torch

    import decomm
    from decomm.topology import RingGraph

    torch.set_num_threads(1)
    decomm.init()
    decomm.set_topology(RingGraph(decomm.size()))
    a = torch.randn(256, 256)

    def compute(k: int) -> None:
        b = a
        for _ in range(k):
            b = torch.tanh(b @ a)

    def med(fn) -> float:
        samples = []
        for _ in range(reps):
            decomm.barrier()
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        return decomm.allreduce(torch.tensor([float(np.median(samples))],
                                             dtype=torch.float64)).item()

    rows = []
    for nbytes in SIZES:
        x = torch.ones(nbytes // 4)
        decomm.neighbor_allreduce_(x)  # warm-up
        t_comm = med(lambda x=x: decomm.neighbor_allreduce_(x))
        # size the workload to take about as long as the exchange
        t_one = med(lambda: compute(1))
        k = max(1, round(t_comm / max(t_one, 1e-6)))
        t_compute = med(lambda k=k: compute(k))

        def overlapped(x=x, k=k) -> None:
            h = decomm.neighbor_allreduce_nonblocking_(x)
            compute(k)
            h.wait()

        t_overlap = med(overlapped)
        frac = (t_comm + t_compute - t_overlap) / min(t_comm, t_compute)
        rows.append({"bytes": nbytes, "comm": t_comm, "compute": t_compute,
                     "overlap_t": t_overlap, "overlap": frac})
        if decomm.rank() == 0:
            print(f"  {nbytes >> 20} MB: comm {t_comm * 1e3:.2f} ms, compute "
                  f"{t_compute * 1e3:.2f} ms, together {t_overlap * 1e3:.2f} ms, "
                  f"overlap {frac:.2f}", flush=True)
    if decomm.rank() == 0:
        Path(out).write_text(json.dumps(rows))
    decomm.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--json", default="")
    ap.add_argument("--np", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "overlap.md"))
    args = ap.parse_args()
    if args.worker:
        worker(args.json, args.reps)
        return 0
    results = {}
    for mode in ("1", "0"):
        label = "progress thread" if mode == "1" else "progress in wait() only"
        print(f"[bench] overlap on {args.np} ranks, {label}", flush=True)
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            path = f.name
        rc = run_workers(__file__, args.np, ["--json", path, "--reps", str(args.reps)],
                         DECOMM_PROGRESS_THREAD=mode)
        if rc:
            return rc
        results[label] = json.loads(Path(path).read_text())
        os.unlink(path)
    lines = ["# Overlap of non-blocking neighbor_allreduce with computation", "",
             f"{args.np} ranks on {os.cpu_count()} shared cores, ring, float32; medians of "
             f"{args.reps} repetitions, mean over ranks. overlap = (t_comm + t_compute - "
             "t_together) / min(t_comm, t_compute): 1 = fully hidden, 0 = none.", "",
             "| progress | size | comm (ms) | compute (ms) | together (ms) | overlap |",
             "|---|---|---|---|---|---|"]
    for label, rows in results.items():
        for r in rows:
            lines.append(f"| {label} | {r['bytes'] >> 20} MB | {r['comm'] * 1e3:.2f} | "
                         f"{r['compute'] * 1e3:.2f} | {r['overlap_t'] * 1e3:.2f} | "
                         f"{r['overlap']:.2f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines[4:]))
    print(f"[bench] wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
