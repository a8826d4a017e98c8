"""Training both U-Nets on Ray Train (V2): DDP, EMA, bf16, checkpoints every N steps, resume, MLflow from rank 0.

    driver: run(cfg) -> TorchTrainer(train_loop_per_worker, ScalingConfig(num_workers, use_gpu)).fit()
    worker: train_loop_per_worker(config) -> diffseg.training.loop.fit(cfg, RayTrainContext())

The loop itself (model, EMA, optimizer, autocast, clipping, the non-finite check, checkpoint contents) is plain
PyTorch in `diffseg.training.loop`; this module is the Ray adapter: the worker context (rank, device, DDP, Ray's latest
checkpoint, `ray.train.report`) and the trainer. `num_workers=0` is Ray's local mode: the loop runs in this process
(seconds to start, no cluster), which is how the demo and most tests run. Resuming: a worker restarted by
`FailureConfig` gets Ray's latest reported checkpoint; a job re-run with the same `name` resumes from Ray's run
snapshot or, failing that, from `<output_dir>/<name>/checkpoint.pt` (our own export, which every other job reads), so
a finished run re-run with more steps continues from its step.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import yaml
from torch import nn

from diffseg.core.cli import resume_hint
from diffseg.core.config import UserError, from_dict, resolve_paths, save_config, staging_dir, to_dict
from diffseg.core.provenance import git_dirty, git_sha, source_tags
from diffseg.core.registry import end_runs_named
from diffseg.core.runtime import decide_gpu, init_ray, setup_logging
from diffseg.core.storage import exists, put_file, read_text
from diffseg.core.tracking import resolve_tracking_uri, status_for
from diffseg.models.checkpoint import CHECKPOINT_NAME, Checkpoint, load_checkpoint
from diffseg.training.config import (  # noqa: F401  (the configs are part of this module's API)
    LoopConfig,
    OptimConfig,
    ScalingSection,
    TrainConfig,
    check_resume,
    load_run_checkpoint,
    run_dir,
    run_uri,
    storage_path,
)
from diffseg.training.loop import fit

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- worker
class RayTrainContext:
    """`diffseg.training.loop.WorkerContext` on a Ray Train worker."""

    def __init__(self):
        ctx = ray.train.get_context()
        self.world_rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def latest_checkpoint(self) -> Checkpoint | None:
        ray_ckpt = ray.train.get_checkpoint()
        if ray_ckpt is None:
            return None
        with ray_ckpt.as_directory() as d:
            return load_checkpoint(Path(d) / CHECKPOINT_NAME)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return ray.train.torch.prepare_model(model, move_to_device=False)  # DDP when world > 1

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
        ray.train.report(metrics, checkpoint=ckpt)


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """What each Ray Train worker runs; `config` = {"cfg": TrainConfig as dict (every path absolute), "tracking_uri",
    "git_commit", "git_dirty", "source"}."""
    setup_logging()  # a worker process shows the loop's progress lines in its log
    cfg = from_dict(TrainConfig, config["cfg"])
    return fit(
        cfg,
        RayTrainContext(),
        tracking_uri=config.get("tracking_uri"),
        git_commit=config.get("git_commit"),
        git_dirty=config.get("git_dirty"),
        run_tags=config.get("source"),
    )


# ---------------------------------------------------------------------------------------------------- driver
def _use_gpu(cfg: ScalingSection) -> bool:
    """`scaling.use_gpu` by the one rule (`diffseg.core.runtime.decide_gpu`, printed); local mode asks this process."""
    return decide_gpu(cfg.use_gpu, "train", cluster=cfg.num_workers > 0).use_gpu


class _Trainer(ray.train.torch.TorchTrainer):
    """Ray's TorchTrainer with our Ctrl-C. Ray's `fit()` installs a SIGINT handler that aborts the run's controller:
    the workers stop, but `fit()` then raises `ActorDiedError`, so a Ctrl-C'd multi-worker job exited 1 and ended
    its run FAILED. Here Ctrl-C aborts the controller the same way and raises KeyboardInterrupt (exit 130, KILLED).
    A second Ctrl-C while the abort runs interrupts at once."""

    def _register_sigint_handler(self, controller) -> None:  # Ray's hook (ray/train/v2/api/data_parallel_trainer.py)
        def on_sigint(signum, frame):
            signal.signal(signal.SIGINT, signal.default_int_handler)  # the next Ctrl-C is an ordinary one
            log.info("[train] Ctrl-C: stopping the workers (the last checkpoint they saved is kept)")
            try:
                ray.get(controller.abort.remote(), timeout=60)
            except Exception:  # the controller exits inside abort (its actor dies): that is the stop
                pass
            raise KeyboardInterrupt("Ctrl-C")

        signal.signal(signal.SIGINT, on_sigint)


def build_trainer(cfg: TrainConfig) -> ray.train.torch.TorchTrainer:
    """The TorchTrainer of a run; `cfg`'s paths must be absolute already (`run` resolves them)."""
    use_gpu = _use_gpu(cfg.scaling)
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    return _Trainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": to_dict(cfg),
            "tracking_uri": resolve_tracking_uri(cfg.tracking.uri),
            # The driver knows the commit; workers run shipped copies of the code, outside any git checkout.
            "git_commit": git_sha(),
            "git_dirty": git_dirty(),
            "source": source_tags(),  # the user and job file: a worker's own __main__ is Ray's
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=use_gpu,
            resources_per_worker=resources if cfg.scaling.num_workers > 0 else None,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=storage_path(cfg),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
            # Ray Train's own INFO lines on the console ("Requesting resources", "Attempting to start training worker
            # group", "Setting up process group", ...: per run, nothing to act on) from WARNING up; its system log
            # files under the Ray session keep every level.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )


def check_previous_run(cfg: TrainConfig) -> None:
    """Refuse, here in the driver and before anything is overwritten, to continue a run whose checkpoint was trained
    with another architecture or data (the run's config.yaml says which; the workers check the checkpoint itself)."""
    if not exists(run_uri(cfg, CHECKPOINT_NAME)):
        return
    if exists(run_uri(cfg, "config.yaml")):
        saved = yaml.safe_load(read_text(run_uri(cfg, "config.yaml"))) or {}
    else:  # a run started without this driver (diffseg.training.loop.fit): its checkpoint holds the config
        saved = load_run_checkpoint(cfg).config
    check_resume(cfg, saved, run_uri(cfg, CHECKPOINT_NAME))


def worker_user_error(e: BaseException) -> UserError | None:
    """The user error (a config, a data file, a checkpoint) that made Ray Train's worker group fail, as one line
    naming the worker; None for anything else (a bug keeps its traceback). Ray wraps a worker's exception in a
    `WorkerGroupError` whose `worker_failures` hold it (a `RayTaskError` that is also an instance of its cause)."""
    failures = getattr(e, "worker_failures", None)
    if not isinstance(failures, dict):
        return None
    for rank in sorted(failures):
        err: BaseException | None = failures[rank]
        while err is not None:
            if isinstance(err, UserError):
                inner = getattr(err, "cause", None)  # RayTaskError: the worker's own exception, without Ray's text
                text = str(inner if isinstance(inner, UserError) else err).strip().splitlines()
                return UserError(f"training worker {rank}: {text[0] if text else type(err).__name__}")
            err = getattr(err, "cause", None) or err.__cause__
    return None


def stopped_workers_message(cfg: TrainConfig) -> str:
    """An interrupted Ray Train run: the checkpoint its workers saved last (they stop where they are: the steps since
    it are lost; `loop.checkpoint_every` bounds them) and the command that resumes it."""
    how = resume_hint()
    try:
        step = load_run_checkpoint(cfg).step
    except Exception:  # none yet (or unreadable): the run starts again from its beginning
        return f"before the workers saved a checkpoint{how}"
    return f"with the workers' last checkpoint at step {step} ({run_uri(cfg, CHECKPOINT_NAME)}){how}"


def run(cfg: TrainConfig) -> ray.train.Result:
    """Train as `cfg` says; the job body of jobs/train_ddpm.py and jobs/train_factorized.py.

    Paths are resolved here, in the driver (Ray Train workers run in another directory): a relative output_dir,
    data root, init_from or SQLite tracking URI means the same folder as it does in this process."""
    cfg = resolve_paths(cfg)
    check_previous_run(cfg)
    if cfg.scaling.num_workers > 0:  # local mode (0 workers) runs in this process without a cluster
        init_ray()
    with staging_dir(run_uri(cfg, "config.yaml")) as tmp:
        put_file(save_config(cfg, Path(tmp) / "config.yaml"), run_uri(cfg, "config.yaml"))
    sigint = signal.getsignal(signal.SIGINT)
    try:
        result = build_trainer(cfg).fit()
    except BaseException as e:  # a worker that died (out of memory, a lost node) cannot end its run: the driver does
        if isinstance(e, KeyboardInterrupt) and cfg.scaling.num_workers > 0:  # the workers' last checkpoint stays
            e.args = (f"{str(e) or 'Ctrl-C'} {stopped_workers_message(cfg)}",)
        why = f"training stopped: {type(e).__name__}: {str(e)[:300]}"
        try:
            end_runs_named(cfg.tracking, cfg.name, status_for(e), why, resolve_tracking_uri(cfg.tracking.uri))
        except Exception as mlflow_error:  # the store itself may be what failed: the training error comes first
            log.warning("could not end the MLflow run of %s: %s", cfg.name, mlflow_error)
        cause = worker_user_error(e)
        if cause is not None:  # a user error in a worker ends the job in one line, as it does without Ray
            raise cause from None
        raise
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, sigint)  # Ray's fit() leaves its handler (ours) installed
    out = result.return_value or {}
    log.info(f"[train] done at step {out.get('step')}: checkpoint {run_uri(cfg, CHECKPOINT_NAME)}")
    log.info(f"[train] samples    {run_uri(cfg, 'samples')}")
    log.info(f"[train] config     {run_uri(cfg, 'config.yaml')}")
    if cfg.tracking.enabled:
        log.info(f"[train] MLflow     {resolve_tracking_uri(cfg.tracking.uri)} (run {out.get('mlflow_run_id')})")
    return result
