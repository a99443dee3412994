"""Base-(k+1), Simple Base-(k+1) and k-peer hyper-hypercube graphs (Takezawa et al. 2023).

Expected lengths come from closed forms computed here independently of the library
(base-(k+1) digits via ``numpy.base_repr``, smoothness by trial division, minimal
factor counts by brute force), and from the length table in docs/basegraph.rst
(the lengths of the authors' reference code, which decomm keeps).
Exactness is checked by applying every round sparsely to the identity matrix, i.e.
the whole cycle product is compared with J/n.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import pytest

from decomm.topology import BaseGraph, HyperHypercube, SimpleBaseGraph, Topology

# ----------------------------------------------------------------------------- independent model


def _prime_factors(n: int) -> list[int]:
    out, f = [], 2
    while f * f <= n:
        while n % f == 0:
            out.append(f)
            n //= f
        f += 1
    if n > 1:
        out.append(n)
    return out


def _is_smooth(n: int, k: int) -> bool:
    return all(p <= k + 1 for p in _prime_factors(n))


@cache
def _min_factors(n: int, k: int) -> int:
    """Brute force: fewest factors in [2, k+1] with product n."""
    if n == 1:
        return 0
    return 1 + min(_min_factors(n // f, k) for f in range(2, k + 2) if n % f == 0)


def _hh_len(n: int, k: int) -> int:
    return max(_min_factors(n, k), 1)


def _simple_len(n: int, k: int) -> int:
    if _is_smooth(n, k):
        return _hh_len(n, k)
    digits = np.base_repr(n, k + 1)
    p0, a0 = len(digits) - 1, int(digits[0], 36)
    return 2 * p0 + 1 + (a0 > 1)


def _base_len(n: int, k: int) -> int:
    p = math.prod(f for f in _prime_factors(n) if f <= k + 1)
    return min(_simple_len(n, k), _simple_len(n // p, k) + _hh_len(p, k))


# ----------------------------------------------------------------------------- checks


def _check_rounds(topo: Topology, k: int) -> None:
    """Every round: degree <= k (in and out, self excluded), doubly stochastic,
    non-negative, symmetric."""
    for t in range(topo.rounds):
        r = topo.sparse(t)
        assert r.in_degrees().max() <= k and r.out_degrees().max() <= k, (topo, t)
        assert np.all(r.data > 0)
        assert np.abs(r.row_sums() - 1).max() < 1e-12, (topo, t)
        assert np.abs(r.col_sums() - 1).max() < 1e-12, (topo, t)
        assert r.is_symmetric(0.0), (topo, t)


def _check_exact_full(topo: Topology) -> None:
    """Cycle product (W(L-1)...W(0) applied to I, sparsely) equals J/n to 1e-10."""
    x = np.eye(topo.n)
    for t in range(topo.rounds):
        x = topo.sparse(t).matmul(x)
    assert np.abs(x - 1.0 / topo.n).max() < 1e-10, topo


def _check_exact_random(topo: Topology, vectors: int = 8) -> None:
    x = np.random.default_rng(topo.n).standard_normal((topo.n, vectors))
    y = x
    for t in range(topo.rounds):
        y = topo.sparse(t).matmul(y)
    assert np.abs(y - x.mean(axis=0)).max() < 1e-10, topo


def _theorem1(n: int, k: int) -> float:
    return 2 * math.log(n) / math.log(k + 1) + 2 + 1e-9


@pytest.mark.parametrize("k", range(1, 7))
def test_base_and_simple_every_n_up_to_200(k: int) -> None:
    for n in range(1, 201):
        simple, base = SimpleBaseGraph(n, k), BaseGraph(n, k)
        assert simple.rounds == _simple_len(n, k), (n, k)
        assert base.rounds == _base_len(n, k), (n, k)
        assert base.rounds <= simple.rounds
        assert base.rounds <= _theorem1(n, k) and simple.rounds <= _theorem1(n, k)
        for topo in (simple, base):
            _check_rounds(topo, k)
            _check_exact_full(topo)


# docs/basegraph.rst, "Lengths": n -> [(Base length, Simple length, Base max degree), k = 1..4]
TABLE = {
    5: [(5, 5, 1), (3, 3, 2), (3, 3, 3), (1, 1, 4)],
    10: [(6, 7, 1), (4, 5, 2), (4, 4, 3), (2, 2, 4)],
    16: [(4, 4, 1), (4, 4, 1), (2, 2, 3), (2, 2, 3)],
    25: [(9, 9, 1), (6, 6, 2), (5, 5, 3), (2, 2, 4)],
    32: [(5, 5, 1), (5, 5, 1), (3, 3, 3), (3, 3, 3)],
    50: [(10, 11, 1), (7, 7, 2), (6, 6, 3), (3, 3, 4)],
    64: [(6, 6, 1), (6, 6, 1), (3, 3, 3), (3, 3, 3)],
}
# n -> [(Base, Simple or None) for k = 1..4]
LARGE = {
    100: [(11, 13), (8, 9), (6, 7), (3, 3)],
    128: [(7, None), (7, None), (4, None), (4, None)],
    200: [(12, 15), (9, 10), (7, 8), (4, 4)],
    256: [(8, None), (8, None), (4, None), (4, None)],
    500: [(15, 17), (11, 12), (8, 9), (4, 4)],
    1000: [(16, 19), (12, 13), (9, 10), (5, 5)],
}


@pytest.mark.parametrize("n", sorted(TABLE))
def test_length_table_of_reference_code(n: int) -> None:
    for k, (base_len, simple_len, degree) in enumerate(TABLE[n], start=1):
        base, simple = BaseGraph(n, k), SimpleBaseGraph(n, k)
        assert (base.rounds, simple.rounds, base.max_degree()) == (base_len, simple_len, degree)


@pytest.mark.parametrize("n", sorted(LARGE))
def test_length_table_large_n(n: int) -> None:
    for k, (base_len, simple_len) in enumerate(LARGE[n], start=1):
        assert BaseGraph(n, k).rounds == base_len
        if simple_len is not None:
            assert SimpleBaseGraph(n, k).rounds == simple_len


SPOT_N = [243, 244, 300, 323, 325, 330, 400, 485, 729, 973, 1000, 1053, 1100, 1536, 1999, 2000]


@pytest.mark.parametrize("n", SPOT_N)
def test_spot_checks_up_to_2000(n: int) -> None:
    """Includes the k = 2 cases where the reference code has degree 3 (244..323,
    973..1053) or crashes (325..485)."""
    for k in range(1, 7):
        simple, base = SimpleBaseGraph(n, k), BaseGraph(n, k)
        assert simple.rounds == _simple_len(n, k) and base.rounds == _base_len(n, k)
        assert base.rounds <= simple.rounds <= _theorem1(n, k)
        for topo in (simple, base):
            assert topo.max_degree() <= k
            assert topo.is_doubly_stochastic()
            _check_exact_random(topo)


def test_reference_code_bugs_are_fixed() -> None:
    sb = SimpleBaseGraph(1000, 2)  # reference: degree 3, float32 product
    assert sb.max_degree() == 2 and sb.rounds == 13
    assert sb.is_finite_time_exact(1e-13)
    sb = SimpleBaseGraph(250, 2)  # reference: degree 3, 10 rounds
    assert sb.max_degree() == 2 and sb.rounds == 11


def test_simple_base_example_n5_k1() -> None:
    """docs/basegraph.rst §2 example: r2 = edge 3-4 (4/5, self 1/5 each), inner edge 0-1
    (1/2), 2 idle."""
    t = SimpleBaseGraph(5, 1)
    expect = np.zeros((5, 5))
    expect[3, 3] = expect[4, 4] = 1 / 5
    expect[3, 4] = expect[4, 3] = 4 / 5
    expect[0, 0] = expect[0, 1] = expect[1, 0] = expect[1, 1] = 1 / 2
    expect[2, 2] = 1.0
    np.testing.assert_allclose(t.matrix(2), expect, atol=1e-15)
    assert t.in_neighbors(4, 3) == [] and t.in_neighbors(4, 4) == []
    np.testing.assert_allclose(t.matrix(0), t.matrix(3), atol=0)


def test_base_example_n6_k1() -> None:
    """SB(3) on {0,1,2} and {3,4,5} (3 rounds), then HH(2) on {0,3}, {1,4}, {2,5}."""
    t = BaseGraph(6, 1)
    assert t.rounds == 4 and SimpleBaseGraph(6, 1).rounds == 5
    assert [t.in_neighbors(i, 3) for i in range(6)] == [[3], [4], [5], [0], [1], [2]]
    assert t.weights(0, 3) == (0.5, {3: 0.5})
    w1 = t.matrix(1)
    np.testing.assert_allclose(w1[1, 2], 2 / 3)  # absorb round of SB(3): 2/3
    np.testing.assert_allclose(w1[4, 5], 2 / 3)
    assert t.details["variant"] == "composite" and (t.details["p"], t.details["q"]) == (2, 3)


def test_base_falls_back_to_simple_when_shorter() -> None:
    # n = 22, k = 4: p = 2, q = 11: composite = SB(11) + HH(2) = 5 rounds > SB(22) = 4
    t = BaseGraph(22, 4)
    assert t.rounds == 4 and t.details["variant"] == "simple"
    assert BaseGraph(10, 3).details["variant"] == "composite"  # ties go to the composite


@pytest.mark.parametrize("k", range(1, 5))
def test_hyper_hypercube_exact_iff_smooth(k: int) -> None:
    for n in range(1, 101):
        if _is_smooth(n, k):
            t = HyperHypercube(n, k)
            assert t.rounds == _hh_len(n, k)
            _check_rounds(t, k)
            _check_exact_full(t)
        else:
            bad = min(p for p in _prime_factors(n) if p > k + 1)
            with pytest.raises(ValueError, match=f"prime factor {bad} > k\\+1"):
                HyperHypercube(n, k)


def test_hyper_hypercube_structure_and_minimal_factorisation() -> None:
    t = HyperHypercube(12, 3)  # factors [3, 4]: strides 1 and 3
    assert t.details["factors"] == [3, 4]
    assert t.in_neighbors(4, 0) == [3, 5] and t.in_neighbors(4, 1) == [1, 7, 10]
    np.testing.assert_allclose(t.weights(4, 1)[0], 1 / 4)
    # k = 7, n = 216: greedy 8*3*3*3 (4 rounds) vs minimal 6*6*6 (3 rounds)
    t = HyperHypercube(216, 7)
    assert t.rounds == 3 == _min_factors(216, 7) and t.details["factors"] == [6, 6, 6]
    assert t.is_finite_time_exact()
    assert HyperHypercube(1, 3).rounds == 1 and HyperHypercube(1, 3).matrix(0).tolist() == [[1.0]]


@pytest.mark.parametrize("ctor", [SimpleBaseGraph, BaseGraph, HyperHypercube])
@pytest.mark.parametrize("bad", [(0, 1), (-3, 1), (2.5, 1), ("4", 1), (True, 1)])
def test_bad_n(ctor, bad) -> None:
    with pytest.raises(ValueError, match="n must be"):
        ctor(*bad)


@pytest.mark.parametrize("ctor", [SimpleBaseGraph, BaseGraph, HyperHypercube])
@pytest.mark.parametrize("k", [0, -1, 1.5, None])
def test_bad_k(ctor, k) -> None:
    with pytest.raises(ValueError, match="k must be"):
        ctor(8, k)


def test_large_n_builds_sparse() -> None:
    t = BaseGraph(10_000, 3)
    assert t.rounds == 12 and t.max_degree() == 3
    assert all(t.sparse(s).nnz <= 4 * 10_000 for s in range(t.rounds))
    self_w, nb = t.weights(9_999, 10**12)
    assert len(nb) <= 3 and abs(self_w + sum(nb.values()) - 1) < 1e-12
    _check_exact_random(t, vectors=2)


def test_deterministic_fingerprint() -> None:
    assert BaseGraph(50, 2).fingerprint() == BaseGraph(50, 2).fingerprint()
    assert BaseGraph(50, 2).fingerprint() != BaseGraph(50, 3).fingerprint()
    assert BaseGraph(50, 2).fingerprint() != SimpleBaseGraph(50, 2).fingerprint()
