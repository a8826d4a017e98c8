"""What a training run reads: its stream of training batches (on the device, or a DataLoader of items) and the
held-out images (and masks) its validation scores.

    build_batches(cfg, rank, world, start_step, device) -> endless local batches {"image", ...}
    build_eval_set(cfg)                                  -> {"image", "mask"?, "num_classes"?} or None
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

from diffseg.data.datasets import DataError, build_dataset, stack
from diffseg.data.device_data import MAX_BYTES as DEVICE_DATA_MAX_BYTES
from diffseg.data.device_data import Augment, DeviceBatches
from diffseg.training.config import TrainConfig


def build_batches(
    cfg: TrainConfig, rank: int, world: int, start_step: int, device: torch.device, on_device: bool | None = None
) -> Iterator[dict]:
    """An endless stream of local batches (global batch / world): on the device (`loop.data_on_device`, see
    `diffseg.data.device_data`), else a DataLoader whose DistributedSampler shards the data set. `on_device=False`
    forces the DataLoader (items with their masks: the oracle experiment)."""
    if cfg.optim.batch_size % world:
        raise ValueError(f"optim.batch_size {cfg.optim.batch_size} is not divisible by {world} workers")
    plain = None  # the split without augmentation (augmented on the device), built once when it may be used
    if on_device is not False and cfg.loop.data_on_device != "off":
        plain = build_dataset(_unaugmented(cfg), split="train")
    if on_device is None:
        on_device = use_device_data(cfg, len(plain) if plain is not None else None)
    if on_device:
        d = cfg.data
        return DeviceBatches.build(
            plain, cfg.optim.batch_size, device, seed=cfg.loop.seed, rank=rank, world=world, start_step=start_step,
            augment=Augment(d.flip, d.roll, d.crop_scale, d.translate),
        )  # fmt: skip
    return _loader_batches(cfg, rank, world, start_step, device)


def _unaugmented(cfg: TrainConfig):
    return replace(cfg.data, flip=False, roll=False, crop_scale=1.0, translate=0.0)


def use_device_data(cfg: TrainConfig, num_images: int | None = None) -> bool:
    """`loop.data_on_device`: auto = unless image-class labels are needed or the split (`num_images`, counted here
    when not given) would pass 2 GiB as uint8."""
    mode = cfg.loop.data_on_device
    labels = cfg.model.unet.num_classes is not None
    if mode == "on" and labels:
        raise ValueError("loop.data_on_device=on: a class-conditional model needs image labels; set it to off")
    if mode != "auto":
        return mode == "on"
    n = num_images if num_images is not None else len(build_dataset(_unaugmented(cfg), split="train"))
    return not labels and n * 3 * cfg.data.image_size**2 <= DEVICE_DATA_MAX_BYTES


def _loader_batches(cfg: TrainConfig, rank: int, world: int, start_step: int, device: torch.device) -> Iterator[dict]:
    dataset = build_dataset(cfg.data, split="train")
    if len(dataset) < cfg.optim.batch_size:
        raise ValueError(f"the training set has {len(dataset)} images, fewer than one batch ({cfg.optim.batch_size})")
    sampler = None
    if world > 1:
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.loop.seed)
    loader = DataLoader(
        dataset,
        batch_size=cfg.optim.batch_size // world,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=True,
        num_workers=cfg.loop.num_data_workers,
        # Kept across epochs: a small data set (150 images, batch 64) is 2 batches per epoch, and forking the
        # workers again every epoch would cost more than the steps on a GPU.
        persistent_workers=cfg.loop.num_data_workers > 0,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.loop.seed + start_step) if sampler is None else None,
    )
    return _epochs(loader, sampler, start_step)


def _epochs(loader: DataLoader, sampler: DistributedSampler | None, start_step: int) -> Iterator[dict]:
    """The loader's batches, epoch after epoch, from the epoch `start_step` falls in."""
    epoch = start_step // max(len(loader), 1)
    while True:
        if sampler is not None:
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def build_eval_set(cfg: TrainConfig) -> dict[str, Any] | None:
    """The held-out images (and, factorized, masks) of the validation (`eval`), or None when `loop.eval_every` is 0."""
    if not cfg.loop.eval_every:
        return None
    data = cfg.eval.data or cfg.data
    dataset = build_dataset(data, split=cfg.eval.split)
    if len(dataset) < 2:
        raise DataError(
            f"eval: the {cfg.eval.split!r} split of {data.root or data.name!r} has {len(dataset)} image(s); mask "
            "diagnostics need >= 2 (set data.num_test, or eval.data / eval.split)"
        )
    items = stack(dataset, limit=cfg.eval.num_images)
    if cfg.model.kind != "factorized":  # a DDPM is validated on its held-out denoising loss: images only
        if tuple(items["image"].shape[-2:]) != (cfg.model.unet.image_size,) * 2:
            raise DataError(f"eval.data.image_size must be model.unet.image_size ({cfg.model.unet.image_size})")
        return {"image": items["image"]}
    if "mask" not in items:
        raise DataError(f"eval: {data.root or data.name!r} has no masks folder; mask diagnostics need masks")
    if tuple(items["image"].shape[-2:]) != (cfg.model.unet.image_size,) * 2:
        raise DataError(f"eval.data.image_size must be model.unet.image_size ({cfg.model.unet.image_size})")
    num_classes = getattr(dataset, "num_classes", 2)
    return {"image": items["image"], "mask": items["mask"], "num_classes": num_classes}
