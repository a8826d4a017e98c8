"""A two-node Ray cluster on this machine (`ray start --head` + `ray start --address`), a training job submitted to it
through the Job API with the working directory, and its outputs (checkpoint, MLflow run) on the shared storage.

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

from diffseg.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).parent / "ray"
# Not shipped with the job: environments, outputs, caches, the VCS (Ray excludes .git and .venv by default).
EXCLUDES = [".venv", "runs", "mlflow.db", "mlruns", "outputs", "notebooks/*.ipynb_checkpoints", "**/__pycache__"]


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

    def __init__(self, head_cpus: int = 1, worker_cpus: int = 1):
        # Short: Ray's Unix sockets live under it and a socket path has at most 107 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="rdsg", dir="/tmp")
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        self.env.update(
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # `python` = this venv's
            RAY_AUTH_MODE="disabled",
            RAY_USAGE_STATS_ENABLED="0",
            PYTHONUNBUFFERED="1",
        )
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
    cluster = LocalCluster(head_cpus=1, worker_cpus=1)
    yield cluster
    cluster.shutdown()
    assert not _pids_using(cluster.temp_dir), "processes of the test cluster survived its shutdown"


def _overrides(tmp_path: Path, name: str, **changes) -> dict:
    return {
        "name": name,
        "output_dir": str(tmp_path / "runs"),  # shared storage: both nodes are this machine (an s3:// URI on clouds)
        "scaling.num_workers": 2,  # one CPU per node and one per worker: a worker on each node
        "scaling.cpus_per_worker": 1,
        "model.unet.image_size": 16,
        "model.unet.model_channels": 16,
        "model.unet.channel_mult": "[1,2]",
        "model.unet.attention_resolutions": "[8]",
        "data.image_size": 16,
        "optim.batch_size": 8,
        "loop.num_steps": 6,
        "loop.log_every": 3,
        "loop.checkpoint_every": 3,
        "loop.num_samples": 2,
        "loop.sample_steps": 2,
        **changes,
    }


@pytest.mark.slow
def test_job_submitted_to_a_two_node_cluster_trains_on_both_nodes(two_nodes, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sha = "0123456789abcdef0123456789abcdef01234567"  # what `$(git rev-parse HEAD)` gives a real submission
    overrides = _overrides(tmp_path, "cluster")
    entrypoint = "python jobs/train_factorized.py " + " ".join(shlex.quote(f"{k}={v}") for k, v in overrides.items())
    client = JobSubmissionClient(two_nodes.dashboard)
    job_id = client.submit_job(
        entrypoint=entrypoint,
        runtime_env={
            "working_dir": str(REPO),
            "excludes": EXCLUDES,
            "env_vars": {"MLFLOW_TRACKING_URI": mlflow_uri, "DIFFSEG_GIT_SHA": sha, "OMP_NUM_THREADS": "1"},
        },
    )
    deadline = time.time() + 420
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, f"job {job_id} still {status}:\n{client.get_job_logs(job_id)[-4000:]}"
        time.sleep(1)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, f"job {job_id} {status}:\n{logs[-6000:]}"
    assert "[train] step 6/6 loss" in logs and "2 worker(s)" in logs

    # The two training workers ran on the two nodes.
    actors = _get_json(f"{two_nodes.dashboard}/api/v0/actors?limit=1000&detail=1")["data"]["result"]["result"]
    workers = [a for a in actors if a.get("class_name") == "RayTrainWorker"]
    assert len({a["node_id"] for a in workers}) == 2, workers

    # Its checkpoint: our export and Ray Train's own, in the configured storage.
    run = tmp_path / "runs" / "cluster"
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert ckpt.step == 6 and [s for s, _ in ckpt.extra["loss_history"]] == [3, 6]
    assert list(run.glob("checkpoint_*/checkpoint.pt")), sorted(p.name for p in run.iterdir())
    assert (run / "config.yaml").is_file()

    # Its MLflow run, in the store MLFLOW_TRACKING_URI named.
    import mlflow

    mlflow_client = mlflow.MlflowClient(mlflow_uri)
    (found,) = mlflow_client.search_runs(
        [mlflow_client.get_experiment_by_name("diffseg").experiment_id], "attributes.run_name = 'cluster'"
    )
    assert found.info.run_id == ckpt.extra["mlflow_run_id"] and found.info.status == "FINISHED"
    assert found.data.tags["mlflow.source.git.commit"] == sha
    assert found.data.tags["diffseg.world_size"] == "2" and found.data.params["scaling.num_workers"] == "2"
    assert [m.step for m in mlflow_client.get_metric_history(found.info.run_id, "train/loss")] == [3, 6]
    assert {a.path for a in mlflow_client.list_artifacts(found.info.run_id)} >= {"samples", "checkpoint"}


@pytest.mark.slow
def test_job_script_runs_unchanged_against_ray_address(two_nodes, tmp_path):
    """The same script, run as a plain driver with RAY_ADDRESS: it ships diffseg to the workers itself."""
    overrides = _overrides(tmp_path, "driver", **{"loop.num_steps": 3, "tracking.enabled": "false"})
    env = {**two_nodes.env, "RAY_ADDRESS": two_nodes.address}
    out = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "train_factorized.py"), *(f"{k}={v}" for k, v in overrides.items())],
        cwd=tmp_path,  # not the repository: the workers can only get the code from the runtime env
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-6000:]
    assert "[train] step 3/3 loss" in out.stdout and "2 worker(s)" in out.stdout
    ckpt = load_checkpoint(tmp_path / "runs" / "driver" / "checkpoint.pt")
    assert ckpt.step == 3 and ckpt.extra["starts"] == [0]
