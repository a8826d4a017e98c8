"""Training augmentation of an image (and its mask), shared by every data set: flips, circular rolls, random crops
and zero-filled shifts (the cues "where in the frame" that a factorized model can otherwise learn a fixed split from).
The batched on-device version of the same transforms is `diffseg.data.device_data`."""

from __future__ import annotations

from typing import Any

import torch


def augment(
    item: dict[str, Any],
    generator: torch.Generator,
    flip: bool = False,
    roll: bool = False,
    crop_scale: float = 1.0,
    translate: float = 0.0,
    ignore_index: int = 255,
) -> dict[str, Any]:
    """Training augmentation of an item {"image" (3, H, W), "mask" (H, W)?, ...}, image and mask alike.

    flip: horizontal, p = 0.5. roll: a uniform circular shift in both axes (the object lands anywhere, wrapped
    around). crop_scale < 1: a random square crop of side s * H, s ~ U[crop_scale, 1], at a uniform position, resized
    back to H (bilinear image, nearest mask). These take away the cue "where in the frame" from a model.
    translate > 0: a shift by a uniform whole number of pixels in [-translate * H, translate * H] per axis, the
    uncovered border filled with zeros (mid-grey in [-1, 1]; `ignore_index` in the mask): the object moves a little,
    but stays near the centre, and the frame's edges stay where they are (unlike a roll, which wraps them around).
    """
    image, mask = item["image"], item.get("mask")
    h, w = image.shape[-2:]
    if translate > 0:
        r = int(translate * max(h, w))
        dy, dx = (int(v) - r for v in torch.randint(0, 2 * r + 1, (2,), generator=generator))
        image = _shift(image, dy, dx, 0.0)
        if mask is not None:
            mask = _shift(mask, dy, dx, ignore_index)
    if crop_scale < 1:
        s = float(torch.empty(()).uniform_(crop_scale, 1.0, generator=generator))
        side = max(1, round(min(h, w) * s))
        top = int(torch.randint(0, h - side + 1, (), generator=generator))
        left = int(torch.randint(0, w - side + 1, (), generator=generator))
        crop = image[None, :, top : top + side, left : left + side]  # (1, 3, side, side)
        image = torch.nn.functional.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0]
        if mask is not None:
            crop_m = mask[None, None, top : top + side, left : left + side].float()
            mask = torch.nn.functional.interpolate(crop_m, size=(h, w), mode="nearest")[0, 0].long()
    if roll:
        dy, dx = (int(v) for v in torch.randint(0, max(h, w), (2,), generator=generator))
        image = torch.roll(image, (dy % h, dx % w), dims=(-2, -1))
        if mask is not None:
            mask = torch.roll(mask, (dy % h, dx % w), dims=(-2, -1))
    if flip and torch.rand((), generator=generator) < 0.5:
        image = image.flip(-1)
        mask = mask.flip(-1) if mask is not None else None
    out = {**item, "image": image}
    if mask is not None:
        out["mask"] = mask
    return out


def _shift(x: torch.Tensor, dy: int, dx: int, fill: float) -> torch.Tensor:
    """x (..., H, W) moved by (dy, dx) pixels, the uncovered border set to `fill`."""
    h, w = x.shape[-2:]
    out = torch.full_like(x, fill)
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[..., yd, xd] = x[..., ys, xs]
    return out
