"""The house's shape: the floors' import contract holds (and can fail), no import circles, and
modules and functions that fit a reader (docs/architecture.md)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

PACKAGES = ("vae_lightning", "hydra_plugins")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """import-linter over the packages in ``root`` with the contract in its pyproject.toml."""
    script = Path(sys.executable).with_name("lint-imports")
    return subprocess.run(
        [str(script), "--no-cache"],
        cwd=root, capture_output=True, text=True, timeout=120,
        env={"PYTHONPATH": str(root), "PATH": str(Path(sys.executable).parent)},
    )  # fmt: skip


def test_the_floors_contract_holds():
    result = lint_imports(REPO_ROOT)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "3 kept, 0 broken" in result.stdout


def test_the_contract_fails_when_a_model_imports_from_the_evaluation(tmp_path):
    """A copy of the package whose maths imports the evaluation breaks the layers."""
    for name in PACKAGES:
        shutil.copytree(REPO_ROOT / name, tmp_path / name,
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    shutil.copy(REPO_ROOT / "pyproject.toml", tmp_path)
    base = tmp_path / "vae_lightning" / "models" / "base.py"
    base.write_text(base.read_text() + "\nfrom vae_lightning.evaluation import fid  # noqa\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1
    assert "vae_lightning.models is not allowed to import vae_lightning.evaluation" in result.stdout


def test_no_import_circles():
    """No module reaches itself through the imports of the package (function-level ones too)."""
    import grimp

    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    own = ("vae_lightning", "hydra_plugins.vae_lightning_fused")  # not the other Hydra plugins
    modules = sorted(m for m in graph.modules if m.startswith(own))
    index = {m: i for i, m in enumerate(modules)}
    edges = {m: sorted(n for n in graph.find_modules_directly_imported_by(m) if n in index)
             for m in modules}  # fmt: skip
    # Tarjan's strongly connected components: a component of two or more modules is a circle
    low, order, stack, on, circles = {}, {}, [], set(), []

    def visit(m: str) -> None:
        order[m] = low[m] = len(order)
        stack.append(m)
        on.add(m)
        for n in edges[m]:
            if n not in order:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in on:
                low[m] = min(low[m], order[n])
        if low[m] == order[m]:
            component = []
            while True:
                n = stack.pop()
                on.discard(n)
                component.append(n)
                if n == m:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for m in modules:
        if m not in order:
            visit(m)
    assert len(index) > 40 and circles == []


def sources() -> list[Path]:
    return sorted(p for name in PACKAGES for p in (REPO_ROOT / name).rglob("*.py"))


@pytest.mark.parametrize("limit", [500])
def test_no_module_over_500_lines_and_train_py_within_220(limit):
    sizes = {p.relative_to(REPO_ROOT): len(p.read_text().splitlines()) for p in sources()}
    assert {p: n for p, n in sizes.items() if n > limit} == {}
    assert sizes[Path("vae_lightning/train.py")] <= 220


def test_no_function_over_60_lines():
    long = []
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    long.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} {node.name} {lines}")
    assert long == []


def test_every_floor_says_what_lives_there_and_what_it_may_import():
    for init in sorted((REPO_ROOT / "vae_lightning").glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert len(doc) > 200 and "import" in doc, init
