"""Cost of decomm's timeline: off (hooks present, not recording) and on.

Run ``python benchmarks/timeline_overhead.py`` (launches itself under mpirun -np 1 and 2;
one rank has no neighbours, so it isolates the software cost from the noise of waiting).
Per message size (float32, ring), interleaved in the same run, the median time per
``decomm.neighbor_allreduce_`` call with:

- **bare**: ``ops._neighbor_allreduce`` without the ``timeline.traced`` decorator and the
  C++ timestamps off (the code before the timeline existed);
- **off**: decorated, timeline off (what every user pays: one call + two flag checks);
- **on**: ``DECOMM_TIMELINE`` recording (Python events + the four C++ timestamps).

Also the per-call cost of the decorator alone around a no-op function (no MPI), where
the difference is not lost in the noise of a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZES = [4 << 10, 64 << 10, 1 << 20]


def human(nbytes: int) -> str:
    return f"{nbytes >> 20} MB" if nbytes >= 1 << 20 else f"{nbytes >> 10} KB"


def worker(out_path: str | None, reps: int) -> None:
    import numpy as np
    import torch
    from mpi4py import MPI

    import decomm
    from decomm import ops, timeline
    from decomm.topology import RingGraph

    torch.set_num_threads(1)
    decomm.init()
    comm = MPI.COMM_WORLD
    rank, n = comm.Get_rank(), comm.Get_size()
    decomm.set_topology(RingGraph(n))
    current = ops._neighbor_allreduce
    bare = getattr(current, "__wrapped__", current)  # undecorated
    traced = current if hasattr(current, "__decomm_traced__") else \
        timeline.traced("neighbor_allreduce")(bare)
    tmp = tempfile.mkdtemp(prefix="decomm-tl-bench-")

    def mode(m: str) -> None:
        if m == "on":
            timeline.start(os.path.join(tmp, "r"))
        elif timeline.enabled:
            timeline.stop()
            timeline._reset_for_tests()
        ops._neighbor_allreduce = bare if m == "bare" else traced

    def timed(x, iters: int) -> float:
        samples = []
        for _ in range(reps):
            comm.Barrier()
            t0 = time.perf_counter()
            for _ in range(iters):
                decomm.neighbor_allreduce_(x, name="bench")
            samples.append((time.perf_counter() - t0) / iters)
        return float(np.median(samples))

    rows = []
    for nbytes in SIZES:
        x = torch.full((nbytes // 4,), float(rank))
        iters = max(5, min(400, (16 << 20) // nbytes))
        res: dict[str, list[float]] = {"bare": [], "off": [], "on": []}
        for _ in range(5):  # interleaved rounds
            for m in ("bare", "off", "on"):
                mode(m)
                decomm.neighbor_allreduce_(x, name="bench")
                res[m].append(timed(x, iters))
        mode("off")
        row = {"bytes": nbytes}
        for m, v in res.items():
            row[m] = comm.allreduce(float(np.median(v)), op=MPI.MAX)
        rows.append(row)
        if rank == 0:
            print(f"  {human(nbytes):>6}: bare {row['bare'] * 1e6:8.1f} us  off "
                  f"{row['off'] * 1e6:8.1f} us  on {row['on'] * 1e6:8.1f} us", flush=True)
    # the decorator alone, on a no-op (no MPI noise)
    def noop(tensor, name=None):
        return tensor

    deco = timeline.traced("noop")(noop)
    t = torch.ones(1)
    k = 200_000
    raw_ns = min(timeit.repeat(lambda: noop(t, name="x"), number=k, repeat=5)) / k * 1e9
    off_ns = min(timeit.repeat(lambda: deco(t, name="x"), number=k, repeat=5)) / k * 1e9
    timeline.start(os.path.join(tmp, "noop"))
    k_on = k // 10
    on_ns = min(timeit.repeat(lambda: deco(t, name="x"), number=k_on, repeat=5)) / k_on * 1e9
    timeline.stop()
    timeline._reset_for_tests()
    if rank == 0 and out_path:
        Path(out_path).write_text(json.dumps({"np": n, "rows": rows, "noop_raw_ns": raw_ns,
                                              "noop_off_ns": off_ns, "noop_on_ns": on_ns}))
    decomm.shutdown()


def driver(nps: list[int], reps: int, out_md: Path) -> int:
    mpirun = Path(sys.executable).parent / "mpirun"
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("DECOMM_TIMELINE", None)
    results = []
    for n in nps:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            path = f.name
        print(f"[bench] timeline overhead on {n} ranks (ring)", flush=True)
        cmd = [str(mpirun), "-np", str(n), "--oversubscribe", "--bind-to", "none",
               sys.executable, __file__, "--worker", "--json", path, "--reps", str(reps)]
        rc = subprocess.run(cmd, env=env).returncode
        if rc != 0:
            print(f"[bench] mpirun failed with exit code {rc}", flush=True)
            return rc
        results.append(json.loads(Path(path).read_text()))
        os.unlink(path)
    res = results[-1]
    lines = [
        "# Timeline overhead",
        "",
        f"Machine: {os.cpu_count()} shared CPU cores (shared with other jobs: expect +-20% "
        "noise between rows), no GPU; ring, float32, `decomm.neighbor_allreduce_`. Median "
        "time per call (max over ranks), the three modes interleaved in the same run. "
        "**bare** = no decorator, C++ timestamps off (the code before the timeline); "
        "**off** = decorated, not recording (every user's cost); **on** = recording "
        "(`DECOMM_TIMELINE`). With 1 rank there is no neighbour to wait for, so the "
        "difference is the software cost alone.",
        "",
        "| ranks | size | bare (us) | off (us) | on (us) | off/bare | on/bare |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for row in r["rows"]:
            lines.append(f"| {r['np']} | {human(row['bytes'])} | {row['bare'] * 1e6:.1f} | "
                         f"{row['off'] * 1e6:.1f} | {row['on'] * 1e6:.1f} | "
                         f"{row['off'] / row['bare']:.3f} | {row['on'] / row['bare']:.3f} |")
    lines += [
        "",
        "The decorator alone, around a Python no-op (no MPI; min of 5 x 200k calls):",
        "",
        "| no-op | undecorated (ns) | decorated, off (ns) | decorated, on (ns) |",
        "|---|---|---|---|",
        f"| per call | {res['noop_raw_ns']:.0f} | {res['noop_off_ns']:.0f} | "
        f"{res['noop_on_ns']:.0f} |",
    ]
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[4:]), flush=True)
    print(f"[bench] wrote {out_md}", flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--np", default="1,2")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                         "timeline_overhead.md"))
    args = ap.parse_args()
    if args.worker:
        worker(args.json, args.reps)
        return 0
    return driver([int(v) for v in args.np.split(",")], args.reps, Path(args.out))


if __name__ == "__main__":
    sys.exit(main())
