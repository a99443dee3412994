"""Pure parts of decomm.compat.bluefog (no MPI): weights from graphs, handles, helpers,
and the bookkeeping of the vendored BlueFog suite."""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

import networkx as nx
import numpy as np
import pytest

from decomm.compat.bluefog import _basics, _handles
from decomm.compat.bluefog.util import env

SUITE = Path(__file__).resolve().parent.parent / "bluefog_suite"


def random_digraph(n: int, p: float, seed: int) -> nx.DiGraph:
    rng = np.random.default_rng(seed)
    G = nx.DiGraph()
    G.add_nodes_from(range(n))
    for u in range(n):
        for v in range(n):
            if rng.random() < p:
                G.add_edge(u, v, weight=float(rng.random()))
    return G


@pytest.mark.parametrize("seed", range(5))
def test_uniform_matrix_is_bluefogs_default_average(seed):
    G = random_digraph(7, 0.3, seed)
    W = _basics.uniform_matrix(G)
    for i in range(7):
        preds = {u for u, v in G.edges() if v == i and u != i}
        k = len(preds)
        for j in range(7):
            want = 1.0 / (k + 1) if (j == i or j in preds) else 0.0
            assert W[i, j] == pytest.approx(want, abs=1e-15)
    assert np.allclose(W.sum(axis=1), 1.0)


def test_uniform_matrix_counts_zero_weight_edges_as_edges():
    G = nx.DiGraph()
    G.add_nodes_from(range(3))
    G.add_edge(0, 1, weight=0.0)  # BlueFog's predecessors() still lists 0 for 1
    W = _basics.uniform_matrix(G)
    assert W[1].tolist() == [0.5, 0.5, 0.0]
    assert W[0].tolist() == [1.0, 0.0, 0.0]


@pytest.mark.parametrize("seed", range(3))
def test_recv_weights_read_the_edges_into_the_node(seed):
    G = random_digraph(6, 0.4, seed)
    A = nx.to_numpy_array(G, nodelist=range(6))  # A[u, v] = weight of u -> v
    for i in range(6):
        self_w, nbr = _basics.recv_weights(G, i)
        assert self_w == pytest.approx(A[i, i])
        assert nbr == pytest.approx({u: A[u, i] for u in range(6) if u != i and G.has_edge(u, i)})


def test_handles_done_entries_and_stale_handles():
    h = _handles.register(_handles.Done("result"))
    assert isinstance(h, int)
    assert _handles.poll(h) is True
    assert _handles.wait(h) == "result"
    with pytest.raises(ValueError, match="handle"):
        _handles.synchronize(h)
    with pytest.raises(ValueError, match="handle"):
        _handles.poll(-1)


def test_env_sets_and_restores():
    os.environ.pop("DECOMM_TEST_ENV_X", None)
    os.environ["DECOMM_TEST_ENV_Y"] = "old"
    with env(DECOMM_TEST_ENV_X="1", DECOMM_TEST_ENV_Y="new"):
        assert os.environ["DECOMM_TEST_ENV_X"] == "1"
        assert os.environ["DECOMM_TEST_ENV_Y"] == "new"
    assert "DECOMM_TEST_ENV_X" not in os.environ
    assert os.environ.pop("DECOMM_TEST_ENV_Y") == "old"


def test_suspend_outside_ipython_raises_like_bluefog():
    with pytest.raises(OSError, match="ipython"):
        _basics.suspend()


def _tests_in(path: Path) -> set[str]:
    """``file::Class::test`` and ``file::test`` ids defined in a vendored file."""
    tree = ast.parse(path.read_text())
    ids = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
            ids.add(f"{path.name}::{node.name}")
        if isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, ast.FunctionDef) and sub.name.startswith("test"):
                    ids.add(f"{path.name}::{node.name}::{sub.name}")
    return ids


def test_known_failures_name_real_tests_with_reasons():
    sys.path.insert(0, str(SUITE))
    try:
        from known_failures import KNOWN_FAILURES
    finally:
        sys.path.remove(str(SUITE))
    files = {p.name for p in SUITE.glob("*_test.py")}
    ids = set().union(*(_tests_in(SUITE / f) for f in files))
    for key, (nps, reason) in KNOWN_FAILURES.items():
        assert key in ids or key in files, key
        assert nps is None or (nps and all(isinstance(k, int) and k >= 1 for k in nps)), key
        assert len(reason) > 20, key


def test_vendored_files_import_only_the_compat_layer():
    for path in SUITE.glob("*.py"):
        text = path.read_text()
        assert "import bluefog" not in text and "from bluefog" not in text, path.name
    assert (SUITE / "LICENSE").read_text().startswith("Apache License") or \
        "Apache License" in (SUITE / "LICENSE").read_text()[:200]


def _table(srcs: list[list[int]], dsts: list[list[int]]):
    import torch

    from decomm.compat.bluefog._ops import topology_rows

    n = len(srcs)
    return torch.stack([topology_rows(srcs[i], dsts[i], n) for i in range(n)])


def test_per_call_graph_check_accepts_matching_sides():
    from decomm.compat.bluefog._ops import topology_errors

    n = 5
    srcs = [[(i - 1) % n, (i + 2) % n] for i in range(n)]
    dsts = [[(i + 1) % n, (i - 2) % n] for i in range(n)]
    assert topology_errors(_table(srcs, dsts), "x") is None
    # empty sides match too (BlueFog's "empty send neighbours" test)
    assert topology_errors(_table([[], [0]], [[1], []]), "x") is None


def test_per_call_graph_check_names_the_unmatched_edges():
    from decomm.compat.bluefog._ops import topology_errors

    n = 4  # BlueFog's test: receive from r-1, send to r+2
    srcs = [[(i - 1) % n] for i in range(n)]
    dsts = [[(i + 2) % n] for i in range(n)]
    msg = topology_errors(_table(srcs, dsts), "x")
    assert msg is not None and "do not match" in msg
    assert "0->1 (only receiver lists it)" in msg and "0->2 (only sender lists it)" in msg
    msg = topology_errors(_table([[1], [1]], [[1], [0]]), "y")
    assert msg is not None and "ranks [1] list themselves" in msg
    msg = topology_errors(_table([[7], []], [[], []]), "z")
    assert msg is not None and "ranks [0] name ranks out of range" in msg
