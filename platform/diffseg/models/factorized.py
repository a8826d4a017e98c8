"""Factorized diffusion (Yuan & Maire): a U-Net whose denoiser is split into K regions it discovers itself.

    encoder + middle (shared, ADM)  ->  h_mid, skips
    mask generator (a decoder half with the same skip wiring, ending in a softmax over K)  ->  m (B, K, H, W)
    ONE decoder applied to each region: eps_k = D(h_mid, skips * m_k, t)
    eps = sum_k eps_k * m_k

Trained only with the DDPM loss; the masks that make the K partial denoisers cooperate segment the image. The K
decoder passes run as one batched call over B*K rows (weight sharing by construction, no Python loop), and module
names for the encoder and decoder are the ADM U-Net's, so a DDPM checkpoint can initialise them.

Variants (all off by default; the paper's recipe is the default). They exist because, at small scale, the uniform-t
denoising objective first rewards a FIXED spatial split of the image (a band that ignores the content), and the
masks collapse onto it early and stay there (see docs/factorized.md and `diffseg.experiments.ablation`):

- `decoding` (the paper's Table 6 schemes, as we read them): `masked_skips` (the paper: only the skips are masked),
  `masked_skips_and_mid` (h_mid masked too, so no branch sees the whole image), `mask_channel` (no masking: the
  decoder gets m_k as an extra input channel at the bottom, the ablation without the bottleneck), `parallel` (K
  decoders without weight sharing).
- `mask_grad_max_t`: the mask generator learns only from timesteps below this (at high t the image is invisible, so
  the only thing a mask can encode there is position).
- `uniform_from_t` (with `low_t_share`): factorize only at small t; above it the masks are 1/K and learn nothing.
- `UNetConfig.padding_mode = "circular"` (with `DataConfig.roll` / `crop_scale`): no absolute-position cue, so a
  fixed split cannot be expressed at all.
- `forward(..., mask_mode=...)`: "uniform" (masks 1/K: the decoder warms up as a plain DDPM) or "frozen" (the mask
  generator's gradient is zero) for a warm-up; the loop sets it from `FactorizedConfig.mask_warmup_*`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from diffseg.models.diffusion import sample_timesteps
from diffseg.models.unet import (
    UNetConfig,
    UNetTrunk,
    build_decoder,
    build_out,
    named_size,
    set_padding_mode,
    zero_init_residual_outputs,
)

Decoding = Literal["masked_skips", "masked_skips_and_mid", "mask_channel", "parallel"]
MaskMode = Literal["learned", "uniform", "frozen"]


@dataclass(frozen=True)
class FactorizedConfig:
    num_components: int = 3  # K, the number of regions (masks) the model factorizes an image into
    decoding: Decoding = "masked_skips"  # how the decoder sees region k (the paper's Table 6); see the module doc
    mask_grad_max_t: int = 0  # the mask generator learns only from timesteps t < this; 0 = from every t (the paper)
    uniform_from_t: int = 0  # factorize only below this t: rows with t >= it get masks 1/K (the decoder is a plain
    # DDPM there) and give the mask generator no gradient, in training and at inference; 0 = off (the paper). At
    # large t ground-truth masks do not lower the eps-MSE, but a fixed band does: that is where collapse comes from
    low_t_share: float = 0.0  # share of each training batch's rows whose t is drawn uniformly from [0,
    # uniform_from_t) instead of [0, T): only those rows teach the mask generator, and uniform t puts just
    # uniform_from_t / T of them there (10 % at 100). It reweights the denoising objective toward small t (the DDPM
    # half of the model sees more small t); 0 = uniform t (the paper)
    mask_warmup_steps: int = 0  # first N training steps with masks per mask_warmup (0 = no warm-up, the paper)
    mask_warmup: Literal["uniform", "frozen"] = "uniform"  # warm-up: masks 1/K, or the mask generator not learning
    # Anti-collapse priors of the unsupervised-segmentation literature (all off by default; see `mask_prior`):
    min_area: float = 0.0  # PerturbGAN's minimum-area hinge target c: relu(c - mean_hw m_k) per image and region
    area_weight: float = 0.0  # weight of that hinge in the loss (0 = off); a region cannot vanish
    binarize_weight: float = 0.0  # weight of PerturbGAN's binarisation term mean(min(m, 1 - m)) (0 = off)
    restart_area: float = 0.0  # ReDO's autoRestart: re-initialise the mask generator when a region's running mean
    # area falls below this during the first `restart_steps` steps (0 = off); a collapsed start is thrown away
    restart_dependence: float = 0.0  # also restart when the running image dependence of the batch's masks
    # (`metrics.mask_image_dependence`) falls below this: the fixed-split collapse, where no region vanishes (0 = off)
    restart_steps: int = 0  # the window of steps in which a collapse restarts the mask generator
    max_restarts: int = 5  # restarts at most (then the run goes on as it is, and says so)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times `scale` backward (keeps the graph, so DDP sees every parameter used)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


class FactorizedUNet(UNetTrunk):
    """`forward(x_t, t, y=None) -> eps (B, C, H, W)`; `forward_with_masks` also returns the masks (B, K, H, W)."""

    def __init__(self, cfg: UNetConfig, fcfg: FactorizedConfig = FactorizedConfig()):
        if cfg.learn_sigma:
            raise ValueError("the factorized model predicts eps only: set learn_sigma=False")
        if fcfg.num_components < 1:
            raise ValueError(f"num_components must be >= 1, got {fcfg.num_components}")
        if not 0 <= fcfg.low_t_share <= 1 or (fcfg.low_t_share > 0 and fcfg.uniform_from_t < 1):
            raise ValueError(
                f"model.factorized.low_t_share={fcfg.low_t_share}: must be in [0, 1], and needs uniform_from_t > 0 "
                "(the rows it draws are those below uniform_from_t)"
            )
        super().__init__(cfg)
        self.fcfg = fcfg
        self.num_components = fcfg.num_components
        # The mask generator: the decoder's wiring, its own weights.
        self.mask_blocks, mask_ch = build_decoder(cfg, self.emb_dim, self.layout)
        self.mask_out = build_out(mask_ch, fcfg.num_components)
        if fcfg.decoding == "parallel":
            # K decoders without weight sharing (Table 6's control): names decoders.k.{blocks,out}.
            self.decoders = nn.ModuleList()
            for _ in range(fcfg.num_components):
                blocks, ch = build_decoder(cfg, self.emb_dim, self.layout)
                self.decoders.append(nn.ModuleDict({"blocks": blocks, "out": build_out(ch, cfg.out_channels)}))
        else:
            # The ONE shared decoder; with mask_channel its bottom input has one more channel (m_k).
            layout = self.layout
            if fcfg.decoding == "mask_channel":
                layout = replace(layout, channels=layout.channels + 1)
            self.output_blocks, ch = build_decoder(cfg, self.emb_dim, layout)
            self.out = build_out(ch, cfg.out_channels)
        self.initialize_weights()
        set_padding_mode(self, cfg.padding_mode)

    def initialize_weights(self) -> None:
        # ADM's init for every residual branch and the output conv(s). The mask head keeps PyTorch's default (random)
        # init: zero logits would give every region 1/K everywhere, and with one shared decoder the K branches would
        # then stay identical (the gradient is symmetric in k).
        zero_init_residual_outputs(self)
        for out in [d["out"] for d in self.decoders] if self.fcfg.decoding == "parallel" else [self.out]:
            nn.init.zeros_(out[-1].weight)
            nn.init.zeros_(out[-1].bias)

    def masks(self, h_mid: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor) -> torch.Tensor:
        """Softmax masks (B, K, H, W) from the mask generator."""
        h = self.run_decoder(self.mask_blocks, h_mid, skips, emb)  # (B, C, H, W)
        return self.mask_out(h).float().softmax(dim=1)  # (B, K, H, W)

    def _masked_skips(self, skips: list[torch.Tensor], masks: torch.Tensor) -> list[torch.Tensor]:
        """skips * m_k for every k, as (B*K, C_s, H_s, W_s): masks are area-resized to each skip's resolution."""
        b, k = masks.shape[:2]
        out = []
        for skip, ds in zip(skips, self.layout.skip_ds):
            m = _pool(masks, ds).to(skip.dtype)  # (B, K, H/ds, W/ds)
            masked = skip[:, None] * m[:, :, None]  # (B, K, C_s, H_s, W_s)
            out.append(masked.reshape(b * k, *skip.shape[1:]))
        return out

    def decode(self, h_mid: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor) -> torch.Tensor:
        """The shared decoder on one set of inputs (B', ...) -> eps (B', C, H, W)."""
        return self.out(self.run_decoder(self.output_blocks, h_mid, skips, emb))

    def _region_inputs(
        self, h_mid: torch.Tensor, skips: list[torch.Tensor], masks: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The decoder's inputs for all K regions, stacked as B*K rows: (h (B*K, ...), skips [(B*K, ...)])."""
        k, decoding = self.num_components, self.fcfg.decoding
        h = _repeat_rows(h_mid, k)  # (B*K, C_mid, h, w)
        m_mid = _pool(masks, self.layout.ds).reshape(-1, 1, *h_mid.shape[2:]).to(h.dtype)  # (B*K, 1, h, w)
        if decoding == "mask_channel":  # no bottleneck: every branch sees everything, and its mask
            return torch.cat([h, m_mid], dim=1), [_repeat_rows(s, k) for s in skips]
        if decoding == "masked_skips_and_mid":
            h = h * m_mid
        return h, self._masked_skips(skips, masks)

    def forward_with_masks(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        mask_mode: MaskMode = "learned",
        masks: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (eps (B, C, H, W), masks (B, K, H, W), eps per region (B, K, C, H, W)).

        `mask_mode` (training warm-ups): "uniform" uses masks 1/K, "frozen" the learned masks with no gradient to the
        mask generator. In training mode, `mask_grad_max_t` cuts the mask gradient of rows with t >= it.
        `masks` (B, K, H, W) replaces the mask generator with given masks (the oracle experiment,
        `diffseg.experiments.oracle`).
        """
        b, k = x.shape[0], self.num_components
        emb = self.embed(t, y)  # (B, 4C)
        h_mid, skips = self.encode(x, emb)  # (B, C_mid, h, w), skips
        if masks is not None:
            if masks.shape != (b, k, *x.shape[2:]):
                raise ValueError(f"masks must be (B, K={k}, H, W) = {(b, k, *x.shape[2:])}, got {tuple(masks.shape)}")
            masks = masks.float()
        else:
            masks = self.masks(h_mid, skips, emb)  # (B, K, H, W)
        if mask_mode == "uniform":
            masks = _ScaleGrad.apply(masks, 0.0) * 0 + 1.0 / k  # still in the graph: DDP sees the parameters used
        elif mask_mode == "frozen":
            masks = _ScaleGrad.apply(masks, 0.0)
        elif self.training and self.fcfg.mask_grad_max_t > 0:
            low_t = (t < self.fcfg.mask_grad_max_t)[:, None, None, None]  # (B, 1, 1, 1)
            masks = torch.where(low_t, masks, _ScaleGrad.apply(masks, 0.0))
        if self.fcfg.uniform_from_t > 0 and mask_mode != "uniform":
            high_t = (t >= self.fcfg.uniform_from_t)[:, None, None, None]  # (B, 1, 1, 1)
            masks = torch.where(high_t, torch.full_like(masks, 1.0 / k), masks)  # no gradient through those rows
        if self.fcfg.decoding == "parallel":
            eps_k = torch.stack([self._decode_parallel(i, h_mid, skips, masks, emb) for i in range(k)], dim=1)
        else:
            h, region_skips = self._region_inputs(h_mid, skips, masks)
            eps_k = self.decode(h, region_skips, emb.repeat_interleave(k, dim=0))
            eps_k = eps_k.reshape(b, k, -1, *x.shape[2:])  # (B, K, C, H, W)
        eps = (eps_k * masks[:, :, None].to(eps_k.dtype)).sum(dim=1)  # (B, C, H, W)
        return eps, masks, eps_k

    def _decode_parallel(
        self, i: int, h_mid: torch.Tensor, skips: list[torch.Tensor], masks: torch.Tensor, emb: torch.Tensor
    ) -> torch.Tensor:
        """Region i through its own decoder (decoding="parallel") -> eps_i (B, C, H, W)."""
        mi = masks[:, i : i + 1]  # (B, 1, H, W)
        skips_i = [s * _pool(mi, ds).to(s.dtype) for s, ds in zip(skips, self.layout.skip_ds)]
        decoder = self.decoders[i]
        return decoder["out"](self.run_decoder(decoder["blocks"], h_mid, skips_i, emb))

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        mask_mode: MaskMode = "learned",
        masks: torch.Tensor | None = None,
        return_masks: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """eps (B, C, H, W); with `return_masks`, (eps, masks (B, K, H, W)): the training loop's priors need the
        masks of the same forward pass, through the (DDP-wrapped) module call."""
        eps, m, _ = self.forward_with_masks(x, t, y, mask_mode, masks)
        return (eps, m) if return_masks else eps

    def forward_looped(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The same function (default decoding) with a Python loop over the K regions: the reference the batched
        path is tested against, and the baseline of the batching benchmark."""
        emb = self.embed(t, y)
        h_mid, skips = self.encode(x, emb)
        masks = self.masks(h_mid, skips, emb)
        eps = 0
        for k in range(self.num_components):
            mk = masks[:, k : k + 1]
            skips_k = [s * _pool(mk, ds) for s, ds in zip(skips, self.layout.skip_ds)]
            eps = eps + self.decode(h_mid, skips_k, emb) * mk
        return eps


def training_timesteps(
    batch_size: int, num_timesteps: int, fcfg: FactorizedConfig, generator: torch.Generator, device
) -> torch.Tensor:
    """Training timesteps (B,): uniform over [0, T), except that a `low_t_share` of the rows (the first
    round(share * B)) are uniform over [0, uniform_from_t), the range where the masks learn."""
    t = sample_timesteps(batch_size, num_timesteps, generator, device)  # (B,)
    n_low = round(fcfg.low_t_share * batch_size) if fcfg.uniform_from_t > 0 else 0
    if n_low:
        low = sample_timesteps(n_low, min(fcfg.uniform_from_t, num_timesteps), generator, device)  # (n_low,)
        t = torch.cat([low, t[n_low:]])
    return t


def mask_prior(masks: torch.Tensor, fcfg: FactorizedConfig) -> dict[str, torch.Tensor]:
    """The anti-collapse priors on soft masks (B, K, H, W), per image (B,), each already weighted (empty when off).

        area     = area_weight * sum_k relu(min_area - mean_hw m_k)       (PerturbGAN, Bielski & Favaro 2019)
        binarize = binarize_weight * mean_{k,h,w} min(m_k, 1 - m_k)       (ibid.: pushes masks to 0/1)

    The denoising loss alone admits a region that covers nothing; the hinge makes every region keep at least
    `min_area` of each image, and the binarisation term makes soft masks commit (a soft, blurred split lets the
    K decoders share the work without dividing the image).
    """
    out: dict[str, torch.Tensor] = {}
    m = masks.float()
    if fcfg.area_weight > 0:
        area = m.mean(dim=(2, 3))  # (B, K)
        out["area"] = fcfg.area_weight * F.relu(fcfg.min_area - area).sum(dim=1)  # (B,)
    if fcfg.binarize_weight > 0:
        out["binarize"] = fcfg.binarize_weight * torch.minimum(m, 1 - m).mean(dim=(1, 2, 3))  # (B,)
    return out


def mask_generator_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The mask generator's (name, parameter) pairs: the decoder half ending in the softmax (`mask_blocks`,
    `mask_out`). It is what the mask generator's own learning rate, weight decay and restarts act on."""
    return [(n, p) for n, p in model.named_parameters() if n.startswith(("mask_blocks.", "mask_out."))]


def reset_mask_generator(model: FactorizedUNet, seed: int) -> None:
    """Draw the mask generator's weights afresh (seeded), as `initialize_weights` would: PyTorch's default init,
    zeroed residual outputs, the mask head random (ReDO's autoRestart; the encoder and decoder keep theirs)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in [*model.mask_blocks.modules(), *model.mask_out.modules()]:
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        zero_init_residual_outputs(model.mask_blocks)


def _pool(masks: torch.Tensor, ds: int) -> torch.Tensor:
    """Area-resize masks to 1/ds of their size: average pooling keeps them a partition of unity at every scale."""
    return F.avg_pool2d(masks, ds) if ds > 1 else masks


def _repeat_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """(B, C, H, W) -> (B*K, C, H, W), each row K times, in x's memory format: repeat_interleave returns NCHW, and
    an NCHW h_mid concatenated with channels_last skips would cost layout conversions in the first decoder block."""
    out = x.repeat_interleave(k, dim=0)
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def build_factorized(cfg: UNetConfig | str, fcfg: FactorizedConfig = FactorizedConfig()) -> FactorizedUNet:
    return FactorizedUNet(named_size(cfg) if isinstance(cfg, str) else cfg, fcfg)
