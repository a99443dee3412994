"""Tests for examples/datasets.py: offline datasets and the real-file parsers.

The FashionMNIST and CIFAR-10 parsers are tested on tiny files written here in
the real formats (idx-ubyte, gz or not; pickled python batches).
"""

from __future__ import annotations

import gzip
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

# the examples' datasets module is not part of the package: import it from examples/
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from datasets import (
    CIFAR10_FILES,
    DATASETS,
    FASHION_FILES,
    load_cifar10,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    make_synthetic,
    read_cifar10_batch,
    read_idx,
)

# ----------------------------------------------------------------------------- writers


def _idx_bytes(arr: np.ndarray) -> bytes:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}
    code = codes[arr.dtype]
    header = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}i", *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def _write_fashion(root: Path, n_train: int = 12, n_test: int = 5, gz: bool = False) -> dict:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        data = _idx_bytes(arr)
        if gz:
            (root / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (root / name).write_bytes(data)
    return arrays


def _write_cifar(root: Path, per_batch: int = 4) -> dict:
    rng = np.random.default_rng(1)
    out = {}
    root.mkdir(parents=True, exist_ok=True)
    for name in CIFAR10_FILES:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"img{i}.png".encode() for i in range(per_batch)]}
        with open(root / name, "wb") as fh:
            pickle.dump(batch, fh, protocol=2)
        out[name] = (data, labels)
    return out


# ----------------------------------------------------------------------------- digits / synthetic


def test_digits_is_standardised_with_fixed_split() -> None:
    d = load_digits()
    assert d.input_shape == (1, 8, 8) and d.num_classes == 10
    assert len(d.y_train) + len(d.y_test) == 1797
    x, y = d.train_arrays()
    assert x.dtype == np.float32 and y.dtype == np.int64
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3
    # stratified: every class appears in the test part in proportion
    counts = np.bincount(d.y_test, minlength=10)
    assert counts.min() >= 30
    again = load_digits()
    assert np.array_equal(again.y_test, d.y_test) and np.array_equal(again.x_train, d.x_train)
    xs, ys = d.test_arrays(np.array([0, 5]))
    assert xs.shape == (2, 1, 8, 8) and ys.shape == (2,)


def test_synthetic_is_deterministic_and_hard() -> None:
    a = make_synthetic(n_train=2000, n_test=500, seed=3)
    b = make_synthetic(n_train=2000, n_test=500, seed=3)
    c = make_synthetic(n_train=2000, n_test=500, seed=4)
    assert np.array_equal(a.x_train, b.x_train) and np.array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.x_train, c.x_train)
    assert a.num_classes == 20 and a.input_shape == (32,)
    assert np.bincount(a.y_train).tolist() == [100] * 20  # balanced
    # "hard": a nearest-class-mean (linear) classifier is far from perfect
    means = np.stack([a.x_train[a.y_train == k].mean(0) for k in range(20)])
    pred = np.argmin(((a.x_test[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    acc = float((pred == a.y_test).mean())
    assert 0.1 < acc < 0.6


@pytest.mark.parametrize("kwargs", [
    {"num_classes": 1}, {"informative": 0}, {"informative": 40, "dim": 32}, {"n_train": 3},
])
def test_synthetic_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        make_synthetic(**kwargs)


def test_load_dataset_dispatch_and_unknown() -> None:
    assert set(DATASETS) == {"digits", "synthetic", "fashionmnist", "cifar10"}
    assert load_dataset("digits").name == "digits"
    assert load_dataset("Fashion-MNIST".replace("Fashion-MNIST", "synthetic")).name == "synthetic"
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet")


# ----------------------------------------------------------------------------- idx / FashionMNIST


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip(tmp_path: Path, gz: bool) -> None:
    for arr in (np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
                np.array([1, -2, 300], dtype=np.int32),
                np.array([[0.5, -1.25]], dtype=np.float32)):
        p = tmp_path / f"a{arr.dtype}.idx"
        data = _idx_bytes(arr)
        p.write_bytes(gzip.compress(data) if gz else data)
        out = read_idx(p)
        assert out.dtype.byteorder in "=|" and out.dtype == arr.dtype
        assert np.array_equal(out, arr)


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="magic"):
        read_idx(bad)
    trunc = tmp_path / "trunc"
    trunc.write_bytes(_idx_bytes(np.zeros((4, 4), dtype=np.uint8))[:-3])
    with pytest.raises(ValueError, match="expected"):
        read_idx(trunc)
    code = tmp_path / "code"
    code.write_bytes(b"\x00\x00\x07\x01\x00\x00\x00\x00")
    with pytest.raises(ValueError, match="type code"):
        read_idx(code)


@pytest.mark.parametrize("gz, sub", [(False, ""), (True, ""), (True, "FashionMNIST/raw")])
def test_load_fashion_mnist_from_files(tmp_path: Path, gz: bool, sub: str) -> None:
    arrays = _write_fashion(tmp_path / sub if sub else tmp_path, gz=gz)
    d = load_fashion_mnist(tmp_path)
    assert d.name == "fashionmnist" and d.input_shape == (1, 28, 28)
    assert d.x_train.dtype == np.uint8
    assert np.array_equal(d.x_train[:, 0], arrays["train-images-idx3-ubyte"])
    assert np.array_equal(d.y_test, arrays["t10k-labels-idx1-ubyte"].astype(np.int64))
    x, _ = d.train_arrays()
    assert x.dtype == np.float32 and abs(float(x.mean())) < 1e-3
    assert load_dataset("fashionmnist", tmp_path).num_classes == 10


def test_fashion_mnist_missing_files_error_names_them(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as exc:
        load_fashion_mnist(tmp_path)
    msg = str(exc.value)
    for name in FASHION_FILES:
        assert name in msg
    assert str(tmp_path) in msg and "--data-dir" in msg
    # a partial set is still "missing"
    _write_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_fashion_mnist(tmp_path)


# ----------------------------------------------------------------------------- CIFAR-10


@pytest.mark.parametrize("sub", ["", "cifar-10-batches-py"])
def test_load_cifar10_from_batches(tmp_path: Path, sub: str) -> None:
    written = _write_cifar(tmp_path / sub if sub else tmp_path, per_batch=4)
    d = load_cifar10(tmp_path)
    assert d.input_shape == (3, 32, 32) and len(d.y_train) == 20 and len(d.y_test) == 4
    first, labels = written["data_batch_1"]
    assert np.array_equal(d.x_train[:4], first.reshape(4, 3, 32, 32))
    assert d.y_train[:4].tolist() == labels
    x, _ = d.train_arrays()
    assert x.shape == (20, 3, 32, 32)
    assert np.allclose(x.mean(axis=(0, 2, 3)), 0, atol=1e-4)  # per-channel normalisation


def test_read_cifar10_batch_checks_content(tmp_path: Path) -> None:
    p = tmp_path / "b"
    with open(p, "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}, fh)
    with pytest.raises(ValueError, match="expected"):
        read_cifar10_batch(p)
    with open(p, "wb") as fh:
        pickle.dump([1, 2, 3], fh)
    with pytest.raises(ValueError, match="dict"):
        read_cifar10_batch(p)


def test_read_cifar10_batch_refuses_code(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self) -> tuple:
            return (print, ("pwned",))

    p = tmp_path / "evil"
    with open(p, "wb") as fh:
        pickle.dump({b"data": Evil(), b"labels": []}, fh)
    with pytest.raises(ValueError, match="refusing"):
        read_cifar10_batch(p)


def test_cifar10_missing_files_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as exc:
        load_cifar10(tmp_path / "nowhere")
    msg = str(exc.value)
    assert "data_batch_1" in msg and "test_batch" in msg and "cifar-10-batches-py" in msg


def test_digits_fast_path_matches_sklearn() -> None:
    """load_digits reads sklearn's CSV without importing sklearn.datasets; same data."""
    sk = pytest.importorskip("sklearn.datasets")
    from datasets import _digits_arrays

    x, y = _digits_arrays()
    bunch = sk.load_digits()
    assert np.array_equal(x.reshape(-1, 64), bunch.data.astype(np.float32))
    assert np.array_equal(y, bunch.target)
