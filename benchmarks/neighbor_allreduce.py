"""neighbor_allreduce vs the raw mpi4py floor vs torch.distributed (gloo) allreduce.

Run ``python benchmarks/neighbor_allreduce.py`` (it launches itself under mpirun for
each rank count) or ``decomm-run -np 4 python benchmarks/neighbor_allreduce.py --worker``.

For each message size (float32, ring topology) it measures the median time per call of
- decomm: ``decomm.neighbor_allreduce_`` (in place, the optimizers' path) and
  ``decomm.neighbor_allreduce`` (out of place: a new output tensor per call);
- floor: mpi4py Irecv/Isend to both ring neighbours + Waitall + a numpy weighted sum
  into a preallocated output (the least a Python user could write by hand);
- gloo: ``torch.distributed.all_reduce`` of the same buffer (what a global average costs).
Times are per call, the maximum over ranks of each rank's median; ratios are computed
from timings of the same run (the machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from mpi_launch import median_call_time, run_workers

ROOT = Path(__file__).resolve().parent.parent
SIZES = [4 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20]


def human(nbytes: int) -> str:
    return f"{nbytes >> 20} MB" if nbytes >= 1 << 20 else f"{nbytes >> 10} KB"


def worker(out_path: str | None, reps: int) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist
    from mpi4py import MPI

    import decomm
    from decomm.topology import RingGraph

    torch.set_num_threads(1)
    decomm.init()
    comm = MPI.COMM_WORLD.Dup()
    rank, n = comm.Get_rank(), comm.Get_size()
    topo = RingGraph(n)
    decomm.set_topology(topo)
    self_w, in_w = topo.weights(rank, 0)
    srcs = sorted(in_w)
    dsts = topo.out_neighbors(rank, 0)
    port = 29500 + (os.getpid() % 1000) if rank == 0 else 0
    port = comm.bcast(port, root=0)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=n)

    def timed(fn, iters: int) -> float:
        return median_call_time(comm, fn, iters, reps)

    rows = []
    for nbytes in SIZES:
        numel = nbytes // 4
        iters = max(3, min(200, (32 << 20) // nbytes))
        x_t = torch.full((numel,), float(rank))
        x_np = np.full(numel, float(rank), dtype=np.float32)
        recv = [np.empty(numel, dtype=np.float32) for _ in srcs]
        out = np.empty(numel, dtype=np.float32)
        tmp = np.empty(numel, dtype=np.float32)

        def floor(recv=recv, x_np=x_np, out=out, tmp=tmp) -> None:
            reqs = [comm.Irecv(buf, source=s, tag=7) for buf, s in zip(recv, srcs)]
            reqs += [comm.Isend(x_np, dest=d, tag=7) for d in dsts]
            MPI.Request.Waitall(reqs)
            np.multiply(x_np, self_w, out=out)
            for buf, s in zip(recv, srcs):
                np.multiply(buf, in_w[s], out=tmp)
                np.add(out, tmp, out=out)

        def ours(x_t=x_t) -> None:
            decomm.neighbor_allreduce_(x_t, name="bench")

        def ours_out(x_t=x_t) -> None:
            decomm.neighbor_allreduce(x_t, name="bench")

        def gloo(x_t=x_t) -> None:
            dist.all_reduce(x_t)

        for fn in (floor, ours, ours_out, gloo):  # warm-up: connections, pools, page faults
            fn()
        t_floor = timed(floor, iters)
        t_ours = timed(ours, iters)
        t_out = timed(ours_out, iters)
        t_gloo = timed(gloo, iters)
        row = {"bytes": nbytes, "decomm_s": t_ours, "decomm_out_s": t_out, "floor_s": t_floor,
               "gloo_s": t_gloo}
        rows.append(row)
        if rank == 0:
            print(f"  np={n} {human(nbytes):>6}: decomm {t_ours * 1e3:8.3f} ms  floor "
                  f"{t_floor * 1e3:8.3f} ms  gloo allreduce {t_gloo * 1e3:8.3f} ms  "
                  f"(decomm/floor time {t_ours / t_floor:.2f} in place, "
                  f"{t_out / t_floor:.2f} out of place)", flush=True)
    if rank == 0 and out_path:
        Path(out_path).write_text(json.dumps({"np": n, "rows": rows}))
    dist.destroy_process_group()
    decomm.shutdown()


def driver(nps: list[int], reps: int, out_md: Path) -> int:
    import tempfile

    results = []
    for n in nps:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            path = f.name
        print(f"[bench] neighbor_allreduce on {n} ranks (ring), sizes "
              f"{', '.join(human(s) for s in SIZES)}", flush=True)
        rc = run_workers(__file__, n, ["--json", path, "--reps", str(reps)])
        if rc != 0:
            print(f"[bench] mpirun -np {n} failed with exit code {rc}", flush=True)
            return rc
        results.append(json.loads(Path(path).read_text()))
        os.unlink(path)
    lines = [
        "# neighbor_allreduce benchmark",
        "",
        f"Machine: {os.cpu_count()} shared CPU cores, no GPU; Open MPI {mpi_version()} from the "
        "PyPI wheel, shared-memory transport; float32, ring topology, ranks oversubscribed "
        "when np > cores. Times: median per call over repetitions, max over ranks.",
        "",
        "- **floor**: mpi4py Irecv/Isend to the ring neighbours + numpy weighted sum "
        "(preallocated output).",
        "- **decomm**: `neighbor_allreduce_` (in place); **out of place**: `neighbor_allreduce` "
        "(a new output tensor per call).",
        "- **throughput ratio** = floor time / decomm time (>= 0.95 is the target at >= 1 MB);",
        "  **latency ratio** = decomm time / floor time (<= 1.2 out of place and <= 1.0 in "
        "place are the targets at 4 KB and 64 KB).",
        "- **gloo**: `torch.distributed.all_reduce` of the same buffer, for scale.",
        "",
        "| ranks | size | decomm (ms) | out of place (ms) | floor (ms) | gloo allreduce (ms) "
        "| floor/decomm | decomm/floor | out of place/floor | decomm GB/s per rank |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        for row in res["rows"]:
            gbps = row["bytes"] / row["decomm_s"] / 1e9
            lines.append(
                f"| {res['np']} | {human(row['bytes'])} | {row['decomm_s'] * 1e3:.3f} | "
                f"{row['decomm_out_s'] * 1e3:.3f} | "
                f"{row['floor_s'] * 1e3:.3f} | {row['gloo_s'] * 1e3:.3f} | "
                f"{row['floor_s'] / row['decomm_s']:.2f} | "
                f"{row['decomm_s'] / row['floor_s']:.2f} | "
                f"{row['decomm_out_s'] / row['floor_s']:.2f} | {gbps:.2f} |")
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-(2 + sum(len(r["rows"]) for r in results)):]), flush=True)
    print(f"[bench] wrote {out_md}", flush=True)
    return 0


def mpi_version() -> str:
    from mpi4py import MPI

    return ".".join(map(str, MPI.Get_version())) + " / " + \
        MPI.Get_library_version().split(",")[0].strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help="run as one rank (under mpirun)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--np", default="2,4")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                         "neighbor_allreduce.md"))
    args = ap.parse_args()
    if args.worker:
        worker(args.json, args.reps)
        return 0
    load_start = os.getloadavg()[0]
    rc = driver([int(x) for x in args.np.split(",")], args.reps, Path(args.out))
    load_end = os.getloadavg()[0]
    if rc == 0:
        with open(args.out, "a") as f:
            f.write(f"\nLoad average (1 min): {load_start:.2f} at start, {load_end:.2f} at end. "
                    "Timings at >= 1 MB varied up to 2x between runs of one build on this VM.\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
