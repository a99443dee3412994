"""Datasets and heterogeneous data splits for decentralized training (offline, torch-free).

* :func:`dirichlet_split` — label-skewed shards across ranks (``alpha`` heterogeneity);
* :func:`load_dataset` — ``"digits"`` (bundled with scikit-learn), ``"synthetic"`` (a
  deterministic hard task), ``"fashionmnist"`` and ``"cifar10"`` (standard files read
  from a local directory; nothing is downloaded).
"""

from decomm.data.datasets import (
    DATASETS,
    ArrayDataset,
    load_cifar10,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    make_synthetic,
    read_cifar10_batch,
    read_idx,
)
from decomm.data.split import (
    dirichlet_split,
    iid_split,
    label_histograms,
    split_summary,
)

__all__ = [
    "DATASETS",
    "ArrayDataset",
    "dirichlet_split",
    "iid_split",
    "label_histograms",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "make_synthetic",
    "read_cifar10_batch",
    "read_idx",
    "split_summary",
]
