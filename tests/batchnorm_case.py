"""The module-buffer test case shared by tests/unit and tests/mpi ``test_optim_buffers``.

Node (rank) ``i`` runs ``Linear(3, 4) -> BatchNorm1d(4)`` (float64, one initial model) on
its own batch, generated from seed ``100 + i`` and shifted and scaled per node so that
the statistics differ.  :func:`local_stats` is the independent reference: BatchNorm's
running-statistics update in numpy, in PyTorch's documented form ``r ← (1 − m) r +
m · stat`` with the batch mean and the *unbiased* batch variance, ``m = 0.1``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

B, DIN, C = 8, 3, 4
MOMENTUM = 0.1  # BatchNorm1d's default


def data(i: int) -> torch.Tensor:
    """Node i's batch: shifted and scaled per node, so the statistics differ."""
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(B, DIN, generator=g, dtype=torch.float64) * (i + 1) + i


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(DIN, C), nn.BatchNorm1d(C)).double()


def local_stats(weight: np.ndarray, bias: np.ndarray, mean: np.ndarray, var: np.ndarray,
                i: int) -> tuple[np.ndarray, np.ndarray]:
    """BatchNorm's running-statistics update for node i's batch, in numpy."""
    h = data(i).numpy() @ weight.T + bias
    return ((1 - MOMENTUM) * mean + MOMENTUM * h.mean(axis=0),
            (1 - MOMENTUM) * var + MOMENTUM * h.var(axis=0, ddof=1))
