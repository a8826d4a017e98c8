"""Pixel features from a diffusion U-Net (Baranchuk et al. 2022), computed batch by batch and streamed to shards.

For each image x_0 and each timestep t in the recipe: x_t = q_sample(x_0, t, noise) with ONE fixed noise tensor
shared by all images and timesteps; the U-Net's named decoder blocks are read at x_t, upsampled bilinearly
(align_corners=False) to the image size and concatenated, blocks within timesteps:

    features[:, D] = concat_{t in timesteps} concat_{b in blocks} up(block_b(x_t))     # (B, D, H, W)

D is derived from the backbone (sum of the blocks' channels times the number of timesteps), never configured:
blocks dec.5,6,7,8,12 at t=50,150,250 of the LSUN-256 ADM give 8448.

The math is plain PyTorch (`extract`, run by `FeaturePipeline`). ONE function turns a batch of images into a shard
of labelled pixel rows, `write_feature_shard`; it is what the Ray Data callable class `FeatureExtractor` runs on an
actor pool (the feature job, the comparisons) and what `extract_dataset` runs in-process (sweeps, the demo). The
shard format and the cache of feature sets live in `diffseg.data.shards`, so feature sets larger than memory never sit
in one place.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffseg.core import storage
from diffseg.core.cli import resume_hint
from diffseg.core.config import (
    Name,
    OutputPath,
    PathField,
    check_name,
    dumps,
    from_dict,
    resolve_location,
    resolve_paths,
    to_dict,
)
from diffseg.core.runtime import Progress, decide_gpu, init_ray, resolve_device
from diffseg.core.tracking import Tracker, TrackingConfig, current_run_id, flatten
from diffseg.data.datasets import DataConfig, DataError, build_dataset, check_labelled, item_ids, read_images_ray
from diffseg.data.shard_reader import ShardSet
from diffseg.data.shards import (
    FeatureMeta,
    begin_shard_set,
    covered_images,
    end_shard_set,
    read_manifest,
    write_shard,
)
from diffseg.models.checkpoint import diffusers_unet_folder, load_diffusion_model
from diffseg.models.diffusion import DiffusionConfig, GaussianDiffusion

log = logging.getLogger(__name__)


BACKBONE_KEYWORDS = ("", "random", "rgb")  # specs that name no file
BACKBONE_PREFIXES = ("random:", "diffusers:")  # specs whose path follows a prefix


def resolve_backbone(spec: str, section: Any = None, key: str = "backbone", base: Any = None) -> str:
    """A backbone spec with its path made absolute (`random:<ckpt>` and `diffusers:<dir>` keep their prefix;
    keywords and URIs stay as they are): `resolve_paths`' rule for `BackboneSpec` fields."""
    if spec in BACKBONE_KEYWORDS:
        return spec
    prefix = next((p for p in BACKBONE_PREFIXES if spec.startswith(p)), "")
    return prefix + resolve_location(spec[len(prefix) :], base, key, "input")


def backbone_file(spec: str) -> str | None:
    """The local file or folder a backbone spec names (None for a keyword): what must exist before a job starts."""
    if spec in BACKBONE_KEYWORDS:
        return None
    prefix = next((p for p in BACKBONE_PREFIXES if spec.startswith(p)), "")
    return spec[len(prefix) :]


BackboneSpec = Annotated[str, PathField("input", resolve_backbone, local=backbone_file)]  # a checkpoint,
# random:<ckpt> or diffusers:<dir>


@dataclass(frozen=True)
class FeatureConfig:
    backbone: BackboneSpec = "random"  # checkpoint path (ours or imported), "random" (random init) or "diffusers:<dir>"
    blocks: tuple[str, ...] = ("dec.5", "dec.6", "dec.7", "dec.8", "dec.12")  # named U-Net blocks to read
    timesteps: tuple[int, ...] = (50, 150, 250)  # diffusion steps at which the blocks are read
    noise_seed: int = 0  # seed of the ONE noise tensor shared by every image and timestep
    batch_size: int = 4  # images per forward pass
    use_ema: bool = True  # EMA weights of our checkpoints
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto = bf16 on CUDA
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)  # used when the backbone has none


# ---------------------------------------------------------------------------------------------------- backbones
class DiffusersBackbone(nn.Module):
    """A diffusers `UNet2DModel` with feature taps on its up blocks (`up.N`), and `out`.

    diffusers is an optional dependency, imported only here.
    """

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet
        self.num_up = len(unet.up_blocks)
        self.cfg = _DiffusersCfg(image_size=int(unet.config.sample_size), in_channels=int(unet.config.in_channels))

    @property
    def feature_names(self) -> list[str]:
        return [f"up.{i}" for i in range(self.num_up)] + ["out"]

    def feature_channels(self, name: str) -> int:
        if name == "out":
            return int(self.unet.config.out_channels)
        block = self.unet.up_blocks[int(name.split(".")[1])]
        return int(block.resnets[-1].out_channels)

    def features(self, x: torch.Tensor, t: torch.Tensor, names: Sequence[str], y=None) -> dict[str, torch.Tensor]:
        unknown = sorted(set(names) - set(self.feature_names))
        if unknown:
            raise KeyError(f"unknown feature name(s) {unknown}; this backbone has {self.feature_names}")
        taps: dict[str, torch.Tensor] = {}
        handles = []
        for i, block in enumerate(self.unet.up_blocks):
            if f"up.{i}" in names:
                handles.append(block.register_forward_hook(lambda _m, _i, out, i=i: taps.__setitem__(f"up.{i}", out)))
        try:
            out = self.unet(x, t).sample
        finally:
            for h in handles:
                h.remove()
        taps["out"] = out
        return {n: taps[n] for n in names}


@dataclass(frozen=True)
class _DiffusersCfg:
    image_size: int
    in_channels: int


def load_backbone(
    spec: str, device: torch.device | str | None = "auto", use_ema: bool = True
) -> tuple[nn.Module, GaussianDiffusion | None]:
    """(model in eval mode, its diffusion process or None) from a backbone spec.

    - a path (or MLflow URI) to one of our checkpoints (trained here, or converted from guided-diffusion),
    - "random:<checkpoint>" for a randomly initialised network of that checkpoint's architecture (a baseline),
    - "diffusers:<dir>" for a diffusers UNet2DModel folder, or a pipeline folder holding one (`unet/`), its
      `diffseg_integrity.json` checked first (a folder without one loads only with --allow-unverified).

    Checkpoints go through the one loader, `diffseg.models.checkpoint.load_diffusion_model`. ("rgb", the raw-pixel
    baseline, has no network: see `FeaturePipeline`.)
    """
    if spec.startswith("diffusers:"):
        from diffusers import UNet2DModel  # an optional dependency, imported only for this backbone

        model = DiffusersBackbone(UNet2DModel.from_pretrained(diffusers_unet_folder(spec.split(":", 1)[1])))
        return model.eval().to(resolve_device(device)), None
    if spec.startswith("random:"):
        loaded = load_diffusion_model(spec.split(":", 1)[1], device, random_init=True)
    else:
        loaded = load_diffusion_model(spec, device, use_ema)
    return loaded.model, loaded.diffusion if "diffusion" in loaded.config else None


def feature_dim(model: nn.Module, blocks: Sequence[str], timesteps: Sequence[int]) -> int:
    """D = (sum of the blocks' channels) x (number of timesteps), from the architecture alone."""
    return sum(model.feature_channels(b) for b in blocks) * len(timesteps)


def shared_noise(shape: Sequence[int], seed: int) -> torch.Tensor:
    """The one noise tensor (C, H, W) every image and timestep uses (the paper fixes it for the whole data set)."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def extract(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    images: torch.Tensor,
    blocks: Sequence[str],
    timesteps: Sequence[int],
    noise: torch.Tensor,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Concatenated, upsampled block features (B, D, H, W) in float32 for images (B, C, H, W) in [-1, 1]."""
    b, _, h, w = images.shape
    device = images.device
    noise = noise.to(device).expand(b, *noise.shape[-3:])  # (B, C, H, W), the same for every image
    out = []
    for step in timesteps:
        t = torch.full((b,), step, device=device, dtype=torch.long)
        x_t = diffusion.q_sample(images, t, noise)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            taps = model.features(x_t, diffusion.model_timesteps(t), blocks)
        for name in blocks:
            f = taps[name].float()
            if f.shape[-2:] != (h, w):
                f = F.interpolate(f, size=(h, w), mode="bilinear", align_corners=False)
            out.append(f)
    return torch.cat(out, dim=1)  # (B, D, H, W)


class FeaturePipeline:
    """A feature recipe made runnable: images (B, 3, H, W) in [-1, 1] -> features (B, D, H, W) float32.

    `cfg.backbone == "rgb"` is the raw-pixel baseline (D = 3, the image itself, no network); anything else is loaded
    with `load_backbone` and read with `extract` (one forward per timestep, shared noise, bilinear upsampling).
    """

    def __init__(
        self,
        cfg: FeatureConfig,
        device: torch.device | str | None = None,
        model: nn.Module | None = None,
        diffusion: GaussianDiffusion | None = None,
    ):
        """`model`/`diffusion` given: use them instead of loading `cfg.backbone` (which is then only a label)."""
        self.cfg = cfg
        self.device = resolve_device(device)
        self.autocast = (
            torch.bfloat16
            if cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
            else None
        )
        if cfg.backbone == "rgb":
            self.model, self.diffusion, self.dim, self.image_size = None, None, 3, None
            return
        if model is None:
            model, diffusion = load_backbone(cfg.backbone, self.device, cfg.use_ema)
        self.model = model.eval().to(self.device)
        self.diffusion = diffusion or GaussianDiffusion.from_config(cfg.diffusion)
        self.dim = feature_dim(self.model, cfg.blocks, cfg.timesteps)
        self.image_size = int(self.model.cfg.image_size)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, torch.float32)
        if self.model is None:
            return images
        if self.image_size is not None and tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"images of {tuple(images.shape[-2:])} for a {self.image_size} px backbone: resize them first"
            )
        noise = shared_noise(images.shape[1:], self.cfg.noise_seed)
        return extract(self.model, self.diffusion, images, self.cfg.blocks, self.cfg.timesteps, noise, self.autocast)


# ---------------------------------------------------------------------------------------------------- to shards
# The reference's threshold (ddpm-segmentation train_interpreter.py: prepare_data), set for 256 px annotations.
OFFICIAL_MIN_CLASS_PIXELS = 20


def drop_small_annotations(masks: np.ndarray, min_pixels: int, ignore_index: int = 255) -> np.ndarray:
    """The reference's small-annotation rule (ddpm-segmentation `train_interpreter.py: prepare_data`): in each
    labelled image, every class with 0 < count < `min_pixels` pixels is set to `ignore_index` (so its pixels do not
    train the ensemble). masks (B, H, W) or (H, W) -> a copy; `min_pixels` 0 (or 1) changes nothing.

    The reference applies it with 20 to its 256 px masks. It is a pixel count, so its meaning depends on the
    resolution: at 32 px, 20 pixels is 2% of the image, and on celebamask's first 20 ids it removes 163
    (image, class) pairs of 13 of the 19 classes (eyes, brows, lips, ears: real parts, not annotation specks)."""
    out = np.array(masks, dtype=np.int64, copy=True)
    if min_pixels <= 1:
        return out
    for m in out.reshape(-1, *out.shape[-2:]):  # views: one image at a time
        classes, counts = np.unique(m[m != ignore_index], return_counts=True)
        for c in classes[counts < min_pixels]:
            m[m == c] = ignore_index
    return out


def write_feature_shard(
    pipeline: FeaturePipeline,
    images: torch.Tensor,
    ids: Sequence[str],
    path: str | os.PathLike,
    masks: torch.Tensor | np.ndarray | None = None,
    meta_extra: dict[str, Any] | None = None,
    min_class_pixels: int = 0,
) -> int:
    """THE extraction step: images (B, 3, H, W) in [-1, 1] -> one Parquet shard of their labelled pixels; returns the
    number of rows written. Pixels whose mask is `meta_extra["ignore_index"]` (255) are dropped, and so are those of
    a class with fewer than `min_class_pixels` pixels in its image (`drop_small_annotations`; 0 = off, the
    reference: 20); without masks every pixel is kept with label -1. The shard's metadata carries the recipe
    (`feature_config`) and the rule, so a classifier trained on it can rebuild exactly this pipeline."""
    extra = dict(meta_extra or {})
    ignore = int(extra.get("ignore_index", 255))
    extra["min_class_pixels"] = int(min_class_pixels)
    feats = pipeline(images).cpu()  # (B, D, H, W)
    b, d, h, w = feats.shape
    feats = feats.permute(0, 2, 3, 1).reshape(b * h * w, d)  # (B*H*W, D)
    if masks is not None:
        labels = drop_small_annotations(np.asarray(masks), min_class_pixels, ignore).reshape(-1)  # (B*H*W,)
        keep = labels != ignore
    else:
        labels = np.full(b * h * w, -1, dtype=np.int64)
        keep = np.ones(b * h * w, dtype=bool)
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    ys, xs = np.tile(ys.reshape(-1), b), np.tile(xs.reshape(-1), b)
    image_ids = np.repeat(np.array([str(i) for i in ids]), h * w)
    has_net = pipeline.model is not None
    class_names = list(extra.pop("class_names", []))
    meta = FeatureMeta(
        blocks=list(pipeline.cfg.blocks) if has_net else ["rgb"],
        timesteps=list(pipeline.cfg.timesteps) if has_net else [],
        feature_dim=d,
        image_size=h,
        num_classes=int(extra.pop("num_classes", len(class_names))),
        class_names=class_names,
        backbone=pipeline.cfg.backbone,
        noise_seed=pipeline.cfg.noise_seed,
        extra={"ignore_index": ignore, "feature_config": to_dict(pipeline.cfg), **extra},
    )
    keep_t = torch.from_numpy(keep)
    rows = feats[keep_t].to(torch.float16).numpy()
    write_shard(path, rows, labels[keep], image_ids[keep], ys[keep], xs[keep], meta, images=[str(i) for i in ids])
    return int(keep.sum())


def dataset_meta(dataset: Any) -> dict[str, Any]:
    """The shard metadata a data set contributes: class names and ignore index."""
    names = list(getattr(dataset, "class_names", None) or [])
    return {"class_names": names, "num_classes": len(names), "ignore_index": int(getattr(dataset, "ignore_index", 255))}


def extract_dataset(
    pipeline: FeaturePipeline,
    dataset: Any,
    out_dir: str | os.PathLike,
    batch_size: int | None = None,
    meta_extra: dict[str, Any] | None = None,
    min_class_pixels: int = 0,
) -> dict[str, Any]:
    """In-process extraction of a data set of {"image", "mask"?, "id"} items into shards under `out_dir` (one per
    batch, named by its first id; existing shards are skipped). Large sets belong to the Ray Data job
    (`run_extract_job`), which writes the same shards, with the same manifest: the set is complete (usable by
    `ShardSet`) only once every image is in a shard. `min_class_pixels`: see `write_feature_shard`.
    Returns {"num_shards", "num_rows"}."""
    out = str(out_dir)
    storage.makedirs(out)
    meta = {**dataset_meta(dataset), "num_images": len(dataset), **(meta_extra or {})}
    begin_shard_set(out, item_ids(dataset), {"features": to_dict(pipeline.cfg), **(meta_extra or {})})
    bs = batch_size or pipeline.cfg.batch_size
    rows = shards = 0
    for start in range(0, len(dataset), bs):
        items = [dataset[i] for i in range(start, min(start + bs, len(dataset)))]
        path = storage.join(out, f"shard-{items[0]['id']}.parquet")
        shards += 1
        if storage.exists(path):  # idempotent: finished work is skipped
            continue
        masks = torch.stack([it["mask"] for it in items]).numpy() if "mask" in items[0] else None
        images = torch.stack([it["image"] for it in items])  # (B, 3, H, W)
        ids = [it["id"] for it in items]
        rows += write_feature_shard(pipeline, images, ids, path, masks, meta, min_class_pixels)
    end_shard_set(out)  # every image is in a shard, or this raises naming the missing ones
    return {"num_shards": shards, "num_rows": rows}


# ---------------------------------------------------------------------------------------------------- Ray Data
class FeatureExtractor:
    """Ray Data callable class: a batch of images (+ masks) in, one Parquet shard of labelled pixels out.

    Used as `ds.map_batches(FeatureExtractor, fn_constructor_kwargs=..., batch_size=..., compute=ActorPoolStrategy)`;
    the backbone is loaded once per actor. Batches are {"id": str, "image": (H, W, 3) uint8, "mask"?: (H, W) uint8}.
    Shards are named by the batch's first image id, so a re-run skips finished work. Returns one summary row per
    shard (its path and pixel count), never the features themselves: nothing big goes through the object store.
    """

    def __init__(
        self,
        cfg_dict: dict[str, Any],
        out_dir: str,
        meta_extra: dict[str, Any] | None = None,
        min_class_pixels: int = 0,
    ):
        self.cfg = from_dict(FeatureConfig, cfg_dict)
        self.pipeline = FeaturePipeline(self.cfg)
        self.out_dir = str(out_dir)  # a folder or a URI
        storage.makedirs(self.out_dir)
        self.meta_extra = dict(meta_extra or {})
        self.min_class_pixels = int(min_class_pixels)

    @classmethod
    def from_pipeline(
        cls,
        pipeline: FeaturePipeline,
        out_dir: str,
        meta_extra: dict[str, Any] | None = None,
        min_class_pixels: int = 0,
    ) -> FeatureExtractor:
        """An extractor around an already built pipeline (in-process use: benchmarks, notebooks)."""
        self = cls.__new__(cls)
        self.cfg, self.pipeline = pipeline.cfg, pipeline
        self.out_dir = str(out_dir)
        storage.makedirs(self.out_dir)
        self.meta_extra = dict(meta_extra or {})
        self.min_class_pixels = int(min_class_pixels)
        return self

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = [str(i) for i in batch["id"]]
        path = storage.join(self.out_dir, f"shard-{ids[0]}.parquet")
        if storage.exists(path):  # idempotent: finished work is skipped
            return {"shard": np.array([str(path)]), "num_pixels": np.array([-1]), "num_images": np.array([len(ids)])}
        images = torch.from_numpy(np.stack(batch["image"]))  # (B, H, W, 3) uint8
        images = images.permute(0, 3, 1, 2).float() / 127.5 - 1  # (B, 3, H, W) in [-1, 1]
        masks = np.stack(batch["mask"]) if "mask" in batch else None
        n = write_feature_shard(self.pipeline, images, ids, path, masks, self.meta_extra, self.min_class_pixels)
        return {"shard": np.array([str(path)]), "num_pixels": np.array([n]), "num_images": np.array([len(ids)])}


STALL_WARN_S = 60.0  # no shard finished for this long: say what the extraction asked Ray for and what is free
PROGRESS_EVERY_S = 10.0  # at most one progress line this often (and one at the end)


def follow_extraction(
    rows: Iterable[dict[str, Any]],
    total: int,
    asked: dict[str, float],
    free: Callable[[], dict[str, float]],
    *,
    stall_warn_s: float = STALL_WARN_S,
    every_s: float = PROGRESS_EVERY_S,
) -> list[str]:
    """Consume the extraction's summary rows (one per shard, as they finish), logging progress (`[extract] 16/40 img,
    3.1 img/s, left 00:00:08`) and, when no shard has finished for `stall_warn_s`, a warning naming the resources
    its actors asked for (`asked`, all actors together) and those free now (`free()`): actors that cannot be
    scheduled (a Serve app or another job holding the CPUs) otherwise wait without a word. Returns the shard paths."""
    progress = Progress(total, "img")
    paths: set[str] = set()
    last_row = [time.monotonic()]
    stop = threading.Event()

    def watch() -> None:
        warned_at = None
        while not stop.wait(min(5.0, stall_warn_s / 4)):
            since = time.monotonic() - last_row[0]
            if since < stall_warn_s or warned_at == last_row[0]:
                continue
            warned_at = last_row[0]
            have = {k: round(v, 2) for k, v in sorted(free().items()) if k in asked or k in ("CPU", "GPU")}
            log.warning(
                f"[extract] no shard finished for {since:.0f} s ({progress.done}/{total} images done): the actors "
                f"ask for {_resources(asked)} in all, the cluster has {_resources(have)} free; if other work holds "
                "them (a Serve app, another job), free them or lower num_actors / cpus_per_actor / gpus_per_actor"
            )

    watcher = threading.Thread(target=watch, name="extract-watch", daemon=True)
    watcher.start()
    shown = -float("inf")  # the first shard is shown at once, then one line per `every_s`, and the last
    try:
        for row in rows:
            last_row[0] = time.monotonic()
            paths.add(str(row["shard"]))
            text = progress.update(progress.done + int(row.get("num_images", 0)))
            if last_row[0] - shown >= every_s or progress.done >= total:
                log.info(f"[extract] {text}")
                shown = last_row[0]
    finally:
        stop.set()
        watcher.join(timeout=10)
    return sorted(paths)


def _resources(res: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in res.items()) or "nothing"


def extract_to_shards(
    cfg: FeatureConfig,
    image_ds: Any,
    out_dir: str | os.PathLike,
    meta_extra: dict[str, Any] | None = None,
    num_actors: int = 1,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    min_class_pixels: int = 0,
    num_images: int = 0,
    stall_warn_s: float = STALL_WARN_S,
) -> list[str]:
    """Run extraction over a Ray Dataset of {"id", "image" (H, W, 3) uint8, "mask"?}; returns the shard paths.

    On a small CPU machine pass a fractional `cpus_per_actor` (e.g. 0.5) so the read tasks still get a CPU slot
    while the actors hold theirs (otherwise Ray Data can wait forever); on GPUs use `gpus_per_actor=1`. Progress
    (of `num_images`, when given) and stalls are logged (`follow_extraction`).
    """
    import ray  # the Ray edge of this module: only the actor-pool path needs it

    kwargs: dict[str, Any] = {"num_cpus": cpus_per_actor}
    if gpus_per_actor:
        kwargs["num_gpus"] = gpus_per_actor
    out = image_ds.map_batches(
        FeatureExtractor,
        fn_constructor_kwargs={
            "cfg_dict": to_dict(cfg),
            "out_dir": str(out_dir),
            "meta_extra": meta_extra or {},
            "min_class_pixels": min_class_pixels,
        },
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        **kwargs,
    )
    asked = {"CPU": cpus_per_actor * num_actors, **({"GPU": gpus_per_actor * num_actors} if gpus_per_actor else {})}
    return follow_extraction(out.iter_rows(), num_images, asked, ray.available_resources, stall_warn_s=stall_warn_s)


# ---------------------------------------------------------------------------------------------------- the job
@dataclass(frozen=True)
class ExtractJobConfig:
    name: Name = "features"  # output folder name under output_dir
    output_dir: OutputPath = "runs/features"  # shards go to <output_dir>/<name>/
    features: FeatureConfig = field(default_factory=FeatureConfig)  # the recipe (backbone, blocks, timesteps, noise)
    data: DataConfig = field(default_factory=DataConfig)  # the images (+ masks); flips are never applied here
    split: Literal["train", "test", "all"] = "train"  # which split of `data` (see data.num_train / data.num_test)
    limit: int = 0  # only the first N images of the split (0 = all), e.g. the 20 labelled training images
    min_class_pixels: int = 0  # per image, a class with fewer pixels is ignored (0 = off; the reference: 20 at 256 px)
    num_actors: int = 1  # extraction actors (one per GPU on a cluster)
    cpus_per_actor: float = 0.5  # fractional on small CPU machines, so read tasks still get a slot
    gpus_per_actor: float = -1.0  # -1 = auto: 1 when the cluster has GPUs or can start GPU nodes, else 0
    read_batch_size: int = 8  # images per read task
    ray_num_cpus: int = 0  # logical CPUs of a locally started Ray (0 = Ray's default); ignored with RAY_ADDRESS
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # MLflow (nested in the caller's run, if any)

    def check(self) -> None:
        """Cross-field checks (run by --dry-run and before the job)."""
        backbone = self.features.backbone
        if not backbone or backbone == "random":
            raise ValueError(
                f"features.backbone: {backbone!r} names no network; give a checkpoint, random:<checkpoint>, "
                "diffusers:<dir> or rgb"
            )
        check_labelled(self.data)  # the shards keep labelled pixels only


def gpus_per_actor(value: float) -> float:
    """GPUs per extraction actor: `value` as configured, or for -1 (auto) 1 or 0 by the one `use_gpu` rule
    (`diffseg.core.runtime.decide_gpu`: GPUs up, or a GPU node type the autoscaler can start), printed."""
    if value >= 0:
        return value
    return 1.0 if decide_gpu("auto", "extract").use_gpu else 0.0


def shard_dir(cfg: ExtractJobConfig) -> str:
    """`<output_dir>/<name>`: a local folder or a URI (s3://, gs://, file://)."""
    return storage.join(cfg.output_dir, check_name(cfg.name))


def run_extract_job(cfg: ExtractJobConfig) -> dict[str, Any]:
    """Read the split with Ray Data, extract on an actor pool, write shards + `extract_config.yaml`; a summary. An
    MLflow run of its own, nested under the run of a job that calls it (a comparison's variant)."""
    cfg = resolve_paths(cfg)  # in the driver: the actors run elsewhere
    with Tracker(cfg.tracking, cfg.name, parent_run_id=current_run_id()) as tracker:
        tracker.log_config(cfg)
        tracker.log_data_input(cfg.data, context="features")
        summary = _extract(cfg)
        tracker.log_metrics({f"extract/{k}": v for k, v in summary.items() if isinstance(v, (int, float))})
        tracker.set_tags({"diffseg.shard_dir": summary["shard_dir"], "diffseg.recipe_hash": summary["recipe_hash"]})
        if not storage.is_remote(summary["shard_dir"]):  # a shard set on an object store stays there
            tracker.log_artifact(Path(summary["shard_dir"]) / "extract_config.yaml")
    return summary


def check_rerun(out: str, info: dict[str, Any]) -> None:
    """A rerun into a folder that holds shards (an interrupted extraction, or a finished one) skips them, so it must
    be the same extraction: the same data, split and recipe. Otherwise stop before any work, naming what differs."""
    before = read_manifest(out)
    if before is None or not storage.list_files(out, ".parquet"):
        return
    old, new = flatten(before.get("info") or {}), flatten(json.loads(json.dumps(info, default=str)))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if changed:
        diffs = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:4])
        more = f" (and {len(changed) - 4} more)" if len(changed) > 4 else ""
        raise DataError(
            f"{out}: holds the shards of another extraction ({diffs}{more}); a rerun would keep them. Give this one "
            "another name=, or delete the folder"
        )


def interrupted_extraction(out: str, expected: Sequence[str]) -> str:
    """What an interrupted extraction kept (its finished shards: written whole or not at all) and how it goes on."""
    done = covered_images(out)
    kept = sum(1 for i in expected if str(i) in done)
    what = f"{kept} of {len(expected)} images are in finished shards in {out}, which a rerun skips"
    return f"during extraction: {what}; the set is incomplete until it ends{resume_hint()}"


def _extract(cfg: ExtractJobConfig) -> dict[str, Any]:
    data = dataclasses.replace(cfg.data, flip=False)
    dataset = build_dataset(data, cfg.split)
    if not getattr(dataset, "has_masks", True):  # the shards hold labelled pixels only: an image-only set has none
        raise DataError(
            f"{data.root or data.name}: extracting pixel features needs masks (the shards keep the labelled pixels "
            "the ensemble trains on), and this set has none (no masks/ folder, or dataset.json says masks: false)"
        )
    init_ray(cfg.ray_num_cpus)
    out = shard_dir(cfg)
    storage.makedirs(out)
    storage.write_text(storage.join(out, "extract_config.yaml"), dumps(cfg))
    n = len(dataset) if not cfg.limit else min(cfg.limit, len(dataset))
    ds = read_images_ray(data, cfg.split, batch_size=cfg.read_batch_size)
    if cfg.limit:
        ds = ds.limit(cfg.limit)
    gpus = gpus_per_actor(cfg.gpus_per_actor)
    meta_extra = {**dataset_meta(dataset), "data": data.root or data.name, "split": cfg.split, "num_images": n}
    expected = item_ids(dataset)[:n]
    info = {"data": meta_extra["data"], "split": cfg.split, "features": to_dict(cfg.features)}
    check_rerun(out, info)
    begin_shard_set(out, expected, info)
    t0 = time.perf_counter()
    log.info(f"[extract] {n} images, {cfg.num_actors} actor(s) of {cfg.cpus_per_actor:g} CPU, {gpus:g} GPU -> {out}")
    try:
        paths = extract_to_shards(
            cfg.features, ds, out, meta_extra, cfg.num_actors, cfg.cpus_per_actor, gpus, cfg.min_class_pixels, n
        )
    except KeyboardInterrupt as e:  # Ctrl-C / SIGTERM: the finished shards stay, and a rerun skips them
        e.args = (f"{str(e) or 'Ctrl-C'} {interrupted_extraction(out, expected)}",)
        raise
    seconds = time.perf_counter() - t0
    end_shard_set(out)  # every image is in a shard, or this raises naming the missing ones
    ss = ShardSet(out)
    summary = {
        "shard_dir": out,
        "num_shards": len(paths),
        "num_images": n,
        "num_rows": ss.num_rows,
        "feature_dim": ss.meta.feature_dim,
        "recipe_hash": ss.meta.recipe_hash,
        "seconds": round(seconds, 2),
    }
    log.info(
        f"[extract] done: {n} images -> {summary['num_rows']:,} labelled pixels of {summary['feature_dim']} features "
        f"in {summary['num_shards']} shard(s), {seconds:.1f} s: {out} (recipe {summary['recipe_hash']})"
    )
    return summary
