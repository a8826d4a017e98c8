"""The import contracts of pyproject.toml (`lint-imports`, run by `make test`): they hold on this tree, and they fail
when a copy of the tree breaks them on purpose (an import running up a layer, Ray or MLflow where they are not allowed,
a subpackage the layers do not place)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _copy_tree(dst: Path) -> Path:
    """platform/diffseg, serve/ and pyproject.toml, as the contracts see them (sources only)."""
    only_sources = shutil.ignore_patterns("__pycache__", "*.pyc", "static")
    shutil.copytree(REPO / "platform" / "diffseg", dst / "platform" / "diffseg", ignore=only_sources)
    shutil.copytree(REPO / "serve", dst / "serve", ignore=only_sources)
    shutil.copy(REPO / "pyproject.toml", dst / "pyproject.toml")
    return dst


def _lint(root: Path) -> subprocess.CompletedProcess:
    if not LINT_IMPORTS.is_file():
        pytest.fail(f"{LINT_IMPORTS} not found: install the test extras (pip install -e '.[test]': import-linter)")
    # lint-imports puts its working directory first on sys.path (so `serve` is the copy's); PYTHONPATH does the same for
    # the copy's platform/ source root, ahead of the checkout the venv was installed from.
    env = {**os.environ, "PYTHONPATH": str(root / "platform")}
    cmd = [str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"]
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_the_contracts_hold_on_this_tree(tmp_path):
    result = _lint(_copy_tree(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout
    assert "diffseg's layers import only downwards KEPT" in result.stdout


BREAKS = {
    # file in the copied package -> (its source, the contract that must break, the import it must name)
    "upward": (
        "models/upward.py",
        "from diffseg.experiments import demo  # noqa: F401\n",
        "diffseg's layers import only downwards",
        "diffseg.models.upward -> diffseg.experiments.demo",
    ),
    "sideways": (  # independent layers on one line: data may not import models (nor models data)
        "data/sideways.py",
        "from diffseg.models import unet  # noqa: F401\n",
        "diffseg's layers import only downwards",
        "diffseg.data.sideways -> diffseg.models.unet",
    ),
    "ray": (  # a lazy import counts as much as a top-level one
        "evaluation/uses_ray.py",
        "def start():\n    import ray\n\n    ray.init()\n",
        "Ray only at the platform's edges",
        "diffseg.evaluation.uses_ray -> ray",
    ),
    "mlflow": (
        "methods/uses_mlflow.py",
        "import mlflow  # noqa: F401\n",
        "MLflow only in tracking",
        "diffseg.methods.uses_mlflow -> mlflow",
    ),
    "unplaced": (  # `exhaustive`: a new subpackage must be given its layer
        "extras/__init__.py",
        "",
        "diffseg's layers import only downwards",
        "diffseg.extras",
    ),
}


@pytest.mark.parametrize("case", sorted(BREAKS))
def test_a_broken_contract_fails_lint_imports(tmp_path, case):
    rel, source, contract, names = BREAKS[case]
    root = _copy_tree(tmp_path)
    path = root / "platform" / "diffseg" / rel
    path.parent.mkdir(exist_ok=True)
    path.write_text(source)
    result = _lint(root)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert f"{contract}" in out and "BROKEN" in out, out
    assert names in out, out
