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
