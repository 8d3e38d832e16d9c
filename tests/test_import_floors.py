"""The floors of DESIGN.md, read from the code: every module's imports (AST), no upward import, no cycle,
every import of autopar's own at module top.

Floors, lowest first (a module may import its own floor and the ones below, with the exceptions noted):
  0 core       autopar.core, autopar.cluster.profile (the ClusterProfile a plan carries), autopar.models (plain
               torch models), autopar.runtime_kernels (which imports nothing of autopar's at all)
  1 ops        autopar.ops: the primitives generated code calls (collectives, parallel ops, tracking hooks)
  2 compiler   autopar.solver and autopar.codegen, never each other; codegen may call ops and runtime_kernels
  3 runtime    autopar.runtime, autopar.cluster (measuring, calibration, predict), autopar.inference,
               autopar.train
  4 front end  autopar.frontend and the package itself (autopar/__init__.py)
  5 tools      autopar.tools
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"autopar": "autopar", "autopar.solver": "solver", "autopar.codegen": "codegen",
                "autopar.runtime_kernels": "runtime_kernels"}
FLOORS = {   # longest matching prefix wins
    "autopar.core": 0, "autopar.cluster.profile": 0, "autopar.models": 0, "autopar.runtime_kernels": 0,
    "autopar.ops": 1,
    "autopar.solver": 2, "autopar.codegen": 2,
    "autopar.runtime": 3, "autopar.cluster": 3, "autopar.inference": 3, "autopar.train": 3,
    "autopar.frontend": 4, "autopar": 4,
    "autopar.tools": 5,
}
FORBIDDEN = [   # (importer prefix, imported prefix): same or lower floor, still not allowed
    ("autopar.solver", "autopar.codegen"), ("autopar.codegen", "autopar.solver"),
    ("autopar.solver", "autopar.ops"),     # the solver models what ops do; it never calls them
    ("autopar.runtime_kernels", "autopar"),
]


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, d in PACKAGE_DIRS.items():
        for path in sorted((ROOT / d).rglob("*.py")):
            rel = path.relative_to(ROOT / d).with_suffix("").parts
            if rel[-1] == "__init__":
                rel = rel[:-1]
            name = ".".join((pkg, *rel))
            if pkg == "autopar" and any(name.startswith(p + ".") or name == p for p in PACKAGE_DIRS if p != "autopar"):
                continue
            out[name] = path
    return out


MODULES = _modules()


def _prefix(name: str, table) -> str | None:
    best = None
    for p in table:
        if (name == p or name.startswith(p + ".")) and (best is None or len(p) > len(best)):
            best = p
    return best


def floor_of(name: str) -> int:
    return FLOORS[_prefix(name, FLOORS)]


def _imports(name: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported autopar module, line, at module top) for every import of ``name``."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    top = set(map(id, tree.body))
    out = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # ``from pkg import sub`` imports the submodule where one exists
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod for a in node.names]
        for t in targets:
            if t == "autopar" or t.startswith("autopar."):
                while t not in MODULES and "." in t:
                    t = t.rsplit(".", 1)[0]
                out.append((t, node.lineno, id(node) in top))
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_every_module_has_a_floor():
    assert len(MODULES) > 80
    for name in MODULES:
        assert _prefix(name, FLOORS) is not None, name


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_upward_or_forbidden_import(name):
    bad = []
    for target, line, _ in GRAPH[name]:
        if target == name or name.startswith(target + "."):   # itself, or its parent package
            continue
        if floor_of(target) > floor_of(name):
            bad.append(f"line {line}: {target} (floor {floor_of(target)}) from floor {floor_of(name)}")
        for src, dst in FORBIDDEN:
            if _prefix(name, [src]) and _prefix(target, [dst]) and not _prefix(target, [src]):
                bad.append(f"line {line}: {src} must not import {dst} ({target})")
    assert not bad, f"{name}:\n" + "\n".join(bad)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_of_autopar_at_module_top(name):
    inner = [f"line {line}: {t}" for t, line, top in GRAPH[name] if not top]
    assert not inner, f"{name} imports autopar modules inside functions:\n" + "\n".join(inner)


def test_no_import_cycles():
    edges = {n: {t for t, _, _ in GRAPH[n] if t != n and not n.startswith(t + ".")} for n in MODULES}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(edges[n]):
            if state.get(m) == 1:
                cycle = stack[stack.index(m):] + [m]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(MODULES):
        if n not in state:
            visit(n)


def test_the_checker_sees_a_violation(tmp_path):
    """The rules can fail: a core module importing the solver is flagged as upward."""
    assert floor_of("autopar.core.plan") < floor_of("autopar.solver.ilp")
    assert floor_of("autopar.cluster.profile") == 0 and floor_of("autopar.cluster.measure") == 3
    path = tmp_path / "x.py"
    path.write_text("from autopar.solver import ilp\ndef f():\n    from autopar.tools import cli\n")
    got = _imports("autopar.core.x", path)
    assert ("autopar.solver.ilp", 1, True) in got and ("autopar.tools.cli", 3, False) in got
