"""decomm.compat.bluefog.topology_util against independent evaluations of BlueFog's formulas.

Each expected matrix is written out here from the definition in BlueFog 0.3's
``bluefog/common/topology_util.py`` (sender-row convention: ``A[i, j]`` = weight
``i`` sends to ``j``), element by element, without calling the module under test.
The collective ``Infer*`` helpers are tested under MPI in tests/mpi/test_compat_optimizers.py.
"""

from __future__ import annotations

import itertools
import math

import networkx as nx
import numpy as np
import pytest

from decomm import topology as dt
from decomm.compat.bluefog import topology_util as tu

SIZES = [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16, 17]


def adj(g: nx.DiGraph) -> np.ndarray:
    return nx.to_numpy_array(g, nodelist=range(g.number_of_nodes()))


def powers(base: int, n: int) -> set[int]:
    out, p = set(), 1
    while p < n:
        out.add(p)
        p *= base
    return out


def expected_exponential(n: int, base: int) -> np.ndarray:
    offs = {0} | powers(base, n)
    A = np.zeros((n, n))
    for i in range(n):
        for d in offs:
            A[i, (i + d) % n] = 1.0 / len(offs)
    return A


@pytest.mark.parametrize("n", SIZES)
def test_exponential_two_graph_is_decomm_exponential_transposed(n):
    A = adj(tu.ExponentialTwoGraph(n))
    np.testing.assert_array_equal(A, expected_exponential(n, 2))
    # the decomm graph it is built on, in decomm's convention (rows receive)
    np.testing.assert_array_equal(A.T, dt.ExponentialGraph(n).matrix(0))
    np.testing.assert_array_equal(adj(tu.ExponentialGraph(n)), A)


@pytest.mark.parametrize("n,base", [(n, b) for n in (1, 5, 10, 27, 28, 30) for b in (3, 4, 5)])
def test_exponential_graph_other_bases(n, base):
    np.testing.assert_allclose(adj(tu.ExponentialGraph(n, base)),
                               expected_exponential(n, base), rtol=0, atol=1e-15)


def test_exponential_graph_exact_powers_beyond_float_log():
    # math.log(243, 3) = 4.999..., which makes BlueFog's float test miss 243 = 3**5
    assert math.log(243, 3) < 5
    A = adj(tu.ExponentialGraph(250, 3))
    offs = {0, 1, 3, 9, 27, 81, 243}
    assert set(np.flatnonzero(A[0])) == offs
    np.testing.assert_allclose(A[0, sorted(offs)], 1.0 / 7)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("base", [2, 3, 4])
def test_symmetric_exponential_graph(n, base):
    A = np.zeros((n, n))
    offs = {0} | {d for d in range(1, n) if (d if d <= n // 2 else n - d) in powers(base, n)}
    for i in range(n):
        for d in offs:
            A[i, (i + d) % n] = 1.0 / len(offs)
    G = adj(tu.SymmetricExponentialGraph(n, base))
    np.testing.assert_allclose(G, A, rtol=0, atol=1e-15)
    np.testing.assert_allclose(G, G.T, rtol=0, atol=1e-15)


def mesh_expected(nrow: int, ncol: int) -> np.ndarray:
    n = nrow * ncol
    nbrs = []
    for i in range(n):
        r, c = divmod(i, ncol)
        s = {i}
        for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            if 0 <= rr < nrow and 0 <= cc < ncol:
                s.add(rr * ncol + cc)
        nbrs.append(s)
    A = np.zeros((n, n))
    for i in range(n):
        for j in nbrs[i] - {i}:
            A[i, j] = 1.0 / max(len(nbrs[i]), len(nbrs[j]))
        A[i, i] = 1.0 - A[i].sum()
    return A


@pytest.mark.parametrize("n,shape", [(1, (1, 1)), (4, (2, 2)), (6, (2, 3)), (7, (1, 7)),
                                     (12, (3, 4)), (16, (4, 4)), (24, (4, 6))])
def test_mesh_grid_default_shape(n, shape):
    G = adj(tu.MeshGrid2DGraph(n))
    np.testing.assert_allclose(G, mesh_expected(*shape), rtol=0, atol=1e-15)
    np.testing.assert_allclose(G.sum(axis=0), 1.0, atol=1e-14)  # doubly stochastic
    np.testing.assert_allclose(G, G.T)


def test_mesh_grid_explicit_shape_and_errors():
    np.testing.assert_allclose(adj(tu.MeshGrid2DGraph(6, (3, 2))), mesh_expected(3, 2))
    with pytest.raises(ValueError, match="does not match size"):
        tu.MeshGrid2DGraph(6, (4, 2))
    with pytest.raises(TypeError, match="pair"):
        tu.MeshGrid2DGraph(6, 6)


@pytest.mark.parametrize("n", SIZES)
def test_star_graph_every_center(n):
    for c in range(n):
        A = np.zeros((n, n))
        for i in range(n):
            A[i, i] = 1 - 1 / n
        A[c, :] = 1 / n
        A[:, c] = 1 / n
        np.testing.assert_array_equal(adj(tu.StarGraph(n, c)), A)
    # decomm's star computes the centre's self weight as 1 - (n-1)/n: equal up to rounding
    np.testing.assert_allclose(adj(tu.StarGraph(n)).T, dt.StarGraph(n).matrix(0),
                               rtol=0, atol=4e-16)
    with pytest.raises(ValueError, match="center_rank"):
        tu.StarGraph(n, n)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("style", [0, 1, 2])
def test_ring_graph(n, style):
    A = np.zeros((n, n))
    if n == 1:
        A[0, 0] = 1.0
    elif n == 2:
        A[:] = 0.5
    else:
        for i in range(n):
            if style == 0:
                for d in (0, 1, -1):
                    A[i, (i + d) % n] = 1 / 3
            else:
                A[i, i] = 0.5
                A[i, (i + (-1 if style == 1 else 1)) % n] = 0.5  # 1: sends to the left
    np.testing.assert_allclose(adj(tu.RingGraph(n, style)), A, rtol=0, atol=1e-15)


def test_ring_graph_bad_style():
    for bad in (3, -1, "left", True):
        with pytest.raises(ValueError, match="connect_style"):
            tu.RingGraph(5, bad)


@pytest.mark.parametrize("n", SIZES)
def test_fully_connected(n):
    np.testing.assert_allclose(adj(tu.FullyConnectedGraph(n)), np.full((n, n), 1 / n))


@pytest.mark.parametrize("ctor", [tu.ExponentialTwoGraph, tu.FullyConnectedGraph, tu.RingGraph,
                                  tu.StarGraph, tu.MeshGrid2DGraph, tu.SymmetricExponentialGraph,
                                  tu.ExponentialGraph])
def test_constructor_size_errors(ctor):
    with pytest.raises(ValueError, match="size must be >= 1"):
        ctor(0)
    with pytest.raises(TypeError, match="size must be an int"):
        ctor(4.0)


def test_base_errors():
    with pytest.raises(ValueError, match="base must be >= 2"):
        tu.ExponentialGraph(8, 1)
    with pytest.raises(TypeError, match="base must be an int"):
        tu.SymmetricExponentialGraph(8, 2.0)


def test_is_power_of():
    for base in (2, 3, 4, 7):
        for x in range(1, 400):
            assert tu.isPowerOf(x, base) == (x in powers(base, 401) or x == 1)
    with pytest.raises(ValueError):
        tu.isPowerOf(0, 2)


# ----------------------------------------------------------------- helpers
def test_recv_and_send_weights_of_directed_graph():
    G = tu.ExponentialTwoGraph(8)
    sw, recv = tu.GetRecvWeights(G, 3)
    assert sw == 0.25 and recv == {2: 0.25, 1: 0.25, 7: 0.25}  # 3 - 1, 3 - 2, 3 - 4
    sw, send = tu.GetSendWeights(G, 3)
    assert sw == 0.25 and send == {4: 0.25, 5: 0.25, 7: 0.25}  # 3 + 1, 3 + 2, 3 + 4
    # a hand-made graph with distinct weights and no self-loop on node 1
    H = nx.DiGraph()
    H.add_weighted_edges_from([(0, 0, 0.5), (1, 0, 0.5), (0, 1, 1.0), (2, 1, 0.0)])
    H.add_edge(2, 2)  # no weight attribute: counts as 1, as in networkx's matrices
    assert tu.GetRecvWeights(H, 0) == (0.5, {1: 0.5})
    assert tu.GetRecvWeights(H, 1) == (0.0, {0: 1.0, 2: 0.0})
    assert tu.GetSendWeights(H, 2) == (1.0, {1: 0.0})


def test_weights_errors():
    G = tu.RingGraph(4)
    with pytest.raises(ValueError, match="rank=4 is not a node"):
        tu.GetRecvWeights(G, 4)
    with pytest.raises(TypeError, match="networkx.DiGraph"):
        tu.GetSendWeights(np.eye(3), 0)
    with pytest.raises(TypeError, match="rank must be an int"):
        tu.GetSendWeights(G, "0")


def test_is_topology_equivalent():
    assert tu.IsTopologyEquivalent(tu.RingGraph(6), tu.RingGraph(6))
    assert tu.IsTopologyEquivalent(tu.ExponentialGraph(8, 2), tu.ExponentialTwoGraph(8))
    assert not tu.IsTopologyEquivalent(tu.RingGraph(6), tu.RingGraph(6, 1))
    assert not tu.IsTopologyEquivalent(tu.RingGraph(6), tu.RingGraph(7))
    assert not tu.IsTopologyEquivalent(tu.RingGraph(6), None)
    assert not tu.IsTopologyEquivalent(None, None)
    # same edges, one weight different: not equivalent (weights are compared exactly)
    G = tu.RingGraph(5)
    H = G.copy()
    H.edges[0, 1]["weight"] = 0.3
    assert not tu.IsTopologyEquivalent(G, H)
    # isomorphic graphs are not equivalent (node k against node k, no isomorphism test)
    assert not tu.IsTopologyEquivalent(tu.StarGraph(5, 0), tu.StarGraph(5, 1))
    with pytest.raises(TypeError, match="topo2"):
        tu.IsTopologyEquivalent(G, np.eye(5))


def test_is_regular_graph():
    assert tu.IsRegularGraph(tu.RingGraph(7))
    assert tu.IsRegularGraph(tu.ExponentialTwoGraph(12))
    assert not tu.IsRegularGraph(tu.StarGraph(5))
    assert not tu.IsRegularGraph(tu.MeshGrid2DGraph(9))
    with pytest.raises(ValueError, match="no nodes"):
        tu.IsRegularGraph(nx.DiGraph())


# ---------------------------------------------------- dynamic generators
def take(gen, k):
    return [next(gen) for _ in range(k)]


@pytest.mark.parametrize("n", [2, 3, 5, 8, 12])
@pytest.mark.parametrize("ctor", [tu.ExponentialTwoGraph, tu.RingGraph, tu.StarGraph,
                                  tu.MeshGrid2DGraph])
def test_dynamic_one_peer_is_consistent(n, ctor):
    G = ctor(n)
    # independent: node r's successors clockwise; round t sends to the (t mod deg)-th
    succ = {r: sorted((s for s in G.successors(r) if s != r), key=lambda s, r=r: (s - r) % n)
            for r in range(n)}
    gens = [tu.GetDynamicOnePeerSendRecvRanks(G, r) for r in range(n)]
    rounds = [take(g, 12) for g in gens]
    for t in range(12):
        sends = {r: rounds[r][t][0] for r in range(n)}
        for r in range(n):
            assert sends[r] == [succ[r][t % len(succ[r])]]
            assert G.has_edge(r, sends[r][0])
            # recv_ranks are exactly the nodes that send to r in that round
            assert rounds[r][t][1] == sorted(q for q in range(n) if sends[q] == [r])


def test_dynamic_one_peer_exp2_rounds():
    # one-peer exponential-2 on 8 nodes: round t sends to i + 2^(t mod 3)
    gen = tu.GetDynamicOnePeerSendRecvRanks(tu.ExponentialTwoGraph(8), 5)
    assert take(gen, 4) == [([6], [4]), ([7], [3]), ([1], [1]), ([6], [4])]


def test_dynamic_one_peer_errors():
    with pytest.raises(ValueError, match="no out-neighbour"):
        tu.GetDynamicOnePeerSendRecvRanks(tu.RingGraph(1), 0)
    with pytest.raises(ValueError, match="self_rank=3 is not a node"):
        tu.GetDynamicOnePeerSendRecvRanks(tu.RingGraph(3), 3)


@pytest.mark.parametrize("world,local", [(4, 2), (6, 2), (9, 3), (16, 4), (10, 1)])
def test_exp2_machine_ranks(world, local):
    machines = world // local
    period = math.floor(math.log2(machines - 1)) + 1
    for rank in range(world):
        gen = tu.GetExp2DynamicSendRecvMachineRanks(world, local, rank, rank % local)
        m = rank // local
        for t, (send, recv) in enumerate(take(gen, 9)):
            d = 2 ** (t % period)
            assert send == [(m + d) % machines] and recv == [(m - d) % machines]


def test_exp2_machine_ranks_errors():
    with pytest.raises(ValueError, match="at least two machines"):
        tu.GetExp2DynamicSendRecvMachineRanks(4, 4, 0, 0)
    with pytest.raises(ValueError, match="not a multiple"):
        tu.GetExp2DynamicSendRecvMachineRanks(6, 4, 0, 0)
    with pytest.raises(ValueError, match="not local rank"):
        tu.GetExp2DynamicSendRecvMachineRanks(8, 4, 5, 0)


def check_permutation_rounds(world, gens, k):
    """Every round: each rank sends to one rank and the recv sides agree with the sends."""
    rounds = [take(g, k) for g in gens]
    for t in range(k):
        send = {r: rounds[r][t][0][0] for r in range(world)}
        recv = {r: rounds[r][t][1][0] for r in range(world)}
        for r in range(world):
            assert recv[send[r]] == r, (t, r, send, recv)
    return rounds


@pytest.mark.parametrize("world,local", [(6, 3), (8, 4), (12, 4), (15, 5), (3, 3)])
def test_inner_outer_ring(world, local):
    gens = [tu.GetInnerOuterRingDynamicSendRecvRanks(world, local, r) for r in range(world)]
    rounds = check_permutation_rounds(world, gens, 2 * local)
    machines = world // local
    for t in range(2 * local):
        out = t % local
        for r in range(world):
            m, lr = divmod(r, local)
            s = rounds[r][t][0][0]
            if lr == out:
                assert s == ((m + 1) % machines) * local + lr
            else:  # next local rank that is not the outgoing one, same machine
                nxt = (lr + 1) % local
                nxt = (nxt + 1) % local if nxt == out else nxt
                assert s == m * local + nxt


@pytest.mark.parametrize("world,local", [(6, 3), (8, 4), (16, 4), (24, 6), (10, 5)])
def test_inner_outer_expo2(world, local):
    gens = [tu.GetInnerOuterExpo2DynamicSendRecvRanks(world, local, r) for r in range(world)]
    rounds = check_permutation_rounds(world, gens, 3 * local)
    machines = world // local
    out_p = math.floor(math.log2(machines - 1)) + 1
    in_p = math.floor(math.log2(local - 2)) + 1
    for t, r in itertools.product(range(3 * local), range(world)):
        m, lr = divmod(r, local)
        out = t % local
        s = rounds[r][t][0][0]
        if lr == out:
            assert s == ((m + 2 ** (t % out_p)) % machines) * local + lr
        else:
            d = 2 ** (t % in_p)
            d += 1 if d >= (out - lr) % local else 0
            assert s == m * local + (lr + d) % local


def test_inner_outer_errors():
    with pytest.raises(ValueError, match="more than 2 processes"):
        tu.GetInnerOuterRingDynamicSendRecvRanks(8, 2, 0)
    with pytest.raises(ValueError, match="more than 2 processes"):
        tu.GetInnerOuterExpo2DynamicSendRecvRanks(8, 2, 0)
    with pytest.raises(ValueError, match="at least two machines"):
        tu.GetInnerOuterExpo2DynamicSendRecvRanks(4, 4, 0)
    with pytest.raises(ValueError, match="out of range"):
        tu.GetInnerOuterRingDynamicSendRecvRanks(8, 4, 8)
