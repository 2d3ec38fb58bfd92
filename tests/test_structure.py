"""The package's shape: no import cycle (walking every import statement of the AST, function-level
ones included), and the experiment harness as one pipeline in which no module reaches back up."""

from __future__ import annotations

import ast
from pathlib import Path

import groupnorm

SRC = Path(groupnorm.__file__).resolve().parent

# The harness, in pipeline order: a module may import only modules before it.
PIPELINE = ["config", "presets", "runtime", "recipe", "recorder", "loop", "store", "sweep",
            "cells", "paper", "findings", "kinds", "plots", "report", "progress"]


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _target(name: str) -> str | None:
    """The module of ours that importing `name` loads last (None: not ours)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str) -> set[str]:
    """Modules of groupnorm that `module` imports anywhere in its source."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            # `from pkg import sub` loads pkg.sub when sub is a module, else pkg
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                     for a in node.names]
        else:
            continue
        out |= {t for t in map(_target, names) if t is not None and t != module}
    return out


GRAPH = {m: imports(m) for m in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _describe(comps: list[list[str]], graph: dict[str, set[str]]) -> str:
    lines = []
    for comp in comps:
        edges = [f"{a} -> {b}" for a in comp for b in sorted(graph[a]) if b in comp]
        lines.append("cycle among " + ", ".join(comp) + ": " + "; ".join(edges))
    return "\n".join(lines)


def test_the_walker_sees_imports_of_every_form():
    assert "groupnorm.experiments.config" in GRAPH["groupnorm.experiments.presets"]  # from .x
    assert "groupnorm.data" in GRAPH["groupnorm.experiments.recipe"]  # from groupnorm import data
    assert "groupnorm.experiments.plots" in GRAPH["groupnorm.experiments.report"]  # in a function
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_in_groupnorm():
    found = cycles(GRAPH)
    assert not found, _describe(found, GRAPH)


def test_no_import_cycle_in_the_harness_and_cli():
    ours = {m for m in GRAPH if m.startswith("groupnorm.experiments") or m == "groupnorm.cli"}
    found = cycles({m: GRAPH[m] & ours for m in ours})
    assert not found, _describe(found, GRAPH)


def test_harness_modules_import_only_modules_before_them_in_the_pipeline():
    have = {m.rpartition(".")[2] for m in GRAPH if m.startswith("groupnorm.experiments.")}
    assert have == set(PIPELINE), "PIPELINE must list every module of groupnorm.experiments"
    back = []
    for i, name in enumerate(PIPELINE):
        for dep in GRAPH[f"groupnorm.experiments.{name}"]:
            if dep.startswith("groupnorm.experiments.") and (
                    PIPELINE.index(dep.rpartition(".")[2]) > i):
                back.append(f"{name} -> {dep.rpartition('.')[2]}")
    assert not back, f"modules reaching back up the pipeline: {back}"


def _reads_environment(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and (
                (node.value.id, node.attr) in {("os", "environ"), ("os", "getenv"),
                                              ("os", "getpid"), ("socket", "gethostname")}):
            found.append(f"{path.name}:{node.lineno} {node.value.id}.{node.attr}")
    return found


def test_only_runtime_reads_the_environment():
    paths = [*(SRC / "experiments").glob("*.py"), SRC / "cli.py"]
    found = [hit for p in paths if p.name != "runtime.py" for hit in _reads_environment(p)]
    assert not found, found
    assert _reads_environment(SRC / "experiments" / "runtime.py")  # the check can see a read


def test_the_training_loop_is_the_loop_only():
    lines = (SRC / "experiments" / "loop.py").read_text().splitlines()
    assert len(lines) < 300, f"loop.py has {len(lines)} lines: its jobs belong in recipe/runtime"
