"""Offline datasets for the examples and benchmarks.

Everything here is numpy-only and reads local files; nothing is downloaded.

* ``digits`` — scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10
  classes); always available. Fixed stratified 80/20 train/test split.
* ``synthetic`` — a deterministic, harder task: many classes, each a mixture of
  overlapping Gaussian clusters, seen through a random rotation. Generated from a
  seed, so every rank builds the identical dataset without communication.
* ``fashionmnist`` — the standard idx-ubyte files (``.gz`` or not).
* ``cifar10`` — the standard "python version" pickled batches.

Images are kept in their stored dtype (``uint8`` for the real datasets) to save
memory when 25 ranks share one machine; :meth:`ArrayDataset.features` turns a
slice into normalised ``float32`` on demand.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

__all__ = [
    "DATASETS",
    "ArrayDataset",
    "default_data_dir",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "make_synthetic",
    "read_cifar10_batch",
    "read_idx",
]

#: Names accepted by :func:`load_dataset`.
DATASETS: tuple[str, ...] = ("digits", "synthetic", "fashionmnist", "cifar10")

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")


@dataclass
class ArrayDataset:
    """A train/test classification dataset held as numpy arrays.

    Attributes:
        name: dataset name (``"digits"``, ...).
        x_train, x_test: samples in stored form, shape ``(N, *input_shape)``; images
            are ``(N, C, H, W)``.
        y_train, y_test: ``int64`` class ids in ``0..num_classes-1``.
        num_classes: number of classes.
        scale, mean, std: :meth:`features` returns ``(x * scale - mean) / std``;
            ``mean``/``std`` are scalars or one value per channel.
        classes: optional class names.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    scale: float = 1.0
    mean: np.ndarray | float = 0.0
    std: np.ndarray | float = 1.0
    classes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample, e.g. ``(1, 8, 8)`` or ``(32,)``."""
        return tuple(int(d) for d in self.x_train.shape[1:])

    def features(self, x: np.ndarray) -> np.ndarray:
        """Normalised ``float32`` copy of stored samples ``x`` (shape ``(N, *input_shape)``)."""
        out = np.asarray(x, dtype=np.float32) * np.float32(self.scale)
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        if mean.ndim == 1 and out.ndim == 4:  # per channel
            mean, std = mean[:, None, None], std[:, None, None]
        return (out - mean) / std

    def train_arrays(self, indices: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(features, labels)`` of the training samples ``indices`` (all when None)."""
        idx = slice(None) if indices is None else indices
        return self.features(self.x_train[idx]), self.y_train[idx].astype(np.int64)

    def test_arrays(self, indices: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(features, labels)`` of the test samples ``indices`` (all when None)."""
        idx = slice(None) if indices is None else indices
        return self.features(self.x_test[idx]), self.y_test[idx].astype(np.int64)

    def __repr__(self) -> str:
        return (f"ArrayDataset({self.name!r}: {len(self.y_train)} train / {len(self.y_test)} test, "
                f"{self.num_classes} classes, input {self.input_shape})")


def default_data_dir() -> Path:
    """``$DECOMM_DATA`` if set, else ``./data``."""
    return Path(os.environ.get("DECOMM_DATA", "data"))


def _stratified_holdout(
    y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = round(test_fraction * idx.size)
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


# --------------------------------------------------------------------------- digits


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits as ``(float32 (N, 1, 8, 8), int64 (N,))``.

    Reads scikit-learn's bundled ``digits.csv.gz`` directly: importing
    ``sklearn.datasets`` costs about a CPU-second, which adds up over 25 ranks
    sharing two cores. Falls back to ``sklearn.datasets.load_digits``.
    """
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec else []:
        csv = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if csv.is_file():
            table = np.loadtxt(csv, delimiter=",", dtype=np.float32)
            return table[:, :-1].reshape(-1, 1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits as _sk_load_digits  # pragma: no cover

    bunch = _sk_load_digits()  # pragma: no cover
    return (bunch.data.astype(np.float32).reshape(-1, 1, 8, 8),  # pragma: no cover
            bunch.target.astype(np.int64))


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> ArrayDataset:
    """scikit-learn's 8x8 digits as ``(N, 1, 8, 8)`` images, standardised.

    The split is stratified and fixed by ``seed`` (default: 1,438 train / 359 test);
    the mean and standard deviation come from the training part.
    """
    x, y = _digits_arrays()
    tr, te = _stratified_holdout(y, test_fraction, seed)
    scale = 1.0 / 16.0
    xs = x[tr] * scale
    return ArrayDataset("digits", x[tr], y[tr], x[te], y[te], num_classes=10, scale=scale,
                        mean=float(xs.mean()), std=float(xs.std()),
                        classes=tuple(str(i) for i in range(10)))


# --------------------------------------------------------------------------- synthetic


def make_synthetic(
    num_classes: int = 20,
    dim: int = 32,
    informative: int = 8,
    clusters_per_class: int = 3,
    separation: float = 1.6,
    n_train: int = 8000,
    n_test: int = 2000,
    seed: int = 0,
) -> ArrayDataset:
    """A deterministic hard classification task (many classes, overlapping clusters).

    Each class is a mixture of ``clusters_per_class`` unit-variance Gaussian
    clusters whose centres are drawn from ``N(0, separation^2 I)`` in an
    ``informative``-dimensional subspace; the remaining ``dim - informative``
    coordinates are pure noise, and a random rotation mixes all coordinates.
    Clusters of different classes overlap, so the Bayes accuracy is well below
    100 % and a linear model is clearly worse than an MLP — which leaves room
    for the topology to matter. Classes are balanced. The same arguments always
    give bit-identical arrays.

    Returns:
        An :class:`ArrayDataset` of ``float32`` features of shape ``(N, dim)``,
        standardised with the training mean/std.
    """
    if num_classes < 2 or clusters_per_class < 1:
        raise ValueError("need num_classes >= 2 and clusters_per_class >= 1")
    if not 1 <= informative <= dim:
        raise ValueError(f"informative must be in 1..dim, got {informative} (dim={dim})")
    if n_train < num_classes or n_test < 1:
        raise ValueError("n_train must be >= num_classes and n_test >= 1")
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, separation, size=(num_classes, clusters_per_class, informative))
    rotation, _ = np.linalg.qr(rng.normal(size=(dim, dim)))

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n) % num_classes
        rng.shuffle(y)
        which = rng.integers(0, clusters_per_class, size=n)
        z = rng.normal(size=(n, dim))
        z[:, :informative] += centres[y, which]
        return (z @ rotation.T).astype(np.float32), y.astype(np.int64)

    x_tr, y_tr = sample(n_train)
    x_te, y_te = sample(n_test)
    mean = x_tr.mean(axis=0)
    std = x_tr.std(axis=0) + 1e-6
    x_tr = ((x_tr - mean) / std).astype(np.float32)
    x_te = ((x_te - mean) / std).astype(np.float32)
    return ArrayDataset("synthetic", x_tr, y_tr, x_te, y_te, num_classes=num_classes,
                        classes=tuple(f"c{i}" for i in range(num_classes)))


# --------------------------------------------------------------------------- file formats

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip, whatever the file is called
        return gzip.decompress(raw)
    return raw


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (MNIST/FashionMNIST format), gzip-compressed or not.

    Format: 2 zero bytes, a type code (0x08 = uint8, ...), the number of
    dimensions, one big-endian int32 per dimension, then the data in C order.

    Raises:
        ValueError: bad magic number, unknown type code or truncated data.
    """
    p = Path(path)
    data = _read_bytes(p)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{p}: not an IDX file (bad magic number)")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{p}: unknown IDX type code 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{p}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if len(data) - header != count * dtype.itemsize:
        raise ValueError(f"{p}: IDX data holds {len(data) - header} bytes, "
                         f"expected {count * dtype.itemsize} for shape {shape}")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild numpy arrays and plain containers.

    The CIFAR-10 batches are pickles; this refuses anything else, so a tampered
    file cannot run code.
    """

    _ALLOWED: ClassVar[dict[tuple[str, str], tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"): ("numpy._core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"): ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"): ("numpy", "ndarray"),
        ("numpy", "dtype"): ("numpy", "dtype"),
        ("_codecs", "encode"): ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> object:
        target = self._ALLOWED.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        try:
            return super().find_class(*target)
        except (ImportError, AttributeError):  # numpy < 2 has no numpy._core
            return super().find_class(module.replace("numpy._core", "numpy.core"), name)


def read_cifar10_batch(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 "python version" batch file.

    Returns:
        ``(images, labels)``: ``uint8`` of shape ``(N, 3, 32, 32)`` and ``int64`` of shape ``(N,)``.

    Raises:
        ValueError: the file is not a CIFAR-10 batch (missing keys, wrong sizes).
    """
    p = Path(path)
    try:
        obj = _ArrayOnlyUnpickler(io.BytesIO(_read_bytes(p)), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError) as exc:
        raise ValueError(f"{p}: not a CIFAR-10 batch ({exc})") from exc
    if not isinstance(obj, dict):
        raise ValueError(  # noqa: TRY004 - a bad file, not a bad argument
            f"{p}: not a CIFAR-10 batch (expected a dict, got {type(obj).__name__})")
    d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}
    if "data" not in d or "labels" not in d:
        raise ValueError(f"{p}: not a CIFAR-10 batch (keys {sorted(d)}; need 'data' and 'labels')")
    data = np.asarray(d["data"], dtype=np.uint8)
    labels = np.asarray(d["labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise ValueError(f"{p}: data shape {data.shape} / {labels.shape[0]} labels; "
                         "expected (N, 3072) and N labels")
    return data.reshape(-1, 3, 32, 32), labels


def _find_files(name: str, data_dir: Path, subdirs: Sequence[str], files: Sequence[str],
                suffixes: Sequence[str], hint: str) -> list[Path]:
    searched = [data_dir / s if s else data_dir for s in subdirs]
    for d in searched:
        found: list[Path] = []
        for f in files:
            hit = next((d / (f + s) for s in suffixes if (d / (f + s)).is_file()), None)
            if hit is None:
                break
            found.append(hit)
        else:
            return found
    raise FileNotFoundError(
        f"{name} files not found. Expected " + ", ".join(files)
        + (f" (optionally {'/'.join(s for s in suffixes if s)})" if any(suffixes[1:]) else "")
        + " in one of: " + ", ".join(str(d) for d in searched)
        + f". {hint} Pass --data-dir DIR (or set DECOMM_DATA); "
          "the offline datasets 'digits' and 'synthetic' need no files."
    )


# --------------------------------------------------------------------------- FashionMNIST

FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def load_fashion_mnist(data_dir: str | os.PathLike[str] | None = None) -> ArrayDataset:
    """FashionMNIST from the four standard idx-ubyte files (``.gz`` or not).

    Looked for in ``data_dir``, ``data_dir/FashionMNIST/raw`` (torchvision's layout)
    and ``data_dir/fashion-mnist``. Images are ``uint8`` ``(N, 1, 28, 28)``.

    Raises:
        FileNotFoundError: naming the expected files and the directories searched.
    """
    root = default_data_dir() if data_dir is None else Path(data_dir)
    paths = _find_files(
        "FashionMNIST", root, ("", "FashionMNIST/raw", "fashion-mnist", "fashion_mnist"),
        FASHION_FILES, ("", ".gz"),
        "Get them from https://github.com/zalandoresearch/fashion-mnist (data/fashion).",
    )
    xtr, ytr, xte, yte = (read_idx(p) for p in paths)
    for x, y, what in ((xtr, ytr, "train"), (xte, yte, "t10k")):
        if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"FashionMNIST {what}: images {x.shape} and labels {y.shape} do not match")
    scaled = xtr.astype(np.float64) / 255.0
    return ArrayDataset("fashionmnist", xtr[:, None], ytr.astype(np.int64), xte[:, None],
                        yte.astype(np.int64), num_classes=10, scale=1.0 / 255.0,
                        mean=float(scaled.mean()), std=float(scaled.std()), classes=FASHION_CLASSES)


# --------------------------------------------------------------------------- CIFAR-10

CIFAR10_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")


def load_cifar10(data_dir: str | os.PathLike[str] | None = None) -> ArrayDataset:
    """CIFAR-10 from the "python version" batches (``cifar-10-batches-py``).

    Looked for in ``data_dir`` and ``data_dir/cifar-10-batches-py``. Images are
    ``uint8`` ``(N, 3, 32, 32)``; normalisation is per channel (training statistics).

    Raises:
        FileNotFoundError: naming the expected files and the directories searched.
    """
    root = default_data_dir() if data_dir is None else Path(data_dir)
    paths = _find_files(
        "CIFAR-10", root, ("", "cifar-10-batches-py"), CIFAR10_FILES, ("",),
        "Get cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html "
        "and unpack it.",
    )
    train = [read_cifar10_batch(p) for p in paths[:5]]
    xte, yte = read_cifar10_batch(paths[5])
    xtr = np.concatenate([b[0] for b in train])
    ytr = np.concatenate([b[1] for b in train])
    scaled = xtr.astype(np.float32) / 255.0
    mean = scaled.mean(axis=(0, 2, 3))
    std = scaled.std(axis=(0, 2, 3))
    return ArrayDataset("cifar10", xtr, ytr, xte, yte, num_classes=10, scale=1.0 / 255.0,
                        mean=mean, std=std, classes=CIFAR10_CLASSES)


# --------------------------------------------------------------------------- dispatch


def load_dataset(name: str, data_dir: str | os.PathLike[str] | None = None,
                 seed: int = 0) -> ArrayDataset:
    """Load a dataset by name (one of :data:`DATASETS`).

    ``seed`` only affects ``synthetic`` (which task is generated); the split of
    ``digits`` is fixed.
    """
    key = name.lower().replace("-", "").replace("_", "")
    if key == "digits":
        return load_digits()
    if key == "synthetic":
        return make_synthetic(seed=seed)
    if key == "fashionmnist":
        return load_fashion_mnist(data_dir)
    if key == "cifar10":
        return load_cifar10(data_dir)
    raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
