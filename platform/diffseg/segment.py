"""Segmenting real images with a trained factorized model: noise to a small t, one forward pass, read the masks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from diffseg.diffusion import GaussianDiffusion, randn
from diffseg.factorized import FactorizedUNet


@torch.no_grad()
def segment_images(
    model: FactorizedUNet,
    diffusion: GaussianDiffusion,
    images: torch.Tensor,
    t: int = 30,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    y: torch.Tensor | None = None,
    output_size: tuple[int, int] | None = None,
) -> dict[str, torch.Tensor]:
    """K soft masks and the argmax map of real images.

    :param images: (B, C, H, W) in [-1, 1]; resized to the model's resolution if they differ.
    :param t: the noise level (the paper uses t=30 of T=1000): x_t = q_sample(x_0, t, eps).
    :param generator: one generator (or one per image) for eps; fixed seeds give repeatable masks.
    :param output_size: (H, W) of the returned masks; default the input's size.
    :returns: {"masks": (B, K, H, W) summing to 1, "labels": (B, H, W) long}.
    """
    if not 0 <= t < diffusion.num_timesteps:
        raise ValueError(f"t={t} is outside [0, {diffusion.num_timesteps})")
    model_size = model.cfg.image_size
    in_size = tuple(images.shape[-2:])
    x0 = images.float()
    if in_size != (model_size, model_size):
        x0 = F.interpolate(x0, size=(model_size, model_size), mode="bilinear", align_corners=False, antialias=True)
    device = next(model.parameters()).device
    x0 = x0.to(device)
    tt = torch.full((x0.shape[0],), t, device=device, dtype=torch.long)
    noise = randn(x0.shape, generator, device)
    x_t = diffusion.q_sample(x0, tt, noise)
    _, masks, _ = model.forward_with_masks(x_t, tt, y)  # (B, K, h, w)
    size = output_size or in_size
    if tuple(masks.shape[-2:]) != tuple(size):
        masks = F.interpolate(masks, size=size, mode="bilinear", align_corners=False)
        masks = masks / masks.sum(dim=1, keepdim=True).clamp(min=1e-8)
    return {"masks": masks, "labels": masks.argmax(dim=1)}
