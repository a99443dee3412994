"""Shared pytest plumbing: per-process outcome reports for scripts/run_tests.py, and the
``one_torch_thread`` fixture.

Under mpirun every rank runs its own pytest session and prints its own summary, so
the last summary on the console may be a passing rank's. Each process therefore
writes its outcomes (nodeid -> passed/failed/skipped) to a JSON file named by
``DECOMM_TEST_REPORT`` (``{rank}`` is replaced by the MPI rank), and the runner
aggregates them into one closing line.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decomm_test_report import pytest_runtest_logreport, write_report  # noqa: F401


def pytest_sessionfinish(session, exitstatus) -> None:
    write_report()


@pytest.fixture
def one_torch_thread():
    """Run the test with one torch thread (restored afterwards), so that results compared
    to tight tolerances do not depend on how many threads split a reduction."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
