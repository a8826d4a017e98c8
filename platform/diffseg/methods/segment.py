"""Segmenting real images with a trained factorized model: noise to a small t, one forward pass, read the masks.

    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps        (t = 30 of T = 1000 by default, as in the paper)
    masks = softmax mask generator of the model at (x_t, t)   -> K soft masks (B, K, h, w), summing to 1
    labels = argmax_k masks

Images of another size than the model's go through the one resize policy (`diffseg.data.datasets.resize_images` in,
`resize_probs` out), so masks come back at the input resolution, from this module and from Serve alike. The noise is
explicit: a generator per call, or per image (`diffseg.core.runtime.image_generators(seed, ids)`) so an image's masks do
not depend on the batch it was segmented in. `FactorizedSegmenter` is the model as a
`diffseg.scoring.segmenter.Segmenter`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from PIL import Image

from diffseg.core.config import Name, OutputPath
from diffseg.core.runtime import image_generators
from diffseg.core.tracking import Tracker, TrackingConfig, start_job
from diffseg.core.viz import colorize, grid, overlay, save_png, to_uint8
from diffseg.data.datasets import DataConfig, build_dataset, resize_images, resize_probs
from diffseg.models.checkpoint import checkpoint_of, load_diffusion_model
from diffseg.models.diffusion import GaussianDiffusion, randn
from diffseg.models.factorized import FactorizedUNet
from diffseg.models.integrity import CheckpointError
from diffseg.scoring.metrics import foreground_scores
from diffseg.scoring.regions import hungarian_miou, mask_band_share, mask_image_dependence
from diffseg.scoring.segmenter import Segmentation, default_seeds, segment_dataset

log = logging.getLogger(__name__)


@torch.no_grad()
def segment_images(
    model: FactorizedUNet,
    diffusion: GaussianDiffusion,
    images: torch.Tensor,
    t: int = 30,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    y: torch.Tensor | None = None,
    output_size: tuple[int, int] | None = None,
    seed: int | None = None,
) -> dict[str, torch.Tensor]:
    """K soft masks and the argmax map of real images.

    :param images: (B, C, H, W) in [-1, 1]; resized to the model's resolution by the one policy if they differ.
    :param t: the noise level (the paper uses t=30 of T=1000): x_t = q_sample(x_0, t, eps).
    :param generator: one generator (or one per image) for eps; fixed seeds give repeatable masks.
    :param seed: shorthand for `generator=torch.Generator().manual_seed(seed)` (ignored when a generator is given).
    :param y: class labels (B,) for a class-conditional model.
    :param output_size: (H, W) of the returned masks; default the input's size.
    :returns: {"masks": (B, K, H, W) float32 summing to 1 over K, "labels": (B, H, W) long}.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    if not 0 <= t < diffusion.num_timesteps:
        raise ValueError(f"t={t} is outside [0, {diffusion.num_timesteps})")
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    x0 = resize_images(images, model.cfg.image_size).to(device)  # (B, C, S, S)
    tt = torch.full((x0.shape[0],), t, device=device, dtype=torch.long)
    noise = randn(x0.shape, generator, "cpu").to(device)  # drawn on the CPU: the same masks on any device
    x_t = diffusion.q_sample(x0, tt, noise)
    _, masks, _ = model.forward_with_masks(x_t, tt, y.to(device) if y is not None else None)  # (B, K, S, S)
    masks = resize_probs(masks.float(), tuple(output_size or images.shape[-2:]))  # (B, K, H, W)
    return {"masks": masks, "labels": masks.argmax(dim=1)}


class FactorizedSegmenter:
    """The factorized model as a `Segmenter`: K unsupervised regions from one forward pass at noise level `t`."""

    kind = "regions"

    def __init__(
        self,
        model: FactorizedUNet,
        diffusion: GaussianDiffusion,
        t: int = 30,
        class_label: int | None = None,
        *,
        step: int | None = None,
        source: str = "",
    ):
        if not isinstance(model, FactorizedUNet):
            raise ValueError(f"a {type(model).__name__} has no masks: segmenting needs a factorized model")
        if model.cfg.num_classes is not None and class_label is None:
            raise ValueError("this model is class-conditional: set class_label")
        self.model, self.diffusion, self.t, self.class_label = model, diffusion, t, class_label
        self.step, self.source = step, source  # the checkpoint's training step and where it came from
        self.class_names = [f"region {k}" for k in range(model.num_components)]
        self.image_size = model.cfg.image_size

    @classmethod
    def load(
        cls, source: str, device: str = "auto", use_ema: bool = True, t: int = 30, class_label: int | None = None,
        *, allow_unverified: bool = False,
    ) -> FactorizedSegmenter:  # fmt: skip
        loaded = load_diffusion_model(source, device, use_ema, allow_unverified=allow_unverified)
        if not isinstance(loaded.model, FactorizedUNet):
            kind = type(loaded.model).__name__
            raise CheckpointError(
                f"{source}: a DDPM ({kind}) checkpoint cannot segment: segmenting needs a factorized model "
                "(model.kind=factorized; a DDPM's features segment through the pixel ensemble, docs/label-efficient.md)"
            )
        return cls(loaded.model, loaded.diffusion, t, class_label, step=loaded.step, source=str(source))

    def segment(self, images: torch.Tensor, seeds: Sequence[int] | None = None, t: int | None = None) -> Segmentation:
        gens = [torch.Generator().manual_seed(s) for s in default_seeds(len(images), seeds)]
        y = torch.full((len(images),), self.class_label, dtype=torch.long) if self.class_label is not None else None
        out = segment_images(self.model, self.diffusion, images, t=self.t if t is None else t, generator=gens, y=y)
        return Segmentation(labels=out["labels"].cpu(), probs=out["masks"].cpu())


@torch.no_grad()
def mask_diagnostics(
    model: FactorizedUNet,
    diffusion: GaussianDiffusion,
    images: torch.Tensor,
    gt: torch.Tensor,
    protocol: Literal["foreground", "multiclass"] = "foreground",
    num_classes: int = 2,
    t: int = 30,
    seed: int = 0,
    mse_timesteps: Sequence[int] = (30, 100, 300, 600, 900),
    batch_size: int = 32,
    prefix: str = "val",
) -> dict[str, float]:
    """How well a factorized model's masks segment held-out images, and whether they depend on the image at all.

    Returns `{prefix}/fg_iou` (foreground protocol: IEM/ReDO per-image polarity, K regions reduced by best_single,
    which covers every union for K <= 3) or `{prefix}/hungarian_miou` (multiclass, pooled over the images),
    `{prefix}/mask_dependence` (`regions.mask_image_dependence` of the soft masks: 0 for a fixed split),
    `{prefix}/mask_band` (`regions.mask_band_share`: 1 for horizontal bands, which dependence cannot tell from
    objects when the bands move from image to image) and the
    held-out denoising loss `{prefix}/eps_mse` (mean over `mse_timesteps`, also per t as `{prefix}/eps_mse_t<t>`),
    with image i's noise from its own generator, so two models are scored on the same (paired) noise.

    :param images: (N, 3, H, W) in [-1, 1], at the model's size. :param gt: (N, H, W) class indices (255 ignored).
    """
    was_training = model.training
    model.eval()
    try:
        masks = []
        for i in range(0, len(images), batch_size):
            idx = range(i, min(i + batch_size, len(images)))
            gens = image_generators(seed, idx)
            masks.append(segment_images(model, diffusion, images[i : idx.stop], t=t, generator=gens)["masks"].cpu())
        soft = torch.cat(masks)  # (N, K, H, W)
    finally:
        model.train(was_training)
    out: dict[str, float] = {}
    gt_np = gt.cpu().numpy()
    if protocol == "foreground":
        out[f"{prefix}/fg_iou"] = foreground_scores(soft, gt_np, "best_single").iou
    else:
        labels = soft.argmax(dim=1).numpy()
        out[f"{prefix}/hungarian_miou"] = hungarian_miou(labels, gt_np, soft.shape[1], num_classes).miou
    out[f"{prefix}/mask_dependence"] = mask_image_dependence(soft)
    out[f"{prefix}/mask_band"] = mask_band_share(soft)  # 1 = horizontal bands (the collapse), gt horses ~0.5
    out.update(heldout_eps_mse(model, diffusion, images, seed, mse_timesteps, batch_size, prefix))
    return out


@torch.no_grad()
def heldout_eps_mse(
    model: torch.nn.Module,
    diffusion: GaussianDiffusion,
    images: torch.Tensor,
    seed: int = 0,
    timesteps: Sequence[int] = (30, 100, 300, 600, 900),
    batch_size: int = 32,
    prefix: str = "val",
) -> dict[str, float]:
    """The denoising loss on held-out images: `{prefix}/eps_mse` (mean over `timesteps`) and `{prefix}/eps_mse_t<t>`,
    image i's noise at t drawn from `image_generators(seed + 1 + t, [i])` (paired across models and runs). Any
    eps-predicting network (DDPM or factorized); {} for no timesteps. The validation metric of a DDPM run."""
    if not timesteps:
        return {}
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        sq: dict[int, list[torch.Tensor]] = {tt: [] for tt in timesteps}
        for i in range(0, len(images), batch_size):
            idx = range(i, min(i + batch_size, len(images)))
            x0 = images[i : idx.stop]
            for tt in timesteps:
                noise = randn(x0.shape, image_generators(seed + 1 + tt, idx), "cpu")  # (n, 3, H, W)
                steps = torch.full((x0.shape[0],), tt, dtype=torch.long)
                x_t = diffusion.q_sample(x0, steps, noise)
                eps = model(x_t.to(device), steps.to(device)).float().cpu()[:, : noise.shape[1]]  # learned sigma: eps
                sq[tt].append(((eps - noise) ** 2).mean(dim=(1, 2, 3)))
    finally:
        model.train(was_training)
    per_t = {tt: float(torch.cat(v).mean()) for tt, v in sq.items()}
    return {
        f"{prefix}/eps_mse": float(np.mean(list(per_t.values()))),
        **{f"{prefix}/eps_mse_t{tt}": v for tt, v in per_t.items()},
    }


# ---------------------------------------------------------------------------------------------------- the job
@dataclass(frozen=True)
class SegmentJobConfig:
    name: Name = "segment"  # output folder under output_dir
    output_dir: OutputPath = "runs/segment"  # where masks and overlays go
    checkpoint: Annotated[str, checkpoint_of("factorized", needed_by="segmenting")] = ""  # a trained factorized model
    # (checkpoint.pt of jobs/train_factorized.py)
    data: DataConfig = field(default_factory=lambda: DataConfig(name="folder", image_size=0))  # image_size 0 = native
    split: Literal["train", "test", "all"] = "all"  # which images (data.num_train / num_test)
    limit: int = 0  # segment only the first N images (0 = all)
    t: int = 30  # noise level of the one forward pass (of T)
    seed: int = 0  # noise seed; image i uses its own generator from (seed, i): /v1/segment?seed= gives image 0's masks
    batch_size: int = 16  # images per forward pass (same-size images only)
    class_label: int | None = None  # the class to condition a class-conditional model on
    use_ema: bool = True  # EMA weights
    save_soft: bool = False  # also write the K soft masks as float16 .npy
    alpha: float = 0.5  # overlay opacity
    preview: int = 16  # images in preview.png (image | mask | overlay); 0 = none
    device: str = "auto"  # torch device: auto (cuda when visible), cpu, cuda, cuda:1
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # MLflow: the run, its preview and counts

    def check(self) -> None:
        """Cross-field checks (run by --dry-run and before the job)."""
        if not self.checkpoint:
            raise ValueError("checkpoint: the factorized model to segment with is required")
        if self.data.name == "folder" and not self.data.root:
            raise ValueError("data.root: the folder of images to segment is required")


def run_segment_job(cfg: SegmentJobConfig) -> dict[str, Any]:
    """Segment a data set with a factorized model: masks/<id>.png (region index per pixel), overlays/<id>.png."""
    if not cfg.checkpoint:
        raise ValueError("checkpoint: the factorized model to segment with is required")
    out, tracker = start_job(cfg)
    with tracker:
        return _segment(cfg, out, tracker)


def _segment(cfg: SegmentJobConfig, out: Path, tracker: Tracker) -> dict[str, Any]:
    seg = FactorizedSegmenter.load(cfg.checkpoint, cfg.device, cfg.use_ema, cfg.t, cfg.class_label)
    tracker.set_tags({"diffseg.checkpoint": cfg.checkpoint, "diffseg.checkpoint_step": seg.step})
    dataset = build_dataset(cfg.data, split=cfg.split)
    if cfg.limit:
        dataset = torch.utils.data.Subset(dataset, range(min(cfg.limit, len(dataset))))
    for sub in ("masks", "overlays") + (("soft",) if cfg.save_soft else ()):
        (out / sub).mkdir(parents=True, exist_ok=True)
    k = len(seg.class_names)
    tiles, count, t0 = [], 0, time.perf_counter()
    for _, items, res in segment_dataset(seg, dataset, cfg.seed, cfg.batch_size):
        imgs = to_uint8(torch.stack([it["image"] for it in items]))
        labels = res.labels.numpy().astype(np.uint8)
        for j, item in enumerate(items):
            id_ = item["id"]
            Image.fromarray(labels[j], mode="L").save(out / "masks" / f"{id_}.png")
            ov = overlay(imgs[j], labels[j], cfg.alpha, num_classes=k, skip_background=False)
            Image.fromarray(ov).save(out / "overlays" / f"{id_}.png")
            if cfg.save_soft:
                np.save(out / "soft" / f"{id_}.npy", res.probs[j].numpy().astype(np.float16))
            if len(tiles) < 3 * cfg.preview and (not tiles or imgs[j].shape == tiles[0].shape):  # one size
                tiles += [imgs[j], colorize(labels[j], k), ov]
        count += len(items)
    if tiles:
        preview = grid(tiles, nrow=3 * min(4, len(tiles) // 3))
        save_png(preview, out / "preview.png")
        tracker.log_image(preview, "segment/preview", seg.step or 0)  # by the model's training step
    seconds = time.perf_counter() - t0
    (out / "segment.json").write_text(
        json.dumps({"images": count, "K": k, "t": cfg.t, "seconds": seconds, "checkpoint_step": seg.step}, indent=1)
    )
    tracker.log_metrics({"segment/images": count, "segment/seconds": seconds, "segment/images_per_s": count / seconds})
    for name in ("segment.json", "preview.png"):
        if (out / name).is_file():
            tracker.log_artifact(out / name)
    log.info(f"[segment] {count} images, K={k}, t={cfg.t} in {seconds:.1f}s -> {out}/masks, {out}/overlays")
    return {"out_dir": str(out), "images": count, "K": k, "seconds": seconds}
