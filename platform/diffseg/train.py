"""Training both U-Nets on Ray Train (V2): DDP, EMA, bf16, checkpoints every N steps, resume, MLflow from rank 0.

    driver: run(cfg) -> TorchTrainer(train_loop_per_worker, ScalingConfig(num_workers, use_gpu)).fit()
    worker: train_loop_per_worker(config) -> the loop below; rank 0 logs, samples and writes checkpoints

`num_workers=0` is Ray's local mode: the loop runs in this process (seconds to start, no cluster), which is how the
demo and most tests run. Resuming: a worker restarted by `FailureConfig` gets Ray's latest reported checkpoint; a job
re-run with the same `name` resumes from Ray's run snapshot or, failing that, from `<output_dir>/<name>/checkpoint.pt`
(our own export, which every other job reads), so a finished run re-run with more steps continues from its step.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from diffseg.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint, unwrap
from diffseg.config import from_dict, save_config, to_dict
from diffseg.data import DataConfig, build_dataset
from diffseg.diffusion import DiffusionConfig, GaussianDiffusion, sample_timesteps
from diffseg.models import EMA, ModelConfig, build_model
from diffseg.sampling import sample
from diffseg.tracking import Tracker, TrackingConfig, resolve_tracking_uri
from diffseg.viz import sample_grid, save_png


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4  # Adam learning rate (the factorized paper: 1e-4)
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    ema_decay: float = 0.9999  # EMA of the weights used for sampling and segmentation
    batch_size: int = 16  # GLOBAL batch size, split evenly over the workers


@dataclass(frozen=True)
class LoopConfig:
    num_steps: int = 500  # total optimizer steps (a resumed run continues up to this)
    log_every: int = 10  # steps between progress lines and metric logging
    checkpoint_every: int = 100  # steps between checkpoints (reported to Ray Train and exported)
    sample_every: int = 0  # steps between sample grids (0 = only at the end)
    num_samples: int = 8  # images in each sample grid
    sample_steps: int = 50  # DDIM steps for the sample grids
    seed: int = 0  # global seed; rank r uses seed + r for its data order, timesteps and noise
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU
    channels_last: Literal["auto", "on", "off"] = "auto"  # memory format; auto = on for CUDA
    num_data_workers: int = 0  # DataLoader worker processes per training worker


@dataclass(frozen=True)
class ScalingSection:
    num_workers: int = 0  # Ray Train workers; 0 = local mode (in this process, no cluster)
    use_gpu: Literal["auto", "yes", "no"] = "auto"  # auto = yes when the cluster (or this machine) has GPUs
    cpus_per_worker: float = 1.0  # CPUs reserved per worker (fractions leave room for Ray Data)
    max_failures: int = 0  # worker-group restarts Ray Train makes before failing the run


@dataclass(frozen=True)
class TrainConfig:
    name: str = "ddpm-tiny"  # run name: the folder under output_dir; the same name resumes the run
    output_dir: str = "runs"  # where runs live: a local folder or shared storage (s3://...) for clusters
    init_from: str | None = None  # start a NEW run from these weights (e.g. a DDPM's encoder for the factorized net)
    model: ModelConfig = field(default_factory=ModelConfig)  # which network, its size and K
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)  # T and the beta schedule
    data: DataConfig = field(default_factory=DataConfig)  # training images (synthetic by default)
    optim: OptimConfig = field(default_factory=OptimConfig)  # optimizer and EMA
    loop: LoopConfig = field(default_factory=LoopConfig)  # steps, logging, checkpoints, samples
    scaling: ScalingSection = field(default_factory=ScalingSection)  # workers, GPUs, fault tolerance
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # MLflow


def is_remote_path(path: str) -> bool:
    return "://" in path


def storage_path(cfg: TrainConfig) -> str:
    return cfg.output_dir if is_remote_path(cfg.output_dir) else str(Path(cfg.output_dir).resolve())


def run_dir(cfg: TrainConfig) -> Path | None:
    """The run's local folder (None on remote storage, where only Ray's checkpoints are kept)."""
    return None if is_remote_path(cfg.output_dir) else Path(storage_path(cfg)) / cfg.name


# ---------------------------------------------------------------------------------------------------- worker
def _resolve_precision(cfg: LoopConfig, device: torch.device) -> torch.dtype | None:
    if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _infinite(loader: DataLoader, sampler: DistributedSampler | None, epoch: int):
    while True:
        if sampler is not None:
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def _load_resume_state(cfg: TrainConfig) -> tuple[Any, str]:
    """The checkpoint to resume from and where it came from, or (None, reason)."""
    ray_ckpt = ray.train.get_checkpoint()
    if ray_ckpt is not None:
        with ray_ckpt.as_directory() as d:
            return load_checkpoint(Path(d) / CHECKPOINT_NAME), "Ray Train's latest checkpoint"
    local = run_dir(cfg)
    if local is not None and (local / CHECKPOINT_NAME).is_file():
        return load_checkpoint(local / CHECKPOINT_NAME), str(local / CHECKPOINT_NAME)
    return None, "fresh"


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """The training loop each Ray Train worker runs; `config` = {"cfg": TrainConfig as dict, "tracking_uri": str}."""
    cfg = from_dict(TrainConfig, config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if cfg.optim.batch_size % world:
        raise ValueError(f"optim.batch_size {cfg.optim.batch_size} is not divisible by {world} workers")
    local_batch = cfg.optim.batch_size // world
    torch.manual_seed(cfg.loop.seed + rank)

    model = build_model(cfg.model)
    ema = EMA(model, cfg.optim.ema_decay)
    diffusion = GaussianDiffusion.from_config(cfg.diffusion)
    ckpt, source = _load_resume_state(cfg)
    start_step, history, starts, mlflow_run_id = 0, [], [], None
    if ckpt is not None:
        model.load_state_dict(ckpt.model)
        ema.load_state_dict(ckpt.ema or ckpt.model, num_updates=ckpt.step)
        start_step = ckpt.step
        history = list(ckpt.extra.get("loss_history", []))
        starts = list(ckpt.extra.get("starts", []))
        mlflow_run_id = ckpt.extra.get("mlflow_run_id")
    elif cfg.init_from:
        init = load_checkpoint(cfg.init_from)
        missing, unexpected = model.load_state_dict(init.ema or init.model, strict=False)
        ema.load_state_dict(unwrap(model).state_dict(), num_updates=0)
        source = f"weights of {cfg.init_from} ({len(missing)} tensors left at init, {len(unexpected)} unused)"
    starts.append(start_step)  # every (re)start of the loop, kept in the checkpoint: a resume is visible

    use_channels_last = cfg.loop.channels_last == "on" or (cfg.loop.channels_last == "auto" and device.type == "cuda")
    memory_format = torch.channels_last if use_channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    ema.model.to(device, memory_format=memory_format)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        fused=device.type == "cuda",  # one kernel per step on GPU
    )
    if ckpt is not None and ckpt.optimizer is not None:
        optimizer.load_state_dict(ckpt.optimizer)
    model = ray.train.torch.prepare_model(model, move_to_device=False)  # DDP when world > 1
    autocast_dtype = _resolve_precision(cfg.loop, device)

    dataset = build_dataset(cfg.data, split="train")
    if len(dataset) < cfg.optim.batch_size:
        raise ValueError(f"the training set has {len(dataset)} images, fewer than one batch ({cfg.optim.batch_size})")
    sampler = (
        DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.loop.seed)
        if world > 1
        else None
    )
    loader = DataLoader(
        dataset,
        batch_size=local_batch,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=True,
        num_workers=cfg.loop.num_data_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.loop.seed + start_step) if sampler is None else None,
    )
    batches = _infinite(loader, sampler, epoch=start_step // max(len(loader), 1))
    # Timesteps and noise come from a generator seeded by (seed, rank, start step): a resumed run is reproducible.
    gen = torch.Generator(device=device).manual_seed((cfg.loop.seed * 1_000_003 + rank) * 1_000_003 + start_step)

    tracker = None
    if rank == 0:
        tracker = Tracker(cfg.tracking, cfg.name, run_id=mlflow_run_id, tracking_uri=config.get("tracking_uri"))
        if mlflow_run_id is None:
            tracker.log_params(to_dict(cfg))
            tracker.set_tags({"diffseg.model": cfg.model.kind, "diffseg.world_size": world})
        print(
            f"[train] {cfg.name}: {cfg.model.kind}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
            f"{world} worker(s) on {device}, global batch {cfg.optim.batch_size}, "
            f"steps {start_step}->{cfg.loop.num_steps} (from {source})",
            flush=True,
        )

    def checkpoint_and_report(step: int, metrics: dict[str, float], final: bool = False) -> None:
        ray_ckpt = None
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                extra = {
                    "loss_history": history,
                    "starts": starts,
                    "mlflow_run_id": tracker.run_id if tracker else None,
                }
                path = save_checkpoint(
                    Path(tmp) / CHECKPOINT_NAME,
                    config=cfg,
                    model=model,
                    ema=ema.model,
                    optimizer=optimizer,
                    step=step,
                    extra=extra,
                )
                local = run_dir(cfg)
                if local is not None:  # the export every other job reads; atomic, so never torn
                    save_checkpoint(local / CHECKPOINT_NAME, config=cfg, model=model, ema=ema.model,
                                    optimizer=optimizer, step=step, extra=extra)  # fmt: skip
                ray_ckpt = ray.train.Checkpoint.from_directory(str(path.parent))
            # Every rank reports the same number of times: report is a barrier.
            ray.train.report({**metrics, "step": step}, checkpoint=ray_ckpt)

    def write_samples(step: int) -> None:
        gens = [
            torch.Generator(device=device).manual_seed(cfg.loop.seed * 10_000 + i) for i in range(cfg.loop.num_samples)
        ]
        images, masks = sample(
            ema.model, diffusion, cfg.loop.num_samples, steps=cfg.loop.sample_steps, generator=gens, device=device
        )
        local = run_dir(cfg) or Path(tempfile.mkdtemp())
        path = save_png(sample_grid(images, masks), local / "samples" / f"step_{step:07d}.png")
        if tracker:
            tracker.log_artifact(path, "samples")
        print(f"[train] samples -> {path}", flush=True)

    model.train()
    step = start_step
    t0, images_seen, loss_sum, loss_count = time.perf_counter(), 0, torch.zeros((), device=device), 0
    last_metrics: dict[str, float] = {}
    while step < cfg.loop.num_steps:
        batch = next(batches)
        x0 = batch["image"].to(device, non_blocking=True).to(memory_format=memory_format)  # (B, C, H, W)
        y = batch["label"].to(device) if cfg.model.unet.num_classes is not None else None
        t = sample_timesteps(x0.shape[0], diffusion.num_timesteps, gen, device)  # (B,)
        noise = torch.randn(x0.shape, generator=gen, device=device)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            losses = diffusion.training_losses(model, x0, t, noise, model_kwargs={"y": y} if y is not None else None)
        loss = losses["loss"].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        ema.update(unwrap(model))
        step += 1
        images_seen += x0.shape[0] * world
        loss_sum += loss.detach()  # no host sync in the step; read at log time
        loss_count += 1

        if step % cfg.loop.log_every == 0 or step == cfg.loop.num_steps:
            if world > 1:
                dist.all_reduce(loss_sum)
                loss_sum /= world
            mean_loss = loss_sum.item() / loss_count
            if not math.isfinite(mean_loss):
                raise FloatingPointError(
                    f"non-finite training loss ({mean_loss}) at step {step} of run {cfg.name!r}: lower optim.lr, "
                    f"check the data for NaNs, or set loop.precision=fp32"
                )
            elapsed = time.perf_counter() - t0
            ips = images_seen / elapsed
            history.append([step, mean_loss])
            last_metrics = {"train/loss": mean_loss, "train/images_per_s": ips}
            if rank == 0:
                left = (cfg.loop.num_steps - step) * cfg.optim.batch_size / max(ips, 1e-9)
                print(
                    f"[train] step {step}/{cfg.loop.num_steps} loss {mean_loss:.4f} {ips:.1f} img/s "
                    f"left {time.strftime('%H:%M:%S', time.gmtime(left))}",
                    flush=True,
                )
                tracker.log_metrics(last_metrics, step)
            t0, images_seen, loss_sum, loss_count = time.perf_counter(), 0, torch.zeros((), device=device), 0

        if rank == 0 and cfg.loop.sample_every and step % cfg.loop.sample_every == 0 and step < cfg.loop.num_steps:
            write_samples(step)
        if step % cfg.loop.checkpoint_every == 0 or step == cfg.loop.num_steps:
            checkpoint_and_report(step, last_metrics)

    if start_step >= cfg.loop.num_steps:  # nothing left to train: still report, so the run has a result
        checkpoint_and_report(step, last_metrics)
    if rank != 0:
        return None
    write_samples(step)
    local = run_dir(cfg)
    if local is not None:
        tracker.log_artifact(local / CHECKPOINT_NAME, "checkpoint")
    tracker.finish()
    return {
        "step": step,
        "loss_history": history,
        "starts": starts,
        "checkpoint": str(local / CHECKPOINT_NAME) if local else None,
        "mlflow_run_id": tracker.run_id,
        "world_size": world,
    }


# ---------------------------------------------------------------------------------------------------- driver
def _use_gpu(cfg: ScalingSection) -> bool:
    if cfg.use_gpu != "auto":
        return cfg.use_gpu == "yes"
    if cfg.num_workers > 0 and ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) > 0
    return torch.cuda.is_available()


def code_runtime_env() -> dict[str, Any]:
    """Ship the diffseg package to every worker (`py_modules`), so a cluster needs no install of it.

    Local directories can only be shipped at the job level (`ray.init`); inside `ray job submit` Ray merges this
    with the job's own runtime env (its working_dir, env_vars).
    """
    import diffseg

    return {"py_modules": [str(Path(diffseg.__file__).parent)]}


def build_trainer(cfg: TrainConfig) -> ray.train.torch.TorchTrainer:
    use_gpu = _use_gpu(cfg.scaling)
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    return ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "tracking_uri": resolve_tracking_uri(cfg.tracking.uri)},
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
        ),
    )


def run(cfg: TrainConfig) -> ray.train.Result:
    """Train as `cfg` says; the job body of jobs/train_ddpm.py and jobs/train_factorized.py."""
    if cfg.scaling.num_workers > 0 and not ray.is_initialized():
        # Honours RAY_ADDRESS (set by `ray job submit`); else starts a local cluster.
        ray.init(runtime_env=code_runtime_env())
    local = run_dir(cfg)
    if local is not None:
        save_config(cfg, local / "config.yaml")
    result = build_trainer(cfg).fit()
    out = result.return_value or {}
    if local is not None:
        print(f"[train] done at step {out.get('step')}: checkpoint {local / CHECKPOINT_NAME}")
        print(f"[train] samples    {local / 'samples'}")
        print(f"[train] config     {local / 'config.yaml'}")
    if cfg.tracking.enabled:
        print(f"[train] MLflow     {resolve_tracking_uri(cfg.tracking.uri)} (run {out.get('mlflow_run_id')})")
    return result


def main(argv: list[str] | None = None, default_config: str | None = None, **defaults: Any) -> ray.train.Result:
    from diffseg.config import parse_job_args

    cfg, _ = parse_job_args(TrainConfig, argv, description=__doc__.splitlines()[0], default_config=default_config)
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    return run(cfg)
