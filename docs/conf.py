"""Sphinx configuration for decomm's documentation.

Build with ``make docs`` (``sphinx-build -W --keep-going -b html docs docs/_build/html``).
The build needs no network access (no intersphinx), neither does reading the pages
(MathJax is shipped in ``_static/mathjax``), and no compiled extension:
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
copyright = "2026, the decomm authors"
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
# heading levels or link to repository files that are not documentation pages;
# both are cosmetic in the rendered page, not errors.
suppress_warnings = ["myst.header", "myst.xref_missing"]
myst_heading_anchors = 3

# -- autodoc ----------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
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
html_css_files = ["custom.css"]
html_theme_options = {
    "description": "Decentralized-learning communication for PyTorch",
    "fixed_sidebar": True,
    "page_width": "1100px",
    "sidebar_width": "230px",
}
html_sidebars = {"**": ["about.html", "navigation.html", "relations.html", "searchbox.html"]}
html_show_sourcelink = False

# -- maths ------------------------------------------------------------------------
# MathJax 3 is shipped in _static/mathjax (see the README there) instead of being
# loaded from a CDN, so equations are typeset offline too. The SVG output keeps the
# whole renderer in one file, with no web fonts to fetch. The context menu is off:
# some of its entries lazy-load further components, which are not shipped.
mathjax_path = "mathjax/tex-svg.js"
mathjax3_config = {"options": {"enableMenu": False}}

# -- the benchmark tables -----------------------------------------------------
# performance.md holds a marker comment; every benchmarks/results/*.md is spliced in
# there with MyST's include directive (images made relative to this page, headings
# pushed one level down), so a new results file shows up without editing the page.
BENCH_DIR = ROOT / "benchmarks" / "results"
BENCH_MARKER = "<!-- benchmark-results-go-here -->"


def _benchmark_includes() -> str:
    files = sorted(BENCH_DIR.glob("*.md"))
    if not files:
        return "*No benchmark results are committed in this checkout.*\n"
    blocks = []
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        blocks.append(f"```{{include}} ../{rel}\n:relative-images:\n:heading-offset: 2\n```\n")
    return "\n".join(blocks)


def _splice_benchmarks(app, docname: str, source: list[str]) -> None:
    if docname != "performance" or BENCH_MARKER not in source[0]:
        return
    for path in sorted(BENCH_DIR.glob("*.md")):
        app.env.note_dependency(str(path))
    source[0] = source[0].replace(BENCH_MARKER, _benchmark_includes())


# -- the top-level API page -----------------------------------------------------
# api/decomm.rst documents every name in decomm.__all__, grouped below; a public name
# that no group lists lands in "Other", so the page never silently misses one.
API_MARKER = ".. decomm-api-go-here"
API_GROUPS: list[tuple[str, list[str]]] = [
    ("Starting and stopping", ["init", "shutdown", "is_initialized", "rank", "size",
                               "local_rank", "local_size", "set_timeout", "get_timeout"]),
    ("Topology and rounds", ["set_topology", "get_topology", "current_round", "advance_round",
                             "set_round", "in_neighbors", "out_neighbors"]),
    ("Neighbour ops", ["neighbor_allreduce", "neighbor_allreduce_",
                       "neighbor_allreduce_nonblocking", "neighbor_allreduce_nonblocking_",
                       "neighbor_allgather"]),
    ("Global collectives", ["allreduce", "allreduce_", "allreduce_nonblocking",
                            "allreduce_nonblocking_", "broadcast", "broadcast_",
                            "broadcast_parameters", "allgather", "barrier"]),
    ("Non-blocking handles", ["Handle", "synchronize", "poll"]),
    ("Hierarchical (machine-level) ops", ["hierarchical_neighbor_allreduce",
                                          "hierarchical_neighbor_allreduce_",
                                          "set_machine_topology", "get_machine_topology",
                                          "machine_rank", "machine_size"]),
    ("One-sided window ops", ["win_create", "win_free", "win_put", "win_accumulate",
                              "win_get", "win_update", "win_update_then_collect"]),
    ("Build and machine information", ["built_with_cuda", "cuda_available", "nccl_available",
                                       "mpi_library_version"]),
    ("Statistics", ["stats", "reset_stats"]),
    ("Errors", ["DecommError"]),
]
API_SKIP = {"__version__"}


def _api_directive(name: str) -> str:
    import inspect

    import decomm

    obj = getattr(decomm, name)
    if inspect.ismodule(obj):
        return ""
    if inspect.isclass(obj):
        return f".. autoclass:: decomm.{name}\n   :members:\n"
    if callable(obj):
        return f".. autofunction:: decomm.{name}\n"
    return f".. autodata:: decomm.{name}\n"


def _api_page() -> str:
    import decomm

    public = [n for n in decomm.__all__ if n not in API_SKIP]
    listed = {n for _, names in API_GROUPS for n in names}
    groups = [(title, [n for n in names if n in public]) for title, names in API_GROUPS]
    other = [n for n in public if n not in listed]
    if other:
        groups.append(("Other", other))
    out = []
    for title, names in groups:
        blocks = [b for b in (_api_directive(n) for n in names) if b]
        if blocks:
            out.append(f"{title}\n{'-' * len(title)}\n\n" + "\n".join(blocks))
    return "\n".join(out)


def _splice_api(app, docname: str, source: list[str]) -> None:
    if docname == "api/decomm" and API_MARKER in source[0]:
        source[0] = source[0].replace(API_MARKER, _api_page())


def setup(app):
    app.connect("source-read", _splice_benchmarks)
    app.connect("source-read", _splice_api)
