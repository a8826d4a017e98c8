"""`python jobs/serve_app.py`, the checked way to run the Serve app (issue 36, points 4-6 and 10):

- a missing, damaged or unsealed model file ends it in one line naming the file, before Ray starts (`serve run`
  printed it four times with tracebacks, then stayed up with /healthz answering 404);
- a served app: the token file Ray writes is 0600, Ray's ports listen on loopback, SIGTERM exits 143 in one line and
  leaves nothing in /tmp;
- a proxy that never passes its readiness check (what a loaded machine did to Ray's 5 s check) ends it with the reason
  and the setting to raise, instead of a bare ActorDiedError or a hang.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from test_serving import tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "serve_app.py"
sys.path.insert(0, str(REPO))  # the `serve` package at the repository root


def _config(tmp_path: Path, segmenter: str, port: int = 8000) -> Path:
    """serve/config.yaml with another segmenter and port (Serve's own format, as a user copies it)."""
    config = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    config["http_options"]["port"] = port
    args = config["applications"][0]["args"]
    args.update(segmenter=segmenter, device="cpu", use_gpu="no")
    for entry in config["applications"][0]["deployments"]:
        entry["ray_actor_options"] = {"num_cpus": 0.25}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("how", ["missing", "unsealed", "damaged"])
def test_a_bad_model_file_ends_it_in_one_line_before_ray_starts(tmp_path, capsys, how):
    import ray

    from diffseg.models.integrity import INTEGRITY_KEY

    path = tmp_path / "checkpoint.pt"
    if how != "missing":
        tiny_checkpoint(path)
        raw = torch.load(path, weights_only=True)
        if how == "unsealed":
            raw.pop(INTEGRITY_KEY)
        else:
            raw["ema"] = {k: v + 1 if v.is_floating_point() else v for k, v in raw["ema"].items()}
        torch.save(raw, path)
    main = _job_main()
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as end:
        main([f"serve_config={_config(tmp_path, str(path))}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert end.value.code == 1 and len(err) == 1, err
    assert err[0].startswith("error: application diffseg: segmenter: ") and str(path) in err[0], err
    assert {"missing": "does not exist", "unsealed": "integrity record", "damaged": "SHA-256"}[how] in err[0], err
    assert not ray.is_initialized() and time.perf_counter() - t0 < 30  # nothing started


def test_the_launcher_refuses_what_it_cannot_run_naming_the_key(tmp_path, capsys):
    main = _job_main()
    config = yaml.safe_load(_config(tmp_path, "x.pt").read_text())
    config["applications"][0]["import_path"] = "other.app:build"
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as end:
        main([f"serve_config={tmp_path / 'other.yaml'}"])
    assert end.value.code == 1 and "applications[0].import_path: 'other.app:build'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as end:  # a local Ray ends with the command: block=false makes no sense there
        main(["block=false"])
    assert end.value.code == 2 and "block: false needs a running cluster" in capsys.readouterr().err


def test_changed_args_drop_the_deployments_they_no_longer_create(tmp_path):
    from serve.launch import ServeLaunchConfig, load_serve_config

    cfg = ServeLaunchConfig(serve_config=str(REPO / "serve" / "config.yaml"),
                            args={"segmenter": None, "pixel": "runs/demo/segmenter_ddpm.pt"})  # fmt: skip
    app = load_serve_config(cfg)["applications"][0]
    assert app["args"]["segmenter"] is None and app["args"]["pixel"] == "runs/demo/segmenter_ddpm.pt"
    assert app["args"]["limits"]["max_steps"] == 250  # the rest of the file's args stay
    assert [d["name"] for d in app["deployments"]] == ["Ingress"]  # FactorizedSegmenter and Sampler had no source


def _job_main():
    from test_job_exits import _job_main as job_main  # loads jobs/<name>.py by its path

    return job_main("serve_app")


def _start(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / "serve.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, str(JOB), *args], cwd=tmp_path, env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    return proc, log


def _listeners(pids: set[int]) -> list[tuple[str, str]]:
    """(local address, process name) of the TCP sockets the processes `pids` listen on (psutil, which Ray brings)."""
    import psutil

    found = []
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids:
            try:
                name = psutil.Process(conn.pid).name()
            except psutil.Error:
                continue
            found.append((f"{conn.laddr.ip}:{conn.laddr.port}", name))
    return found


def _descendants(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,sid="], capture_output=True, text=True).stdout
    rows = [tuple(map(int, line.split())) for line in out.splitlines()]
    return {p for p, _, sid in rows if sid == pid}  # the launcher leads its own session (start_new_session)


@pytest.mark.slow
def test_serve_app_runs_on_loopback_with_an_owner_only_token_and_ends_cleanly(tmp_path):
    """The whole life of a served app: a fresh HOME (Ray writes a new ~/.ray/auth_token, with a plain open: 0644),
    /healthz answers, the token is 0600, every Ray port is on 127.0.0.1, SIGTERM ends it with 143 and one line, and
    its temp folder (where Ray's dashboard forkserver put its pymp-* folder) is gone."""
    import requests

    home = tmp_path / "home"
    home.mkdir()
    port = _free_port()
    ckpt = tiny_checkpoint(tmp_path / "checkpoint.pt")
    proc, log = _start(tmp_path, f"serve_config={_config(tmp_path, str(ckpt), port)}", "num_cpus=2",
                       env={"HOME": str(home), "RAY_AUTH_MODE": "token"})  # fmt: skip
    try:
        deadline = time.time() + 300
        while "serving diffseg at" not in log.read_text():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=30).json()["status"] == "ok"
        token = home / ".ray" / "auth_token"
        assert token.is_file() and token.stat().st_mode & 0o777 == 0o600
        listening = _listeners(_descendants(proc.pid))
        assert listening, "no listening socket found"
        # Serve's replicas open their inter-deployment gRPC server on [::]:0, hard-coded in Ray
        # (ray/serve/_private/replica.py); every other Ray port follows the node address, 127.0.0.1 here.
        wide = [(a, name) for a, name in listening if "127.0.0.1" not in a and not name.startswith("ray::Serve")]
        assert not wide, wide
        scratch = [p for p in Path("/tmp").glob("diffseg-ray-*") if p.stat().st_uid == os.getuid()]
        ours = [p for p in scratch if any(str(p) in _environ(pid) for pid in _descendants(proc.pid))]
        assert ours, "the local Ray did not get its own temp folder"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM
        assert log.read_text().strip().splitlines()[-1] == "interrupted: terminated by signal SIGTERM"
        assert not any(p.exists() for p in ours), ours
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _environ(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.slow
def test_a_proxy_that_never_gets_ready_ends_it_with_the_setting_to_raise(tmp_path):
    """Ray's proxy readiness check missed again and again (here forced with a 1 ms limit; beside two trainings Ray's
    5 s did it): `serve run` died with a bare ActorDiedError or waited for good; this says why and what to set."""
    ckpt = tiny_checkpoint(tmp_path / "checkpoint.pt")
    proc, log = _start(tmp_path, f"serve_config={_config(tmp_path, str(ckpt), _free_port())}", "num_cpus=2",
                       "ready_timeout_s=10", env={"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "0.001"})  # fmt: skip
    try:
        assert proc.wait(timeout=300) == 1, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # one line of ours (Ray's own log lines from a start on a loaded machine may come after it)
    (last,) = [line for line in log.read_text().splitlines() if line.startswith("error: ")]
    assert last.startswith("error: application diffseg ") and "ready_timeout_s=10" in last, last
    assert "set RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S higher than 0.001" in last, last


def test_the_serve_settings_for_a_loaded_machine_are_defaults_the_user_can_override(monkeypatch):
    from diffseg.core.runtime import SERVE_ENV_DEFAULTS, serve_env

    for key in SERVE_ENV_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "12")
    env = serve_env()
    assert env["RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"] == "60"  # Ray's own: 5 s
    assert env["RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S"] == "12"  # the user's value wins
