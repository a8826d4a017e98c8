"""Stage `tests`: the `gpu`-marked pytest tests, pass/fail/skip counts and the output's tail."""

from __future__ import annotations

import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from kit import REPO
from kit.stage import Recorder, left, tail


def gpu_test_files() -> list[str]:
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py") if "mark.gpu" in p.read_text())


def stage_tests(spec: dict, rec: Recorder) -> None:
    """`pytest -m gpu` over the test files that have gpu-marked tests (only those: other files may import Ray)."""
    files = gpu_test_files()
    rec.set("files", files)
    xml = Path(spec["work"]) / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-s", f"--junitxml={xml}"]
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd + files, cwd=REPO, capture_output=True, text=True, timeout=max(5.0, left(spec) - 3))
        output, rc = out.stdout + out.stderr, out.returncode
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        rec.set("tail", tail(output))
        raise
    rec.set("seconds", time.perf_counter() - t0)
    rec.set("exit_code", rc)
    rec.set("tail", tail(output))
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    cases = []
    if xml.is_file():
        for case in ET.parse(xml).getroot().iter("testcase"):
            outcome = "passed"
            for child, name in (("failure", "failed"), ("error", "errors"), ("skipped", "skipped")):
                if case.find(child) is not None:
                    outcome = name
            counts[outcome] += 1
            cases.append(
                {
                    "test": f"{case.get('classname')}::{case.get('name')}",
                    "outcome": outcome,
                    "seconds": float(case.get("time") or 0),
                }
            )
    rec.set("counts", counts)
    rec.set("cases", cases)
    if rc not in (0, 5) or counts["failed"] or counts["errors"]:  # 5 = nothing collected
        rec.finish("failed", reason=f"pytest exit code {rc}: {counts}")
