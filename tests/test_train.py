"""Training on Ray Train: local mode, 1 vs 2 DDP workers, a killed worker, resuming with more steps, MLflow."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from diffseg.core.config import load_config, replace
from diffseg.core.runtime import code_runtime_env
from diffseg.models.checkpoint import load_checkpoint, load_diffusion_model
from diffseg.models.factorized import FactorizedUNet

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "model.unet.model_channels": 16,
    "model.unet.channel_mult": [1, 2],
    "model.unet.attention_resolutions": [8],
    "model.unet.image_size": 16,
    "data.image_size": 16,
    "optim.batch_size": 8,
    "optim.lr": 1e-3,
    "loop.log_every": 5,
    "loop.checkpoint_every": 10,
    "loop.num_samples": 2,
    "loop.sample_steps": 4,
}


def tiny_cfg(tmp_path: Path, kind: str = "factorized", **changes):
    from diffseg.training.ray_train import TrainConfig

    path = REPO / "jobs" / "configs" / ("factorized_tiny.yaml" if kind == "factorized" else "ddpm_tiny.yaml")
    cfg = load_config(TrainConfig, path)
    return replace(cfg, **{**TINY, "output_dir": str(tmp_path / "runs"), **changes})


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def _git_head() -> str | None:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def test_local_mode_trains_checkpoints_resumes_and_tracks(tmp_path, mlflow_uri, capfd):
    """Ray Train local mode: a run, its export, progress lines, resuming a finished run, and what MLflow holds."""
    from diffseg.core.tracking import config_params
    from diffseg.training.ray_train import run

    cfg = tiny_cfg(tmp_path, name="resume", **{"loop.num_steps": 20})
    out = run(cfg).return_value
    assert out["step"] == 20 and out["starts"] == [0]
    ckpt_path = Path(out["checkpoint"])
    assert load_checkpoint(ckpt_path).step == 20
    assert (ckpt_path.parent / "config.yaml").is_file()
    assert list((ckpt_path.parent / "samples").glob("*.png"))
    # Progress: step, loss, images/s and time left on every log step.
    progress = re.findall(
        r"\[train\] step (\d+)/20 loss ([\d.]+) ([\d.]+) img/s left (\d\d:\d\d:\d\d)", capfd.readouterr().out
    )
    assert [int(p[0]) for p in progress] == [5, 10, 15, 20] and all(float(p[2]) > 0 for p in progress)

    # Resuming a finished run with more steps continues from the saved step (same optimizer/EMA/history).
    out2 = run(replace(cfg, **{"loop.num_steps": 30})).return_value
    assert out2["starts"] == [0, 20] and out2["step"] == 30
    assert [s for s, _ in out2["loss_history"]] == [5, 10, 15, 20, 25, 30]
    assert out2["loss_history"][:4] == out["loss_history"]
    assert out2["mlflow_run_id"] == out["mlflow_run_id"]  # one MLflow history for the run
    assert "steps 20->30 (from step 20 of" in capfd.readouterr().out

    model, ckpt = load_diffusion_model(ckpt_path).model, load_checkpoint(ckpt_path)
    assert isinstance(model, FactorizedUNet) and ckpt.step == 30
    assert ckpt.optimizer is not None and ckpt.ema is not None

    # What MLflow holds, read back from the store.
    import mlflow

    client = mlflow.MlflowClient(mlflow_uri)
    run_id = out["mlflow_run_id"]
    info = client.get_run(run_id)
    assert info.info.status == "FINISHED"
    params = info.data.params
    assert set(params) == set(config_params(cfg)), "params: the keys that differ from the defaults, one per key path"
    assert params["optim.batch_size"] == "8" and params["model.kind"] == "factorized"
    assert "model.factorized.num_components" not in params  # K = 3, the default: config.yaml has it (below)
    assert "tracking.uri" not in params  # where the run is logged: config.yaml only
    assert params["loop.num_steps"] == "20"  # the config the run was started with
    if sha := _git_head():
        assert info.data.tags["mlflow.source.git.commit"] == sha
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [5, 10, 15, 20, 25, 30]
    ips = client.get_metric_history(run_id, "train/images_per_s")
    assert len(ips) == 6 and all(m.value > 0 for m in ips)

    arts = tmp_path / "artifacts"
    client.download_artifacts(run_id, "", str(arts))
    grids = sorted((arts / "samples").glob("*.png"))
    # step 0 (the untrained model): where MLflow's image chart opens; then the end of each of the two runs
    assert [g.name for g in grids] == ["step_0000000.png", "step_0000020.png", "step_0000030.png"]
    # Factorized samples come with their masks: each sample is image | mask | overlay (3 tiles of 16 px, pad 2).
    from PIL import Image

    assert Image.open(grids[-1]).size == (
        3 * (16 + 2) + 2,
        2 * (16 + 2) + 2,
    )  # a row per sample: image | mask | overlay
    assert load_checkpoint(arts / "checkpoint" / "checkpoint.pt").step == 30  # the final checkpoint
    assert "num_components: 3" in (arts / "config.yaml").read_text()


def test_loop_runs_without_ray_on_uri_storage(tmp_path):
    """The loop is plain PyTorch: with `import ray` made impossible it trains, checkpoints and resumes. Its storage is
    a URI here (file://, as s3:// on a cluster): the export, samples and the resume go through pyarrow.fs."""
    script = f"""
import sys
sys.modules["ray"] = None  # any import of ray now fails
sys.path.insert(0, {str(REPO / "platform")!r})
import torch
torch.set_num_threads(1)
from diffseg.core.config import load_config, replace
from diffseg.training.loop import LocalContext, fit
from diffseg.training.config import TrainConfig
cfg = replace(load_config(TrainConfig, {str(REPO / "jobs/configs/factorized_tiny.yaml")!r}), **{{
    **{TINY!r}, "name": "noray", "output_dir": "file://{tmp_path}/store", "tracking.enabled": False,
    "loop.num_steps": 10}})
out = fit(cfg, LocalContext("cpu"))
assert out["step"] == 10 and out["starts"] == [0], out
out = fit(replace(cfg, **{{"loop.num_steps": 15}}))
assert out["step"] == 15 and out["starts"] == [0, 10], out
print("OK", out["checkpoint"])
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"OK file://{tmp_path}/store/noray/checkpoint.pt" in res.stdout
    run = tmp_path / "store" / "noray"
    assert load_checkpoint(run / "checkpoint.pt").step == 15
    # no step-0 grid without MLflow (it is there for MLflow's image charts, which open at step 0)
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_0000010.png", "step_0000015.png"]


def test_train_step_fp32_and_bf16(tmp_path):
    """One step updates weights, EMA and the step; bf16 autocast runs on CPU too (the GPU path's precision)."""
    from diffseg.training.loop import build_train_state, step_generator, train_step

    for precision in ("fp32", "bf16"):
        cfg = tiny_cfg(tmp_path, **{"loop.precision": precision})
        state, source = build_train_state(cfg, "cpu")
        assert source == "fresh" and state.autocast_dtype == (torch.bfloat16 if precision == "bf16" else None)
        before = {k: v.clone() for k, v in state.model.state_dict().items()}
        batch = {"image": torch.rand(8, 3, 16, 16) * 2 - 1}
        loss = train_step(state, batch, step_generator(cfg, 0, 0, state.device))
        assert loss.dtype == torch.float32 and torch.isfinite(loss) and state.step == 1
        changed = [k for k, v in state.model.state_dict().items() if not torch.equal(v, before[k])]
        assert changed and state.ema.num_updates == 1
    # The same seed gives the same initial network, whatever else ran before (every rank starts identical).
    a, _ = build_train_state(cfg, "cpu")
    torch.randn(100)
    b, _ = build_train_state(cfg, "cpu")
    assert all(torch.equal(x, y) for x, y in zip(a.model.parameters(), b.model.parameters()))


def test_non_finite_loss_stops_the_run(tmp_path):
    from diffseg.training.loop import LocalContext, fit

    changes = {"loop.num_steps": 10, "optim.lr": 1e30, "optim.grad_clip": 0.0, "tracking.enabled": False}
    cfg = tiny_cfg(tmp_path, kind="ddpm", name="nan", **changes)
    with pytest.raises(FloatingPointError, match="non-finite training loss .* at step 5 of run 'nan'"):
        fit(cfg, LocalContext("cpu"))


# ---------------------------------------------------------------------------------------------------- Ray cluster
@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(
        address="local", num_cpus=4, num_gpus=0, include_dashboard=False, object_store_memory=256 * 1024**2,
        runtime_env=code_runtime_env(),  # the workers run this checkout's code, not an installed diffseg
    )  # fmt: skip
    yield
    ray.shutdown()


def _falls(history, factor=0.8):
    losses = [loss for _, loss in history]
    return sum(losses[-2:]) / 2 < factor * sum(losses[:2]) / 2


@pytest.mark.slow
def test_one_and_two_workers_same_curve_shape(tmp_path, mlflow_uri, ray_cluster):
    """2 DDP workers on CPU train the tiny factorized model and the loss falls; 1 worker (Ray Train's local mode:
    the same loop in this process) with the same global batch draws the same curve."""
    from diffseg.training.ray_train import run

    curves = {}
    for n in (0, 2):
        cfg = tiny_cfg(
            tmp_path,
            name=f"w{n}",
            **{"loop.num_steps": 40, "loop.checkpoint_every": 40, "scaling.num_workers": n},
        )
        out = run(cfg).return_value
        assert out["world_size"] == max(n, 1) and out["step"] == 40
        curves[n] = [loss for _, loss in out["loss_history"]]
        assert _falls(out["loss_history"]), f"{n} worker(s): loss did not fall: {curves[n]}"
    # The same global batch and initial weights: the curves agree in shape (a relative gap, not equality: the data
    # order, timesteps and noise differ per rank).
    for a, b in zip(curves[0], curves[2]):
        assert abs(a - b) / a < 0.35, curves


def _descendants(root: int) -> dict[int, bytes]:
    """{pid: cmdline} of the processes below `root`: the Ray processes this test session started, and only those
    (other Ray clusters may run on this machine)."""
    children: dict[int, list[int]] = {}
    cmdlines: dict[int, bytes] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdlines[int(proc.name)] = (proc / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(proc.name))
    out, todo = {}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out[child] = cmdlines.get(child, b"")
            todo.append(child)
    return out


def _train_worker_pids() -> list[int]:
    return sorted(pid for pid, cmd in _descendants(os.getpid()).items() if b"RayTrainWorker" in cmd)


@pytest.mark.slow
def test_killed_worker_resumes_from_last_checkpoint(tmp_path, mlflow_uri, ray_cluster):
    from diffseg.training.ray_train import run

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


def _job(name: str):
    """A jobs/<name>.py launcher as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "jobs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_job_dry_run(capsys):
    out = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "train_factorized.py"), "--dry-run", "model.factorized.num_components=5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "num_components: 5" in out.stdout and "kind: factorized" in out.stdout
    main = _job("train_ddpm").main
    with pytest.raises(SystemExit) as exc:
        main(["--dry-run", "optim.lrr=1"])
    assert exc.value.code == 2 and "optim.lrr" in capsys.readouterr().err
    # cross-field checks run in --dry-run: the config is printed, then the mismatch is named
    with pytest.raises(SystemExit) as exc:
        main(["--dry-run", "data.image_size=64"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "data.image_size (64) != model.unet.image_size (32)" in err


@pytest.mark.gpu
def test_paper64_factorized_bf16_step_on_gpu():
    """Training steps of the 64 px paper-size factorized model (K=3) in bf16 through the Ray-free loop; prints
    images/s (the figure in the README's performance table). Needs CUDA, not Ray."""
    from diffseg.training.config import TrainConfig
    from diffseg.training.loop import build_train_state, step_generator, train_step

    cfg = load_config(TrainConfig, REPO / "jobs" / "configs" / "factorized_paper64.yaml")
    cfg = replace(cfg, **{"loop.precision": "bf16", "optim.batch_size": 32})
    state, _ = build_train_state(cfg, "cuda")
    assert state.autocast_dtype == torch.bfloat16 and state.memory_format == torch.channels_last
    batch = {"image": torch.rand(cfg.optim.batch_size, 3, 64, 64, device="cuda") * 2 - 1}
    gen = step_generator(cfg, 0, 0, state.device)
    for _ in range(3):  # warm-up: cuDNN autotuning, allocator
        train_step(state, batch, gen)
    torch.cuda.synchronize()
    t0, n = time.perf_counter(), 10
    for _ in range(n):
        loss = train_step(state, batch, gen)
    torch.cuda.synchronize()
    ips = n * cfg.optim.batch_size / (time.perf_counter() - t0)
    assert torch.isfinite(loss) and state.step == 13
    params = sum(p.numel() for p in state.model.parameters()) / 1e6
    print(
        f"\npaper-64 factorized K=3 ({params:.1f}M params) bf16 batch {cfg.optim.batch_size} on "
        f"{torch.cuda.get_device_name()}: {ips:.1f} images/s, peak memory "
        f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    )


def test_resume_guard_allows_loop_reapplies_optim_and_refuses_architecture_or_data(tmp_path):
    """Re-running a name with a changed config: loop.*/scaling.* carry on; optim.* is re-applied to the restored
    optimizer (moments kept; the checkpoint's lr no longer wins); model/data changes are refused naming the keys,
    before anything of the run is overwritten."""
    from diffseg.core.config import ConfigError
    from diffseg.training.loop import LocalContext, fit

    cfg = tiny_cfg(tmp_path, name="guard", **{"loop.num_steps": 4, "loop.log_every": 2, "loop.checkpoint_every": 2,
                                              "tracking.enabled": False})  # fmt: skip
    ckpt_path = tmp_path / "runs" / "guard" / "checkpoint.pt"
    fit(cfg, LocalContext("cpu"))

    # 1. loop.* and scaling.* changes: the run continues from its step.
    out = fit(replace(cfg, **{"loop.num_steps": 6, "loop.log_every": 3, "scaling.max_failures": 2}), LocalContext())
    assert out["starts"] == [0, 4] and out["step"] == 6
    assert load_checkpoint(ckpt_path).optimizer["param_groups"][0]["lr"] == 1e-3

    # 2. optim.* changes are re-applied; Adam's moments and step count come from the checkpoint.
    changed = {"loop.num_steps": 7, "optim.lr": 2.5e-4, "optim.weight_decay": 0.01, "optim.mask_lr_scale": 4.0}
    out = fit(replace(cfg, **changed), LocalContext())
    saved = load_checkpoint(ckpt_path)
    groups = saved.optimizer["param_groups"]  # mask_lr_scale != 1 splits the mask generator off: 2 groups now
    assert [g["lr"] for g in groups] == [2.5e-4, 1e-3] and all(g["weight_decay"] == 0.01 for g in groups)
    steps = {float(s["step"]) for s in saved.optimizer["state"].values()}
    assert steps == {7.0} and len(saved.optimizer["state"]) == sum(len(g["params"]) for g in groups)
    assert out["starts"] == [0, 4, 6]

    # 3. architecture or data: refused, naming each key, and the run is left as it was.
    from diffseg.training.ray_train import run

    bad = replace(cfg, **{**changed, "loop.num_steps": 9, "model.factorized.num_components": 4, "data.num_images": 64})
    run(replace(cfg, **changed))  # through the driver: it writes the run's config.yaml (nothing left to train)
    for attempt in (lambda: fit(bad, LocalContext()), lambda: run(bad)):  # the loop, and the driver before Ray
        with pytest.raises(ConfigError) as e:
            attempt()
        msg = str(e.value)
        assert "model.factorized.num_components: 3 -> 4" in msg and "data.num_images: 512 -> 64" in msg
        assert "optim." not in msg.split("(loop.*")[0] and "name=" in msg and "init_from=" in msg
    assert load_checkpoint(ckpt_path).step == 7
    assert "num_components: 3" in (ckpt_path.parent / "config.yaml").read_text()


def test_no_sample_grids_and_the_tail_steps_say_what_they_do(tmp_path, mlflow_uri, caplog):
    """loop.num_samples=0 asks for no sample grid: the run ends normally after its last checkpoint (it used to fail
    in write_samples). The slow tail steps each get a line: the final samples, and logging the model to MLflow."""
    import logging

    from diffseg.training.loop import LocalContext, fit

    cfg = tiny_cfg(tmp_path, kind="ddpm", name="nosamples", **{"loop.num_steps": 5, "loop.num_samples": 0})
    with caplog.at_level(logging.INFO, logger="diffseg"):
        out = fit(cfg, LocalContext("cpu"))
    assert out["step"] == 5 and load_checkpoint(out["checkpoint"]).step == 5
    assert not (Path(out["checkpoint"]).parent / "samples").exists()
    text = caplog.text
    assert "final samples" not in text
    assert "MLflow: logging the final checkpoint and the model" in text
    assert re.search(r"MLflow: checkpoint and model logged in [\d.]+ s", text)
    import mlflow  # a DDPM run logs its own parameters, not the factorized model's (issue 37.7)

    client = mlflow.MlflowClient(cfg.tracking.uri)
    run = client.get_run(out["mlflow_run_id"])
    params = run.data.params
    assert "model.unet.model_channels" in params and not [k for k in params if k.startswith("model.factorized.")]
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert [m.name for m in models if m.source_run_id == run.info.run_id] == ["nosamples"]  # named after the run

    with caplog.at_level(logging.INFO, logger="diffseg"):
        fit(tiny_cfg(tmp_path, kind="ddpm", name="samples", **{"loop.num_steps": 5, "tracking.enabled": False}))
    assert "[train] final samples: 2 images, 4 DDIM steps" in caplog.text
    assert re.search(r"samples -> .*step_0000005\.png \([\d.]+ s\)", caplog.text)
    with pytest.raises(ValueError, match="loop.num_samples"):
        tiny_cfg(tmp_path, **{"loop.num_samples": -1}).check()


def test_ctrl_c_saves_the_steps_says_so_and_the_same_command_resumes(tmp_path, capsys, monkeypatch):
    """Issue 37.3: Ctrl-C printed a blank `interrupted: ` and lost the steps since the last checkpoint without a
    word. Now the run's steps are saved, the line names the step, the file and the command, and that command
    resumes from the step (exit 130, the MLflow run KILLED)."""
    import diffseg.training.loop as loop
    from diffseg.models.checkpoint import load_checkpoint

    real = loop.train_step

    def interrupted_at_7(state, batch, gen):
        if state.step == 7:
            raise KeyboardInterrupt
        return real(state, batch, gen)

    main = _job("train_ddpm").main
    args = [f"output_dir={tmp_path}", "name=ctrlc", "loop.num_steps=12", "loop.checkpoint_every=100",
            "loop.num_samples=0", "data.num_images=32", "model.unet.image_size=16", "data.image_size=16",
            "model.unet.model_channels=8", "model.unet.attention_resolutions=[]", "optim.batch_size=4",
            "tracking.enabled=false"]  # fmt: skip
    monkeypatch.setattr(loop, "train_step", interrupted_at_7)
    monkeypatch.setattr(sys, "argv", ["jobs/train_ddpm.py", *args])
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    ckpt = tmp_path / "ctrlc" / "checkpoint.pt"
    assert exit_.value.code == 130
    assert err.startswith("interrupted: Ctrl-C at step 7: saved ") and str(ckpt) in err, err
    assert "the same command resumes it: python jobs/train_ddpm.py " in err and "name=ctrlc" in err, err
    assert load_checkpoint(ckpt).step == 7  # nothing lost (checkpoint_every was 100)
    monkeypatch.setattr(loop, "train_step", real)
    main(args)  # the same command: from step 7 to 12
    done = load_checkpoint(ckpt)
    assert done.step == 12 and done.extra["starts"] == [0, 7]


@pytest.mark.slow
def test_ctrl_c_with_two_workers_exits_130_killed_naming_the_checkpoint(tmp_path):
    """Issue 37.3: with scaling.num_workers=2, Ray's own SIGINT handler aborted the run's controller and `fit()` then
    raised ActorDiedError: exit 1, the run FAILED. Now Ctrl-C stops the workers, exits 130 with one line naming the
    workers' last checkpoint and the command that resumes it, and the MLflow run is KILLED."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [sys.executable, str(REPO / "jobs" / "train_factorized.py"), "--config", "factorized_tiny16.yaml",
           "scaling.num_workers=2", "loop.num_steps=100000", "loop.checkpoint_every=4", f"output_dir={tmp_path}",
           "name=ctrlc2", "tracking.enabled=true", f"tracking.uri={uri}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "job.log"
    job = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    ckpt = tmp_path / "ctrlc2" / "checkpoint.pt"
    try:
        deadline = time.time() + 400
        while not ckpt.is_file():
            assert job.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(2)
        job.send_signal(signal.SIGINT)  # what Ctrl-C sends the job's process
        assert job.wait(timeout=180) == 130, log.read_text()[-3000:]
    finally:
        if job.poll() is None:
            job.kill()
    last = log.read_text().strip().splitlines()[-1]
    assert last.startswith("interrupted: Ctrl-C with the workers' last checkpoint at step ") and str(ckpt) in last
    assert "the same command resumes it: python " in last and "name=ctrlc2" in last, last
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("diffseg").experiment_id])
    assert [r.info.status for r in runs] == ["KILLED"], [(r.info.run_name, r.info.status) for r in runs]


def test_a_user_error_in_a_ray_train_worker_ends_the_job_in_one_line(tmp_path, monkeypatch, capsys):
    """Issue 36.8: a data or config error raised in a Ray Train worker reached the user as a `WorkerGroupError`
    traceback. Now the job ends with one line naming the worker and the cause (status 1); a bug keeps its traceback."""
    from ray.train.v2.api.exceptions import WorkerGroupError

    import diffseg.training.ray_train as ray_train
    from diffseg.data.datasets import DataError

    class Failing:
        def __init__(self, error):
            self.error = error

        def fit(self):
            raise self.error

    failure = WorkerGroupError("rank 0 failed", {0: DataError("/data/x/images: no images folder")})
    monkeypatch.setattr(ray_train, "build_trainer", lambda cfg: Failing(failure))
    monkeypatch.setattr(ray_train, "init_ray", lambda *a, **k: None)
    main = _job("train_ddpm").main
    args = [f"output_dir={tmp_path}", "name=w", "scaling.num_workers=2", "tracking.enabled=false"]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 1 and err[-1] == "error: training worker 0: /data/x/images: no images folder", err
    bug = WorkerGroupError("rank 1 failed", {1: ZeroDivisionError("division by zero")})
    monkeypatch.setattr(ray_train, "build_trainer", lambda cfg: Failing(bug))
    with pytest.raises(WorkerGroupError):  # not a user error: the traceback stays
        main(args)
