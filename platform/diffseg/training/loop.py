"""The training loop in plain PyTorch: configs, the train state, one training step, and the loop around it.

    build_train_state(cfg, device)  -> TrainState (model, EMA, optimizer, diffusion, precision, step, history)
    train_step(state, batch, gen)   -> loss (one optimizer step: autocast forward, backward, clip, AdamW, EMA)
    fit(cfg, ctx)                   -> the whole run: resume, data, steps, progress, MLflow, samples, checkpoints

Nothing here imports Ray. What the loop needs from whatever runs it (rank, world size, device, the latest
checkpoint the framework kept, DDP wrapping, reporting a checkpoint) is a `WorkerContext`: `LocalContext` runs the
loop in this process (a GPU box without Ray, a benchmark, a notebook), and `diffseg.training.ray_train.RayTrainContext`
is the thin adapter that Ray Train's `train_loop_per_worker` uses. Runs resume from `<output_dir>/<name>/checkpoint.pt`,
so a run started one way can be continued the other.

Re-running a name with a changed config (`check_resume`): `loop.*`, `scaling.*`, `tracking.*`, `eval.*` and where
things live (`output_dir`, `init_from`, `data.cache`) may change; `optim.*` changes are re-applied to the restored
optimizer (its moments are kept); any other change (the architecture `model.*`, the process `diffusion.*`, the data
`data.*`) is refused with a message naming the keys, since the checkpoint's weights belong to the old ones.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from diffseg.core.cli import resume_hint
from diffseg.core.config import staging_dir
from diffseg.core.runtime import Progress, format_duration, image_generators, resolve_device
from diffseg.core.storage import put_file
from diffseg.core.tracking import Tracker, status_for
from diffseg.core.viz import sample_grid, save_png
from diffseg.methods.sampling import sample
from diffseg.methods.segment import heldout_eps_mse, mask_diagnostics, segment_images
from diffseg.models.builder import EMA, build_model
from diffseg.models.checkpoint import CHECKPOINT_NAME, Checkpoint, load_checkpoint, unwrap
from diffseg.models.diffusion import GaussianDiffusion
from diffseg.serving.pyfunc import log_checkpoint_model, model_name
from diffseg.training.batches import build_batches, build_eval_set
from diffseg.training.config import LoopConfig, TrainConfig, check_resume, load_run_checkpoint, run_uri
from diffseg.training.mask_levers import MaskLevers, param_groups, restore_optimizer
from diffseg.training.state import TrainState

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- context
class WorkerContext(Protocol):
    """What the loop needs from whatever runs it."""

    world_rank: int
    world_size: int
    device: torch.device

    def latest_checkpoint(self) -> Checkpoint | None:
        """The latest checkpoint the framework kept for this run (a restarted worker resumes from it)."""

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Wrap for data parallelism (DDP) when there is more than one worker; the model is already on `device`."""

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        """Hand a checkpoint folder (rank 0; None elsewhere) to the framework; every rank calls it (a barrier)."""


class LocalContext:
    """One process, no Ray: the loop on this machine's GPU (or CPU). The run-folder export is the checkpoint."""

    world_rank = 0
    world_size = 1

    def __init__(self, device: torch.device | str | None = None):
        self.device = resolve_device(device)

    def latest_checkpoint(self) -> Checkpoint | None:
        return None

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        pass


# ---------------------------------------------------------------------------------------------------- state
def resolve_precision(cfg: LoopConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 when asked, or on CUDA with `auto`; None = fp32."""
    if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def build_train_state(
    cfg: TrainConfig,
    device: torch.device | str,
    resume: Checkpoint | None = None,
    prepare_model=None,
) -> tuple[TrainState, str]:
    """A fresh (or resumed, or `init_from`-initialised) train state on `device`; returns (state, where from).

    The initial weights come from `loop.seed` alone, so every rank (and a 1-worker run) starts from the same network.
    `prepare_model` wraps the network after it is on the device (DDP); identity by default.
    """
    device = torch.device(device)
    torch.manual_seed(cfg.loop.seed)
    model = build_model(cfg.model)
    ema = EMA(model, cfg.optim.ema_decay)
    state_kw: dict[str, Any] = {}
    source = "fresh"
    if resume is not None:
        model.load_state_dict(resume.model)
        ema.load_state_dict(resume.ema or resume.model, num_updates=resume.step)
        state_kw = {
            "step": resume.step,
            "history": list(resume.extra.get("loss_history", [])),
            "starts": list(resume.extra.get("starts", [])),
            "mlflow_run_id": resume.extra.get("mlflow_run_id"),
            "evals": list(resume.extra.get("mask_diagnostics", [])),
            "restart_steps": list(resume.extra.get("mask_restarts", [])),
            "train_seconds": float(resume.extra.get("train_seconds", 0.0)),
        }
        source = f"step {resume.step}"
    elif cfg.init_from:
        init = load_checkpoint(cfg.init_from)
        missing, unexpected = model.load_state_dict(init.ema or init.model, strict=False)
        ema.load_state_dict(model.state_dict(), num_updates=0)
        source = f"weights of {cfg.init_from} ({len(missing)} tensors left at init, {len(unexpected)} unused)"

    use_channels_last = cfg.loop.channels_last == "on" or (cfg.loop.channels_last == "auto" and device.type == "cuda")
    memory_format = torch.channels_last if use_channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    ema.model.to(device, memory_format=memory_format)
    if cfg.loop.compile:  # in place: the state dict keeps its names (checkpoints, EMA, DDP are unchanged)
        model.compile()
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.optim),
        lr=cfg.optim.batch_lr,
        weight_decay=cfg.optim.weight_decay,
        fused=device.type == "cuda",  # one kernel per step on GPU
    )
    if resume is not None and resume.optimizer is not None:
        restore_optimizer(optimizer, model, resume, fused=device.type == "cuda")
    if prepare_model is not None:
        model = prepare_model(model)
    state = TrainState(
        cfg=cfg,
        model=model,
        ema=ema,
        optimizer=optimizer,
        diffusion=GaussianDiffusion.from_config(cfg.diffusion),
        device=device,
        memory_format=memory_format,
        autocast_dtype=resolve_precision(cfg.loop, device),
        levers=MaskLevers(cfg),
        **state_kw,
    )
    return state, source


def train_step(state: TrainState, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
    """One optimizer step on one (local) batch; returns the detached mean loss (no host sync: read it when logging).

    Timesteps and noise come from `generator` (on the state's device), so a run is reproducible from its seeds.
    """
    cfg, device = state.cfg, state.device
    x0 = batch["image"].to(device, non_blocking=True).to(memory_format=state.memory_format)  # (B, C, H, W)
    y = None
    if cfg.model.unet.num_classes is not None:  # class-conditional: the data set must give a class per image
        if "label" not in batch:
            raise ValueError(
                f"model.unet.num_classes={cfg.model.unet.num_classes} but data {cfg.data.name!r} gives no 'label' "
                "per image: unset num_classes or use a data set with image labels"
            )
        y = batch["label"].to(device)  # (B,)
    levers = state.levers  # the factorized mask generator's research levers (`MaskLevers`; inert otherwise)
    t = levers.timesteps(x0.shape[0], state.diffusion.num_timesteps, generator, device)  # (B,)
    noise = torch.randn(x0.shape, generator=generator, device=device)  # (B, C, H, W)
    model_kwargs: dict[str, Any] = {"y": y} if y is not None else {}
    model_kwargs.update(levers.model_kwargs(state.step))  # a warm-up's mask mode
    if "fixed_masks" in batch:  # the oracle experiment: given masks instead of the mask generator's
        model_kwargs["masks"] = batch["fixed_masks"].to(device, non_blocking=True)  # (B, K, H, W)
    dtype = state.autocast_dtype
    wants_masks = levers.wants_masks  # priors or restarts read the masks of the same forward pass
    seen: dict[str, torch.Tensor] = {}

    def model_with_masks(x_t: torch.Tensor, ts: torch.Tensor, **kw) -> torch.Tensor:
        eps, seen["masks"] = state.model(x_t, ts, return_masks=True, **kw)  # one pass: eps and its masks
        return eps

    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        model = model_with_masks if wants_masks else state.model
        losses = state.diffusion.training_losses(model, x0, t, noise, model_kwargs=model_kwargs or None)
    loss = losses["loss"].mean()
    if wants_masks:
        loss = loss + levers.prior_loss(seen["masks"])
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.optim.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.optim.grad_clip)
    state.optimizer.step()
    state.ema.update(unwrap(state.model))
    state.step += 1
    if wants_masks:
        levers.after_step(state, seen["masks"].detach())
    return loss.detach()


def check_finite(loss: float, step: int, name: str) -> None:
    """Stop the run on a non-finite loss, with a message that says what to try."""
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"non-finite training loss ({loss}) at step {step} of run {name!r}: lower optim.lr, "
            f"check the data for NaNs, or set loop.precision=fp32"
        )


def step_generator(cfg: TrainConfig, rank: int, start_step: int, device: torch.device) -> torch.Generator:
    """Timesteps and noise: seeded by (seed, rank, start step), so a resumed run is reproducible."""
    seed = (cfg.loop.seed * 1_000_003 + rank) * 1_000_003 + start_step
    return torch.Generator(device=device).manual_seed(seed)


def resume_state(cfg: TrainConfig, ctx: WorkerContext) -> tuple[TrainState, str, dict[str, list[str]] | None]:
    """The state to train from -> (state, where it came from, the config changes `check_resume` allowed).

    The context's latest checkpoint, else `<output_dir>/<name>/checkpoint.pt` (a local folder or a URI), else a
    fresh model; a resumed state records the step it restarted at in `state.starts`."""
    resume, source = ctx.latest_checkpoint(), "the framework's latest checkpoint"
    if resume is None:
        resume, source = load_run_checkpoint(cfg), run_uri(cfg, CHECKPOINT_NAME)
    changes = check_resume(cfg, resume.config, run_uri(cfg, CHECKPOINT_NAME)) if resume is not None else None
    state, built_from = build_train_state(cfg, ctx.device, resume, prepare_model=ctx.prepare_model)
    source = f"{built_from} of {source}" if resume is not None else built_from
    state.starts.append(state.step)
    return state, source, changes


def start_run(
    cfg: TrainConfig,
    state: TrainState,
    world: int,
    device: torch.device,
    source: str,
    changes: dict[str, list[str]] | None,
    *,
    tracking_uri: str | None,
    git_commit: str | None,
    git_dirty: bool | None,
    run_tags: dict[str, str] | None = None,
) -> Tracker:
    """Rank 0: the MLflow run (continued when the state has one; a new one gets the config (the keys that differ from
    the defaults as params, the resolved config as config.yaml, also where the run folder is remote), tags
    (`run_tags`: the driver's user and job file) and the training data as its dataset input) and the log line that
    says what is trained, where, and from what."""
    start_step = state.step
    tracker = Tracker(cfg.tracking, cfg.name, run_id=state.mlflow_run_id, tracking_uri=tracking_uri)
    if state.mlflow_run_id is None:
        # only the parameters of the model kind that runs
        tracker.log_config(cfg, drop=() if cfg.model.kind == "factorized" else ("model.factorized",))
        tags = {"diffseg.model": cfg.model.kind, "diffseg.world_size": world}
        if git_commit:
            tags["mlflow.source.git.commit"] = git_commit
        if git_dirty is not None:
            tags["diffseg.git_dirty"] = str(git_dirty).lower()
        tracker.set_tags({**tags, **(run_tags or {})})
        tracker.log_data_input(cfg.data, context="training")
    state.mlflow_run_id = tracker.run_id
    if changes and (changes["reapplied"] or changes["free"]):
        log.info(f"[train] resuming with a changed config: {'; '.join(changes['reapplied'] + changes['free'])}")
    num_params = sum(p.numel() for p in state.model.parameters())
    log.info(
        f"[train] {cfg.name}: {cfg.model.kind}, {num_params / 1e6:.2f}M params, {world} worker(s) on {device}, "
        f"global batch {cfg.optim.batch_size} (lr {cfg.optim.batch_lr:.3g}), steps {start_step}->{cfg.loop.num_steps} "
        f"(from {source})"
    )
    return tracker


def time_box_reached(cfg: TrainConfig, started: float, world: int, device: torch.device) -> bool:
    """`loop.max_minutes` used up; with several workers every rank must stop at the same step, so they agree (the
    caller asks at log steps only)."""
    over = time.perf_counter() - started > 60 * cfg.loop.max_minutes
    if world > 1 and dist.is_available() and dist.is_initialized():
        flag = torch.tensor(float(over), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        over = bool(flag.item())
    return over


def log_window(
    cfg: TrainConfig,
    state: TrainState,
    tracker: Tracker | None,
    rank: int,
    world: int,
    step: int,
    loss_sum: torch.Tensor,
    loss_count: int,
    images_seen: int,
    t0: float,
    progress: Progress | None = None,
    start_step: int = 0,
) -> dict[str, float]:
    """The steps since the last log step -> their metrics (mean loss over the workers, images/s): checked finite,
    kept in `state.history`, logged by rank 0 with the ETA of `progress` (a smoothed rate over the steps since
    `start_step`: steady under load) and, on a terminal, its bar."""
    if world > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(loss_sum)
        loss_sum /= world
    mean_loss = loss_sum.item() / loss_count
    check_finite(mean_loss, step, cfg.name)
    ips = images_seen / (time.perf_counter() - t0)
    state.history.append([step, mean_loss])
    metrics = {"train/loss": mean_loss, "train/images_per_s": ips}
    if rank == 0:
        if progress is None:
            progress = Progress(cfg.loop.num_steps - start_step, "steps", clock=time.perf_counter)
        progress.update(step - start_step)  # the ETA from a smoothed rate: steady under load
        left = progress.eta_s() or 0.0
        bar = progress.bar_text()  # on a terminal only
        log.info(
            f"[train] step {step}/{cfg.loop.num_steps} loss {mean_loss:.4f} {ips:.1f} img/s "
            f"left {format_duration(left)}" + (f" {bar}" if bar else "")
        )
        tracker.log_metrics(metrics, step)
    return metrics


def checkpoint_and_report(
    cfg: TrainConfig,
    ctx: WorkerContext,
    state: TrainState,
    tracker: Tracker | None,
    metrics: dict[str, float],
    final: bool,
) -> None:
    """Every rank reports to its context; rank 0 writes the checkpoint first (and, when final, logs it to MLflow)."""
    rank = ctx.world_rank
    # rank 0 stages the checkpoint beside the run's export (never a full-size copy in the system temp folder)
    with staging_dir(run_uri(cfg, CHECKPOINT_NAME)) if rank == 0 else contextlib.nullcontext() as tmp:
        ckpt_dir = None
        if rank == 0:
            path = state.save(Path(tmp) / CHECKPOINT_NAME)
            put_file(path, run_uri(cfg, CHECKPOINT_NAME))  # the export every other job reads; never torn
            if final and tracker.enabled:  # the final checkpoint, also on remote storage, and the model in
                t_log = time.perf_counter()  # MLflow (registered as tracking.register_as when set)
                log.info("[train] MLflow: logging the final checkpoint and the model (MLflow first loads it and "
                         "predicts on its input example) ...")  # fmt: skip
                tracker.log_artifact(path, "checkpoint")
                log_checkpoint_model(tracker, path, name=model_name(cfg.name), t=cfg.eval.t)
                log.info(f"[train] MLflow: checkpoint and model logged in {time.perf_counter() - t_log:.1f} s")
            ckpt_dir = path.parent
        ctx.report({**metrics, "step": state.step}, ckpt_dir)


def run_diagnostics(cfg: TrainConfig, state: TrainState, eval_set: dict[str, Any], tracker: Tracker) -> None:
    """Rank 0, on the held-out images: a DDPM's denoising loss; a factorized model's masks (EMA and raw weights)."""
    if cfg.model.kind != "factorized":  # DDPM: the held-out denoising loss of the EMA weights
        m = heldout_eps_mse(state.ema.model, state.diffusion, eval_set["image"], seed=cfg.eval.seed)
        state.evals.append({"step": state.step, **m})
        tracker.log_metrics(m, state.step)
        log.info(f"[train] eval step {state.step}: eps_mse {m['val/eps_mse']:.4f} (EMA, held out)")
        return
    data = (state.diffusion, eval_set["image"], eval_set["mask"], cfg.eval.protocol, eval_set["num_classes"])
    m = mask_diagnostics(state.ema.model, *data, t=cfg.eval.t, seed=cfg.eval.seed)
    raw = mask_diagnostics(  # the raw weights: their masks only (no held-out eps-MSE)
        unwrap(state.model), *data, t=cfg.eval.t, seed=cfg.eval.seed, mse_timesteps=(), prefix="val_raw"
    )
    m.update(raw)
    state.evals.append({"step": state.step, **m})
    tracker.log_metrics(m, state.step)
    log_mask_figure(cfg, state, eval_set, tracker)
    score = next(k for k in m if k.endswith(("fg_iou", "hungarian_miou")))
    log.info(
        f"[train] eval step {state.step}: {score.split('/')[1]} {m[score]:.3f} "
        f"mask_dependence {m['val/mask_dependence']:.3f} band {m['val/mask_band']:.3f} "
        f"eps_mse {m['val/eps_mse']:.4f} (EMA); raw "
        f"{raw[score.replace('val/', 'val_raw/')]:.3f} / {raw['val_raw/mask_dependence']:.3f}"
    )


def log_mask_figure(cfg: TrainConfig, state: TrainState, eval_set: dict[str, Any], tracker: Tracker) -> None:
    """Rank 0, factorized: the held-out images' masks (image | masks | overlay) under `val/masks`, by step."""
    if n := min(cfg.eval.num_figure_images, len(eval_set["image"])):
        images = eval_set["image"][:n]
        gens = image_generators(cfg.eval.seed, range(n))  # the diagnostics' noise for these images
        masks = segment_images(state.ema.model, state.diffusion, images, t=cfg.eval.t, generator=gens)["masks"]
        tracker.log_image(sample_grid(images, masks.cpu()), "val/masks", state.step)


def log_step0_images(
    cfg: TrainConfig, state: TrainState, tracker: Tracker, eval_set: dict[str, Any] | None, device: torch.device
) -> None:
    """Rank 0, a fresh run: its image charts at step 0 (the model before training: a sample grid, the held-out masks).
    MLflow's image chart opens at step 0 and stays there (only a key logged at a single step opens at that step, and
    a resume adds steps): a key logged at later steps only opened on "No image logged at this step" (issue 37)."""
    write_samples(cfg, state, tracker, device)
    if eval_set is not None and cfg.model.kind == "factorized":
        log_mask_figure(cfg, state, eval_set, tracker)


def write_samples(
    cfg: TrainConfig, state: TrainState, tracker: Tracker, device: torch.device, final: bool = False
) -> None:
    """Rank 0: a grid of samples (with masks from a factorized model) under samples/ and in MLflow, by step; none
    when `loop.num_samples` is 0. The final grid (a slow tail step) gets a line before and after."""
    n = cfg.loop.num_samples
    if n == 0:  # no sample grids asked for
        return
    t_samples = time.perf_counter()
    if final:
        log.info(f"[train] final samples: {n} images, {cfg.loop.sample_steps} DDIM steps ...")
    gens = image_generators(cfg.loop.seed, range(n))  # the grid's images are jobs/sample.py's for this seed
    images, masks = sample(
        state.ema.model, state.diffusion, n, steps=cfg.loop.sample_steps, generator=gens, device=device
    )
    name = f"step_{state.step:07d}.png"
    with staging_dir(run_uri(cfg, "samples", name)) as tmp:
        grid = sample_grid(images, masks)
        path = save_png(grid, Path(tmp) / name)
        put_file(path, run_uri(cfg, "samples", name))
        tracker.log_artifact(path, "samples")
    tracker.log_image(grid, "samples", state.step)  # a step-slider image chart in the MLflow UI
    log.info(f"[train] samples -> {run_uri(cfg, 'samples', name)} ({time.perf_counter() - t_samples:.1f} s)")


def _rate(since: tuple[float, float, int] | None, end: tuple[float, float], step: int, batch: int, clock: int):
    """Images per second of clock `clock` (0 wall, 1 CPU) from `since` (wall, cpu, step) to `end` (wall, cpu) at
    `step`; None when no step ran after the first window."""
    if since is None or step <= since[2] or end[clock] <= since[clock]:
        return None
    return (step - since[2]) * batch / (end[clock] - since[clock])


def fit(
    cfg: TrainConfig,
    ctx: WorkerContext | None = None,
    *,
    tracking_uri: str | None = None,
    git_commit: str | None = None,
    git_dirty: bool | None = None,
    run_tags: dict[str, str] | None = None,
) -> dict[str, Any] | None:
    """Train as `cfg` says on one worker of `ctx` (default: this process); rank 0 returns a summary, others None.

    Resumes from the context's latest checkpoint, else from `<output_dir>/<name>/checkpoint.pt` (a local folder or a
    URI), after `check_resume` (a changed architecture or data set is refused; optim.* is re-applied). Rank 0 logs
    progress and MLflow (`tracking_uri`; `git_commit`, `git_dirty` and `run_tags` (the driver's user and job file) are
    tagged on new runs, and the training data is the run's dataset input), writes sample grids
    (`samples/`) and exports every checkpoint there.

    The steps: `resume_state`, `start_run` (rank 0; a fresh run then logs `log_step0_images`), then one `train_step`
    per batch; at log steps `log_window` and `time_box_reached`, at their intervals `write_samples`, `run_diagnostics`
    and `checkpoint_and_report`; rank 0 ends with a last sample grid and the summary.
    """
    cfg.check()
    ctx = ctx or LocalContext()
    rank, world, device = ctx.world_rank, ctx.world_size, ctx.device
    state, source, changes = resume_state(cfg, ctx)
    start_step = state.step
    torch.manual_seed(cfg.loop.seed + rank)  # anything unseeded below (dropout) differs per rank
    batches = build_batches(cfg, rank, world, start_step, device)
    gen = step_generator(cfg, rank, start_step, device)

    eval_set = build_eval_set(cfg) if rank == 0 else None
    tracker = None
    if rank == 0:
        tracker = start_run(
            cfg, state, world, device, source, changes,
            tracking_uri=tracking_uri, git_commit=git_commit, git_dirty=git_dirty, run_tags=run_tags,
        )  # fmt: skip

    try:
        if rank == 0 and start_step == 0 and tracker is not None and tracker.enabled:  # for MLflow's image charts
            log_step0_images(cfg, state, tracker, eval_set, device)
        state.model.train()
        t0, images_seen, loss_sum, loss_count = time.perf_counter(), 0, torch.zeros((), device=device), 0
        started = clock = time.perf_counter()  # clock: the start of the time not yet in state.train_seconds
        progress = Progress(cfg.loop.num_steps - start_step, "steps", clock=time.perf_counter)
        metrics: dict[str, float] = {}
        stopped_early = False
        steady: tuple[float, float, int] | None = None  # (wall, process CPU time, step)
        loop_end = (time.perf_counter(), time.process_time())
        while state.step < cfg.loop.num_steps:
            batch = next(batches)
            loss_sum += train_step(state, batch, gen)
            images_seen += batch["image"].shape[0] * world
            loss_count += 1
            step = state.step
            last = step >= cfg.loop.num_steps
            if cfg.loop.max_minutes > 0 and not last and (world == 1 or step % cfg.loop.log_every == 0):
                stopped_early = last = time_box_reached(cfg, started, world, device)

            if step % cfg.loop.log_every == 0 or last:
                metrics = log_window(
                    cfg, state, tracker, rank, world, step, loss_sum, loss_count, images_seen, t0, progress, start_step
                )
                t0, images_seen, loss_sum, loss_count = time.perf_counter(), 0, torch.zeros((), device=device), 0
                if steady is None:  # after the first window (allocations, compilation): the steady rate's start
                    steady = (t0, time.process_time(), step)
                loop_end = (t0, time.process_time())  # the last window's end (its loss read: the device caught up)

            if rank == 0 and cfg.loop.sample_every and step % cfg.loop.sample_every == 0 and not last:
                write_samples(cfg, state, tracker, device)
            if eval_set is not None and (step % cfg.loop.eval_every == 0 or last):
                run_diagnostics(cfg, state, eval_set, tracker)
            if step % cfg.loop.checkpoint_every == 0 or last:
                state.train_seconds, clock = state.train_seconds + time.perf_counter() - clock, time.perf_counter()
                checkpoint_and_report(cfg, ctx, state, tracker, metrics, final=last)
            if last:
                break

        if stopped_early and rank == 0:
            log.info(f"[train] loop.max_minutes={cfg.loop.max_minutes} reached: stopped at step {state.step}")
        if start_step >= cfg.loop.num_steps:  # nothing left to train: still report, so the run has a result
            checkpoint_and_report(cfg, ctx, state, tracker, metrics, final=True)
        if rank != 0:
            return None
        write_samples(cfg, state, tracker, device, final=True)
        tracker.finish()
        return {
            "step": state.step,
            "loss_history": state.history,
            "starts": state.starts,
            "checkpoint": run_uri(cfg, CHECKPOINT_NAME),
            "mlflow_run_id": tracker.run_id,
            "world_size": world,
            "mask_diagnostics": state.evals,
            "stopped_early": stopped_early,
            "train_seconds": time.perf_counter() - started,
            # the loop's rate after its first log window, checkpoints and diagnostics included (bench/loop_speed.py),
            # per wall second and per second of this process's CPU time (steadier on a shared CPU)
            "steady_images_per_s": _rate(steady, loop_end, state.step, cfg.optim.batch_size, 0),
            "steady_images_per_cpu_s": _rate(steady, loop_end, state.step, cfg.optim.batch_size, 1),
        }
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt) and rank == 0 and world == 1:  # Ctrl-C / SIGTERM: keep what was trained
            e.args = (f"{str(e) or 'Ctrl-C'} {interrupted_message(cfg, ctx, state, tracker, start_step)}",)
        if tracker is not None:  # FAILED, or KILLED for an interrupt; a restarted worker (or a re-run) sets it
            tracker.finish(status_for(e))  # RUNNING again
        raise


def interrupted_message(
    cfg: TrainConfig, ctx: WorkerContext, state: TrainState, tracker: Tracker | None, start_step: int
) -> str:
    """An interrupted run (one worker): its steps since the last checkpoint saved, and what to type to go on."""
    how = resume_hint()
    if state.step <= start_step:
        return f"at step {state.step}, before a step of this run ended: nothing new to save{how}"
    try:
        checkpoint_and_report(cfg, ctx, state, tracker, {}, final=False)
    except Exception as err:  # the interrupt is what the user must hear about; the save's failure goes with it
        return f"at step {state.step}: the checkpoint could not be saved ({err}); the last saved one resumes it{how}"
    return f"at step {state.step}: saved {run_uri(cfg, CHECKPOINT_NAME)}{how}"
