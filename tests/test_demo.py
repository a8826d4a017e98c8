"""The front page is what a fresh clone prints: `jobs/demo.py` (what `make demo` runs) is deterministic on a CPU, and
its table is the one README.md shows, to the digit."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def table_rows(text: str) -> dict[str, list[str]]:
    """The demo table's rows: {method: [input dim, mIoU, pixel acc]} (the first table with a 'pixel MLPs' row)."""
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\|\s*(pixel MLPs on [^|]+?)\s*\|\s*(\d+)\s*\|\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|", line)
        if m and m.group(1) not in rows:
            rows[m.group(1)] = [m.group(2), m.group(3), m.group(4)]
    return rows


def test_the_demo_prints_the_readme_table(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "demo.py"), f"output_dir={tmp_path / 'demo'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    printed = table_rows(res.stdout)
    readme = table_rows((REPO / "README.md").read_text())
    assert set(printed) == {"pixel MLPs on DDPM features", "pixel MLPs on raw RGB (baseline)"}
    assert printed == readme, f"the demo printed {printed}; README.md shows {readme}"
