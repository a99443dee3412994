"""The documentation: it builds, it typesets its maths offline, and its examples run.

* The Sphinx build runs with warnings as errors (what ``make docs`` runs), into a
  temporary directory, so the working tree is left alone. Skipped when Sphinx or
  MyST-Parser is not installed (``pip install -r requirements.txt`` brings both).
* Every page that holds equations loads the MathJax copy shipped in
  ``docs/_static/mathjax``, not a CDN.
* Every ``.. code-block:: python`` of every page under ``docs/`` (user guide and
  API pages) is executed, so the guide cannot drift from the code. The blocks of one
  page run in order in one namespace (like a notebook), all pages in one child
  process, after ``decomm.init()`` has been made available at size 1 (an MPI
  singleton: no ``mpirun``). A block whose first line starts with ``>>>`` is run as
  a doctest, so its printed output is compared too. Two reST comments, invisible in
  the rendered page, steer this, each placed right before the block it concerns::

      .. test-setup
         model = torch.nn.Linear(10, 1)      (hidden code run before the next block)

      .. skip-test: why this block cannot run here

  Skipped blocks are reported as pytest skips with their reason, and their number
  per page is pinned in ``EXPECTED_SKIPS``, so a new one is a deliberate change.
* The printed results quoted in the guide are compared with a fresh run:
  ``docs/examples/heterogeneity.py`` (the optimizer table) and
  ``python -m decomm.topology base --n 25 --k 2`` (concepts).

Runtime: about 10-30 s for the build (importing torch for autodoc dominates) and
about as much for the examples, on two busy cores.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"

needs_sphinx = pytest.mark.skipif(
    importlib.util.find_spec("sphinx") is None or importlib.util.find_spec("myst_parser") is None,
    reason="sphinx and myst-parser are not installed (pip install -r requirements.txt)",
)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MPLBACKEND", "Agg")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    return env


# ============================================================== the Sphinx build
@pytest.fixture(scope="module")
def html(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs") / "html"
    doctrees = out.parent / "doctrees"
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
           "-d", str(doctrees), str(DOCS), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, (
        "sphinx-build -W failed (run `make docs` to reproduce):\n"
        + proc.stdout[-5000:] + "\n" + proc.stderr[-5000:])
    return out


PAGES = ["index", "installation", "quickstart", "concepts", "basegraph", "topology_gallery",
         "optimizers",
         "performance", "troubleshooting", "migration_bluefog", "api", "changelog",
         "api/decomm", "api/topology", "api/optim", "api/sim", "api/extras"]


@needs_sphinx
@pytest.mark.parametrize("page", PAGES)
def test_page_is_built(html, page):
    assert (html / f"{page}.html").is_file(), page


@needs_sphinx
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
    for name in ("DSGD", "GradientTracking", "D2", "PushSum", "AsyncGossip"):
        assert f'id="decomm.optim.{name}"' in optim, name
    assert 'id="decomm.sim.Simulation"' in (html / "api" / "sim.html").read_text(encoding="utf-8")
    extras = (html / "api" / "extras.html").read_text(encoding="utf-8")
    for name in ("timeline.start", "timeline.activity", "hierarchical.init_machines",
                 "win.win_names"):
        assert f'id="decomm.{name}"' in extras, name


@needs_sphinx
def test_benchmark_tables_and_figures_are_included(html):
    text = (html / "performance.html").read_text(encoding="utf-8")
    results = sorted((ROOT / "benchmarks" / "results").glob("*.md"))
    if results:
        assert "<table" in text
        assert "benchmark-results-go-here" not in text
    gallery = (html / "topology_gallery.html").read_text(encoding="utf-8")
    assert "consensus_n25.png" in gallery
    assert (html / "_images" / "consensus_n25.png").is_file()


_SCRIPT_SRC = re.compile(r'<script[^>]*\bsrc="([^"]*)"')


@needs_sphinx
def test_maths_is_typeset_without_the_network(html):
    """Pages with equations load the shipped MathJax (a relative path), and no script
    at all from another host; the bundle is in the build output."""
    with_maths = []
    for page in sorted(html.rglob("*.html")):
        text = page.read_text(encoding="utf-8")
        remote = [s for s in _SCRIPT_SRC.findall(text) if "://" in s or s.startswith("//")]
        assert not remote, f"{page.relative_to(html)} loads scripts over the network: {remote}"
        if 'class="math' not in text:
            continue
        mathjax = [s for s in _SCRIPT_SRC.findall(text) if "mathjax" in s.lower()]
        assert mathjax, f"{page.relative_to(html)} has equations but loads no MathJax"
        target = (page.parent / mathjax[0].split("?")[0]).resolve()
        assert target.is_file(), f"{page.relative_to(html)}: {mathjax[0]} does not exist"
        with_maths.append(page.relative_to(html).as_posix())
    assert "optimizers.html" in with_maths and "concepts.html" in with_maths, with_maths
    shipped = DOCS / "_static" / "mathjax"
    assert (shipped / "LICENSE").is_file() and (shipped / "README.md").is_file()
    assert (shipped / "tex-svg.js").stat().st_size < 4 * 2**20  # keep the asset small


# ============================================================ the code blocks
@dataclass
class Block:
    page: str  # path relative to docs/
    line: int  # 1-based line of the ``.. code-block::`` directive
    code: str
    setup: str = ""  # hidden ``.. test-setup`` code run before it
    skip: str = ""  # ``.. skip-test:`` reason; empty = run

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


_DIRECTIVE = re.compile(r"^(\s*)\.\. code-block::\s*(\S+)\s*$")
_SETUP = re.compile(r"^(\s*)\.\. test-setup\s*$")
_SKIP = re.compile(r"^(\s*)\.\. skip-test:\s*(.*?)\s*$")


def _indented_body(lines: list[str], start: int, indent: int) -> tuple[str, int]:
    """The block of lines after ``start`` indented deeper than ``indent`` (dedented),
    skipping directive options; returns (text, index of the first line after it)."""
    i = start + 1
    while i < len(lines) and re.match(r"^\s+:[\w-]+:", lines[i]) and \
            len(lines[i]) - len(lines[i].lstrip()) > indent:
        i += 1  # directive options such as :emphasize-lines:
    body = []
    while i < len(lines):
        line = lines[i]
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        body.append(line)
        i += 1
    return textwrap.dedent("\n".join(body)).strip("\n") + "\n", i


def parse_blocks(path: Path) -> list[Block]:
    """The python code blocks of one reST page, with their test markers."""
    rel = path.relative_to(DOCS).as_posix()
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    setup, skip = "", ""
    i = 0
    while i < len(lines):
        line = lines[i]
        m = _SETUP.match(line)
        if m:
            text, i = _indented_body(lines, i, len(m.group(1)))
            setup += text
            continue
        m = _SKIP.match(line)
        if m:
            if not m.group(2):
                raise AssertionError(f"{rel}:{i + 1}: `.. skip-test:` needs a reason")
            skip = m.group(2)
            i += 1
            continue
        m = _DIRECTIVE.match(line)
        if m:
            lang = m.group(2)
            text, nxt = _indented_body(lines, i, len(m.group(1)))
            if lang == "python":
                blocks.append(Block(rel, i + 1, text, setup, skip))
                setup, skip = "", ""
            elif setup or skip:
                raise AssertionError(f"{rel}:{i + 1}: a test marker stands before a "
                                     f"{lang} block; markers apply to python blocks only")
            i = nxt
            continue
        i += 1
    if setup or skip:
        raise AssertionError(f"{rel}: a test marker at the end of the page has no block")
    return blocks


DOC_FILES = sorted(DOCS.glob("*.rst")) + sorted((DOCS / "api").glob("*.rst"))
BLOCKS = [b for path in DOC_FILES for b in parse_blocks(path)]

#: blocks marked ``.. skip-test:`` per page: change this when adding or removing one
EXPECTED_SKIPS = {
    "migration_bluefog.rst": 1,  # the BlueFog side of the ported training step
}


def test_every_python_block_is_collected():
    """The parser sees every ``code-block:: python`` (none hides in an odd layout)."""
    for path in DOC_FILES:
        rel = path.relative_to(DOCS).as_posix()
        n = len(re.findall(r"^\s*\.\. code-block::\s*python\s*$", path.read_text(encoding="utf-8"),
                           flags=re.M))
        assert n == sum(b.page == rel for b in BLOCKS), rel
    guide = {b.page for b in BLOCKS}
    for page in ("index.rst", "quickstart.rst", "concepts.rst", "optimizers.rst",
                 "migration_bluefog.rst"):
        assert page in guide, f"no python block found in {page}"


def test_skipped_blocks_are_pinned():
    skipped: dict[str, int] = {}
    for b in BLOCKS:
        if b.skip:
            skipped[b.page] = skipped.get(b.page, 0) + 1
    assert skipped == EXPECTED_SKIPS, (
        "blocks marked `.. skip-test:` changed; update EXPECTED_SKIPS if intended: "
        + ", ".join(f"{b.id} ({b.skip})" for b in BLOCKS if b.skip))


def _run_blocks(blocks: list[dict], examples: list[str]) -> dict:
    """Child process: run the blocks page by page; return results as a dict."""
    import contextlib
    import doctest
    import io
    import runpy
    import time
    import traceback

    import torch

    torch.set_num_threads(1)
    results: dict[str, dict] = {}
    namespaces: dict[str, dict] = {}
    for b in blocks:
        ns = namespaces.setdefault(b["page"], {"__name__": "__docs__"})
        t0 = time.perf_counter()
        try:
            if b["setup"]:
                exec(compile(b["setup"], f"{b['page']}:{b['line']} (test-setup)", "exec"), ns)
            where = f"{b['page']}:{b['line']}"
            if b["code"].lstrip().startswith(">>>"):
                test = doctest.DocTestParser().get_doctest(b["code"], ns, where, where, b["line"])
                out = io.StringIO()
                runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
                runner.run(test, out=out.write, clear_globs=False)
                ns.update(test.globs)  # DocTest works on a copy of the namespace
                if runner.failures:
                    raise AssertionError("doctest failed:\n" + out.getvalue())
            else:
                exec(compile(b["code"], where, "exec"), ns)
            results[f"{b['page']}:{b['line']}"] = {"ok": True, "seconds": time.perf_counter() - t0}
        except BaseException:  # report every failure, then run the other blocks
            results[f"{b['page']}:{b['line']}"] = {"ok": False, "error": traceback.format_exc(),
                                                   "seconds": time.perf_counter() - t0}
    printed: dict[str, str] = {}
    for script in examples:
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                runpy.run_path(script, run_name="__main__")
            printed[script] = out.getvalue()
        except BaseException:  # report it as the script's output
            printed[script] = "FAILED\n" + out.getvalue() + traceback.format_exc()
    return {"blocks": results, "examples": printed}


EXAMPLES = [DOCS / "examples" / "quickstart.py", DOCS / "examples" / "heterogeneity.py"]


@pytest.fixture(scope="module")
def doc_run(tmp_path_factory) -> dict:
    """Run every block and the literalinclude'd examples once, in one child process."""
    work = tmp_path_factory.mktemp("doc_blocks")
    spec = work / "blocks.json"
    out = work / "results.json"
    spec.write_text(json.dumps({"blocks": [asdict(b) for b in BLOCKS if not b.skip],
                                "examples": [str(p) for p in EXAMPLES]}))
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT / 'tests' / 'unit')!r}); "
            "import test_docs as t; s = json.load(open(sys.argv[1])); "
            "r = t._run_blocks(s['blocks'], s['examples']); json.dump(r, open(sys.argv[2], 'w'))")
    proc = subprocess.run([sys.executable, "-c", code, str(spec), str(out)], cwd=work, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and out.is_file(), (
        f"the doc-block runner died (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
        f"{proc.stderr[-5000:]}")
    return json.loads(out.read_text())


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_code_block_runs(doc_run, block):
    if block.skip:
        pytest.skip(f"marked in the page: {block.skip}")
    res = doc_run["blocks"][block.id]
    assert res["ok"], f"the code block at docs/{block.id} raised:\n{res['error']}"


def test_quickstart_example_runs(doc_run):
    text = doc_run["examples"][str(EXAMPLES[0])]
    # size 1 here; the page quotes the 4-rank output of the same script
    assert re.fullmatch(r"1 ranks, round 200: loss \S+, bias \S+ \(mean of the shifts: 0\.0\), "
                        r"consensus distance 0\.00e\+00\n", text), text


def _numbers(line: str) -> list[float]:
    return [float(x) for x in re.findall(r"\d+\.\d+(?:e[+-]\d+)?", line)]


def test_heterogeneity_table_matches_a_fresh_run(doc_run):
    """The table quoted in optimizers.rst is what the script prints now (the page allows
    the last digit to differ between machines: 15% relative here)."""
    got = doc_run["examples"][str(EXAMPLES[1])].strip().splitlines()
    page = (DOCS / "optimizers.rst").read_text(encoding="utf-8")
    m = re.search(r"heterogeneity\.py``[^\n]*\n[^\n]*::\n\n((?:   [^\n]*\n)+)", page)
    assert m, "the quoted output of heterogeneity.py is not found in optimizers.rst"
    quoted = [ln[3:] for ln in m.group(1).splitlines()]
    assert len(got) == len(quoted), ("\n".join(got), "\n".join(quoted))
    for g, q in zip(got, quoted):
        assert re.sub(r"[\d.e+-]+", "#", g) == re.sub(r"[\d.e+-]+", "#", q), (g, q)
        for a, b in zip(_numbers(g), _numbers(q)):
            assert abs(a - b) <= 0.15 * abs(b), (g, q)


def test_topology_cli_output_in_concepts():
    """Every line concepts.rst shows for ``python -m decomm.topology base --n 25 --k 2``
    is printed by that command, in that order."""
    page = (DOCS / "concepts.rst").read_text(encoding="utf-8")
    m = re.search(r"\$ python -m decomm\.topology base --n 25 --k 2\n((?:     .*\n)+)", page)
    assert m, "the topology CLI output is not found in concepts.rst"
    shown = [ln.strip() for ln in m.group(1).splitlines() if ln.strip() != "..."]
    proc = subprocess.run([sys.executable, "-m", "decomm.topology", "base", "--n", "25",
                           "--k", "2"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    printed = [ln.strip() for ln in proc.stdout.splitlines()]
    pos = 0
    for line in shown:
        assert line in printed[pos:], (line, proc.stdout)
        pos = printed.index(line, pos) + 1
