"""hierarchical_neighbor_allreduce vs flat neighbor_allreduce.

Run ``python benchmarks/hierarchical.py`` (it launches itself under mpirun, with ranks
grouped into fake machines by ``DECOMM_LOCAL_SIZE``).

For each configuration (ranks n, ranks per machine L) and message size (float32) it
measures, interleaved in the same run:

- **flat**: ``decomm.neighbor_allreduce_`` over ``ExponentialGraph(n)`` (rank level);
- **hier**: ``hierarchical_neighbor_allreduce_`` with machine topology
  ``ExponentialGraph(n / L)`` (local average, leaders gossip, local broadcast).

It also reports what the timings on one host cannot show: the messages and bytes
that cross machine boundaries per call (the expensive network traffic on a real
cluster) and how well one call mixes: ``||M - J/n||_2`` of the call's n x n operator
(0 = exact average; flat: W itself, hier: kron(Wm, J_L / L)).
Times are per call, max over ranks of each rank's median; ratios from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from mpi_launch import median_call_time, run_workers

ROOT = Path(__file__).resolve().parent.parent
SIZES = [4 << 10, 64 << 10, 1 << 20, 16 << 20]
CONFIGS = [(4, 2), (6, 2), (6, 3)]


def human(nbytes: int) -> str:
    return f"{nbytes >> 20} MB" if nbytes >= 1 << 20 else f"{nbytes >> 10} KB"


def analysis(n: int, L: int) -> dict:
    import numpy as np

    from decomm.topology import ExponentialGraph

    machine = [r // L for r in range(n)]
    Wf = ExponentialGraph(n).matrix(0)
    M = max(machine) + 1
    Wm = ExponentialGraph(M).matrix(0)
    H = np.kron(Wm, np.full((L, L), 1.0 / L))
    J = np.full((n, n), 1.0 / n)
    flat_cross = sum(1 for i in range(n) for j in range(n)
                     if i != j and Wf[i, j] > 0 and machine[i] != machine[j])
    hier_cross = sum(1 for a in range(M) for b in range(M) if a != b and Wm[a, b] > 0)
    return {"flat_cross_msgs": flat_cross, "hier_cross_msgs": hier_cross,
            "flat_norm": float(np.linalg.norm(Wf - J, 2)),
            "hier_norm": float(np.linalg.norm(H - J, 2))}


def worker(out_path: str | None, reps: int) -> None:
    import torch
    from mpi4py import MPI

    import decomm
    from decomm import hierarchical as H
    from decomm.topology import ExponentialGraph

    torch.set_num_threads(1)
    decomm.init()
    comm = MPI.COMM_WORLD
    rank, n = comm.Get_rank(), comm.Get_size()
    decomm.set_topology(ExponentialGraph(n))
    H.init_machines()  # DECOMM_LOCAL_SIZE
    H.set_machine_topology(ExponentialGraph(H.machine_size()))

    def timed(fn, iters: int) -> float:
        return median_call_time(comm, fn, iters, reps)

    rows = []
    for nbytes in SIZES:
        numel = nbytes // 4
        iters = max(3, min(100, (16 << 20) // nbytes))
        x = torch.full((numel,), float(rank))

        def flat(x=x) -> None:
            decomm.neighbor_allreduce_(x, name="bench")

        def hier(x=x) -> None:
            H.hierarchical_neighbor_allreduce_(x, name="bench")

        flat()
        hier()
        tf, th = [], []
        for _ in range(2):  # interleave to spread the noise of a shared machine
            tf.append(timed(flat, iters))
            th.append(timed(hier, iters))
        row = {"bytes": nbytes, "flat_s": min(tf), "hier_s": min(th)}
        rows.append(row)
        if rank == 0:
            print(f"  np={n} L={H.machine_local_size()} {human(nbytes):>6}: "
                  f"flat {row['flat_s'] * 1e3:8.3f} ms  hier {row['hier_s'] * 1e3:8.3f} ms",
                  flush=True)
    if rank == 0 and out_path:
        Path(out_path).write_text(json.dumps({"np": n, "L": H.machine_local_size(), "rows": rows}))
    H.shutdown_machines()
    decomm.shutdown()


def driver(configs: list[tuple[int, int]], reps: int, out_md: Path) -> int:
    import tempfile

    sys.path.insert(0, str(ROOT))
    results = []
    for n, L in configs:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            path = f.name
        print(f"[bench] hierarchical vs flat on {n} ranks, {n // L} machines of {L}", flush=True)
        rc = run_workers(__file__, n, ["--json", path, "--reps", str(reps)],
                         DECOMM_LOCAL_SIZE=str(L))
        if rc != 0:
            print(f"[bench] mpirun -np {n} failed with exit code {rc}", flush=True)
            return rc
        res = json.loads(Path(path).read_text())
        res.update(analysis(n, L))
        results.append(res)
        os.unlink(path)
    from mpi4py import MPI

    lib = MPI.Get_library_version().split(",")[0].strip()
    lines = [
        "# hierarchical_neighbor_allreduce vs flat neighbor_allreduce",
        "",
        f"Machine: {os.cpu_count()} shared CPU cores, no GPU; {lib} from the PyPI wheel. All "
        "ranks run on ONE host: the fake machines (`DECOMM_LOCAL_SIZE=L`, L consecutive "
        "ranks each) talk over shared memory like everything else, so the timings show the "
        "software cost of the three phases, not the network saving. float32; flat = "
        "`neighbor_allreduce_` over `ExponentialGraph(n)`, hier = "
        "`hierarchical_neighbor_allreduce_` with machine topology `ExponentialGraph(n/L)`. "
        "Times: per call, max over ranks of the per-rank median, best of two interleaved "
        "measurements; ranks oversubscribed (n > cores).",
        "",
        "What a real cluster pays for is in the structure columns: **cross msgs** = messages "
        "per call that cross a machine boundary (flat: rank edges between machines; hier: "
        "machine edges, leaders only); **mixing** = `||M - J/n||_2` of the call's operator "
        "(0 = exact average in one call).",
        "",
        "| ranks | L | machines | size | flat (ms) | hier (ms) | hier/flat | flat cross msgs "
        "| hier cross msgs | flat mixing | hier mixing |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        for row in res["rows"]:
            lines.append(
                f"| {res['np']} | {res['L']} | {res['np'] // res['L']} | {human(row['bytes'])} | "
                f"{row['flat_s'] * 1e3:.3f} | {row['hier_s'] * 1e3:.3f} | "
                f"{row['hier_s'] / row['flat_s']:.2f} | {res['flat_cross_msgs']} | "
                f"{res['hier_cross_msgs']} | {res['flat_norm']:.3f} | {res['hier_norm']:.3f} |")
    lines += [
        "",
        "Reading it: on one host hier costs 1.3-5x flat, because it runs three dependent "
        "steps (a header-checked allreduce inside the machine, the leaders' gossip, a "
        "broadcast) where flat runs one, and every collective pays the latency of "
        "oversubscribed ranks. What it buys: 3-7x fewer messages across machines and an "
        "exact average within each machine (here, with 2-3 machines on an exponential "
        "machine graph, an exact global average per call). Per-phase times are in the "
        "timeline (`DECOMM_TIMELINE`: phases local_allreduce, machine_gossip, "
        "local_broadcast).",
    ]
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-(2 + sum(len(r["rows"]) for r in results)):]), flush=True)
    print(f"[bench] wrote {out_md}", flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help="run as one rank (under mpirun)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--configs", default=",".join(f"{n}x{L}" for n, L in CONFIGS),
                    help="comma-separated NPxL, e.g. 4x2,6x3")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "hierarchical.md"))
    args = ap.parse_args()
    if args.worker:
        worker(args.json, args.reps)
        return 0
    configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]
    return driver(configs, args.reps, Path(args.out))  # type: ignore[arg-type]


if __name__ == "__main__":
    sys.exit(main())
