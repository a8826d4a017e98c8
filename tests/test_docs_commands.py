"""Commands the docs give, run as written (paths moved into a temporary folder where they write)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def doc_command(doc: str, pattern: str) -> list[str]:
    """The first indented command line of docs/<doc> matching `pattern`, comment removed, split like a shell."""
    for line in (REPO / "docs" / doc).read_text().splitlines():
        if line.startswith("    ") and re.search(pattern, line):
            return shlex.split(line.split("  #")[0].strip())
    raise AssertionError(f"docs/{doc}: no command matching {pattern!r}")


def test_training_docs_validation_command_names_its_held_out_images():
    """docs/training.md: `loop.eval_every` with `data.num_test`, checked by --dry-run; without the held-out images the
    dry run refuses it, naming data.num_test (it used to fail only once training had started)."""
    cmd = doc_command("training.md", r"loop\.eval_every=\d+ data\.num_test=")
    assert cmd[:2] == ["python", "jobs/train_factorized.py"]
    ok = subprocess.run([sys.executable, *cmd[1:], "--dry-run"], cwd=REPO, env=ENV, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr[-2000:]
    without = [a for a in cmd[1:] if not a.startswith("data.num_test=")]
    bad = subprocess.run([sys.executable, *without, "--dry-run"], cwd=REPO, env=ENV, capture_output=True, text=True)
    assert bad.returncode == 2 and "set data.num_test" in bad.stderr, bad.stderr[-2000:]


def test_sweeps_docs_notebook_command_is_installed():
    """docs/sweeps.md runs the notebook with `jupyter execute` (nbclient, in the test extras); nbconvert is not."""
    text = (REPO / "docs" / "sweeps.md").read_text()
    cmd = shlex.split(re.search(r"`(jupyter execute [^`]+)`", text).group(1))
    jupyter = shutil.which("jupyter", path=str(Path(sys.executable).parent)) or shutil.which("jupyter")
    assert jupyter, "jupyter is not installed beside this Python"
    res = subprocess.run([jupyter, *cmd[1:2], "--help"], capture_output=True, text=True, env=ENV, timeout=120)
    assert res.returncode == 0 and "--inplace" in res.stdout + res.stderr


def test_serving_docs_port_command_exists():
    """docs/serving.md moves the port with `serve start --http-port` (serve run has none)."""
    cmd = doc_command("serving.md", r"serve start .*--http-port")
    serve = shutil.which("serve", path=str(Path(sys.executable).parent))
    assert serve
    res = subprocess.run([serve, "start", "--help"], capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 0 and "--http-port" in res.stdout
    assert "--port" not in subprocess.run([serve, "run", "--help"], capture_output=True, text=True, env=ENV).stdout
    assert "--http-port" in cmd


def test_mlflow_docs_guided_diffusion_round_trip_needs_no_flags(tmp_path):
    """docs/mlflow.md: export a DDPM to guided-diffusion, then import it back with no flags= (its .json beside it)."""
    from diffseg.core.tracking import TrackingConfig
    from diffseg.serving.convert import ConvertConfig, run_convert

    export = doc_command("mlflow.md", r"to=guided-diffusion dst=")
    back = doc_command("mlflow.md", r"src=exports/ddpm\.pt dst=")
    assert not any(a.startswith(("flags=", "preset=")) for a in back)

    def cfg(args: list[str]) -> ConvertConfig:
        kv = dict(a.split("=", 1) for a in args[2:])
        if kv["src"].startswith("runs/"):
            kv["src"] = str(REPO / "models" / "ddpm-celeba32-145k.pt")  # a DDPM trained here
        kv = {k: str(tmp_path / v) if k in ("src", "dst") and not v.startswith("/") else v for k, v in kv.items()}
        return ConvertConfig(**kv, tracking=TrackingConfig(enabled=False))

    assert run_convert(cfg(export))["max_abs_diff"] == 0.0
    assert (tmp_path / "exports" / "ddpm.json").is_file()
    out = run_convert(cfg(back))
    assert out["from"] == "guided-diffusion" and out["max_abs_diff"] == 0.0


@pytest.mark.parametrize("doc", ["mlflow.md", "serving.md"])
def test_docs_alias_switch_is_the_promote_command(doc):
    """The alias switch the docs give is `jobs/promote.py`, which moves the alias AND redeploys (a second
    `serve run` of an unchanged config does not switch the live app)."""
    text = (REPO / "docs" / doc).read_text()
    assert re.search(r"python jobs/promote\.py name=\S+ alias=\S+ version=\d+", text), doc


def test_the_docs_token_command_writes_it_owner_only(tmp_path):
    """docs/cluster.md's token command, run as written in a fresh HOME: `ray get-auth-token --generate` alone writes
    ~/.ray/auth_token with a plain open (0644 under the usual umask: anyone on the machine could run code on the
    cluster); the documented command runs it under `umask 077`, so the file is 0600 from the start."""
    line = next(
        raw.split("  #")[0].strip()
        for raw in (REPO / "docs" / "cluster.md").read_text().splitlines()
        if raw.startswith("    ") and "ray get-auth-token --generate" in raw
    )
    assert line.startswith("(umask 077 &&"), line
    bindir = str(Path(sys.executable).parent)
    env = {**ENV, "HOME": str(tmp_path), "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    subprocess.run(["bash", "-c", f"umask 022; {line}"], env=env, check=True, capture_output=True, timeout=300)
    token = tmp_path / ".ray" / "auth_token"
    assert token.is_file() and token.stat().st_mode & 0o777 == 0o600, oct(token.stat().st_mode)
    bare = tmp_path / "bare"
    bare.mkdir()
    env["HOME"] = str(bare)  # what the docs no longer say: Ray's own mode
    subprocess.run(["bash", "-c", "umask 022; ray get-auth-token --generate"], env=env, check=True,
                   capture_output=True, timeout=300)  # fmt: skip
    assert (bare / ".ray" / "auth_token").stat().st_mode & 0o077, "Ray writes it owner-only now: simplify the docs"
