"""Heterogeneous data splits for decentralized training (numpy only, torch-free).

* :func:`dirichlet_split` — label-skewed shards across ranks (``alpha`` heterogeneity);
* :func:`iid_split` — the homogeneous baseline;
* :func:`label_histograms`, :func:`split_summary` — what each rank got.

The example datasets and models (digits, synthetic, FashionMNIST, CIFAR-10 loaders;
MLP, CNN, LeNet, VGG, ResNet) live with the examples, in ``examples/datasets.py`` and
``examples/models.py``: they are not part of the library.
"""

from decomm.data.split import (
    dirichlet_split,
    iid_split,
    label_histograms,
    split_summary,
)

__all__ = [
    "dirichlet_split",
    "iid_split",
    "label_histograms",
    "split_summary",
]
