"""The registry end to end, as an operator does it: train with `tracking.register_as`, point an alias at a version,
`serve run` a config that names `models:/<name>@champion`, segment over HTTP, move the alias, deploy again, and see
the new version in /v1/info (and in its answers)."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from diffseg.core.config import load_config, replace
from diffseg.core.registry import set_alias
from diffseg.core.runtime import SERVE_ENV_DEFAULTS

requests = pytest.importorskip("requests")
pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
NAME = "e2e-seg"


def train(tmp_path, steps):
    """The tiny factorized model, trained in-process (Ray Train local mode); the run registers its final model."""
    from diffseg.training.ray_train import TrainConfig, run

    cfg = load_config(TrainConfig, REPO / "jobs" / "configs" / "factorized_tiny.yaml")
    cfg = replace(cfg, **{"name": "e2e", "output_dir": str(tmp_path / "runs"), "loop.num_steps": steps,
                          "loop.log_every": 5, "loop.checkpoint_every": 100, "loop.num_samples": 2,
                          "loop.sample_steps": 4, "optim.batch_size": 4, "tracking.register_as": NAME,
                          "tracking.system_metrics_every": 2})  # fmt: skip
    return run(cfg).return_value


def serve_config(tmp_path, port) -> Path:
    cfg = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    cfg["http_options"]["port"] = port
    args = cfg["applications"][0]["args"]
    args.update(segmenter=f"models:/{NAME}@champion", use_sampler=False, device="cpu")
    app = cfg["applications"][0]  # no sampler: Serve refuses a deployments: entry for a deployment the app lacks
    app["deployments"] = [d for d in app.get("deployments", []) if d["name"] != "Sampler"]
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start_serve(config: Path, log: Path, address: str = "local") -> subprocess.Popen:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "RAY_AUTH_MODE": "disabled",
        "PYTHONPATH": os.pathsep.join([str(REPO / "platform"), str(REPO)]),
        **{k: os.environ.get(k, v) for k, v in SERVE_ENV_DEFAULTS.items()},  # as jobs/serve_app.py starts Serve
    }  # this checkout's code everywhere
    env.pop("RAY_ADDRESS", None)
    serve_cli = Path(sys.executable).parent / "serve"
    return subprocess.Popen([str(serve_cli), "run", "--address", address, str(config)], cwd=REPO, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout=240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve run exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(2)
    raise AssertionError(f"not healthy after {timeout}s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: serve run shuts Serve and its Ray down
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


def segment(url: str) -> dict:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(buf, format="PNG")
    r = requests.post(f"{url}/v1/segment?seed=0", data=buf.getvalue(), headers={"Content-Type": "image/png"},
                      timeout=120)  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()


def test_serve_follows_the_alias_and_promote_switches_the_live_app(tmp_path, monkeypatch):
    """docs/mlflow.md's alias switch on a live app: a training run registers version 1, its resumed run version 2
    (the same MLflow run); `serve run` of a config naming models:/<name>@champion (version 1) on a `ray start`
    cluster, then `jobs/promote.py name=... alias=champion version=2 address=<dashboard>`: the same Serve (never
    stopped) redeploys and answers with version 2 in /v1/info and in its answers. (One test for both the deploy that
    resolves the alias and the switch: each Serve start costs ~35 s of the suite.)"""
    from test_cluster import LocalCluster  # the `ray start` nodes of tests/test_cluster.py (own ports, temp dir)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    first = train(tmp_path, 10)  # version 1
    second = train(tmp_path, 15)  # the same run, resumed: its new final model is version 2
    assert first["mlflow_run_id"] == second["mlflow_run_id"]
    set_alias(NAME, "champion", 1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url, config = f"http://127.0.0.1:{port}", serve_config(tmp_path, port)
    code = os.pathsep.join([str(REPO / "platform"), str(REPO)])  # serve.app imports on the nodes
    cluster = LocalCluster(head_cpus=2, worker_cpus=1, env={"MLFLOW_TRACKING_URI": uri, "PYTHONPATH": code})
    log = tmp_path / "serve.log"
    proc = None
    try:
        proc = start_serve(config, log, address=cluster.address)
        wait_healthy(url, proc, log)
        info = requests.get(f"{url}/v1/info", timeout=30).json()["models"]["factorized"]
        assert info["registered_model"] == NAME and info["alias"] == "champion" and info["model_version"] == "1"
        assert "source" not in info  # paths stay internal; the version is public
        first_answer = segment(url)
        assert first_answer["model"]["model_version"] == "1" and first_answer["model"]["step"] == 10
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
        promote = [sys.executable, str(REPO / "jobs" / "promote.py"), f"name={NAME}", "alias=champion", "version=2",
                   f"address={cluster.dashboard}", "wait_s=300"]  # fmt: skip
        res = subprocess.run(promote, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=420)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert "[promote] models:/e2e-seg@champion: version 1 -> 2" in res.stdout
        assert "redeploying ['diffseg']" in res.stdout
        assert proc.poll() is None  # the same `serve run`, never stopped
        info = requests.get(f"{url}/v1/info", timeout=30).json()["models"]["factorized"]
        assert info["model_version"] == "2" and info["alias"] == "champion"
        answer = segment(url)
        assert answer["model"]["model_version"] == "2" and answer["model"]["step"] == 15
        assert "source" not in info
    finally:
        if proc is not None:
            stop(proc)
        cluster.shutdown()
