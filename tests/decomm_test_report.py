"""Per-process outcome reports for scripts/run_tests.py (see tests/conftest.py)."""

from __future__ import annotations

import json
import os

_outcomes: dict[str, str] = {}


def _rank() -> int:
    for var in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def write_report() -> None:
    path = os.environ.get("DECOMM_TEST_REPORT")
    if not path:
        return
    path = path.replace("{rank}", str(_rank()))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_outcomes, f)
    os.replace(tmp, path)


def pytest_runtest_logreport(report) -> None:
    if report.failed:
        _outcomes[report.nodeid] = "failed"
    elif report.skipped and _outcomes.get(report.nodeid) != "failed":
        _outcomes[report.nodeid] = "skipped"
    elif report.when == "call" and report.passed and report.nodeid not in _outcomes:
        _outcomes[report.nodeid] = "passed"

