"""25 VGG-11 nodes on one GPU at once with the vectorized simulator (decomm.vsim).

Every node is a full VGG-11 (9.2M parameters, group normalisation as in the
Base-(k+1) paper's setup) with its own shard of CIFAR-10; one step is a single
``vmap``-ed forward/backward over all 25 per-node batches, one optimizer step
over the stacked ``(25, ...)`` parameters, the decentralized wrapper's algebra
on the stacked buffers and one ``W(t) @ X`` product per parameter block::

    python examples/vsim_gpu_vgg.py                       # 25 nodes, GPU, 200 steps
    python examples/vsim_gpu_vgg.py --wrapper gt --topology onepeer --steps 500
    python examples/vsim_gpu_vgg.py --tiny                # CPU smoke test (seconds)

CIFAR-10 is read from ``--data-dir`` (``cifar-10-batches-py``, see
``examples/datasets.py``); without the files the script says so and trains on
synthetic CIFAR-shaped data (ten fixed random class images plus noise), which is
enough to see the loss fall and to time the step.  Memory on the GPU: the
parameters, gradients and momentum of 25 nodes (3 x 25 x 9.2M float32 = 2.8 GB),
the wrapper's extra state (gradient tracking: two more copies), the mix's
scratch block and the activations of 25 x ``--batch`` images.

Prints one line every ``--log-every`` steps: mean / min / max node loss and the
step time (median over the last steps, CUDA-synchronised), and at
``--eval-every`` steps the per-node test accuracy (mean, min) and the consensus
distance ``(1/n) Σ ‖x_i − x̄‖²``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from datasets import load_cifar10  # noqa: E402
from models import count_parameters, vgg11  # noqa: E402

from decomm.optim import (  # noqa: E402
    D2,
    DSGD,
    ExactDiffusion,
    GradientTracking,
    PushDIGing,
    PushSum,
    QGDSGDm,
)
from decomm.topology import BaseGraph, OnePeerExponentialGraph, RingGraph  # noqa: E402
from decomm.vsim import VectorizedSimulation  # noqa: E402

WRAPPERS = {"dsgd": DSGD, "gt": GradientTracking, "d2": D2, "qgdsgdm": QGDSGDm,
            "pushsum": PushSum, "pushdigging": PushDIGing, "exactdiffusion": ExactDiffusion}
TOPOLOGIES = {"base": lambda n, k: BaseGraph(n, k),
              "onepeer": lambda n, k: OnePeerExponentialGraph(n),
              "ring": lambda n, k: RingGraph(n)}


def cifar_or_synthetic(
    data_dir: str | None, synthetic: bool, seed: int, train_size: int, test_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    """(x_train, y_train, x_test, y_test, description), float32 NCHW normalised."""
    if not synthetic:
        try:
            data = load_cifar10(data_dir)
            xtr, ytr = data.train_arrays()
            xte, yte = data.test_arrays()
            return xtr, ytr, xte, yte, f"CIFAR-10 ({len(ytr)} train / {len(yte)} test)"
        except FileNotFoundError as e:
            print(f"CIFAR-10 not found ({str(e).splitlines()[0]}); using synthetic data",
                  flush=True)
    rng = np.random.default_rng(seed)
    protos = rng.standard_normal((10, 3, 32, 32)).astype(np.float32)

    def sample(m: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 10, m)
        x = protos[y] + 1.5 * rng.standard_normal((m, 3, 32, 32)).astype(np.float32)
        return x.astype(np.float32), y.astype(np.int64)

    xtr, ytr = sample(train_size)
    xte, yte = sample(test_size)
    return xtr, ytr, xte, yte, f"synthetic CIFAR-shaped ({train_size} train / {test_size} test)"


def node_loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


def node_accuracy(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x).argmax(dim=1) == y).float().mean()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=25)
    ap.add_argument("--batch", type=int, default=32, help="per node")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--wrapper", choices=sorted(WRAPPERS), default="dsgd")
    ap.add_argument("--topology", choices=sorted(TOPOLOGIES), default="base")
    ap.add_argument("--k", type=int, default=1, help="max degree of the Base-(k+1) graph")
    ap.add_argument("--norm", choices=("group", "none"), default="group")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--synthetic", action="store_true", help="skip looking for CIFAR-10")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-size", type=int, default=500, help="test images per evaluation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true",
                    help="CPU smoke test: 3 nodes, batch 2, 2 steps, synthetic data")
    args = ap.parse_args()
    if args.tiny:
        args.nodes, args.batch, args.steps = 3, 2, 2
        args.log_every, args.eval_every, args.eval_size = 1, 2, 8
        args.device, args.synthetic = "cpu", True
        torch.set_num_threads(1)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n = args.nodes
    torch.manual_seed(args.seed)

    t0 = time.perf_counter()
    xtr, ytr, xte, yte, what = cifar_or_synthetic(
        args.data_dir, args.synthetic, args.seed, train_size=max(64 * n, 256) if args.tiny
        else 50_000, test_size=max(args.eval_size, 16))
    # one random equal shard per node, kept on the device
    per = len(ytr) // n
    perm = np.random.default_rng(args.seed).permutation(len(ytr))[: per * n].reshape(n, per)
    X = torch.from_numpy(xtr[perm]).to(device)  # (n, per, 3, 32, 32)
    Y = torch.from_numpy(ytr[perm]).to(device)
    Xte = torch.from_numpy(xte[: args.eval_size]).to(device)
    Yte = torch.from_numpy(yte[: args.eval_size]).to(device)
    print(f"data: {what}, {per} training images per node", flush=True)

    topo = TOPOLOGIES[args.topology](n, args.k)
    wrapper = WRAPPERS[args.wrapper]
    kwargs = {"momentum": args.momentum} if wrapper is QGDSGDm else {}
    inner_momentum = 0.0 if wrapper is QGDSGDm else args.momentum

    def make_model() -> nn.Module:
        return vgg11(3, 10, norm=args.norm).to(device)

    def make_optimizer(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(m.parameters(), lr=args.lr, momentum=inner_momentum,
                               weight_decay=args.weight_decay)

    vs = VectorizedSimulation(topo, make_model, make_optimizer, wrapper, **kwargs)
    params = count_parameters(vs.model)
    print(f"{n} nodes x VGG-11 ({params / 1e6:.2f}M parameters each, "
          f"{n * params / 1e6:.0f}M in all) on {device}, {topo.name}, "
          f"{wrapper.__name__}, batch {args.batch} per node; built in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    if device.type == "cuda":
        print(f"GPU memory after setup: {torch.cuda.memory_allocated(device) / 2**30:.2f} GiB",
              flush=True)

    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    rows = torch.arange(n, device=device).unsqueeze(1)
    times: list[float] = []

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for step in range(1, args.steps + 1):
        idx = torch.randint(0, per, (n, args.batch), generator=gen, device=device)
        xb, yb = X[rows, idx], Y[rows, idx]  # node i's batch at index i
        sync()
        t = time.perf_counter()
        losses = vs.step(node_loss, xb, yb)
        sync()
        times.append(time.perf_counter() - t)
        if step % args.log_every == 0 or step == args.steps:
            recent = statistics.median(times[-args.log_every:]) * 1e3
            assert losses is not None
            print(f"step {step}/{args.steps}  loss mean {float(losses.mean()):.4f} "
                  f"min {float(losses.min()):.4f} max {float(losses.max()):.4f}  "
                  f"{recent:.1f} ms/step", flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            acc = vs.map(node_accuracy, Xte.expand(n, *Xte.shape), Yte.expand(n, *Yte.shape))
            print(f"  eval: test accuracy mean {float(acc.mean()):.3f} min "
                  f"{float(acc.min()):.3f} over {len(Yte)} images, consensus distance "
                  f"{vs.consensus_distance():.3e}", flush=True)
    peak = ""
    if device.type == "cuda":
        peak = f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    steady = times[1:] or times
    print(f"done: {args.steps} steps, median {statistics.median(steady) * 1e3:.1f} ms/step "
          f"(first step {times[0] * 1e3:.0f} ms){peak}", flush=True)


if __name__ == "__main__":
    main()
