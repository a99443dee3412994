"""Step time of the looped simulator (decomm.sim) vs the vectorized one (decomm.vsim).

Both run the same 25 nodes (``--nodes``) of a small CNN on scikit-learn's 8x8
digits, every node with its own shard and a batch of 32 (``--batch``) per
step, over ``BaseGraph(n, 1)`` (time-varying, 9 rounds at n = 25), with SGD +
momentum wrapped by each of ``--wrappers``::

    python benchmarks/vsim_speed.py                 # full run, ~1 minute
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
from other processes hits both alike; the table shows the median and the best
block (ms per step) and the ratio of the medians.  ``os.getloadavg()`` is
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

from decomm.optim import D2, DSGD, GradientTracking, QGDSGDm  # noqa: E402
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
              warmup: int) -> dict:
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

    warm = [next_batch() for _ in range(warmup)]
    timed(run_looped, warm)
    timed(run_vec, warm)
    t_loop, t_vec = [], []
    for _ in range(blocks):
        data = [next_batch() for _ in range(block)]
        t_loop.append(timed(run_looped, data))
        t_vec.append(timed(run_vec, data))
    diff = float((looped.param_matrix() - vec.param_matrix()).abs().max())
    med_l, med_v = statistics.median(t_loop), statistics.median(t_vec)
    return {
        "model": model_name, "wrapper": wrapper,
        "params": sum(p.numel() for p in make_model().parameters()),
        "looped_med": med_l, "looped_min": min(t_loop), "vec_med": med_v, "vec_min": min(t_vec),
        "ratio": med_l / med_v, "diff": diff, "steps": warmup + blocks * block,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=25)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--models", default="cnn2,smallcnn")
    ap.add_argument("--wrappers", default="DSGD,GradientTracking")
    ap.add_argument("--blocks", type=int, default=7, help="timed blocks per variant")
    ap.add_argument("--block", type=int, default=5, help="steps per timed block")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: tiny per-node kernels gain nothing from more)")
    ap.add_argument("--quick", action="store_true", help="2 blocks of 2 steps: a smoke test")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.quick:
        args.blocks, args.block, args.warmup = 2, 2, 1
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", UserWarning)  # D2 over a time-varying graph warns
    load_start = os.getloadavg()
    started = datetime.datetime.now(datetime.timezone.utc)
    print(f"vsim_speed: {args.nodes} nodes, batch {args.batch}, BaseGraph({args.nodes}, 1), "
          f"torch {torch.__version__}, {args.threads} thread(s), load average at start "
          f"{load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}", flush=True)
    rows = []
    for model_name in args.models.split(","):
        for wrapper in args.wrappers.split(","):
            if model_name not in MODELS or wrapper not in WRAPPERS:
                raise SystemExit(f"unknown model {model_name!r} or wrapper {wrapper!r}; "
                                 f"models {sorted(MODELS)}, wrappers {sorted(WRAPPERS)}")
            r = bench_one(model_name, wrapper, args.nodes, args.batch, args.blocks,
                          args.block, args.warmup)
            rows.append(r)
            print(f"  {model_name:9s} {wrapper:17s} looped {r['looped_med']:8.2f} ms/step  "
                  f"vectorized {r['vec_med']:7.2f} ms/step  ratio {r['ratio']:5.2f}x  "
                  f"max |diff| {r['diff']:.1e}", flush=True)
    load_end = os.getloadavg()
    print(f"load average at end {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}")
    lines = [
        "# Looped vs vectorized simulator: step time",
        "",
        f"Written by `benchmarks/vsim_speed.py{' --quick' if args.quick else ''}` on "
        f"{started:%Y-%m-%d %H:%M} UTC ({platform.node()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {args.threads} torch thread(s)).",
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
        "| model | params | wrapper | looped ms/step | vectorized ms/step | ratio | max abs diff |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params']} | {r['wrapper']} | {r['looped_med']:.2f} "
            f"({r['looped_min']:.2f}) | {r['vec_med']:.2f} ({r['vec_min']:.2f}) | "
            f"{r['ratio']:.2f}x | {r['diff']:.1e} |")
    lines += ["", "max abs diff: largest parameter difference between the two simulators "
              f"after {rows[0]['steps'] if rows else 0} identical steps (float32)."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
