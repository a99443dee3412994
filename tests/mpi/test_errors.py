"""Bad input and ranks that disagree: a clear DecommError/ValueError, never a hang.

Mismatches are arranged so that every message is still consumed (the ranks make the
same number of calls), which keeps the communicator clean for the following tests;
dead or missing ranks are tested in separate jobs (tests/unit/test_failure_jobs.py).
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


def test_shape_mismatch_raises_on_every_involved_rank():
    need(2)
    r = decomm.rank()
    decomm.set_topology(T.FullyConnectedGraph(decomm.size()))
    shape = (4, 6) if r == 1 else (4, 5)
    with pytest.raises(decomm.DecommError) as err:
        decomm.neighbor_allreduce(torch.zeros(shape), name="grad.fc1")
    msg = str(err.value)
    assert "grad.fc1" in msg and f"on rank {r}" in msg
    if r == 1:
        assert "shape [4, 5] vs [4, 6]" in msg
    else:
        assert "in-neighbour 1" in msg and "shape [4, 6] vs [4, 5]" in msg


def test_dtype_mismatch_raises_everywhere():
    need(2)
    r = decomm.rank()
    decomm.set_topology(T.FullyConnectedGraph(decomm.size()))
    dtype = torch.float64 if r == 0 else torch.float32
    with pytest.raises(decomm.DecommError, match="dtype"):
        decomm.neighbor_allreduce(torch.zeros(3, dtype=dtype), name="w")


def test_output_untouched_on_mismatch():
    need(2)
    r = decomm.rank()
    decomm.set_topology(T.FullyConnectedGraph(decomm.size()))
    x = torch.full((8,) if r == 0 else (9,), 7.0)
    with pytest.raises(decomm.DecommError):
        decomm.neighbor_allreduce_(x, name="inplace")
    assert torch.equal(x, torch.full_like(x, 7.0))  # no partial write


def test_name_mismatch_and_skipped_round():
    need(2)
    r = decomm.rank()
    decomm.set_topology(T.FullyConnectedGraph(decomm.size()))
    with pytest.raises(decomm.DecommError, match="name 'a' vs 'b'|name 'b' vs 'a'"):
        decomm.neighbor_allreduce(torch.zeros(2), name="a" if r == 0 else "b")
    if r == 0:
        decomm.advance_round()  # this rank thinks it is one step ahead
    with pytest.raises(decomm.DecommError, match="topology round"):
        decomm.neighbor_allreduce(torch.zeros(2), name="step")


def test_collective_mismatch_names_the_ranks():
    need(2)
    r, n = decomm.rank(), decomm.size()
    with pytest.raises(decomm.DecommError) as err:
        decomm.allreduce(torch.zeros(3 if r != n - 1 else 4), name="loss")
    msg = str(err.value)
    assert f"rank {n - 1}: shape [4] vs [3]" in msg and "allreduce 'loss'" in msg
    with pytest.raises(decomm.DecommError, match="root"):
        decomm.broadcast(torch.zeros(2), root=0 if r == 0 else 1, name="bc")
    with pytest.raises(decomm.DecommError, match="dtype"):
        decomm.allgather(torch.zeros(2, dtype=torch.float32 if r else torch.float64))
    # the job is still healthy afterwards
    assert decomm.allreduce(torch.ones(1), average=False).item() == n


def test_set_topology_disagreement_detected():
    need(2)
    r, n = decomm.rank(), decomm.size()
    topo = T.RingGraph(n) if r == 0 else T.ExponentialGraph(n)
    if n <= 3:  # ring, exponential and fully connected are one matrix for n <= 3
        lazy = 0.5 * (np.eye(n) + T.RingGraph(n).matrix(0))
        topo = T.RingGraph(n) if r == 0 else T.Topology.from_matrices(lazy)
    with pytest.raises(decomm.DecommError, match="different schedule"):
        decomm.set_topology(topo)


def test_set_topology_takes_a_callable_of_n():
    n = decomm.size()
    decomm.set_topology(lambda m: T.BaseGraph(m, 1))
    assert decomm.get_topology().fingerprint() == T.BaseGraph(n, 1).fingerprint()
    with pytest.raises(TypeError, match="must return a decomm.topology.Topology"):
        decomm.set_topology(lambda m: np.eye(m))
    with pytest.raises(ValueError, match="nodes but decomm.size"):
        decomm.set_topology(lambda m: T.RingGraph(m + 1))


def test_bad_matrices_rejected_before_any_message():
    n = decomm.size()
    with pytest.raises(ValueError, match="nodes but decomm.size"):
        decomm.set_topology(np.eye(n + 1))
    bad = np.full((n, n), 1.0 / n)
    bad[0, 0] += 0.5
    with pytest.raises(ValueError):
        decomm.set_topology(bad)
    neg = np.eye(n)
    if n > 1:
        neg[0, 0], neg[0, 1] = 1.5, -0.5
        with pytest.raises(ValueError):
            decomm.set_topology(neg)
    with pytest.raises(TypeError):
        decomm.set_topology("ring")
    with pytest.raises(ValueError, match="start_round"):
        decomm.set_topology(np.eye(n), start_round=-1)


def test_bad_weights_and_ranks():
    n, r = decomm.size(), decomm.rank()
    decomm.set_topology(T.RingGraph(n))
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="together"):
        decomm.neighbor_allreduce(x, self_weight=0.5)
    with pytest.raises(ValueError, match="out of range"):
        decomm.neighbor_allreduce(x, self_weight=0.5, src_weights={n + 3: 0.5})
    with pytest.raises(ValueError, match="self_weight = nan must be finite"):
        decomm.neighbor_allreduce(x, self_weight=float("nan"), src_weights={})
    with pytest.raises(ValueError, match="itself"):
        decomm.neighbor_allreduce(x, self_weight=0.5, src_weights={r: 0.5})
    if n >= 4:
        far = (r + 2) % n  # not a ring neighbour
        with pytest.raises(ValueError, match=f"src_weights names rank\\(s\\) \\[{far}\\]"):
            decomm.neighbor_allreduce(x, self_weight=0.5, src_weights={far: 0.5})
    with pytest.raises(ValueError, match="also give"):
        decomm.neighbor_allreduce(x, dst_weights={(r + 1) % n: 1.0})
    with pytest.raises(TypeError, match="dtype torch.int64"):
        decomm.neighbor_allreduce(torch.zeros(2, dtype=torch.int64))
    with pytest.raises(TypeError, match="average=True"):
        decomm.allreduce(torch.zeros(2, dtype=torch.int32))
    with pytest.raises(TypeError, match="torch.Tensor or numpy"):
        decomm.neighbor_allreduce([1.0, 2.0])
    with pytest.raises(TypeError, match="name"):
        decomm.neighbor_allreduce(x, name=3)
    with pytest.raises(ValueError, match="root=.* out of range"):
        decomm.broadcast(x, root=n)
    with pytest.raises(ValueError):
        decomm.advance_round(-1)
    with pytest.raises(ValueError):
        decomm.set_timeout(0)
    with pytest.raises(ValueError, match="backend"):
        decomm.init(backend="gloo")


@pytest.mark.parametrize("big_rank", [0, 1])
def test_large_and_small_message_mismatch_is_reported_and_drained(big_rank):
    """One rank sends a large (two-message) payload, the others a small one."""
    need(2)
    r, n = decomm.rank(), decomm.size()
    decomm.set_topology(T.FullyConnectedGraph(n))
    numel = 100_000 if r == big_rank else 10
    with pytest.raises(decomm.DecommError, match="shape"):
        decomm.neighbor_allreduce(torch.zeros(numel), name="proto")
    # every message was consumed: the next call works everywhere
    y = decomm.neighbor_allreduce(torch.full((100_000,), float(r)), name="after")
    assert torch.allclose(y, torch.full_like(y, (n - 1) / 2))


# Payload forms: up to 64 KiB a receiver takes either a staged [header | payload]
# message or a header with the payload apart; a sender stages when the message fits
# one eager fragment (< 4 KiB) or the call is in place, and sends apart otherwise.
FORM_SIZES = {"staged": 500, "apart_small": 8192, "apart_large": 100_000}


@pytest.mark.parametrize("size", sorted(FORM_SIZES))
def test_in_place_and_out_of_place_ranks_mix_forms(size):
    """Rank 0 calls in place (it stages up to 64 KiB), the others out of place."""
    need(2)
    r, n = decomm.rank(), decomm.size()
    topo = T.ExponentialGraph(n)
    decomm.set_topology(topo)
    numel = FORM_SIZES[size]
    g = torch.Generator().manual_seed(3)
    X = torch.randn(n, numel, generator=g, dtype=torch.float64)
    want = torch.from_numpy(topo.matrix(0) @ X.numpy())[r]
    for _ in range(3):  # several calls: nothing is left over from the previous one
        x = X[r].clone()
        got = decomm.neighbor_allreduce_(x, name="mix") if r == 0 else \
            decomm.neighbor_allreduce(x, name="mix")
        assert torch.allclose(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("inplace_rank", [0, 1])
def test_size_mismatch_across_payload_forms_is_reported_and_drained(inplace_rank):
    """A staged in-place sender of 8192 floats against an apart sender of 8000."""
    need(2)
    r, n = decomm.rank(), decomm.size()
    decomm.set_topology(T.FullyConnectedGraph(n))
    x = torch.zeros(8192 if r == inplace_rank else 8000)
    with pytest.raises(decomm.DecommError, match="shape"):
        if r == inplace_rank:
            decomm.neighbor_allreduce_(x, name="forms")
        else:
            decomm.neighbor_allreduce(x, name="forms")
    y = decomm.neighbor_allreduce(torch.full((8192,), float(r)), name="after")
    assert torch.allclose(y, torch.full_like(y, (n - 1) / 2))


@pytest.mark.parametrize("numels", [(16000, 15000), (16384, 100), (15000, 100_000)])
def test_staged_messages_of_different_sizes_never_overrun_a_receive(numels):
    """Both ranks in place, so both stage up to 64 KiB. Open MPI's shared-memory
    transport writes a message that is longer than its receive past the buffer (it
    corrupted the heap here), so every header receive has room for any staged message;
    the mismatch is reported and the following calls work."""
    need(2)
    r, n = decomm.rank(), decomm.size()
    decomm.set_topology(T.FullyConnectedGraph(n))
    x = torch.zeros(numels[0] if r == 0 else numels[1])
    with pytest.raises(decomm.DecommError, match="shape"):
        decomm.neighbor_allreduce_(x, name="staged")
    for _ in range(3):
        y = decomm.neighbor_allreduce_(torch.full((16000,), float(r)), name="after")
        assert torch.allclose(y, torch.full_like(y, (n - 1) / 2))


def test_allgather_against_a_staged_allreduce_is_reported_and_drained():
    need(2)
    r, n = decomm.rank(), decomm.size()
    decomm.set_topology(T.FullyConnectedGraph(n))
    x = torch.zeros(16000)
    with pytest.raises(decomm.DecommError, match="op neighbor_allreduce|op neighbor_allgather"):
        if r == 0:
            decomm.neighbor_allreduce_(x, name="mixed")
        else:
            decomm.neighbor_allgather(x, name="mixed")
    y = decomm.neighbor_allreduce(torch.full((16000,), float(r)), name="after")
    assert torch.allclose(y, torch.full_like(y, (n - 1) / 2))
