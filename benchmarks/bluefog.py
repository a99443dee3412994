"""decomm side by side with BlueFog 0.3.0, interleaved in one process per rank.

Both libraries are imported into every rank of one mpirun job (they share the one
MPI library), so each timing block runs BlueFog's call and decomm's call back to back
on the same machine state, and every ratio below comes from the same run:

a) ``neighbor_allreduce`` latency, float32, on the same graph in both libraries
   (``--topology exp``: BlueFog's ``topology_util.ExponentialGraph(n)`` and
   ``decomm.topology.ExponentialGraph(n)``; ``ring``: the two ``RingGraph(n)``), at
   4 KiB, 64 KiB, 1 MiB and 16 MiB: ``bf.neighbor_allreduce`` (BlueFog has no in-place
   form), ``decomm.neighbor_allreduce`` (out of place) and ``decomm.neighbor_allreduce_``
   (in place, what decomm's optimizers use). Before timing, all three results are
   checked against ``W @ X`` computed in float64 from the gathered inputs, and
   BlueFog's loaded graph against decomm's matrix.
b) one decentralized SGD step of a 1.05M-parameter MLP (512-1024-512-10, batch 64,
   SGD lr 0.01 momentum 0.9), forward + backward + step: adapt-then-combine (BlueFog
   ``DistributedAdaptThenCombineOptimizer`` vs ``decomm.optim.DSGD``) and
   adapt-with-combine (``DistributedAdaptWithCombineOptimizer`` vs
   ``DSGD(combine_first=True)``), with plain local ``torch.optim.SGD`` (no
   communication) as the compute floor. Every model starts from the same weights and
   sees the same batches; after 3 steps the parameters of each pair are checked
   against an independent mpi4py + numpy implementation of the ATC / AWC update.

Timing: each variant runs a block of calls after a short warm-up; the per-call time of
a block is the slowest rank's mean; the blocks of all variants alternate (their order
rotates block by block), and a row reports the median over blocks. Ratios are
BlueFog time / decomm time (> 1: decomm is faster).

Build the peer first (outside this repository): ``bash benchmarks/bluefog_peer/build.sh``
makes ``/work/bfpeer/venv`` (BlueFog 0.3.0 patched for torch 2.13, plus this checkout on
its ``sys.path``). Then run the driver with that venv's python; it launches itself under
mpirun once per rank count and writes ``benchmarks/results/bluefog.md``::

    /work/bfpeer/venv/bin/python benchmarks/bluefog.py            # np 2 and 4
    /work/bfpeer/venv/bin/python benchmarks/bluefog.py --np 4
    /work/bfpeer/venv/bin/python benchmarks/bluefog.py --quick    # smoke test, -> /tmp

Options: ``--sizes 4K,64K,1M,16M``, ``--blocks`` (default 9), ``--steps`` (DSGD steps per
block, default 20), ``--topology exp|ring``, ``--cycle-time`` (ms), ``--bf-skip-negotiate``
(BlueFog's ``set_skip_negotiate_stage(True)``, its fast path for a fixed graph), ``--out``.

Started with a python that cannot import BlueFog, it re-runs itself with
``$BFPEER/venv/bin/python`` (default ``/work/bfpeer/venv``) when that exists, and
otherwise exits 0 printing why it skipped. BlueFog's background loop sleeps
``BLUEFOG_CYCLE_TIME`` ms between polls (default 0.5); the driver sets 0.05
(``--cycle-time``), which favours BlueFog's small-message latency.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# This file is called bluefog.py: with its folder on sys.path (python puts it first),
# `import bluefog` would find this script instead of the BlueFog package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
_spec = importlib.util.spec_from_file_location("mpi_launch", HERE / "mpi_launch.py")
assert _spec is not None and _spec.loader is not None
mpi_launch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mpi_launch)
BFPEER = Path(os.environ.get("BFPEER", "/work/bfpeer"))
SIZES = [4 << 10, 64 << 10, 1 << 20, 16 << 20]
QUICK_SIZES = [4 << 10, 64 << 10]
CHECK_STEPS = 3
LR, MOMENTUM, BATCH = 0.01, 0.9, 64
GOALS = {4 << 10: 5.0, 16 << 20: 1.5}  # BlueFog/decomm time ratio wanted on 4 ranks


def parse_sizes(text: str) -> list[int]:
    """``"4K,64K,1M,16M"`` -> bytes; each a positive multiple of 4 (float32)."""
    out = []
    for item in text.split(","):
        item = item.strip().upper()
        mult = {"K": 1 << 10, "M": 1 << 20}.get(item[-1:], 1)
        digits = item[:-1] if mult > 1 else item
        if not digits.isdigit() or int(digits) * mult % 4 or int(digits) == 0:
            raise argparse.ArgumentTypeError(f"bad size {item!r}: want e.g. 4K, 64K, 1M, 16M")
        out.append(int(digits) * mult)
    return out


def human(nbytes: int) -> str:
    return f"{nbytes >> 20} MiB" if nbytes >= 1 << 20 else f"{nbytes >> 10} KiB"


# ----------------------------------------------------------------------------- worker


def interleaved(comm: Any, variants: dict[str, Callable[[], Any]], iters: int, blocks: int,
                warmup: int) -> dict[str, list[float]]:
    """Per-call seconds of each variant for each block (slowest rank's mean), the blocks
    of the variants alternating, their order rotated every block."""
    from mpi4py import MPI

    names = list(variants)
    out: dict[str, list[float]] = {k: [] for k in names}
    for b in range(blocks):
        order = names[b % len(names):] + names[:b % len(names)]
        for name in order:
            fn = variants[name]
            for _ in range(warmup):
                fn()
            comm.Barrier()
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            dt = (time.perf_counter() - t0) / iters
            out[name].append(comm.allreduce(dt, op=MPI.MAX))
    return out


def median(xs: list[float]) -> float:
    import numpy as np

    return float(np.median(xs))


def make_graphs(kind: str, n: int) -> tuple[Any, Any]:
    from bluefog.common import topology_util

    from decomm import topology as dtopo

    if kind == "exp":
        return topology_util.ExponentialGraph(n), dtopo.ExponentialGraph(n)
    return topology_util.RingGraph(n), dtopo.RingGraph(n)


def check_neighbor_allreduce(comm: Any, bf: Any, decomm: Any, W: Any) -> dict[str, float]:
    """Max |result - (W @ X)_i| over ranks for the three variants, X gathered by mpi4py."""
    import numpy as np
    import torch
    from mpi4py import MPI

    rank = comm.Get_rank()
    numel = 3000
    x = torch.randn(numel, generator=torch.Generator().manual_seed(1000 + rank))
    X = np.stack(comm.allgather(x.numpy().astype(np.float64)))
    ref = (W @ X)[rank]
    got = {
        "bluefog": bf.neighbor_allreduce(x.clone(), name="check.bf"),
        "decomm": decomm.neighbor_allreduce(x.clone(), name="check.out"),
        "decomm_": decomm.neighbor_allreduce_(x.clone(), name="check.in"),
    }
    return {k: comm.allreduce(float(np.abs(v.double().numpy() - ref).max()), op=MPI.MAX)
            for k, v in got.items()}


class MLP:
    """The benchmark model: 512-1024-512-10 with ReLUs, 1,055,242 parameters."""

    @staticmethod
    def build() -> Any:
        import torch

        torch.manual_seed(0)  # the same initial weights on every rank and for every copy
        return torch.nn.Sequential(
            torch.nn.Linear(512, 1024), torch.nn.ReLU(),
            torch.nn.Linear(1024, 512), torch.nn.ReLU(),
            torch.nn.Linear(512, 10))


def flat_params(model: Any) -> Any:
    import torch

    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double().numpy()


def reference_steps(comm: Any, W: Any, batches: list, combine_first: bool) -> Any:
    """CHECK_STEPS steps of ATC (x <- W (x - u)) or AWC (x <- W x - u) written with
    plain torch SGD for u and mpi4py + numpy (float64 mixing) for W; returns x_i."""
    import numpy as np
    import torch

    rank = comm.Get_rank()
    model = MLP.build()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    params = list(model.parameters())
    for x, y in batches[:CHECK_STEPS]:
        before = flat_params(model)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        after = flat_params(model)
        if combine_first:  # W x - u, u = before - after
            new = W[rank] @ np.stack(comm.allgather(before)) - (before - after)
        else:
            new = W[rank] @ np.stack(comm.allgather(after))
        off = 0
        with torch.no_grad():
            for p in params:
                p.copy_(torch.from_numpy(new[off:off + p.numel()]).view_as(p))
                off += p.numel()
    return flat_params(model)


def worker(args: argparse.Namespace) -> None:
    import bluefog.torch as bf
    import networkx as nx
    import numpy as np
    import torch
    import torch.nn.functional as F
    from mpi4py import MPI

    import decomm
    from decomm.optim import DSGD

    torch.set_num_threads(1)
    bf.init()
    decomm.init()
    comm = MPI.COMM_WORLD.Dup()
    rank, n = comm.Get_rank(), comm.Get_size()
    say = (lambda msg: print(f"[bench np={n}] {msg}", flush=True)) if rank == 0 else \
        (lambda msg: None)
    bf_graph, dc_graph = make_graphs(args.topology, n)
    bf.set_topology(bf_graph)
    decomm.set_topology(dc_graph)
    if args.bf_skip_negotiate:
        bf.set_skip_negotiate_stage(True)
    W = dc_graph.matrix(0)
    # BlueFog's adjacency A[j, i] is the weight of edge j -> i, i.e. what i gives to x_j.
    graph_diff = float(np.abs(nx.to_numpy_array(bf.load_topology()).T - W).max())
    if graph_diff > 1e-12:
        raise SystemExit(f"the two {args.topology} graphs differ (max |A^T - W| = {graph_diff})")

    res: dict[str, Any] = {"np": n, "topology": args.topology, "graph_diff": graph_diff,
                           "bf_skip_negotiate": bool(args.bf_skip_negotiate)}
    res["check_nar"] = check_neighbor_allreduce(comm, bf, decomm, W)
    say("neighbor_allreduce vs W @ X (float64), max abs error: " +
        ", ".join(f"{k} {v:.1e}" for k, v in res["check_nar"].items()))
    if max(res["check_nar"].values()) > 1e-5:
        raise SystemExit(f"neighbor_allreduce results disagree: {res['check_nar']}")

    # a) neighbor_allreduce latency
    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    rows = []
    for nbytes in sizes:
        numel = nbytes // 4
        iters = 10 if args.quick else max(5, min(300, (64 << 20) // nbytes))
        x_bf = torch.full((numel,), float(rank))
        x_out = torch.full((numel,), float(rank))
        x_in = torch.full((numel,), float(rank))
        tag = f"nar.{nbytes}"
        variants = {
            "bluefog": lambda x=x_bf, t=tag: bf.neighbor_allreduce(x, name=t),
            "decomm": lambda x=x_out, t=tag: decomm.neighbor_allreduce(x, name=t + ".out"),
            "decomm_": lambda x=x_in, t=tag: decomm.neighbor_allreduce_(x, name=t + ".in"),
        }
        say(f"neighbor_allreduce {human(nbytes)}: {args.blocks} blocks x {iters} calls "
            "per variant")
        blocks = interleaved(comm, variants, iters, args.blocks, warmup=2 if args.quick else 5)
        row = {"bytes": nbytes, "iters": iters, "blocks": blocks,
               **{k: median(v) for k, v in blocks.items()}}
        rows.append(row)
        say(f"  {human(nbytes):>7}: bluefog {row['bluefog'] * 1e6:9.1f} us  decomm "
            f"{row['decomm'] * 1e6:9.1f} us  decomm_ {row['decomm_'] * 1e6:9.1f} us  "
            f"bluefog/decomm {row['bluefog'] / row['decomm']:.2f}  "
            f"bluefog/decomm_ {row['bluefog'] / row['decomm_']:.2f}")
    res["nar"] = rows

    # b) one DSGD step of the MLP
    gen = torch.Generator().manual_seed(2000 + rank)
    batches = [(torch.randn(BATCH, 512, generator=gen), torch.randint(0, 10, (BATCH,),
                                                                      generator=gen))
               for _ in range(8)]

    def sgd(m: Any) -> Any:
        return torch.optim.SGD(m.parameters(), lr=LR, momentum=MOMENTUM)

    models = {k: MLP.build() for k in ("local", "bf_atc", "dc_atc", "bf_awc", "dc_awc")}
    res["params"] = sum(p.numel() for p in models["local"].parameters())
    opts = {
        "local": sgd(models["local"]),
        "bf_atc": bf.DistributedAdaptThenCombineOptimizer(sgd(models["bf_atc"]),
                                                          model=models["bf_atc"]),
        "dc_atc": DSGD(sgd(models["dc_atc"])),
        "bf_awc": bf.DistributedAdaptWithCombineOptimizer(sgd(models["bf_awc"]),
                                                          model=models["bf_awc"]),
        "dc_awc": DSGD(sgd(models["dc_awc"]), combine_first=True),
    }
    counters = dict.fromkeys(opts, 0)

    def step(key: str) -> None:
        m, o = models[key], opts[key]
        x, y = batches[counters[key] % len(batches)]
        counters[key] += 1
        o.zero_grad()
        F.cross_entropy(m(x), y).backward()
        o.step()

    say(f"DSGD on a {res['params']:,}-parameter MLP: checking {CHECK_STEPS} steps against "
        "an mpi4py + numpy ATC/AWC")
    for _ in range(CHECK_STEPS):
        for key in opts:
            step(key)
    check = {}
    for form, keys in (("atc", ("bf_atc", "dc_atc")), ("awc", ("bf_awc", "dc_awc"))):
        ref = reference_steps(comm, W, batches, combine_first=form == "awc")
        for key in keys:
            err = float(np.abs(flat_params(models[key]) - ref).max())
            check[key] = comm.allreduce(err, op=MPI.MAX)
    res["check_dsgd"] = check
    say("parameters after 3 steps vs the reference, max abs error: " +
        ", ".join(f"{k} {v:.1e}" for k, v in check.items()))
    if max(check.values()) > 1e-5:
        raise SystemExit(f"DSGD parameters disagree with the reference: {check}")

    steps = args.steps or (3 if args.quick else 20)
    say(f"DSGD step: {args.blocks} blocks x {steps} steps per variant")
    blocks = interleaved(comm, {k: (lambda k=k: step(k)) for k in opts}, steps, args.blocks,
                         warmup=1 if args.quick else 3)
    res["dsgd"] = {"steps": steps, "blocks": blocks, **{k: median(v) for k, v in blocks.items()}}
    d = res["dsgd"]
    say(f"  local SGD {d['local'] * 1e3:.2f} ms | ATC bluefog {d['bf_atc'] * 1e3:.2f} ms, "
        f"decomm {d['dc_atc'] * 1e3:.2f} ms ({d['bf_atc'] / d['dc_atc']:.2f}x) | AWC bluefog "
        f"{d['bf_awc'] * 1e3:.2f} ms, decomm {d['dc_awc'] * 1e3:.2f} ms "
        f"({d['bf_awc'] / d['dc_awc']:.2f}x)")

    if rank == 0 and args.json:
        Path(args.json).write_text(json.dumps(res))
    comm.Barrier()
    bf.shutdown()
    decomm.shutdown()


# ----------------------------------------------------------------------------- driver


def versions() -> dict[str, str]:
    import torch
    from mpi4py import MPI

    import decomm

    return {"torch": torch.__version__, "decomm": decomm.__version__,
            "mpi": MPI.Get_library_version().split(",")[0].strip(),
            "python": platform.python_version()}


def write_markdown(results: list[dict], args: argparse.Namespace, load: tuple[float, float],
                   started: str) -> str:
    v = versions()
    ratio = "BlueFog / decomm"
    lines = [
        "# decomm vs BlueFog 0.3.0, side by side",
        "",
        f"Generated by `{' '.join(['benchmarks/bluefog.py', *sys.argv[1:]])}` on {started} "
        f"UTC: {os.cpu_count()} cores ({mpi_launch.cpu_model()}), no GPU; {v['mpi']} (PyPI wheel, "
        f"shared memory), torch {v['torch']}, Python {v['python']}, decomm {v['decomm']}, "
        "BlueFog 0.3.0 from the PyPI sdist with `benchmarks/bluefog_peer/bluefog-0.3.0.patch` "
        f"(CPU, no NCCL). `BLUEFOG_CYCLE_TIME={args.cycle_time}` ms; BlueFog negotiation "
        f"stage {'skipped' if args.bf_skip_negotiate else 'on (its default)'}. "
        f"Topology: {'exponential' if args.topology == 'exp' else 'ring'} graph, the same "
        "matrix in both libraries (checked). Load average (1 min): "
        f"{load[0]:.2f} at start, {load[1]:.2f} at end.",
        "",
        "Both libraries run in the same processes (one mpirun job per rank count); the "
        "timing blocks of the variants alternate, so every ratio comes from the same run. "
        "Per-call time of a block = slowest rank's mean; a cell is the median over "
        f"{args.blocks} blocks. Ratio = {ratio} time (> 1: decomm faster); in brackets the "
        "lowest and highest ratio of one block pair (the spread the noise made).",
        "",
        "## neighbor_allreduce (float32)",
        "",
        "| ranks | size | BlueFog `neighbor_allreduce` | decomm `neighbor_allreduce` | "
        f"decomm `neighbor_allreduce_` (in place) | {ratio} | {ratio} in place |",
        "|---|---|---|---|---|---|---|",
    ]

    def t(s: float) -> str:
        return f"{s * 1e3:.3f} ms" if s >= 1e-3 else f"{s * 1e6:.1f} us"

    def r(row: dict, a: str, b: str) -> str:
        """Ratio of the medians [min-max of the per-block ratios]."""
        per = [x / y for x, y in zip(row["blocks"][a], row["blocks"][b])]
        return f"{row[a] / row[b]:.2f} [{min(per):.2f}-{max(per):.2f}]"

    for res in results:
        for row in res["nar"]:
            lines.append(f"| {res['np']} | {human(row['bytes'])} | {t(row['bluefog'])} | "
                         f"{t(row['decomm'])} | {t(row['decomm_'])} | "
                         f"{r(row, 'bluefog', 'decomm')} | {r(row, 'bluefog', 'decomm_')} |")
    params = results[0]["params"] if results else 0
    lines += [
        "",
        f"## One DSGD step ({params:,}-parameter MLP, batch {BATCH}, SGD lr {LR} momentum "
        f"{MOMENTUM}; forward + backward + step)",
        "",
        "| ranks | local SGD (no communication) | ATC: BlueFog "
        "`DistributedAdaptThenCombineOptimizer` | ATC: decomm `DSGD` | ATC ratio | "
        "AWC: BlueFog `DistributedAdaptWithCombineOptimizer` | AWC: decomm "
        "`DSGD(combine_first=True)` | AWC ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        d = res["dsgd"]
        lines.append(f"| {res['np']} | {t(d['local'])} | {t(d['bf_atc'])} | {t(d['dc_atc'])} | "
                     f"{r(d, 'bf_atc', 'dc_atc')} | {t(d['bf_awc'])} | {t(d['dc_awc'])} | "
                     f"{r(d, 'bf_awc', 'dc_awc')} |")
    lines += ["", "## Checks (before timing)", ""]
    for res in results:
        c, cd = res["check_nar"], res["check_dsgd"]
        lines.append(
            f"- np={res['np']}: max |result - W @ X| (float64 reference) for BlueFog "
            f"{c['bluefog']:.1e}, decomm {c['decomm']:.1e}, decomm in place {c['decomm_']:.1e}; "
            f"parameters after {CHECK_STEPS} steps vs an mpi4py + numpy reference: BlueFog ATC "
            f"{cd['bf_atc']:.1e}, decomm ATC {cd['dc_atc']:.1e}, BlueFog AWC "
            f"{cd['bf_awc']:.1e}, decomm AWC {cd['dc_awc']:.1e}.")
    four = [r for r in results if r["np"] == 4]
    if four:
        r4 = four[0]
        lines += ["", "## Goals (4 ranks)", ""]
        for row in r4["nar"]:
            want = GOALS.get(row["bytes"])
            if want is None:
                continue
            got = row["bluefog"] / min(row["decomm"], row["decomm_"])
            lines.append(f"- {human(row['bytes'])}: BlueFog / decomm (faster decomm form) "
                         f"{got:.2f}x, goal >= {want}x: {'met' if got >= want else 'NOT met'}")
        d = r4["dsgd"]
        for form in ("atc", "awc"):
            got = d[f"bf_{form}"] / d[f"dc_{form}"]
            lines.append(f"- DSGD step ({form.upper()}): BlueFog / decomm {got:.2f}x, goal > 1: "
                         f"{'met' if got > 1 else 'NOT met'}")
    return "\n".join(lines) + "\n"


def bluefog_importable() -> str | None:
    """None when ``bluefog.torch`` imports in this python, else the reason."""
    try:
        import bluefog.torch  # noqa: F401
    except Exception as e:  # ImportError, or its extension failing to load
        return f"{type(e).__name__}: {e}"
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help="run as one rank (under mpirun)")
    ap.add_argument("--json", default=None, help="(worker) where rank 0 writes its results")
    ap.add_argument("--np", default="2,4", help="rank counts, one mpirun job each")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 4 and 64 KiB, few calls and steps; writes to /tmp")
    ap.add_argument("--blocks", type=int, default=None,
                    help="timing blocks per variant (default 9, 3 with --quick)")
    ap.add_argument("--sizes", type=parse_sizes, default=None,
                    help="neighbor_allreduce sizes, e.g. 4K,64K,1M,16M (the default; "
                         "4K,64K with --quick)")
    ap.add_argument("--steps", type=int, default=None,
                    help="DSGD steps per timing block (default 20, 3 with --quick)")
    ap.add_argument("--topology", choices=("exp", "ring"), default="exp")
    ap.add_argument("--cycle-time", default="0.05",
                    help="BLUEFOG_CYCLE_TIME in ms for the ranks (BlueFog's default is 0.5)")
    ap.add_argument("--bf-skip-negotiate", action="store_true",
                    help="run BlueFog with bf.set_skip_negotiate_stage(True)")
    ap.add_argument("--out", default=None, help="markdown file (default "
                    "benchmarks/results/bluefog.md, /tmp/bluefog_quick.md with --quick)")
    args = ap.parse_args()
    if args.blocks is None:
        args.blocks = 3 if args.quick else 9
    if args.worker:
        worker(args)
        return 0

    why = bluefog_importable()
    if why is not None:
        peer = BFPEER / "venv" / "bin" / "python"
        # compare the venvs, not the interpreters (a venv's python links to the base one)
        if peer.exists() and Path(sys.prefix).resolve() != (BFPEER / "venv").resolve() \
                and not os.environ.get("DECOMM_BENCH_REEXEC"):
            print(f"[bench] BlueFog is not importable here; re-running with {peer}", flush=True)
            env = dict(os.environ, DECOMM_BENCH_REEXEC="1")
            return subprocess.run([str(peer), __file__, *sys.argv[1:]], env=env).returncode
        print(f"[bench] SKIP: BlueFog is not importable with {sys.executable} ({why}). "
              "Build the peer with `bash benchmarks/bluefog_peer/build.sh` and run this "
              f"script with {peer}.", flush=True)
        return 0

    out = Path(args.out) if args.out else (
        Path("/tmp/bluefog_quick.md") if args.quick else
        ROOT / "benchmarks" / "results" / "bluefog.md")
    nps = [int(x) for x in args.np.split(",")]
    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    load0 = os.getloadavg()[0]
    print(f"[bench] decomm vs BlueFog on {', '.join(map(str, nps))} ranks, topology "
          f"{args.topology}, BLUEFOG_CYCLE_TIME={args.cycle_time}, load average {load0:.2f}",
          flush=True)
    results = []
    wargs = ["--blocks", str(args.blocks), "--topology", args.topology]
    wargs += ["--quick"] if args.quick else []
    wargs += ["--steps", str(args.steps)] if args.steps else []
    wargs += ["--sizes", ",".join(str(b) for b in args.sizes)] if args.sizes else []
    wargs += ["--bf-skip-negotiate"] if args.bf_skip_negotiate else []
    for n in nps:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            path = f.name
        print(f"[bench] mpirun -np {n} ...", flush=True)
        t0 = time.time()
        rc = mpi_launch.run_workers(__file__, n, ["--json", path, *wargs],
                         BLUEFOG_CYCLE_TIME=str(args.cycle_time))
        if rc != 0:
            print(f"[bench] mpirun -np {n} failed with exit code {rc}", flush=True)
            return rc
        results.append(json.loads(Path(path).read_text()))
        os.unlink(path)
        print(f"[bench] np={n} done in {time.time() - t0:.0f} s", flush=True)
    load1 = os.getloadavg()[0]
    text = write_markdown(results, args, (load0, load1), started)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text, flush=True)
    print(f"[bench] wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
