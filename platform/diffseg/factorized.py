"""Factorized diffusion (Yuan & Maire): a U-Net whose denoiser is split into K regions it discovers itself.

    encoder + middle (shared, ADM)  ->  h_mid, skips
    mask generator (a decoder half with the same skip wiring, ending in a softmax over K)  ->  m (B, K, H, W)
    ONE decoder applied to each region: eps_k = D(h_mid, skips * m_k, t)
    eps = sum_k eps_k * m_k

Trained only with the DDPM loss; the masks that make the K partial denoisers cooperate segment the image. The K
decoder passes run as one batched call over B*K rows (weight sharing by construction, no Python loop), and module
names for the encoder and decoder are the ADM U-Net's, so a DDPM checkpoint can initialise them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffseg.unet import (
    UNetConfig,
    build_decoder,
    build_encoder,
    build_out,
    timestep_embedding,
    zero_init_residual_outputs,
)


@dataclass(frozen=True)
class FactorizedConfig:
    num_components: int = 3  # K, the number of regions (masks) the model factorizes an image into


# The paper's sizes (Yuan & Maire): the U-Net part of each, K from FactorizedConfig.
FACTORIZED_SIZES: dict[str, Callable[[], UNetConfig]] = {
    "tiny": lambda: UNetConfig(image_size=32, model_channels=16, channel_mult=(1, 2), attention_resolutions=(16,)),
    "small-64": lambda: UNetConfig(image_size=64, model_channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=1),
    # 64 px: 4 stages of 3 res blocks, channels C, 2C, 3C, 4C with C = 128
    "paper-64": lambda: UNetConfig(
        image_size=64,
        model_channels=128,
        num_res_blocks=3,
        channel_mult=(1, 2, 3, 4),
        attention_resolutions=(32, 16, 8),
        num_head_channels=64,
        use_scale_shift_norm=True,
        resblock_updown=True,
    ),  # fmt: skip
    # 128 px: 5 stages of 2 res blocks, channels C, C, 2C, 3C, 4C with C = 128
    "paper-128": lambda: UNetConfig(
        image_size=128,
        model_channels=128,
        num_res_blocks=2,
        channel_mult=(1, 1, 2, 3, 4),
        attention_resolutions=(32, 16, 8),
        num_head_channels=64,
        use_scale_shift_norm=True,
        resblock_updown=True,
    ),  # fmt: skip
}


class FactorizedUNet(nn.Module):
    """`forward(x_t, t, y=None) -> eps (B, C, H, W)`; `forward_with_masks` also returns the masks (B, K, H, W)."""

    def __init__(self, cfg: UNetConfig, fcfg: FactorizedConfig = FactorizedConfig()):
        super().__init__()
        if cfg.learn_sigma:
            raise ValueError("the factorized model predicts eps only: set learn_sigma=False")
        if fcfg.num_components < 1:
            raise ValueError(f"num_components must be >= 1, got {fcfg.num_components}")
        self.cfg, self.fcfg = cfg, fcfg
        self.num_components = fcfg.num_components
        emb_dim = cfg.model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(cfg.model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.num_classes is not None:
            self.label_emb = nn.Embedding(cfg.num_classes, emb_dim)
        self.input_blocks, self.middle_block, self.layout = build_encoder(cfg, emb_dim)
        # The mask generator: the decoder's wiring, its own weights.
        self.mask_blocks, mask_ch = build_decoder(cfg, emb_dim, self.layout)
        self.mask_out = build_out(mask_ch, fcfg.num_components)
        # The ONE shared decoder.
        self.output_blocks, ch = build_decoder(cfg, emb_dim, self.layout)
        self.out = build_out(ch, cfg.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        zero_init_residual_outputs(self)
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)
        # The mask head keeps PyTorch's default (random) init: zero logits would give every region 1/K everywhere,
        # and with one shared decoder the K branches would then stay identical (the gradient is symmetric in k).

    def embed(self, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels))  # (B, 4C)
        if self.cfg.num_classes is not None:
            if y is None:
                raise ValueError("this model is class-conditional: pass class labels y")
            emb = emb + self.label_emb(y)
        return emb

    def encode(self, x: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips, h = [], x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        return self.middle_block(h, emb), skips

    def masks(self, h_mid: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor) -> torch.Tensor:
        """Softmax masks (B, K, H, W) from the mask generator."""
        skips, h = list(skips), h_mid
        for block in self.mask_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.mask_out(h).float().softmax(dim=1)

    def _masked_skips(self, skips: list[torch.Tensor], masks: torch.Tensor) -> list[torch.Tensor]:
        """skips * m_k for every k, as (B*K, C_s, H_s, W_s): masks are area-resized to each skip's resolution."""
        b, k = masks.shape[:2]
        resized: dict[int, torch.Tensor] = {}
        out = []
        for skip, ds in zip(skips, self.layout.skip_ds):
            if ds not in resized:
                # Average pooling keeps the masks a partition of unity at every resolution.
                resized[ds] = F.avg_pool2d(masks, ds) if ds > 1 else masks  # (B, K, H/ds, W/ds)
            m = resized[ds].to(skip.dtype)
            masked = skip[:, None] * m[:, :, None]  # (B, K, C_s, H_s, W_s)
            out.append(masked.reshape(b * k, *skip.shape[1:]))
        return out

    def decode(self, h_mid: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor) -> torch.Tensor:
        """The shared decoder on one set of inputs (B', ...) -> eps (B', C, H, W)."""
        skips, h = list(skips), h_mid
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)

    def forward_with_masks(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (eps (B, C, H, W), masks (B, K, H, W), eps per region (B, K, C, H, W))."""
        b, k = x.shape[0], self.num_components
        emb = self.embed(t, y)
        h_mid, skips = self.encode(x, emb)
        masks = self.masks(h_mid, skips, emb)  # (B, K, H, W)
        eps_k = self.decode(
            _repeat_rows(h_mid, k),  # (B*K, C, h, w)
            self._masked_skips(skips, masks),
            emb.repeat_interleave(k, dim=0),
        ).reshape(b, k, -1, *x.shape[2:])  # (B, K, C, H, W)
        eps = (eps_k * masks[:, :, None].to(eps_k.dtype)).sum(dim=1)  # (B, C, H, W)
        return eps, masks, eps_k

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_with_masks(x, t, y)[0]

    def forward_looped(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The same function with a Python loop over the K regions: the reference the batched path is tested
        against, and the baseline of the batching benchmark."""
        emb = self.embed(t, y)
        h_mid, skips = self.encode(x, emb)
        masks = self.masks(h_mid, skips, emb)
        eps = 0
        for k in range(self.num_components):
            mk = masks[:, k : k + 1]
            skips_k = [s * (F.avg_pool2d(mk, ds) if ds > 1 else mk) for s, ds in zip(skips, self.layout.skip_ds)]
            eps = eps + self.decode(h_mid, skips_k, emb) * mk
        return eps


def _repeat_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """(B, C, H, W) -> (B*K, C, H, W), each row K times, in x's memory format: repeat_interleave returns NCHW, and
    an NCHW h_mid concatenated with channels_last skips would cost layout conversions in the first decoder block."""
    out = x.repeat_interleave(k, dim=0)
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def build_factorized(cfg: UNetConfig | str, fcfg: FactorizedConfig = FactorizedConfig()) -> FactorizedUNet:
    return FactorizedUNet(FACTORIZED_SIZES[cfg]() if isinstance(cfg, str) else cfg, fcfg)
