"""Single-process tests of the training pipeline helpers in examples/train.py.

(The MPI smoke run is tests/mpi/test_train_smoke.py.)
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load_train() -> ModuleType:
    spec = importlib.util.spec_from_file_location("decomm_example_train_unit",
                                                  EXAMPLES / "train.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


train = _load_train()


@pytest.mark.parametrize("name", train.TOPOLOGIES)
@pytest.mark.parametrize("n", [4, 25])
def test_every_topology_name_builds_a_doubly_stochastic_topology(name: str, n: int) -> None:
    if name == "hyper-hypercube" and n == 25:
        with pytest.raises(ValueError, match="prime factor"):
            train.make_topology(name, n, k=1)
        topo = train.make_topology(name, n, k=4)  # 25 = 5 * 5 needs k + 1 >= 5
    else:
        topo = train.make_topology(name, n, k=2, seed=3)
    assert topo.n == n
    assert topo.is_doubly_stochastic()


def test_unknown_names_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown topology"):
        train.make_topology("star-of-david", 4)


def test_lr_schedule_is_warmup_then_cosine() -> None:
    total, warm = 100, 10
    f = [train.lr_factor(s, total, warm) for s in range(total)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0)
    assert f[55] == pytest.approx(0.5, abs=1e-9)  # half-way through the cosine
    assert all(a >= b for a, b in zip(f[10:-1], f[11:]))
    assert train.lr_factor(total, total, warm) == pytest.approx(0.0, abs=1e-12)
    assert train.lr_factor(0, 10, 0) == pytest.approx(1.0)


def test_parse_args_defaults_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    args = train.parse_args([])
    assert (args.dataset, args.topology, args.k, args.optimizer) == ("digits", "base", 1, "dsgd")
    assert args.alpha == 0.1 and args.epochs >= 1
    assert math.isinf(train.parse_args(["--alpha", "inf"]).alpha)
    for bad in (["--k", "0"], ["--epochs", "0"], ["--alpha", "0"], ["--topology", "mesh"],
                ["--optimizer", "adam"], ["--dataset", "imagenet"]):
        with pytest.raises(SystemExit):
            train.parse_args(bad)
    capsys.readouterr()


def test_run_name_and_plot(tmp_path: Path) -> None:
    args = train.parse_args(["--topology", "base", "--k", "2", "--alpha", "10"])
    assert train.run_name(args, 25) == "digits_base-k2_dsgd_a10_n25"
    assert train.run_name(train.parse_args(["--topology", "ring"]), 4) == \
        "digits_ring_dsgd_a0.1_n4"
    rows = [{"epoch": e, "test_acc_avg": 0.5 + 0.1 * e, "test_acc_local": 0.4 + 0.1 * e,
             "consensus": float(np.exp(-e))} for e in range(1, 4)]
    train.write_plot(rows, tmp_path / "p.png", "title")
    assert (tmp_path / "p.png").stat().st_size > 1000
