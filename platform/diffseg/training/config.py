"""The config of a training run (`TrainConfig`: model, diffusion, data, optimiser, loop, mask diagnostics, scaling,
tracking), where its files live (`run_uri`), and which changes a resumed run may make (`check_resume`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from diffseg.core.config import (
    ConfigError,
    InputPath,
    Name,
    OutputPath,
    check_name,
    job_dir,
    staging_dir,
    to_dict,
)
from diffseg.core.storage import fetch_file, is_remote
from diffseg.core.tracking import TrackingConfig, flatten
from diffseg.data.datasets import DataConfig, check_labelled
from diffseg.models.builder import ModelConfig
from diffseg.models.checkpoint import CHECKPOINT_NAME, Checkpoint, load_checkpoint
from diffseg.models.diffusion import DiffusionConfig


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4  # Adam learning rate (the factorized paper: 1e-4), at lr_reference_batch when lr_scaling is set
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"  # how the lr follows the batch: none = lr as given; linear
    # = lr * batch / lr_reference_batch; sqrt = lr * sqrt(batch / lr_reference_batch) (Adam's usual rule)
    lr_reference_batch: int = 128  # the batch `lr` is stated for when lr_scaling is set (the factorized paper: 128)
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 0.0  # max global gradient norm; 0 = no clipping (ADM and the factorized paper do not clip)
    ema_decay: float = 0.9999  # EMA of the weights used for sampling and segmentation
    batch_size: int = 16  # GLOBAL batch size, split evenly over the workers
    mask_lr_scale: float = 1.0  # factorized: the mask generator's learning rate as a multiple of lr (1 = the paper)
    mask_weight_decay: float | None = None  # factorized: the mask generator's own AdamW weight decay (None = as
    # weight_decay): a decayed mask generator is pulled toward small logits, i.e. soft masks that have not committed

    @property
    def batch_lr(self) -> float:
        """The learning rate at this batch size (`lr_scaling`)."""
        if self.lr_scaling == "none":
            return self.lr
        ratio = self.batch_size / self.lr_reference_batch
        return self.lr * (ratio if self.lr_scaling == "linear" else ratio**0.5)


@dataclass(frozen=True)
class LoopConfig:
    num_steps: int = 500  # total optimizer steps (a resumed run continues up to this)
    log_every: int = 10  # steps between progress lines and metric logging
    checkpoint_every: int = 100  # steps between checkpoints (reported to Ray Train and exported)
    sample_every: int = 0  # steps between sample grids (0 = only at the end; a fresh run also samples at step 0)
    num_samples: int = 8  # images in each sample grid (0 = no sample grids)
    sample_steps: int = 50  # DDIM steps for the sample grids
    seed: int = 0  # global seed: the initial weights; rank r uses seed + r for its data order, timesteps and noise
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU
    channels_last: Literal["auto", "on", "off"] = "auto"  # memory format; auto = on for CUDA
    num_data_workers: int = 0  # DataLoader worker processes per training worker (data_on_device off)
    data_on_device: Literal["auto", "on", "off"] = "auto"  # the training split decoded once into a uint8 tensor on
    # the device, batches drawn and augmented there (`diffseg.data.device_data`: no per-item Python, no host sync);
    # auto = when it fits (2 GiB) and no image-class labels are needed; off = a DataLoader of items
    compile: bool = False  # torch.compile the network in place (`nn.Module.compile`): pays on a GPU for long runs;
    # the first steps then include the compile time (the GPU sprint measures both)
    eval_every: int = 0  # steps between validations on held-out images (`eval`): factorized mask diagnostics and
    # held-out eps-MSE, DDPM held-out eps-MSE (val/...); 0 = never
    max_minutes: float = 0.0  # stop (final checkpoint, samples, diagnostics) after this much training; 0 = no limit


@dataclass(frozen=True)
class MaskEvalConfig:
    """Validation during training (`loop.eval_every`): held-out images (and, factorized, their masks, used ONLY to
    score the masks); a DDPM run is validated by its held-out denoising loss."""

    data: DataConfig | None = None  # images with masks; None = the training data's held-out split (data.num_test)
    split: Literal["train", "test", "all"] = "test"  # which split of `data`
    num_images: int = 32  # the first N images of the split
    num_figure_images: int = 8  # factorized: held-out images in the val/masks figure logged at every validation
    protocol: Literal["foreground", "multiclass"] = "foreground"  # fg IoU (binary gt) or Hungarian mIoU (classes)
    t: int = 30  # noise level of the segmentation pass
    seed: int = 0  # noise seed (image i has its own generator: paired across runs)


@dataclass(frozen=True)
class ScalingSection:
    num_workers: int = 0  # Ray Train workers; 0 = local mode (in this process, no cluster)
    use_gpu: Literal["auto", "yes", "no"] = "auto"  # auto = yes when the cluster (or this machine) has GPUs
    cpus_per_worker: float = 1.0  # CPUs reserved per worker (fractions leave room for Ray Data)
    max_failures: int = 0  # worker-group restarts Ray Train makes before failing the run


@dataclass(frozen=True)
class TrainConfig:
    name: Name = "ddpm-tiny"  # run name: the folder under output_dir; the same name resumes the run
    output_dir: OutputPath = "runs"  # where runs live: a local folder or shared storage (s3://...) for clusters
    init_from: InputPath | None = None  # start a NEW run from these weights (e.g. the encoder of a DDPM)
    model: ModelConfig = field(default_factory=ModelConfig)  # which network, its size and K
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)  # T and the beta schedule
    data: DataConfig = field(default_factory=DataConfig)  # training images (synthetic by default)
    optim: OptimConfig = field(default_factory=OptimConfig)  # optimizer and EMA
    loop: LoopConfig = field(default_factory=LoopConfig)  # steps, logging, checkpoints, samples
    scaling: ScalingSection = field(default_factory=ScalingSection)  # workers, GPUs, fault tolerance
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # MLflow
    eval: MaskEvalConfig = field(default_factory=MaskEvalConfig)  # validation on held-out data (loop.eval_every)

    def check(self) -> None:
        """Cross-field checks (run by --dry-run and by `fit`)."""
        if self.data.image_size != self.model.unet.image_size:
            raise ValueError(
                f"data.image_size ({self.data.image_size}) != model.unet.image_size ({self.model.unet.image_size}): "
                "the network would train on one size and sample another; set both"
            )
        if self.loop.eval_every and self.eval.data is None and self.eval.split == "test" and self.data.num_test < 2:
            raise ValueError(
                f"loop.eval_every={self.loop.eval_every} validates on held-out images, but data.num_test is "
                f"{self.data.num_test}: set data.num_test (>= 2; the images after data.num_train), or eval.data / "
                "eval.split"
            )
        if self.loop.eval_every and self.model.kind == "factorized":  # mask diagnostics score masks
            try:
                check_labelled(*((self.eval.data, "eval.data") if self.eval.data is not None else (self.data, "data")))
            except ValueError as e:
                raise ValueError(
                    f"{e}: loop.eval_every={self.loop.eval_every} scores the masks on them (set loop.eval_every=0, or "
                    "eval.data to a labelled set)"
                ) from None
        if self.loop.num_samples < 0:
            raise ValueError(f"loop.num_samples: {self.loop.num_samples} < 0 (0 = no sample grids)")
        workers = max(1, self.scaling.num_workers)
        if self.optim.batch_size % workers:
            raise ValueError(f"optim.batch_size {self.optim.batch_size} is not divisible by {workers} workers")


def storage_path(cfg: TrainConfig) -> str:
    return cfg.output_dir if is_remote(cfg.output_dir) else str(Path(cfg.output_dir).resolve())


def run_dir(cfg: TrainConfig) -> Path | None:
    """The run's local folder; None on remote storage (`run_uri` then names it)."""
    return None if is_remote(cfg.output_dir) else job_dir(storage_path(cfg), cfg.name)


def run_uri(cfg: TrainConfig, *parts: str) -> str:
    """A file of the run, local path or URI: `<output_dir>/<name>/<parts...>`."""
    local = run_dir(cfg)
    if local is not None:
        return str(local.joinpath(*parts))
    return "/".join([cfg.output_dir.rstrip("/"), check_name(cfg.name), *parts])


def load_run_checkpoint(cfg: TrainConfig) -> Checkpoint | None:
    """The run's exported checkpoint (`<output_dir>/<name>/checkpoint.pt`, local or remote), or None."""
    uri = run_uri(cfg, CHECKPOINT_NAME)
    if not is_remote(uri):  # read in place: errors name the real file
        return load_checkpoint(uri) if Path(uri).is_file() else None
    with staging_dir(uri) as tmp:
        local = Path(tmp) / CHECKPOINT_NAME
        return load_checkpoint(local, source=uri) if fetch_file(uri, local) else None


RESUME_FREE = ("loop.", "scaling.", "tracking.", "eval.", "name", "output_dir", "init_from", "data.cache")

RESUME_REAPPLIED = ("optim.",)  # re-applied to the restored optimizer (its moments are kept)


def _same_location(old: Any, new: Any) -> bool:
    """Equal, or a relative path saved by an older version that the new absolute one ends with (`../d` ~ `/x/d`)."""
    if old == new:
        return True
    if isinstance(old, str) and isinstance(new, str) and old and not os.path.isabs(old) and os.path.isabs(new):
        tail = os.path.normpath(old).lstrip("./")
        return bool(tail) and os.path.normpath(new).endswith(os.sep + tail)
    return False


def resume_changes(cfg: TrainConfig, saved: dict[str, Any]) -> dict[str, list[str]]:
    """How `cfg` differs from the config a checkpoint was trained with: {"refused", "reapplied", "free"} lists of
    `key: old -> new`. Keys the saved config lacks (added since) count as their defaults; retired keys are ignored."""
    new = flatten(to_dict(cfg))
    defaults = flatten(to_dict(TrainConfig()))
    old = {**defaults, **{k: v for k, v in flatten(saved).items() if k in defaults}}
    out: dict[str, list[str]] = {"refused": [], "reapplied": [], "free": []}
    for key in new:
        a, b = old.get(key), new[key]
        if isinstance(a, tuple):
            a = list(a)
        if a == b or (key.endswith((".root", "init_from")) and _same_location(a, b)):
            continue
        kind = (
            "free" if key.startswith(RESUME_FREE)
            else "reapplied" if key.startswith(RESUME_REAPPLIED)
            else "refused"
        )  # fmt: skip
        out[kind].append(f"{key}: {a!r} -> {b!r}")
    return out


def check_resume(cfg: TrainConfig, saved: dict[str, Any], where: str) -> dict[str, list[str]]:
    """Refuse to resume a run whose architecture, diffusion process or data differ from its checkpoint's (ConfigError
    naming every such key); return the changes that are allowed (see `resume_changes`)."""
    changes = resume_changes(cfg, saved)
    if changes["refused"]:
        raise ConfigError(
            f"run {cfg.name!r} ({where}) was trained with another architecture, diffusion process or data set: "
            f"{'; '.join(changes['refused'])}. Its weights cannot continue under these; start a new run (another "
            f"name=...), or pass init_from={where} with a new name to begin from its weights. (loop.*, scaling.* "
            "and optim.* may change when resuming.)"
        )
    return changes
