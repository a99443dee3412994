"""decomm.topology: the Topology type, the classic graphs, EquiTopo, analysis, CLI.

Numbers are checked against closed forms (circulant eigenvalues, ring/torus/star
spectra, Metropolis-Hastings weights computed by hand) or dense computations done
here, never against the library's own analysis helpers alone.
"""

from __future__ import annotations

import doctest
import importlib
import math
import subprocess
import sys
from pathlib import Path

import networkx as nx
import numpy as np
import pytest

import decomm.topology as T
from decomm.topology import (
    BaseGraph,
    EquiDyn,
    EquiStatic,
    ExponentialGraph,
    FullyConnectedGraph,
    HypercubeGraph,
    OnePeerExponentialGraph,
    RingGraph,
    StarGraph,
    Topology,
    TorusGraph,
    plot_consensus,
)
from decomm.topology.__main__ import main as cli_main

# doubly stochastic, not symmetric
DIRECTED = np.array([[0.5, 0.5, 0.0, 0.0],
                     [0.0, 0.25, 0.75, 0.0],
                     [0.0, 0.0, 0.25, 0.75],
                     [0.5, 0.25, 0.0, 0.25]])


def _second_modulus(w: np.ndarray) -> float:
    ev = np.sort(np.abs(np.linalg.eigvals(w)))
    return float(ev[-2])


# ----------------------------------------------------------------------------- Topology core


def test_import_is_self_contained() -> None:
    """decomm.topology imports with a bare stand-in for the decomm package (as if
    decomm/__init__.py failed) and never pulls in MPI, torch, the runtime, networkx
    or matplotlib."""
    root = Path(__file__).resolve().parents[2]
    code = (
        "import sys, types\n"
        "pkg = types.ModuleType('decomm'); pkg.__path__ = [sys.argv[1]]\n"
        "sys.modules['decomm'] = pkg\n"
        "import decomm.topology as t\n"
        "assert t.BaseGraph(25, 2).is_finite_time_exact()\n"
        "bad = [m for m in ('mpi4py', 'torch', 'networkx', 'matplotlib', 'decomm.runtime',\n"
        "                   'decomm.ops', 'decomm._C') if m in sys.modules]\n"
        "print(bad)\n")
    out = subprocess.run([sys.executable, "-c", code, str(root / "decomm")], capture_output=True,
                         text=True, check=True, cwd=str(root))
    assert out.stdout.strip() == "[]"


_BLOCK_NETWORKX = """
import sys

class BlockNetworkx:  # as if networkx were not installed
    def find_spec(self, name, path=None, target=None):
        if name == "networkx" or name.startswith("networkx."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, BlockNetworkx())
"""


def test_decomm_and_topologies_work_without_networkx() -> None:
    """networkx is an optional extra: import decomm (optimizers and simulator too), build,
    analyse and simulate topologies with it blocked; only to_networkx needs it, and its
    ImportError says how to install it."""
    root = Path(__file__).resolve().parents[2]
    code = _BLOCK_NETWORKX + (
        "import numpy as np\n"
        "import decomm, decomm.optim, decomm.sim\n"
        "from decomm.topology import BaseGraph, EquiDyn, RingGraph, Topology, by_name\n"
        "t = BaseGraph(25, 2)\n"
        "assert t.is_finite_time_exact() and t.spectral_gap() == 1.0\n"
        "assert abs(EquiDyn(16).spectral_gap() - (1 - (0.5 - 0.5 / 16) ** 0.5)) < 1e-12\n"
        "assert by_name('ring', 5).max_degree() == 2\n"
        "w = Topology.from_matrices(RingGraph(4).matrix(0))\n"
        "x = np.arange(4.0)\n"
        "assert np.allclose(w.mix(x, 0), RingGraph(4).matrix(0) @ x)\n"
        "try:\n"
        "    t.to_networkx(0)\n"
        "except ImportError as exc:\n"
        "    print('to_networkx:', exc)\n"
        "assert 'networkx' not in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=str(root), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (
        "to_networkx: Topology.to_networkx needs networkx, an optional dependency of decomm: "
        "pip install 'decomm[networkx]' (or pip install networkx)")


def test_from_matrices_queries() -> None:
    t = Topology.from_matrices([DIRECTED, DIRECTED.T])
    assert t.n == 4 and t.rounds == 2
    assert t.weights(1, 0) == (0.25, {2: 0.75})
    assert t.in_neighbors(1, 0) == [2] and t.out_neighbors(1, 0) == [0, 3]
    assert t.out_weights(2, 0) == {1: 0.75}
    assert t.out_weights(1, 0) == {0: 0.5, 3: 0.25}
    assert t.in_neighbors(1, 1) == [0, 3] and t.out_neighbors(1, 1) == [2]
    # absolute round t reduces modulo the cycle, also for huge t
    assert t.weights(1, 10**18) == t.weights(1, 0) and t.weights(1, 10**18 + 1) == t.weights(1, 1)
    np.testing.assert_array_equal(t.matrix(7), DIRECTED.T)
    x = np.arange(8.0).reshape(4, 2)
    np.testing.assert_allclose(t.mix(x, 0), DIRECTED @ x)
    np.testing.assert_allclose(t.cycle_product(), DIRECTED.T @ DIRECTED)
    assert not hasattr(t, "product")  # the alias is gone: cycle_product is the one name
    assert t.is_doubly_stochastic() and not t.is_symmetric() and t.max_degree() == 2
    assert "from_matrices" in repr(t)


def test_from_matrices_accepts_torch_and_single_matrix() -> None:
    torch = pytest.importorskip("torch")
    t = Topology.from_matrices(torch.tensor(DIRECTED))
    assert t.rounds == 1 and t.weights(0, 0) == (0.5, {1: 0.5})
    t2 = Topology.from_matrices([torch.tensor(DIRECTED, dtype=torch.float32)])
    assert t2.in_neighbors(3, 0) == [0, 1]
    t3 = Topology.from_matrices([torch.full((4, 4), 0.25, dtype=torch.bfloat16)])
    assert t3.weights(0, 0) == (0.25, {1: 0.25, 2: 0.25, 3: 0.25})
    assert Topology.from_matrices([[1.0]]).rounds == 1


def test_row_stochastic_only_is_accepted_but_not_doubly() -> None:
    w = np.array([[1.0, 0.0], [0.5, 0.5]])
    t = Topology.from_matrices([w])
    assert t.is_row_stochastic() and not t.is_doubly_stochastic()


@pytest.mark.parametrize("mats, pattern", [
    ([], "at least one"),
    ([np.ones((2, 3)) / 3], "round 0: matrix must be square"),
    ([np.eye(2), np.eye(3)], "round 1: size 3 differs"),
    ([np.eye(2), np.array([[np.nan, 1.0], [0.0, 1.0]])], r"round 1: entry W\[0, 0\] = nan"),
    ([np.array([[1.5, -0.5], [0.0, 1.0]])], r"round 0: negative weight W\[0, 1\] = -0.5"),
    ([np.eye(3), np.eye(3), np.array([[1.0, 0, 0], [0, 0.5, 0.4], [0, 0, 1]])],
     r"round 2: row 1 sums to 0.9"),
    ("abc", "round 0"),
])
def test_from_matrices_errors(mats, pattern) -> None:
    with pytest.raises(ValueError, match=pattern):
        Topology.from_matrices(mats)


def test_bad_round_and_node_indices() -> None:
    t = RingGraph(4)
    for bad_t in (-1, 1.5, "0", None):
        with pytest.raises(ValueError, match="round t"):
            t.weights(0, bad_t)
    for bad_i in (-1, 4, 2.0):
        with pytest.raises(ValueError, match="node index"):
            t.in_neighbors(bad_i, 0)
    with pytest.raises(ValueError, match="leading dimension"):
        t.mix(np.zeros(3), 0)
    assert t.weights(0, np.int64(3)) == t.weights(0, 0)


def test_tolerance_scales_with_n() -> None:
    n = 100
    w = np.full((n, n), 1.0 / n)
    w[0, 0] += 5e-11  # within 1e-12 * n
    Topology.from_matrices([w])
    w[0, 0] += 1e-9
    with pytest.raises(ValueError, match="row 0 sums"):
        Topology.from_matrices([w])


RING4 = [[1 / 3, 1 / 3, 0.0, 1 / 3], [1 / 3, 1 / 3, 1 / 3, 0.0],
         [0.0, 1 / 3, 1 / 3, 1 / 3], [1 / 3, 0.0, 1 / 3, 1 / 3]]
F32_THIRD = float(np.float32(1 / 3))  # 0.3333333432674408: rows sum to 1 + 2.98e-8
EPS32 = 2.0**-23


def test_float32_ring_is_accepted_with_the_float32_tolerance() -> None:
    """The docs' 1/3 ring as a default (float32) torch tensor: rows sum to 3 * fl32(1/3)
    = 1 + 2.98e-8 > 1e-12 * n, well inside the float32 tolerance 2 eps n = 9.5e-7."""
    torch = pytest.importorskip("torch")
    w = torch.tensor(RING4)
    assert w.dtype == torch.float32
    assert abs(3 * F32_THIRD - 1 - 2.9802322387695312e-08) < 1e-20
    for given in (w, [w], w.numpy(), [[np.float32(v) for v in row] for row in RING4]):
        t = Topology.from_matrices(given)
        assert t.stochastic_tol == 4 * 2 * EPS32  # n * 2 eps
        assert t.matrix(0)[0, 0] == F32_THIRD  # the given values, as float64, unrounded
        assert t.matrix(0).dtype == np.float64
        assert t.is_row_stochastic() and t.is_doubly_stochastic()
        # the check runtime.set_topology / set_machine_topology make
        assert t.is_row_stochastic(max(1e-9, t.stochastic_tol))
        assert not t.is_row_stochastic(1e-9)  # what they checked before: rejected
    # float64 input keeps the float64 tolerance; the same float32 values are then wrong
    f64 = Topology.from_matrices(np.array(RING4))
    assert f64.stochastic_tol == 4 * 1e-12 == RingGraph(4).stochastic_tol
    with pytest.raises(ValueError, match=r"row 0 sums to 1.0000000298.* within 4e-12.*float64"):
        Topology.from_matrices(w.double())
    # a float32 row that is really off (1e-5 > 9.5e-7) is still rejected, naming float32
    bad = w.clone()
    bad[2, 2] += 1e-5
    with pytest.raises(ValueError, match=r"round 0: row 2 sums to 1.00001.*float32 input with n=4"):
        Topology.from_matrices(bad)


def test_stochastic_tolerance_follows_the_dtype() -> None:
    torch = pytest.importorskip("torch")
    assert T.stochastic_tolerance(100) == 100 * 1e-12  # float64: 1e-12 n
    assert T.stochastic_tolerance(100, EPS32) == 100 * 2 * EPS32
    assert T.stochastic_tolerance(10**6, EPS32) == 1e-2  # capped: 1% is never rounding
    # bfloat16 1/3 = 0.333984375: a row of three sums to 1.00195, inside the cap 1e-2
    # (2 eps n = 0.0625 at n=4; rounding moves a row sum by at most 2^-8 = 0.0039)
    t = Topology.from_matrices(torch.tensor(RING4, dtype=torch.bfloat16))
    assert t.matrix(0)[0, 0] == 0.333984375 and t.stochastic_tol == 1e-2
    half = Topology.from_matrices(np.array(RING4, dtype=np.float16))
    assert half.stochastic_tol == 4 * 2 * 2.0**-10
    # a list of rounds: the least precise round sets the topology's tolerance
    mixed = Topology.from_matrices([np.eye(4), torch.tensor(RING4)])
    assert mixed.stochastic_tol == 8 * EPS32
    exact = Topology.from_matrices(np.eye(3, dtype=np.int64))  # integers are exact
    assert exact.stochastic_tol == 3 * 1e-12


def test_directed_networkx_with_float32_weights() -> None:
    g = nx.DiGraph()
    for i in range(4):
        for j in range(4):
            if RING4[i][j]:
                g.add_edge(j, i, weight=np.float32(RING4[i][j]))  # j sends to i
    t = Topology.from_networkx(g)
    assert t.stochastic_tol == 8 * EPS32 and t.matrix(0)[1, 2] == F32_THIRD
    g[0][1]["weight"] = np.float32(0.5)  # W[1, 0]: row 1 now sums to 1.1667
    with pytest.raises(ValueError, match="row 1 sums to 1.166"):
        Topology.from_networkx(g)


def test_fingerprint_compares_the_matrices_not_the_construction() -> None:
    ring = RingGraph(4)
    same = [Topology.from_matrices(ring.matrix(0)), Topology.from_matrices([ring.matrix(0)]),
            Topology.from_networkx(nx.cycle_graph(4)), Topology.from_matrices(RING4, name="x")]
    assert {t.fingerprint() for t in same} == {ring.fingerprint()}
    # 1 - 2/3 (networkx's diagonal) is one ulp above 1/3 (RingGraph's): same schedule
    assert Topology.from_networkx(nx.cycle_graph(4)).matrix(0)[0, 0] != ring.matrix(0)[0, 0]
    for n in range(3, 60):
        assert RingGraph(n).fingerprint() == Topology.from_networkx(nx.cycle_graph(n)).fingerprint()
        assert (FullyConnectedGraph(n).fingerprint()
                == Topology.from_networkx(nx.complete_graph(n)).fingerprint())
        star = Topology.from_networkx(nx.star_graph(n - 1))
        assert StarGraph(n).fingerprint() == star.fingerprint()
    # the same matrices under two constructors' names: one schedule
    assert RingGraph(3).fingerprint() == FullyConnectedGraph(3).fingerprint()  # both J/3
    b = BaseGraph(12, 2)
    assert Topology.from_matrices([b.matrix(t) for t in range(b.rounds)]).fingerprint() \
        == b.fingerprint()
    # what tells schedules apart: n, the number of rounds, the pattern and the weights
    a = ring.matrix(0)
    assert Topology.from_matrices([a, a]).fingerprint() != ring.fingerprint()
    assert Topology.from_matrices([a, np.eye(4)]).fingerprint() \
        != Topology.from_matrices([np.eye(4), a]).fingerprint()
    nudged = a.copy()
    nudged[0, 0] += 1e-12  # above the 2^-40 = 9.1e-13 grid
    nudged[0, 1] -= 1e-12
    assert Topology.from_matrices(nudged).fingerprint() != ring.fingerprint()
    # random families are told apart by their parameters (no stored rounds)
    assert EquiDyn(8, seed=1).fingerprint() != EquiDyn(8, seed=1, eta=0.25).fingerprint()


def _expected_ring4_digest() -> str:
    """The documented definition, by hand: header, then CSR of W = (I + S + S^T) / 3
    with every weight on the 2^-40 grid (rint(2^40 / 3) = 366503875925)."""
    import hashlib
    import json

    h = hashlib.sha256(json.dumps({"schedule": "cycle", "n": 4, "rounds": 1},
                                  sort_keys=True).encode())
    h.update(np.array([0, 3, 6, 9, 12], dtype="<i8").tobytes())
    h.update(np.array([0, 1, 3, 0, 1, 2, 1, 2, 3, 0, 2, 3], dtype="<i8").tobytes())
    h.update(np.full(12, 366503875925.0, dtype="<f8").tobytes())
    return h.hexdigest()


def _expected_equidyn_digest() -> str:
    import hashlib
    import json

    params = {"eta": "0.5", "n": "8", "seed": "3", "undirected": "False"}
    return hashlib.sha256(json.dumps({"schedule": "random", "kind": "EquiDyn", "n": 8,
                                      "params": params}, sort_keys=True).encode()).hexdigest()


PINNED_RING4 = "2f5b3a12d0dd29ab867aae7c7a6483a5067339731491db8b240672ddc61ea94e"
PINNED_EQUIDYN8 = "ef62058a8256de0b5ef0bbf99d8ab5682cf3da616e8b15924711f444279c9aa3"


def test_fingerprint_is_stable() -> None:
    """The digest follows its documented definition and is pinned: the same schedule
    gives the same fingerprint in every process, machine and later version (ranks and
    checkpoints compare them)."""
    assert _expected_ring4_digest() == PINNED_RING4
    assert _expected_equidyn_digest() == PINNED_EQUIDYN8
    assert RingGraph(4).fingerprint() == PINNED_RING4
    assert EquiDyn(8, seed=3).fingerprint() == PINNED_EQUIDYN8
    code = ("from decomm.topology import RingGraph, EquiDyn;"
            "print(RingGraph(4).fingerprint(), EquiDyn(8, seed=3).fingerprint())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONHASHSEED": "123", "PATH": "/usr/bin:/bin"},
                         cwd=Path(__file__).resolve().parent.parent.parent, check=True)
    assert out.stdout.split() == [PINNED_RING4, PINNED_EQUIDYN8]


def test_fingerprint() -> None:
    a = Topology.from_matrices([DIRECTED])
    b = Topology.from_matrices([DIRECTED.copy()])
    c = Topology.from_matrices([DIRECTED.T])
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert len(a.fingerprint()) == 64
    assert RingGraph(8).fingerprint() != RingGraph(9).fingerprint()
    assert EquiDyn(8, seed=1).fingerprint() == EquiDyn(8, seed=1).fingerprint()
    assert EquiDyn(8, seed=1).fingerprint() != EquiDyn(8, seed=2).fingerprint()


def test_from_networkx_metropolis_hastings() -> None:
    g = nx.Graph([(0, 1), (0, 2), (0, 3), (3, 4), (1, 1)])  # self-loop ignored
    t = Topology.from_networkx(g)
    deg = {0: 3, 1: 1, 2: 1, 3: 2, 4: 1}
    expect = np.zeros((5, 5))
    for u, v in [(0, 1), (0, 2), (0, 3), (3, 4)]:
        expect[u, v] = expect[v, u] = 1.0 / (1 + max(deg[u], deg[v]))
    np.fill_diagonal(expect, 1 - expect.sum(axis=1))
    np.testing.assert_allclose(t.matrix(0), expect, atol=1e-15)
    assert t.is_symmetric() and t.is_doubly_stochastic()


def test_networkx_round_trip_and_errors() -> None:
    t = OnePeerExponentialGraph(6)
    g = t.to_networkx(1)
    assert g.has_edge(0, 2) and g[0][2]["weight"] == 0.5  # 0 sends to 0 + 2
    np.testing.assert_array_equal(Topology.from_networkx(g).matrix(0), t.matrix(1))
    with pytest.raises(ValueError, match=r"integers 0\.\.n-1"):
        Topology.from_networkx(nx.path_graph(["a", "b"]))
    with pytest.raises(ValueError, match="no nodes"):
        Topology.from_networkx(nx.Graph())
    dg = nx.DiGraph([(0, 1)])
    with pytest.raises(ValueError, match="no 'weight'"):
        Topology.from_networkx(dg)


# ----------------------------------------------------------------------------- static graphs


@pytest.mark.parametrize("n", range(3, 40))
def test_ring(n: int) -> None:
    t = RingGraph(n)
    assert t.weights(0, 0) == (1 / 3, {1: 1 / 3, n - 1: 1 / 3}) or n == 3
    assert t.max_degree() == 2 and t.is_symmetric() and t.is_doubly_stochastic()
    gap = 1 - (1 + 2 * math.cos(2 * math.pi / n)) / 3
    assert abs(t.spectral_gap() - gap) < 1e-10


def test_ring_small_n() -> None:
    assert RingGraph(1).matrix(0).tolist() == [[1.0]]
    assert RingGraph(2).matrix(0).tolist() == [[0.5, 0.5], [0.5, 0.5]]
    assert RingGraph(2).spectral_gap() == pytest.approx(1.0)
    assert RingGraph(3).is_finite_time_exact()  # 3 nodes: W = J/3


@pytest.mark.parametrize("n", [9, 12, 15, 16, 20, 25, 30, 36, 49, 64])
def test_torus_spectrum(n: int) -> None:
    t = TorusGraph(n)
    r, c = t.details["shape"]
    assert r * c == n and r == max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    assert t.max_degree() == 4 and t.is_symmetric() and t.is_doubly_stochastic()
    lam = [(1 + 2 * math.cos(2 * math.pi * p / r) + 2 * math.cos(2 * math.pi * q / c)) / 5
           for p in range(r) for q in range(c) if (p, q) != (0, 0)]
    assert abs(t.spectral_gap() - (1 - max(abs(x) for x in lam))) < 1e-10


def test_torus_degenerate_shapes() -> None:
    np.testing.assert_allclose(TorusGraph(7).matrix(0), RingGraph(7).matrix(0))  # prime: 1 x 7
    t = TorusGraph(8)  # 2 x 4: one vertical neighbour
    assert t.details["shape"] == (2, 4) and t.max_degree() == 3
    assert t.weights(0, 0)[0] == 0.25 and t.is_doubly_stochastic()


@pytest.mark.parametrize("n", [3, 5, 10, 33])
def test_star(n: int) -> None:
    t = StarGraph(n)
    assert t.max_degree() == n - 1 and t.is_symmetric() and t.is_doubly_stochastic()
    assert t.out_neighbors(0, 0) == list(range(1, n))
    assert abs(t.spectral_gap() - 1 / n) < 1e-10


def test_fully_connected() -> None:
    t = FullyConnectedGraph(7)
    np.testing.assert_allclose(t.matrix(0), np.full((7, 7), 1 / 7))
    assert t.is_finite_time_exact() and t.spectral_gap() == pytest.approx(1.0)
    assert FullyConnectedGraph(1).max_degree() == 0


# ----------------------------------------------------------------------------- exponential


@pytest.mark.parametrize("n", [2, 3, 5, 8, 12, 17, 32, 100])
def test_static_exponential(n: int) -> None:
    t = ExponentialGraph(n)
    tau = math.ceil(math.log2(n))
    self_w, nb = t.weights(0, 0)
    assert self_w == pytest.approx(1 / (tau + 1))
    assert nb == pytest.approx({(-(2 ** j)) % n: 1 / (tau + 1) for j in range(tau)})
    assert t.out_neighbors(0, 0) == sorted(2 ** j % n for j in range(tau))
    assert t.max_degree() == tau and t.is_doubly_stochastic()
    assert t.is_symmetric() == (n <= 3)  # n = 3: offsets 1 and 2 = -1
    # circulant: eigenvalues are the DFT of the first column
    lam = np.fft.fft(t.matrix(0)[:, 0])
    assert abs(t.spectral_gap() - (1 - np.sort(np.abs(lam))[-2])) < 1e-10


@pytest.mark.parametrize("n", range(1, 131))
def test_one_peer_exponential_exact_iff_power_of_two(n: int) -> None:
    t = OnePeerExponentialGraph(n)
    assert t.rounds == max(1, math.ceil(math.log2(n)) if n > 1 else 1)
    assert t.is_doubly_stochastic()
    if n > 1:
        assert t.max_degree() == 1
    power = n & (n - 1) == 0
    assert t.is_finite_time_exact() == power
    if not power:  # independent check: the dense product is visibly not J/n
        p = np.linalg.multi_dot([t.matrix(s) for s in reversed(range(t.rounds))] + [np.eye(n)])
        assert np.abs(p - 1 / n).max() > 1e-3


def test_one_peer_direction() -> None:
    t = OnePeerExponentialGraph(10)
    for s in range(t.rounds):
        assert t.in_neighbors(3, s) == [(3 - 2 ** s) % 10]
        assert t.out_neighbors(3, s) == [(3 + 2 ** s) % 10]
        assert t.weights(3, s) == (0.5, {(3 - 2 ** s) % 10: 0.5})


def test_hypercube() -> None:
    for n in (1, 2, 4, 8, 64):
        t = HypercubeGraph(n)
        assert t.rounds == max(1, int(math.log2(n))) and t.is_finite_time_exact()
        assert t.is_symmetric() and t.max_degree() == (1 if n > 1 else 0)
    assert HypercubeGraph(16).in_neighbors(5, 3) == [13]
    for n in (3, 6, 12, 100):
        with pytest.raises(ValueError, match="power of 2"):
            HypercubeGraph(n)


# ----------------------------------------------------------------------------- EquiTopo


def test_equidyn_same_seed_same_rounds() -> None:
    a, b, c = EquiDyn(32, seed=7), EquiDyn(32, seed=7), EquiDyn(32, seed=8)
    assert a.rounds is None and a.is_random
    ts = [0, 1, 2, 99, 10**6, 10**15]
    for t in ts:  # computed independently, any order, O(n) per round
        np.testing.assert_array_equal(a.matrix(t), b.matrix(t))
    b.matrix(10**15)
    assert [a.in_neighbors(0, t) for t in range(20)] == [b.in_neighbors(0, t) for t in range(20)]
    assert [a.in_neighbors(0, t) for t in range(20)] != [c.in_neighbors(0, t) for t in range(20)]
    w = a.matrix(5)
    u = (0 - a.in_neighbors(0, 5)[0]) % 32  # node i receives from i - u
    expect = 0.5 * np.eye(32) + 0.5 * (np.eye(32) / 32 + (31 / 32) * np.roll(np.eye(32), u, axis=0))
    np.testing.assert_allclose(w, expect, atol=1e-15)
    assert a.max_degree() == 1 and a.is_doubly_stochastic() and not a.is_finite_time_exact()
    with pytest.raises(ValueError, match="random family"):
        a.cycle_product()


def test_equidyn_undirected() -> None:
    t = EquiDyn(15, undirected=True, seed=2)
    assert t.is_symmetric() and t.is_doubly_stochastic() and t.max_degree() == 1
    for s in range(10):
        w = t.matrix(s)
        idle = [i for i in range(15) if not t.in_neighbors(i, s)]
        assert len(idle) >= 1  # odd n: some node idles
        off = w - np.diag(np.diag(w))
        assert set(np.round(off[off > 0], 12)) <= {round(0.5 * 14 / 15, 12)}


@pytest.mark.parametrize("undirected", [False, True])
def test_equidyn_rate_independent_of_n(undirected: bool) -> None:
    """Song et al. 2022: rho^2 = ||E[(W-J/n)^T (W-J/n)]|| = 1/2 - 1/(2n) <= 1/2 for
    directed EquiDyn with eta = 1/2, whatever n.  Check the gap and the empirical decay."""
    gaps, rates = [], []
    for n in (16, 64, 256):
        t = EquiDyn(n, undirected=undirected, seed=0)
        gaps.append(t.spectral_gap())
        curve = t.consensus_curve(30, trials=4, seed=1)
        rates.append(curve[-1] ** (1 / 30))
        if not undirected:
            assert t.spectral_gap() == pytest.approx(1 - math.sqrt(0.5 - 0.5 / n), abs=1e-14)
    assert min(gaps) > 1 - math.sqrt(0.5)
    assert max(rates) < 0.75  # whereas a ring's per-step decay tends to 1:
    assert RingGraph(256).consensus_curve(30, trials=2)[-1] ** (1 / 30) > 0.9


def _equidyn_rounds_from_definition(n: int, eta: float, undirected: bool):
    """Every round EquiDyn can draw, with its probability, built from Song et al.'s
    definition with dense numpy (independent of decomm's sparse constructors)."""
    shift = np.roll(np.eye(n), 1, axis=0)  # (S x)[i] = x[i - 1]: node i receives from i - 1
    w = eta * (n - 1) / n
    for u in range(1, n):
        if not undirected:
            a = np.eye(n) / n + (n - 1) / n * np.linalg.matrix_power(shift, u)
            yield 1 / (n - 1), (1 - eta) * np.eye(n) + eta * a
            continue
        g = math.gcd(n, u)
        length = n // g
        for start in range(length):  # pairs (p, p+1) along each cycle c, c+u, c+2u, ...
            m = np.eye(n)
            for c in range(g):
                cyc = [(c + u * q) % n for q in range(length)]
                for k in range(length // 2):
                    i, j = cyc[(start + 2 * k) % length], cyc[(start + 2 * k + 1) % length]
                    m[i, i] = m[j, j] = 1 - w
                    m[i, j] = m[j, i] = w
            yield 1 / ((n - 1) * length), m


@pytest.mark.parametrize("undirected", [False, True])
@pytest.mark.parametrize(("n", "eta"), [(2, 0.5), (9, 0.5), (12, 0.3), (15, 1.0), (16, 0.5)])
def test_equidyn_spectral_gap_is_exact_over_all_rounds(n: int, eta: float,
                                                       undirected: bool) -> None:
    """spectral_gap() = 1 - rho with rho^2 the largest eigenvalue of the exact expectation
    of (W - J/n)^T (W - J/n) over every round the family can draw (not a sample)."""
    acc = np.zeros((n, n))
    total = 0.0
    for prob, w in _equidyn_rounds_from_definition(n, eta, undirected):
        dev = w - 1 / n
        acc += prob * dev.T @ dev
        total += prob
    assert total == pytest.approx(1.0)
    rho = math.sqrt(np.linalg.eigvalsh(acc).max())
    t = EquiDyn(n, eta=eta, undirected=undirected, seed=4)
    assert t.spectral_gap() == pytest.approx(1 - rho, abs=1e-12)
    # the rounds the generator draws are members of that family
    family = [w for _, w in _equidyn_rounds_from_definition(n, eta, undirected)]
    for s in range(20):
        assert any(np.allclose(t.matrix(s), w, rtol=0, atol=1e-15) for w in family)


def test_equidyn_bound_is_on_the_mean_square_rate_not_the_mean_norm() -> None:
    """n = 16, eta = 1/2: E||W - J/n||_2 over the 15 circulants is 0.990 (0.981 for odd
    u, 1 for even u), far above sqrt(2)/2; the mean-square rate is sqrt(1/2 - 1/32)."""
    n = 16
    norms = [np.linalg.norm(w - 1 / n, 2) for _, w in _equidyn_rounds_from_definition(n, 0.5,
                                                                                      False)]
    assert np.mean(norms) == pytest.approx(0.990, abs=5e-4)
    assert np.allclose(norms[1::2], 1.0) and np.allclose(norms[0::2], 0.981, atol=5e-4)
    assert 1 - EquiDyn(n).spectral_gap() == pytest.approx(math.sqrt(0.5 - 0.5 / n))
    assert 1 - EquiDyn(n).spectral_gap() < math.sqrt(2) / 2 < np.mean(norms)


def test_equistatic() -> None:
    t = EquiStatic(20, 3, seed=4)
    labels = t.details["labels"]
    assert len(set(labels)) == 3 and all(1 <= u <= 19 for u in labels)
    assert t.max_degree() == 3 and t.is_doubly_stochastic() and not t.is_symmetric()
    assert t.in_neighbors(0, 0) == sorted((-u) % 20 for u in labels)
    lam = np.fft.fft(t.matrix(0)[:, 0])  # circulant spectrum
    assert abs(t.spectral_gap() - (1 - np.sort(np.abs(lam))[-2])) < 1e-10
    u = EquiStatic(20, 3, undirected=True, seed=4)
    assert u.is_symmetric() and u.is_doubly_stochastic() and u.max_degree() <= 6
    assert EquiStatic(20, 3, seed=4).fingerprint() != EquiStatic(20, 3, seed=5).fingerprint()
    assert EquiStatic(1, 5).matrix(0).tolist() == [[1.0]]


@pytest.mark.parametrize("call, pattern", [
    (lambda: EquiDyn(0), "n must be"),
    (lambda: EquiDyn(8, eta=0.0), "eta"),
    (lambda: EquiDyn(8, eta=1.5), "eta"),
    (lambda: EquiDyn(8, eta="x"), "eta"),
    (lambda: EquiDyn(8, seed=-1), "seed"),
    (lambda: EquiStatic(8, 0), "m must be"),
    (lambda: EquiStatic(8, 8), "m must be <= n - 1"),
    (lambda: EquiStatic(8, 2, seed=1.5), "seed"),
    (lambda: RingGraph(0), "n must be"),
    (lambda: TorusGraph(-2), "n must be"),
    (lambda: StarGraph(2.0), "n must be"),
    (lambda: FullyConnectedGraph(None), "n must be"),
    (lambda: ExponentialGraph(0), "n must be"),
    (lambda: OnePeerExponentialGraph(True), "n must be"),
    (lambda: HypercubeGraph(0), "n must be"),
])
def test_constructor_errors(call, pattern) -> None:
    with pytest.raises(ValueError, match=pattern):
        call()


# ----------------------------------------------------------------------------- analysis


def test_cycle_product_order() -> None:
    a = np.array([[1.0, 0.0], [1.0, 0.0]])  # everyone copies node 0
    b = np.array([[0.0, 1.0], [0.0, 1.0]])  # everyone copies node 1
    t = Topology.from_matrices([a, b])
    np.testing.assert_array_equal(t.cycle_product(), b @ a)  # x_2 = W(1) W(0) x_0
    x0 = np.array([3.0, 5.0])
    assert t.mix(t.mix(x0, 0), 1).tolist() == (b @ a @ x0).tolist() == [3.0, 3.0]


def test_spectral_gap_of_sequences() -> None:
    t = OnePeerExponentialGraph(6)
    p = t.matrix(2) @ t.matrix(1) @ t.matrix(0)
    rho = np.linalg.svd(p - 1 / 6, compute_uv=False)[0]
    assert t.spectral_gap() == pytest.approx(1 - rho)
    assert t.spectral_gap(per_round=True) == pytest.approx(1 - rho ** (1 / 3))
    assert BaseGraph(10, 2).spectral_gap() == pytest.approx(1.0)
    assert RingGraph(1).spectral_gap() == 1.0


def test_consensus_curve() -> None:
    ring = RingGraph(10).consensus_curve(20, trials=5, seed=3)
    assert ring.shape == (21,) and ring[0] == 1.0 and np.all(np.diff(ring) <= 1e-12)
    base = BaseGraph(10, 2).consensus_curve(6, trials=3)
    assert base[3] > 1e-3 and base[4] < 1e-14  # exact after the 4-round cycle
    # independent: dense iteration of the same start
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 2))
    xbar = x.mean(axis=0)
    w = RingGraph(10).matrix(0)
    y = np.linalg.matrix_power(w, 5) @ x
    expect = np.mean(np.linalg.norm(y - xbar, axis=0) / np.linalg.norm(x - xbar, axis=0))
    assert RingGraph(10).consensus_curve(5, trials=2, seed=0)[5] == pytest.approx(expect)
    assert RingGraph(1).consensus_curve(3).tolist() == [1.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="steps"):
        RingGraph(4).consensus_curve(-1)
    with pytest.raises(ValueError, match="trials"):
        RingGraph(4).consensus_curve(3, trials=0)


def test_plots(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    p1 = tmp_path / "base.png"
    BaseGraph(10, 2).plot(str(p1))
    p2 = tmp_path / "equidyn.png"
    EquiDyn(8).plot(str(p2), max_rounds=3)
    p3 = tmp_path / "curves.png"
    curves = plot_consensus([RingGraph(9), BaseGraph(9, 2)], str(p3), steps=10, trials=2)
    for p in (p1, p2, p3):
        assert p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG"
    assert set(curves) == {"RingGraph(n=9)", "BaseGraph(n=9, k=2)"}
    with pytest.raises(ValueError, match="at least one"):
        plot_consensus([], str(p3))


# ----------------------------------------------------------------------------- CLI, doctests


def test_cli_base(capsys, tmp_path) -> None:
    png = tmp_path / "b.png"
    assert cli_main(["base", "--n", "25", "--k", "2", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "BaseGraph(n=25, k=2)" in out and "rounds             6" in out
    assert "finite-time exact  yes" in out and png.exists()


def test_cli_compare_and_errors(capsys, tmp_path) -> None:
    png = tmp_path / "c.png"
    assert cli_main(["compare", "--n", "16", "--k", "1", "--steps", "12", "--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert "HypercubeGraph(n=16)" in out and "BaseGraph(n=16, k=1)" in out and png.exists()
    assert cli_main(["hh", "--n", "14", "--k", "1"]) == 2
    assert "prime factor 7" in capsys.readouterr().err
    assert cli_main(["equidyn", "--n", "12", "--undirected"]) == 0


@pytest.mark.parametrize("module", ["core", "static", "exponential", "basegraph", "equitopo",
                                    "analysis", "_build", "_sparse", "registry"])
def test_doctests(module: str) -> None:
    mod = importlib.import_module(f"decomm.topology.{module}")
    res = doctest.testmod(mod, verbose=False)
    assert res.failed == 0
    if module == "core":
        assert doctest.testmod(T).failed == 0


# ----------------------------------------------------------------------------- names


def _load_train():
    spec = importlib.util.spec_from_file_location(
        "decomm_example_train_for_names",
        Path(__file__).resolve().parent.parent.parent / "examples" / "train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


DIRECT = {  # name -> the constructor call it stands for, at n = 8
    "base": lambda: BaseGraph(8, 1), "simple-base": lambda: T.SimpleBaseGraph(8, 1),
    "hyper-hypercube": lambda: T.HyperHypercube(8, 1), "exp": lambda: ExponentialGraph(8),
    "one-peer-exp": lambda: OnePeerExponentialGraph(8), "hypercube": lambda: HypercubeGraph(8),
    "ring": lambda: RingGraph(8), "torus": lambda: TorusGraph(8), "star": lambda: StarGraph(8),
    "full": lambda: FullyConnectedGraph(8), "equidyn": lambda: EquiDyn(8, seed=0),
    "equistatic": lambda: EquiStatic(8, 2, seed=0),
}
OLD_SPELLINGS = {"onepeer": "one-peer-exp", "simple": "simple-base", "hh": "hyper-hypercube"}


def test_by_name_registry() -> None:
    assert T.graph_names() == tuple(DIRECT)
    for name, make in DIRECT.items():
        k = {"k": 1} if "k" in T.graph_params(name) else {}
        got, want = T.by_name(name, 8, **k), make()
        assert (got.name, got.fingerprint()) == (want.name, want.fingerprint())
    for old, new in OLD_SPELLINGS.items():
        assert T.canonical_name(old) == new
        k = {"k": 1} if "k" in T.graph_params(old) else {}
        assert T.by_name(old, 8, **k).fingerprint() == DIRECT[new]().fingerprint()
    assert T.canonical_name("One_Peer_Exp") == "one-peer-exp"
    assert T.by_name("equidyn", 8, seed=5, eta=0.25).params == EquiDyn(8, 0.25, seed=5).params
    assert T.by_name("equistatic", 9, m=3).fingerprint() == EquiStatic(9, 3).fingerprint()
    with pytest.raises(ValueError, match=r"unknown topology 'star-of-david'; choose from base, "):
        T.by_name("star-of-david", 8)
    with pytest.raises(ValueError, match=r"'ring' takes no parameter k \(it takes: only n\)"):
        T.by_name("ring", 8, k=2)
    with pytest.raises(ValueError, match=r"'base' needs k"):
        T.by_name("base", 8)


def test_both_command_lines_accept_the_same_names(capsys) -> None:
    """python -m decomm.topology NAME and examples/train.py --topology NAME take the same
    names (canonical and old spellings) and build the same graph."""
    train = _load_train()
    names = list(T.graph_names()) + list(OLD_SPELLINGS)
    for name in names:
        canonical = T.canonical_name(name)
        want = DIRECT[canonical]()
        argv = [name, "--n", "8"] + (["--k", "1"] if "k" in T.graph_params(name) else [])
        assert cli_main(argv) == 0, name
        assert f"topology           {want.name}\n" in capsys.readouterr().out
        assert train.parse_args(["--topology", name]).topology == canonical
        assert train.make_topology(name, 8, k=1, seed=0).fingerprint() == want.fingerprint()
    with pytest.raises(SystemExit):
        train.parse_args(["--topology", "star-of-david"])
    assert "unknown topology 'star-of-david'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["star-of-david", "--n", "8"])
    capsys.readouterr()


def test_every_flag_has_help() -> None:
    import argparse

    train = _load_train()
    parsers = [("train.py", train.build_parser())]
    cli = None
    try:  # the topology CLI's parser is built inside main(); catch it at parse time
        orig = argparse.ArgumentParser.parse_args

        def grab(self, *a, **k):
            nonlocal cli
            cli = self
            raise SystemExit(0)

        argparse.ArgumentParser.parse_args = grab
        with pytest.raises(SystemExit):
            cli_main(["ring", "--n", "4"])
    finally:
        argparse.ArgumentParser.parse_args = orig
    sub = next(a for a in cli._actions if isinstance(a, argparse._SubParsersAction))
    parsers += sorted(set(sub.choices.items()), key=lambda kv: kv[0])
    for label, parser in parsers:
        for action in parser._actions:
            assert action.help and action.help != argparse.SUPPRESS, (label, action.dest)
