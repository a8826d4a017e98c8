"""IEM (Savarese et al., CVPR 2021, "Information-Theoretic Segmentation by Inpainting Error Maximization";
reference code lolemacs/iem-code): a training-free, per-image optimisation of a foreground mask that maximises the
error of inpainting each region from the other, with the reference's inpainter, updates and smoothing and its
defaults scaled to the image size (`iem_params`). A baseline beside GrabCut and k-means (`evaluation.baselines`):
`iem` on tensors, `IEMSegmenter` as a `diffseg.scoring.segmenter.Segmenter`, method key `iem` in evaluate.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from diffseg.scoring.segmenter import Segmentation

# ---------------------------------------------------------------------------------------------------------------------
# IEM: inpainting error maximisation

# The resolution IEM's published defaults are for (Flowers at 128 px: sigma 5, an 11-tap kernel, lambda 0.001).
IEM_REFERENCE_SIZE = 128


@dataclass(frozen=True)
class IEMParams:
    """IEM's settings for one image size (see `iem_params` for the defaults and how they scale)."""

    iters: int = 150  # mask updates
    sigma: float = 5.0  # the Gaussian inpainter's standard deviation, in pixels
    kernel_size: int = 11  # its support (odd), in pixels
    reps: int = 2  # Gaussian filter passes per inpainting
    lmbda: float = 0.001  # weight of the diversity regulariser
    margin: float = 0.2  # the initial mask: a centred square leaving this fraction of each side on each border


def iem_params(image_size: int, **overrides: Any) -> IEMParams:
    """IEM's defaults (lolemacs/iem-code, `main.py` at 128 px) scaled to `image_size`; `overrides` (None = scaled).

    With s = image_size / 128: sigma = 5 s and kernel_size = 2 ceil(5 s) + 1 (the filter keeps its extent relative to
    the image: 11 taps at 128 px, 7 at 64 px with sigma 2.5, which is the reference README's downsampled setting, 5
    at 32 px); lambda = 0.001 / s^2, because the inpainting error is a per-pixel mean while the diversity term is a
    sum over pixels, so the balance of the two in each pixel's gradient (all an update reads) stays the same; the
    150 iterations and the initial square (margin 0.2, `size // 5`) are kept (the boundary moves at most one pixel
    per iteration, so 150 is more than a 32 px image needs; masks stop changing, at little cost).
    """
    s = image_size / IEM_REFERENCE_SIZE
    scaled = {"sigma": 5.0 * s, "kernel_size": 2 * math.ceil(5.0 * s) + 1, "lmbda": 0.001 / s**2}
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(IEMParams)})
    if unknown:
        raise ValueError(f"iem_params: unknown setting(s) {unknown}")
    params = IEMParams(**{**scaled, **{k: v for k, v in overrides.items() if v is not None}})
    if params.kernel_size < 1 or params.kernel_size % 2 == 0:
        raise ValueError(f"IEM kernel_size must be odd and >= 1, got {params.kernel_size}")
    if params.sigma <= 0 or params.reps < 1 or params.iters < 0:
        raise ValueError(f"IEM needs sigma > 0, reps >= 1, iters >= 0; got {params}")
    if not 0.0 <= params.margin < 0.5:
        raise ValueError(f"IEM margin is a fraction of each side per border and must be in [0, 0.5), got {params}")
    return params


def _gaussian_taps(sigma: float, size: int) -> torch.Tensor:
    """(size,) normalised Gaussian taps at integer offsets -(size-1)/2 .. (size-1)/2."""
    d2 = torch.linspace(-(size - 1) / 2, (size - 1) / 2, size) ** 2
    taps = torch.exp(-0.5 * d2 / sigma**2)
    return taps / taps.sum()


def iem_inpaint(x_masked: torch.Tensor, m: torch.Tensor, taps: torch.Tensor, reps: int) -> torch.Tensor:
    """IEM's inpainter phi(x m, m): a normalised Gaussian convolution, G*(x m) / G*m, `reps` separable passes.

    x_masked (B, C, H, W) is the image times the known region m (B, 1, H, W). As in the reference, a small epsilon
    (1e-8 times each channel's sum) is added after filtering, so that a pixel the filter does not reach from m is
    predicted as the mean of the known region instead of 0/0.
    """
    u = torch.cat([x_masked, m], dim=1)  # (B, C+1, H, W)
    channels, pad = u.shape[1], taps.numel() // 2
    eps = u.sum((2, 3), keepdim=True) * 1e-8  # (B, C+1, 1, 1)
    vertical = taps.view(1, 1, -1, 1).expand(channels, 1, -1, 1).to(u)
    horizontal = taps.view(1, 1, 1, -1).expand(channels, 1, 1, -1).to(u)
    for _ in range(reps):
        u = F.conv2d(u, vertical, padding=(pad, 0), groups=channels)
        u = F.conv2d(u, horizontal, padding=(0, pad), groups=channels)  # (B, C+1, H, W)
    u = u + eps
    return u[:, :-1] / u[:, -1:]  # (B, C, H, W)


def iem_objective(
    x: torch.Tensor, m: torch.Tensor, taps: torch.Tensor, reps: int, lmbda: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """IEM's regularised objective per image (to maximise) and its inpainting error, both (B,).

        error(M) = sum M |X - phi(X(1-M), 1-M)| / |M|  +  sum (1-M) |X - phi(X M, M)| / |1-M|   (mean over channels)
        diversity(M) = sum M (X - mu_M)^2 + sum (1-M) (X - mu_(1-M))^2
        objective = error - lambda * diversity

    The error is 2 - C(F, B), the paper's negative coefficient of constraint between foreground and background.
    """
    fg, bg = x * m, x * (1 - m)  # (B, C, H, W)
    pred_fg = iem_inpaint(bg, 1 - m, taps, reps)  # the foreground as the background predicts it
    pred_bg = iem_inpaint(fg, m, taps, reps)
    area_fg, area_bg = m.sum((1, 2, 3)), (1 - m).sum((1, 2, 3))  # (B,)
    error = (m * (x - pred_fg).abs()).mean(1).sum((1, 2)) / area_fg + ((1 - m) * (x - pred_bg).abs()).mean(1).sum(
        (1, 2)
    ) / area_bg  # (B,)
    mu_fg = fg.sum((2, 3), keepdim=True) / m.sum((2, 3), keepdim=True)  # (B, C, 1, 1)
    mu_bg = bg.sum((2, 3), keepdim=True) / (1 - m).sum((2, 3), keepdim=True)
    diversity = (m * (x - mu_fg) ** 2).sum((1, 2, 3)) + ((1 - m) * (x - mu_bg) ** 2).sum((1, 2, 3))  # (B,)
    return error - lmbda * diversity, error


_FOUR_NEIGHBOURS = torch.tensor([[0.0, -1.0, 0.0], [-1.0, 4.0, -1.0], [0.0, -1.0, 0.0]]).view(1, 1, 3, 3)


def _mask_boundary(m: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) bool: pixels of either region with a 4-neighbour in the other (outside the image counts as 0)."""
    k = _FOUR_NEIGHBOURS.to(m)
    return (F.conv2d(m, k, padding=1) >= 0.5) | (F.conv2d(1 - m, k, padding=1) >= 0.5)


def iem(images: torch.Tensor, params: IEMParams | None = None) -> torch.Tensor:
    """IEM (Savarese et al., CVPR 2021): foreground masks (B, H, W) uint8 of images (B, C, H, W) in [-1, 1].

    Training-free, per image: the mask starts as a centred square and, `params.iters` times, (1) the gradient of the
    objective (`iem_objective`) with respect to the mask is taken, (2) every pixel on the mask's boundary with a
    non-zero gradient is set to 1 where the gradient is positive and to 0 where it is negative, (3) the mask is
    smoothed: a pixel is 1 where at least 4 pixels of its 3x3 neighbourhood (itself included, zero outside) are.
    The images of a batch are independent (one objective each, summed for the gradient). Deterministic: there is
    no random draw. An image whose mask empties (or fills) stops changing (its objective is undefined there).
    """
    if images.ndim != 4:
        raise ValueError(f"iem needs images (B, C, H, W), got shape {tuple(images.shape)}")
    b, _, h, w = images.shape
    p = params or iem_params(min(h, w))
    x = images.float()
    taps = _gaussian_taps(p.sigma, p.kernel_size).to(x.device)
    m = torch.zeros(b, 1, h, w, device=x.device)
    y0, x0 = int(p.margin * h), int(p.margin * w)  # the reference's size // 5 for margin 0.2
    m[..., y0 : h - y0, x0 : w - x0] = 1.0
    for _ in range(p.iters):
        m.requires_grad_(True)
        objective, _ = iem_objective(x, m, taps, p.reps, p.lmbda)
        (grad,) = torch.autograd.grad(objective.sum(), m)
        with torch.no_grad():
            grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)  # an empty region: no update
            update = _mask_boundary(m) & (grad != 0)
            m = torch.where(update, (grad > 0).float(), m.detach())
            m = (F.avg_pool2d(m, 3, 1, 1, divisor_override=1) >= 4).float()  # 3x3 sums (zero padded) >= 4
    return m[:, 0].to(torch.uint8).cpu()


# ---------------------------------------------------------------------------------------------------- segmenter
class IEMSegmenter:
    """IEM, inpainting error maximisation (`iem`), as a Segmenter (region 1 = foreground). `params` None: IEM's
    defaults scaled to each batch's image size (`iem_params`); images go `batch_size` at a time."""

    kind = "regions"
    class_names = ["background", "foreground"]

    def __init__(self, params: IEMParams | None = None, batch_size: int = 64, **overrides: Any):
        self.params, self.batch_size, self.overrides = params, batch_size, overrides

    def params_for(self, image_size: int) -> IEMParams:
        return self.params or iem_params(image_size, **self.overrides)

    def segment(self, images: torch.Tensor, seeds: Sequence[int] | None = None) -> Segmentation:
        p = self.params_for(min(images.shape[-2:]))
        masks = [iem(images[i : i + self.batch_size], p) for i in range(0, len(images), self.batch_size)]
        return Segmentation(labels=torch.cat(masks).long())
