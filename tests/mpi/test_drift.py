"""Ranks out of step: unnamed calls paired wrongly, send/receive sides that disagree,
and the stream's recovery afterwards; in-place ops and autograd; init twice.

Every case ends with correct calls whose values are checked against a closed form, so a
stream left misaligned by the failure would show up as a wrong number or an error.
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


def ring_expected(values: np.ndarray) -> np.ndarray:
    """W @ values for RingGraph(n), computed from the matrix itself."""
    return T.RingGraph(decomm.size()).matrix(0) @ values


def three_good_calls() -> None:
    """Three named ring exchanges of x_i = rank + call, each checked exactly."""
    n, r = decomm.size(), decomm.rank()
    decomm.set_topology(T.RingGraph(n))
    for call in range(3):
        x = torch.tensor([float(r + call)], dtype=torch.float64)
        got = decomm.neighbor_allreduce(x, name=f"good{call}")
        want = ring_expected(np.arange(n, dtype=np.float64) + call)[r]
        assert got.item() == pytest.approx(want, rel=1e-15, abs=1e-15)


def test_skipped_unnamed_call_fails_at_once_and_the_stream_recovers():
    need(2)
    r = decomm.rank()
    decomm.set_topology(T.FullyConnectedGraph(decomm.size()))
    x, y = torch.ones(3), torch.full((3,), 100.0)
    with pytest.raises(decomm.DecommError) as err:
        if r != 1:
            x = decomm.neighbor_allreduce(x)  # rank 1 skips this exchange
        y = decomm.neighbor_allreduce(y)
    msg = str(err.value)
    assert "called differently: name '@test_drift.py:" in msg, msg
    assert "without name= is named after its line" in msg
    assert f"on rank {r}" in msg
    three_good_calls()


def test_mismatched_per_call_graph_times_out_then_three_calls_succeed():
    """Rank r receives from r-1 but sends to r+2: nobody gets what it waits for."""
    need(4)
    n, r = decomm.size(), decomm.rank()
    decomm.set_topology(T.RingGraph(n))
    before = decomm.get_timeout()
    decomm.set_timeout(2.0)
    try:
        with pytest.raises(decomm.DecommError, match="timed out after 2"):
            decomm.neighbor_allreduce(torch.ones(4), self_weight=0.5,
                                      src_weights={(r - 1) % n: 0.5},
                                      dst_weights={(r + 2) % n: 1.0}, name="mismatched")
    finally:
        decomm.set_timeout(before)
    three_good_calls()


def test_message_sent_to_a_rank_that_did_not_expect_it_is_reported():
    """Rank 0 sends to rank 1, which receives from nobody: rank 1 raises, then all is well."""
    need(2)
    r = decomm.rank()
    decomm.set_topology(T.RingGraph(decomm.size()))

    def pair_call(x: torch.Tensor, name: str, one_sided: bool) -> torch.Tensor:
        if r == 0:
            return decomm.neighbor_allreduce(x, self_weight=0.5, src_weights={} if one_sided
                                             else {1: 0.5}, dst_weights={1: 1.0}, name=name)
        if r == 1:
            return decomm.neighbor_allreduce(x, self_weight=1.0 if one_sided else 0.5,
                                             src_weights={} if one_sided else {0: 0.5},
                                             dst_weights={} if one_sided else {0: 1.0},
                                             name=name)
        return decomm.neighbor_allreduce(x, self_weight=1.0, src_weights={}, dst_weights={},
                                         name=name)

    # Rank 1 finds the stray message at the end of the one-sided call if it has
    # arrived by then, else at the end of the next one: exactly one of them raises.
    x = torch.tensor([float(r)])
    errors = []
    for name, one_sided in (("one-sided", True), ("pair", False)):
        try:
            pair_call(x, name, one_sided)
        except decomm.DecommError as e:
            errors.append(str(e))
    if r == 1:
        assert len(errors) == 1 and "rank 0 sent this rank a message" in errors[0], errors
    else:
        assert errors == []
    three_good_calls()


def test_consensus_is_a_fixed_point_in_float32():
    """Uniform weights: summed first and scaled once, so 50.0 stays exactly 50.0."""
    need(2)
    n = decomm.size()
    decomm.set_topology(T.ExponentialGraph(n))
    x = torch.full((5,), 50.0)
    for _ in range(1000):
        decomm.neighbor_allreduce_(x, name="consensus")
    assert torch.equal(x, torch.full((5,), 50.0)), x


def test_uniform_weights_give_the_correctly_rounded_mean():
    need(2)
    n, r = decomm.size(), decomm.rank()
    topo = T.ExponentialGraph(n)
    decomm.set_topology(topo)
    vals = (np.arange(n, dtype=np.float64) * 0.1 + 1.0 / 3.0).astype(np.float32)
    got = decomm.neighbor_allreduce(torch.tensor([vals[r]]), name="mean")
    W = topo.matrix(0)
    nbrs = np.flatnonzero(W[r])
    # the float64 sum is exact; one product by 1/m, rounded once to float32
    want = np.float32(vals[nbrs].astype(np.float64).sum() * (1.0 / len(nbrs)))
    assert got.item() == want


def test_inplace_ops_bump_the_version_counter_so_backward_refuses_stale_values():
    r = decomm.rank()
    decomm.set_topology(T.RingGraph(decomm.size()))
    w = torch.tensor([2.0], requires_grad=True)
    y = w * 2.0
    loss = (y * y).sum()  # saves y for backward
    with torch.no_grad():
        decomm.neighbor_allreduce_(y, name="y")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    for op in (lambda t: decomm.allreduce_(t, average=False, name="s"),
               lambda t: decomm.broadcast_(t, 0, name="b"),
               lambda t: decomm.neighbor_allreduce_nonblocking_(t, name="h").wait(),
               lambda t: decomm.allreduce_nonblocking_(t, name="a").wait()):
        t = torch.tensor([float(r)])
        v = t._version
        with torch.no_grad():
            op(t)
        assert t._version > v


def test_inplace_ops_refuse_tensors_autograd_tracks():
    r = decomm.rank()
    leaf = torch.ones(2, requires_grad=True)
    for op in (decomm.neighbor_allreduce_, decomm.allreduce_,
               lambda t: decomm.broadcast_(t, 0), decomm.neighbor_allreduce_nonblocking_):
        with pytest.raises(RuntimeError, match=f"on rank {r}: in-place op on a leaf tensor"):
            op(leaf)
        with pytest.raises(RuntimeError, match="in-place op on a tensor that requires grad"):
            op(leaf * 1.0)
    # the out-of-place op reads a tracked tensor without recording history
    out = decomm.neighbor_allreduce(leaf, name="oop")
    assert not out.requires_grad


def test_second_init_with_other_settings_raises_and_same_is_a_no_op():
    timeout = decomm.get_timeout()
    decomm.init(timeout=timeout)  # same: nothing happens
    decomm.init()
    with pytest.raises(decomm.DecommError, match=r"already initialized with other settings: "
                                                 r"timeout=7\.0 \(in force: "):
        decomm.init(timeout=7.0)
    with pytest.raises(decomm.DecommError, match="check=False"):
        decomm.init(check=False)
    assert decomm.get_timeout() == timeout


def test_stats_count_no_bytes_without_a_peer():
    decomm.reset_stats()
    x = torch.ones(1000)
    decomm.allreduce(x, name="st")
    decomm.broadcast(x, 0, name="st-b")
    decomm.allgather(x, name="st-g")
    s = decomm.stats()
    if decomm.size() == 1:
        assert s == {"bytes_sent": 0, "bytes_received": 0}
    else:
        assert s["bytes_sent"] > 0
