#!/usr/bin/env python
"""Decentralized training of a classifier with decomm — the main example.

An ordinary PyTorch training loop; three lines make it decentralized::

    decomm.init()                                              # 1. join the MPI job
    decomm.set_topology(BaseGraph(decomm.size(), k=1))         # 2. who talks to whom
    opt = decomm.optim.DSGD(torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9))  # 3.

Every rank trains its own copy of the model on its own shard of the data (a
Dirichlet label split: ``--alpha 0.1`` gives each rank one or two classes,
``--alpha 10`` almost the global mix); after each local SGD step the ranks average
their parameters with their neighbours in the current round of the topology.

Run it (25 ranks on one machine; ``decomm-run`` adds the flags a laptop needs)::

    decomm-run -np 25 python examples/train.py
    mpirun -np 25 python examples/train.py --topology exp --alpha 10 --epochs 20

Each epoch rank 0 prints the mean training loss, the test accuracy of the
averaged model ``x̄ = mean_i x_i`` and of the local models (mean over ranks), the
consensus distance ``(1/n) Σ_i ‖x_i − x̄‖²``, the bytes each rank has sent so far
and the wall time; at the end it writes ``<out>/<run>.csv`` and ``<out>/<run>.png``.
"""

from __future__ import annotations

import argparse
import csv
import functools
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import decomm
import decomm.optim
from decomm.data import dirichlet_split, split_summary
from decomm.topology import Topology, by_name, canonical_name, graph_names, graph_params

# The example's datasets and models sit next to this file (they are not part of the
# library); make them importable also when this file is loaded by path (the tests do).
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
from datasets import DATASETS, load_dataset  # noqa: E402  (examples/datasets.py)
from models import MODELS, build_model, count_parameters, default_model  # noqa: E402

#: The topologies this example documents and compares (examples/README.md), in the
#: canonical spelling of ``decomm.topology.by_name``. ``--topology`` accepts every name
#: of ``decomm.topology.graph_names()`` and the older aliases (``onepeer``, ``hh``, ...).
TOPOLOGIES = ("base", "simple-base", "hyper-hypercube", "exp", "one-peer-exp", "ring", "torus",
              "equidyn", "full")
OPTIMIZERS = ("dsgd", "gt", "d2", "qgdsgdm")

#: Flat buffers each optimizer sends per exchange, in units of the parameter size
#: (gradient tracking sends the parameters and the tracker).
PAYLOAD_FACTOR = {"dsgd": 1, "gt": 2, "d2": 1, "qgdsgdm": 1}


# ----------------------------------------------------------------------------- factories


def make_topology(name: str, n: int, k: int = 1, seed: int = 0) -> Topology:
    """Build the topology called ``name`` (a name of ``decomm.topology.graph_names()`` or
    an alias) for ``n`` nodes, through ``decomm.topology.by_name``.

    ``k`` is the maximum degree of the Base-(k+1) family (``base``, ``simple-base``,
    ``hyper-hypercube``); ``seed`` seeds EquiDyn's and EquiStatic's random rounds.
    Graphs that take neither ignore them.
    """
    given = {"k": k, "seed": seed}
    wanted = graph_params(name)  # ValueError "unknown topology ..." for a bad name
    return by_name(name, n, **{p: v for p, v in given.items() if p in wanted})


def _topology_arg(name: str) -> str:
    """argparse type of ``--topology``: the canonical name (aliases accepted)."""
    try:
        return canonical_name(name)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def make_inner_optimizer(params: Any, lr: float, momentum: float,
                         weight_decay: float) -> torch.optim.Optimizer:
    """The local optimizer every rank would use on its own (SGD, heavy-ball momentum)."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def wrap_optimizer(
    name: str, inner: torch.optim.Optimizer, *, momentum: float, communicate_every: int = 1,
    **kwargs: Any,
) -> decomm.optim.DecentralizedOptimizer:
    """Wrap ``inner`` with the decentralized algorithm ``name`` (one of :data:`OPTIMIZERS`).

    For ``qgdsgdm`` the momentum is the algorithm's own quasi-global momentum, so the
    inner optimizer should be plain SGD (the caller passes momentum 0 to it).
    """
    if name == "dsgd":
        return decomm.optim.DSGD(inner, communicate_every=communicate_every, **kwargs)
    if name == "gt":
        return decomm.optim.GradientTracking(inner, communicate_every=communicate_every, **kwargs)
    if name == "d2":
        return decomm.optim.D2(inner, communicate_every=communicate_every, **kwargs)
    if name == "qgdsgdm":
        return decomm.optim.QGDSGDm(inner, momentum=momentum,
                                    communicate_every=communicate_every, **kwargs)
    raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total`` steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / span)))


# ----------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (every flag has a help text: ``--help``)."""
    p = argparse.ArgumentParser(
        description="Decentralized training with decomm (run under mpirun / decomm-run).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", choices=DATASETS, default="digits",
                   help="digits and synthetic are offline; the others read --data-dir")
    p.add_argument("--data-dir", default=None,
                   help="directory with the FashionMNIST / CIFAR-10 files "
                        "(unset: $DECOMM_DATA, else ./data)")
    p.add_argument("--model", choices=MODELS, default=None,
                   help="unset: mlp for digits/synthetic, lenet for fashionmnist, "
                        "vgg11 for cifar10")
    p.add_argument("--topology", type=_topology_arg, choices=graph_names(), default="base",
                   metavar="NAME",
                   help="communication graph, a name of decomm.topology.by_name: "
                        f"{', '.join(graph_names())} (older spellings onepeer, simple, hh "
                        "also work)")
    p.add_argument("--k", type=int, default=1,
                   help="max degree of the Base-(k+1) family (base, simple-base, "
                        "hyper-hypercube); other graphs ignore it")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="dsgd",
                   help="dsgd: decentralized SGD; gt: gradient tracking; d2: D^2 (static "
                        "symmetric W with eigenvalues > -1/3); qgdsgdm: quasi-global momentum")
    p.add_argument("--lr", type=float, default=0.2, help="peak learning rate (cosine schedule)")
    p.add_argument("--momentum", type=float, default=0.9,
                   help="heavy-ball momentum of the local SGD (qgdsgdm: its quasi-global "
                        "momentum)")
    p.add_argument("--weight-decay", type=float, default=0.0,
                   help="L2 weight decay of the local SGD")
    p.add_argument("--warmup-epochs", type=float, default=0.0,
                   help="linear warm-up before the cosine")
    p.add_argument("--communicate-every", type=int, default=1, help="local steps per exchange")
    p.add_argument("--alpha", type=float, default=0.1,
                   help="Dirichlet heterogeneity of the label split "
                        "(small = heterogeneous; inf = IID)")
    p.add_argument("--epochs", type=int, default=20,
                   help="passes over each rank's shard (the same number of steps on every "
                        "rank)")
    p.add_argument("--batch-size", type=int, default=16, help="per rank")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the data split, batch order, initialisation and random "
                        "topologies")
    p.add_argument("--eval-samples", type=int, default=2000,
                   help="test samples used for the local-model accuracy (averaged model: all)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per rank (unset: 1 for mlp/cnn, else cores / local ranks)")
    p.add_argument("--kill-rank", type=int, default=None, metavar="R",
                   help="fault-tolerance demo: launch rank R SIGKILLs itself at --kill-at-step "
                        "(run with decomm-run --fault-tolerant; the others continue)")
    p.add_argument("--kill-at-step", type=int, default=None, metavar="S",
                   help="the training step at which --kill-rank dies")
    p.add_argument("--out", default="runs", help="directory for the CSV and PNG")
    p.add_argument("--no-plot", action="store_true", help="write the CSV only")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see ``--help``), checked."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.k < 1:
        p.error("--k must be >= 1")
    if args.epochs < 1 or args.batch_size < 1 or args.communicate_every < 1:
        p.error("--epochs, --batch-size and --communicate-every must be >= 1")
    if not args.alpha > 0:
        p.error("--alpha must be > 0")
    return args


# ----------------------------------------------------------------------------- helpers


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover
        return os.cpu_count() or 1


def _allreduce_sum(values: list[float]) -> list[float]:
    total = decomm.allreduce(torch.tensor(values, dtype=torch.float64), average=False,
                             name="train.metrics")
    return [float(v) for v in total]


def _bytes_sent() -> float | None:
    """Bytes this rank has sent through decomm so far (``decomm.stats()``), if available."""
    stats = getattr(decomm, "stats", None)
    return float(stats()["bytes_sent"]) if stats is not None else None


def _with_recovery(fn: Any) -> Any:
    """Run the collective ``fn``; if a rank is lost meanwhile (fault tolerance on),
    continue on the survivors (``decomm.recover()``) and run it again there."""
    while True:
        try:
            return fn()
        except decomm.PeerFailureError:
            decomm.recover()


def _evaluate(model: torch.nn.Module, avg_model: torch.nn.Module, x_test: torch.Tensor,
              y_test: torch.Tensor, eval_idx: torch.Tensor, loss: float,
              sent: float) -> tuple[float, list[float]]:
    """Collective: the consensus distance, and the sums over ranks of [loss, test hits of
    the averaged model on this rank's slice of the test set, local accuracy, bytes]."""
    flat = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
    _set_flat(avg_model, decomm.allreduce(flat, average=True, name="train.average_model"))
    mine = torch.arange(decomm.rank(), len(y_test), decomm.size())
    hits_avg = _correct(avg_model, x_test[mine], y_test[mine])
    acc_local = _correct(model, x_test[eval_idx], y_test[eval_idx]) / len(eval_idx)
    consensus = decomm.optim.consensus_distance(model)
    return consensus, _allreduce_sum([loss, hits_avg, acc_local, sent])


def _set_flat(model: torch.nn.Module, flat: torch.Tensor) -> None:
    with torch.no_grad():
        offset = 0
        for p in model.parameters():
            p.copy_(flat[offset: offset + p.numel()].view_as(p))
            offset += p.numel()


@torch.no_grad()
def _correct(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1024) -> int:
    model.eval()
    hits = 0
    for i in range(0, len(y), batch):
        hits += int((model(x[i: i + batch]).argmax(1) == y[i: i + batch]).sum())
    model.train()
    return hits


def run_name(args: argparse.Namespace, n: int) -> str:
    """File stem of a run's outputs, e.g. ``digits_base-k1_dsgd_a0.1_n25``."""
    topo = args.topology + (f"-k{args.k}" if "k" in graph_params(args.topology) else "")
    return f"{args.dataset}_{topo}_{args.optimizer}_a{args.alpha:g}_n{n}"


def write_plot(rows: list[dict[str, float]], path: Path, title: str) -> None:
    """Accuracy and consensus distance against epochs (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for prev, r in zip(rows, rows[1:]):
        if r.get("ranks", 0) < prev.get("ranks", 0):  # ranks were lost during this epoch
            for ax in (a1, a2):
                ax.axvline(r["epoch"] - 0.5, color="red", ls=":", lw=1)
            a1.text(r["epoch"] - 0.5, 0.02, f" lost {int(prev['ranks'] - r['ranks'])} rank(s)",
                    color="red", fontsize=8, va="bottom", transform=a1.get_xaxis_transform())
    a1.plot(ep, [100 * r["test_acc_avg"] for r in rows], "o-", label="averaged model")
    a1.plot(ep, [100 * r["test_acc_local"] for r in rows], "s--", label="local models (mean)")
    a1.set_xlabel("epoch")
    a1.set_ylabel("test accuracy (%)")
    a1.grid(alpha=0.3)
    a1.legend()
    a2.semilogy(ep, [max(r["consensus"], 1e-12) for r in rows], "o-", color="C3")
    a2.set_xlabel("epoch")
    a2.set_ylabel(r"consensus distance $\frac{1}{n}\sum_i\|x_i-\bar x\|^2$")
    a2.grid(alpha=0.3, which="both")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- training


def run(args: argparse.Namespace) -> list[dict[str, float]]:
    """Train as configured by ``args`` on the current decomm job; return per-epoch metrics.

    Collective: every rank must call it with the same arguments. ``decomm.init()``
    must have been called. The returned rows are the same on every rank.
    """
    rank, n = decomm.rank(), decomm.size()
    n_launch = n  # for file names: fewer ranks may finish (fault tolerance)
    model_name = args.model or default_model(args.dataset)
    threads = args.threads
    if threads is None:  # small models: one thread (less overhead); else share the cores
        big = model_name in ("lenet", "vgg11", "resnet18")
        threads = max(1, _cpu_count() // max(1, decomm.local_size())) if big else 1
    torch.set_num_threads(threads)  # 25 ranks on 2 cores: one thread each
    say = print if rank == 0 else (lambda *a, **k: None)

    # ---- data: every rank computes the same split and keeps its shard
    t_start = time.perf_counter()
    data = load_dataset(args.dataset, args.data_dir, seed=args.seed)
    shards = dirichlet_split(data.y_train, n, args.alpha, seed=args.seed)
    stats = split_summary(data.y_train, shards)
    x_np, y_np = data.train_arrays(shards[rank])
    x_train, y_train = torch.from_numpy(x_np), torch.from_numpy(y_np)
    x_all, y_all = data.test_arrays()
    x_test, y_test = torch.from_numpy(x_all), torch.from_numpy(y_all)
    order = np.random.default_rng(12345).permutation(len(y_all))
    eval_idx = torch.from_numpy(order[: args.eval_samples])
    del data

    # ---- model, topology, optimizer: the three decomm lines are marked
    torch.manual_seed(args.seed)
    model = build_model(model_name, x_train.shape[1:], int(y_all.max()) + 1)
    avg_model = build_model(model_name, x_train.shape[1:], int(y_all.max()) + 1)
    topology = make_topology(args.topology, n, args.k, args.seed)
    decomm.set_topology(topology)  # <- decomm line 2 (line 1, decomm.init(), is in main)
    inner_momentum = 0.0 if args.optimizer == "qgdsgdm" else args.momentum
    inner = make_inner_optimizer(model.parameters(), args.lr, inner_momentum, args.weight_decay)
    opt = wrap_optimizer(args.optimizer, inner, momentum=args.momentum,  # <- decomm line 3
                         communicate_every=args.communicate_every)

    min_shard = int(stats["min_size"])
    steps_per_epoch = max(1, math.ceil(min_shard / args.batch_size))  # same on every rank
    total_steps = steps_per_epoch * args.epochs
    warmup = round(args.warmup_epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, warmup))
    n_params = count_parameters(model)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    payload = param_bytes * PAYLOAD_FACTOR[args.optimizer]

    degree = topology.max_degree()
    cycle = "random rounds" if topology.rounds is None else f"{topology.rounds} round(s)/cycle"
    exact = topology.rounds is not None and topology.is_finite_time_exact()
    say(f"[train] {n} rank(s), {threads} torch thread(s) each")
    say(f"[train] topology {topology.name}: {cycle}, max degree {degree}"
        + (", exact average after each cycle" if exact else ""))
    say(f"[train] data {args.dataset}: {len(x_all)} test samples; Dirichlet alpha={args.alpha:g} "
        f"gives {int(stats['min_size'])}-{int(stats['max_size'])} training samples per rank, "
        f"{stats['classes']:.1f} effective classes per rank (TV from global {stats['tv']:.2f})")
    say(f"[train] model {model_name}: {n_params:,} parameters ({param_bytes / 1e3:.1f} kB); "
        f"optimizer {type(opt).__name__}(SGD lr={args.lr:g}, momentum={args.momentum:g}), "
        "cosine schedule")
    say(f"[train] {args.epochs} epoch(s) x {steps_per_epoch} step(s), batch {args.batch_size} "
        f"per rank; loading took {time.perf_counter() - t_start:.1f}s")
    say(f"{'epoch':>5} {'loss':>8} {'acc(avg)':>9} {'acc(local)':>10} {'consensus':>10} "
        f"{'MB sent/rank':>12} {'time(s)':>8}", flush=True)

    gen = torch.Generator().manual_seed(args.seed * 1000 + rank)
    bytes_sent = estimate = 0.0
    rows: list[dict[str, float]] = []
    decomm.barrier()
    t0 = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        perm = torch.randperm(len(y_train), generator=gen)
        loss_sum = 0.0
        sent_before = _bytes_sent()
        for i, batch in enumerate(torch.tensor_split(perm, steps_per_epoch)):
            if (args.kill_rank is not None and decomm.launch_rank() == args.kill_rank
                    and (epoch - 1) * steps_per_epoch + i == args.kill_at_step):
                print(f"[train] launch rank {args.kill_rank}: killing myself at step "
                      f"{args.kill_at_step} (--kill-rank)", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            opt.zero_grad()
            loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
            loss.backward()
            round_before = decomm.current_round()
            opt.step()
            if decomm.current_round() != round_before:  # a gossip exchange happened
                estimate += payload * len(decomm.out_neighbors(decomm.rank()))
            sched.step()
            loss_sum += loss.item()

        sent_after = _bytes_sent()
        if sent_after is not None and sent_before is not None:
            bytes_sent += sent_after - sent_before  # training steps only, not evaluation
        else:
            bytes_sent = estimate

        # ---- evaluation (collective): averaged model on the whole test set, split across
        # ranks; every local model on the same eval subset; consensus distance
        consensus, tot = _with_recovery(functools.partial(
            _evaluate, model, avg_model, x_test, y_test, eval_idx,
            loss_sum / steps_per_epoch, bytes_sent))
        n = decomm.size()  # fewer after a lost rank
        row = {
            "epoch": epoch, "step": epoch * steps_per_epoch, "lr": sched.get_last_lr()[0],
            "train_loss": tot[0] / n, "test_acc_avg": tot[1] / len(y_all),
            "test_acc_local": tot[2] / n, "consensus": consensus,
            "bytes_sent_per_rank": tot[3] / n, "wall_s": time.perf_counter() - t0,
            "ranks": n,
        }
        rows.append(row)
        say(f"{epoch:>5} {row['train_loss']:>8.4f} {100 * row['test_acc_avg']:>8.2f}% "
            f"{100 * row['test_acc_local']:>9.2f}% {row['consensus']:>10.3e} "
            f"{row['bytes_sent_per_rank'] / 1e6:>12.3f} {row['wall_s']:>8.1f}", flush=True)

    if decomm.rank() == 0 and args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = run_name(args, n_launch)
        with open(out / f"{stem}.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        msg = f"[train] wrote {out / (stem + '.csv')}"
        if not args.no_plot:
            write_plot(rows, out / f"{stem}.png",
                       f"{type(opt).__name__} over {topology.name}: {args.dataset}, "
                       f"Dirichlet alpha={args.alpha:g}")
            msg += f" and {out / (stem + '.png')}"
        print(msg, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Parse flags, join the decomm job (``decomm.init()``) if needed, train; exit status."""
    args = parse_args(argv)
    started = not decomm.is_initialized()
    if started:
        decomm.init()  # <- decomm line 1
    try:
        run(args)
    except (ValueError, FileNotFoundError) as exc:  # same on every rank: a clean exit
        if decomm.rank() == 0:
            print(f"[train] error: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        if started:
            decomm.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
