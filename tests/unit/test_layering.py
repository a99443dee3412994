"""The package's imports flow one way, function-level imports included.

Layers, bottom to top (a module may import its own layer or lower ones, and the
import graph has no cycle):

0. pure maths and leaves: errors, version, build flags, cupy interop, topology, data splits
1. process state, input validation, cross-rank agreement (``_state``, ``_checks``, ``_agree``)
2. timeline and the CUDA glue (they get the rank and backends from ``init``)
3. the ops: ``ops``, ``hierarchical``, ``win``
4. lifecycle and algorithms: ``runtime``, ``optim``, ``amp``
5. tools on top: ``sim``, ``launcher``, the command lines and the package ``__init__``

``decomm._C`` / ``decomm._C_cuda`` (the C++ extensions) import nothing from Python and
count as the bottom. Imports under ``if TYPE_CHECKING:`` are for annotations only and
are not counted.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "decomm"
EXTENSIONS = {"decomm._C", "decomm._C_cuda"}

LAYERS: dict[str, int] = {
    "decomm.errors": 0, "decomm._version": 0, "decomm.backends": 0, "decomm.interop": 0,
    "decomm.topology": 0, "decomm.data": 0, "decomm.compression": 0,
    "decomm._state": 1, "decomm._checks": 1, "decomm._agree": 1,
    "decomm.timeline": 2, "decomm.cuda_ops": 2, "decomm._failure": 2,
    "decomm.ops": 3, "decomm.hierarchical": 3, "decomm.win": 3,
    "decomm.runtime": 4, "decomm.optim": 4, "decomm.amp": 4, "decomm.checkpoint": 4,
    "decomm.fault": 4,
    "decomm.sim": 5, "decomm.vsim": 5, "decomm.compat": 5, "decomm.launcher": 5,
    "decomm.__main__": 5, "decomm": 5,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(mod: str) -> int:
    """The layer of the longest registered prefix (``decomm.topology.core`` -> topology)."""
    parts = mod.split(".")
    for k in range(len(parts), 0, -1):
        key = ".".join(parts[:k])
        if key in LAYERS:
            return LAYERS[key]
    raise AssertionError(f"{mod} has no layer: add it to LAYERS in {Path(__file__).name}")


def exists(mod: str) -> bool:
    rel = Path(*mod.split("."))
    return (PKG.parent / rel).with_suffix(".py").exists() or (PKG.parent / rel).is_dir()


def type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                for n in ast.walk(sub):
                    if hasattr(n, "lineno"):
                        lines.add(n.lineno)
    return lines


def imports_of(path: Path) -> set[str]:
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    skip = type_checking_lines(tree)
    out: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "decomm":
                target = node.module
            else:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if exists(sub) or sub in EXTENSIONS else target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "decomm")
    out.discard(mod)
    return {m for m in out if m not in EXTENSIONS}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PKG.rglob("*.py"))}


def test_every_import_goes_down_or_sideways():
    wrong = []
    for mod, deps in graph().items():
        for dep in deps:
            if layer_of(dep) > layer_of(mod):
                wrong.append(f"{mod} (layer {layer_of(mod)}) imports {dep} "
                             f"(layer {layer_of(dep)})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                cycles.append([*path[path.index(d):], d] if d in path else [m, d])
            elif d not in state:
                visit(d, [*path, d])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_function_level_imports(tmp_path):
    """The graph counts an import inside a function (what hid the old cycles)."""
    deps = imports_of(PKG / "runtime.py")
    assert "decomm.cuda_ops" in deps and "decomm._state" in deps
    assert layer_of("decomm.topology.core") == 0 and layer_of("decomm.optim.dsgd") == 4
