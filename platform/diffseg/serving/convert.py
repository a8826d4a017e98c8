"""Checkpoints in and out of diffseg: the body of `jobs/convert_checkpoint.py`.

    guided-diffusion .pt (+ a preset or its MODEL_FLAGS)  ->  ours (checkpoint.pt), safetensors + config.json
    ours, a safetensors export, an MLflow model URI        ->  ours, safetensors + config.json, guided-diffusion .pt

The published ADM checkpoints are presets (`diffseg.models.guided.GUIDED_PRESETS`: lsun_bedroom, lsun_cat, lsun_horse,
lsun_horse_nodropout, ffhq, imagenet64, imagenet128, imagenet256, imagenet256_uncond, imagenet512) with the exact flags
of the README that publishes them, so a label-efficient backbone is one command away:

    python jobs/convert_checkpoint.py preset=lsun_horse src=lsun_horse.pt dst=runs/backbones/lsun_horse.pt

Every conversion is checked: the written file is read back by the loader that will read it (ours, the safetensors
reader, or the guided-diffusion importer) and must give the source network's output on a fixed input, bit for bit
(`convert/max_abs_diff`, 0 for fp32). The job is an MLflow run; `tracking.register_as=<name>` also logs the result
as an MLflow model and registers it (`models:/<name>/<version>`, a backbone any job or Serve can name).

Re-sealing: a file of ours without its integrity record (written before checksums existed) is refused by every
loader. `allow_unverified=true` reads such a source anyway, prints what it is (format, tensors, step, model, the
file's SHA-256) and writes `dst` with a fresh record, once; from then on `dst` verifies like any other file. This
works for checkpoints and for pixel-segmenter bundles (`to=diffseg`):

    python jobs/convert_checkpoint.py src=old/checkpoint.pt dst=runs/x/checkpoint.pt allow_unverified=true
"""

from __future__ import annotations

import dataclasses
import json
import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from diffseg.core import storage
from diffseg.core.config import ConfigError, Name, to_dict
from diffseg.core.tracking import Tracker, TrackingConfig
from diffseg.models.builder import build_model
from diffseg.models.checkpoint import (
    FORMAT,
    INTEGRITY_KEY,
    KINDS,
    Checkpoint,
    describe_payload,
    export_safetensors,
    fetched_source,
    is_fetched,
    load_checkpoint,
    read_payload,
    reseal_payload,
    save_checkpoint_as,
)
from diffseg.models.guided import (
    GUIDED_PRESETS,
    export_guided_diffusion,
    guided_checkpoint,
    guided_model_flags,
    guided_preset_flags,
    import_guided_diffusion,
)
from diffseg.models.unet import parse_guided_flags
from diffseg.serving.pyfunc import log_checkpoint_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConvertConfig:
    src: str = ""  # what to convert: a guided-diffusion .pt, our checkpoint (file or run folder), a safetensors
    # export folder, or an MLflow URI (models:/<name>@<alias>, runs:/<id>/checkpoint)
    dst: str = ""  # where to write: a file for to=diffseg / guided-diffusion, a folder for to=safetensors
    to: Literal["diffseg", "safetensors", "guided-diffusion"] = "diffseg"  # the format to write
    preset: str = ""  # importing guided-diffusion: a published model's flags (lsun_horse, ffhq, imagenet256, ...)
    flags: str = ""  # ... or its MODEL_FLAGS ("--image_size 256 --learn_sigma True ...") or a .json of flags
    use_ema: bool = True  # exports: the EMA weights when the checkpoint has them (else the raw weights)
    verify: bool = True  # read the result back and compare its output with the source's on a fixed input
    allow_unverified: bool = False  # read a src of ours that has no integrity record (an old file): print what it is
    # and write dst sealed (re-sealing it once); without it such a src is refused
    name: Name = "convert"  # the MLflow run's name
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(log_models=False))  # MLflow; with
    # register_as=<name> the result is also logged as an MLflow model and registered

    def check(self) -> None:
        """Cross-field checks (run by --dry-run and before the job)."""
        if not self.src or not self.dst:
            raise ValueError(f"src and dst are required (src={self.src!r}, dst={self.dst!r})")
        if self.preset and self.preset not in GUIDED_PRESETS:
            raise ValueError(f"preset: unknown {self.preset!r}; known: {sorted(GUIDED_PRESETS)}")
        if self.preset and self.flags:
            raise ValueError("preset and flags: give one of them")


def read_flags(cfg: ConvertConfig, src: Path) -> dict[str, Any] | None:
    """The guided-diffusion flags of `src`: the preset's, `flags` (a MODEL_FLAGS string or a .json file), or the
    .json beside src (what `export_guided_diffusion` writes); None when nothing says."""
    if cfg.preset:
        return guided_preset_flags(cfg.preset)
    if cfg.flags:
        if cfg.flags.strip().startswith("--"):
            return parse_guided_flags(cfg.flags)
        return json.loads(Path(cfg.flags).read_text())
    beside = src.with_suffix(".json")
    return json.loads(beside.read_text()) if beside.is_file() else None


def read_source(cfg: ConvertConfig) -> tuple[Checkpoint, str]:
    """The source as a Checkpoint, and what it was ("diffseg", "safetensors", "guided-diffusion"); a URI's download
    is removed once read."""
    with fetched_source(cfg.src) as local:
        return _read_local(cfg, local)


def _read_local(cfg: ConvertConfig, local: Path) -> tuple[Checkpoint, str]:
    uri = cfg.src if is_fetched(cfg.src) else None
    if local.is_dir():
        ckpt = load_checkpoint(local, source=uri, allow_unverified=cfg.allow_unverified)
        return ckpt, "safetensors" if ckpt.extra.get("imported_from") == "safetensors" else "diffseg"
    payload = torch.load(local, map_location="cpu", weights_only=True, mmap=True)  # mmap: a peek, not a read
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        if INTEGRITY_KEY not in payload and cfg.allow_unverified:  # re-sealing an old file: say what it is first
            log.info(f"[convert] {cfg.src} has no integrity record; re-sealing what it holds: "
                     f"{describe_payload(payload, local)}")  # fmt: skip
        return load_checkpoint(local, source=uri, allow_unverified=cfg.allow_unverified), "diffseg"
    flags = read_flags(cfg, local)
    if flags is None:
        raise ValueError(
            f"{cfg.src}: not a diffseg checkpoint, so a guided-diffusion one: say which model it is with "
            f"preset=<{'|'.join(sorted(GUIDED_PRESETS))}> or flags='--image_size ... ' (its MODEL_FLAGS)"
        )
    try:
        return guided_checkpoint(local, flags, preset=cfg.preset or None), "guided-diffusion"
    except ValueError as e:  # flags (a preset) of another network: say so without a traceback
        raise ConfigError(f"src, {'preset' if cfg.preset else 'flags'}: {e}") from e


def _other_payload_format(src: str) -> str | None:
    """The format of a local file of ours that is not a model checkpoint (a pixel bundle, an ensemble state)."""
    path = Path(src)
    if storage.is_remote(src) or not path.is_file() or not zipfile.is_zipfile(path):
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not ours, or damaged: read_source and the loaders say what is wrong
        return None
    fmt = payload.get("format") if isinstance(payload, dict) else None
    return fmt if fmt in KINDS and fmt != FORMAT else None


def _weights(ckpt: Checkpoint, use_ema: bool) -> dict[str, torch.Tensor]:
    return ckpt.ema if use_ema and ckpt.ema is not None else ckpt.model


@torch.no_grad()
def max_output_difference(a: torch.nn.Module, b: torch.nn.Module, image_size: int, num_classes: int | None) -> float:
    """max |a(x, t) - b(x, t)| on one fixed input (seeded; t = 100): 0 for a lossless conversion."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, image_size, image_size, generator=g)
    t = torch.tensor([100])
    kw = {"y": torch.tensor([0])} if num_classes else {}
    return float((a.eval()(x, t, **kw) - b.eval()(x, t, **kw)).abs().max())


def run_convert(cfg: ConvertConfig) -> dict[str, Any]:
    """Convert `src` to `to` at `dst`, check it, record the run; a summary."""
    cfg.check()
    track = dataclasses.replace(cfg.tracking, log_models=cfg.tracking.log_models or bool(cfg.tracking.register_as))
    bundle = _other_payload_format(cfg.src)
    if bundle is not None:  # a pixel bundle or ensemble state: re-sealed as it is, nothing to convert
        if cfg.to != "diffseg":
            raise ConfigError(f"to: {cfg.src} is {KINDS[bundle]}; it can only be re-sealed (to=diffseg)")
        if not cfg.allow_unverified:
            read_payload(cfg.src, bundle)  # a sealed file verifies (or names its damage); an unsealed one says how
        out, what = reseal_payload(cfg.src, cfg.dst, bundle)
        log.info(f"[convert] re-sealed {cfg.src} -> {out}: {what}")
        return {"src": cfg.src, "from": bundle, "to": cfg.to, "dst": str(out), "kind": bundle}
    with Tracker(track, cfg.name) as tracker:
        tracker.log_params(to_dict(cfg))
        ckpt, kind = read_source(cfg)
        mcfg = ckpt.model_config
        if cfg.to == "diffseg":
            out = save_checkpoint_as(ckpt, cfg.dst)  # as it is: weights, EMA, optimizer, step
        elif cfg.to == "safetensors":
            out = export_safetensors(ckpt, cfg.dst, use_ema=cfg.use_ema)
        else:
            out, flags = export_guided_diffusion(ckpt, cfg.dst, use_ema=cfg.use_ema)
            log.info(f"[convert] guided-diffusion MODEL_FLAGS: {guided_model_flags(flags)}")
        summary: dict[str, Any] = {"src": cfg.src, "from": kind, "to": cfg.to, "dst": str(out), "kind": mcfg.kind}
        if cfg.verify:
            source_net = build_model(mcfg)
            source_net.load_state_dict(_weights(ckpt, cfg.use_ema or cfg.to == "diffseg"))
            if cfg.to == "guided-diffusion":
                written = import_guided_diffusion(out, json.loads(out.with_suffix(".json").read_text()))
            else:
                back = load_checkpoint(out)
                written = build_model(back.model_config)
                written.load_state_dict(_weights(back, True))
            diff = max_output_difference(source_net, written, mcfg.unet.image_size, mcfg.unet.num_classes)
            summary["max_abs_diff"] = diff
            tracker.log_metrics({"convert/max_abs_diff": diff})
            if diff != 0.0:
                raise RuntimeError(f"{out}: the converted network's output differs from the source's by {diff}")
        tracker.log_metrics({"convert/num_parameters": sum(v.numel() for v in ckpt.model.values())})
        tracker.set_tags({"diffseg.from": kind, "diffseg.to": cfg.to, "diffseg.dst": str(out)})
        logged = log_checkpoint_model(tracker, out if cfg.to != "guided-diffusion" else ckpt, name="model")
        if logged is not None:
            summary["model_uri"] = logged.registered_uri or logged.model_uri
    log.info(f"[convert] {kind} {cfg.src} -> {cfg.to} {out}" + (f" ({summary['model_uri']})" if logged else ""))
    if "max_abs_diff" in summary:
        log.info(f"[convert] read back: max |output difference| = {summary['max_abs_diff']} on a fixed input")
    return summary
