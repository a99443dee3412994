"""Schedule consistency: set_topology compares every rank's schedule at once.

``decomm.set_topology`` allgathers (fingerprint of the topology, start_round) - one
small collective - and every rank raises a DecommError naming the ranks that differ
from rank 0, instead of hanging or mixing with the wrong weights later. For a finite
cycle the fingerprint covers the matrices themselves (size, round count, every round's
sparsity pattern and weights on a 2^-40 grid), not how they were built; for a random
family its kind and parameters (seed included).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import decomm
from decomm import topology as T


def need(n: int) -> None:
    if decomm.size() < n:
        pytest.skip(f"needs {n} ranks")


def value(j: int) -> torch.Tensor:
    return torch.arange(4, dtype=torch.float64) / 8 + j


def check_mixing(topo: T.Topology) -> None:
    """The topology in force really is ``topo``: one round against W @ x."""
    n, r = decomm.size(), decomm.rank()
    got = decomm.neighbor_allreduce(value(r), name="schedule-check")
    W = topo.matrix(decomm.current_round())
    assert torch.allclose(got, sum(W[r, j] * value(j) for j in range(n)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("make", [
    lambda n: T.BaseGraph(n, 2), lambda n: T.EquiDyn(n, seed=7),
    lambda n: T.OnePeerExponentialGraph(n), lambda n: T.RingGraph(n).matrix(0),
])
def test_same_schedule_built_independently_passes(make):
    n = decomm.size()
    topo = make(n)  # every rank builds its own object
    decomm.set_topology(topo, start_round=3)
    assert decomm.current_round() == 3
    check_mixing(decomm.get_topology())


def test_same_matrix_built_three_ways_passes():
    """RingGraph(n), from_matrices of its matrix and networkx's cycle (Metropolis weights,
    diagonal 1 - 2/3, one ulp from RingGraph's 1/3) are one schedule."""
    import networkx as nx

    n, r = decomm.size(), decomm.rank()
    made = [T.RingGraph(n), T.Topology.from_matrices(T.RingGraph(n).matrix(0)),
            T.Topology.from_networkx(nx.cycle_graph(n))][r % 3]
    decomm.set_topology(made)
    check_mixing(decomm.get_topology())


def test_float32_tensor_of_the_ring_is_accepted():
    """The docs' 1/3 ring as a default float32 tensor (rows sum to 1 + 3e-8)."""
    n, r = decomm.size(), decomm.rank()
    W = torch.tensor(T.RingGraph(n).matrix(0), dtype=torch.float32)
    decomm.set_topology(W)
    topo = decomm.get_topology()
    assert topo.matrix(0)[r, r] == float(W[r, r])  # stored as given, in float64
    check_mixing(topo)


def test_one_rank_different_graph_is_named_on_every_rank():
    need(3)
    n, r = decomm.size(), decomm.rank()
    topo = T.RingGraph(n) if r != n - 1 else T.StarGraph(n)  # different for n >= 3
    with pytest.raises(decomm.DecommError) as err:
        decomm.set_topology(topo)
    msg = str(err.value)
    assert f"ranks [{n - 1}]" in msg and "different schedule" in msg and f"rank {r}" in msg


def test_several_ranks_named():
    need(4)
    n, r = decomm.size(), decomm.rank()
    odd = r in (1, 3)
    topo = T.BaseGraph(n, 1) if not odd else T.RingGraph(n)  # 1 round against >= 2
    with pytest.raises(decomm.DecommError, match=r"ranks \[1, 3\]"):
        decomm.set_topology(topo)


def test_tiny_weight_difference_is_detected():
    need(2)
    n, r = decomm.size(), decomm.rank()
    W = T.RingGraph(n).matrix(0) if n > 2 else np.full((2, 2), 0.5)
    if r == 1:  # same graph, weights off by 1e-12 (still row-stochastic)
        W = W.copy()
        W[0, 0] += 1e-12
        W[0, (1 if n > 1 else 0)] -= 1e-12
    with pytest.raises(decomm.DecommError, match=r"ranks \[1\]"):
        decomm.set_topology(W)


def test_different_seed_of_a_random_family_is_detected():
    need(2)
    r = decomm.rank()
    with pytest.raises(decomm.DecommError, match="different schedule"):
        decomm.set_topology(T.EquiDyn(decomm.size(), seed=1 if r == 0 else 2))


def test_different_start_round_is_detected():
    need(2)
    n, r = decomm.size(), decomm.rank()
    with pytest.raises(decomm.DecommError, match="start_round"):
        decomm.set_topology(T.BaseGraph(n, 1), start_round=0 if r else 1)


def test_failed_set_topology_keeps_the_previous_schedule_everywhere():
    need(2)
    n, r = decomm.size(), decomm.rank()
    before = T.RingGraph(n)
    decomm.set_topology(before, start_round=2)
    lazy = T.Topology.from_matrices(0.5 * (np.eye(n) + T.RingGraph(n).matrix(0)))
    with pytest.raises(decomm.DecommError):
        decomm.set_topology(lazy if r else T.FullyConnectedGraph(n))  # differ for n >= 2
    assert decomm.get_topology() is before and decomm.current_round() == 2
    check_mixing(before)  # the job is healthy and every rank still mixes with `before`


def test_round_count_is_part_of_the_schedule():
    need(2)
    n, r = decomm.size(), decomm.rank()
    A = T.RingGraph(n).matrix(0)
    mats = [A, A] if r == 0 else [A, A, A]  # same matrices, different cycle length
    with pytest.raises(decomm.DecommError, match="different schedule"):
        decomm.set_topology(mats)
