"""The factorized mask generator's training levers, behind the one interface a training step calls (`MaskLevers`),
and the optimizer groups they need.

    MaskLevers(cfg)                              -> what `train_step` asks of the levers, each inert when off:
        .timesteps(B, T, generator, device)         the batch's t (more small t with `low_t_share`)
        .model_kwargs(step)                         the warm-up's mask mode for a step
        .wants_masks / .prior_loss(masks)           the anti-collapse priors on the step's own masks
        .after_step(state, masks)                   ReDO's autoRestart of a collapsed generator
    param_groups(model, optim_cfg)               -> AdamW groups (the mask generator's own lr / weight decay when asked)
    restore_optimizer(opt, model, resume, fused) -> a checkpoint's moments, laid out by the saved config's groups

The low-t factorization itself (`uniform_from_t`: masks 1/K above it) is part of the model's function
(`FactorizedUNet.forward_with_masks`), at inference too. `diffseg.training.loop` builds a `MaskLevers` with the train
state; this module imports the state (`diffseg.training.state`), not the loop. Nothing here imports Ray.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch import nn

from diffseg.core.config import from_dict
from diffseg.models.checkpoint import Checkpoint, unwrap
from diffseg.models.diffusion import sample_timesteps
from diffseg.models.factorized import (
    FactorizedUNet,
    mask_generator_parameters,
    mask_prior,
    reset_mask_generator,
    training_timesteps,
)
from diffseg.scoring.regions import mask_image_dependence
from diffseg.training.config import OptimConfig, TrainConfig
from diffseg.training.state import TrainState

log = logging.getLogger(__name__)


class MaskLevers:
    """The research levers of a run's config, asked by `train_step` at the points where they act. A DDPM's (or a
    factorized model's with every lever off) are inert: uniform t, no extra model arguments, no masks read."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.factorized = cfg.model.kind == "factorized"
        f = self.fcfg = cfg.model.factorized
        self.restarts = self.factorized and (f.restart_area > 0 or f.restart_dependence > 0)
        self.wants_masks = self.factorized and (f.area_weight > 0 or f.binarize_weight > 0 or self.restarts)

    def timesteps(self, batch_size: int, num_timesteps: int, generator: torch.Generator, device) -> torch.Tensor:
        """The batch's training timesteps (B,): uniform, or with a `low_t_share` of rows below `uniform_from_t`."""
        if self.factorized:
            return training_timesteps(batch_size, num_timesteps, self.fcfg, generator, device)
        return sample_timesteps(batch_size, num_timesteps, generator, device)

    def model_kwargs(self, step: int) -> dict[str, Any]:
        """Extra arguments of the model call at `step`: the warm-up's mask mode while it lasts."""
        mode = mask_mode(self.cfg, step)
        return {"mask_mode": mode} if mode is not None else {}

    def prior_loss(self, masks: torch.Tensor) -> torch.Tensor:
        """The priors' loss on the step's masks (B, K, H, W): the batch mean of each, summed (0 when none is on)."""
        return sum((v.mean() for v in mask_prior(masks, self.fcfg).values()), torch.zeros((), device=masks.device))

    def after_step(self, state: TrainState, masks: torch.Tensor) -> None:
        """After the optimizer step: restart a collapsed mask generator (`maybe_restart_masks`) when asked."""
        if self.restarts:
            maybe_restart_masks(state, masks)


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """One group at optim.lr, plus the factorized mask generator's own group when `mask_lr_scale` != 1 or it has
    its own `mask_weight_decay`."""
    own_decay = cfg.mask_weight_decay is not None and cfg.mask_weight_decay != cfg.weight_decay
    if (cfg.mask_lr_scale == 1 and not own_decay) or not isinstance(model, FactorizedUNet):
        return [{"params": list(model.parameters())}]
    mask = {id(p) for _, p in mask_generator_parameters(model)}
    group: dict[str, Any] = {
        "params": [p for p in model.parameters() if id(p) in mask],
        "lr": cfg.batch_lr * cfg.mask_lr_scale,
    }
    if own_decay:
        group["weight_decay"] = cfg.mask_weight_decay
    return [{"params": [p for p in model.parameters() if id(p) not in mask]}, group]


def restore_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, resume: Checkpoint, fused: bool) -> None:
    """Put a checkpoint's optimizer moments into `optimizer`, keeping `optimizer`'s hyperparameters (this config's
    optim.lr, weight_decay, mask_lr_scale): the saved state is loaded into an optimizer laid out as the saved config
    had it (its parameter groups), then handed over parameter by parameter."""
    saved = resume.config.get("optim") or {}
    known = {f.name for f in dataclasses.fields(OptimConfig)}
    old_cfg = from_dict(OptimConfig, {k: v for k, v in saved.items() if k in known}, "optim")
    old = torch.optim.AdamW(
        param_groups(model, old_cfg), lr=old_cfg.batch_lr, weight_decay=old_cfg.weight_decay, fused=fused
    )
    old.load_state_dict(resume.optimizer)
    for param, state in old.state.items():
        optimizer.state[param] = state


def mask_mode(cfg: TrainConfig, step: int) -> str | None:
    """The factorized warm-up's mask mode for the step about to run (None: no warm-up, or not factorized)."""
    fcfg = cfg.model.factorized
    if cfg.model.kind != "factorized" or step >= fcfg.mask_warmup_steps:
        return None
    return fcfg.mask_warmup


def maybe_restart_masks(state: TrainState, masks: torch.Tensor) -> bool:
    """ReDO's autoRestart: a region whose running mean area (an EMA over steps of the batch's mean) falls below
    `restart_area` within the first `restart_steps` steps has collapsed; so have masks whose running image
    dependence falls below `restart_dependence` (one split for every image: our failure mode, which no area test
    sees). Then the mask generator (and its EMA copy and optimizer state) is drawn afresh, at most `max_restarts`
    times. Returns whether it restarted."""
    fcfg = state.cfg.model.factorized
    if state.step > fcfg.restart_steps or state.mask_restarts >= fcfg.max_restarts:
        return False
    stats = masks.float().mean(dim=(0, 2, 3)).cpu()  # (K,) mean area per region
    stats = torch.cat([stats, torch.tensor([mask_image_dependence(masks)])])  # (K + 1,)
    state.area_ema = stats if state.area_ema is None else 0.9 * state.area_ema + 0.1 * stats
    area, dependence = float(state.area_ema[:-1].min()), float(state.area_ema[-1])
    collapsed = area < fcfg.restart_area or dependence < fcfg.restart_dependence
    if state.step - max([0, *state.restart_steps]) < 20 or not collapsed:  # 20 steps: let the EMA settle first
        return False
    model = unwrap(state.model)
    reset_mask_generator(model, seed=state.cfg.loop.seed * 1_000_003 + state.mask_restarts + 1)
    ema_params = dict(state.ema.model.named_parameters())
    for name, p in mask_generator_parameters(model):
        state.optimizer.state.pop(p, None)
        with torch.no_grad():
            ema_params[name].copy_(p)
    state.restart_steps.append(state.step)
    log.warning(
        "[train] step %d: min region area %.3f (restart_area %.3f), image dependence %.3f (restart_dependence %.3f): "
        "mask generator restarted (%d of at most %d)", state.step, area, fcfg.restart_area, dependence,
        fcfg.restart_dependence, state.mask_restarts, fcfg.max_restarts,
    )  # fmt: skip
    state.area_ema = None
    return True
