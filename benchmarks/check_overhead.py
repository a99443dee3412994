"""Cost of decomm's cross-rank consistency checks (DECOMM_CHECK) at small messages.

Also the cost of naming a call after its call site: ``neighbor_allreduce_(x)``
without ``name=`` (the line is looked up and the label cached) against the same
call with ``name="x"``, alternated the same way.

Run: ``python benchmarks/check_overhead.py`` (launches itself under mpirun -np 4).
With checks on, neighbor_allreduce compares the header that travels inside each
message (no extra message), while allreduce/broadcast/allgather gather every rank's
header first (one small extra collective). Checks are toggled on and off in
alternating repetitions of the same run, so both see the same machine load.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from mpi_launch import run_workers

ROOT = Path(__file__).resolve().parent.parent


def worker(out: str, reps: int, iters: int) -> None:
    import numpy as np
    import torch

    import decomm
    from decomm.topology import RingGraph

    torch.set_num_threads(1)
    decomm.init()
    decomm.set_topology(RingGraph(decomm.size()))
    backend = decomm._state.require().backend
    x = torch.zeros(1024)  # 4 KB of float32
    ops = {
        "neighbor_allreduce 4 KB": lambda: decomm.neighbor_allreduce_(x, name="x"),
        "allreduce 4 KB": lambda: decomm.allreduce_(x, name="x"),
    }
    rows = []
    for label, fn in ops.items():
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(20):
            fn()
        for rep in range(reps):
            for check in ((True, False) if rep % 2 == 0 else (False, True)):
                backend.set_check(check)
                decomm.barrier()
                t0 = time.perf_counter()
                for _ in range(iters):
                    fn()
                times[check].append((time.perf_counter() - t0) / iters)
        backend.set_check(True)
        on = float(np.median(times[True]))
        off = float(np.median(times[False]))
        on = decomm.allreduce(torch.tensor([on], dtype=torch.float64), average=False).item()
        off = decomm.allreduce(torch.tensor([off], dtype=torch.float64), average=False).item()
        n = decomm.size()
        rows.append((label, on / n, off / n))
        if decomm.rank() == 0:
            print(f"  {label}: check on {on / n * 1e6:.1f} us, off {off / n * 1e6:.1f} us, "
                  f"on/off {on / off:.2f}", flush=True)
    # Unnamed calls get '@file.py:line' from a frame walk and a dictionary lookup.
    x2 = torch.zeros(1024)
    calls = {"named": lambda: decomm.neighbor_allreduce_(x2, name="x"),
             "unnamed": lambda: decomm.neighbor_allreduce_(x2)}
    site_times: dict[str, list[float]] = {"named": [], "unnamed": []}
    for rep in range(reps):
        for label in (("named", "unnamed") if rep % 2 == 0 else ("unnamed", "named")):
            fn = calls[label]
            decomm.barrier()
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            site_times[label].append((time.perf_counter() - t0) / iters)
    site = {k: decomm.allreduce(torch.tensor([float(np.median(v))], dtype=torch.float64),
                                average=True).item() for k, v in site_times.items()}
    # The lookup alone, without communication (this rank, many calls).
    from decomm import ops as _ops

    def lookup() -> None:
        _ops._name(None, "neighbor_allreduce")

    t0 = time.perf_counter()
    for _ in range(100000):
        lookup()
    lookup_s = (time.perf_counter() - t0) / 100000
    if decomm.rank() == 0:
        print(f"  call-site name: named {site['named'] * 1e6:.1f} us, unnamed "
              f"{site['unnamed'] * 1e6:.1f} us; lookup alone {lookup_s * 1e9:.0f} ns",
              flush=True)
    if decomm.rank() == 0:
        lines = ["# Cost of the consistency checks (DECOMM_CHECK)", "",
                 f"{decomm.size()} ranks on {os.cpu_count()} shared cores, ring topology, "
                 f"float32; median of {reps} alternating repetitions x {iters} calls, "
                 "mean over ranks.", "",
                 "| op | check on (us) | check off (us) | on/off |", "|---|---|---|---|"]
        lines += [f"| {label} | {on * 1e6:.1f} | {off * 1e6:.1f} | {on / off:.2f} |"
                  for label, on, off in rows]
        lines += ["", "## Naming unnamed calls after their call site", "",
                  "neighbor_allreduce_ of 4 KB, checks on, same alternation; the lookup "
                  "alone timed on rank 0 without communication.", "",
                  "| call | us per call |", "|---|---|",
                  f"| `neighbor_allreduce_(x, name=\"x\")` | {site['named'] * 1e6:.1f} |",
                  f"| `neighbor_allreduce_(x)` (name from the call site) | "
                  f"{site['unnamed'] * 1e6:.1f} |",
                  f"| call-site lookup alone (cached) | {lookup_s * 1e6:.2f} |", "",
                  f"unnamed/named: {site['unnamed'] / site['named']:.3f}"]
        Path(out).write_text("\n".join(lines) + "\n")
        print(f"[bench] wrote {out}", flush=True)
    decomm.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--np", type=int, default=4)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "check_overhead.md"))
    args = ap.parse_args()
    if args.worker:
        worker(args.out, args.reps, args.iters)
        return 0
    print(f"[bench] consistency-check overhead on {args.np} ranks", flush=True)
    load_start = os.getloadavg()[0]
    rc = run_workers(__file__, args.np, ["--out", args.out, "--reps", str(args.reps),
                                         "--iters", str(args.iters)])
    load_end = os.getloadavg()[0]
    if rc == 0:
        with open(args.out, "a") as f:
            f.write(f"\nLoad average (1 min): {load_start:.2f} at start, {load_end:.2f} at end.\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
