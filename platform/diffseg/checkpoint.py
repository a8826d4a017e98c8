"""Checkpoints: our format, and importers for guided-diffusion `.pt` files.

Our format is one file written by `torch.save` holding only tensors, numbers, strings, lists and dicts, so it loads
with `weights_only=True` (no pickled code runs on load):

    {"format": "diffseg/1", "config": <resolved run config as JSON>, "model": state_dict, "ema": state_dict | None,
     "optimizer": optimizer state | None, "step": int, "extra": {...}}

Writes are atomic (a temp file in the same folder, then `os.replace`), so a killed writer never leaves a torn file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffseg.config import atomic_write, from_dict, to_dict
from diffseg.models import ModelConfig, build_model
from diffseg.unet import UNet, UNetConfig, unet_config_from_guided_flags

FORMAT = "diffseg/1"
CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class Checkpoint:
    config: dict[str, Any]  # the resolved run config (plain dict)
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    optimizer: dict[str, Any] | None
    step: int
    extra: dict[str, Any]

    @property
    def model_config(self) -> ModelConfig:
        if "model" not in self.config:
            raise KeyError("the checkpoint's config has no 'model' section")
        return from_dict(ModelConfig, self.config["model"], prefix="model")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _cpu(state: dict[str, Any] | None) -> dict[str, Any] | None:
    if state is None:
        return None
    return {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in state.items()}


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def save_checkpoint(
    path: str | os.PathLike,
    *,
    config: Any,
    model: nn.Module | dict[str, torch.Tensor],
    step: int,
    ema: nn.Module | dict[str, torch.Tensor] | None = None,
    optimizer: torch.optim.Optimizer | dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically; `config` is a config dataclass or a plain dict."""

    def sd(obj):
        if obj is None or isinstance(obj, dict):
            return obj
        return unwrap(obj).state_dict()

    payload = {
        "format": FORMAT,
        "config": json.dumps(to_dict(config)),
        "model": _cpu(sd(model)),
        "ema": _cpu(sd(ema)),
        "optimizer": sd(optimizer),
        "step": int(step),
        "extra": extra or {},
    }
    return atomic_torch_save(payload, path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a loadable checkpoint ({e})") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(
            f"{path}: not a diffseg checkpoint (no format {FORMAT!r}); "
            "use import_guided_diffusion for guided-diffusion files"
        )
    return Checkpoint(
        config=json.loads(payload["config"]),
        model=payload["model"],
        ema=payload.get("ema"),
        optimizer=payload.get("optimizer"),
        step=int(payload["step"]),
        extra=payload.get("extra") or {},
    )


def load_model(
    path: str | os.PathLike, use_ema: bool = True, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, Checkpoint]:
    """Rebuild the network a checkpoint was trained as and load its (EMA) weights; returns (model in eval, ckpt)."""
    ckpt = load_checkpoint(path, map_location)
    model = build_model(ckpt.model_config)
    weights = ckpt.ema if use_ema and ckpt.ema is not None else ckpt.model
    model.load_state_dict(weights)
    return model.eval().to(map_location), ckpt


def import_guided_diffusion(
    weights: str | os.PathLike | dict[str, torch.Tensor], flags: dict[str, Any] | UNetConfig
) -> UNet:
    """An ADM U-Net with the weights of an openai/guided-diffusion checkpoint (e.g. `lsun_horse.pt`).

    `flags` are the checkpoint's `create_model` flags (as a dict, e.g. from its README) or a UNetConfig. The state
    dict loads unchanged (strict): a missing or unexpected key is an error that lists them.
    """
    cfg = flags if isinstance(flags, UNetConfig) else unet_config_from_guided_flags(flags)
    if not isinstance(weights, dict):
        state = torch.load(weights, map_location="cpu", weights_only=True)
    else:
        state = weights
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    model = UNet(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"guided-diffusion weights do not match the flags: {len(missing)} missing keys {missing[:8]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:8]}"
        )
    return model.eval()


def convert_guided_diffusion(
    src: str | os.PathLike,
    flags: dict[str, Any],
    dst: str | os.PathLike,
    diffusion: dict[str, Any] | None = None,
) -> Path:
    """Write a guided-diffusion checkpoint in our format, so every job can take it as a backbone."""
    model = import_guided_diffusion(src, flags)
    config = {
        "model": to_dict(ModelConfig(kind="ddpm", unet=model.cfg)),
        "diffusion": diffusion
        or {
            "num_timesteps": int(flags.get("diffusion_steps", 1000)),
            "schedule": flags.get("noise_schedule", "linear"),
        },
        "source": str(src),
    }
    return save_checkpoint(dst, config=config, model=model, step=0, extra={"imported_from": "guided-diffusion"})


def export_weights(
    src: str | os.PathLike | Checkpoint,
    dst: str | os.PathLike,
    dtype: torch.dtype = torch.float16,
    use_ema: bool = True,
    extra: dict[str, Any] | None = None,
) -> Path:
    """An inference checkpoint: only the (EMA) weights, floating tensors cast to `dtype`, no optimizer.

    Half the size of the fp32 weights and a quarter of a training checkpoint (weights, EMA, AdamW moments), so a
    small model fits where files are capped. It is an ordinary checkpoint of our format: `load_model` rebuilds the
    fp32 network and `load_state_dict` casts the weights back (so jobs and Serve read it unchanged); it cannot resume
    training. A weight outside `dtype`'s range is an error rather than a silent inf.
    """
    ckpt = src if isinstance(src, Checkpoint) else load_checkpoint(src)
    weights = ckpt.ema if use_ema and ckpt.ema is not None else ckpt.model
    cast: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        if torch.is_floating_point(tensor):
            low = tensor.to(dtype)
            if not torch.isfinite(low).all() and torch.isfinite(tensor).all():
                raise ValueError(f"weight {name!r} overflows {dtype} (max |w| = {tensor.abs().max():.3g})")
            tensor = low
        cast[name] = tensor
    info = {
        "exported_from": str(src) if not isinstance(src, Checkpoint) else "checkpoint",
        "weights": "ema" if use_ema and ckpt.ema is not None else "model",
        "dtype": str(dtype).removeprefix("torch."),
    }
    return save_checkpoint(
        dst, config=ckpt.config, model=cast, step=ckpt.step, extra={**ckpt.extra, "export": {**info, **(extra or {})}}
    )
