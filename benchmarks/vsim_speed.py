"""Step time of the looped simulator (decomm.sim) vs the vectorized one (decomm.vsim).

Both run the same 25 nodes (``--nodes``) of a small CNN on scikit-learn's 8x8
digits, every node with its own shard and a batch of 32 (``--batch``) per
step, over ``BaseGraph(n, 1)`` (time-varying, 9 rounds at n = 25), with SGD +
momentum wrapped by each of ``--wrappers``::

    python benchmarks/vsim_speed.py                 # full run, ~2 minutes
    python benchmarks/vsim_speed.py --quick         # a handful of steps (smoke test)

Models (``--models``):

* ``cnn2`` (default): two 3x3 stride-2 convolutions (1->8->16 channels) and one
  linear layer, 1,898 parameters: per-node compute is small, so the looped
  simulator's n Python forward/backward/optimizer calls dominate its step;
* ``smallcnn``: ``examples/models.py``'s SmallCNN (16/32 channels, max-pool, two
  linear layers, 37k parameters): more compute per node, a smaller ratio.

A *step* is what a training loop pays: the forward/backward of every node, the
wrapper's step and the mix.  Both simulators see the same data, so the script
also reports the largest parameter difference between them after the timed
steps (they must agree to float32 rounding).  Each variant is timed in blocks of
``--block`` steps, interleaved (looped, vectorized, looped, ...) so that load
from other processes hits both alike, at each torch thread count of
``--threads`` (default 1 and 2: the looped simulator's tiny kernels do not gain
from a second thread, the vectorized one's 25-times larger ones can); the tables
show the median and the best block (ms per step), the ratio of the medians, and
each simulator at its best thread count.  ``os.getloadavg()`` is
recorded at the start and the end: compare runs only on an otherwise idle
machine.  Writes ``benchmarks/results/vsim_speed.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))

from datasets import load_digits  # noqa: E402
from models import SmallCNN  # noqa: E402

from decomm.optim import D2, DSGD, GradientTracking, PushDIGing, PushSum, QGDSGDm  # noqa: E402
from decomm.sim import Simulation  # noqa: E402
from decomm.topology import BaseGraph  # noqa: E402
from decomm.vsim import VectorizedSimulation  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "vsim_speed.md"

WRAPPERS: dict[str, tuple[type, dict]] = {
    "DSGD": (DSGD, {}),
    "DSGD-AWC": (DSGD, {"combine_first": True}),
    "GradientTracking": (GradientTracking, {}),
    "D2": (D2, {}),
    "QGDSGDm": (QGDSGDm, {"momentum": 0.9}),
    "PushSum": (PushSum, {}),
    "PushSum-overlap": (PushSum, {"overlap": 1}),
    "PushDIGing": (PushDIGing, {}),
    # ExactDiffusion and ChocoSGD are left out: the benchmark's BaseGraph is time-varying
    # (ExactDiffusion may diverge over it, ChocoSGD refuses it)
}


def cnn2() -> nn.Module:
    """Two stride-2 3x3 convolutions and one linear layer, for 1x8x8 inputs."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 2 * 2, 10))


MODELS: dict[str, Callable[[], nn.Module]] = {
    "cnn2": cnn2,
    "smallcnn": lambda: SmallCNN(1, 10),
}


def make_optimizer(name: str) -> Callable[[nn.Module], torch.optim.Optimizer]:
    if name == "QGDSGDm":  # provides its own momentum
        return lambda m: torch.optim.SGD(m.parameters(), lr=0.05, weight_decay=1e-4)
    return lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)


def shards(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits training set split into n equal random shards: (n, m, 1, 8, 8), (n, m)."""
    data = load_digits()
    x, y = data.train_arrays()
    perm = np.random.default_rng(seed).permutation(len(y))
    m = len(y) // n
    idx = perm[: n * m].reshape(n, m)
    return torch.from_numpy(x[idx]), torch.from_numpy(y[idx])


def loss_fn(model: Callable, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


def bench_one(model_name: str, wrapper: str, n: int, batch: int, blocks: int, block: int,
              warmup: int, threads: list[int]) -> list[dict]:
    """One row per torch thread count; both simulators advance through the same batches."""
    cls, kw = WRAPPERS[wrapper]
    topo = BaseGraph(n, 1)
    make_model = MODELS[model_name]
    opt = make_optimizer(wrapper)
    torch.manual_seed(0)
    looped = Simulation(topo, make_model, opt, cls, **kw)
    torch.manual_seed(0)
    vec = VectorizedSimulation(topo, make_model, opt, cls, **kw)
    X, Y = shards(n)
    gen = torch.Generator().manual_seed(1)

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, X.shape[1], (n, batch), generator=gen)
        rows = torch.arange(n).unsqueeze(1)
        return X[rows, idx], Y[rows, idx]

    def run_looped(xb: torch.Tensor, yb: torch.Tensor) -> None:
        looped.step(lambda i, m: loss_fn(m, xb[i], yb[i]))

    def run_vec(xb: torch.Tensor, yb: torch.Tensor) -> None:
        vec.step(loss_fn, xb, yb)

    def timed(fn: Callable, data: list) -> float:
        t0 = time.perf_counter()
        for xb, yb in data:
            fn(xb, yb)
        return (time.perf_counter() - t0) / len(data) * 1e3

    params = sum(p.numel() for p in make_model().parameters())
    rows, steps = [], 0
    for nthreads in threads:
        torch.set_num_threads(nthreads)
        warm = [next_batch() for _ in range(warmup)]
        timed(run_looped, warm)
        timed(run_vec, warm)
        steps += warmup
        t_loop, t_vec = [], []
        for _ in range(blocks):
            data = [next_batch() for _ in range(block)]
            t_loop.append(timed(run_looped, data))
            t_vec.append(timed(run_vec, data))
            steps += block
        diff = float((looped.param_matrix() - vec.param_matrix()).abs().max())
        med_l, med_v = statistics.median(t_loop), statistics.median(t_vec)
        rows.append({
            "model": model_name, "wrapper": wrapper, "params": params, "threads": nthreads,
            "looped_med": med_l, "looped_min": min(t_loop), "vec_med": med_v,
            "vec_min": min(t_vec), "ratio": med_l / med_v, "diff": diff, "steps": steps,
        })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=25)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--models", default="cnn2,smallcnn")
    ap.add_argument("--wrappers", default="DSGD,GradientTracking")
    ap.add_argument("--blocks", type=int, default=7, help="timed blocks per variant")
    ap.add_argument("--block", type=int, default=5, help="steps per timed block")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", default="1,2",
                    help="torch thread counts to time, comma-separated (each row one)")
    ap.add_argument("--quick", action="store_true", help="2 blocks of 2 steps: a smoke test")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.quick:
        args.blocks, args.block, args.warmup = 2, 2, 1
    threads = [int(t) for t in str(args.threads).split(",")]
    warnings.simplefilter("ignore", UserWarning)  # D2 over a time-varying graph warns
    load_start = os.getloadavg()
    started = datetime.datetime.now(datetime.timezone.utc)
    print(f"vsim_speed: {args.nodes} nodes, batch {args.batch}, BaseGraph({args.nodes}, 1), "
          f"torch {torch.__version__}, threads {threads}, load average at start "
          f"{load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}", flush=True)
    rows = []
    for model_name in args.models.split(","):
        for wrapper in args.wrappers.split(","):
            if model_name not in MODELS or wrapper not in WRAPPERS:
                raise SystemExit(f"unknown model {model_name!r} or wrapper {wrapper!r}; "
                                 f"models {sorted(MODELS)}, wrappers {sorted(WRAPPERS)}")
            for r in bench_one(model_name, wrapper, args.nodes, args.batch, args.blocks,
                               args.block, args.warmup, threads):
                rows.append(r)
                print(f"  {model_name:9s} {wrapper:17s} {r['threads']} thread(s)  looped "
                      f"{r['looped_med']:8.2f} ms/step  vectorized {r['vec_med']:7.2f} ms/step"
                      f"  ratio {r['ratio']:5.2f}x  max |diff| {r['diff']:.1e}", flush=True)
    best = {}
    for r in rows:
        key = (r["model"], r["wrapper"])
        lo, ve = best.get(key, (float("inf"), float("inf")))
        best[key] = (min(lo, r["looped_med"]), min(ve, r["vec_med"]))
    for (m, w), (lo, ve) in best.items():
        print(f"  {m:9s} {w:17s} best looped {lo:.2f} ms vs best vectorized {ve:.2f} ms: "
              f"{lo / ve:.2f}x", flush=True)
    load_end = os.getloadavg()
    print(f"load average at end {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}")
    lines = [
        "# Looped vs vectorized simulator: step time",
        "",
        f"Written by `benchmarks/vsim_speed.py{' --quick' if args.quick else ''}` on "
        f"{started:%Y-%m-%d %H:%M} UTC ({platform.node()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}).",
        "",
        f"{args.nodes} nodes, batch {args.batch} per node (8x8 digits, one shard per node), "
        f"BaseGraph({args.nodes}, 1), SGD lr 0.05 momentum 0.9 weight decay 1e-4 "
        f"(QGDSGDm: its own momentum). A step = every node's forward/backward + the "
        f"wrapper step + the mix. {args.blocks} blocks of {args.block} steps per variant, "
        f"interleaved; ms per step, median (best) over blocks; ratio of the medians.",
        "",
        f"Load average (1, 5, 15 min) at start: {load_start[0]:.2f}, {load_start[1]:.2f}, "
        f"{load_start[2]:.2f}; at end: {load_end[0]:.2f}, {load_end[1]:.2f}, {load_end[2]:.2f}.",
        "",
    ]
    if args.quick or load_start[0] > 1.0 or load_end[0] > 1.0:
        lines += ["**Not a final measurement**: "
                  + ("a --quick smoke run" if args.quick else "the machine was loaded")
                  + "; rerun on an idle machine.", ""]
    lines += [
        "| model | params | wrapper | torch threads | looped ms/step | vectorized ms/step "
        "| ratio | max abs diff |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params']} | {r['wrapper']} | {r['threads']} | "
            f"{r['looped_med']:.2f} ({r['looped_min']:.2f}) | {r['vec_med']:.2f} "
            f"({r['vec_min']:.2f}) | {r['ratio']:.2f}x | {r['diff']:.1e} |")
    lines += ["", "Each simulator at its best thread count:", "",
              "| model | wrapper | looped ms/step | vectorized ms/step | ratio |",
              "|---|---|---:|---:|---:|"]
    for (m, w), (lo, ve) in best.items():
        lines.append(f"| {m} | {w} | {lo:.2f} | {ve:.2f} | {lo / ve:.2f}x |")
    lines += ["", "max abs diff: largest parameter difference between the two simulators "
              "after all the steps of that row and the rows above it for the same model and "
              "wrapper (float32; they see identical batches)."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
