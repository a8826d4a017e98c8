"""MLflow as the record of runs and models: pyfunc models answer as the jobs do, runs end with the right status
(also when their process is killed), and jobs that were untracked are runs now."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffseg.core.config import to_dict
from diffseg.core.registry import set_alias
from diffseg.core.tracking import (
    FAILURE_TAG,
    HOST_TAG,
    PID_START_TAG,
    PID_TAG,
    Tracker,
    TrackingConfig,
    process_tracking_uri,
    reap_dead_runs,
)
from diffseg.data.datasets import DataConfig
from diffseg.models.builder import ModelConfig, build_model
from diffseg.models.checkpoint import save_checkpoint
from diffseg.models.factorized import FactorizedConfig
from diffseg.models.unet import UNetConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh SQLite store, also for code that reads $MLFLOW_TRACKING_URI (MLflow's URI loads, job subprocesses)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def client(uri):
    import mlflow

    return mlflow.MlflowClient(uri)


def checkpoint(path, kind="factorized", seed=0):
    """A small random network whose masks vary over the image (ADM's zero-init output layers perturbed)."""
    torch.manual_seed(seed)
    unet = UNetConfig(image_size=16, model_channels=8, channel_mult=(1, 2), attention_resolutions=())
    cfg = ModelConfig(kind=kind, unet=unet, factorized=FactorizedConfig(num_components=3))
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    config = {"model": to_dict(cfg), "diffusion": {"num_timesteps": 100}}
    return save_checkpoint(path, config=config, model=model, ema=model, step=5)


def image_folder(root: Path, sizes=((20, 24), (20, 24), (16, 16), (31, 17))) -> Path:
    """A paired folder of a few RGB images of several sizes (the resize policy is part of what must match)."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"im{i}.png")
    (root / "dataset.json").write_text(json.dumps({"classes": ["background", "object"], "ignore_index": 255}))
    return root


def test_pyfunc_models_answer_as_the_jobs_do(tmp_path, store):
    """Each logged model, loaded with mlflow.pyfunc.load_model from the registry: the factorized segmenter gives
    jobs/segment.py's masks for the same images (same seed, any size), the DDPM sampler the images jobs/sample.py
    writes, the pixel ensemble its bundle's votes; each has a signature and an input example; a bundle's local
    backbone is packaged, a models:/ backbone is referenced pinned to its version."""
    import mlflow

    from diffseg.methods.pixel import PixelSegmenter
    from diffseg.methods.sampling import SampleJobConfig, run_sample_job
    from diffseg.methods.segment import SegmentJobConfig, run_segment_job
    from diffseg.serving.pyfunc import log_bundle_model, log_checkpoint_model
    from test_serving import tiny_pixel_bundle

    fac = checkpoint(tmp_path / "fac" / "checkpoint.pt")
    ddpm = checkpoint(tmp_path / "ddpm" / "checkpoint.pt", kind="ddpm")
    bundle = tiny_pixel_bundle(tmp_path / "pix")
    tracking = TrackingConfig(experiment="models", system_metrics=False)
    with Tracker(tracking, "log-models") as tracker:
        assert log_checkpoint_model(tracker, fac, register_as="seg").registered_uri == "models:/seg/1"
        log_checkpoint_model(tracker, ddpm, name="sampler", register_as="ddpm")
        log_bundle_model(tracker, bundle, register_as="pix")
    set_alias("ddpm", "champion", 1)

    # factorized: the segment job's masks, image by image, at each image's own size
    folder = image_folder(tmp_path / "data")
    data = DataConfig(name="folder", root=str(folder), image_size=0)
    job = SegmentJobConfig(checkpoint=str(fac), output_dir=str(tmp_path / "out"), seed=3, batch_size=2, data=data,
                           tracking=tracking)  # fmt: skip
    run_segment_job(job)
    seg_model = mlflow.pyfunc.load_model("models:/seg/1")
    info = mlflow.models.get_model_info("models:/seg/1")
    assert info.signature.inputs.to_dict()[0]["tensor-spec"]["dtype"] == "uint8" and info.saved_input_example_info
    masks = 0
    for i, name in enumerate(sorted(p.name for p in (folder / "images").iterdir())):
        image = np.asarray(Image.open(folder / "images" / name).convert("RGB"))
        expected = np.asarray(Image.open(tmp_path / "out" / "segment" / "masks" / name))
        # the job's image i draws its noise from image_seed(3, i), a call's image j from image_seed(seed, j): put
        # the image at index i of a call (the images differ in size, so one call per image)
        got = seg_model.predict(np.stack([image] * (i + 1)), params={"seed": 3})[i]
        assert got.shape == image.shape[:2] and np.array_equal(got, expected), name
        masks += len(np.unique(expected)) > 1
    assert masks >= 2  # the masks are not trivially constant

    # DDPM: a sampler; images 0..2 of a run seeded 1 are jobs/sample.py's
    sample = run_sample_job(SampleJobConfig(checkpoint=str(ddpm), output_dir=str(tmp_path / "out"), num_images=3,
                                            steps=4, seed=1, tracking=tracking))  # fmt: skip
    got = mlflow.pyfunc.load_model("models:/ddpm@champion").predict(np.arange(3), params={"seed": 1, "steps": 4})
    for i in range(3):
        assert np.array_equal(got[i], np.asarray(Image.open(Path(sample["out_dir"]) / "images" / f"{i:05d}.png")))

    # pixel ensemble: the bundle's own votes; its local backbone travels inside the model
    images = np.stack([np.asarray(Image.open(folder / "images" / "im0.png").convert("RGB"))] * 2)
    got = mlflow.pyfunc.load_model("models:/pix/1").predict(images)
    expected = PixelSegmenter.load(bundle, "cpu").segment(torch.from_numpy(images).permute(0, 3, 1, 2) / 127.5 - 1)
    assert np.array_equal(got, expected.labels.numpy())
    local = Path(mlflow.artifacts.download_artifacts("models:/pix/1"))
    served = PixelSegmenter.load(local, "cpu")
    assert served.recipe.backbone.startswith(str(local)) and "backbone" in served.recipe.backbone

    # a bundle whose backbone is an MLflow URI references it, pinned: the alias may move, the features may not
    moved = PixelSegmenter.load(bundle, "cpu")
    moved.recipe = dataclasses.replace(moved.recipe, backbone="models:/ddpm@champion")
    ref_bundle = moved.save(tmp_path / "pix2" / "pixel.pt")
    with Tracker(tracking, "log-ref") as tracker:
        logged = log_bundle_model(tracker, ref_bundle)
    pinned = PixelSegmenter.load(Path(mlflow.artifacts.download_artifacts(logged.model_uri)), "cpu")
    assert pinned.recipe.backbone == "models:/ddpm/1"


def test_logging_a_model_leaves_the_process_tracking_uri_as_it_was(tmp_path, monkeypatch):
    """Logging a model sets MLflow's process-wide URI for the while; afterwards $MLFLOW_TRACKING_URI decides again
    (a later job or test that changes it is not sent to the old store), and a URI the process pinned stays pinned."""
    import mlflow

    a, b, c, pinned = (f"sqlite:///{tmp_path / n}.db" for n in ("a", "b", "c", "pinned"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", a)
    with process_tracking_uri(b):
        assert mlflow.get_tracking_uri() == b
    assert os.environ["MLFLOW_TRACKING_URI"] == a and mlflow.get_tracking_uri() == a
    monkeypatch.setenv("MLFLOW_TRACKING_URI", c)
    assert mlflow.get_tracking_uri() == c  # not pinned to a
    try:
        mlflow.set_tracking_uri(pinned)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", a)
        with process_tracking_uri(b):
            assert mlflow.get_tracking_uri() == b
        assert mlflow.get_tracking_uri() == pinned and os.environ["MLFLOW_TRACKING_URI"] == a
    finally:
        mlflow.set_tracking_uri(None)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", a)


def test_runs_end_with_the_status_of_how_the_job_ended(store):
    """FINISHED, FAILED for an error, KILLED for an interrupt (SIGTERM arrives as JobInterrupted); the runs a job
    leaves open end with it (run_job's safety net); a run whose process is gone is reaped FAILED."""
    from diffseg.core.tracking import JobInterrupted, end_live_runs

    cfg = TrackingConfig(experiment="status", system_metrics=False)
    with Tracker(cfg, "ok") as ok:
        ok.log_metrics({"train/loss": 1.0}, step=3)
    with pytest.raises(ValueError), Tracker(cfg, "crash") as crash:
        raise ValueError("boom")
    with pytest.raises(JobInterrupted), Tracker(cfg, "stopped") as stopped:
        raise JobInterrupted("SIGTERM")
    parent = Tracker(cfg, "left-open")
    child = Tracker(cfg, "child", parent_run_id=parent.run_id)
    assert end_live_runs(RuntimeError("x")) >= 2
    c = client(store)
    status = {t.run_id: c.get_run(t.run_id).info.status for t in (ok, crash, stopped, parent, child)}
    assert list(status.values()) == ["FINISHED", "FAILED", "KILLED", "FAILED", "FAILED"]
    assert [m.step for m in c.get_metric_history(ok.run_id, "train/loss")] == [3]
    # a run whose process died without a word (the tags every run carries, with a pid that is gone)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    exp = c.get_experiment_by_name("status").experiment_id
    tags = {HOST_TAG: os.uname().nodename, PID_TAG: dead.stdout.strip(), PID_START_TAG: "1.0"}
    orphan = c.create_run(exp, run_name="orphan", tags=tags).info.run_id
    alive = Tracker(cfg, "alive")  # a new top-level run reaps on its way in
    assert c.get_run(orphan).info.status == "FAILED"
    assert "ended without ending" in c.get_run(orphan).data.tags[FAILURE_TAG]
    orphan2 = c.create_run(exp, run_name="orphan2", tags=tags).info.run_id
    assert reap_dead_runs(store, "status") == [orphan2]  # the live run of this process is left alone
    assert c.get_run(alive.run_id).info.status == "RUNNING"
    alive.finish()


def _wait(predicate, timeout, what, log: Path | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (value := predicate()) is not None:
            return value
        time.sleep(0.5)
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what}" + (f":\n{log.read_text()[-4000:]}" if log else "")
    )


def test_killed_training_job_is_failed_and_a_stopped_one_killed(tmp_path, store):
    """jobs/train_factorized.py as a user runs it: SIGKILL mid-run (nothing can run in the process) -> the next run
    started in the experiment finds the dead process and marks the run FAILED; SIGTERM (`ray job stop`) -> the job
    unwinds and its run ends KILLED."""
    c = client(store)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": store}

    def start(name):
        args = [sys.executable, str(REPO / "jobs" / "train_factorized.py"), f"name={name}",
                f"output_dir={tmp_path / 'runs'}", "loop.num_steps=100000", "loop.log_every=2",
                "loop.checkpoint_every=100000", "optim.batch_size=4", "tracking.system_metrics_every=1"]  # fmt: skip
        with open(tmp_path / f"{name}.log", "w") as log:  # a file, not a pipe nobody reads (a full one blocks the job)
            return subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)

    def logging_run(name):
        job = {"killed": killed, "stopped": stopped}[name]
        if job.poll() is not None:
            raise AssertionError(
                f"job {name} exited {job.returncode}:\n{(tmp_path / f'{name}.log').read_text()[-4000:]}"
            )
        exp = c.get_experiment_by_name("diffseg")
        runs = c.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'") if exp else []
        return runs[0].info.run_id if runs and "train/loss" in runs[0].data.metrics else None

    killed, stopped = start("killed"), start("stopped")
    try:
        killed_id = _wait(lambda: logging_run("killed"), 240, "the first logged loss", tmp_path / "killed.log")
        killed.send_signal(signal.SIGKILL)
        killed.wait(30)
        assert c.get_run(killed_id).info.status == "RUNNING"  # nobody could say otherwise yet
        stopped_id = _wait(lambda: logging_run("stopped"), 240, "the second job's first loss", tmp_path / "stopped.log")
        stopped.send_signal(signal.SIGTERM)
        assert stopped.wait(60) != 0
    finally:
        for p in (killed, stopped):
            if p.poll() is None:
                p.kill()
    assert c.get_run(stopped_id).info.status == "KILLED"
    Tracker(TrackingConfig(system_metrics=False), "next").finish()  # any new run in the experiment reaps
    run = c.get_run(killed_id)
    assert run.info.status == "FAILED" and "killed" in run.data.tags[FAILURE_TAG]
    assert any(k.startswith("system/") for k in c.get_run(stopped_id).data.metrics)
