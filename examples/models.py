"""Small reference models for the examples and benchmarks.

* ``mlp`` — a multilayer perceptron for flat or tiny inputs (digits, synthetic);
* ``cnn`` — a two-convolution network for 8x8 digits;
* ``lenet`` — LeNet-5 with group normalisation, for FashionMNIST (28x28);
* ``vgg11`` — VGG-11 for 32x32 images (CIFAR-10);
* ``resnet18`` — ResNet-18 for 32x32 images (CIFAR-10).

The image models follow the Base-(k+1) paper's setup: group normalisation
instead of batch normalisation (batch statistics differ from rank to rank under
label skew, and running statistics are not averaged by gossip), and the
"small-image" variants (3x3 stem, no initial max-pool, one linear classifier).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "MLP",
    "MODELS",
    "LeNet",
    "ResNet18",
    "SmallCNN",
    "build_model",
    "count_parameters",
    "default_model",
    "vgg11",
]

#: Names accepted by :func:`build_model`.
MODELS: tuple[str, ...] = ("mlp", "cnn", "lenet", "vgg11", "resnet18")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "group":  # up to 32 groups, as in Wu & He (2018)
        groups = next((g for g in (32, 16, 8, 4, 2) if channels % g == 0), 1)
        return nn.GroupNorm(groups, channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'group', 'batch' or 'none', got {kind!r}")


class MLP(nn.Module):
    """Flatten, then ``Linear -> ReLU`` for each hidden width, then a linear classifier."""

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (64,)) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(N, num_classes)``."""
        return self.net(x)


class SmallCNN(nn.Module):
    """Two 3x3 convolutions and a max-pool, then a small classifier (for 8x8 digits)."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        side = image_size // 2
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * side * side, 64), nn.ReLU(inplace=True),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(N, num_classes)``."""
        return self.classifier(self.features(x))


class LeNet(nn.Module):
    """LeNet-5 (two 5x5 convolutions, three linear layers) with group normalisation.

    For 28x28 single-channel images: 28 -> conv 24 -> pool 12 -> conv 8 -> pool 4,
    so the classifier sees ``16 * 4 * 4 = 256`` features.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.GroupNorm(2, 6),
            nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.GroupNorm(4, 16),
        )
        side = ((image_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"LeNet needs images of at least 16x16, got {image_size}")
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * side * side, 120), nn.ReLU(inplace=True),
            nn.Linear(120, 84), nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(N, num_classes)``."""
        return self.classifier(self.features(x))


_VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class _VGG(nn.Module):
    def __init__(self, cfg: Sequence[int | str], in_channels: int, num_classes: int,
                 norm: str, image_size: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        ch = in_channels
        side = image_size
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                side //= 2
            else:
                layers += [nn.Conv2d(ch, int(v), 3, padding=1), _norm(norm, int(v)),
                           nn.ReLU(inplace=True)]
                ch = int(v)
        if side < 1:
            raise ValueError(f"VGG-11 needs images of at least 32x32, got {image_size}")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(ch * side * side, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def vgg11(in_channels: int = 3, num_classes: int = 10, norm: str = "group",
          image_size: int = 32) -> nn.Module:
    """VGG-11 for 32x32 images: eight 3x3 convolutions, five max-pools, one linear layer."""
    return _VGG(_VGG11, in_channels, num_classes, norm, image_size)


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.n1 = _norm(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.n2 = _norm(norm, cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          _norm(norm, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.n1(self.conv1(x)))
        out = self.n2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 images: 3x3 stem (stride 1, no max-pool), 4 stages of 2 blocks."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, norm: str = "group") -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 3, padding=1, bias=False),
                                  _norm(norm, 64), nn.ReLU(inplace=True))
        blocks: list[nn.Module] = []
        cin = 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [_BasicBlock(cin, cout, stride, norm), _BasicBlock(cout, cout, 1, norm)]
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(512, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(N, num_classes)``."""
        return self.head(self.layers(self.stem(x)))


def default_model(dataset: str) -> str:
    """The model the examples use for a dataset (the paper's choice for the real ones)."""
    return {"digits": "mlp", "synthetic": "mlp", "fashionmnist": "lenet",
            "cifar10": "vgg11"}.get(dataset, "mlp")


def build_model(name: str, input_shape: Sequence[int], num_classes: int,
                hidden: Sequence[int] = (64,)) -> nn.Module:
    """Construct a model by name (one of :data:`MODELS`) for the given input shape.

    Args:
        name: ``mlp``, ``cnn``, ``lenet``, ``vgg11`` or ``resnet18``.
        input_shape: shape of one sample, ``(C, H, W)`` for images or ``(D,)``.
        num_classes: number of output logits.
        hidden: hidden widths of the ``mlp``.
    """
    shape = tuple(int(s) for s in input_shape)
    key = name.lower().replace("-", "").replace("_", "")
    if key == "mlp":
        n_in = 1
        for s in shape:
            n_in *= s
        return MLP(n_in, num_classes, hidden)
    if len(shape) != 3:
        raise ValueError(f"model {name!r} needs image input (C, H, W), got shape {shape}")
    c, h, w = shape
    if h != w:
        raise ValueError(f"model {name!r} expects square images, got {h}x{w}")
    if key == "cnn":
        return SmallCNN(c, num_classes, h)
    if key == "lenet":
        return LeNet(c, num_classes, h)
    if key == "vgg11":
        return vgg11(c, num_classes, image_size=h)
    if key == "resnet18":
        return ResNet18(c, num_classes)
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
