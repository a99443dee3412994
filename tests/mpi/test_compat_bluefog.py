"""decomm.compat.bluefog under mpirun: the BlueFog behaviours its own suite does not pin.

Closed forms: rank j holds ``x_j = value(j)``; every expected result is recomputed
here from the graph with numpy (not from the compat layer's helpers).
"""

from __future__ import annotations

import time

import networkx as nx
import pytest
import torch

import decomm
import decomm.compat.bluefog as bf


def value(j: int) -> torch.Tensor:
    return torch.arange(5, dtype=torch.float64) / 4 + j


def expected_mix(self_w: dict[int, float], w: dict[tuple[int, int], float], r: int
                 ) -> torch.Tensor:
    """sum over j of weight(j -> r) * value(j), plus self_w[r] * value(r)."""
    out = self_w[r] * value(r)
    for (j, i), wt in w.items():
        if i == r and j != r:
            out = out + wt * value(j)
    return out


@pytest.fixture(autouse=True)
def _bf():
    bf.init()
    yield
    if bf.get_current_created_window_names():
        bf.win_free()
    bf.turn_off_win_ops_with_associated_p()


def test_unweighted_01_graph_averages_uniformly_like_bluefog():
    # A 0/1 adjacency with no weights at all: decomm's own set_topology refuses it (not a
    # mixing matrix), BlueFog averages uniformly over self and in-neighbours.
    n, r = bf.size(), bf.rank()
    G = nx.DiGraph()
    G.add_nodes_from(range(n))
    for i in range(n):
        for d in (1, 3):
            if (i + d) % n != i:
                G.add_edge(i, (i + d) % n)
    with pytest.raises(ValueError):
        decomm.topology.Topology.from_networkx(G)
    assert bf.set_topology(G)
    ins = sorted({(r - d) % n for d in (1, 3)} - {r})
    assert bf.in_neighbor_ranks() == ins
    want = (value(r) + sum((value(j) for j in ins), torch.zeros(5, dtype=torch.float64))) \
        / (len(ins) + 1)
    got = bf.neighbor_allreduce(value(r), name="uniform01")
    assert torch.allclose(got, want, rtol=0, atol=1e-12)


def test_weighted_graph_uses_edge_weights_even_if_not_stochastic():
    n, r = bf.size(), bf.rank()
    G = nx.DiGraph()
    G.add_nodes_from(range(n))
    w = {}
    for i in range(n):
        G.add_edge(i, i, weight=0.5)
        j = (i + 1) % n
        if j != i:
            w[(i, j)] = 0.1 * (i + 1)
            G.add_edge(i, j, weight=w[(i, j)])
    assert bf.set_topology(G, is_weighted=True)
    assert bf.is_topo_weighted()
    got = bf.neighbor_allreduce(value(r), name="weighted")
    assert torch.allclose(got, expected_mix({i: 0.5 for i in range(n)}, w, r), rtol=0,
                          atol=1e-12)
    # the window ops take the same default weights
    x = value(r).clone()
    assert bf.win_create(x, "wt")
    bf.win_put(x, "wt")
    bf.barrier()
    out = bf.win_update("wt", clone=True)
    assert torch.allclose(out, expected_mix({i: 0.5 for i in range(n)}, w, r), rtol=0,
                          atol=1e-12)


@pytest.mark.skipif("decomm.size() < 2")
def test_mismatched_per_call_graph_raises_value_error_at_once():
    n, r = bf.size(), bf.rank()
    t0 = time.time()
    with pytest.raises(ValueError, match="topology check"):
        bf.neighbor_allreduce(value(r), self_weight=0.5, src_weights={(r - 1) % n: 0.5},
                              dst_weights=[(r + 2) % n], name="mismatch")
    with pytest.raises(ValueError, match="topology check"):
        bf.neighbor_allgather(value(r), src_ranks=[(r - 1) % n], dst_ranks=[(r + 2) % n],
                              name="mismatch_ag")
    # decomm's timeout here is 60 s: the check answered without waiting for a message
    assert time.time() - t0 < 20
    # the consistent graph of the same shape goes through
    got = bf.neighbor_allreduce(value(r), self_weight=0.5, src_weights={(r - 1) % n: 0.5},
                                dst_weights=[(r + 1) % n], name="match")
    assert torch.allclose(got, 0.5 * value(r) + 0.5 * value((r - 1) % n), rtol=0, atol=1e-12)


def test_int_handles_poll_wait_and_stale_handle():
    n, r = bf.size(), bf.rank()
    h = bf.allreduce_nonblocking(value(r), name="h")
    assert isinstance(h, int)
    deadline = time.time() + 30
    while not bf.poll(h):
        assert time.time() < deadline
        time.sleep(0.001)
    got = bf.wait(h)
    want = sum((value(j) for j in range(n)), torch.zeros(5, dtype=torch.float64)) / n
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="handle"):
        bf.synchronize(h)
    h2 = bf.broadcast_nonblocking_(value(r), root_rank=0, name="hb")
    assert torch.equal(bf.synchronize(h2), value(0))


def test_error_paths_name_the_argument():
    n, r = bf.size(), bf.rank()
    with pytest.raises(ValueError, match="same time"):
        bf.neighbor_allreduce(value(r), self_weight=0.5)
    with pytest.raises(ValueError, match="unique"):
        bf.neighbor_allreduce(value(r), self_weight=0.5, src_weights={}, dst_weights=[0, 0])
    with pytest.raises(ValueError, match="same time"):
        bf.neighbor_allgather(value(r), src_ranks=[])
    with pytest.raises(TypeError, match="DiGraph"):
        bf.set_topology(nx.Graph())
    with pytest.raises(TypeError, match="number of nodes"):
        bf.set_topology(nx.complete_graph(n + 1, create_using=nx.DiGraph))
    with pytest.raises(ValueError, match="in-neighbor"):
        bf.neighbor_allreduce(value(r), self_weight=0.5, src_weights={r: 0.5})
    assert bf.win_create(value(r).clone(), "e")
    with pytest.raises(ValueError, match="in-neighbor"):
        bf.win_update("e", self_weight=0.5, neighbor_weights={r: 0.5})
    with pytest.raises(ValueError, match="not found"):
        bf.get_win_version("nope")
    assert bf.win_wait(12345) is False  # BlueFog: warning and False


def test_window_versions_count_writes_since_last_read():
    r = bf.rank()
    ins = bf.in_neighbor_ranks()
    x = value(r).clone()
    assert bf.win_create(x, "v")
    assert bf.get_win_version("v") == {j: 0 for j in ins}
    bf.barrier()  # every rank has read its fresh versions before anyone writes
    bf.win_put(x, "v")
    bf.win_accumulate(x, "v")
    bf.barrier()
    assert bf.get_win_version("v") == {j: 2 for j in ins}
    bf.win_update("v")
    assert bf.get_win_version("v") == {j: 0 for j in ins}
    bf.barrier()
    bf.win_get("v")
    assert bf.get_win_version("v") == {j: 1 for j in ins}


def test_set_topology_is_refused_while_windows_exist_and_names_are_unique():
    n, r = bf.size(), bf.rank()
    assert bf.win_create(value(r).clone(), "t")
    assert bf.win_create(value(r).clone(), "t") is False
    lonely = nx.DiGraph()  # no edges: differs from the exponential graph for every n
    lonely.add_nodes_from(range(n))
    assert bf.set_topology(lonely) is False
    assert bf.IsTopologyEquivalent(bf.load_topology(), bf.ExponentialGraph(n))
    assert bf.win_free()
    assert bf.set_topology(lonely)
    assert bf.IsTopologyEquivalent(bf.load_topology(), lonely)
    assert bf.in_neighbor_ranks() == [] and bf.out_neighbor_ranks() == []
    assert torch.equal(bf.neighbor_allreduce(value(r), name="alone"), value(r))


@pytest.mark.skipif("decomm.size() < 2")
def test_win_mutex_excludes_a_remote_holder():
    r = bf.rank()
    assert bf.win_create(value(r).clone(), "m")
    if r == 0:
        with bf.win_mutex("m", for_self=True):
            bf.barrier()
            time.sleep(0.5)
        bf.barrier()
    else:
        bf.barrier()
        t0 = time.time()
        with bf.win_mutex("m", ranks=[0]):
            waited = time.time() - t0
        bf.barrier()
        assert waited > 0.4


def test_associated_p_follows_push_sum_accumulate():
    # Every rank accumulates x_j / (outdeg_j + 1) into its out-neighbours and keeps the
    # same share (self_weight); after a collect x_i and p_i are the push-sum sums.
    n, r = bf.size(), bf.rank()
    bf.set_topology(bf.RingGraph(n))
    G = bf.load_topology()
    outs = {j: sorted(set(G.successors(j)) - {j}) for j in range(n)}
    bf.turn_on_win_ops_with_associated_p()
    x = value(r).clone()
    assert bf.win_create(x, "p", zero_init=True)
    share = 1.0 / (len(outs[r]) + 1)
    bf.win_accumulate(x, "p", self_weight=share, dst_weights={j: share for j in outs[r]})
    bf.barrier()
    bf.win_update_then_collect("p")
    senders = [j for j in range(n) if r in outs[j]]
    want_p = share + sum(1.0 / (len(outs[j]) + 1) for j in senders)
    want_x = share * value(r) + sum((value(j) / (len(outs[j]) + 1) for j in senders),
                                    torch.zeros(5, dtype=torch.float64))
    assert abs(bf.win_associated_p("p") - want_p) < 1e-12
    assert torch.allclose(x, want_x, rtol=0, atol=1e-12)


@pytest.mark.skipif("decomm.size() % 2 == 1")
def test_pair_gossip_mixes_with_the_partner():
    r = bf.rank()
    partner = r ^ 1
    got = bf.pair_gossip(value(r), partner, name="pg")
    assert torch.allclose(got, 0.5 * (value(r) + value(partner)), rtol=0, atol=1e-12)
    got = bf.pair_gossip(value(r), partner, self_weight=0.25, pair_weight=0.75, name="pgw")
    assert torch.allclose(got, 0.25 * value(r) + 0.75 * value(partner), rtol=0, atol=1e-12)


def test_parameters_and_optimizer_state_follow_the_root():
    n, r = bf.size(), bf.rank()
    torch.manual_seed(100 + r)  # every rank starts from different weights
    model = torch.nn.Linear(3, 2)
    bf.broadcast_parameters(list(model.parameters()), root_rank=0)
    mine = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    table = bf.allgather(mine.reshape(1, -1), name="params")
    assert all(torch.equal(table[j], table[0]) for j in range(n))
    opt = torch.optim.Adam(model.parameters(), lr=0.1 * (r + 1), betas=(0.9, 0.99 - 0.01 * r))
    for p in model.parameters():
        p.grad = torch.full_like(p, float(r + 1))
    opt.step()
    bf.broadcast_optimizer_state(opt, root_rank=0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    assert opt.param_groups[0]["betas"] == pytest.approx((0.9, 0.99))
    state = torch.cat([opt.state[p]["exp_avg"].reshape(-1) for p in model.parameters()])
    # Adam's first moment after one step on gradient g = r + 1: (1 - beta1) * g, root's g = 1
    assert torch.allclose(state, torch.full_like(state, 0.1 * 1.0), rtol=0, atol=1e-7)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(r))
    bf.allreduce_parameters(list(model.parameters()))
    for p in model.parameters():
        assert torch.allclose(p.detach(), torch.full_like(p, (n - 1) / 2), rtol=0, atol=1e-6)


def test_local_allreduce_sums_over_the_machine():
    # Without BLUEFOG_NODES_PER_MACHINE a machine is a shared-memory node: here, all ranks.
    r = bf.rank()
    ls = bf.local_size()
    base = r - bf.local_rank()
    want = sum((value(j) for j in range(base, base + ls)), torch.zeros(5, dtype=torch.float64))
    got = bf.allreduce(value(r), average=False, is_hierarchical_local=True, name="local")
    assert torch.allclose(got, want, rtol=0, atol=1e-10)


def test_introspection_and_timeline_off():
    n, r = bf.size(), bf.rank()
    assert (n, r) == (decomm.size(), decomm.rank())
    assert bf.machine_size() == n // bf.local_size()
    assert bf.machine_rank() == r // bf.local_size()
    assert isinstance(bf.unified_mpi_window_model_supported(), bool)  # collective
    assert isinstance(bf.mpi_threads_supported(), bool)
    assert bf.nccl_built() == decomm.backends.nccl_built()
    bf.set_skip_negotiate_stage(True)
    assert bf.get_skip_negotiate_stage() is True
    bf.set_skip_negotiate_stage(False)
    if not decomm.timeline.is_enabled():  # BlueFog: False (and one logged error) when off
        assert bf.timeline_start_activity("t", "ACT") is False
        assert bf.timeline_end_activity("t") is False
        with bf.timeline_context("t", "ACT"):
            pass
