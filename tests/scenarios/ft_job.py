"""A fault-tolerant job in which ranks die: run under ``decomm-run --fault-tolerant``.

``python ft_job.py MODE [VICTIMS] [DEATH]`` - VICTIMS: comma-separated launch ranks that
die (default 1); DEATH: kill (SIGKILL), segv, exit0 (os._exit(0)), raise (uncaught
exception), sysexit (sys.exit(0) mid-training). Every survivor prints one ``RESULT {json}``
line that tests/unit/test_fault_tolerance.py checks against the closed form over the
survivors.

Problem of the optimizer modes: node i (launch rank) owns f_i(x) = ||x - b_i||^2 / 2 with
b_i = (i, 2i, -i, 1), so the survivors' optimum is the mean of their b_i. Gradient
tracking converges to it exactly; for DSGD on these quadratics the survivors' *average*
iterate follows x_bar <- x_bar - lr (x_bar - b_bar) exactly (W doubly stochastic), so it
converges to the same point.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import torch

import decomm
from decomm.optim import DSGD, GradientTracking, PushSum

MODE = sys.argv[1]
VICTIMS = [int(v) for v in (sys.argv[2] if len(sys.argv) > 2 else "1").split(",")]
DEATH = sys.argv[3] if len(sys.argv) > 3 else "kill"
AT = 20  # the step (or round) at which the victims die


def die() -> None:
    if DEATH == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif DEATH == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif DEATH == "exit0":
        os._exit(0)
    elif DEATH == "raise":
        raise RuntimeError(f"rank {decomm.launch_rank()} fails on purpose")
    elif DEATH == "sysexit":
        sys.exit(0)
    raise SystemExit(f"unknown death {DEATH}")


def b_of(launch: int) -> torch.Tensor:
    return torch.tensor([launch, 2.0 * launch, -launch, 1.0], dtype=torch.float64)


def report(**fields) -> None:
    fields.update(launch=decomm.launch_rank(), rank=decomm.rank(), size=decomm.size(),
                  failed=decomm.failed_ranks())
    print("RESULT " + json.dumps(fields), flush=True)


def raw(op: str) -> None:
    """Raw ops: x_i = launch rank; each round's result against W(t) @ x on the survivors."""
    if MODE == "raw_callable":  # the survivors' graph comes from the user's callable
        decomm.set_topology(lambda n: decomm.topology.FullyConnectedGraph(n))
    else:
        decomm.set_topology(decomm.topology.RingGraph(decomm.size()))
    x = torch.full((1000,), float(decomm.launch_rank()), dtype=torch.float64)
    errors, recoveries, times = [], 0, []
    while decomm.current_round() < 40:
        if decomm.current_round() == AT and decomm.launch_rank() in VICTIMS:
            die()
        try:
            if op == "nonblocking":
                h = decomm.neighbor_allreduce_nonblocking(x, name="x")
                time.sleep(0.01)  # the victim dies while the handle is in flight
                y = h.wait()
            elif op == "allreduce":
                y = decomm.allreduce(x, name="x")
            else:
                y = decomm.neighbor_allreduce(x, name="x")
        except decomm.PeerFailureError as e:
            t0 = time.monotonic()
            named = list(e.failed_ranks)
            if MODE == "raw_die_in_recovery" and decomm.launch_rank() == 3:
                os.kill(os.getpid(), signal.SIGKILL)  # a second failure, during recovery
            decomm.recover()
            times.append(time.monotonic() - t0)
            recoveries += 1
            errors.append(named)
            continue
        vals = torch.tensor([float(decomm.launch_rank(k)) for k in range(decomm.size())],
                            dtype=torch.float64)
        if op == "allreduce":
            exp = float(vals.mean())
        else:
            w = torch.as_tensor(decomm.get_topology().matrix(decomm.current_round()))
            exp = float(w[decomm.rank()] @ vals)
        assert abs(float(y[0]) - exp) < 1e-12, (float(y[0]), exp)
        decomm.advance_round()
    report(named=errors, recoveries=recoveries, recover_s=times,
           topology=decomm.get_topology().name)


def expected(op: str) -> float:
    """The closed form of this round's op on the current survivors (x_r = launch rank)."""
    vals = torch.tensor([float(decomm.launch_rank(k)) for k in range(decomm.size())],
                        dtype=torch.float64)
    if op == "hier":
        h = decomm.hierarchical
        wm = torch.as_tensor(h.get_machine_topology().matrix(decomm.current_round()))
        of = torch.tensor([h.machine_of(k) for k in range(decomm.size())])
        means = torch.stack([vals[of == m].mean() for m in range(h.machine_size())])
        return float(wm[h.machine_rank()] @ means)
    w = torch.as_tensor(decomm.get_topology().matrix(decomm.current_round()))
    return float(w[decomm.rank()] @ vals)


def windows_and_machines(op: str) -> None:
    """Windows (mixed with win_update after every rank's win_put) or the hierarchical op;
    a barrier each round is the two-sided call that notices a failure (RMA cannot)."""
    decomm.set_topology(decomm.topology.RingGraph(decomm.size()))
    x = torch.full((16,), float(decomm.launch_rank()), dtype=torch.float64)
    if op == "win":
        decomm.win_create(x, "w")
    else:
        decomm.hierarchical.init_machines(local_size=2)
    recoveries = 0
    while decomm.current_round() < 30:
        if decomm.current_round() == AT and decomm.launch_rank() in VICTIMS:
            die()
        try:
            if op == "win":
                x.fill_(float(decomm.launch_rank()))
                decomm.win_put(x, "w")
                decomm.barrier()
                y = decomm.win_update("w", clone=True)
                decomm.barrier()
            else:
                y = decomm.hierarchical_neighbor_allreduce(x, name="h")
        except decomm.PeerFailureError:
            decomm.recover()
            recoveries += 1
            continue
        want = expected(op)
        assert abs(float(y[0]) - want) < 1e-12, (float(y[0]), want)
        decomm.advance_round()
    extra = {"machines": decomm.hierarchical.machine_size()} if op == "hier" else {}
    report(recoveries=recoveries, **extra)


def optimizer(kind: str) -> None:
    steps, lr = 400, 0.2
    decomm.set_topology(decomm.topology.BaseGraph(decomm.size(), 1) if kind == "gt"
                        else decomm.topology.ExponentialGraph(decomm.size()))
    x = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt: decomm.optim.DecentralizedOptimizer
    if kind == "gt":
        opt = GradientTracking(torch.optim.SGD([x], lr=lr))
    elif kind == "pushsum":
        opt = PushSum(torch.optim.SGD([x], lr=0.05))
    else:
        opt = DSGD(torch.optim.SGD([x], lr=lr), combine_first=(kind == "awc"))
    b = b_of(decomm.launch_rank())
    for step in range(steps):
        if step == AT and decomm.launch_rank() in VICTIMS:
            die()
        opt.zero_grad()
        (0.5 * (x - b).square().sum()).backward()
        opt.step()
    rec = decomm.fault.last_recovery()
    mean = decomm.allreduce(x.detach().clone(), name="mean")
    w = opt.push_weights[0] if kind == "pushsum" else 0.0
    w_sum = decomm.allreduce(torch.tensor([w], dtype=torch.float64), average=False,
                             name="w").item()
    report(x=x.detach().tolist(), mean=mean.tolist(), steps=opt.steps, push_weight_sum=w_sum,
           recover_s=None if rec is None else rec.resumed_s - rec.detected_s,
           topology=decomm.get_topology().name)


def main() -> None:
    decomm.init(timeout=60)
    if os.environ.get("DECOMM_FAULT_TOLERANT") != "1":
        raise SystemExit("run me with decomm-run --fault-tolerant")
    if MODE in ("win", "hier"):
        windows_and_machines(MODE)
    elif MODE.startswith("raw"):
        raw({"raw_nonblocking": "nonblocking", "raw_allreduce": "allreduce"}.get(MODE, "nar"))
    else:
        optimizer(MODE)


if __name__ == "__main__":
    main()
