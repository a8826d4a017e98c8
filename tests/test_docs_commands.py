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


# ------------------------------------------------------------------------------------------------ every command
DOC_FILES = ["README.md", *(f"docs/{p.name}" for p in sorted((REPO / "docs").glob("*.md"))),
             *(f"docs/results/{p.name}" for p in sorted((REPO / "docs" / "results").glob("*.md")))]  # fmt: skip
# Inputs a user brings that no documented command writes: public downloads (guided-diffusion's released models, a
# raw data set under ~/data or /data) and one's own old files. Placeholders (`<checkpoint.pt>`) are recognised apart.
USER_FILES = {"lsun_horse.pt", "ffhq.pt", "model.pt", "old/checkpoint.pt"}
USER_FOLDERS = (Path("~/data").expanduser(), Path("/data"))
if not (REPO.parent / "shared").is_dir():  # the real sets beside the clone: where they are absent, like a download
    USER_FOLDERS += ((REPO.parent / "shared").resolve(),)


def documented_commands() -> list[tuple[str, list[str]]]:
    """Every `python jobs/<job>.py ...` line of the README and docs/ (continuation lines joined, the comment cut, a
    `jobs/submit.py -- python ...` unwrapped): [(doc:line, argv)]."""
    found = []
    for doc in DOC_FILES:
        lines = (REPO / doc).read_text().splitlines()
        i = 0
        while i < len(lines):
            m = re.match(r"^\s*(?:[A-Z_]+=\S+\s+)*python3? (jobs/\S+\.py.*)$", lines[i])
            start = i
            if m:
                text = m.group(1)
                while text.rstrip().endswith("\\") and i + 1 < len(lines):
                    i += 1
                    text = text.rstrip()[:-1] + " " + lines[i].strip()
                argv = shlex.split(text.split(" #", 1)[0])
                if argv[0] == "jobs/submit.py":
                    argv = argv[argv.index("--") + 2 :]
                found.append((f"{doc}:{start + 1}", argv))
            i += 1
    return found


def test_every_documented_job_command_passes_its_dry_run_or_names_an_input_another_step_makes(monkeypatch, capsys):
    """Issue 37.4, "the docs' commands run in CI": every job command the README and docs/ give runs `--dry-run`
    from the repository root (in-process: the config is parsed, resolved and checked, inputs included). It passes,
    or stops only because an input is not there yet, and then that input is a placeholder, a user's download, or
    inside the folder another documented command writes (its output_dir/name, or dst). A wrong key, a wrong value, a
    path no step writes (the `runs/features/celeba-20` of an old label-efficient.md) fail here."""
    import importlib.util

    import yaml

    monkeypatch.chdir(REPO)
    saved_env = dict(os.environ)
    modules, outputs, refused = {}, set(), []
    commands = documented_commands()
    assert len(commands) > 60  # the README's and docs' commands were found
    try:
        for where, (job, *args) in commands:
            if job not in modules:
                spec = importlib.util.spec_from_file_location(f"documented_{Path(job).stem}", REPO / job)
                modules[job] = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(modules[job])
            capsys.readouterr()
            try:
                modules[job].main([a for a in args if a != "--resume"] + ["--dry-run"])
                code = 0
            except SystemExit as e:
                code = e.code or 0
            out, err = capsys.readouterr()
            try:
                cfg = yaml.safe_load(out)  # --dry-run prints the resolved config before it checks it
            except yaml.YAMLError:
                cfg = None
            if isinstance(cfg, dict) and cfg.get("output_dir") and cfg.get("name"):
                outputs.add((REPO / str(cfg["output_dir"]) / str(cfg["name"])).resolve())
            if isinstance(cfg, dict) and cfg.get("dst"):
                outputs.add((REPO / Path(str(cfg["dst"])).expanduser()).resolve())
            if code:
                refused.append((where, (err.strip().splitlines() or [f"exit {code}"])[-1]))
    finally:
        os.environ.clear()
        os.environ.update(saved_env)

    wrong = []
    for where, message in refused:
        m = re.fullmatch(r"config error: (\S+): (.+) does not exist", message)
        if m is None:
            wrong.append(f"{where}: {message}")
            continue
        value = m.group(2)
        path = (REPO / Path(value).expanduser()).resolve()
        if "<" in value or value in USER_FILES or any(f == path or f in path.parents for f in USER_FOLDERS):
            continue
        if not any(o == path or o in path.parents for o in outputs):
            wrong.append(f"{where}: {message} (and no documented command writes it)")
    assert not wrong, "\n".join(wrong)
