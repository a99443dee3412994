"""One MPI job spread over several hosts; run on every rank by tests/unit/test_multihost.py.

Usage: ``multihost_job.py HOSTS`` where HOSTS is the number of distinct hosts expected.

Every expected value is computed here independently of decomm (host names through
mpi4py, closed forms in float64 numpy), and any failed check raises: decomm's abort
hook then ends the whole job non-zero. Each rank prints one line
``multihost ok rank=R host=NAME node_rank=L machine=M`` when all checks hold, and
rank 0 prints ``multihost bytes_sent=...`` (decomm's own counter).

Checks:

* the ranks really sit on HOSTS hosts: distinct host names, and
  ``decomm.local_rank()/local_size()`` (shared-memory nodes) equal the position of
  the rank among the ranks with the same host name;
* ``neighbor_allreduce`` over every round of ``BaseGraph(n, k=1)`` gives ``W(t) @ x``,
  and after the whole cycle every rank holds the exact mean (finite-time consensus);
* a 2 MiB float64 ``allreduce`` (mean and sum), a ``broadcast`` from the last rank
  (on the last host) and an ``allgather`` of uneven blocks equal their closed forms;
* ``decomm.hierarchical`` with the real grouping (shared-memory nodes = hosts, no
  ``DECOMM_LOCAL_SIZE``): ``machine_size() == HOSTS``, machine ids, ``machine_local_rank``
  / ``machine_local_size``, and ``hierarchical_neighbor_allreduce`` equal to
  ``sum_m' Wm[m, m'] * mean(x_s, s in machine m')`` for the default machine topology
  and for a non-symmetric row-stochastic one.
"""

from __future__ import annotations

import os
import socket
import sys

import numpy as np
import torch

import decomm
from decomm import hierarchical as H
from decomm import topology as T

#: float64 elements of the large allreduce: 2 MiB per rank.
BIG = 2 * 1024 * 1024 // 8


def value(r: int, numel: int) -> np.ndarray:
    """Rank r's input: distinct per rank and per element, exactly representable."""
    return r * 1.5 + (np.arange(numel) % 13) / 8.0


def check(got: torch.Tensor, want: np.ndarray, what: str, atol: float = 1e-12) -> None:
    g = got.double().numpy()
    if g.shape != want.shape or not np.allclose(g, want, rtol=0, atol=atol):
        err = np.abs(g - want).max() if g.shape == want.shape else "shape"
        raise AssertionError(f"rank {decomm.rank()} on {socket.gethostname()}: {what}: got "
                             f"{g.ravel()[:6]} (shape {g.shape}), want {want.ravel()[:6]} "
                             f"(shape {want.shape}), max error {err}")


def main(hosts_expected: int) -> None:
    if "DECOMM_LOCAL_SIZE" in os.environ:
        raise SystemExit("multihost_job: DECOMM_LOCAL_SIZE must be unset (real grouping)")
    decomm.init()
    from mpi4py import MPI

    n, r = decomm.size(), decomm.rank()
    host = socket.gethostname()
    names = MPI.COMM_WORLD.allgather(host)
    order = list(dict.fromkeys(names))  # hosts in order of their lowest rank
    machine_of = [order.index(h) for h in names]
    members = [[s for s in range(n) if names[s] == h] for h in order]
    node_rank = members[machine_of[r]].index(r)
    assert len(order) == hosts_expected, f"ranks on hosts {names}, expected {hosts_expected}"
    assert decomm.local_size() == len(members[machine_of[r]]), (
        f"rank {r} on {host}: local_size {decomm.local_size()} but the host runs ranks "
        f"{members[machine_of[r]]} of {names}")
    assert decomm.local_rank() == node_rank, (r, host, decomm.local_rank(), node_rank)

    # -- neighbor_allreduce over one Base-(k+1) cycle: W(t) @ x, then the exact mean
    numel = 7
    xs = np.stack([value(s, numel) for s in range(n)])
    topo = T.BaseGraph(n, k=1)
    decomm.set_topology(topo)
    x = torch.from_numpy(xs[r].copy())
    state = xs.copy()
    for t in range(topo.rounds):
        assert decomm.current_round() == t
        x = decomm.neighbor_allreduce(x, name="mh.nar")
        state = topo.matrix(t) @ state
        check(x, state[r], f"neighbor_allreduce round {t}")
        decomm.advance_round()
    check(x, xs.mean(axis=0), "neighbor_allreduce after a Base-(k+1) cycle (exact mean)")

    # -- collectives; the 2 MiB allreduce must cross the host boundary in both directions
    big = np.stack([value(s, BIG) for s in range(n)])
    check(decomm.allreduce(torch.from_numpy(big[r].copy()), name="mh.mean"),
          big.mean(axis=0), "allreduce(average=True) of 2 MiB")
    check(decomm.allreduce(torch.from_numpy(big[r].copy()), average=False, name="mh.sum"),
          big.sum(axis=0), "allreduce(average=False) of 2 MiB")
    root = n - 1  # on the last host
    check(decomm.broadcast(torch.from_numpy(value(r, 5)), root, name="mh.bcast"),
          value(root, 5), f"broadcast from rank {root}")
    blocks = [np.full((s + 1, 3), float(s)) for s in range(n)]  # uneven first dimension
    check(decomm.allgather(torch.from_numpy(blocks[r]), name="mh.gather"),
          np.concatenate(blocks), "allgather of uneven blocks")

    # -- hierarchical averaging with the real machines (= hosts)
    H.init_machines()
    assert H.machine_size() == hosts_expected, (H.machine_size(), names)
    assert H.machine_rank() == machine_of[r], (r, H.machine_rank(), machine_of)
    assert [H.machine_of(s) for s in range(n)] == machine_of, machine_of
    assert H.machine_local_rank() == node_rank, (r, H.machine_local_rank(), node_rank)
    assert H.machine_local_size() == len(members[machine_of[r]])
    shape = (3, 4)
    hx = np.stack([value(s, 12).reshape(shape) for s in range(n)])
    means = np.stack([hx[m].mean(axis=0) for m in members])
    M = len(order)
    decomm.set_round(0)
    got = H.hierarchical_neighbor_allreduce(torch.from_numpy(hx[r].copy()), name="mh.hier")
    want = np.tensordot(H.get_machine_topology().matrix(0)[machine_of[r]], means, axes=1)
    check(got, want, "hierarchical_neighbor_allreduce, default machine topology")
    Wm = np.full((M, M), 0.1 / max(M - 1, 1)) + np.diag(np.full(M, 0.9 - 0.1 / max(M - 1, 1)))
    Wm[0] = np.linspace(1.0, 2.0, M) / np.linspace(1.0, 2.0, M).sum()  # not symmetric
    H.set_machine_topology(Wm)
    got = H.hierarchical_neighbor_allreduce(torch.from_numpy(hx[r].copy()), name="mh.hier2")
    want = np.tensordot(Wm[machine_of[r]], means, axes=1)
    check(got, want, "hierarchical_neighbor_allreduce, non-symmetric machine matrix")

    decomm.barrier()
    print(f"multihost ok rank={r} host={host} node_rank={node_rank} machine={machine_of[r]}",
          flush=True)
    if r == 0:
        print(f"multihost bytes_sent={decomm.stats()['bytes_sent']}", flush=True)
    decomm.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]))
