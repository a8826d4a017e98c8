"""Where runs land: locations resolved once in the driver, submitted jobs, MLflow artifact roots, the use_gpu rule.

All in-process and without Ray (the GPU rule's cluster branch runs against a stand-in `ray` module): the end-to-end
check from a temporary working directory with a real cluster is `tests/test_cluster.py`.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import yaml

from diffseg.core.config import ConfigError, from_dict, load_config, resolve_location, resolve_paths
from diffseg.core.runtime import autoscaler_gpu_node_types, decide_gpu
from diffseg.core.tracking import artifact_location, resolve_tracking_uri
from diffseg.evaluation.evaluate import EvalConfig
from diffseg.experiments.label_efficient import GapCurveConfig
from diffseg.experiments.sweep import SweepConfig
from diffseg.methods.features import ExtractJobConfig
from diffseg.serving.app_config import ServeAppConfig
from diffseg.training.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]


def train_config(**values) -> TrainConfig:
    return from_dict(TrainConfig, values)


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """A working directory that is not the repository, with no tracking or workdir environment."""
    for key in ("MLFLOW_TRACKING_URI", "DIFFSEG_WORKDIR", "RAY_JOB_CONFIG_JSON_ENV_VAR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path.resolve()


def test_every_location_of_a_config_becomes_absolute_in_the_driver(elsewhere):
    cfg = load_config(
        TrainConfig, "factorized_tiny.yaml",
        ["init_from=runs/ddpm/checkpoint.pt", "data.name=folder", "data.root=../data/horses",
         "eval.data={name: folder, root: held-out}"],
    )  # fmt: skip
    out = resolve_paths(cfg)
    assert out.output_dir == str(elsewhere / "runs")
    assert out.init_from == str(elsewhere / "runs/ddpm/checkpoint.pt")
    assert out.data.root == str(elsewhere.parent / "data/horses")  # `..` normalised
    assert out.eval.data.root == str(elsewhere / "held-out")  # optional nested sections too
    assert out.tracking.uri == f"sqlite:///{elsewhere}/mlflow.db"  # MLflow's default store, made absolute
    assert resolve_paths(out) == out  # idempotent: resolving again in a worker changes nothing
    assert out.model == cfg.model and out.loop == cfg.loop  # nothing but locations

    # URIs and keywords stay as written; prefixed backbone specs keep their prefix.
    uri = resolve_paths(load_config(TrainConfig, None, ["output_dir=s3://bucket/runs", "tracking.uri=http://h:5000"]))
    assert uri.output_dir == "s3://bucket/runs" and uri.tracking.uri == "http://h:5000"
    for spec, want in [
        ("random:runs/d/checkpoint.pt", f"random:{elsewhere}/runs/d/checkpoint.pt"),
        ("diffusers:models/unet", f"diffusers:{elsewhere}/models/unet"),
        ("runs:/0123abcd/checkpoint", "runs:/0123abcd/checkpoint"),
        ("rgb", "rgb"),
    ]:
        job = resolve_paths(load_config(ExtractJobConfig, None, [f"features.backbone={spec}"]))
        assert job.features.backbone == want and job.output_dir == str(elsewhere / "runs/features")

    # Lists of sections (the evaluation table's data sets) and optional checkpoints.
    ev = from_dict(EvalConfig, {"datasets": [{"factorized": "runs/f/checkpoint.pt", "data": {"root": "d"}}]})
    ev = resolve_paths(ev)
    assert ev.datasets[0].factorized == str(elsewhere / "runs/f/checkpoint.pt")
    assert ev.datasets[0].data.root == str(elsewhere / "d") and ev.datasets[0].ddpm is None

    # Lists of locations (tuple[InputPath, ...]): every item, URIs kept.
    gap = resolve_paths(from_dict(GapCurveConfig, {"runs": ["runs/label/a", "s3://b/c"], "baselines": ["../r"]}))
    assert gap.runs == (str(elsewhere / "runs/label/a"), "s3://b/c") and gap.baselines == (str(elsewhere.parent / "r"),)

    # A shipped config name stays for find_config; one that exists from here becomes absolute.
    sweep = resolve_paths(load_config(SweepConfig, "sweep_k_tiny.yaml"))
    assert sweep.base_config == "factorized_tiny.yaml" and sweep.output_dir == str(elsewhere / "runs/sweeps")
    (elsewhere / "mine.yaml").write_text("name: x\n")
    assert resolve_paths(SweepConfig(base_config="mine.yaml")).base_config == str(elsewhere / "mine.yaml")

    # Serve's model sources.
    app = resolve_paths(ServeAppConfig(segmenter="runs/f/checkpoint.pt", pixel="s3://b/seg.pt"))
    assert app.segmenter == str(elsewhere / "runs/f/checkpoint.pt") and app.pixel == "s3://b/seg.pt"


def test_the_job_command_line_resolves_against_the_working_directory(elsewhere, capsys):
    sys.path.insert(0, str(REPO / "jobs"))
    try:
        import train_factorized
    finally:
        sys.path.remove(str(REPO / "jobs"))
    with pytest.raises(SystemExit):
        train_factorized.main(["--dry-run", "init_from=runs/a/checkpoint.pt"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["output_dir"] == str(elsewhere / "runs")
    assert printed["init_from"] == str(elsewhere / "runs/a/checkpoint.pt")
    assert printed["tracking"]["uri"] == f"sqlite:///{elsewhere}/mlflow.db"


def test_workdir_env_and_sqlite_uris(elsewhere, monkeypatch, tmp_path_factory):
    other = tmp_path_factory.mktemp("submitted-from").resolve()
    monkeypatch.setenv("DIFFSEG_WORKDIR", str(other))
    out = resolve_paths(train_config(data={"root": "data"}))
    assert out.output_dir == str(other / "runs") and out.data.root == str(other / "data")
    assert out.tracking.uri == f"sqlite:///{other}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///stores/m.db")  # relative: made absolute too
    assert resolve_tracking_uri() == f"sqlite:///{other}/stores/m.db"
    assert resolve_tracking_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    monkeypatch.setenv("DIFFSEG_WORKDIR", str(other / "missing"))
    with pytest.raises(ConfigError, match="DIFFSEG_WORKDIR=.*missing: no such folder"):
        resolve_paths(TrainConfig())
    # ... which only matters when a relative location needs it.
    assert resolve_paths(train_config(output_dir="s3://b/runs", tracking={"uri": "http://h:5000"})).data.root is None


def test_a_submitted_job_refuses_relative_outputs_and_says_what_to_pass(elsewhere, monkeypatch):
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://x.zip"}}))
    with pytest.raises(ConfigError) as e:
        resolve_paths(train_config(tracking={"enabled": False}))
    msg = str(e.value)
    assert msg.startswith("output_dir: 'runs' is relative") and "submitted Ray job" in msg
    assert "output_dir=s3://bucket/runs" in msg and "jobs/submit.py" in msg and "DIFFSEG_WORKDIR" in msg
    with pytest.raises(ConfigError, match=r"tracking.uri: MLflow would write mlflow.db .*MLFLOW_TRACKING_URI"):
        resolve_paths(train_config(output_dir="/shared/runs"))
    # Absolute outputs and URIs are fine; inputs resolve against the uploaded copy (this directory).
    ok = resolve_paths(train_config(output_dir="s3://b/runs", data={"root": "data"}, tracking={"uri": "http://h:5"}))
    assert ok.data.root == str(elsewhere / "data")
    with pytest.raises(ConfigError, match="^output_dir: 'out' is relative"):
        resolve_location("out", kind="output", key="output_dir")
    # With DIFFSEG_WORKDIR (jobs/submit.py sets it) relative outputs resolve there.
    monkeypatch.setenv("DIFFSEG_WORKDIR", str(elsewhere))
    assert resolve_paths(TrainConfig()).output_dir == str(elsewhere / "runs")


def test_experiments_keep_their_artifacts_beside_a_sqlite_store(elsewhere):
    from diffseg.core.tracking import Tracker, TrackingConfig

    store = elsewhere / "store"
    store.mkdir()
    uri = f"sqlite:///{store}/mlflow.db"
    assert artifact_location(uri, "my exp/1") == f"{store}/mlartifacts/my_exp_1"
    assert artifact_location("http://h:5000", "x") is None
    tracker = Tracker(TrackingConfig(experiment="where"), "run", tracking_uri=uri)
    (elsewhere / "a.txt").write_text("x")
    tracker.log_artifact(elsewhere / "a.txt", "files")
    tracker.finish()
    assert (store / "mlartifacts" / "where" / tracker.run_id / "artifacts" / "files" / "a.txt").is_file()


def _fake_autoscaler(path: Path, worker_gpus: int | None, max_workers: int = 8) -> Path:
    """The shape of the launcher's ~/ray_bootstrap_config.yaml (JSON) for cluster.yaml: resources filled in."""
    config = {
        "cluster_name": "diffseg",
        "max_workers": 10,
        "head_node_type": "head",
        "available_node_types": {
            "head": {"resources": {"CPU": 0}, "node_config": {"InstanceType": "m5.2xlarge"}},
            "cpu_worker": {"min_workers": 0, "max_workers": 4, "resources": {"CPU": 8}},
        },
    }
    if worker_gpus is not None:
        config["available_node_types"]["gpu_1x"] = {
            "min_workers": 0, "max_workers": max_workers, "resources": {"CPU": 8, "GPU": worker_gpus},
            "node_config": {"InstanceType": "g5.2xlarge"},
        }  # fmt: skip
    path.write_text(json.dumps(config))
    return path


class _FakeRay(types.ModuleType):
    """A started Ray cluster with the given live resources (the GPU rule only asks `is_initialized` and
    `cluster_resources`)."""

    def __init__(self, resources: dict[str, float]):
        super().__init__("ray")
        self.resources = resources

    def is_initialized(self) -> bool:
        return True

    def cluster_resources(self) -> dict[str, float]:
        return dict(self.resources)


def test_use_gpu_auto_counts_the_autoscalers_gpu_node_types(tmp_path, monkeypatch, caplog):
    """cluster.yaml starts GPU workers at min_workers 0: a fresh cluster has no GPU up, and `auto` must still mean
    GPUs. Faked: the launcher's bootstrap config with a GPU node type, and a running cluster of CPUs only."""
    import logging

    caplog.set_level(logging.INFO, logger="diffseg")
    monkeypatch.setitem(sys.modules, "ray", _FakeRay({"CPU": 8.0}))  # a head node, no GPU node up
    config = _fake_autoscaler(tmp_path / "ray_bootstrap_config.yaml", worker_gpus=1)
    monkeypatch.setenv("DIFFSEG_AUTOSCALER_CONFIG", str(config))
    assert autoscaler_gpu_node_types() == {"gpu_1x": 1.0}
    decision = decide_gpu("auto", "train")
    assert decision.use_gpu and "autoscaler can start gpu_1x (1 GPU)" in decision.reason
    assert "[train] use_gpu=auto: GPUs (no GPU node is up, but the autoscaler can start gpu_1x" in caplog.text

    # The same rule for feature extraction and Serve (their deciders are this function).
    from diffseg.methods.features import gpus_per_actor
    from diffseg.serving.app_config import model_num_gpus

    assert gpus_per_actor(-1.0) == 1.0 and gpus_per_actor(0.0) == 0.0 and gpus_per_actor(0.5) == 0.5
    assert model_num_gpus("auto") == 1 and model_num_gpus("no") == 0

    # Not when the GPU type may never start, nor without one; live GPUs count without any config.
    _fake_autoscaler(config, worker_gpus=1, max_workers=0)
    assert not decide_gpu("auto").use_gpu
    _fake_autoscaler(config, worker_gpus=None)
    assert not decide_gpu("auto").use_gpu and "no autoscaler GPU node type" in decide_gpu("auto").reason
    monkeypatch.setenv("DIFFSEG_AUTOSCALER_CONFIG", str(tmp_path / "absent.yaml"))
    monkeypatch.setitem(sys.modules, "ray", _FakeRay({"CPU": 8.0, "GPU": 2.0}))
    assert decide_gpu("auto").reason == "the cluster has 2 GPU(s)"
    # Explicit settings are obeyed; local mode asks this process.
    assert decide_gpu("yes").use_gpu and not decide_gpu("no").use_gpu
    assert decide_gpu("auto", cluster=False).reason in ("this process sees a GPU", "this process sees no GPU")


def test_paper_size_configs_ask_for_gpus_explicitly():
    for name in ("factorized_paper64.yaml", "factorized_paper128.yaml"):
        cfg = load_config(TrainConfig, name)
        assert cfg.scaling.num_workers > 0 and cfg.scaling.use_gpu == "yes", name


def test_serve_config_sets_deployments_where_serve_expects_them():
    """serve/config.yaml: replicas, queues and resources in Serve's own `deployments:` section, naming exactly the
    deployments its args create (Serve refuses an entry for a deployment the app lacks); older `models:` args are
    refused with a message saying where they went."""
    from ray.serve.schema import ServeDeploySchema

    from diffseg.serving.app_config import check_app_args, deployment_names

    config = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert app["import_path"] == "serve.app:build_app" and schema.applications[0].deployments
    names = [d["name"] for d in app["deployments"]]
    assert names == deployment_names(from_dict(ServeAppConfig, app["args"]))
    assert not {"models", "ingress"} & set(app["args"])
    assert all("num_replicas" in d or "autoscaling_config" in d for d in app["deployments"])
    with pytest.raises(ValueError, match=r"args.models: .*Serve's own `deployments:` section"):
        check_app_args({"segmenter": "x", "models": {"num_cpus": 1}})


def test_submit_carries_the_checkout_its_commit_and_dirty_flag_and_the_working_directory(elsewhere, monkeypatch):
    """jobs/submit.py's runtime env, built without a cluster: no JSON to paste for provenance or locations."""
    import subprocess

    from diffseg.core.submit import EXCLUDES, build_runtime_env, job_address, main

    monkeypatch.delenv("DIFFSEG_GIT_SHA", raising=False)
    monkeypatch.delenv("DIFFSEG_GIT_DIRTY", raising=False)
    env = build_runtime_env()
    assert env["working_dir"] == str(REPO) and {".git", ".venv", "runs", "mlflow.db", "mlartifacts"} <= set(EXCLUDES)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode == 0:  # a git checkout (CI's clean clone is one)
        porcelain = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
        assert env["env_vars"]["DIFFSEG_GIT_SHA"] == head.stdout.strip()
        assert env["env_vars"]["DIFFSEG_GIT_DIRTY"] == str(bool(porcelain.strip())).lower()
    assert env["env_vars"]["DIFFSEG_WORKDIR"] == str(elsewhere) and "MLFLOW_TRACKING_URI" not in env["env_vars"]

    # A relative SQLite store in your environment means your folder; --no-workdir leaves the job to refuse outputs.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    env = build_runtime_env(use_workdir=False, env={"K": "v"})
    assert "DIFFSEG_WORKDIR" not in env["env_vars"] and env["env_vars"]["K"] == "v"
    assert env["env_vars"]["MLFLOW_TRACKING_URI"] == f"sqlite:///{elsewhere}/mlflow.db"
    assert build_runtime_env("sub")["env_vars"]["DIFFSEG_WORKDIR"] == str(elsewhere / "sub")

    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a GCS address, not the Job API's
    assert job_address() == "http://127.0.0.1:8265" and job_address("http://h:8265") == "http://h:8265"
    with pytest.raises(SystemExit) as exit_:
        main([])  # no entrypoint: an argparse error naming what to give
    assert exit_.value.code == 2
