"""hierarchical_neighbor_allreduce under mpirun, checked against a closed form.

Ranks are grouped into fake "machines" of ``L`` consecutive ranks (``init_machines(L)``,
the same as ``DECOMM_LOCAL_SIZE=L``). With ``x_r`` rank r's input and ``xbar_m`` the mean
over machine m, rank r of machine m must get ``sum_m' Wm[m, m'] xbar_m'`` for the machine
topology's round ``Wm`` - computed here in float64 from the dense matrix.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import decomm
from decomm import hierarchical as H
from decomm import topology as T

TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def value(r: int, shape: tuple) -> np.ndarray:
    numel = int(np.prod(shape)) if shape else 1
    return (r * 1.5 + (np.arange(numel) % 11) / 8.0).reshape(shape)


def machine_means(n: int, L: int, shape: tuple) -> tuple[np.ndarray, list[int]]:
    machine_of = [r // L for r in range(n)]
    M = max(machine_of) + 1
    means = np.stack([np.mean([value(r, shape) for r in range(n) if machine_of[r] == m], axis=0)
                      for m in range(M)])
    return means, machine_of


def expected(Wm: np.ndarray, L: int, shape: tuple) -> np.ndarray:
    n, r = decomm.size(), decomm.rank()
    means, machine_of = machine_means(n, L, shape)
    return np.tensordot(Wm[machine_of[r]], means, axes=1)


def close(got, want, dtype=torch.float64) -> None:
    g = got.double().numpy() if isinstance(got, torch.Tensor) else np.asarray(got, np.float64)
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    assert g.shape == want.shape
    assert np.allclose(g, want, rtol=0, atol=TOL[dtype] * scale), (g, want)


def local_sizes() -> list[int]:
    n = decomm.size()
    return sorted({1, 2, 3, n} & set(range(1, n + 1)))


def random_rowstoch(M: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    W = rng.random((M, M)) * (rng.random((M, M)) < 0.6)
    np.fill_diagonal(W, rng.random(M) + 0.2)
    return W / W.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("L", [1, 2, 3, 5])
def test_grouping(L):
    n = decomm.size()
    if L > n:
        pytest.skip("local_size larger than the job")
    H.init_machines(L)
    r = decomm.rank()
    assert H.machine_rank() == r // L
    assert H.machine_size() == (n + L - 1) // L
    assert H.machine_local_rank() == r % L
    assert H.machine_local_size() == min(L, n - (r // L) * L)
    assert [H.machine_of(s) for s in range(n)] == [s // L for s in range(n)]
    assert H.get_machine_topology().n == H.machine_size()


@pytest.mark.parametrize("L", [1, 2, 3, 5])
@pytest.mark.parametrize("kind", ["exponential", "ring", "random", "full"])
def test_closed_form_float64(L, kind):
    n = decomm.size()
    if L > n:
        pytest.skip("local_size larger than the job")
    H.init_machines(L)
    M = H.machine_size()
    topo = {"exponential": T.ExponentialGraph(M), "ring": T.RingGraph(M),
            "random": T.Topology.from_matrices(random_rowstoch(M, 3)),
            "full": T.FullyConnectedGraph(M)}[kind]
    if kind != "exponential":
        H.set_machine_topology(topo)
    shape = (3, 7)
    x = torch.from_numpy(value(decomm.rank(), shape))
    got = H.hierarchical_neighbor_allreduce(x, name="hier")
    close(got, expected(topo.matrix(0), L, shape))
    assert torch.equal(x, torch.from_numpy(value(decomm.rank(), shape)))  # input untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 3, 4)])
def test_dtypes_and_shapes(dtype, shape):
    L = 2 if decomm.size() >= 2 else 1
    H.init_machines(L)
    M = H.machine_size()
    x = torch.from_numpy(value(decomm.rank(), shape)).to(dtype)
    got = H.hierarchical_neighbor_allreduce(x)
    assert got.dtype == dtype and got.shape == x.shape
    # the inputs themselves are rounded to dtype first
    n = decomm.size()
    xs = np.stack([torch.from_numpy(value(r, shape)).to(dtype).double().numpy() for r in range(n)])
    mo = [r // L for r in range(n)]
    means = np.stack([xs[[r for r in range(n) if mo[r] == m]].mean(axis=0) for m in range(M)])
    want = np.tensordot(T.ExponentialGraph(M).matrix(0)[mo[decomm.rank()]], means, axes=1)
    close(got, want, dtype)


def test_inplace_noncontiguous_and_numpy():
    L = 2 if decomm.size() >= 2 else 1
    H.init_machines(L)
    M = H.machine_size()
    base = torch.from_numpy(value(decomm.rank(), (4, 6)))
    xt = base.t()  # non-contiguous view
    want = expected(T.ExponentialGraph(M).matrix(0), L, (4, 6)).T
    out = H.hierarchical_neighbor_allreduce_(xt, name="inplace")
    assert out is xt
    close(base.t(), want)
    arr = value(decomm.rank(), (5,))
    res = H.hierarchical_neighbor_allreduce(arr)
    assert isinstance(res, np.ndarray)
    close(res, expected(T.ExponentialGraph(M).matrix(0), L, (5,)))


def test_time_varying_machine_topology_follows_the_round():
    n = decomm.size()
    L = 2 if n >= 4 else 1
    H.init_machines(L)
    M = H.machine_size()
    mats = [random_rowstoch(M, 10 + k) for k in range(3)]
    H.set_machine_topology(mats)
    decomm.set_topology(T.RingGraph(n))
    for t in range(4):
        x = torch.from_numpy(value(decomm.rank(), (6,)))
        close(H.hierarchical_neighbor_allreduce(x, name=f"t{t}"), expected(mats[t % 3], L, (6,)))
        decomm.advance_round()


def test_weight_overrides():
    n = decomm.size()
    L = 2 if n >= 4 else 1
    H.init_machines(L)
    M, m = H.machine_size(), H.machine_rank()
    topo = T.RingGraph(M)
    H.set_machine_topology(topo)
    shape = (4,)
    means, _mo = machine_means(n, L, shape)
    # self_weight + src_machine_weights: an in-neighbour subset, the others weigh 0
    ins = H.machine_in_neighbors()
    src = {j: 0.25 for j in ins[:1]}
    got = H.hierarchical_neighbor_allreduce(torch.from_numpy(value(decomm.rank(), shape)),
                                            self_weight=0.75, src_machine_weights=src)
    want = 0.75 * means[m] + sum(w * means[j] for j, w in src.items())
    close(got, want)
    # a per-call directed machine graph m -> m+1 with sender-side scaling (push style)
    if M > 1:
        nxt, prv = (m + 1) % M, (m - 1) % M
        got = H.hierarchical_neighbor_allreduce(
            torch.from_numpy(value(decomm.rank(), shape)), self_weight=0.5,
            src_machine_weights={prv: 1.0}, dst_machine_weights={nxt: 0.5}, name="push")
        close(got, 0.5 * means[m] + 0.5 * means[prv])


def test_env_var_grouping():
    n = decomm.size()
    L = 2 if n >= 2 else 1
    old = os.environ.get("DECOMM_LOCAL_SIZE")
    os.environ["DECOMM_LOCAL_SIZE"] = str(L)
    try:
        H.init_machines()
        assert H.machine_rank() == decomm.rank() // L
        assert H.machine_local_rank() == decomm.rank() % L
        x = torch.from_numpy(value(decomm.rank(), (3,)))
        close(H.hierarchical_neighbor_allreduce(x),
              expected(T.ExponentialGraph(H.machine_size()).matrix(0), L, (3,)))
    finally:
        if old is None:
            del os.environ["DECOMM_LOCAL_SIZE"]
        else:
            os.environ["DECOMM_LOCAL_SIZE"] = old


def test_shared_memory_grouping_is_one_machine_here():
    """Without an override every rank of this single-host job is on machine 0."""
    if decomm.local_size() != decomm.size():
        pytest.skip("the job spans several hosts")
    old = os.environ.pop("DECOMM_LOCAL_SIZE", None)
    try:
        H.init_machines()
        assert H.machine_size() == 1 and H.machine_rank() == 0
        assert H.machine_local_size() == decomm.size() and H.machine_local_rank() == decomm.rank()
        x = torch.from_numpy(value(decomm.rank(), (3,)))
        n = decomm.size()
        close(H.hierarchical_neighbor_allreduce(x),
              np.mean([value(r, (3,)) for r in range(n)], axis=0))
    finally:
        if old is not None:
            os.environ["DECOMM_LOCAL_SIZE"] = old


def test_matches_flat_when_one_rank_per_machine():
    """local_size=1: machines are ranks, so it equals neighbor_allreduce over the same graph."""
    n = decomm.size()
    H.init_machines(1)
    topo = T.BaseGraph(n, 1)
    H.set_machine_topology(topo)
    decomm.set_topology(topo)
    for _ in range(max(topo.rounds, 1)):
        x = torch.from_numpy(value(decomm.rank(), (9,)))
        flat = decomm.neighbor_allreduce(x)
        hier = H.hierarchical_neighbor_allreduce(x)
        assert torch.allclose(flat, hier, rtol=0, atol=1e-12)
        decomm.advance_round()


def test_repeated_rounds_reach_global_average():
    """Machine topology with exact consensus in one cycle: hierarchical == global mean."""
    n = decomm.size()
    L = 2 if n >= 2 else 1
    H.init_machines(L)
    M = H.machine_size()
    topo = T.BaseGraph(M, 1)
    H.set_machine_topology(topo)
    x = torch.from_numpy(value(decomm.rank(), (5,)))
    # exact only when machines have equal sizes (each machine mean weighs the same)
    if n % L != 0:
        pytest.skip("unequal machines: the machine average is not the rank average")
    for _ in range(topo.rounds):
        x = H.hierarchical_neighbor_allreduce(x)
        decomm.advance_round()
    close(x, np.mean([value(r, (5,)) for r in range(n)], axis=0))


# ------------------------------------------------------------------- errors
def test_bad_input_raises_everywhere():
    L = 2 if decomm.size() >= 2 else 1
    H.init_machines(L)
    M = H.machine_size()
    with pytest.raises(TypeError, match="dtype"):
        H.hierarchical_neighbor_allreduce(torch.zeros(3, dtype=torch.int32))
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        H.hierarchical_neighbor_allreduce([1.0, 2.0])
    with pytest.raises(TypeError, match="name"):
        H.hierarchical_neighbor_allreduce(torch.zeros(3), name=5)
    with pytest.raises(ValueError, match="together"):
        H.hierarchical_neighbor_allreduce(torch.zeros(3), self_weight=0.5)
    with pytest.raises(ValueError, match="also give"):
        H.hierarchical_neighbor_allreduce(torch.zeros(3), dst_machine_weights={})
    with pytest.raises(ValueError, match="out of range"):
        H.hierarchical_neighbor_allreduce(torch.zeros(3), self_weight=1.0,
                                          src_machine_weights={M + 3: 0.1})
    with pytest.raises(ValueError, match="names this machine itself"):
        H.hierarchical_neighbor_allreduce(torch.zeros(3), self_weight=1.0,
                                          src_machine_weights={H.machine_rank(): 0.1})
    with pytest.raises(ValueError, match="self_weight = inf must be finite"):
        H.hierarchical_neighbor_allreduce(torch.zeros(3), self_weight=float("inf"),
                                          src_machine_weights={})
    with pytest.raises(TypeError, match="dict"):
        H.hierarchical_neighbor_allreduce(torch.zeros(3), self_weight=1.0,
                                          src_machine_weights="1")
    if M > 2:
        not_in = [j for j in range(M) if j != H.machine_rank()
                  and j not in H.machine_in_neighbors()]
        H.set_machine_topology(T.RingGraph(M))
        not_in = [j for j in range(M) if j != H.machine_rank()
                  and j not in H.machine_in_neighbors()]
        if not_in:
            with pytest.raises(ValueError, match="not in-neighbours"):
                H.hierarchical_neighbor_allreduce(torch.zeros(3), self_weight=1.0,
                                                  src_machine_weights={not_in[0]: 0.5})
    with pytest.raises(ValueError, match="local_size"):
        H.init_machines(0)
    with pytest.raises(ValueError, match="machines"):
        H.set_machine_topology(T.RingGraph(M + 1))
    with pytest.raises(TypeError):
        H.set_machine_topology("ring")
    bad = np.full((M, M), 1.0 / M)
    bad[0, 0] += 0.5
    with pytest.raises(ValueError):
        H.set_machine_topology(bad)
    with pytest.raises(ValueError):
        H.machine_of(decomm.size())
    # the job is still healthy
    x = torch.from_numpy(value(decomm.rank(), (2,)))
    close(H.hierarchical_neighbor_allreduce(x),
          expected(H.get_machine_topology().matrix(decomm.current_round()), L, (2,)))


def test_machine_topology_disagreement_names_ranks():
    n = decomm.size()
    if n < 3:
        pytest.skip("needs 3 ranks (2 machines of sizes 1 and 2 at least)")
    H.init_machines(1)
    topo = T.RingGraph(n) if decomm.rank() != n - 1 else T.StarGraph(n)  # differ for n >= 3
    with pytest.raises(decomm.DecommError, match=rf"ranks \[{n - 1}\].*different machine"):
        H.set_machine_topology(topo)


def test_grouping_disagreement_names_ranks():
    n = decomm.size()
    if n < 2:
        pytest.skip("needs 2 ranks")
    L = 2 if decomm.rank() == 0 else 1
    with pytest.raises(decomm.DecommError, match="differently from rank 0"):
        H.init_machines(L)
    H.init_machines(1)  # recovers


def test_shape_mismatch_inside_a_machine_raises():
    n = decomm.size()
    if n < 2:
        pytest.skip("needs 2 ranks")
    H.init_machines(2)
    shape = (4,) if decomm.rank() % 2 == 0 else (5,)
    # ranks of a 2-rank machine see the shape mismatch; a 1-rank machine (odd n) hears of
    # it from its in-neighbour machine's leader (a poisoned gossip message)
    pattern = "shape" if H.machine_local_size() > 1 else "in-neighbour machine"
    with pytest.raises(decomm.DecommError, match=pattern):
        H.hierarchical_neighbor_allreduce(torch.zeros(shape), name="mismatch")
    x = torch.from_numpy(value(decomm.rank(), (2,)))  # still healthy
    close(H.hierarchical_neighbor_allreduce(x),
          expected(T.ExponentialGraph(H.machine_size()).matrix(0), 2, (2,)))


def test_gossip_failure_reaches_every_rank_of_the_machine():
    """Machines that disagree on the shape: leaders see the mismatch, members hear of it."""
    n = decomm.size()
    if n < 4:
        pytest.skip("needs 2 machines of 2 ranks")
    H.init_machines(2)
    shape = (4,) if H.machine_rank() % 2 == 0 else (5,)
    leader = H.machine_local_rank() == 0
    pattern = "called differently" if leader else "failed on this machine's leader"
    with pytest.raises(decomm.DecommError, match=pattern):
        H.hierarchical_neighbor_allreduce(torch.zeros(shape), name="machines-differ")
    x = torch.from_numpy(value(decomm.rank(), (3,)))  # still healthy
    close(H.hierarchical_neighbor_allreduce(x),
          expected(T.ExponentialGraph(H.machine_size()).matrix(0), 2, (3,)))
