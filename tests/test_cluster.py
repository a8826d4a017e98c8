"""A two-node Ray cluster on this machine (`ray start --head` + `ray start --address`) used as a researcher would, from
a working directory of their own with relative paths only: a 2-worker training job submitted through the Job API
(`jobs/submit.py`), a 2-trial Tune sweep driven from that directory, then the next jobs (segment, Serve) reading what
they wrote, from the same directory. Every output must be where docs/cluster.md says ("From your own working
directory"), and the commands are the ones it shows.

Other Ray clusters may run on this machine at the same time, so the cluster gets its own temp dir (which also keeps
`/tmp/ray/ray_current_cluster` untouched: nothing else auto-connects to it), its own free ports, and it is shut down by
killing the process groups it started, never with `ray stop` (which stops every Ray instance on the machine).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from diffseg.models.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).parent / "ray"
SERVE = Path(sys.executable).parent / "serve"
# This checkout's code, importable as an installed checkout's is (`pip install -e .`, which cluster.yaml runs on every
# node): `diffseg` from platform/, `serve.app` from the root. The shared venv may hold another checkout's install.
INSTALLED = {"PYTHONPATH": f"{REPO / 'platform'}{os.pathsep}{REPO}"}


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _pids_using(path: str) -> list[int]:
    """Processes whose command line names `path` (our cluster's unique temp dir): what is left of our cluster."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if path.encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


class LocalCluster:
    """A head and one worker node started with the `ray` CLI (`--block`, each in its own session)."""

    def __init__(self, head_cpus: int = 1, worker_cpus: int = 1, env: dict[str, str] | None = None):
        # Short: Ray's Unix sockets live under it and a socket path has at most 107 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="rdsg", dir="/tmp")
        # A cluster's nodes know nothing of this session's MLflow store (conftest's throwaway one) nor its workdir.
        skip = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI", "DIFFSEG_WORKDIR")
        self.env = {k: v for k, v in os.environ.items() if k not in skip}
        self.env.update(
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # `python` = this venv's
            RAY_AUTH_MODE="disabled",
            RAY_USAGE_STATS_ENABLED="0",
            PYTHONUNBUFFERED="1",
        )
        self.env.update(env or {})  # the caller's win (RAY_AUTH_MODE=token for a cluster with token auth)
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        port, self.dashboard_port, client_port = _free_ports(3)
        self.address = f"127.0.0.1:{port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        try:
            self._start(
                "head",
                ["--head", f"--port={port}", f"--dashboard-port={self.dashboard_port}", "--dashboard-host=127.0.0.1",
                 f"--ray-client-server-port={client_port}", f"--num-cpus={head_cpus}", '--resources={"head": 1}'],
            )  # fmt: skip
            self._wait(lambda: self._alive_nodes() >= 1, "the head node")
            self._start(
                "worker",
                [f"--address={self.address}", f"--num-cpus={worker_cpus}", '--resources={"worker": 1}'],
            )
            self._wait(lambda: self._alive_nodes() >= 2, "the worker node")
        except BaseException:
            self.shutdown()
            raise

    def _start(self, name: str, args: list[str]) -> None:
        node_manager, object_manager, agent, agent_grpc, runtime_env, metrics = _free_ports(6)
        cmd = [
            str(RAY), "start", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
            f"--temp-dir={self.temp_dir}", "--num-gpus=0", f"--object-store-memory={128 * 1024**2}",
            f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
            f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}", *args,
        ]  # fmt: skip
        log = Path(self.temp_dir) / f"{name}.out"
        self.logs.append(log)
        with open(log, "wb") as f:  # the child keeps its own handle
            # A new session: the node's processes form a process group we can kill without touching anyone else's.
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.procs.append(proc)

    def _alive_nodes(self) -> int:
        try:
            nodes = _get_json(f"{self.dashboard}/nodes?view=summary")["data"]["summary"]
        except OSError:
            return 0
        return sum(1 for n in nodes if n.get("raylet", {}).get("state") == "ALIVE")

    def _wait(self, ready, what: str, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(p.poll() is not None for p in self.procs):
                break
            if ready():
                return
            time.sleep(0.5)
        tails = "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-2000:]}" for log in self.logs)
        raise RuntimeError(f"{what} did not come up\n{tails}")

    def shutdown(self) -> None:
        for proc in reversed(self.procs):  # the worker first, then the head
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        # A short grace: the raylets exit on SIGTERM, `ray start --block`, the GCS and the dashboard take longer
        # than it is worth waiting for (nothing of this cluster needs to outlive the test).
        deadline = time.time() + 3
        while time.time() < deadline and (any(p.poll() is None for p in self.procs) or _pids_using(self.temp_dir)):
            time.sleep(0.5)
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
        for pid in _pids_using(self.temp_dir):  # anything of ours that left the process groups (setsid workers)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def two_nodes():
    cluster = LocalCluster(head_cpus=1, worker_cpus=1, env=INSTALLED)
    yield cluster
    cluster.shutdown()
    assert not _pids_using(cluster.temp_dir), "processes of the test cluster survived its shutdown"


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 420) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{shlex.join(cmd)} failed:\n{(out.stdout + out.stderr)[-6000:]}"
    return out.stdout + out.stderr


def _git_head() -> str | None:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def _serve_actors(dashboard: str) -> list[str]:
    """Serve's controller and proxies on the cluster that are not dead (their states)."""
    actors = _get_json(f"{dashboard}/api/v0/actors?limit=1000&detail=1")["data"]["result"]["result"]
    return [
        f"{a['class_name']}: {a['state']}"
        for a in actors
        if a.get("class_name") in ("ServeController", "ProxyActor") and a.get("state") != "DEAD"
    ]


def _png(seed: int = 0) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_a_working_directory_of_relative_paths_on_a_two_node_cluster(two_nodes, tmp_path):
    """docs/cluster.md, "From your own working directory": every command run from `work/`, relative paths only."""
    import mlflow

    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in two_nodes.env.items() if k not in ("MLFLOW_TRACKING_URI", "DIFFSEG_WORKDIR")}
    env["OMP_NUM_THREADS"] = "1"
    py = sys.executable

    # 1. A 2-worker training job submitted through the Job API (jobs/submit.py): outputs land in work/, not in the
    #    job's unpacked copy of the code, nor in a Ray worker's temp folder.
    logs = _run(
        [py, str(REPO / "jobs" / "submit.py"), "--address", two_nodes.dashboard, "--",
         "python", "jobs/train_factorized.py", "--config", "factorized_tiny16.yaml", "scaling.num_workers=2",
         "tracking.enabled=true"],
        work, env,
    )  # fmt: skip
    assert "[train] step 6/6 loss" in logs and "2 worker(s)" in logs and "SUCCEEDED" in logs, logs[-3000:]
    actors = _get_json(f"{two_nodes.dashboard}/api/v0/actors?limit=1000&detail=1")["data"]["result"]["result"]
    workers = [a for a in actors if a.get("class_name") == "RayTrainWorker"]
    assert len({a["node_id"] for a in workers}) == 2, workers  # one training worker on each node
    run = work / "runs" / "factorized-tiny16"
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert ckpt.step == 6 and ckpt.config["output_dir"] == str(work / "runs")
    assert (run / "config.yaml").is_file() and list((run / "samples").glob("*.png"))
    assert list(run.glob("checkpoint_*/checkpoint.pt"))  # Ray Train's own, in the same storage
    client = mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("diffseg")
    assert exp.artifact_location.removeprefix("file://") == str(work / "mlartifacts" / "diffseg")
    (found,) = client.search_runs([exp.experiment_id], "attributes.run_name = 'factorized-tiny16'")
    assert found.info.run_id == ckpt.extra["mlflow_run_id"] and found.info.status == "FINISHED"
    assert found.data.tags["diffseg.git_dirty"] in ("true", "false")
    if _git_head():  # the commit travels with the submission (the upload has no .git)
        assert found.data.tags["mlflow.source.git.commit"] == _git_head()
    artifacts = work / "mlartifacts" / "diffseg" / found.info.run_id / "artifacts"
    assert (artifacts / "checkpoint" / "checkpoint.pt").is_file() and list((artifacts / "samples").glob("*.png"))

    # 2. A 2-trial Tune sweep driven from work/ on the cluster: tables, the best model and the feature shards (the
    #    second trial and the chosen recipe's test scoring hit the cache) in work/runs/sweeps, its runs in
    #    work/mlflow.db.
    cluster_env = {**env, "RAY_ADDRESS": two_nodes.address}
    _run([py, str(REPO / "jobs" / "sweep.py"), "--config", "sweep_pixel_tiny.yaml"], work, cluster_env)
    sweep = work / "runs" / "sweeps" / "pixel-tiny"
    table = (sweep / "results.csv").read_text().splitlines()
    assert len(table) == 3 and "val/miou" in table[0] and "test/miou" not in table[0]
    assert (sweep / "results.md").is_file() and (sweep / "best_config.yaml").is_file()
    assert "test/miou" in json.loads((sweep / "best" / "summary.json").read_text())["test"]
    assert (sweep / "best" / "segmenter.pt").is_file()
    cache = work / "runs" / "sweeps" / "feature_cache"
    (entry,) = [p for p in cache.iterdir() if (p / "_SUCCESS").is_file()]
    assert list(entry.glob("*.parquet")) and (entry / "manifest.json").is_file()
    assert sorted(json.loads(line)["event"] for line in (cache / "events.jsonl").read_text().splitlines()) == [
        "build", "hit", "hit"]  # fmt: skip
    (parent,) = client.search_runs([exp.experiment_id], "attributes.run_name = 'pixel-tiny'")
    assert (work / "mlartifacts" / "diffseg" / parent.info.run_id / "artifacts" / "results.csv").is_file()

    # 3. The next jobs, from the same directory: masks from the checkpoint, then Serve with both models.
    _run(
        [py, str(REPO / "jobs" / "segment.py"), "checkpoint=runs/factorized-tiny16/checkpoint.pt",
         "data.name=synthetic", "data.image_size=16", "limit=4"],
        work, env,
    )  # fmt: skip
    assert len(list((work / "runs" / "segment" / "segment" / "masks").glob("*.png"))) == 4
    (port,) = _free_ports(1)
    _run([str(SERVE), "start", "--address", two_nodes.address, "--proxy-location", "HeadOnly",
          "--http-host", "127.0.0.1", "--http-port", str(port)], work, env)  # fmt: skip
    try:
        _run([str(SERVE), "run", "--address", two_nodes.address, "--non-blocking", "serve.app:build_app",
              "segmenter=runs/factorized-tiny16/checkpoint.pt", "pixel=runs/sweeps/pixel-tiny/best/segmenter.pt"],
             work, env)  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 180
        while True:
            try:
                if _get_json(f"{url}/healthz").get("status") == "ok":
                    break
            except OSError:
                pass
            assert time.time() < deadline, "the Serve app did not become healthy"
            time.sleep(1)
        for method, names in (("factorized", "region 0"), ("pixel", None)):
            request = urllib.request.Request(
                f"{url}/v1/segment?method={method}&seed=0", data=_png(), headers={"Content-Type": "image/png"}
            )
            with urllib.request.urlopen(request, timeout=60) as r:
                answer = json.loads(r.read())
            assert answer["mask_png"] and answer["classes"], answer
            if names:
                assert answer["classes"][0]["name"] == names

        # 4. `serve deploy serve/config.yaml` on the cluster: the app is built there (serve.app imports where the
        #    checkout is installed), its model from a storage URI, its replicas and queues from Serve's own
        #    `deployments:` section. (Only this test's port and model source are changed in the shipped file.)
        config = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
        config["proxy_location"] = "HeadOnly"
        config["http_options"]["port"] = port
        (app,) = config["applications"]
        app["args"]["segmenter"] = f"file://{run / 'checkpoint.pt'}"
        sampler = next(d for d in app["deployments"] if d["name"] == "Sampler")
        sampler["max_ongoing_requests"] = 48  # not the app's default: seen below only if Serve applied the section
        (work / "serve.yaml").write_text(yaml.safe_dump(config))
        _run([str(SERVE), "shutdown", "--address", two_nodes.dashboard, "-y"], work, env)  # the CPUs for this one
        # `serve shutdown` returns after a bounded wait (30 s); a controller still shutting down would kill the next
        # deploy's proxy. Serve is gone once its controller and proxies are dead.
        deadline = time.time() + 180
        while _serve_actors(two_nodes.dashboard):
            assert time.time() < deadline, _serve_actors(two_nodes.dashboard)
            time.sleep(1)
        _run([str(SERVE), "deploy", "serve.yaml", "--address", two_nodes.dashboard], work, env)
        deadline = time.time() + 180
        while True:
            apps = _get_json(f"{two_nodes.dashboard}/api/serve/applications/")["applications"]
            if apps.get("diffseg", {}).get("status") == "RUNNING":
                break
            assert apps.get("diffseg", {}).get("status") != "DEPLOY_FAILED", apps
            assert time.time() < deadline, apps
            time.sleep(1)
        deployments = apps["diffseg"]["deployments"]
        assert sorted(deployments) == ["FactorizedSegmenter", "Ingress", "Sampler"]
        assert deployments["Sampler"]["deployment_config"]["max_ongoing_requests"] == 48
        assert deployments["Ingress"]["deployment_config"]["ray_actor_options"]["num_cpus"] == 0.25
        request = urllib.request.Request(f"{url}/v1/segment", data=_png(), headers={"Content-Type": "image/png"})
        with urllib.request.urlopen(request, timeout=60) as r:
            assert json.loads(r.read())["classes"][0]["name"] == "region 0"
    finally:
        subprocess.run([str(SERVE), "shutdown", "--address", two_nodes.dashboard, "-y"], cwd=work, env=env,
                       capture_output=True, timeout=120)  # fmt: skip
