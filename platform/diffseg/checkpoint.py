"""Checkpoints: our format, THE loader (checkpoint -> model, diffusion, config), importers for guided-diffusion.

Our format is one file written by `torch.save` holding only tensors, numbers, strings, lists and dicts, so it loads
with `weights_only=True` (no pickled code runs on load):

    {"format": "diffseg/1", "config": <resolved run config as JSON>, "model": state_dict, "ema": state_dict | None,
     "optimizer": optimizer state | None, "step": int, "extra": {...}}

Writes are atomic (a temp file in the same folder, then `os.replace`), so a killed writer never leaves a torn file.

Every job, the sweeps and the Serve replicas get a network the same way:

    loaded = load_diffusion_model("runs/x/checkpoint.pt" | "runs/x" | "runs:/<run_id>/checkpoint", device="auto")
    loaded.model, loaded.diffusion, loaded.config, loaded.step     # model in eval mode on the device, no gradients
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
from diffseg.diffusion import DiffusionConfig, GaussianDiffusion
from diffseg.models import ModelConfig, build_model
from diffseg.runtime import resolve_device
from diffseg.unet import UNet, UNetConfig, unet_config_from_guided_flags

FORMAT = "diffseg/1"
CHECKPOINT_NAME = "checkpoint.pt"
# Config keys that checkpoints written by an older diffseg hold and this one no longer has (they were never read):
# dropped when a checkpoint's config is parsed, so old runs still load.
RETIRED_KEYS: dict[str, tuple[str, ...]] = {"diffusion": ("sample_steps", "eta", "clip_denoised")}
# Sources that are downloaded through MLflow's artifact API rather than read as local paths.
MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/", "s3://", "gs://", "wasbs://", "hdfs://", "dbfs:/")


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

    @property
    def diffusion_config(self) -> DiffusionConfig:
        """The process the network was trained with (the defaults when the config has no 'diffusion' section)."""
        data = dict(self.config.get("diffusion") or {})
        for key in RETIRED_KEYS["diffusion"]:
            data.pop(key, None)
        return from_dict(DiffusionConfig, data, prefix="diffusion")


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


def resolve_source(source: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local path, or an MLflow artifact URI (`runs:/<run_id>/checkpoint`, `models:/name@alias`, `s3://...`)
    downloaded with `mlflow.artifacts.download_artifacts` -> a local file or folder."""
    if str(source).startswith(MLFLOW_SCHEMES):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "1")
        import mlflow  # costs seconds: only when a URI asks for it

        dst = str(cache_dir) if cache_dir else None
        local = mlflow.artifacts.download_artifacts(artifact_uri=str(source), dst_path=dst)
        return Path(local)
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model source {str(source)!r}: no such file or folder")
    return path


@dataclass
class LoadedModel:
    """A trained network ready to use: what `load_diffusion_model` returns."""

    model: nn.Module  # in eval mode, on `device`, requires_grad off
    diffusion: GaussianDiffusion  # the process it was trained with (T, schedule)
    config: dict[str, Any]  # the run's resolved config (plain dict), as saved inside the checkpoint
    step: int  # the training step of the weights
    source: str  # what was asked for (a path or a URI)
    path: Path  # the local checkpoint file read
    weights: str  # "ema", "model" or "random"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def model_config(self) -> ModelConfig:
        return from_dict(ModelConfig, self.config["model"], prefix="model")


def load_diffusion_model(
    source: str | os.PathLike,
    device: str | torch.device | None = "auto",
    use_ema: bool = True,
    random_init: bool = False,
) -> LoadedModel:
    """THE loader: a checkpoint (a file, a run folder, or an MLflow artifact URI) -> network, diffusion, config.

    The network is rebuilt from the config inside and gets the EMA weights (`use_ema`, when the checkpoint has them)
    or the raw ones; `random_init=True` keeps the architecture and a fixed random init (seed 0, without touching the
    caller's RNG) for the random-features baseline. The model comes back in eval mode with gradients off.
    """
    path = resolve_source(source)
    ckpt = load_checkpoint(path)
    dev = resolve_device(device)
    if random_init:
        with torch.random.fork_rng(devices=[]):  # a fixed random init that leaves the caller's RNG alone
            torch.manual_seed(0)
            model = build_model(ckpt.model_config)
        weights = "random"
    else:
        model = build_model(ckpt.model_config)
        use = use_ema and ckpt.ema is not None
        model.load_state_dict(ckpt.ema if use else ckpt.model)
        weights = "ema" if use else "model"
    model = model.eval().requires_grad_(False).to(dev)
    return LoadedModel(
        model=model,
        diffusion=GaussianDiffusion.from_config(ckpt.diffusion_config),
        config=ckpt.config,
        step=ckpt.step,
        source=str(source),
        path=path if path.is_file() else path / CHECKPOINT_NAME,
        weights=weights,
    )


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
