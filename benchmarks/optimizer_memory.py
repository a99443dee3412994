"""Memory each decomm.optim wrapper adds over the bare model + inner torch optimizer.

Run (the driver starts one ``mpirun`` job per wrapper and world size, so that the
C++ core's receive-buffer pool starts empty in every measurement)::

    python benchmarks/optimizer_memory.py [--params 1000000] [--np 2,4]

Model: one ``nn.Linear(1000, 1000)`` (P = 1,001,000 float32 parameters, one dtype,
so one flat bucket), batch 16, loss ``mean(out²)``; inner optimizer
``torch.optim.SGD(lr=1e-3, momentum=0.9)`` (``QGDSGDm``: ``momentum=0``, it brings
its own).  Topology: ``decomm.topology.ExponentialGraph(np)`` (in-degree 1 at np=2,
2 at np=4).  Each rank runs, in one process, first the *bare* reference (the model
and the inner optimizer alone, 3 steps), then the *wrapped* run (a fresh model,
inner optimizer and wrapper, 3 steps), and measures three things:

* **held** - the tensors the wrapper object keeps: a walk of its attributes
  (lists, dicts, dataclasses, its communicator, AsyncGossip's RMA windows; not the
  inner optimizer, not modules) collecting every tensor, de-duplicated by storage,
  minus the P·4 bytes of the parameters themselves (which now live in segment 0
  of the flat bucket instead of in the model's own tensors).  Named per
  attribute, so the table says what the memory is.
* **allocated** - the CPU allocator's own record: ``torch.profiler`` with
  ``profile_memory=True`` reports every allocation and free of the c10 CPU
  allocator (Python tensors and the C++ core's ``at::empty`` alike) with its
  byte count.  The net (allocated − freed) from before the model is built to
  after the 3rd step, wrapped minus bare, is the memory the wrapper really keeps
  - including what Python cannot see: the C++ core's pool of receive buffers.
* **peak** - the largest live-bytes excursion of the allocator timeline during
  the 3rd step (steady state), wrapped minus bare: the transient scratch a step
  needs on top of what is held.

All in multiples of P·4 bytes (the size of the model).  Rank 0 prints a table
and writes ``benchmarks/results/optimizer_memory.md``.  Memory is not timing, so
this is meaningful on a loaded machine.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results" / "optimizer_memory.md"
ROOT = Path(__file__).resolve().parent.parent

#: name -> (wrapper class name, wrapper kwargs, inner momentum)
CONFIGS: dict[str, tuple[str, dict[str, Any], float]] = {
    "DSGD (ATC)": ("DSGD", {}, 0.9),
    "DSGD (AWC, combine_first)": ("DSGD", {"combine_first": True}, 0.9),
    "GradientTracking": ("GradientTracking", {}, 0.9),
    "D2": ("D2", {}, 0.9),
    "QGDSGDm": ("QGDSGDm", {"momentum": 0.9}, 0.0),
    "PushSum": ("PushSum", {}, 0.9),
    "PushSum (overlap=1)": ("PushSum", {"overlap": 1}, 0.9),
    "ChocoSGD (TopK 1%)": ("ChocoSGD", {"compression": "TopK(0.01)", "consensus_step": 0.5},
                           0.9),
    "AsyncGossip": ("AsyncGossip", {}, 0.9),
}
STEPS = 3
BATCH = 16


# ----------------------------------------------------------------- measuring
def storage_key(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def held_tensors(root: Any, skip: list[Any]) -> dict[tuple[int, int], str]:
    """Every tensor storage reachable from ``root``'s attributes -> the first path to it.

    ``skip``: objects not to enter (the inner optimizer: its state is the bare run's).
    Modules are not entered either (the model's own tensors are the bare run's).
    """
    found: dict[tuple[int, int], str] = {}
    seen: set[int] = {id(o) for o in skip}
    queue: collections.deque[tuple[Any, str]] = collections.deque([(root, "opt")])  # BFS
    while queue:
        obj, path = queue.popleft()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if obj.device.type == "cpu" and obj.untyped_storage().nbytes() > 0:
                found.setdefault(storage_key(obj), path)
            continue
        if isinstance(obj, (nn.Module, str, bytes, int, float, bool, type(None))):
            continue
        if isinstance(obj, dict):
            queue.extend((v, f"{path}[{k!r}]") for k, v in obj.items())
        elif isinstance(obj, (list, tuple, set)):
            queue.extend((v, f"{path}[{i}]") for i, v in enumerate(obj))
        elif dataclasses.is_dataclass(obj) or hasattr(obj, "__dict__"):
            attrs = vars(obj) if hasattr(obj, "__dict__") else {}
            queue.extend((v, f"{path}.{k}") for k, v in attrs.items())
    return found


def allocator_events(fn) -> list[tuple[int, int]]:
    """Run ``fn`` under the profiler; return (time ns, +/- bytes) of every CPU allocation."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cpu = torch._C._autograd.DeviceType.CPU
    evs = [(e.start_ns(), int(e.nbytes())) for e in prof.profiler.kineto_results.events()
           if e.name() == "[memory]" and e.device_type() == cpu]
    return sorted(evs)


def net_and_peak(events: list[tuple[int, int]]) -> tuple[int, int]:
    live = peak = 0
    for _, b in events:
        live += b
        peak = max(peak, live)
    return live, peak


def make_model(p: int) -> nn.Module:
    width = max(1, round(p ** 0.5))
    torch.manual_seed(0)
    return nn.Linear(width, width)


def one_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()


def build_wrapper(name: str, inner: torch.optim.Optimizer) -> Any:
    import decomm.optim as dopt
    from decomm.compression import TopK

    cls_name, kw, _ = CONFIGS[name]
    kw = dict(kw)
    if kw.get("compression") == "TopK(0.01)":
        kw["compression"] = TopK(0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # D2's topology advice: not under test
        return getattr(dopt, cls_name)(inner, **kw)


def measure(name: str, p: int) -> dict[str, Any]:
    """One rank's measurement of one wrapper (collective: all ranks run it)."""
    import decomm
    from decomm import win

    momentum = CONFIGS[name][2]
    x = torch.randn(BATCH, make_model(p).in_features, generator=torch.Generator().manual_seed(1))
    out: dict[str, Any] = {}

    def run(wrapped: bool) -> tuple[int, int, dict[tuple[int, int], str], int]:
        box: dict[str, Any] = {}

        def setup_and_warm() -> None:
            model = make_model(p)
            inner = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=momentum)
            opt = build_wrapper(name, inner) if wrapped else inner
            for _ in range(STEPS - 1):
                one_step(model, opt, x)
            box.update(model=model, opt=opt, inner=inner)

        gc.collect()
        net_a, _ = net_and_peak(allocator_events(setup_and_warm))
        net_b, peak = net_and_peak(allocator_events(
            lambda: one_step(box["model"], box["opt"], x)))
        held: dict[tuple[int, int], str] = {}
        if wrapped:
            opt = box["opt"]
            roots: list[tuple[Any, str]] = [(opt, "")]
            if hasattr(opt, "window_names"):
                roots += [(win._windows[n], "window ") for n in opt.window_names]
            for r, label in roots:
                for k, v in held_tensors(r, [box["inner"]]).items():
                    path = re.sub(r"\[\d{6,}\]", "[id]", v).removeprefix("opt.")
                    held.setdefault(k, label + path)
            # the inner optimizer is skipped as a whole; its state is the bare run's
            params = {storage_key(q) for q in box["model"].parameters()}
            nparam = sum(q.numel() * q.element_size() for q in box["model"].parameters())
            out["param_storage_shared"] = bool(params & set(held))
            if hasattr(opt, "close"):
                decomm.barrier()
                opt.close()
        else:
            nparam = 0
        box.clear()
        gc.collect()
        return net_a + net_b, peak, held, nparam

    bare_net, bare_peak, _, _ = run(False)
    decomm.barrier()
    net, peak, held, nparam = run(True)
    unit = 4 * p
    by_path: dict[str, int] = {}
    for (_, nbytes), path in held.items():
        by_path[path] = by_path.get(path, 0) + nbytes
    out.update(
        name=name, P=p, size=decomm.size(), unit=unit,
        held=(sum(by_path.values()) - nparam) / unit,
        held_by=[(path, nb / unit) for path, nb in sorted(by_path.items())],
        allocated=(net - bare_net) / unit,
        peak=(peak - bare_peak) / unit,
        bare_allocated=bare_net / unit,
    )
    return out


def worker(names: list[str], p: int, path: str) -> None:
    import decomm

    torch.set_num_threads(1)
    decomm.init()
    decomm.set_topology(decomm.topology.ExponentialGraph(decomm.size()))
    rows = []
    for name in names:
        if decomm.rank() == 0:
            print(f"  [np={decomm.size()}] {name} ...", flush=True)
        rows.append(measure(name, p))
        decomm.barrier()
    if decomm.rank() == 0:
        Path(path).write_text(json.dumps(rows))
    decomm.shutdown()


# -------------------------------------------------------------------- driver
def run_job(names: list[str], p: int, np_: int) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        dst = os.path.join(tmp, "rows.json")
        mpirun = str(Path(sys.executable).with_name("mpirun"))
        cmd = [mpirun, "--oversubscribe", "-np", str(np_), sys.executable, __file__,
               "--worker", json.dumps(names), "--params", str(p), "--out", dst]
        env = dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1",
                   OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONPATH=str(ROOT))
        subprocess.run(cmd, check=True, env=env, timeout=600)
        return json.loads(Path(dst).read_text())


def fmt(v: float) -> str:
    return f"{v:.2f}"


def write_markdown(rows: dict[int, dict[str, dict[str, Any]]], p: int) -> str:
    sizes = sorted(rows)
    lines = [
        "# Memory each optimizer wrapper adds",
        "",
        "Written by `benchmarks/optimizer_memory.py` (see its docstring for the method).",
        f"Model: one `nn.Linear` with P = {p:,} float32 parameters (P·4 = "
        f"{4 * p / 2**20:.2f} MiB), inner `torch.optim.SGD(momentum=0.9)` "
        "(QGDSGDm: momentum 0, it keeps its own), topology `ExponentialGraph(np)` "
        "(in-degree 1 at np=2, 2 at np=4), 3 steps. All numbers are multiples of P·4 bytes, "
        "over the bare model + inner optimizer (which hold params P, grads P, momentum P).",
        "",
        "* **held**: tensors reachable from the wrapper's attributes (de-duplicated by "
        "storage), minus the parameters themselves (they move into the flat bucket).",
        "* **allocated npN**: net bytes the c10 CPU allocator handed out (torch.profiler, "
        "`profile_memory=True`) from building the model to after step 3, wrapped minus "
        "bare, at N ranks. It includes what Python cannot see: the C++ core's pool of "
        "receive buffers.",
        "* **peak npN**: extra transient live bytes during step 3 (steady state) over the "
        "bare step.",
        "",
    ]
    head = "| wrapper | " + " | ".join(
        f"held np{s} | allocated np{s} | peak np{s}" for s in sizes) + \
        f" | held by, np{sizes[0]} (× P·4) |"
    lines += [head, "|" + "---|" * (2 + 3 * len(sizes))]
    names = list(rows[sizes[0]])
    for name in names:
        r0 = rows[sizes[0]][name]
        cells = []
        for s in sizes:
            r = rows[s].get(name)
            cells += [fmt(r["held"]), fmt(r["allocated"]), fmt(r["peak"])] if r else ["-"] * 3
        parts = ", ".join(f"`{path}` {fmt(v)}"
                          for path, v in r0["held_by"] if v >= 0.005)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {parts} |")
    lines += [
        "",
        "Notes",
        "",
        "* The bucket `_buckets[0].buffer` counts its full size (segments × P, + 1 "
        "element for push-sum's weight); the parameters' own P is subtracted once in "
        "*held*. Where *allocated* exceeds *held*, the difference is memory outside the "
        "wrapper's Python attributes.",
        "* **C++ receive-buffer pool** (`csrc/mpi_backend.cpp`, `BufferPool`): every "
        "`neighbor_allreduce` borrows one receive buffer of the message size per "
        "in-neighbour, plus one sender-scaled copy per out-neighbour whose weight is not "
        "1 (push-sum's `dst_weights`); when the op finishes they go back to a process-"
        "wide pool keyed by byte size, which holds at most 1 GiB and evicts the least "
        "recently returned buffers to make room. So after the first exchange a rank keeps "
        "about (in-degree + scaled out-neighbours) × message bytes, per distinct message "
        "size and per exchange in flight at once (PushSum overlap τ: τ + 1) - the growth "
        "of *allocated* from np2 to np4 (one more in-neighbour) shows it. Messages ≤ 64 "
        "KiB use the same pool (as [header | payload] staging buffers, sent ones too).",
        "* Module buffers (`buffers=model`) add one flat copy of the floating-point "
        "buffers per dtype (BatchNorm: two vectors per layer, negligible next to P) and "
        "the same pool buffers for their message size.",
        "* AsyncGossip's window (`decomm.win`, reached through `window_names`) is MPI "
        "memory (`MPI_Win_allocate`: one slot for the rank itself and one per "
        "in-neighbour, hence held 2 at np2 and 3 at np4): it is in *held* but not in "
        "*allocated*, which counts c10 allocations only. Open MPI's internal buffers "
        "are in neither.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=int, default=1_000_000)
    ap.add_argument("--np", default="2,4", help="world sizes (comma separated)")
    ap.add_argument("--only", default=None, help="comma separated wrapper names (default all)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        worker(json.loads(args.worker), args.params, args.out)
        return
    width = max(1, round(args.params ** 0.5))
    p = width * width + width
    names = list(CONFIGS) if args.only is None else args.only.split(",")
    rows: dict[int, dict[str, dict[str, Any]]] = {}
    for np_ in (int(s) for s in args.np.split(",")):
        rows[np_] = {}
        for name in names:  # one job per wrapper: the C++ pool starts empty each time
            print(f"np={np_}: {name}", flush=True)
            (row,) = run_job([name], p, np_)
            rows[np_][name] = row
            print(f"  held {fmt(row['held'])}  allocated {fmt(row['allocated'])}  "
                  f"peak {fmt(row['peak'])}  (x P*4)", flush=True)
    md = write_markdown(rows, p)
    print(md)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(md)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
