"""MPI test session: init decomm once per rank, and fail the whole job on any failure.

A failed assertion on one rank while the others wait inside a collective would hang
the job (pytest catches the exception, so ``python -m mpi4py`` cannot help). After a
failed report this hook records the outcomes and calls ``MPI.COMM_WORLD.Abort``, so
mpirun exits non-zero at once. pytest-timeout (thread method, set by the runner)
bounds a rank stuck inside MPI.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from decomm_test_report import write_report

TEST_TIMEOUT_S = 60.0


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if "tests/mpi/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.mpi)


def pytest_configure(config) -> None:
    if config.getoption("--with-mpi", default=False):
        import torch

        import decomm

        # Up to 5 ranks share 2 cores: more than one intra-op thread per rank
        # makes small torch ops many times slower.
        torch.set_num_threads(1)

        decomm.init(timeout=TEST_TIMEOUT_S)


@pytest.hookimpl(trylast=True)
def pytest_runtest_logreport(report) -> None:
    if not report.failed:
        return
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_size() == 1:
        return
    write_report()
    rank = MPI.COMM_WORLD.Get_rank()
    sys.stderr.write(f"\n[rank {rank}] FAILED {report.nodeid} ({report.when}):\n"
                     f"{report.longreprtext}\n[rank {rank}] aborting the MPI job\n")
    sys.stderr.flush()
    MPI.COMM_WORLD.Abort(1)


@pytest.fixture(autouse=True)
def _fresh_state():
    """Each test starts from the default topology at round 0, the default timeout and
    no machine grouping (the next hierarchical call builds the default one)."""
    import decomm

    if decomm.is_initialized():
        decomm.set_timeout(TEST_TIMEOUT_S)
        decomm.set_topology(decomm.topology.ExponentialGraph(decomm.size()))
        # a grouping another test chose (init_machines(1)) must not leak into this one
        decomm.hierarchical.shutdown_machines()
    yield
