"""Tests for decomm.data.split: the Dirichlet label-skew split across ranks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from decomm.data import dirichlet_split, iid_split, label_histograms, split_summary


def _balanced(n_per_class: int = 100, n_classes: int = 10, seed: int = 0) -> np.ndarray:
    y = np.repeat(np.arange(n_classes), n_per_class)
    return np.random.default_rng(seed).permutation(y)


def _mean_summary(y: np.ndarray, n_parts: int, alpha: float, seeds: int = 8) -> dict[str, float]:
    rows = [split_summary(y, dirichlet_split(y, n_parts, alpha, seed=s)) for s in range(seeds)]
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


@pytest.mark.parametrize("n_parts", [1, 2, 7, 16, 25])
@pytest.mark.parametrize("alpha", [1e-4, 0.1, 1.0, 10.0, math.inf])
def test_disjoint_cover_and_equal_sizes(n_parts: int, alpha: float) -> None:
    y = _balanced(n_per_class=53, n_classes=10)
    shards = dirichlet_split(y, n_parts, alpha, seed=3)
    assert len(shards) == n_parts
    allidx = np.concatenate(shards)
    assert allidx.dtype == np.int64
    assert np.array_equal(np.sort(allidx), np.arange(y.size))  # disjoint and covering
    sizes = np.array([len(s) for s in shards])
    assert sizes.min() >= 1 and sizes.max() - sizes.min() <= 1
    for s in shards:
        assert np.all(np.diff(s) > 0)  # sorted, no duplicates


def test_alpha_to_zero_gives_one_class_per_part() -> None:
    y = _balanced(n_per_class=100, n_classes=10)
    # as many parts as classes: every part is (almost always exactly) a single class
    s10 = _mean_summary(y, 10, 1e-6)
    assert s10["dominant"] > 0.95
    assert s10["classes"] < 1.15
    assert s10["tv"] > 0.85  # one class out of 10 has TV 0.9 from uniform
    # more parts than classes: a part holds two classes only where a class ran out
    s25 = _mean_summary(y, 25, 1e-6)
    assert s25["dominant"] > 0.85
    assert s25["classes"] < 1.4
    # fewer parts than classes: each part's samples come from few classes
    s5 = _mean_summary(y, 5, 1e-6)
    for shard in dirichlet_split(y, 5, 1e-6, seed=0):
        assert np.unique(y[shard]).size <= 3
    assert s5["classes"] < 2.5


def test_alpha_ten_is_close_to_uniform() -> None:
    y = _balanced(n_per_class=200, n_classes=10)
    s = _mean_summary(y, 10, 10.0)
    assert s["tv"] < 0.2
    assert s["classes"] > 9.0  # effective number of classes, out of 10
    assert s["dominant"] < 0.2
    iid = _mean_summary(y, 10, math.inf)
    assert iid["tv"] < 0.02
    assert iid["classes"] > 9.95


def test_heterogeneity_decreases_with_alpha() -> None:
    y = _balanced(n_per_class=150, n_classes=10)
    tvs = [_mean_summary(y, 16, a)["tv"] for a in (1e-4, 0.1, 1.0, 10.0, 100.0, math.inf)]
    assert all(a > b for a, b in zip(tvs[:-1], tvs[1:])), tvs


def test_iid_split_matches_global_proportions_on_imbalanced_labels() -> None:
    y = np.random.default_rng(1).permutation(np.repeat([0, 1, 2], [600, 300, 100]))
    shards = dirichlet_split(y, 10, math.inf, seed=0)
    hist = label_histograms(y, shards)
    assert np.all(np.abs(hist - np.array([60, 30, 10])) <= 1)


def test_deterministic_in_seed() -> None:
    y = _balanced()
    a = dirichlet_split(y, 8, 0.3, seed=5)
    b = dirichlet_split(y, 8, 0.3, seed=5)
    c = dirichlet_split(y, 8, 0.3, seed=6)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c))


def test_arbitrary_label_values_and_float_labels() -> None:
    y = np.repeat([3, 7, 100], 20)
    shards = dirichlet_split(y, 4, 0.5, seed=0)
    assert np.array_equal(np.sort(np.concatenate(shards)), np.arange(60))
    yf = y.astype(np.float64)
    shards_f = dirichlet_split(yf, 4, 0.5, seed=0)
    assert all(np.array_equal(p, q) for p, q in zip(shards, shards_f))
    assert split_summary(y, shards)["min_size"] == 15


def test_fewer_samples_than_parts() -> None:
    y = np.array([0, 1, 1])
    shards = dirichlet_split(y, 5, 1.0, seed=0)
    assert sorted(len(s) for s in shards) == [0, 0, 1, 1, 1]
    assert np.array_equal(np.sort(np.concatenate(shards)), np.arange(3))
    assert all(len(s) == 0 for s in dirichlet_split([], 3, 1.0))


@pytest.mark.parametrize("kwargs, match", [
    ({"n_parts": 0, "alpha": 1.0}, "n_parts"),
    ({"n_parts": 2.5, "alpha": 1.0}, "n_parts"),
    ({"n_parts": 2, "alpha": 0.0}, "alpha"),
    ({"n_parts": 2, "alpha": -1.0}, "alpha"),
    ({"n_parts": 2, "alpha": float("nan")}, "alpha"),
])
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dirichlet_split(_balanced(), **kwargs)


def test_non_integer_labels_rejected() -> None:
    with pytest.raises(ValueError, match="integers"):
        dirichlet_split(np.array([0.5, 1.0, 2.0]), 2, 1.0)


def test_iid_split_and_histograms() -> None:
    shards = iid_split(103, 4, seed=0)
    assert np.array_equal(np.sort(np.concatenate(shards)), np.arange(103))
    assert [len(s) for s in shards] == [26, 26, 26, 25]
    with pytest.raises(ValueError):
        iid_split(10, 0)
    y = np.array([0, 0, 1, 2])
    hist = label_histograms(y, [np.array([0, 2]), np.array([1, 3])], num_classes=4)
    assert hist.tolist() == [[1, 1, 0, 0], [1, 0, 1, 0]]
    summary = split_summary(y, [np.array([0, 1]), np.array([2, 3])])
    assert summary["dominant"] == pytest.approx(0.75)
    assert summary["classes"] == pytest.approx((1 + 2) / 2)
