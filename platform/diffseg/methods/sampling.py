"""Generating images (and, with the factorized model, their masks) from a trained network.

Image i of a run seeded `seed` draws all its noise from `diffseg.core.runtime.image_generators(seed, [i])`, so the same
seed gives the same images from `jobs/sample.py`, from the training loop's sample grids and from `POST /v1/sample`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import nn

from diffseg.core.config import Name, OutputPath
from diffseg.core.runtime import image_generators
from diffseg.core.tracking import Tracker, TrackingConfig, start_job
from diffseg.core.viz import refinement_strip, sample_grid, save_png, to_uint8
from diffseg.models.checkpoint import checkpoint_of, load_diffusion_model
from diffseg.models.diffusion import GaussianDiffusion
from diffseg.models.factorized import FactorizedUNet

log = logging.getLogger(__name__)


class _MaskRecorder(nn.Module):
    """Wraps a factorized model so the sampler sees eps while the masks of the latest call are kept."""

    def __init__(self, model: FactorizedUNet):
        super().__init__()
        self.model, self.masks = model, None

    def forward(self, x, t, **kwargs):
        eps, masks, _ = self.model.forward_with_masks(x, t, **kwargs)
        self.masks = masks
        return eps


def sample_progressive(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    num_images: int,
    *,
    method: Literal["ddpm", "ddim"] = "ddim",
    steps: int | None = 50,
    eta: float = 0.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    device: torch.device | str = "cpu",
    y: torch.Tensor | None = None,
    image_size: int | None = None,
    in_channels: int | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield {"t", "model_t", "sample", "pred_xstart", "masks" (factorized only)} after every sampling step.

    `steps` respaces the process (DDIM-50, or DDPM with fewer steps); None keeps all T steps. "t" is the index in the
    (respaced) process, "model_t" the original timestep the network saw (what a figure should be labelled with).
    """
    cfg = model.cfg
    shape = (num_images, in_channels or cfg.in_channels, image_size or cfg.image_size, image_size or cfg.image_size)
    process = diffusion.respace(steps) if steps and steps < diffusion.num_timesteps else diffusion
    net = _MaskRecorder(model) if isinstance(model, FactorizedUNet) else model
    kwargs = {"model_kwargs": {"y": y} if y is not None else None, "generator": generator, "device": device}
    if method == "ddim":
        loop = process.ddim_sample_loop_progressive(net, shape, eta=eta, **kwargs)
    elif method == "ddpm":
        loop = process.p_sample_loop_progressive(net, shape, **kwargs)
    else:
        raise ValueError(f"unknown sampling method {method!r}; expected 'ddpm' or 'ddim'")
    for out in loop:
        out = {**out, "model_t": process.model_timesteps(out["t"])}
        if isinstance(net, _MaskRecorder):
            out["masks"] = net.masks
        yield out


@torch.no_grad()
def sample(
    model: nn.Module, diffusion: GaussianDiffusion, num_images: int, **kwargs
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """-> (images (N, C, H, W) in [-1, 1], masks (N, K, H, W) or None).

    For the factorized model the masks are those of the last denoising step, where x_t is nearly the clean image,
    so image and masks come out aligned and together.
    """
    *_, last = sample_progressive(model, diffusion, num_images, **kwargs)
    return last["sample"].clamp(-1, 1), last.get("masks")


@torch.no_grad()
def generate(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    num_images: int,
    *,
    record_every: int = 0,
    **kwargs,
) -> dict[str, Any]:
    """Images and (factorized model) masks together, plus an optional record of the refinement.

    `kwargs` are those of `sample_progressive` (method "ddpm" | "ddim", steps, eta, generator, device, y).
    With `record_every` = N > 0, the state after every N-th step (and the last) is kept on the CPU: the per-step
    refinement strip of the paper.

    :returns: {"images": (N, C, H, W) in [-1, 1], "masks": (N, K, H, W) or None, "labels": (N, H, W) or None,
        "y": class labels or None, "trajectory": [{"step", "t" (original timestep), "sample", "pred_xstart",
        "masks"}]}.
    """
    if record_every < 0:
        raise ValueError(f"record_every must be >= 0, got {record_every}")
    trajectory, last = [], None
    for i, out in enumerate(sample_progressive(model, diffusion, num_images, **kwargs)):
        last = out
        if record_every and (i + 1) % record_every == 0:
            trajectory.append(_record(i, out))
    if last is None:
        raise ValueError("the sampler made no step")
    if record_every and (not trajectory or trajectory[-1]["step"] != i):
        trajectory.append(_record(i, last))
    masks = last.get("masks")
    masks = masks.float() if masks is not None else None
    return {
        "images": last["sample"].clamp(-1, 1),
        "masks": masks,
        "labels": masks.argmax(dim=1) if masks is not None else None,
        "y": kwargs.get("y"),
        "trajectory": trajectory,
    }


def _record(step: int, out: dict[str, torch.Tensor]) -> dict[str, Any]:
    masks = out.get("masks")
    return {
        "step": step,
        "t": int(out["model_t"][0]),
        "sample": out["sample"].cpu(),  # as the sampler holds it (figures clip)
        "pred_xstart": out["pred_xstart"].clamp(-1, 1).cpu(),
        "masks": masks.float().cpu() if masks is not None else None,
    }


# ---------------------------------------------------------------------------------------------------- the job
@dataclass(frozen=True)
class SampleJobConfig:
    name: Name = "sample"  # output folder under output_dir
    output_dir: OutputPath = "runs/sample"  # where grids and images go
    checkpoint: Annotated[str, checkpoint_of()] = ""  # a trained model (factorized: images AND masks; DDPM: images)
    method: Literal["ddpm", "ddim"] = "ddim"  # ancestral DDPM or deterministic DDIM (eta 0)
    steps: int = 50  # sampling steps (respaced); 0 = all T steps (DDPM as trained)
    eta: float = 0.0  # DDIM noise (0 = deterministic)
    num_images: int = 16  # images to generate
    batch_size: int = 16  # images per sampling batch
    seed: int = 0  # image i draws its noise from its own generator (seed, i): batching does not change it, and
    # POST /v1/sample {"seed": seed} gives the same first images
    class_label: int | None = None  # class-conditional models: this class for all; None = cycle through classes
    record_every: int = 0  # refinement strip: keep every N-th step (0 = about 10 columns)
    strip_images: int = 4  # images shown in the refinement strip
    use_ema: bool = True  # EMA weights
    device: str = "auto"  # torch device: auto (cuda when visible), cpu, cuda, cuda:1
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # MLflow: the run, its grid and strip

    def check(self) -> None:
        """Cross-field checks (run by --dry-run and before the job)."""
        if not self.checkpoint:
            raise ValueError("checkpoint: the model to sample from is required")
        if self.num_images < 1 or self.batch_size < 1:
            raise ValueError(f"num_images ({self.num_images}) and batch_size ({self.batch_size}) must be >= 1")


def run_sample_job(cfg: SampleJobConfig) -> dict[str, Any]:
    """Generate images (and masks): grid.png (image | masks | overlay), images/, masks/, strip.png, sample.json."""
    if not cfg.checkpoint:
        raise ValueError("checkpoint: the model to sample from is required")
    out, tracker = start_job(cfg)
    with tracker:
        return _sample(cfg, out, tracker)


def _sample(cfg: SampleJobConfig, out: Path, tracker: Tracker) -> dict[str, Any]:
    loaded = load_diffusion_model(cfg.checkpoint, cfg.device, cfg.use_ema)
    tracker.set_tags({"diffseg.checkpoint": cfg.checkpoint, "diffseg.checkpoint_step": loaded.step})
    model, diffusion, device = loaded.model, loaded.diffusion, loaded.device
    num_steps = cfg.steps or diffusion.num_timesteps
    record_every = cfg.record_every or max(1, num_steps // 10)
    num_classes = model.cfg.num_classes
    images, masks, ys, strip, t0 = [], [], [], None, time.perf_counter()
    for start in range(0, cfg.num_images, cfg.batch_size):
        idx = list(range(start, min(start + cfg.batch_size, cfg.num_images)))
        y = None
        if num_classes is not None:
            y = torch.tensor([cfg.class_label if cfg.class_label is not None else i % num_classes for i in idx])
            y = y.to(device)
        res = generate(
            model, diffusion, len(idx), method=cfg.method, steps=cfg.steps or None, eta=cfg.eta,
            generator=image_generators(cfg.seed, idx), device=device, y=y,
            record_every=record_every if start == 0 else 0,
        )  # fmt: skip
        images.append(res["images"].cpu())
        masks.append(res["masks"].cpu() if res["masks"] is not None else None)
        ys += y.tolist() if y is not None else []
        if start == 0:
            strip = refinement_strip(res["trajectory"], cfg.strip_images)
    seconds = time.perf_counter() - t0
    images_t = torch.cat(images)
    masks_t = torch.cat(masks) if masks[0] is not None else None
    grid = sample_grid(images_t, masks_t)
    save_png(grid, out / "grid.png")
    save_png(strip, out / "strip.png")
    tracker.log_image(grid, "samples", loaded.step)  # by the model's training step
    tracker.log_image(strip, "samples/refinement", loaded.step)
    (out / "images").mkdir(exist_ok=True)
    for i, img in enumerate(to_uint8(images_t)):
        Image.fromarray(img).save(out / "images" / f"{i:05d}.png")
    if masks_t is not None:
        (out / "masks").mkdir(exist_ok=True)
        for i, lab in enumerate(masks_t.argmax(1).numpy().astype(np.uint8)):
            Image.fromarray(lab, mode="L").save(out / "masks" / f"{i:05d}.png")
    meta = {
        "num_images": cfg.num_images, "method": cfg.method, "steps": num_steps, "record_every": record_every,
        "K": int(masks_t.shape[1]) if masks_t is not None else None, "class_labels": ys, "seconds": seconds,
        "checkpoint_step": loaded.step,
    }  # fmt: skip
    (out / "sample.json").write_text(json.dumps(meta, indent=1))
    tracker.log_metrics({"sample/images": cfg.num_images, "sample/seconds": seconds})
    for name in ("sample.json", "grid.png", "strip.png"):
        tracker.log_artifact(out / name)
    log.info(f"[sample] {cfg.num_images} images ({cfg.method}, {num_steps} steps) in {seconds:.1f}s -> "
             f"{out}/grid.png, {out}/strip.png")  # fmt: skip
    return {"out_dir": str(out), "images": images_t, "masks": masks_t, **meta}
