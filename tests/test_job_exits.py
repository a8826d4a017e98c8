"""How jobs end for the user: one line for a user error or an interrupt (the traceback behind --traceback), KILLED
runs on SIGTERM also once Ray is attached, and a submission refused by Ray's token auth saying what to set."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from diffseg.core.tracking import JobInterrupted, sigterm_interrupts

REPO = Path(__file__).resolve().parents[1]
PY = [sys.executable]


def test_init_ray_keeps_the_jobs_sigterm_handler(monkeypatch):
    """`ray.init` installs `sys.exit(15)` as the SIGTERM handler (ray/_private/worker.py), which ended a Ray-attached
    job's runs FAILED; init_ray puts the job's handler back. A stand-in for ray does what ray.init does."""
    from diffseg.core import runtime

    def init(**kwargs):
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))  # what ray.init does

    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(is_initialized=lambda: False, init=init))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # joining a cluster: no local Ray's environment to set up
    with pytest.raises(JobInterrupted, match="SIGTERM"), sigterm_interrupts():
        runtime.init_ray()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises in the main thread long before this ends
    before = signal.getsignal(signal.SIGTERM)  # whatever the tests before this one left (Ray's own, after a real init)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # outside a job: no Python handler to put back
    try:
        runtime.init_ray()
        assert callable(signal.getsignal(signal.SIGTERM))  # Ray's own exit handler stays
    finally:
        signal.signal(signal.SIGTERM, before)


JOB = """
import sys, time
sys.path.insert(0, {platform!r})
from diffseg.experiments.launch import run_job
from diffseg.core.runtime import init_ray
from diffseg.core.tracking import Tracker, TrackingConfig
from dataclasses import dataclass

@dataclass(frozen=True)
class Cfg:
    ray: bool = False  # attach to Ray first
    ray_get: bool = False  # then wait in ray.get (as Ray Train's fit() does), not in Python

def run(cfg):
    tracker = Tracker(TrackingConfig(experiment="exits", system_metrics=False), "sigterm")
    if cfg.ray:
        init_ray(1)
    if cfg.ray_get:
        import ray
        task = ray.remote(num_cpus=0)(lambda: time.sleep(600)).remote()
    print("RUN", tracker.run_id, flush=True)
    if cfg.ray_get:
        ray.get(task)
    time.sleep(600)

run_job(Cfg, run, sys.argv[1:])
"""


def _sigterm(tmp_path, *args, wait_s=240):
    script = tmp_path / "job.py"
    script.write_text(JOB.format(platform=str(REPO / "platform")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen([*PY, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=env)  # fmt: skip
    try:
        line = ""
        deadline = time.time() + wait_s
        while not line.startswith("RUN") and time.time() < deadline:
            line = job.stdout.readline()
            if not line and job.poll() is not None:
                break
        assert line.startswith("RUN"), job.stderr.read()[-3000:] if job.poll() is not None else "no RUN line"
        job.send_signal(signal.SIGTERM)
        _, err = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    return job.returncode, err, line.split()[1]


def _status(run_id: str) -> str:
    import mlflow

    return mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(run_id).info.status


def test_sigterm_stays_sigterm_through_a_call_that_raises_a_bare_keyboardinterrupt():
    """Ray's blocking calls (`ray.get`, so Ray Train's `fit()`) run the signal handler in their wait and raise a bare
    KeyboardInterrupt instead of what it raised: the job said "interrupted: Ctrl-C" and exited 130 on SIGTERM."""
    with pytest.raises(JobInterrupted, match="terminated by signal SIGTERM"), sigterm_interrupts():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except JobInterrupted:
            raise KeyboardInterrupt from None  # what ray.get does with the handler's exception
    with pytest.raises(KeyboardInterrupt) as ctrl_c, sigterm_interrupts():
        raise KeyboardInterrupt  # a real Ctrl-C stays one
    assert not isinstance(ctrl_c.value, JobInterrupted)


def test_sigterm_ends_a_job_in_one_line_and_its_run_killed(tmp_path):
    code, err, run_id = _sigterm(tmp_path)
    assert code == 128 + signal.SIGTERM
    assert err.strip().splitlines()[-1] == "interrupted: terminated by signal SIGTERM" and "Traceback" not in err, err
    assert _status(run_id) == "KILLED"


@pytest.mark.slow
def test_sigterm_ends_a_ray_attached_job_killed(tmp_path):
    """The same job attached to a (local) Ray cluster first: still KILLED, still one line."""
    code, err, run_id = _sigterm(tmp_path, "ray=true")
    assert code == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == "interrupted: terminated by signal SIGTERM", err
    assert "Traceback" not in err
    assert _status(run_id) == "KILLED"


@pytest.mark.slow
def test_sigterm_while_waiting_in_ray_get_exits_143_killed(tmp_path):
    """The job waiting in `ray.get`, as one with Ray Train workers waits in `fit()`: it exited 130 with
    "interrupted: Ctrl-C"; now 143, the SIGTERM line and a KILLED run."""
    code, err, run_id = _sigterm(tmp_path, "ray=true", "ray_get=true")
    assert code == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == "interrupted: terminated by signal SIGTERM", err
    assert _status(run_id) == "KILLED"


def test_a_submission_refused_by_token_auth_says_what_to_set(monkeypatch, capsys):
    """`ray start --head` with token auth on, this shell without RAY_AUTH_MODE=token: the Job API answers 401 and
    Ray's client raises AuthenticationError; jobs/submit.py turns it into one line naming the variable."""
    import ray.job_submission
    from ray.exceptions import AuthenticationError

    from diffseg.core import submit

    class Refusing:
        def __init__(self, address, *args, **kwargs):
            raise AuthenticationError("Unauthorized: Missing authentication token")

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", Refusing)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    with pytest.raises(SystemExit) as exit_:
        submit.main(["--address", "http://127.0.0.1:8265", "--no-wait", "--", "python", "jobs/demo.py"])
    message = str(exit_.value.code)
    assert "\n" not in message and message.startswith("error: the Ray cluster at http://127.0.0.1:8265 requires")
    assert "export RAY_AUTH_MODE=token" in message and "it is unset" in message


def test_a_submission_before_the_job_agent_is_up_is_retried_and_other_errors_are_not(monkeypatch, caplog):
    """Right after `ray start` the Job API answers 500 "No available agent to submit job, please try again later"
    (the dashboard is up before the node's job agent; seconds more on a loaded machine): the submission waits for the
    agent instead of failing; any other error, or an agent still missing after the patience, is raised as it came."""
    import logging

    import ray.job_submission

    from diffseg.core import submit

    no_agent = RuntimeError("Request failed with status code 500: No available agent to submit job, please try again "
                            "later..")  # fmt: skip
    answers: list = []

    class Starting:
        def __init__(self, address, *args, **kwargs):
            pass

        def submit_job(self, **job):
            answer = answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer

        def get_job_status(self, job_id):
            return ray.job_submission.JobStatus.PENDING

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", Starting)
    monkeypatch.setattr(submit.time, "sleep", lambda s: None)
    answers[:] = [no_agent, no_agent, "raysubmit_1"]
    with caplog.at_level(logging.INFO, logger=submit.__name__):
        assert submit.submit(["python", "jobs/demo.py"], "http://h:8265", {}, wait=False) == ("raysubmit_1", "PENDING")
    assert not answers and sum("job agent is not up yet" in r.getMessage() for r in caplog.records) == 1
    answers[:] = [RuntimeError("Request failed with status code 400: bad runtime_env")]
    with pytest.raises(RuntimeError, match="400"):
        submit.submit(["python", "jobs/demo.py"], "http://h:8265", {}, wait=False)
    answers[:] = [no_agent] * 3
    with pytest.raises(RuntimeError, match="No available agent"):
        submit.submit_when_ready(Starting("h"), patience_s=-1, entrypoint="python jobs/demo.py")
    assert len(answers) == 2  # out of patience at once: asked once


def test_docs_local_route_exports_the_auth_mode():
    """docs/cluster.md's own-working-directory route starts a `ray start` cluster and submits to it: with Ray's
    token auth that works only with RAY_AUTH_MODE=token exported first, so the route says so before it submits."""
    text = (REPO / "docs" / "cluster.md").read_text()
    route = text[text.index("## From your own working directory") :]
    commands = [line.strip() for line in route[: route.index("jobs/submit.py --address")].splitlines()]
    commands = [line for line in commands if line and not line[0].isalpha() or line.startswith(("export", "ray "))]
    start = next(i for i, line in enumerate(commands) if line.startswith("ray start --head"))
    assert any(line.startswith("export RAY_AUTH_MODE=token") for line in commands[:start]), commands


def test_promote_redeploys_only_the_config_apps_that_serve_the_alias():
    """jobs/promote.py's plan from the dashboard's Serve details (no cluster here): the apps naming the alias get
    `promoted:` in their args (a changed config: Serve rebuilds them), the others go back unchanged (a PUT replaces
    every app), an earlier pin of the same alias is replaced."""
    from diffseg.experiments.promote import app_info_url, apps_serving, promoted_config

    seg = {"import_path": "serve.app:build_app", "route_prefix": "/", "args": {"segmenter": "models:/m@champion"}}
    other = {"import_path": "serve.app:build_app", "route_prefix": "/b", "args": {"pixel": "runs/x.pt"}}
    details = {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": 8123},
        "applications": {"a": {"deployed_app_config": seg, "route_prefix": "/"},
                         "b": {"deployed_app_config": other, "route_prefix": "/b"}},
    }  # fmt: skip
    assert apps_serving(details, "models:/m@champion") == (["a"], [])
    config = promoted_config(details, ["a"], "m@champion=2")
    assert config["applications"][0]["args"] == {"segmenter": "models:/m@champion", "promoted": "m@champion=2"}
    assert config["applications"][1] == other and config["http_options"]["port"] == 8123
    details["applications"]["a"]["deployed_app_config"] = config["applications"][0]
    again = promoted_config(details, ["a"], "m@champion=3")
    assert again["applications"][0]["args"]["promoted"] == "m@champion=3"
    assert app_info_url(details, "b") == "http://127.0.0.1:8123/b/v1/info"
    details["applications"]["c"] = {"deployed_app_config": None}
    assert apps_serving(details, "models:/m@champion") == (["a"], ["c"])


@pytest.mark.slow
def test_local_route_with_token_auth(tmp_path):
    """docs/cluster.md's local route on a `ray start` cluster with token auth on (its own token file, never
    ~/.ray/auth_token): jobs/submit.py without RAY_AUTH_MODE=token is refused in one line naming it; with it exported,
    as the route does, the job runs."""
    import secrets
    import urllib.request

    from test_cluster import LocalCluster  # tests/test_cluster.py's `ray start` nodes (own ports and temp dir)

    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)

    class TokenCluster(LocalCluster):
        def _alive_nodes(self) -> int:
            req = urllib.request.Request(f"{self.dashboard}/nodes?view=summary",
                                         headers={"Authorization": f"Bearer {token.read_text()}"})  # fmt: skip
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    nodes = __import__("json").loads(r.read())["data"]["summary"]
            except OSError:
                return 0
            return sum(1 for n in nodes if n.get("raylet", {}).get("state") == "ALIVE")

    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    cluster = TokenCluster(env=auth)
    try:
        submit = [*PY, str(REPO / "jobs" / "submit.py"), "--address", cluster.dashboard, "--",
                  "python", "-c", "print('token ok')"]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
        env.update(OMP_NUM_THREADS="1", RAY_AUTH_TOKEN_PATH=str(token))
        refused = subprocess.run(submit, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert refused.returncode == 1, refused.stdout[-2000:] + refused.stderr[-2000:]
        last = refused.stderr.strip().splitlines()[-1]
        assert last.startswith("error: the Ray cluster at") and "export RAY_AUTH_MODE=token" in last, refused.stderr
        assert "Traceback" not in refused.stderr
        ok = subprocess.run(submit, cwd=tmp_path, env={**env, **auth}, capture_output=True, text=True, timeout=600)
        assert ok.returncode == 0 and "token ok" in ok.stdout, ok.stdout[-3000:] + ok.stderr[-3000:]
    finally:
        cluster.shutdown()


def _job_main(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"job_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_dry_run_checks_the_checkpoints_a_job_reads(tmp_path, capsys):
    """Issue 37.2: `--dry-run` accepted a checkpoint path that does not exist and a checkpoint of the wrong kind (the
    job then failed minutes later, or in a traceback). Every checkpoint field is checked before the job starts and
    by --dry-run: it exists, loads and verifies, and holds the model kind the job needs; one line naming the key."""
    from test_serving import tiny_checkpoint

    ddpm = tiny_checkpoint(tmp_path / "ddpm.pt", kind="ddpm")
    factorized = tiny_checkpoint(tmp_path / "factorized.pt")
    cases = [
        ("segment", f"checkpoint={tmp_path / 'nope.pt'}", f"checkpoint: {tmp_path / 'nope.pt'} does not exist"),
        ("segment", f"checkpoint={ddpm}", "holds a ddpm model; segmenting needs a factorized checkpoint"),
        ("sample", f"checkpoint={tmp_path}", f"checkpoint: {tmp_path}: a folder without checkpoint.pt"),
        (
            "evaluate",
            f"datasets=[{{name: d, ddpm: {factorized}, data: {{name: synthetic}}}}]",
            f"datasets[0].ddpm: {factorized} holds a factorized model; kmeans_ddpm needs a ddpm checkpoint",
        ),
    ]
    extra = {
        "segment": ["data.name=synthetic", "data.image_size=16"],
        "sample": [],
        "evaluate": ["methods=[kmeans_ddpm]"],
    }
    for job, arg, message in cases:
        with pytest.raises(SystemExit) as end:
            _job_main(job)([arg, *extra[job], "--dry-run"])
        err = capsys.readouterr().err.strip().splitlines()
        assert end.value.code == 2 and len(err) == 1 and message in err[0], (job, arg, err)
    for job, arg in [("segment", f"checkpoint={factorized}"), ("sample", f"checkpoint={ddpm}")]:
        with pytest.raises(SystemExit) as end:
            _job_main(job)([arg, *extra[job], "--dry-run"])
        assert end.value.code == 0, capsys.readouterr().err
    raw = torch.load(factorized, weights_only=True)
    raw.pop("integrity")
    torch.save(raw, tmp_path / "unsealed.pt")  # refused unless the job's --allow-unverified says so
    with pytest.raises(SystemExit) as end:
        _job_main("segment")([f"checkpoint={tmp_path / 'unsealed.pt'}", *extra["segment"], "--dry-run"])
    assert end.value.code == 2 and "integrity record" in capsys.readouterr().err
    with pytest.raises(SystemExit) as end:
        _job_main("segment")([f"checkpoint={tmp_path / 'unsealed.pt'}", *extra["segment"], "--dry-run",
                              "--allow-unverified"])  # fmt: skip
    assert end.value.code == 0
    os.environ.pop("DIFFSEG_ALLOW_UNVERIFIED", None)


def test_dry_run_refuses_an_image_only_folder_where_labels_are_needed(tmp_path, capsys):
    """Issue 37.2: `jobs/extract_features.py` on an image-only folder exited 0 with 20,480 rows labelled -1, and
    evaluations on one ended in tracebacks. The jobs that need masks (extraction, the comparison, evaluation) say so
    in --dry-run and before they start, naming the key and the folder; a labelled folder passes."""
    import shutil

    from diffseg.data.datasets import write_synthetic_folder

    labelled = write_synthetic_folder(tmp_path / "labelled", 4, 16)
    image_only = Path(shutil.copytree(labelled, tmp_path / "image_only"))
    shutil.rmtree(image_only / "masks")
    data = ["data.name=folder", "data.image_size=16"]
    cases = [
        ("extract_features", [f"data.root={image_only}", *data, "features.backbone=rgb"], "data.root: "),
        ("evaluate", [f"datasets=[{{name: d, data: {{name: folder, root: {image_only}}}}}]", "methods=[centred_box]"],
         "datasets[0].data.root: "),
        # a factorized training's mask diagnostics (loop.eval_every) score masks on its held-out images
        ("train_factorized", [f"data.root={image_only}", *data, "model.unet.image_size=16", "data.num_test=2",
                              "loop.eval_every=10"], "data.root: "),
    ]  # fmt: skip
    for job, args, key in cases:
        with pytest.raises(SystemExit) as end:
            _job_main(job)([*args, "--dry-run"])
        err = capsys.readouterr().err.strip().splitlines()
        assert end.value.code == 2 and len(err) == 1, (job, err)
        assert f"{key}{image_only} has no masks (it has no masks/ folder), and this job needs labelled images" in err[0]
    with pytest.raises(SystemExit) as end:
        _job_main("extract_features")([f"data.root={labelled}", *data, "features.backbone=rgb", "--dry-run"])
    assert end.value.code == 0, capsys.readouterr().err
    with pytest.raises(SystemExit) as end:  # without diagnostics an image-only set trains (masks unused)
        _job_main("train_factorized")([f"data.root={image_only}", *data, "model.unet.image_size=16", "--dry-run"])
    assert end.value.code == 0, capsys.readouterr().err
