"""The state of a training run: everything a training step touches and a checkpoint keeps (`TrainState`).

`diffseg.training.loop` builds and steps it; `diffseg.training.mask_levers` acts on it (restarts); neither imports
the other for it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffseg.models.builder import EMA
from diffseg.models.checkpoint import save_checkpoint
from diffseg.models.diffusion import GaussianDiffusion
from diffseg.training.config import TrainConfig


@dataclass
class TrainState:
    """Everything a training step touches and a checkpoint keeps."""

    cfg: TrainConfig
    model: nn.Module  # as trained: DDP-wrapped when distributed (unwrap(model) is the network)
    ema: EMA
    optimizer: torch.optim.Optimizer
    diffusion: GaussianDiffusion
    device: torch.device
    memory_format: torch.memory_format
    autocast_dtype: torch.dtype | None  # None = fp32
    step: int = 0
    history: list[list[float]] = field(default_factory=list)  # [[step, mean loss], ...] at every log step
    starts: list[int] = field(default_factory=list)  # the step of every (re)start: a resume is visible
    mlflow_run_id: str | None = None
    evals: list[dict[str, float]] = field(default_factory=list)  # mask diagnostics, each with its "step"
    restart_steps: list[int] = field(default_factory=list)  # steps at which the mask generator was restarted
    area_ema: torch.Tensor | None = None  # running (area per region, image dependence): the restart check
    levers: Any = None  # the factorized mask generator's levers (`mask_levers.MaskLevers`), built with the state
    train_seconds: float = 0.0  # wall time spent in `fit` over every (re)start, up to the last checkpoint

    @property
    def mask_restarts(self) -> int:
        return len(self.restart_steps)

    def extra(self) -> dict[str, Any]:
        return {
            "loss_history": self.history,
            "starts": self.starts,
            "mlflow_run_id": self.mlflow_run_id,
            "mask_diagnostics": self.evals,
            "mask_restarts": self.restart_steps,
            "train_seconds": self.train_seconds,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Model, EMA, optimizer, step and history in our checkpoint format (atomic)."""
        return save_checkpoint(
            path,
            config=self.cfg,
            model=self.model,
            ema=self.ema.model,
            optimizer=self.optimizer,
            step=self.step,
            extra=self.extra(),
        )
