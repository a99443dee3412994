"""Smoke test of examples/train.py under MPI (any N; meant for 2-4 ranks).

One short epoch on the offline digits set; the averaged model must beat chance
(10 %) by a wide margin, every rank must see the same metrics, and rank 0 must
write the CSV. Runs ``train.run`` / ``train.main`` in-process (the MPI conftest has
already called ``decomm.init()``).
"""

from __future__ import annotations

import csv
import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

import decomm

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load_train() -> ModuleType:
    spec = importlib.util.spec_from_file_location("decomm_example_train", EXAMPLES / "train.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


train = _load_train()


@pytest.fixture(autouse=True)
def _restore_threads():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def _same_on_all_ranks(value: float) -> bool:
    gathered = decomm.allgather(torch.tensor([value], dtype=torch.float64))
    return bool(torch.all(gathered == gathered[0]))


def test_one_epoch_on_digits_beats_chance(tmp_path: Path) -> None:
    args = train.parse_args([
        "--dataset", "digits", "--epochs", "1", "--alpha", "1.0", "--lr", "0.2",
        "--batch-size", "16", "--topology", "base", "--k", "1", "--out", str(tmp_path),
    ])
    rows = train.run(args)
    assert len(rows) == 1
    row = rows[0]
    assert row["test_acc_avg"] > 0.3, row  # chance is 0.1
    assert row["test_acc_local"] > 0.2, row
    assert math.isfinite(row["train_loss"]) and row["consensus"] >= 0
    n = decomm.size()
    if n > 1:
        assert row["bytes_sent_per_rank"] > 0  # the ranks did talk
    else:
        assert row["bytes_sent_per_rank"] == 0
    for key in ("test_acc_avg", "test_acc_local", "consensus", "bytes_sent_per_rank"):
        assert _same_on_all_ranks(row[key]), key
    if decomm.rank() == 0:
        stem = train.run_name(args, n)
        with open(tmp_path / f"{stem}.csv") as fh:
            written = list(csv.DictReader(fh))
        assert len(written) == 1
        assert float(written[0]["test_acc_avg"]) == pytest.approx(row["test_acc_avg"])
        assert (tmp_path / f"{stem}.png").is_file()


@pytest.mark.parametrize("optimizer", ["gt", "d2", "qgdsgdm"])
def test_other_optimizers_run(tmp_path: Path, optimizer: str) -> None:
    rows = train.run(train.parse_args([
        "--epochs", "1", "--optimizer", optimizer, "--topology", "full", "--alpha", "10",
        "--lr", "0.05", "--no-plot", "--out", str(tmp_path),
    ]))
    assert rows[0]["test_acc_avg"] > 0.2, rows


def test_main_reports_bad_topology_on_every_rank(tmp_path: Path) -> None:
    """The 1-peer hyper-hypercube needs n = 2^m; otherwise main() exits 2 on all ranks."""
    n = decomm.size()
    rc = train.main(["--epochs", "1", "--topology", "hyper-hypercube", "--k", "1",
                     "--no-plot", "--out", str(tmp_path)])
    expected = 0 if n & (n - 1) == 0 else 2
    assert rc == expected
    assert decomm.is_initialized()  # main() does not shut down a runtime it did not start
