"""The package's shape (docs/architecture.md): the import-linter contracts of pyproject.toml hold, no module
imports another textseg_cli module inside a function (such imports hide cycles), and the package top holds only
the modules the architecture names."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import textseg_cli

PACKAGE = Path(textseg_cli.__file__).parent
TOP_LEVEL = {"__init__.py", "__main__.py", "api.py", "errors.py", "console.py"}


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_import_contracts_hold():
    pytest.importorskip("importlinter", reason="import-linter is in the [test] extra")
    exe = Path(sys.executable).with_name("lint-imports")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "importlinter.cli"]
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run(cmd + ["--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                         capture_output=True, text=True, encoding="utf-8", errors="replace")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "0 broken" in res.stdout


def test_no_internal_imports_inside_functions():
    """Except the command modules of cli/, which import the function they call inside the command (marked
    `# lazy`), so that `textseg --help` does not import torch; nothing imports cli/, so no cycle can hide there."""
    found = []
    for path in _modules():
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        tree = ast.parse(text)
        for func in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(func):
                mod = node.module if isinstance(node, ast.ImportFrom) else None
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                internal = (mod and (mod.startswith("textseg_cli") or node.level)) or any(
                    n.startswith("textseg_cli") for n in names)
                if internal and not (path.parent.name == "cli" and "# lazy" in lines[node.lineno - 1]):
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not found, f"imports of textseg_cli modules inside functions: {found}"


def test_package_top_holds_only_the_named_modules():
    loose = {p.name for p in PACKAGE.glob("*.py")} - TOP_LEVEL
    assert not loose, f"modules loose at the package top: {sorted(loose)} (docs/architecture.md lists the homes)"


def test_help_does_not_import_torch():
    """`textseg --help` stays fast: the CLI imports torch only when a command runs."""
    code = "import sys, textseg_cli.cli; print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8", errors="replace")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"
