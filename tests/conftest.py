"""Shared pytest plumbing: per-process outcome reports for scripts/run_tests.py.

Under mpirun every rank runs its own pytest session and prints its own summary, so
the last summary on the console may be a passing rank's. Each process therefore
writes its outcomes (nodeid -> passed/failed/skipped) to a JSON file named by
``DECOMM_TEST_REPORT`` (``{rank}`` is replaced by the MPI rank), and the runner
aggregates them into one closing line.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decomm_test_report import pytest_runtest_logreport, write_report  # noqa: F401


def pytest_sessionfinish(session, exitstatus) -> None:
    write_report()
