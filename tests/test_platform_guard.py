"""platform/ is a source root, never a package: an __init__.py there would shadow Python's own `platform` module."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_platform_is_the_stdlib_module():
    import platform

    assert callable(platform.system) and platform.system()  # e.g. "Linux"
    assert not Path(platform.__file__).resolve().is_relative_to(REPO)
    assert not (REPO / "platform" / "__init__.py").exists()


def test_platform_stays_stdlib_with_the_repo_on_sys_path():
    # A fresh interpreter with the repository root first on sys.path, as a job started from the repo would have.
    code = "import platform, sys; print(platform.system()); print(platform.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(REPO)},
    ).stdout.splitlines()
    assert out[0] and not Path(out[1]).resolve().is_relative_to(REPO)


def test_two_command_start():
    """The README opens with its title, one sentence, then `make demo` and `make test`; both set up .venv first; CI
    runs `make test`, which checks the import contracts before pytest."""
    paragraphs = [p.strip() for p in (REPO / "README.md").read_text().split("\n\n") if p.strip()]
    assert paragraphs[0] == "# diffseg"
    assert paragraphs[1].count(". ") == 0 and paragraphs[1].endswith("."), paragraphs[1]  # one sentence
    assert paragraphs[2].split() == ["make", "demo", "make", "test"]
    makefile = (REPO / "Makefile").read_text()
    assert "\ndemo: $(STAMP)" in makefile and "\ntest: lint-imports" in makefile
    assert "\nlint-imports: $(STAMP)" in makefile and "lint-imports\n" in makefile
    assert "-m venv" in makefile and "pip install" in makefile
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1].strip() == "make test"
    for name in ("pyproject.toml", "Makefile", "cluster.yaml", "platform/diffseg/__init__.py", "jobs/demo.py"):
        assert (REPO / name).is_file(), name
