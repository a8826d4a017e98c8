"""Which network a run trains, built from config; and the EMA of its weights."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from diffseg.models.factorized import FactorizedConfig, FactorizedUNet
from diffseg.models.unet import UNet, UNetConfig


@dataclass(frozen=True)
class ModelConfig:
    kind: Literal["ddpm", "factorized"] = "ddpm"  # a plain ADM U-Net, or the factorized (K-region) U-Net
    unet: UNetConfig = field(default_factory=UNetConfig)  # widths, depths, attention, conditioning
    factorized: FactorizedConfig = field(default_factory=FactorizedConfig)  # K; used when kind == "factorized"


def build_model(cfg: ModelConfig) -> nn.Module:
    if cfg.kind == "ddpm":
        return UNet(cfg.unet)
    if cfg.kind == "factorized":
        return FactorizedUNet(cfg.unet, cfg.factorized)
    raise ValueError(f"model.kind: unknown model kind {cfg.kind!r}")


class EMA:
    """Exponential moving average of a model's parameters (buffers are copied), kept in float32.

    `decay` 0.9999 as in ADM and the factorized paper; `warmup_steps` ramps the decay up from 0 so that a short
    run's EMA is not dominated by the random initialisation (min(decay, (1 + step) / (10 + step)), as in
    `torch_ema`/DiT-style trainers).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, use_warmup: bool = True):
        self.decay, self.use_warmup = decay, use_warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.num_updates = 0
        self._plan: tuple[int, list, list, list, list] | None = None  # (id(model), targets, sources, buffers)

    def _pairs(self, model: nn.Module) -> tuple[list, list, list, list]:
        """The (EMA, model) parameter and buffer lists, matched by name once per source model: a small model's step
        takes well under a millisecond on a GPU, and rebuilding name dicts every step would cost more than it."""
        if self._plan is None or self._plan[0] != id(model):
            ema_params, ema_buffers = dict(self.model.named_parameters()), dict(self.model.named_buffers())
            params, buffers = list(model.named_parameters()), list(model.named_buffers())
            self._plan = (
                id(model),
                [ema_params[n] for n, _ in params],
                [p for _, p in params],
                [ema_buffers[n] for n, _ in buffers],
                [b for _, b in buffers],
            )
        return self._plan[1:]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        decay = self.decay
        if self.use_warmup:
            decay = min(decay, (1 + self.num_updates) / (10 + self.num_updates))
        targets, params, ema_buffers, buffers = self._pairs(model)
        sources = [p if p.dtype == t.dtype else p.to(t.dtype) for p, t in zip(params, targets)]
        # One fused kernel per dtype/device group instead of one lerp per tensor (hundreds of launches on a GPU).
        torch._foreach_lerp_(targets, sources, 1 - decay)
        if buffers:
            torch._foreach_copy_(ema_buffers, buffers)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int) -> None:
        self.model.load_state_dict(state)
        self.num_updates = num_updates
