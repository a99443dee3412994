"""Tests for examples/models.py: shapes, parameter counts and error paths of the reference
models."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# the examples' models module is not part of the package: import it from examples/
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from models import MODELS, build_model, count_parameters, default_model


@pytest.mark.parametrize("name, shape", [
    ("mlp", (1, 8, 8)), ("mlp", (32,)), ("cnn", (1, 8, 8)), ("lenet", (1, 28, 28)),
    ("vgg11", (3, 32, 32)), ("resnet18", (3, 32, 32)),
])
def test_forward_shapes(name: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = build_model(name, shape, num_classes=7)
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7)
    out.sum().backward()  # differentiable end to end
    assert all(p.grad is not None for p in model.parameters())


def test_parameter_counts_match_the_architectures() -> None:
    mlp = build_model("mlp", (64,), 10, hidden=(64,))
    assert count_parameters(mlp) == 64 * 64 + 64 + 64 * 10 + 10
    # LeNet-5: conv 1->6 (5x5), GN(6), conv 6->16, GN(16), 256->120->84->10
    lenet = 6 * 25 + 6 + 12 + 16 * 6 * 25 + 16 + 32 + 256 * 120 + 120 + 120 * 84 + 84 + 84 * 10 + 10
    assert count_parameters(build_model("lenet", (1, 28, 28), 10)) == lenet
    # VGG-11 (CIFAR variant) has about 9.2M parameters, ResNet-18 about 11.2M
    assert 9.1e6 < count_parameters(build_model("vgg11", (3, 32, 32), 10)) < 9.4e6
    assert 11.0e6 < count_parameters(build_model("resnet18", (3, 32, 32), 10)) < 11.3e6


def test_group_norm_is_default_for_image_models() -> None:
    for name in ("vgg11", "resnet18"):
        model = build_model(name, (3, 32, 32), 10)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        assert any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())


def test_defaults_and_errors() -> None:
    assert set(MODELS) == {"mlp", "cnn", "lenet", "vgg11", "resnet18"}
    assert default_model("fashionmnist") == "lenet" and default_model("cifar10") == "vgg11"
    assert default_model("digits") == "mlp"
    with pytest.raises(ValueError, match="unknown model"):
        build_model("alexnet", (3, 32, 32), 10)
    with pytest.raises(ValueError, match="image input"):
        build_model("cnn", (64,), 10)
    with pytest.raises(ValueError, match="square"):
        build_model("lenet", (1, 28, 20), 10)
    with pytest.raises(ValueError, match="at least"):
        build_model("lenet", (1, 8, 8), 10)
