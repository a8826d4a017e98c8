"""What the MLflow UI shows of a run: who created it and from which job file, the data set it read (an MLflow dataset
input), a name that tells conversions apart, and an experiment the UI opens as model training (not GenAI)."""

from __future__ import annotations

import getpass
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from diffseg.core.config import replace
from diffseg.core.tracking import EXPERIMENT_KIND, Tracker, TrackingConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def client(uri):
    import mlflow

    return mlflow.MlflowClient(uri)


def test_runs_carry_user_source_and_their_data_set(store, monkeypatch):
    from diffseg.data.datasets import DataConfig

    monkeypatch.setenv("DIFFSEG_SOURCE", "jobs/evaluate.py")  # what run_job exports for the job file it runs
    monkeypatch.delenv("DIFFSEG_USER", raising=False)
    with Tracker(TrackingConfig(experiment="ui", system_metrics=False), "eval") as tracker:
        tracker.log_data_input(DataConfig(name="folder", root="/data/weizmann-horse-200", image_size=32), "input")
        tracker.log_data_input(DataConfig(), "training")
    run = client(store).get_run(tracker.run_id)
    tags = run.data.tags
    assert tags["mlflow.user"] == getpass.getuser() and tags["mlflow.source.name"] == "jobs/evaluate.py"
    assert tags["mlflow.source.type"] == "LOCAL"
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"weizmann-horse-200", "synthetic"}
    horse = inputs["weizmann-horse-200"]
    assert '"/data/weizmann-horse-200"' in horse.dataset.source and horse.dataset.source_type == "local"
    assert [(t.key, t.value) for t in horse.tags] == [("mlflow.data.context", "input")]
    assert '"image_size": 32' in horse.dataset.profile and len(horse.dataset.digest) == 16
    exp = client(store).get_experiment(run.info.experiment_id)
    assert exp.tags[EXPERIMENT_KIND[0]] == EXPERIMENT_KIND[1]


def test_training_logs_its_data_set_and_the_drivers_source(tmp_path, store):
    from diffseg.core.config import load_config, replace
    from diffseg.training.loop import LocalContext, TrainConfig, fit

    cfg = replace(
        load_config(TrainConfig, REPO / "jobs" / "configs" / "ddpm_tiny.yaml"),
        **{"model.unet.model_channels": 8, "model.unet.channel_mult": [1, 2], "model.unet.image_size": 16,
           "model.unet.attention_resolutions": [8], "data.image_size": 16, "optim.batch_size": 4,
           "loop.num_steps": 2, "loop.num_samples": 0, "tracking.log_models": False,
           "tracking.system_metrics": False, "output_dir": str(tmp_path / "runs"), "name": "ui-train"},
    )  # fmt: skip
    source = {"mlflow.user": "alice", "mlflow.source.name": "jobs/train_ddpm.py", "mlflow.source.type": "LOCAL"}
    out = fit(cfg, LocalContext("cpu"), run_tags=source)  # a Ray Train worker gets the driver's tags so
    run = client(store).get_run(out["mlflow_run_id"])
    assert {k: run.data.tags[k] for k in source} == source
    (data,) = run.inputs.dataset_inputs
    assert data.dataset.name == "synthetic" and [t.value for t in data.tags] == ["training"]


def test_a_conversion_job_run_is_named_after_what_it_wrote_with_its_job_file(tmp_path, store):
    """jobs/convert_checkpoint.py as a user runs it: the run is `convert-<to>-<dst's name>` (every conversion used
    to be `convert`), created by this user from jobs/convert_checkpoint.py."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": store}
    env.pop("DIFFSEG_SOURCE", None)
    src = REPO / "models" / "ddpm-celeba32-145k.pt"
    job = [sys.executable, str(REPO / "jobs" / "convert_checkpoint.py"), f"src={src}", "to=safetensors",
           f"dst={tmp_path / 'celeba-st'}", "tracking.system_metrics=false"]  # fmt: skip
    res = subprocess.run(job, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    c = client(store)
    (run,) = c.search_runs([c.get_experiment_by_name("diffseg").experiment_id])
    assert run.info.run_name == "convert-safetensors-celeba-st"
    assert run.data.tags["mlflow.source.name"] == "jobs/convert_checkpoint.py"
    assert run.data.tags["mlflow.user"] == getpass.getuser()


def test_data_input_survives_the_sql_stores_insert_race(store):
    """Two runs starting together on one data set: MLflow's SQL store looks the data set up, both miss it, and the
    second insert fails on the unique key. The tracker retries (the row exists then) and links its run; any other
    error from the store is raised as it was."""
    from mlflow.exceptions import MlflowException

    from diffseg.data.datasets import DataConfig

    race = MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, datasets.name")
    with Tracker(TrackingConfig(experiment="race", system_metrics=False), "other") as other:
        other.log_data_input(DataConfig(), "training")  # the run that won the insert
    with Tracker(TrackingConfig(experiment="race", system_metrics=False), "late") as tracker:
        real, calls = tracker._client.log_inputs, []

        def lose_once(*args, **kwargs):
            calls.append(args)
            if len(calls) == 1:
                raise race
            return real(*args, **kwargs)

        tracker._client.log_inputs = lose_once
        tracker.log_data_input(DataConfig(), "training")
        assert len(calls) == 2
        tracker._client.log_inputs = lambda *a, **k: (_ for _ in ()).throw(MlflowException("store is read-only"))
        with pytest.raises(MlflowException, match="read-only"):
            tracker.log_data_input(DataConfig(), "training")
        tracker._client.log_inputs = real
    names = [d.dataset.name for d in client(store).get_run(tracker.run_id).inputs.dataset_inputs]
    assert names == ["synthetic"]


def test_a_nested_run_lives_in_its_parents_experiment(store):
    """Issue 37.7: a comparison's extraction runs (their own config: experiment `diffseg`) landed in another experiment
    than their parent (`label-efficient`), so the UI showed them apart from it."""
    with Tracker(TrackingConfig(experiment="label-efficient", system_metrics=False), "compare") as parent:
        child = Tracker(TrackingConfig(experiment="diffseg", system_metrics=False), "ddpm", parent_run_id=parent.run_id)
        child.finish()
    c = client(store)
    parent_run, child_run = c.get_run(parent.run_id), c.get_run(child.run_id)
    assert child_run.info.experiment_id == parent_run.info.experiment_id
    assert child_run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert c.get_experiment_by_name("diffseg") is None  # nothing was created for the child's own setting


@pytest.mark.parametrize("on_device", ["auto", "off"])
def test_a_typo_in_the_data_path_leaves_no_failed_run_behind(tmp_path, store, on_device):
    """Issue 37.7: a typo'd data root was recorded as the data set of a FAILED run. The training data is checked
    before the MLflow run starts (with batches on the device or from a DataLoader), so the user error leaves no run."""
    from diffseg.core.config import load_config
    from diffseg.data.datasets import DataError
    from diffseg.training.config import TrainConfig
    from diffseg.training.loop import LocalContext, fit

    cfg = load_config(TrainConfig, REPO / "jobs" / "configs" / "ddpm_tiny.yaml",
                      [f"output_dir={tmp_path}", "data.name=folder", f"data.root={tmp_path / 'typo'}",
                       "tracking.experiment=typo", f"loop.data_on_device={on_device}"])  # fmt: skip
    with pytest.raises(DataError, match="typo"):
        fit(cfg, LocalContext("cpu"))
    exp = client(store).get_experiment_by_name("typo")
    assert exp is None or not client(store).search_runs([exp.experiment_id])


def test_a_resumed_run_drops_the_failure_tag_of_how_it_stopped(store):
    """Issue 36.9: a run ended FAILED by someone else (its process was killed; `reap_dead_runs`) kept its
    `diffseg.failure` tag after a resume finished it."""
    from diffseg.core.tracking import FAILURE_TAG

    cfg = TrackingConfig(experiment="resume", system_metrics=False)
    first = Tracker(cfg, "train")
    c = client(store)
    c.set_tag(first.run_id, FAILURE_TAG, "process 123 ended without ending its run (killed: SIGKILL)")
    c.set_terminated(first.run_id, "FAILED")
    again = Tracker(cfg, "train", run_id=first.run_id)
    again.finish()
    run = c.get_run(first.run_id)
    assert run.info.status == "FINISHED" and FAILURE_TAG not in run.data.tags


def test_a_resumed_run_logs_each_step_once(store):
    """Issue 37.7: a run resumed from a checkpoint older than its last logged step trained those steps again and
    logged them again (its chart showed step 125 twice). The steps it had logged are not logged again."""
    import numpy as np

    cfg = TrackingConfig(experiment="resume", system_metrics=False)
    first = Tracker(cfg, "train")
    for step in (25, 50, 75, 100, 125):
        first.log_metrics({"train/loss": 1.0 / step}, step)
    first.log_image(np.zeros((8, 8, 3), np.uint8), "samples", 100)
    first.finish("KILLED")
    again = Tracker(cfg, "train", run_id=first.run_id)  # resumed from its step-100 checkpoint
    for step in (125, 150):
        again.log_metrics({"train/loss": 2.0 / step}, step)
    again.log_image(np.zeros((8, 8, 3), np.uint8), "samples", 100)
    again.log_image(np.zeros((8, 8, 3), np.uint8), "samples", 150)
    again.finish()
    history = client(store).get_metric_history(first.run_id, "train/loss")
    assert sorted(m.step for m in history) == [25, 50, 75, 100, 125, 150]
    assert {m.step: m.value for m in history}[150] == 2.0 / 150
    images = [a.path for a in client(store).list_artifacts(first.run_id, "images")]
    assert sum("+step+100+" in p for p in images) == sum("+step+150+" in p for p in images) == 2, images  # png + webp


def test_params_are_the_keys_that_differ_from_the_defaults():
    """Issue 37: MLflow's image chart prints every param of a run above its image, and a run's params were its whole
    flattened config (about 120 keys): the image was pushed out of the card. Params are now the keys that differ from
    the defaults, the identifying ones at any value, the swept ones (`keep`), never where the run writes or logs."""
    from diffseg.core.tracking import config_params
    from diffseg.training.config import TrainConfig

    cfg = replace(TrainConfig(), **{"optim.lr": 3e-4, "output_dir": "/abs/runs", "tracking.uri": "sqlite:////x.db"})
    assert config_params(cfg) == {"name": cfg.name, "model.kind": "ddpm", "data.name": "synthetic", "optim.lr": 3e-4}
    assert config_params(cfg, keep=("optim.batch_size",))["optim.batch_size"] == cfg.optim.batch_size
    assert "optim.lr" not in config_params(cfg, drop=("optim",))

    @dataclass(frozen=True)
    class Required:  # no defaults to compare with: every key
        name: str
        size: int = 4

    assert config_params(Required("x")) == {"name": "x", "size": 4}


def test_a_training_run_holds_its_config_and_images_where_the_ui_opens(tmp_path, store):
    """Issue 37: a run's params are its non-default keys and config.yaml reproduces the whole config; every image key
    has an image at step 0 (MLflow's image chart opens there: "No image logged at this step" otherwise) and at the
    steps the run validated (val/masks) or sampled (samples) at."""
    from diffseg.core.config import load_config, to_dict
    from diffseg.core.tracking import config_params, flatten
    from diffseg.training.loop import LocalContext, TrainConfig, fit

    cfg = load_config(TrainConfig, REPO / "jobs" / "configs" / "factorized_tiny16.yaml",
                      [f"output_dir={tmp_path / 'runs'}", "tracking.enabled=true", "tracking.system_metrics=false",
                       "tracking.log_models=false", "tracking.experiment=images", "loop.sample_every=3",
                       "loop.eval_every=3"])  # fmt: skip
    out = fit(cfg, LocalContext("cpu"))
    c = client(store)
    run = c.get_run(out["mlflow_run_id"])
    params = run.data.params
    assert params == {k: str(v) for k, v in config_params(cfg).items()}
    assert len(params) < len(flatten(to_dict(cfg))) / 3 and "loop.sample_every" in params
    assert "optim.weight_decay" not in params and not [k for k in params if k.startswith(("tracking.", "output_dir"))]
    logged = Path(c.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path / "artifacts")))
    assert load_config(TrainConfig, logged) == cfg  # the whole config, the defaults included
    steps: dict[str, set[int]] = {}
    for a in c.list_artifacts(run.info.run_id, "images"):
        if a.path.endswith(".png"):  # images/<key, / as ~>+step+<step>+timestamp+...: what the UI parses
            key, _, step = Path(a.path).name.split("+")[:3]
            steps.setdefault(key.replace("~", "/"), set()).add(int(step))
    validated = {m.step for m in c.get_metric_history(run.info.run_id, "val/eps_mse")}
    assert validated == {3, 6}
    assert steps == {"samples": {0, 3, 6}, "val/masks": {0} | validated}
