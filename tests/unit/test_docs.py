"""The Sphinx documentation builds with warnings as errors (what ``make docs`` runs).

Built into a temporary directory, so the working tree is left alone. Skipped when
Sphinx or MyST-Parser is not installed (``pip install -r requirements.txt`` brings
both). Takes about 10-30 s: importing torch for autodoc dominates.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("sphinx") is None or importlib.util.find_spec("myst_parser") is None,
    reason="sphinx and myst-parser are not installed (pip install -r requirements.txt)",
)


@pytest.fixture(scope="module")
def html(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs") / "html"
    doctrees = out.parent / "doctrees"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
           "-d", str(doctrees), str(DOCS), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (
        "sphinx-build -W failed (run `make docs` to reproduce):\n"
        + proc.stdout[-5000:] + "\n" + proc.stderr[-5000:])
    return out


PAGES = ["index", "installation", "quickstart", "concepts", "topology_gallery", "optimizers",
         "performance", "troubleshooting", "migration_bluefog", "api", "changelog",
         "api/decomm", "api/topology", "api/optim", "api/sim"]


@pytest.mark.parametrize("page", PAGES)
def test_page_is_built(html, page):
    assert (html / f"{page}.html").is_file(), page


def test_api_reference_documents_the_public_api(html):
    import inspect

    import decomm

    text = (html / "api" / "decomm.html").read_text(encoding="utf-8")
    missing = [name for name in decomm.__all__
               if not name.startswith("_") and not inspect.ismodule(getattr(decomm, name))
               and f'id="decomm.{name}"' not in text]
    assert not missing, f"not in the API reference: {missing}"
    topo = (html / "api" / "topology.html").read_text(encoding="utf-8")
    for name in ("BaseGraph", "Topology", "EquiDyn"):
        assert f'id="decomm.topology.{name}"' in topo, name
    optim = (html / "api" / "optim.html").read_text(encoding="utf-8")
    for name in ("DSGD", "GradientTracking", "D2"):
        assert f'id="decomm.optim.{name}"' in optim, name
    assert 'id="decomm.sim.Simulation"' in (html / "api" / "sim.html").read_text(encoding="utf-8")


def test_benchmark_tables_and_figures_are_included(html):
    text = (html / "performance.html").read_text(encoding="utf-8")
    results = sorted((ROOT / "benchmarks" / "results").glob("*.md"))
    if results:
        assert "<table" in text
        assert "benchmark-results-go-here" not in text
    gallery = (html / "topology_gallery.html").read_text(encoding="utf-8")
    assert "consensus_n25.png" in gallery
    assert (html / "_images" / "consensus_n25.png").is_file()
