"""guided-diffusion checkpoints in and out: the published ADM models as presets (their README's exact flags), importing
a guided-diffusion .pt as our checkpoint, exporting ours as one. Reads and writes go through
`diffseg.models.checkpoint`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffseg.core.config import atomic_write, to_dict
from diffseg.models.builder import ModelConfig
from diffseg.models.checkpoint import Checkpoint, _export_weights, load_checkpoint, save_checkpoint_as
from diffseg.models.integrity import atomic_torch_save
from diffseg.models.unet import (
    GUIDED_DIFFUSION_DEFAULTS,
    UNet,
    UNetConfig,
    guided_flags_from_unet_config,
    parse_guided_flags,
    unet_config_from_guided_flags,
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
    where = "guided-diffusion weights" if isinstance(weights, dict) else str(weights)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes that do not fit: other flags (a preset of another model?)
        raise ValueError(f"{where}: the weights do not fit the flags' network (size mismatch): {str(e)[:600]}") from e
    if missing or unexpected:
        raise ValueError(
            f"{where}: the weights do not match the flags: {len(missing)} missing keys {missing[:8]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:8]}"
        )
    return model.eval()


def diffusion_config_from_guided_flags(flags: dict[str, Any]) -> dict[str, Any]:
    """The process a guided-diffusion flag set describes, as our `diffusion` config section.

    Sampling-only flags (timestep_respacing) and training-only ones (use_kl, rescale_learned_sigmas) do not change
    what the network computes and are ignored; flags that do and that we do not implement are an error."""
    f = {**GUIDED_DIFFUSION_DEFAULTS, **{k: v for k, v in flags.items() if k in GUIDED_DIFFUSION_DEFAULTS}}
    steps = int(f["diffusion_steps"])
    if f["predict_xstart"]:
        raise ValueError("predict_xstart=True: the network predicts x_0, not eps; diffseg's process predicts eps")
    if f["rescale_timesteps"] and steps != 1000:
        raise ValueError("rescale_timesteps=True with diffusion_steps != 1000 feeds the network t * 1000 / T")
    if f["noise_schedule"] not in ("linear", "cosine"):
        raise ValueError(f"noise_schedule {f['noise_schedule']!r}: diffseg has linear and cosine")
    return {"num_timesteps": steps, "schedule": f["noise_schedule"]}


@dataclass(frozen=True)
class GuidedPreset:
    """A published guided-diffusion (ADM) checkpoint: its file, where it is published, and its MODEL_FLAGS."""

    file: str  # the checkpoint's file name as published
    url: str  # where it is downloaded from
    flags: str  # its MODEL_FLAGS, as the README that publishes it writes them
    note: str  # what it is


_IMAGENET_256_FLAGS = (
    "--attention_resolutions 32,16,8 --class_cond {cond} --diffusion_steps 1000 --image_size 256 --learn_sigma True "
    "--noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 --resblock_updown True "
    "--use_fp16 True --use_scale_shift_norm True"
)
_ADM = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021"

_LSUN_FLAGS = (  # openai/guided-diffusion README, "LSUN models"; ddpm-segmentation trains FFHQ-256 with the same flags
    "--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --dropout 0.1 --image_size 256 "
    "--learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 "
    "--resblock_updown True --use_fp16 True --use_scale_shift_norm True"
)

# The published ADM checkpoints and the exact flags of the README that publishes them (openai/guided-diffusion, and
# yandex-research/ddpm-segmentation for FFHQ-256: scripts/ddpm/train_interpreter.sh). The LSUN and FFHQ models are the
# label-efficient paper's backbones (blocks dec.5,6,7,8,12 at t = 50,150,250).
GUIDED_PRESETS: dict[str, GuidedPreset] = {
    "lsun_bedroom": GuidedPreset(
        "lsun_bedroom.pt", f"{_ADM}/lsun_bedroom.pt", _LSUN_FLAGS, "LSUN bedroom 256, unconditional"
    ),
    "lsun_cat": GuidedPreset("lsun_cat.pt", f"{_ADM}/lsun_cat.pt", _LSUN_FLAGS, "LSUN cat 256, unconditional"),
    "lsun_horse": GuidedPreset("lsun_horse.pt", f"{_ADM}/lsun_horse.pt", _LSUN_FLAGS, "LSUN horse 256, unconditional"),
    "lsun_horse_nodropout": GuidedPreset(
        "lsun_horse_nodropout.pt", f"{_ADM}/lsun_horse_nodropout.pt",
        _LSUN_FLAGS.replace("--dropout 0.1", "--dropout 0.0"),
        "LSUN horse 256 trained without dropout",
    ),
    "ffhq": GuidedPreset(
        "ffhq.pt", "https://storage.yandexcloud.net/yandex-research/ddpm-segmentation/models/ddpm_checkpoints/ffhq.pt",
        _LSUN_FLAGS, "FFHQ-256, unconditional (trained by the label-efficient paper's authors)",
    ),
    "imagenet64": GuidedPreset(
        "64x64_diffusion.pt", f"{_ADM}/64x64_diffusion.pt",
        "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --dropout 0.1 --image_size 64 "
        "--learn_sigma True --noise_schedule cosine --num_channels 192 --num_head_channels 64 --num_res_blocks 3 "
        "--resblock_updown True --use_new_attention_order True --use_fp16 True --use_scale_shift_norm True",
        "ImageNet 64, class-conditional (1000 classes), cosine schedule",
    ),
    "imagenet128": GuidedPreset(
        "128x128_diffusion.pt", f"{_ADM}/128x128_diffusion.pt",
        "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 128 --learn_sigma True "
        "--noise_schedule linear --num_channels 256 --num_heads 4 --num_res_blocks 2 --resblock_updown True "
        "--use_fp16 True --use_scale_shift_norm True",
        "ImageNet 128, class-conditional",
    ),
    "imagenet256": GuidedPreset(
        "256x256_diffusion.pt", f"{_ADM}/256x256_diffusion.pt", _IMAGENET_256_FLAGS.format(cond="True"),
        "ImageNet 256, class-conditional",
    ),
    "imagenet256_uncond": GuidedPreset(
        "256x256_diffusion_uncond.pt", f"{_ADM}/256x256_diffusion_uncond.pt", _IMAGENET_256_FLAGS.format(cond="False"),
        "ImageNet 256, unconditional",
    ),
    "imagenet512": GuidedPreset(
        "512x512_diffusion.pt", f"{_ADM}/512x512_diffusion.pt",
        "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 512 --learn_sigma True "
        "--noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 --resblock_updown True "
        "--use_fp16 False --use_scale_shift_norm True",
        "ImageNet 512, class-conditional",
    ),
}  # fmt: skip


def guided_preset_flags(name: str) -> dict[str, Any]:
    """The flags dict of a published checkpoint (`GUIDED_PRESETS`), with an error that lists the names."""
    if name not in GUIDED_PRESETS:
        raise KeyError(f"unknown guided-diffusion preset {name!r}; known: {sorted(GUIDED_PRESETS)}")
    return parse_guided_flags(GUIDED_PRESETS[name].flags)


def guided_checkpoint(
    src: str | os.PathLike | dict[str, torch.Tensor],
    flags: dict[str, Any],
    diffusion: dict[str, Any] | None = None,
    preset: str | None = None,
) -> Checkpoint:
    """A guided-diffusion checkpoint as one of ours, in memory: the network its flags describe (strict load), the
    process they describe unless `diffusion` is given; the flags (and preset) travel in `extra`."""
    model = import_guided_diffusion(src, flags)
    config = {
        "model": to_dict(ModelConfig(kind="ddpm", unet=model.cfg)),
        "diffusion": diffusion or diffusion_config_from_guided_flags(flags),
        "source": str(src) if not isinstance(src, dict) else "state dict",
    }
    extra = {"imported_from": "guided-diffusion", "guided_flags": json.dumps(flags), "preset": preset or ""}
    return Checkpoint(config=config, model=model.state_dict(), ema=None, optimizer=None, step=0, extra=extra)


def convert_guided_diffusion(
    src: str | os.PathLike,
    flags: dict[str, Any],
    dst: str | os.PathLike,
    diffusion: dict[str, Any] | None = None,
    preset: str | None = None,
) -> Path:
    """Write a guided-diffusion checkpoint in our format, so every job can take it as a backbone."""
    return save_checkpoint_as(guided_checkpoint(src, flags, diffusion, preset), dst)


def export_guided_diffusion(
    src: str | os.PathLike | Checkpoint, dst: str | os.PathLike, use_ema: bool = True
) -> tuple[Path, dict[str, Any]]:
    """A guided-diffusion checkpoint: the bare state dict (`torch.save`, fp32; our U-Net's keys are guided-diffusion's)
    at `dst`, and its flags beside it (`dst` with .json: create_model + diffusion flags, the form of the reference
    vectors' .json) -> (the .pt, the flags). `scripts/image_sample.py` of openai/guided-diffusion loads it with those
    flags; `import_guided_diffusion` / `jobs/convert_checkpoint.py flags=...` bring it back. DDPM U-Nets only: the
    factorized model has no guided-diffusion counterpart."""
    ckpt = src if isinstance(src, Checkpoint) else load_checkpoint(src)
    model_cfg, diff_cfg = ckpt.model_config, ckpt.diffusion_config
    if model_cfg.kind != "ddpm":
        raise ValueError(f"a {model_cfg.kind} model has no guided-diffusion counterpart; export it to safetensors")
    flags = {
        **guided_flags_from_unet_config(model_cfg.unet),
        "diffusion_steps": diff_cfg.num_timesteps,
        "noise_schedule": diff_cfg.schedule,
    }
    weights, _ = _export_weights(ckpt, use_ema)
    state = {k: (v.float() if torch.is_floating_point(v) else v).detach().cpu().clone() for k, v in weights.items()}
    out = atomic_torch_save(state, dst)
    text = json.dumps(flags, indent=1)
    atomic_write(out.with_suffix(".json"), lambda tmp: Path(tmp).write_text(text))
    return out, flags


def guided_model_flags(flags: dict[str, Any]) -> str:
    """A flags dict as the MODEL_FLAGS string guided-diffusion's scripts take ("--image_size 256 ...")."""
    return " ".join(f"--{k} {v}" for k, v in flags.items())
