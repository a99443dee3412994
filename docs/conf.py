"""Sphinx configuration for decomm's documentation.

Build with ``make docs`` (``sphinx-build -W --keep-going -b html docs docs/_build/html``).
The build needs no network access (no intersphinx) and no compiled extension:
``decomm._C`` and ``mpi4py`` are mocked if they cannot be imported, so the API
reference builds on a machine where decomm was never compiled.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

from decomm._version import __version__  # noqa: E402

# -- project ----------------------------------------------------------------
project = "decomm"
author = "the decomm authors"
copyright = "2026, the decomm authors"  # noqa: A001
version = ".".join(__version__.split(".")[:2])
release = __version__

# -- general ----------------------------------------------------------------
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "gallery", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []
nitpicky = False
# Markdown files written for GitHub (the benchmark tables, the changelog) may jump
# heading levels; that is cosmetic, not an error.
suppress_warnings = ["myst.header"]
myst_heading_anchors = 3

# -- autodoc ----------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_default_options = {"show-inheritance": True}
autodoc_preserve_defaults = True
# The compiled core and MPI are not needed to document the Python API.
autodoc_mock_imports = [
    mod for mod in ("decomm._C", "decomm._C_cuda", "mpi4py")
    if importlib.util.find_spec(mod.split(".")[0]) is None
    or (mod.startswith("decomm.") and importlib.util.find_spec(mod) is None)
]
napoleon_google_docstring = True
napoleon_numpy_docstring = True
napoleon_use_rtype = False
# "Attributes:" sections become :ivar: fields, so an attribute that also has a
# "#:" comment in the source is not described twice.
napoleon_use_ivar = True

# -- HTML -------------------------------------------------------------------
html_theme = "alabaster"
html_title = f"decomm {release}"
html_static_path = ["_static"]
html_theme_options = {
    "description": "Decentralized-learning communication for PyTorch",
    "fixed_sidebar": True,
    "page_width": "1100px",
    "sidebar_width": "230px",
}
html_sidebars = {"**": ["about.html", "navigation.html", "relations.html", "searchbox.html"]}
html_show_sourcelink = False

# -- the benchmark tables -----------------------------------------------------
# performance.rst holds a marker line; every benchmarks/results/*.md is spliced in
# there (parsed as Markdown by MyST), so a new results file shows up without
# editing the page.
BENCH_DIR = ROOT / "benchmarks" / "results"
BENCH_MARKER = ".. benchmark-results-go-here"


def _benchmark_includes() -> str:
    files = sorted(BENCH_DIR.glob("*.md"))
    if not files:
        return "*No benchmark results are committed in this checkout.*\n"
    blocks = []
    for path in files:
        blocks.append(
            f".. include:: ../{path.relative_to(ROOT).as_posix()}\n"
            "   :parser: myst_parser.sphinx_\n"
        )
    return "\n".join(blocks)


def _splice_benchmarks(app, docname: str, source: list[str]) -> None:
    if docname != "performance" or BENCH_MARKER not in source[0]:
        return
    for path in sorted(BENCH_DIR.glob("*.md")):
        app.env.note_dependency(str(path))
    source[0] = source[0].replace(BENCH_MARKER, _benchmark_includes())


def setup(app):
    app.connect("source-read", _splice_benchmarks)
