#!/usr/bin/env python
"""Topology study of the Base-(k+1) paper (Takezawa et al., NeurIPS 2023) in its regime,
as far as a 2-core CPU allows, on the vectorized simulator.

Protocol (what the paper does, scaled down where the CPU forces it):

* **task**: "shifted noisy digits" — scikit-learn's 8x8 digits placed at a random offset
  in a 12x12 canvas, random contrast in [0.5, 1], Gaussian pixel noise σ = 0.2 (see
  :func:`make_task`).  The originals are split 60/20/20 into train / validation / test
  *before* augmentation, so no validation or test image shares a source digit with a
  training image.  The model below, trained centrally, reaches about 71% test accuracy after
  2000 steps of batch 64: hard enough that consensus matters, unlike plain digits.
* **model**: a small CNN (two 3x3 conv layers of 16 and 32 channels with stride 2, one
  linear layer; 7,690 parameters).
* **data split**: the per-class Dirichlet split over 25 workers of
  :func:`decomm.data.dirichlet_split`, α ∈ {0.1, 10}; equal shard sizes.
* **training**: 25 nodes, heavy-ball DSGD (SGD momentum 0.9, weight decay 1e-4, batch 16
  per node), ``--steps`` (default 2000) steps, linear warm-up over the first 5% then cosine
  decay to 0 (``examples/train.py``'s ``lr_factor``).
* **learning rate**: a grid per (algorithm, topology, α), chosen on the *validation* set
  with separate tuning seeds (the mean over tuning seeds of the averaged model's final
  validation accuracy; a grid point where any tuning seed diverged is not eligible, so
  gradient tracking and QG-DSGDm are compared at each topology's best *stable* rate).
  The chosen rate is then run with fresh evaluation seeds, and only those runs' *test*
  accuracy is reported: no best-of selection after the fact.
* **pairing**: an evaluation seed fixes the data split, the initial model (identical on all
  nodes), every node's batch order and EquiDyn's rounds, so topologies are compared on the
  same seeds: paired t-test and Wilcoxon signed-rank test on the per-seed differences.
* **simulator**: :class:`decomm.vsim.VectorizedSimulation`, which runs the same
  ``decomm.optim`` wrappers an MPI run uses (its trajectories equal the looped simulator's
  and an MPI run's up to round-off: ``tests/unit/test_vsim.py``).

Outputs (``--out``, default ``benchmarks/results``): ``topology_study.md`` (tables,
statistics, reading), ``topology_study_runs.jsonl`` (every run, with curves; the script
resumes from it, so an interrupted study continues where it stopped) and
``topology_study_*.png`` (accuracy and consensus distance against steps and against bytes).

    python benchmarks/topology_study.py                 # the study, ~1 h on 2 cores
    python benchmarks/topology_study.py --quick         # a smoke test, ~1 min
    python benchmarks/topology_study.py --report-only   # rewrite the report from the runs
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))

from datasets import _digits_arrays, _stratified_holdout  # noqa: E402  (examples/datasets.py)
from train import lr_factor, make_topology  # noqa: E402  (examples/train.py)

from decomm.data import dirichlet_split  # noqa: E402
from decomm.optim import DSGD, GradientTracking, QGDSGDm  # noqa: E402
from decomm.topology import Topology  # noqa: E402
from decomm.vsim import VectorizedSimulation  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
N_NODES = 25
BATCH = 16
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
WARMUP_FRACTION = 0.05
ALPHAS = (0.1, 10.0)

#: (label, examples/train.py topology name, k)
TOPOLOGIES: tuple[tuple[str, str, int], ...] = (
    ("ring", "ring", 1),
    ("exp", "exp", 1),
    ("one-peer exp", "one-peer-exp", 1),
    ("Base-2 (k=1)", "base", 1),
    ("Base-3 (k=2)", "base", 2),
    ("Base-5 (k=4)", "base", 4),
)
#: a diagnostic, α = 0.1 only: is the directed exponential graph's loss to the ring about its
#: direction?  Its symmetrization (W + Wᵀ)/2 is doubly stochastic with real eigenvalues.
SYMMETRIZED_EXP = "exp, symmetrized (diagnostic)"
#: the topologies on which gradient tracking and QG-DSGDm are compared with DSGD (α = 0.1)
ALGORITHM_TOPOLOGIES = ("ring", "exp", "Base-2 (k=1)", "Base-3 (k=2)")
#: gradient tracking over plain SGD (no inner momentum): a diagnostic for its instability
#: over the Base graphs with heavy-ball momentum
GT_PLAIN = "GradientTracking, no momentum"
ALGORITHMS = {"DSGD": DSGD, "GradientTracking": GradientTracking, "QGDSGDm": QGDSGDm,
              GT_PLAIN: GradientTracking}
#: the algorithms compared with DSGD at α = 0.1 on ALGORITHM_TOPOLOGIES
OTHER_ALGORITHMS = ("GradientTracking", "QGDSGDm", GT_PLAIN)
LR_GRID = (0.05, 0.1, 0.2, 0.4)
#: gradient tracking's grid reaches further down: over the Base graphs every point of
#: LR_GRID diverged or collapsed to chance in a first run, so its best stable rate was
#: below the grid
GT_EXTRA_LRS = (0.0125, 0.025)


#: without momentum the step is lr·g instead of about 10·lr·g: a grid 2x higher
GT_PLAIN_LRS = (0.1, 0.2, 0.4, 0.8)


def lr_grid_for(algorithm: str) -> tuple[float, ...]:
    """The learning-rate grid of ``algorithm``."""
    if algorithm == GT_PLAIN:
        return GT_PLAIN_LRS
    return (GT_EXTRA_LRS + LR_GRID) if algorithm == "GradientTracking" else LR_GRID
TUNE_SEEDS = (100, 101)
EVAL_SEEDS = (0, 1, 2, 3, 4)
#: Base-(k+1) variants and the comparisons the paper makes (a, b): a - b is tested
COMPARISONS: tuple[tuple[str, str], ...] = (
    ("Base-2 (k=1)", "exp"), ("Base-3 (k=2)", "exp"), ("Base-5 (k=4)", "exp"),
    ("Base-2 (k=1)", "one-peer exp"), ("Base-3 (k=2)", "Base-2 (k=1)"), ("exp", "ring"),
    (SYMMETRIZED_EXP, "exp"), (SYMMETRIZED_EXP, "ring"),
)


# ----------------------------------------------------------------------------- task


def make_task(seed: int = 0, train_reps: int = 20, eval_reps: int = 3, noise: float = 0.2,
              canvas: int = 12) -> dict[str, torch.Tensor]:
    """Shifted noisy digits: each original 8x8 digit (scaled to [0, 1]) at a uniformly
    random offset in a ``canvas`` x ``canvas`` image, times a contrast in [0.5, 1], plus
    N(0, noise²) pixel noise; ``train_reps`` (resp. ``eval_reps``) random versions of each
    training (validation, test) original.  The originals are split 60/20/20 (stratified,
    fixed by ``seed``) before augmentation.  Returns float32 images ``(N, 1, c, c)`` and
    int64 labels for ``train``, ``val`` and ``test``.
    """
    x, y = _digits_arrays()
    x = x / 16.0
    rest, test = _stratified_holdout(y, 0.2, seed)
    tr_rel, va_rel = _stratified_holdout(y[rest], 0.25, seed + 1)
    rng = np.random.default_rng(seed)
    out: dict[str, torch.Tensor] = {}
    span = canvas - 8 + 1
    for name, idx, reps in (("train", rest[tr_rel], train_reps), ("val", rest[va_rel], eval_reps),
                            ("test", test, eval_reps)):
        src = np.repeat(idx, reps)
        m = len(src)
        img = np.zeros((m, 1, canvas, canvas), np.float32)
        ox, oy = rng.integers(0, span, m), rng.integers(0, span, m)
        contrast = rng.uniform(0.5, 1.0, m).astype(np.float32)
        for k in range(m):
            img[k, 0, oy[k]:oy[k] + 8, ox[k]:ox[k] + 8] = x[src[k], 0] * contrast[k]
        img += rng.normal(0.0, noise, img.shape).astype(np.float32)
        out[f"x_{name}"] = torch.from_numpy(img)
        out[f"y_{name}"] = torch.from_numpy(y[src].astype(np.int64))
    return out


def make_model(canvas: int = 12) -> nn.Module:
    """Two 3x3 conv layers with stride 2 (16 and 32 channels, ReLU) and a linear
    classifier: strided convolutions instead of max-pooling, which is the slow part of a
    vmapped forward/backward on a CPU."""
    flat = 32 * (canvas // 4) ** 2
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(flat, 10))


def node_batches(shards: Sequence[np.ndarray], steps: int, batch: int, seed: int) -> np.ndarray:
    """``(steps, n, batch)`` training indices: every node walks through its own shard in
    epochs of a fresh random order (seeded per node), as a DistributedSampler would."""
    out = np.empty((steps, len(shards), batch), np.int64)
    for i, shard in enumerate(shards):
        rng = np.random.default_rng([seed, i])
        need = steps * batch
        order = np.concatenate([rng.permutation(shard)
                                for _ in range(math.ceil(need / len(shard)) + 1)])
        out[:, i, :] = order[:need].reshape(steps, batch)
    return out


# ----------------------------------------------------------------------------- one run


@dataclass(frozen=True)
class RunSpec:
    algorithm: str
    topology: str
    alpha: float
    lr: float
    seed: int
    stage: str  # "tune" (validation only) or "eval" (validation and test)
    steps: int

    def key(self) -> str:
        return (f"{self.stage}|{self.algorithm}|{self.topology}|{self.alpha:g}|{self.lr:g}|"
                f"{self.seed}|{self.steps}")


_TASK: dict[str, torch.Tensor] | None = None


def _task() -> dict[str, torch.Tensor]:
    global _TASK
    if _TASK is None:
        _TASK = make_task()
    return _TASK


def _accuracy(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor,
              y: torch.Tensor) -> float:
    with torch.no_grad():
        logits = torch.func.functional_call(model, params, (x,))
    return float((logits.argmax(1) == y).double().mean())


def _bytes_per_round(vs: VectorizedSimulation, rounds: int, param_bytes: int,
                     factor: int) -> list[float]:
    """Mean over nodes of (out-degree × message bytes) for rounds 0..rounds-1."""
    out = []
    for t in range(rounds):
        w = vs.mixing_matrix(t).numpy()
        off = (w != 0) & ~np.eye(vs.n, dtype=bool)
        out.append(float(off.sum(axis=0).mean()) * param_bytes * factor)
    return out


def run_one(spec: RunSpec, eval_every: int = 100) -> dict[str, Any]:
    """Train 25 nodes for ``spec.steps`` steps; the averaged model's accuracy curves."""
    torch.set_num_threads(1)
    task = _task()
    if spec.topology == SYMMETRIZED_EXP:
        w = np.asarray(make_topology("exp", N_NODES).matrix(0), dtype=np.float64)
        topo = Topology.from_matrices([(w + w.T) / 2.0])
    else:
        label = {t[0]: t for t in TOPOLOGIES}[spec.topology]
        topo = make_topology(label[1], N_NODES, k=label[2], seed=spec.seed)
    shards = dirichlet_split(task["y_train"].numpy(), N_NODES, spec.alpha, seed=spec.seed)
    idx = torch.from_numpy(node_batches(shards, spec.steps, BATCH, spec.seed))
    torch.manual_seed(spec.seed)
    wrapper = ALGORITHMS[spec.algorithm]
    # QG-DSGDm supplies its own (quasi-global) momentum over plain SGD
    inner_momentum, kwargs = (0.0, {"momentum": MOMENTUM}) if wrapper is QGDSGDm else (MOMENTUM, {})
    if spec.algorithm == GT_PLAIN:
        inner_momentum = 0.0
    vs = VectorizedSimulation(
        topo, make_model,
        lambda m: torch.optim.SGD(m.parameters(), lr=spec.lr, momentum=inner_momentum,
                                  weight_decay=WEIGHT_DECAY),
        wrapper, **kwargs)
    n_params = sum(p[0].numel() for p in vs.stacked_parameters().values())
    factor = 2 if spec.algorithm == "GradientTracking" else 1  # GT also sends its tracker
    period = topo.rounds if topo.rounds else spec.steps
    per_round = _bytes_per_round(vs, min(period, spec.steps), 4 * n_params, factor)
    warmup = max(1, int(WARMUP_FRACTION * spec.steps))

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x), y)

    xs, ys = task["x_train"], task["y_train"]
    curve: list[dict[str, float]] = []
    sent = 0.0
    diverged = False
    t0 = time.perf_counter()
    for s in range(spec.steps):
        for g in vs.optimizer.param_groups:
            g["lr"] = spec.lr * lr_factor(s, spec.steps, warmup)
        b = idx[s]
        losses = vs.step(loss_fn, xs[b], ys[b])
        sent += per_round[s % len(per_round)]
        if not bool(torch.isfinite(losses).all()):
            diverged = True
        if diverged or (s + 1) % eval_every == 0 or s + 1 == spec.steps:
            avg = {k: p.detach().mean(0) for k, p in vs.stacked_parameters().items()}
            point = {"step": s + 1, "mb_sent": sent / 1e6, "loss": float(losses.mean()),
                     "consensus": vs.consensus_distance(),
                     "val": _accuracy(vs.model, avg, task["x_val"], task["y_val"])}
            if spec.stage == "eval":
                point["test"] = _accuracy(vs.model, avg, task["x_test"], task["y_test"])
            curve.append(point)
            if diverged:
                break
    result: dict[str, Any] = {"key": spec.key(), **asdict(spec), "diverged": diverged,
                              "params": n_params, "seconds": time.perf_counter() - t0,
                              "curve": curve}
    final = curve[-1]
    result["val"] = 0.0 if diverged else final["val"]
    if spec.stage == "eval":
        result["test"] = 0.0 if diverged else final["test"]
        if not diverged:  # mean over nodes of each node's own model (test set)
            accs = vs.map(lambda m, x, y: (m(x).argmax(1) == y).double().mean(),
                          task["x_test"].expand(N_NODES, *task["x_test"].shape),
                          task["y_test"].expand(N_NODES, *task["y_test"].shape))
            result["local_test"] = float(accs.mean())
    return result


# ----------------------------------------------------------------------------- the plan


def tune_specs(steps: int, seeds: Sequence[int]) -> list[RunSpec]:
    specs = []
    for alpha in ALPHAS:
        for label, _, _ in TOPOLOGIES:
            for lr in LR_GRID:
                for seed in seeds:
                    specs.append(RunSpec("DSGD", label, alpha, lr, seed, "tune", steps))
    for algo in OTHER_ALGORITHMS:
        for label in ALGORITHM_TOPOLOGIES:
            for lr in lr_grid_for(algo):
                for seed in seeds:
                    specs.append(RunSpec(algo, label, 0.1, lr, seed, "tune", steps))
    specs += [RunSpec("DSGD", SYMMETRIZED_EXP, 0.1, lr, seed, "tune", steps)
              for lr in LR_GRID for seed in seeds]
    return specs


def best_lr(runs: list[dict[str, Any]], algorithm: str, topology: str, alpha: float,
            steps: int) -> tuple[float | None, dict[float, list[float]]]:
    """The grid point with the best mean validation accuracy over the tuning seeds among
    those where no tuning seed diverged (None if every point diverged)."""
    table: dict[float, list[float]] = defaultdict(list)
    bad: set[float] = set()
    for r in runs:
        if (r["stage"] == "tune" and r["algorithm"] == algorithm and r["topology"] == topology
                and r["alpha"] == alpha and r["steps"] == steps
                and r["lr"] in lr_grid_for(algorithm)):
            table[r["lr"]].append(r["val"])
            if r["diverged"]:
                bad.add(r["lr"])
    ok = {lr: float(np.mean(v)) for lr, v in table.items() if lr not in bad}
    return (max(ok, key=ok.get) if ok else None), dict(table)


def eval_specs(runs: list[dict[str, Any]], steps: int, seeds: Sequence[int]) -> list[RunSpec]:
    specs = []
    cells = [("DSGD", label, alpha) for alpha in ALPHAS for label, _, _ in TOPOLOGIES]
    cells += [(a, label, 0.1) for a in OTHER_ALGORITHMS for label in ALGORITHM_TOPOLOGIES]
    cells.append(("DSGD", SYMMETRIZED_EXP, 0.1))
    for algo, label, alpha in cells:
        lr, _ = best_lr(runs, algo, label, alpha, steps)
        if lr is not None:
            specs += [RunSpec(algo, label, alpha, lr, s, "eval", steps) for s in seeds]
    return specs


def load_runs(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def execute(specs: list[RunSpec], path: Path, workers: int) -> list[dict[str, Any]]:
    """Run the specs not yet in ``path`` (appending each result as it finishes)."""
    done = {r["key"] for r in load_runs(path)}
    todo = [s for s in specs if s.key() not in done]
    print(f"[study] {len(specs)} runs planned, {len(specs) - len(todo)} already done, "
          f"{len(todo)} to run on {workers} worker(s)", flush=True)
    if todo:
        t0 = time.perf_counter()
        ctx = mp.get_context("fork")
        with ctx.Pool(workers) as pool, path.open("a") as f:
            for k, r in enumerate(pool.imap_unordered(run_one, todo), 1):
                f.write(json.dumps(r) + "\n")
                f.flush()
                el = time.perf_counter() - t0
                acc = f"test {r['test']:.3f}" if "test" in r else f"val {r['val']:.3f}"
                print(f"[study] {k}/{len(todo)} {r['stage']} {r['algorithm']} {r['topology']} "
                      f"α={r['alpha']:g} lr={r['lr']:g} seed={r['seed']}: {acc}"
                      f"{' DIVERGED' if r['diverged'] else ''} ({r['seconds']:.0f} s; "
                      f"{el / 60:.1f} min elapsed, ~{el / k * (len(todo) - k) / 60:.0f} min left)",
                      flush=True)
    return load_runs(path)


# ----------------------------------------------------------------------------- report


def _paired(a: list[float], b: list[float]) -> dict[str, float]:
    from scipy import stats

    d = np.asarray(a) - np.asarray(b)
    out = {"mean": float(d.mean()), "sd": float(d.std(ddof=1)) if len(d) > 1 else float("nan"),
           "wins": int((d > 0).sum()), "n": len(d)}
    if len(d) > 1 and d.std() > 0:
        out["t"], out["p_t"] = (float(v) for v in stats.ttest_rel(a, b))
        out["p_w"] = float(stats.wilcoxon(a, b).pvalue)
    else:
        out["t"], out["p_t"], out["p_w"] = float("nan"), float("nan"), float("nan")
    return out


def _cell(runs: list[dict[str, Any]], algo: str, label: str, alpha: float,
          steps: int) -> list[dict[str, Any]]:
    """The evaluation runs of a cell at its chosen learning rate, by seed."""
    lr, _ = best_lr(runs, algo, label, alpha, steps)
    return sorted((r for r in runs if r["stage"] == "eval" and r["algorithm"] == algo
                   and r["topology"] == label and r["alpha"] == alpha and r["steps"] == steps
                   and r["lr"] == lr), key=lambda r: r["seed"])


def _plots(runs: list[dict[str, Any]], steps: int, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for alpha in ALPHAS:
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
        for label, _, _ in TOPOLOGIES:
            cell = [r for r in _cell(runs, "DSGD", label, alpha, steps) if not r["diverged"]]
            if not cell:
                continue
            m = min(len(r["curve"]) for r in cell)
            st = np.array([p["step"] for p in cell[0]["curve"][:m]])
            mb = np.array([p["mb_sent"] for p in cell[0]["curve"][:m]])
            acc = np.array([[p["test"] * 100 for p in r["curve"][:m]] for r in cell]).mean(0)
            cd = np.array([[p["consensus"] for p in r["curve"][:m]] for r in cell]).mean(0)
            axes[0].plot(st, acc, label=f"{label} (lr {cell[0]['lr']:g})")
            axes[1].plot(mb, acc, label=label)
            axes[2].semilogy(st, cd, label=label)
        axes[0].set(xlabel="step", ylabel="test accuracy of x̄ (%)", ylim=(40, None))
        axes[1].set(xlabel="MB sent per node", ylabel="test accuracy of x̄ (%)", xscale="log",
                    ylim=(40, None))
        axes[2].set(xlabel="step", ylabel="consensus distance (1/n) Σ‖x_i − x̄‖²")
        axes[0].legend(fontsize=8)
        fig.suptitle(f"DSGD + momentum, 25 nodes, shifted noisy digits, α = {alpha:g} "
                     f"(mean over {len(EVAL_SEEDS)} seeds, lr tuned per topology)")
        fig.tight_layout()
        name = f"topology_study_alpha{alpha:g}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        names.append(name)
    return names


def _fmt_p(p: float) -> str:
    return "–" if not math.isfinite(p) else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


def write_report(runs: list[dict[str, Any]], steps: int, out: Path, meta: dict[str, Any]) -> None:
    lines = [
        "# Topology study in the Base-(k+1) paper's regime (25 nodes, small CNN, tuned lr)",
        "",
        f"Written by `python benchmarks/topology_study.py` on {meta['date']} ({meta['machine']}); "
        f"{meta['runs']} runs in `topology_study_runs.jsonl` (the tables use those at the grid "
        f"points and chosen rates), {meta['wall_min']:.0f} min of compute over "
        f"{meta['workers']} worker process(es). {meta['load']} The load changes only the wall "
        f"time, not the results.",
        "",
        "## Protocol",
        "",
        f"* Task: shifted noisy digits (each 8x8 digit at a random offset in a 12x12 canvas, "
        f"contrast 0.5–1, pixel noise σ = 0.2), originals split 60/20/20 into train / "
        f"validation / test before augmentation (train {len(_task()['y_train'])}, validation "
        f"{len(_task()['y_val'])}, test {len(_task()['y_test'])} images). One centralized CNN "
        f"reaches ~71% test accuracy in 2000 steps of batch 64 (lr 0.05, momentum 0.9).",
        "* Model: 2 strided conv layers (16, 32 channels) + linear, 7,690 parameters; every "
        "node starts "
        "from the same initial model.",
        f"* 25 nodes, per-class Dirichlet split (α = 0.1: one or two dominant classes per node; "
        f"α = 10: nearly IID), batch {BATCH} per node, {steps} steps, SGD momentum {MOMENTUM} "
        f"(heavy ball) with weight decay {WEIGHT_DECAY:g}, linear warm-up over "
        f"{int(WARMUP_FRACTION * 100)}% of the steps then cosine decay to 0.",
        f"* Learning rate: grid {', '.join(f'{v:g}' for v in LR_GRID)} (gradient tracking also "
        f"{', '.join(f'{v:g}' for v in GT_EXTRA_LRS)}), chosen per (algorithm, "
        f"topology, α) by the mean final validation accuracy of the averaged model x̄ over "
        f"tuning seeds {', '.join(map(str, TUNE_SEEDS))}; a grid point where a tuning seed "
        f"diverged is not eligible. The chosen rate is rerun with evaluation seeds "
        f"{', '.join(map(str, EVAL_SEEDS))}, whose *test* accuracy is all that is reported.",
        "* Pairing: an evaluation seed fixes the split, the initial model, every node's batch "
        "order (and EquiDyn's rounds), identical across topologies. Differences are tested with "
        "the paired t-test and the Wilcoxon signed-rank test (two-sided; with 5 pairs the "
        "smallest Wilcoxon p-value possible is 0.0625, so it can never reach 0.05 here; the t-test "
        "is the primary statistic).",
        "* Accuracy = test accuracy of the averaged model x̄ = (1/n) Σ x_i after the last step "
        "(\"local\": mean over nodes of each node's own model). Bytes: mean over nodes of "
        "out-degree × message bytes per round, summed over the steps (gradient tracking sends "
        "parameters and tracker: 2×).",
        "* Simulator: `decomm.vsim.VectorizedSimulation` running the `decomm.optim` wrappers "
        "(DSGD, GradientTracking, QGDSGDm) an MPI run uses.",
        "",
    ]
    summary: list[str] = []
    for alpha in ALPHAS:
        lines += [f"## DSGD + momentum, α = {alpha:g}", "",
                  "| topology | max deg. | MB sent / node | lr (chosen) | test acc. x̄ (%) | "
                  "local (%) | consensus dist. end | diverged |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        rows = []
        for label, name, k in (*TOPOLOGIES, (SYMMETRIZED_EXP, "", 0)):
            cell = _cell(runs, "DSGD", label, alpha, steps)
            if not cell:
                continue
            acc = np.array([r["test"] for r in cell]) * 100
            loc = np.array([r.get("local_test", 0.0) for r in cell]) * 100
            # the symmetrized exponential graph: 5 out- and 5 in-neighbours, all distinct
            deg = make_topology(name, N_NODES, k=k).max_degree() if name else 10
            cons = np.mean([r["curve"][-1]["consensus"] for r in cell])
            rows.append((acc.mean(), f"| {label} | {deg} | {cell[0]['curve'][-1]['mb_sent']:.1f} "
                         f"| {cell[0]['lr']:g} | {acc.mean():.2f} ± {acc.std(ddof=1):.2f} | "
                         f"{loc.mean():.2f} | {cons:.2e} | "
                         f"{sum(r['diverged'] for r in cell)}/{len(cell)} |"))
        lines += [r for _, r in sorted(rows, key=lambda t: -t[0])]
        lines += ["", f"Paired comparisons (test accuracy points, over the {len(EVAL_SEEDS)} "
                  "evaluation seeds):", "",
                  "| a − b | mean Δ | sd Δ | a wins | t | p (t) | p (Wilcoxon) |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for a, b in COMPARISONS:
            ca, cb = _cell(runs, "DSGD", a, alpha, steps), _cell(runs, "DSGD", b, alpha, steps)
            if not ca or not cb or [r["seed"] for r in ca] != [r["seed"] for r in cb]:
                continue
            st = _paired([r["test"] * 100 for r in ca], [r["test"] * 100 for r in cb])
            lines.append(f"| {a} − {b} | {st['mean']:+.2f} | {st['sd']:.2f} | "
                         f"{st['wins']}/{st['n']} | {st['t']:.2f} | {_fmt_p(st['p_t'])} | "
                         f"{_fmt_p(st['p_w'])} |")
            verdict = (("ahead" if st["mean"] > 0 else "behind") if st["p_t"] < 0.05
                       else "no significant difference")
            summary.append(f"α = {alpha:g}: {a} vs {b}: {st['mean']:+.2f} points "
                           f"(p = {_fmt_p(st['p_t'])}, {verdict})")
        lines.append("")
    lines += ["## Gradient tracking and QG-DSGDm at each topology's best stable lr (α = 0.1)", "",
              "| algorithm | topology | lr (chosen) | test acc. x̄ (%) | vs DSGD same topology: "
              "mean Δ (p, t-test) |", "|---|---|---:|---:|---|"]
    for algo in ("DSGD", *OTHER_ALGORITHMS):
        for label in ALGORITHM_TOPOLOGIES:
            cell = _cell(runs, algo, label, 0.1, steps)
            if not cell:
                _, table = best_lr(runs, algo, label, 0.1, steps)
                if table:
                    lines.append(f"| {algo} | {label} | every grid point diverged | – | – |")
                continue
            acc = np.array([r["test"] for r in cell]) * 100
            cmp = "–"
            if algo != "DSGD":
                base = _cell(runs, "DSGD", label, 0.1, steps)
                if base and [r["seed"] for r in base] == [r["seed"] for r in cell]:
                    st = _paired(list(acc), [r["test"] * 100 for r in base])
                    cmp = f"{st['mean']:+.2f} (p = {_fmt_p(st['p_t'])})"
            lines.append(f"| {algo} | {label} | {cell[0]['lr']:g} | {acc.mean():.2f} ± "
                         f"{acc.std(ddof=1):.2f} | {cmp} |")
    lines += ["", "## Learning-rate tuning (mean final validation accuracy of x̄ over the tuning "
              "seeds, %; D = a tuning seed diverged; * = chosen)", ""]
    columns = tuple(sorted({v for a in ALGORITHMS for v in lr_grid_for(a)}))
    header = "| algorithm | α | topology | " + " | ".join(f"lr {v:g}" for v in columns) + " |"
    lines += [header, "|---|---:|---|" + "---:|" * len(columns)]
    for algo in ("DSGD", *OTHER_ALGORITHMS):
        for alpha in ALPHAS:
            for label, _, _ in (*TOPOLOGIES, (SYMMETRIZED_EXP, "", 0)):
                chosen, table = best_lr(runs, algo, label, alpha, steps)
                if not table:
                    continue
                cells = []
                for v in columns:
                    rs = [r for r in runs if r["stage"] == "tune" and r["algorithm"] == algo
                          and r["topology"] == label and r["alpha"] == alpha and r["lr"] == v
                          and r["steps"] == steps]
                    if not rs:
                        cells.append("–")
                        continue
                    mean_val = np.mean([r["val"] for r in rs]) * 100
                    txt = "D" if any(r["diverged"] for r in rs) else f"{mean_val:.1f}"
                    cells.append(txt + ("*" if v == chosen else ""))
                lines.append(f"| {algo} | {alpha:g} | {label} | " + " | ".join(cells) + " |")
    plots = _plots(runs, steps, out)
    lines += ["", "## Curves", ""] + [f"![{p}]({p})" for p in plots]
    lines += ["", "## Summary of the paired tests", ""] + [f"* {s}" for s in summary]
    lines += ["", "## Reading", "", meta.get("reading", "(to be written after the run)"), ""]
    (out / "topology_study.md").write_text("\n".join(lines))
    print(f"[study] wrote {out / 'topology_study.md'} and {', '.join(plots)}", flush=True)


# ----------------------------------------------------------------------------- main


def _load() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv: Sequence[str] | None = None) -> None:
    global LR_GRID, GT_EXTRA_LRS, GT_PLAIN_LRS, TUNE_SEEDS, EVAL_SEEDS
    global TOPOLOGIES, ALGORITHM_TOPOLOGIES
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 60 steps, 2 lrs, 1 tuning and 2 evaluation seeds, 3 "
                        "topologies; writes into --out (use a scratch folder)")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--reading", type=Path, default=None,
                   help="a markdown file whose text becomes the report's Reading section")
    args = p.parse_args(argv)
    if args.quick:
        args.steps = min(args.steps, 60)
        LR_GRID, TUNE_SEEDS, EVAL_SEEDS = (0.05, 0.1), (100,), (0, 1)
        GT_EXTRA_LRS, GT_PLAIN_LRS = (0.025,), (0.2,)
        TOPOLOGIES = tuple(t for t in TOPOLOGIES if t[0] in ("ring", "exp", "Base-2 (k=1)"))
        ALGORITHM_TOPOLOGIES = ("ring", "Base-2 (k=1)")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "topology_study_runs.jsonl"
    load_start, t0 = _load(), time.perf_counter()
    print(f"[study] task: {len(_task()['y_train'])} train images; {args.steps} steps, "
          f"{len(TOPOLOGIES)} topologies, lr grid {LR_GRID}", flush=True)
    runs = load_runs(path)
    if not args.report_only:
        print("[study] stage 1: learning-rate tuning on validation data", flush=True)
        runs = execute(tune_specs(args.steps, TUNE_SEEDS), path, args.workers)
        print("[study] stage 2: evaluation seeds at the chosen learning rates", flush=True)
        runs = execute(eval_specs(runs, args.steps, EVAL_SEEDS), path, args.workers)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.node()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
            "runs": sum(1 for r in runs if r["steps"] == args.steps),
            "wall_min": sum(r["seconds"] for r in runs
                            if r["steps"] == args.steps) / 60 / args.workers,
            "workers": args.workers,
            "load": ("Report rewritten from the run log (--report-only): the load during the "
                     "runs is not recorded." if args.report_only else
                     f"Load average (1, 5, 15 min) at start: {load_start}; at end: {_load()}.")}
    if args.reading is not None:
        meta["reading"] = args.reading.read_text()
    write_report(runs, args.steps, args.out, meta)
    print(f"[study] done in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
