"""Generating images (and, with the factorized model, their masks) from a trained network."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

import torch
from torch import nn

from diffseg.diffusion import GaussianDiffusion
from diffseg.factorized import FactorizedUNet


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
    """Yield {"t", "sample", "pred_xstart", "masks" (factorized only)} after every sampling step.

    `steps` respaces the process (DDIM-50, or DDPM with fewer steps); None keeps all T steps.
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
        if isinstance(net, _MaskRecorder):
            out = {**out, "masks": net.masks}
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
