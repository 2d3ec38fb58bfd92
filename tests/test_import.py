"""First use: what ``import groupnorm`` loads, the C++ build's cache name and its one message,
and the operator modules' import graph (no loops).

Import *time* is measured by benchmarks/bench_import.py (a ratio to ``import torch`` in the same
run), not asserted here: what is asserted is the cause of the old 2x, torch._dynamo (and triton)
being imported eagerly.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import groupnorm

SRC = Path(groupnorm.__file__).resolve().parents[1]  # the tree under test (PYTHONPATH's)


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(SRC), **env}
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True,
                          text=True, timeout=900)


def test_import_loads_neither_dynamo_nor_triton_nor_the_extension():
    proc = _run("import sys, groupnorm, groupnorm.layers, groupnorm.kernels\n"
                "print(sorted(m for m in ('torch._dynamo', 'triton', 'torch.utils.cpp_extension')"
                " if m in sys.modules))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout


def test_extension_name_has_source_hash_torch_version_and_cpu_flags(monkeypatch, tmp_path):
    import torch

    from groupnorm.kernels import cpu_ext

    name = cpu_ext.ext_name()
    assert name.isidentifier(), name
    assert torch.__version__.replace(".", "_").replace("+", "_") in name
    src = tmp_path / "gn_cpu.cpp"
    src.write_bytes(cpu_ext.SOURCE.read_bytes() + b"\n// edited\n")
    monkeypatch.setattr(cpu_ext, "SOURCE", src)
    edited = cpu_ext.ext_name()
    assert edited != name, "a source edit must change the build name"
    monkeypatch.setattr(cpu_ext, "cpu_flags", lambda: "other cpu")
    assert cpu_ext.ext_name() != edited, "another CPU must get its own build"
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu128")
    assert "torch2_11_0_cu128" in cpu_ext.ext_name()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert cpu_ext.build_directory("x") == str(tmp_path / "x")


@pytest.mark.slow
def test_first_build_prints_one_line_to_stderr(tmp_path):
    """A fresh cache: the build (1-3 min on 2 cores) says so once, on stderr; stdout stays
    clean; a second process loads the cache silently."""
    code = ("import torch, groupnorm\n"
            "y = groupnorm.group_norm(torch.randn(2, 4, 3, 3), 2, backend='cpu')\n"
            "from groupnorm.kernels import cpu_ext\n"
            "assert cpu_ext.load_cpu_ext()\n")
    first = _run(code, TORCH_EXTENSIONS_DIR=str(tmp_path))
    assert first.returncode == 0, first.stderr
    assert first.stdout == ""
    lines = first.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("groupnorm: compiling the C++ CPU kernels"), (
        first.stderr)
    assert str(tmp_path) in lines[0]
    second = _run(code, TORCH_EXTENSIONS_DIR=str(tmp_path))
    assert second.returncode == 0 and second.stdout == "" and second.stderr == "", second.stderr


# --- import graph -------------------------------------------------------------------------------

#: the operator's modules; experiments/ and the rest of layers/ are checked by their owners
OPERATOR = ["groupnorm.functional", "groupnorm.composite", "groupnorm.modes", "groupnorm.layout",
            "groupnorm.activations", "groupnorm.oracle", "groupnorm.kernels",
            "groupnorm.kernels.ops", "groupnorm.kernels.cpu_ext", "groupnorm.kernels.testing",
            "groupnorm.kernels.triton_kernels", "groupnorm.layers.groupnorm",
            "groupnorm.reference"]  # (the oracle's old name: checked where it still exists)


def _module_file(name: str) -> Path:
    path = SRC.joinpath(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _imports(name: str) -> set[str]:
    """groupnorm modules that ``name`` imports anywhere in its body (lazy imports included)."""
    tree = ast.parse(_module_file(name).read_text())
    package = name if _module_file(name).name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            subs = {f"{base}.{a.name}" for a in node.names}
            modules = {m for m in subs if m.startswith("groupnorm") and _module_file(m).exists()}
            found |= modules
            if len(modules) < len(subs):  # names from base itself, not only its submodules
                found.add(base)
    return {m for m in found if m.startswith("groupnorm") and m != name
            and _module_file(m).exists()}


def test_operator_modules_have_no_import_cycle():
    """functional → kernels → ops → composite/layout/modes/activations, and nothing back."""
    modules = [m for m in OPERATOR if _module_file(m).exists()]
    graph = {m: _imports(m) & set(modules) for m in modules}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for dep in sorted(graph[m]):
            if state.get(dep) == 1:
                pytest.fail("import cycle: " + " -> ".join([*path, m, dep]))
            if dep not in state:
                visit(dep, [*path, m])
        state[m] = 2

    for m in modules:
        if m not in state:
            visit(m, [])


def test_no_module_shares_a_stem_with_a_data_folder():
    """reference.py beside reference/ made the module win the import; no such pair is left."""
    pkg = SRC / "groupnorm"
    for folder in (p for p in pkg.rglob("*") if p.is_dir() and not (p / "__init__.py").exists()
                   and p.name != "__pycache__"):
        assert not folder.with_suffix(".py").exists(), folder
