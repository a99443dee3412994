"""neighbor_allreduce of CUDA tensors: the NCCL path and the staged MPI path.

    python benchmarks/gpu_comm.py [--sizes-mb 0.004,1,16,64] [--staged-np 2,3,4]
        [--out-md PATH] [--out-json PATH]

launches itself under ``mpirun`` (the one on PATH, else next to this Python) once per
configuration:

* **NCCL, 1 rank**: a self-loop (``ncclSend``/``ncclRecv`` to itself in one group, then
  the fused kernel: ``out = 0.5 x + 0.5 x``) through the backend object, since one rank
  has no neighbours in any topology. With at least 2 GPUs, also **NCCL, N ranks**
  (N = min(#GPUs, 4), one GPU each) on a ring through the public ``decomm.neighbor_allreduce_``.
* **staged MPI, N ranks on one GPU** for each N of ``--staged-np``: more ranks than GPUs,
  so ``decomm.init()`` itself picks the staged path (``cuda_ops.status()["mode"] == "mpi"``,
  checked): device to pinned host, the CPU backend's exchange and fused sum, host to
  device. Ring topology.

Exactness, per size and rank, before timing: the CUDA result must be bitwise equal to
the CPU path's on the same input (the staged path runs the CPU kernel), and its error
against the closed form ``sum_j W[i, j] x_j`` (float64) is reported. With the uniform
weights of the ring (1/2 or 1/3) the CPU kernel sums in float64 and scales once, so the
result is also the float64 mean rounded to float32: that is checked bitwise too.

Timing: ``--iters`` calls of the in-place op between barriers, each followed by
``torch.cuda.synchronize()`` (a call is done when its result is on the GPU), median
of ``--reps`` repetitions, maximum over ranks. Throughput = tensor bytes / time (the
algorithmic bandwidth of one rank's input). Needs a CUDA device and decomm built with
its CUDA extension (for the NCCL rows); without a GPU it exits with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _mpirun() -> str:
    local = Path(sys.executable).parent / "mpirun"
    found = str(local) if local.exists() else shutil.which("mpirun")
    if found is None:
        sys.exit("gpu_comm: no mpirun on PATH or next to this Python")
    return found


# ------------------------------------------------------------------------ worker
def _worker(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from mpi4py import MPI

    import decomm
    from decomm import cuda_ops, runtime
    from decomm.topology import RingGraph

    decomm.init(backend=args.backend)
    comm = MPI.COMM_WORLD
    rank, n = decomm.rank(), decomm.size()
    st = cuda_ops.status()
    if args.expect_mode and st["mode"] != args.expect_mode:
        raise SystemExit(f"rank {rank}: expected the {args.expect_mode} path, got {st}")
    dev = torch.device("cuda", st["device"] if st["device"] is not None
                       else decomm.local_rank() % torch.cuda.device_count())
    torch.cuda.set_device(dev)
    topo = RingGraph(n)
    decomm.set_topology(topo)
    W = np.asarray(topo.matrix(0), dtype=np.float64)
    state = runtime._require()
    rows = []
    for mb in [float(s) for s in args.sizes_mb.split(",")]:
        numel = max(1, int(mb * (1 << 20)) // 4)
        # rank j holds j + (i mod 13)/16: exact in float32, sums exact in float64
        base = (np.arange(numel, dtype=np.float64) % 13) / 16.0
        xs = [(j + base).astype(np.float32) for j in range(n)]
        x = torch.from_numpy(xs[rank]).to(dev)
        if args.self_loop:
            be = cuda_ops.backend_for(state, x, "neighbor_allreduce")
            out = torch.empty_like(x)

            def call(x=x, out=out, be=be):
                be.neighbor_allreduce(x, out, 0.5, [0], [0.5], [0], [1.0], "bench_self", 0, 0,
                                      False)

            call()
            torch.cuda.synchronize()
            got = out.cpu()
            want64 = xs[0].astype(np.float64)  # 0.5 x + 0.5 x
            cpu_equal = bool(torch.equal(got, torch.from_numpy(xs[0])))
            work = x
        else:
            got = decomm.neighbor_allreduce(x, name="bench_check").cpu()
            cpu = decomm.neighbor_allreduce(torch.from_numpy(xs[rank]), name="bench_check_cpu")
            cpu_equal = bool(torch.equal(got, cpu))
            stack = np.stack([v.astype(np.float64) for v in xs])
            want64 = W[rank] @ stack
            work = x.clone()

            def call(work=work):
                decomm.neighbor_allreduce_(work, name="bench")

        err = float(np.abs(got.double().numpy() - want64).max())
        nz = W[rank] != 0
        uniform = bool(np.allclose(W[rank][nz], 1.0 / nz.sum(), rtol=0, atol=1e-12))
        if args.self_loop:
            mean_exact = cpu_equal
        elif uniform:
            mean32 = (np.stack([xs[j].astype(np.float64) for j in np.flatnonzero(nz)]).sum(0)
                      * (1.0 / nz.sum())).astype(np.float32)
            mean_exact = bool(np.array_equal(got.numpy(), mean32))
        else:
            mean_exact = None
        iters = max(3, min(args.iters, (256 << 20) // (numel * 4)))
        for _ in range(2):
            call()
        torch.cuda.synchronize()
        samples = []
        for _ in range(args.reps):
            comm.Barrier()
            t0 = time.perf_counter()
            for _ in range(iters):
                call()
                torch.cuda.synchronize()
            samples.append((time.perf_counter() - t0) / iters)
        t = comm.allreduce(float(np.median(samples)), op=MPI.MAX)
        ok = comm.allreduce(int(cpu_equal and mean_exact is not False), op=MPI.MIN)
        max_err = comm.allreduce(err, op=MPI.MAX)
        rows.append({"path": args.label, "ranks": n, "mb": numel * 4 / (1 << 20),
                     "us": t * 1e6, "gbps": numel * 4 / t / 1e9, "exact": bool(ok),
                     "max_err": max_err, "uniform": uniform, "mode": st["mode"],
                     "reason": st["reason"]})
        del work
    if rank == 0:
        with open(args.json_out, "w") as f:
            json.dump(rows, f)
    decomm.shutdown()
    bad = [r for r in rows if not r["exact"]]
    return 1 if bad else 0


# ------------------------------------------------------------------------ driver
def _launch(np_: int, label: str, extra: list[str], sizes: str, iters: int, reps: int,
            timeout: float) -> list[dict]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [_mpirun(), "-np", str(np_), "--oversubscribe", "--bind-to", "none", sys.executable,
           __file__, "--worker", "--label", label, "--json-out", out, "--sizes-mb", sizes,
           "--iters", str(iters), "--reps", str(reps), *extra]
    print(f"gpu_comm: {label} on {np_} rank(s)", flush=True)
    try:
        rc = subprocess.run(cmd, env=env, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        print(f"gpu_comm: {label} on {np_} rank(s) timed out after {timeout:.0f} s", flush=True)
        return [{"path": label, "ranks": np_, "failed": f"timed out after {timeout:.0f} s"}]
    try:
        rows = json.loads(Path(out).read_text() or "[]")
    except (OSError, ValueError):
        rows = []
    finally:
        Path(out).unlink(missing_ok=True)
    if rc != 0 and not rows:
        rows = [{"path": label, "ranks": np_, "failed": f"mpirun exited with {rc}"}]
    return rows


def _table(rows: list[dict]) -> str:
    head = (f"{'path':<28} {'ranks':>5} {'MB':>9} {'us/call':>10} {'GB/s':>7} "
            f"{'exact':>6} {'max err':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "failed" in r:
            lines.append(f"{r['path']:<28} {r['ranks']:>5}  FAILED: {r['failed']}")
            continue
        lines.append(f"{r['path']:<28} {r['ranks']:>5} {r['mb']:>9.3f} {r['us']:>10.1f} "
                     f"{r['gbps']:>7.2f} {'yes' if r['exact'] else 'NO':>6} "
                     f"{r['max_err']:>9.2e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes-mb", default="0.004,1,16,64",
                    help="float32 tensor sizes in MB (1 MB = 2^20 bytes)")
    ap.add_argument("--staged-np", default="2,3,4", help="rank counts for the staged path")
    ap.add_argument("--iters", type=int, default=50, help="calls per repetition (at most)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=120, help="seconds per mpirun")
    ap.add_argument("--out-md", default=None, help="write the markdown section here")
    ap.add_argument("--out-json", default=None, help="write the rows here")
    # worker-only
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--label", default="", help=argparse.SUPPRESS)
    ap.add_argument("--json-out", default="", help=argparse.SUPPRESS)
    ap.add_argument("--backend", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--expect-mode", default="", help=argparse.SUPPRESS)
    ap.add_argument("--self-loop", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return _worker(args)

    import torch

    if torch.version.cuda is None or not torch.cuda.is_available():
        why = ("torch has no CUDA support" if torch.version.cuda is None
               else "no CUDA device is visible")
        sys.exit(f"gpu_comm: {why}; this benchmark needs a GPU (nothing was measured)")
    import decomm

    gpus = torch.cuda.device_count()
    name = torch.cuda.get_device_name(0)
    common = (args.sizes_mb, args.iters, args.reps, args.timeout)
    rows: list[dict] = []
    notes: list[str] = []
    if decomm.nccl_available():
        rows += _launch(1, "nccl self-loop", ["--backend", "nccl", "--expect-mode", "nccl",
                                              "--self-loop"], *common)
        if gpus >= 2:
            k = min(gpus, 4)
            rows += _launch(k, f"nccl ring ({k} GPUs)", ["--backend", "nccl", "--expect-mode",
                                                         "nccl"], *common)
        else:
            notes.append("NCCL at 2+ ranks needs 2+ GPUs (NCCL refuses two ranks on one "
                         f"GPU); this machine has {gpus}, so NCCL was measured at 1 rank "
                         "(self-loop) only.")
    else:
        notes.append("decomm was built without NCCL here: no NCCL rows.")
    for np_ in [int(v) for v in args.staged_np.split(",") if v]:
        expect = ["--expect-mode", "mpi"] if np_ > gpus else []
        label = f"staged mpi ({np_} on {min(np_, gpus)} GPU)"
        rows += _launch(np_, label, ["--backend", "auto", *expect], *common)
    reasons = sorted({r["reason"] for r in rows if r.get("mode") == "mpi" and r.get("reason")})
    table = _table(rows)
    print(table)
    exact = all(r.get("exact") for r in rows)
    summary = ("Exactness: every row bitwise equal to the CPU path on the same input"
               + (" (and, for the uniform ring weights, to the float64 mean rounded once)"
                  if exact else "") + (": **yes**." if exact else ": **NO** (see rows)."))
    md = [
        "## neighbor_allreduce of CUDA tensors: NCCL and the staged MPI path",
        "",
        f"Generated by `python benchmarks/gpu_comm.py --sizes-mb {args.sizes_mb} "
        f"--staged-np {args.staged_np}` on {name} ({gpus} GPU(s) visible). float32, ring "
        "topology (1 rank: NCCL self-loop through the backend object); time per in-place "
        "call until its result is on the GPU, median of repetitions, max over ranks; GB/s = "
        "one rank's tensor bytes / time.",
        "",
        summary,
        "",
        *[f"- {n}" for n in notes],
        *[f"- why the staged path: {r}" for r in reasons],
        "",
        "```",
        table,
        "```",
        "",
    ]
    if args.out_md:
        Path(args.out_md).write_text("\n".join(md))
        print(f"wrote {args.out_md}")
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(rows, indent=1))
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
