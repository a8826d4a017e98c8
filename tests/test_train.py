"""Training on Ray Train: local mode, 1 vs 2 DDP workers, a killed worker, resuming with more steps, MLflow."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from diffseg.checkpoint import load_checkpoint, load_model
from diffseg.config import load_config, replace
from diffseg.factorized import FactorizedUNet

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "model.unet.model_channels": 16,
    "model.unet.channel_mult": [1, 2],
    "model.unet.attention_resolutions": [8],
    "data.image_size": 16,
    "optim.batch_size": 8,
    "optim.lr": 1e-3,
    "loop.log_every": 5,
    "loop.checkpoint_every": 10,
    "loop.num_samples": 2,
    "loop.sample_steps": 4,
}


def tiny_cfg(tmp_path: Path, kind: str = "factorized", **changes):
    from diffseg.train import TrainConfig

    path = REPO / "jobs" / "configs" / ("factorized_tiny.yaml" if kind == "factorized" else "ddpm_tiny.yaml")
    cfg = load_config(TrainConfig, path)
    return replace(cfg, **{**TINY, "output_dir": str(tmp_path / "runs"), **changes})


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def test_local_mode_trains_checkpoints_resumes_and_tracks(tmp_path, mlflow_uri):
    from diffseg.train import run

    cfg = tiny_cfg(tmp_path, name="resume", **{"loop.num_steps": 20})
    out = run(cfg).return_value
    assert out["step"] == 20 and out["starts"] == [0]
    ckpt_path = Path(out["checkpoint"])
    assert load_checkpoint(ckpt_path).step == 20
    assert (ckpt_path.parent / "config.yaml").is_file()
    assert list((ckpt_path.parent / "samples").glob("*.png"))

    # Resuming a finished run with more steps continues from the saved step (same optimizer/EMA/history).
    out2 = run(replace(cfg, **{"loop.num_steps": 30})).return_value
    assert out2["starts"] == [0, 20] and out2["step"] == 30
    assert [s for s, _ in out2["loss_history"]] == [5, 10, 15, 20, 25, 30]
    assert out2["loss_history"][:4] == out["loss_history"]
    assert out2["mlflow_run_id"] == out["mlflow_run_id"]  # one MLflow history for the run

    model, ckpt = load_model(ckpt_path)
    assert isinstance(model, FactorizedUNet) and ckpt.step == 30
    assert ckpt.optimizer is not None and ckpt.ema is not None

    import mlflow

    run_info = mlflow.MlflowClient(mlflow_uri).get_run(out["mlflow_run_id"])
    assert run_info.data.params["model.factorized.num_components"] == "3"
    assert run_info.data.params["optim.batch_size"] == "8"
    assert "train/loss" in run_info.data.metrics and "train/images_per_s" in run_info.data.metrics
    history = mlflow.MlflowClient(mlflow_uri).get_metric_history(out["mlflow_run_id"], "train/loss")
    assert [m.step for m in history] == [5, 10, 15, 20, 25, 30]
    artifacts = {a.path for a in mlflow.MlflowClient(mlflow_uri).list_artifacts(out["mlflow_run_id"])}
    assert {"samples", "checkpoint"} <= artifacts


def test_non_finite_loss_stops_the_run(tmp_path, mlflow_uri):
    from diffseg.train import run

    changes = {"loop.num_steps": 10, "optim.lr": 1e30, "optim.grad_clip": 0.0}
    cfg = tiny_cfg(tmp_path, kind="ddpm", name="nan", **changes)
    with pytest.raises(Exception, match="non-finite training loss"):
        run(cfg)


# ---------------------------------------------------------------------------------------------------- Ray cluster
@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(address="local", num_cpus=4, num_gpus=0, include_dashboard=False, object_store_memory=256 * 1024**2)
    yield
    ray.shutdown()


def _falls(history, factor=0.8):
    losses = [loss for _, loss in history]
    return sum(losses[-2:]) / 2 < factor * sum(losses[:2]) / 2


@pytest.mark.slow
def test_one_and_two_workers_same_curve_shape(tmp_path, mlflow_uri, ray_cluster):
    from diffseg.train import run

    curves = {}
    for n in (1, 2):
        cfg = tiny_cfg(
            tmp_path,
            name=f"w{n}",
            **{"loop.num_steps": 40, "loop.checkpoint_every": 40, "scaling.num_workers": n},
        )
        out = run(cfg).return_value
        assert out["world_size"] == n and out["step"] == 40
        curves[n] = [loss for _, loss in out["loss_history"]]
        assert _falls(out["loss_history"]), f"{n} worker(s): loss did not fall: {curves[n]}"
    # The same global batch: the curves agree in shape (a relative gap, not exact equality: the data order differs).
    for a, b in zip(curves[1], curves[2]):
        assert abs(a - b) / a < 0.35, curves


def _train_worker_pids() -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"RayTrainWorker" in cmd:
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
def test_killed_worker_resumes_from_last_checkpoint(tmp_path, mlflow_uri, ray_cluster):
    from diffseg.train import run

    cfg = tiny_cfg(
        tmp_path,
        name="killed",
        **{
            "loop.num_steps": 40,
            "loop.checkpoint_every": 5,
            "scaling.num_workers": 2,
            "scaling.max_failures": 2,
            "scaling.cpus_per_worker": 1,
        },
    )
    export = tmp_path / "runs" / "killed" / "checkpoint.pt"
    killed: list[int] = []

    def killer():
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            if export.is_file():
                try:
                    step = load_checkpoint(export).step
                except Exception:  # being replaced this very moment
                    step = 0
                pids = _train_worker_pids()
                if 10 <= step < 30 and pids:
                    os.kill(pids[-1], signal.SIGKILL)
                    killed.append(step)
                    return
            time.sleep(0.2)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    out = run(cfg).return_value
    thread.join(timeout=5)
    assert killed, "the test never killed a worker"
    assert out["step"] == 40, "the run did not finish its planned steps"
    assert len(out["starts"]) == 2 and out["starts"][0] == 0
    assert out["starts"][1] >= 5, f"restarted from scratch, not from a checkpoint: {out['starts']}"
    steps = [s for s, _ in out["loss_history"]]
    assert steps[-1] == 40 and steps == sorted(set(steps))
    assert load_checkpoint(export).step == 40


def test_train_job_dry_run(capsys):
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "train_factorized.py"), "--dry-run", "model.factorized.num_components=5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "num_components: 5" in out.stdout and "kind: factorized" in out.stdout
    bad = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "train_ddpm.py"), "--dry-run", "optim.lrr=1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "optim.lrr" in bad.stderr


@pytest.mark.gpu
def test_paper64_factorized_bf16_step_on_gpu(capsys):
    """One training step of the 64 px paper-size factorized model in bf16; prints images/s."""
    from diffseg.diffusion import GaussianDiffusion, get_named_beta_schedule
    from diffseg.factorized import FACTORIZED_SIZES, FactorizedConfig

    device = torch.device("cuda")
    model = FactorizedUNet(FACTORIZED_SIZES["paper-64"](), FactorizedConfig(num_components=3))
    model = model.to(device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    diffusion = GaussianDiffusion(get_named_beta_schedule("linear", 1000))
    batch = 32
    x0 = torch.randn(batch, 3, 64, 64, device=device).to(memory_format=torch.channels_last)

    def step():
        t = torch.randint(0, 1000, (batch,), device=device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = diffusion.training_losses(model, x0, t, torch.randn_like(x0))["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0, n = time.perf_counter(), 10
    for _ in range(n):
        loss = step()
    torch.cuda.synchronize()
    ips = n * batch / (time.perf_counter() - t0)
    assert torch.isfinite(loss)
    print(f"paper-64 factorized K=3 bf16 on {torch.cuda.get_device_name()}: {ips:.1f} images/s")
