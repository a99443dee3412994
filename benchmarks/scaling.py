#!/usr/bin/env python
"""How the cost of decentralized averaging grows with the number of nodes.

Two parts, both written to ``benchmarks/results/scaling.md`` (+ PNG):

* **simulated** (one process, ``Topology.mix``): rounds of gossip until the nodes
  agree — exactly (finite-time convergent graphs) or to a relative consensus error
  of 1e-6 — for n up to 10^4: Base-(k+1) (k = 1, 2) vs one-peer exponential vs
  exponential vs ring, and the messages each node sends on the way.
* **measured** (real MPI, ``mpirun -np n`` for n = 2..25 on this machine): time per
  step and bytes sent per rank of ``neighbor_allreduce`` over Base-(k+1) (k = 1, 2)
  and the exponential graph vs ``allreduce``, for one buffer size.

    python benchmarks/scaling.py                   # both parts (~5 min on 2 cores)
    python benchmarks/scaling.py --part simulated  # no MPI needed
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from decomm.topology import (  # noqa: E402
    BaseGraph,
    ExponentialGraph,
    OnePeerExponentialGraph,
    RingGraph,
    Topology,
)

RESULTS = ROOT / "benchmarks" / "results"
TARGET = 1e-6
EXACT = 1e-12

#: label -> constructor(n)
SIM_TOPOLOGIES: dict[str, Any] = {
    "Base-2 (k=1)": lambda n: BaseGraph(n, 1),
    "Base-3 (k=2)": lambda n: BaseGraph(n, 2),
    "one-peer exp": OnePeerExponentialGraph,
    "exp": ExponentialGraph,
    "ring": RingGraph,
}
SIM_N = (4, 8, 16, 25, 32, 64, 100, 128, 256, 500, 1000, 1024, 2000, 4096, 5000, 10000)


# ----------------------------------------------------------------------------- simulated


def _out_degree_max(topo: Topology, t: int) -> int:
    sr = topo.sparse(t)
    rows = np.repeat(np.arange(sr.n), np.diff(sr.indptr))
    off = sr.indices != rows
    counts = np.bincount(sr.indices[off], minlength=sr.n)
    return int(counts.max()) if counts.size else 0


def _circulant_rounds(topo: Topology, target: float) -> int:
    """Worst-case rounds of a static circulant W (ring, exp): max |lambda_j|^t <= target, j != 0."""
    self_w, nb = topo.weights(0, 0)
    row = np.zeros(topo.n)
    row[0] = self_w
    for j, wj in nb.items():
        row[j] = wj
    lam = np.abs(np.fft.fft(row))  # eigenvalues of a circulant matrix (first row's DFT)
    rho = float(np.max(lam[1:])) if lam.size > 1 else 0.0
    if rho <= 0.0:
        return 1
    return math.ceil(math.log(target) / math.log(rho))


def rounds_to_consensus(topo: Topology, cap: int, seed: int = 0) -> dict[str, Any]:
    """Gossip from random x_0 (8 Gaussian vectors) until the relative error <= TARGET.

    Returns rounds, whether the consensus was exact (error <= 1e-12, i.e. finite-time
    convergence), the largest error seen at the end, and the messages the busiest node
    sent. For a static circulant graph whose simulation would exceed ``cap`` rounds the
    worst-case rounds come from its eigenvalues instead (``estimated``).
    """
    n = topo.n
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 8))
    x -= x.mean(axis=0)
    x0 = np.linalg.norm(x, axis=0)
    msgs = 0
    t = 0
    err = 1.0
    while t < cap:
        msgs += _out_degree_max(topo, t)
        x = topo.mix(x, t)
        t += 1
        x -= x.mean(axis=0)  # the average is preserved (doubly stochastic); remove drift
        err = float(np.max(np.linalg.norm(x, axis=0) / x0))
        if err <= TARGET:
            break
    exact = err <= EXACT
    if err <= TARGET:
        return {"rounds": t, "exact": exact, "err": err, "msgs": msgs, "estimated": False}
    if topo.rounds == 1:  # static: extrapolate from the spectrum
        r = _circulant_rounds(topo, TARGET)
        return {"rounds": r, "exact": False, "err": TARGET, "msgs": r * _out_degree_max(topo, 0),
                "estimated": True}
    return {"rounds": None, "exact": False, "err": err, "msgs": msgs, "estimated": False}


def simulated(ns: list[int], cap: int) -> dict[str, dict[int, dict[str, Any]]]:
    """Rounds/messages to consensus for every topology and n (prints progress)."""
    out: dict[str, dict[int, dict[str, Any]]] = {lab: {} for lab in SIM_TOPOLOGIES}
    for n in ns:
        t0 = time.perf_counter()
        cells = []
        for label, make in SIM_TOPOLOGIES.items():
            topo = make(n)
            # the ring needs ~n^2 rounds: simulate small n only, extrapolate the rest
            res = rounds_to_consensus(topo, cap if label != "ring" or n <= 128 else 1)
            res["degree"] = topo.max_degree()
            out[label][n] = res
            cells.append(f"{label} {_cell(res)}")
        print(f"[scaling] n={n:>5}: " + ", ".join(cells)
              + f"  ({time.perf_counter() - t0:.1f}s)", flush=True)
    return out


def _cell(res: dict[str, Any]) -> str:
    if res["rounds"] is None:
        return f">cap (err {res['err']:.0e})"
    s = f"{res['rounds']}"
    if res["exact"]:
        s += " (exact)"
    elif res["estimated"]:
        s = "≈" + s
    return s


# ----------------------------------------------------------------------------- measured


def worker(path: str, nbytes: int, reps: int) -> None:
    """Under mpirun: time neighbor_allreduce_ per topology and allreduce_; rank 0 writes JSON."""
    import torch

    import decomm

    torch.set_num_threads(1)
    decomm.init()
    n, rank = decomm.size(), decomm.rank()
    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    cases: list[tuple[str, Any]] = [
        ("Base-2 (k=1)", BaseGraph(n, 1)),
        ("Base-3 (k=2)", BaseGraph(n, 2)),
        ("exp", ExponentialGraph(n)),
        ("allreduce", None),
    ]
    results = {}
    for label, topo in cases:
        if topo is not None:
            decomm.set_topology(topo)
        for _ in range(2):  # warm-up
            if topo is None:
                decomm.allreduce_(buf, name="scaling")
            else:
                decomm.neighbor_allreduce_(buf, name="scaling")
                decomm.advance_round()
        decomm.barrier()
        sent0 = decomm.stats()["bytes_sent"]
        t0 = time.perf_counter()
        for _ in range(reps):
            if topo is None:
                decomm.allreduce_(buf, name="scaling")
            else:
                decomm.neighbor_allreduce_(buf, name="scaling")
                decomm.advance_round()
        elapsed = (time.perf_counter() - t0) / reps
        sent = (decomm.stats()["bytes_sent"] - sent0) / reps
        gathered = decomm.allgather(torch.tensor([[elapsed, sent]], dtype=torch.float64))
        if rank == 0:
            results[label] = {
                "time_s": float(gathered[:, 0].max()),  # a step ends when the slowest rank does
                "bytes_mean": float(gathered[:, 1].mean()),
                "bytes_max": float(gathered[:, 1].max()),
                "degree": topo.max_degree() if topo is not None else n - 1,
            }
    if rank == 0:
        Path(path).write_text(json.dumps({"n": n, "nbytes": nbytes, "reps": reps,
                                          "results": results}))
    decomm.shutdown()


def measured(ns: list[int], nbytes: int, reps: int, timeout: int) -> dict[int, dict[str, Any]]:
    """Launch one ``mpirun -np n`` job per n (through decomm-run's command builder)."""
    from decomm import launcher

    out: dict[int, dict[str, Any]] = {}
    mpirun = launcher.find_mpirun()
    flavor = launcher.detect_flavor(mpirun)
    for n in ns:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "out.json")
            args = launcher.parse_args(["-np", str(n), sys.executable, str(Path(__file__)),
                                        "--worker", path, "--bytes", str(nbytes),
                                        "--reps", str(reps)])
            plan = launcher.build_plan(args, mpirun, flavor=flavor)
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(plan.argv, capture_output=True, text=True, timeout=timeout)
                ok = proc.returncode == 0 and os.path.exists(path)
            except subprocess.TimeoutExpired:
                ok, proc = False, None
            if not ok:
                tail = (proc.stderr[-2000:] if proc is not None else "timed out")
                print(f"[scaling] n={n}: mpirun failed\n{tail}", flush=True)
                continue
            data = json.loads(Path(path).read_text())
        out[n] = data["results"]
        cells = ", ".join(f"{lab} {r['time_s'] * 1e3:.1f} ms" for lab, r in out[n].items())
        print(f"[scaling] measured n={n:>2}: {cells}  ({time.perf_counter() - t0:.0f}s incl. "
              "start-up)", flush=True)
    return out


# ----------------------------------------------------------------------------- report


def write_report(sim: dict[str, dict[int, dict[str, Any]]] | None,
                 meas: dict[int, dict[str, Any]] | None, args: argparse.Namespace,
                 outdir: Path) -> Path:
    """Markdown tables and a log-log plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outdir.mkdir(parents=True, exist_ok=True)
    lines = ["# Scaling with the number of nodes", "",
             f"Generated by `python benchmarks/scaling.py` on {os.cpu_count()} CPU(s).", ""]
    if sim:
        ns = sorted(next(iter(sim.values())))
        lines += [
            "## Simulated: gossip rounds to consensus", "",
            "Rounds of x ← W(t) x from 8 random Gaussian vectors until the relative "
            "consensus error ‖x_t − x̄‖ / ‖x_0 − x̄‖ ≤ 1e-6 (max over the vectors); "
            "\"exact\" = the error reached machine precision (≤ 1e-12) — a finite-time "
            "convergent sequence. \"≈\" = extrapolated from the worst-case spectral rate "
            "(static circulant graphs too slow to simulate). In brackets: messages the "
            "busiest node sent to get there (Σ of its out-degree over those rounds).", "",
            "| n | " + " | ".join(sim) + " |",
            "|---:|" + "---:|" * len(sim),
        ]
        for n in ns:
            cells = []
            for lab in sim:
                r = sim[lab][n]
                cells.append(_cell(r) + (f" [{r['msgs']}]" if r["rounds"] is not None else ""))
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        big = ns[-1]
        lines += ["", f"At n = {big}: " + "; ".join(
            f"{lab} {_cell(sim[lab][big])} rounds, {sim[lab][big]['msgs']} messages"
            for lab in sim if sim[lab][big]["rounds"] is not None) + ". Base-(k+1) is exact "
            "for every n, in at most 2·log_{k+1}(n) + 2 rounds (Takezawa et al., Thm. 1); "
            "the one-peer exponential graph is exact only when n is a power of 2 (then it "
            "coincides with Base-2), otherwise it is asymptotic like the static graphs.", ""]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
        for idx, lab in enumerate(sim):
            pts = [(n, sim[lab][n]) for n in ns if sim[lab][n]["rounds"] is not None]
            style = "o-" if lab.startswith("Base") else "s--"
            a1.loglog([n for n, _ in pts], [r["rounds"] for _, r in pts], style, color=f"C{idx}",
                      label=lab, ms=4)
            a2.loglog([n for n, _ in pts], [r["msgs"] for _, r in pts], style, color=f"C{idx}",
                      label=lab, ms=4)
        a1.set_ylabel("rounds to exact / 1e-6 consensus")
        a2.set_ylabel("messages sent by the busiest node")
        for ax in (a1, a2):
            ax.set_xlabel("number of nodes n")
            ax.grid(alpha=0.3, which="both")
        a1.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(outdir / "scaling_consensus.png", dpi=100)
        plt.close(fig)
        lines += ["![rounds to consensus](scaling_consensus.png)", ""]
    if meas:
        ns = sorted(meas)
        labels = list(next(iter(meas.values())))
        lines += [
            f"## Measured: one exchange of a {args.bytes / 2**20:g} MiB float32 buffer "
            f"({args.reps} repetitions)", "",
            "`mpirun -np n` on this machine (oversubscribed beyond its cores, so absolute "
            "times are dominated by scheduling: compare ratios within a row). Time: per "
            "step, slowest rank; bytes: mean over ranks of decomm's counter "
            "(`decomm.stats()`), per step. For `allreduce` the counter records the "
            "buffer handed to MPI; the data a ring allreduce moves is ≈ 2(n−1)/n of it.", "",
            "| n | " + " | ".join(f"{lab} ms" for lab in labels) + " | "
            + " | ".join(f"{lab} MiB/rank" for lab in labels if lab != "allreduce") + " |",
            "|---:|" + "---:|" * (2 * len(labels) - 1),
        ]
        for n in ns:
            t = [f"{meas[n][lab]['time_s'] * 1e3:.1f}" for lab in labels]
            b = [f"{meas[n][lab]['bytes_mean'] / 2**20:.2f}"
                 for lab in labels if lab != "allreduce"]
            lines.append(f"| {n} | " + " | ".join(t) + " | " + " | ".join(b) + " |")
        lines.append("")
        fig, ax = plt.subplots(figsize=(5.5, 4.2))
        for idx, lab in enumerate(labels):
            ax.loglog(ns, [meas[n][lab]["time_s"] * 1e3 for n in ns], "o-", color=f"C{idx}",
                      label=lab, ms=4)
        ax.set_xlabel("ranks n (2 cores: oversubscribed)")
        ax.set_ylabel("time per step (ms)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(outdir / "scaling_measured.png", dpi=100)
        plt.close(fig)
        lines += ["![time per step](scaling_measured.png)", ""]
    md = outdir / "scaling.md"
    md.write_text("\n".join(lines))
    return md


def main(argv: list[str] | None = None) -> int:
    """Run the selected parts and write the report."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["both", "simulated", "measured"], default="both")
    p.add_argument("--sim-n", nargs="+", type=int, default=list(SIM_N))
    p.add_argument("--cap", type=int, default=20000, help="max simulated rounds")
    p.add_argument("--mpi-n", nargs="+", type=int, default=[2, 4, 8, 12, 16, 20, 25])
    p.add_argument("--bytes", type=int, default=2**20, help="buffer size of the measured part")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--timeout", type=int, default=300, help="seconds per mpirun")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args.bytes, args.reps)
        return 0
    t0 = time.perf_counter()
    cache = Path(args.out) / "scaling.json"  # the part not run now is taken from here
    saved = json.loads(cache.read_text()) if cache.is_file() else {}
    if args.part in ("both", "simulated"):
        sim = simulated(args.sim_n, args.cap)
    else:
        sim = {lab: {int(n): r for n, r in rows.items()} for lab, rows in
               saved.get("simulated", {}).items()} or None
    if args.part in ("both", "measured"):
        meas = measured(args.mpi_n, args.bytes, args.reps, args.timeout)
    else:
        meas = {int(n): r for n, r in saved.get("measured", {}).items()} or None
        args.bytes = saved.get("bytes", args.bytes)
        args.reps = saved.get("reps", args.reps)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"simulated": sim, "measured": meas, "bytes": args.bytes,
                                 "reps": args.reps}, indent=1))
    md = write_report(sim, meas, args, Path(args.out))
    print(f"[scaling] wrote {md} in {time.perf_counter() - t0:.0f}s", flush=True)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
