"""Offline stand-ins for the datasets BlueFog's examples download (a decomm addition).

The vendored examples use these only when asked (``--data digits``) or when
torchvision is not installed; see README.md in this folder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

#: the normalisation BlueFog's MNIST example applies (MNIST's pixel mean and std)
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
#: share of scikit-learn's 1797 digits used for training (the rest is the test set)
TRAIN_FRACTION = 0.8


def digits_as_mnist(train: bool) -> TensorDataset:
    """scikit-learn's 8x8 handwritten digits shaped like normalised MNIST.

    Images are scaled from 0..16 to 0..1, resized to 1 x 28 x 28 (bilinear), and
    normalised with MNIST's mean and std, as the example's ``transforms`` would do
    for MNIST; labels are int64 in 0..9.  The split is deterministic: the first 80 %
    of the (fixed-order) data set for training, the rest for testing.  Ships with
    scikit-learn, so nothing is downloaded.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    x = (x - MNIST_MEAN) / MNIST_STD
    y = torch.tensor(digits.target, dtype=torch.int64)
    cut = int(TRAIN_FRACTION * len(y))
    return TensorDataset(x[:cut], y[:cut]) if train else TensorDataset(x[cut:], y[cut:])
