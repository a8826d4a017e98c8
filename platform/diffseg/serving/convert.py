"""Checkpoints in and out of diffseg: the body of `jobs/convert_checkpoint.py`.

    guided-diffusion .pt (+ a preset or its MODEL_FLAGS)  ->  ours (checkpoint.pt), safetensors + config.json
    ours, a safetensors export, an MLflow model URI        ->  ours, safetensors + config.json, guided-diffusion .pt,
                                                               a diffusers UNet2DModel folder (DDPM U-Nets that map)

The published ADM checkpoints are presets (`diffseg.models.guided.GUIDED_PRESETS`: lsun_bedroom, lsun_cat, lsun_horse,
lsun_horse_nodropout, ffhq, imagenet64, imagenet128, imagenet256, imagenet256_uncond, imagenet512) with the exact flags
of the README that publishes them, so a label-efficient backbone is one command away:

    python jobs/convert_checkpoint.py preset=lsun_horse src=lsun_horse.pt dst=runs/backbones/lsun_horse.pt

Every conversion is checked: the written file is read back by the loader that will read it (ours, the safetensors
reader, or the guided-diffusion importer) and must give the source network's output on a fixed input, bit for bit
(`convert/max_abs_diff`, 0 for fp32; a diffusers export is read back by `diffusers.UNet2DModel.from_pretrained`, whose
kernels differ from ours, so its output must agree within `DIFFUSERS_TOLERANCE`). The job is an MLflow run (named
convert-<to>-<dst's name> unless `name=` says); `tracking.register_as=<name>` also logs the result as an MLflow model
and registers it (`models:/<name>/<version>`, a backbone any job or Serve can name).

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
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from diffseg.core import storage
from diffseg.core.config import ConfigError, Name, UserError, atomic_write, is_uri
from diffseg.core.tracking import Tracker, TrackingConfig
from diffseg.models.builder import build_model
from diffseg.models.checkpoint import (
    FOLDER_SEAL,
    SCHEDULER_CONFIG,
    Checkpoint,
    diffusers_unet_folder,
    export_safetensors,
    fetched_source,
    is_fetched,
    load_checkpoint,
    save_checkpoint_as,
    scheduler_config,
    seal_folder,
)
from diffseg.models.guided import (
    GUIDED_PRESETS,
    export_guided_diffusion,
    guided_checkpoint,
    guided_model_flags,
    guided_preset_flags,
    import_guided_diffusion,
)
from diffseg.models.integrity import (
    FORMAT,
    INTEGRITY_KEY,
    KINDS,
    describe_payload,
    load_torch_file,
    read_payload,
    reseal_payload,
)
from diffseg.models.unet import AttentionBlock, Downsample, ResBlock, UNet, UNetConfig, Upsample, parse_guided_flags
from diffseg.serving.pyfunc import log_checkpoint_model, model_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConvertConfig:
    src: str = ""  # what to convert: a guided-diffusion .pt, our checkpoint (file or run folder), a safetensors
    # export folder, or an MLflow URI (models:/<name>@<alias>, runs:/<id>/checkpoint)
    dst: str = ""  # where to write: a file for to=diffseg / guided-diffusion, a folder for to=safetensors
    to: Literal["diffseg", "safetensors", "guided-diffusion", "diffusers"] = "diffseg"  # the format to write
    # (diffusers: a UNet2DModel folder that diffusers' from_pretrained and DDPMPipeline load)
    preset: str = ""  # importing guided-diffusion: a published model's flags (lsun_horse, ffhq, imagenet256, ...)
    flags: str = ""  # ... or its MODEL_FLAGS ("--image_size 256 --learn_sigma True ...") or a .json of flags
    use_ema: bool = True  # exports: the EMA weights when the checkpoint has them (else the raw weights)
    verify: bool = True  # read the result back and compare its output with the source's on a fixed input
    allow_unverified: bool = False  # read a src of ours that has no integrity record (an old file): print what it is
    # and write dst sealed (re-sealing it once); without it such a src is refused
    name: Name | None = None  # the MLflow run's name; None = convert-<to>-<dst's name>
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(log_models=False))  # MLflow; with
    # register_as=<name> the result is also logged as an MLflow model and registered

    def check(self) -> None:
        """Cross-field checks (run by --dry-run and before the job)."""
        if not self.src or not self.dst:
            raise ValueError(f"src and dst are required (src={self.src!r}, dst={self.dst!r})")
        if not is_uri(self.src) and not Path(self.src).expanduser().exists():
            raise ValueError(f"src: {self.src} does not exist")
        if self.preset and self.preset not in GUIDED_PRESETS:
            raise ValueError(f"preset: unknown {self.preset!r}; known: {sorted(GUIDED_PRESETS)}")
        if self.preset and self.flags:
            raise ValueError("preset and flags: give one of them")

    @property
    def run_name(self) -> str:
        """`name`, else one that tells conversions apart in the MLflow UI: convert-<to>-<dst's file or folder name>."""
        return self.name or f"convert-{self.to}-{Path(self.dst.rstrip('/')).name or 'out'}"


class ConversionError(UserError):
    """The source network has no counterpart in the format asked for (the message names what does not map)."""


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
    payload = load_torch_file(local, cfg.src, "a checkpoint", mmap=True)  # mmap: a peek, not a read
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        if INTEGRITY_KEY not in payload and cfg.allow_unverified:  # re-sealing an old file: say what it is first
            log.info(f"[convert] {cfg.src} has no integrity record; re-sealing what it holds: "
                     f"{describe_payload(payload, local)}")  # fmt: skip
        return load_checkpoint(local, source=uri, allow_unverified=cfg.allow_unverified), "diffseg"
    flags = read_flags(cfg, local)
    if flags is None:
        raise ConfigError(
            f"src, preset: {cfg.src} is not a diffseg checkpoint, so a guided-diffusion one: say which model it is "
            f"with preset=<{'|'.join(sorted(GUIDED_PRESETS))}> or flags='--image_size ... ' (its MODEL_FLAGS)"
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


def fixed_input(image_size: int, num_classes: int | None, in_channels: int = 3) -> tuple[torch.Tensor, ...]:
    """The one input conversions are checked on: (x, t) or (x, t, y), seeded; t = 100, class 0."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, in_channels, image_size, image_size, generator=g)
    return (x, torch.tensor([100])) + ((torch.tensor([0]),) if num_classes else ())


@torch.no_grad()
def max_output_difference(a: torch.nn.Module, b: torch.nn.Module, image_size: int, num_classes: int | None) -> float:
    """max |a(x, t) - b(x, t)| on the fixed input (`fixed_input`): 0 for a lossless conversion."""
    args = fixed_input(image_size, num_classes)
    return float((a.eval()(*args) - b.eval()(*args)).abs().max())


# ---------------------------------------------------------------------------------------------------- diffusers
DIFFUSERS_TOLERANCE = 1e-4  # max |ours - diffusers| on the fixed input, relative to max |ours| (+1): kernel order only


def diffusers_unet_config(cfg: UNetConfig, kind: str = "ddpm") -> dict[str, Any]:
    """The `diffusers.UNet2DModel` config that builds the same network as our ADM U-Net `cfg`, or ConversionError
    naming every setting that does not map. Our blocks are diffusers' (ResnetBlock2D with scale-shift norm = ADM's
    ResBlock, AttnDown/UpBlock2D = a level with attention, ResnetDownsample/Upsample = `resblock_updown`), but
    UNet2DModel has one GroupNorm group count, one attention head size, zero padding, conv resampling, and a time
    embedding as wide as its first level."""
    problems = []
    if kind != "ddpm":
        problems.append(
            f"model.kind={kind!r} (the factorized U-Net's K masked decoder passes have no UNet2DModel form)"
        )
    if cfg.padding_mode != "zeros":
        problems.append(f"padding_mode={cfg.padding_mode!r} (UNet2DModel pads with zeros)")
    if not cfg.conv_resample:
        problems.append("conv_resample=False (UNet2DModel resamples with convolutions)")
    if cfg.channel_mult[0] != 1:
        problems.append(
            f"channel_mult[0]={cfg.channel_mult[0]} (UNet2DModel's time embedding is its first level's width)"
        )
    if cfg.num_heads_upsample not in (None, cfg.num_heads):
        problems.append(f"num_heads_upsample={cfg.num_heads_upsample} != num_heads (UNet2DModel: one head size)")
    net = UNet(cfg) if not problems else None
    head_dims, groups = set(), set()
    for m in net.modules() if net is not None else ():
        if isinstance(m, AttentionBlock):
            head_dims.add((m.num_heads, m.qkv.weight.shape[1] // m.num_heads))
        elif isinstance(m, torch.nn.GroupNorm):
            groups.add(m.num_groups)
    if len(groups) > 1:
        problems.append(
            f"GroupNorm group counts {sorted(groups)} (ours: 32 groups, or gcd(32, channels); UNet2DModel has one "
            "norm_num_groups: make every width a multiple of 32, e.g. model_channels=32)"
        )
    if {h for h, _ in head_dims} == {1}:
        head_dim = None  # one head everywhere: UNet2DModel's attention_head_dim=None (each block's own width)
    elif len({d for _, d in head_dims}) == 1:
        head_dim = next(iter(head_dims))[1]
    else:
        problems.append(
            f"attention head sizes {sorted({d for _, d in head_dims})} (UNet2DModel: one; set num_head_channels)"
        )
    if problems:
        raise ConversionError(
            "to=diffusers: this network does not map onto diffusers' UNet2DModel: " + "; ".join(problems)
        )
    ds, down, up = 1, [], []
    attention_ds = cfg.attention_ds
    for _ in cfg.channel_mult:
        attn = ds in attention_ds
        down.append(
            "AttnDownBlock2D" if attn else ("ResnetDownsampleBlock2D" if cfg.resblock_updown else "DownBlock2D")
        )
        up.insert(0, "AttnUpBlock2D" if attn else ("ResnetUpsampleBlock2D" if cfg.resblock_updown else "UpBlock2D"))
        ds *= 2
    return {
        "sample_size": cfg.image_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "flip_sin_to_cos": True,  # [cos | sin], as ours
        "freq_shift": 0,
        "down_block_types": down,
        "up_block_types": up,
        "block_out_channels": [int(m * cfg.model_channels) for m in cfg.channel_mult],
        "layers_per_block": cfg.num_res_blocks,
        "mid_block_scale_factor": 1,
        "downsample_padding": 1,
        "downsample_type": "resnet" if cfg.resblock_updown else "conv",
        "upsample_type": "resnet" if cfg.resblock_updown else "conv",
        "dropout": cfg.dropout,
        "act_fn": "silu",
        "attention_head_dim": head_dim,
        "norm_num_groups": groups.pop(),
        "attn_norm_num_groups": None,  # set below: the mid block's attention would otherwise have no norm
        "norm_eps": 1e-5,
        "resnet_time_scale_shift": "scale_shift" if cfg.use_scale_shift_norm else "default",
        "add_attention": True,
        "num_class_embeds": cfg.num_classes,
    }


def _resblock_keys(ours: str, theirs: str, block: ResBlock) -> dict[str, str]:
    names = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
             "out_layers.3": "conv2"}  # fmt: skip
    if not isinstance(block.skip_connection, torch.nn.Identity):
        names["skip_connection"] = "conv_shortcut"
    return {f"{ours}.{a}": f"{theirs}.{b}" for a, b in names.items()}


def diffusers_state_dict(net: UNet, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our U-Net's state dict (`net`'s structure, guided-diffusion key names) under UNet2DModel's names; qkv is split
    into to_q / to_k / to_v (heads first within each, the order diffusers reshapes by)."""
    cfg, out, names = net.cfg, {}, {}

    def block(ours: str, theirs: str, module: torch.nn.Module) -> None:
        if isinstance(module, ResBlock):
            names.update(_resblock_keys(ours, theirs, module))
        elif isinstance(module, AttentionBlock):
            attention[ours] = (theirs, module)
        elif isinstance(module, (Downsample, Upsample)):
            names[f"{ours}.{'op' if isinstance(module, Downsample) else 'conv'}"] = f"{theirs}.conv"

    attention: dict[str, tuple[str, AttentionBlock]] = {}
    names.update({"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
                  "label_emb": "class_embedding", "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out",
                  "out.2": "conv_out"})  # fmt: skip
    k, levels = 1, len(cfg.channel_mult)
    for level in range(levels):
        for i in range(cfg.num_res_blocks):
            layers = list(net.input_blocks[k])
            block(f"input_blocks.{k}.0", f"down_blocks.{level}.resnets.{i}", layers[0])
            if len(layers) > 1:
                block(f"input_blocks.{k}.1", f"down_blocks.{level}.attentions.{i}", layers[1])
            k += 1
        if level != levels - 1:
            block(f"input_blocks.{k}.0", f"down_blocks.{level}.downsamplers.0", net.input_blocks[k][0])
            k += 1
    for j, theirs in enumerate(("mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1")):
        block(f"middle_block.{j}", theirs, net.middle_block[j])
    k = 0
    for u in range(levels):
        for i in range(cfg.num_res_blocks + 1):
            for j, layer in enumerate(net.output_blocks[k]):
                if isinstance(layer, AttentionBlock):
                    block(f"output_blocks.{k}.{j}", f"up_blocks.{u}.attentions.{i}", layer)
                elif j == 0:
                    block(f"output_blocks.{k}.{j}", f"up_blocks.{u}.resnets.{i}", layer)
                else:  # the level's upsampler (a plain one or a ResBlock)
                    block(f"output_blocks.{k}.{j}", f"up_blocks.{u}.upsamplers.0", layer)
            k += 1
    for key, value in state.items():
        prefix, _, leaf = key.rpartition(".")
        owner = next((a for a in attention if prefix.startswith(a + ".") or prefix == a), None)
        if owner is not None:
            continue
        if prefix not in names:
            raise ConversionError(f"to=diffusers: no UNet2DModel name for weight {key!r}")
        out[f"{names[prefix]}.{leaf}"] = value
    for ours, (theirs, module) in attention.items():
        c, heads = module.qkv.weight.shape[1], module.num_heads
        w, b = state[f"{ours}.qkv.weight"].squeeze(-1), state[f"{ours}.qkv.bias"]  # (3C, C), (3C,)
        if module.new_order:  # rows: which * C + head * ch + i
            ws, bs = w.reshape(3, c, c), b.reshape(3, c)
        else:  # guided-diffusion's legacy rows: head * 3ch + which * ch + i
            ws = w.reshape(heads, 3, c // heads, c).transpose(0, 1).reshape(3, c, c)
            bs = b.reshape(heads, 3, c // heads).transpose(0, 1).reshape(3, c)
        for n, name in enumerate(("to_q", "to_k", "to_v")):
            out[f"{theirs}.{name}.weight"], out[f"{theirs}.{name}.bias"] = ws[n].contiguous(), bs[n].contiguous()
        out[f"{theirs}.to_out.0.weight"] = state[f"{ours}.proj_out.weight"].squeeze(-1)
        out[f"{theirs}.to_out.0.bias"] = state[f"{ours}.proj_out.bias"]
        out[f"{theirs}.group_norm.weight"] = state[f"{ours}.norm.weight"]
        out[f"{theirs}.group_norm.bias"] = state[f"{ours}.norm.bias"]
    return out


def export_diffusers(ckpt: Checkpoint, dst: str | os.PathLike, use_ema: bool = True) -> Path:
    """A diffusers `DDPMPipeline` folder at `dst`: `model_index.json`, `unet/` (`config.json` and
    `diffusion_pytorch_model.safetensors` as `save_pretrained` writes them: the EMA weights, or the raw ones, under
    diffusers' names), `scheduler/scheduler_config.json` (the process as a DDPMScheduler), and `diffseg_integrity.json`
    (the SHA-256 of every file, checked when a job reads it as `diffusers:<dst>`). `DDPMPipeline.from_pretrained(dst)`
    and `DDIMPipeline.from_pretrained(dst)` load it; our DDIM sampler is diffusers' with `use_clipped_model_output=True`
    (docs/mlflow.md). ConversionError for a network that does not map (`diffusers_unet_config` names why). Needs
    diffusers installed (the test extras have it)."""
    mcfg = ckpt.model_config
    config = diffusers_unet_config(mcfg.unet, mcfg.kind)
    config["attn_norm_num_groups"] = config["norm_num_groups"]
    try:
        import diffusers
        from diffusers import UNet2DModel  # an optional dependency: only this export needs it
    except ImportError as e:
        raise ConversionError(f"to=diffusers needs the diffusers package ({e}): pip install diffusers") from None
    net = UNet(mcfg.unet)
    weights = _weights(ckpt, use_ema)
    net.load_state_dict(weights)
    theirs = UNet2DModel(**config)
    theirs.load_state_dict(diffusers_state_dict(net, weights), strict=True)  # every weight named, none left over
    out = Path(dst)
    out.mkdir(parents=True, exist_ok=True)
    (out / FOLDER_SEAL).unlink(missing_ok=True)  # a folder being rewritten is not sealed until it is complete
    for stale in ("config.json", "diffusion_pytorch_model.safetensors", SCHEDULER_CONFIG):  # an older flat export
        (out / stale).unlink(missing_ok=True)
    (out / "unet").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".diffusers-") as tmp:  # beside: one rename per file
        theirs.save_pretrained(tmp, safe_serialization=True)
        for f in Path(tmp).iterdir():
            os.replace(f, out / "unet" / f.name)
    (out / "scheduler").mkdir(exist_ok=True)
    text = json.dumps(scheduler_config(ckpt.diffusion_config, bool(mcfg.unet.learn_sigma)), indent=1)
    atomic_write(out / "scheduler" / SCHEDULER_CONFIG, lambda tmp: Path(tmp).write_text(text))
    index = {"_class_name": "DDPMPipeline", "_diffusers_version": diffusers.__version__,
             "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}  # fmt: skip
    atomic_write(out / "model_index.json", lambda tmp: Path(tmp).write_text(json.dumps(index, indent=1)))
    seal_folder(out)
    return out


class _DiffusersCall(torch.nn.Module):
    """A UNet2DModel called as ours is, `net(x, t, y=None) -> eps`, for `max_output_difference`."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.unet(x, t, class_labels=y).sample


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
    with Tracker(track, cfg.run_name) as tracker:
        tracker.log_config(cfg)
        ckpt, kind = read_source(cfg)
        mcfg = ckpt.model_config
        if cfg.to == "diffseg":
            out = save_checkpoint_as(ckpt, cfg.dst)  # as it is: weights, EMA, optimizer, step
        elif cfg.to == "safetensors":
            out = export_safetensors(ckpt, cfg.dst, use_ema=cfg.use_ema)
        elif cfg.to == "diffusers":
            out = export_diffusers(ckpt, cfg.dst, use_ema=cfg.use_ema)
        else:
            if mcfg.kind != "ddpm":  # say so by name, before export_guided_diffusion's ValueError
                raise ConversionError(
                    f"to=guided-diffusion: a {mcfg.kind} model has no guided-diffusion counterpart (DDPM U-Nets only); "
                    "export it with to=safetensors or keep to=diffseg"
                )
            try:
                out, flags = export_guided_diffusion(ckpt, cfg.dst, use_ema=cfg.use_ema)
            except ValueError as e:  # a DDPM guided-diffusion cannot express (padding, channels, classes)
                raise ConversionError(f"to=guided-diffusion: {e}") from e
            log.info(f"[convert] guided-diffusion MODEL_FLAGS: {guided_model_flags(flags)}")
        summary: dict[str, Any] = {"src": cfg.src, "from": kind, "to": cfg.to, "dst": str(out), "kind": mcfg.kind}
        if cfg.verify:
            source_net = build_model(mcfg)
            source_net.load_state_dict(_weights(ckpt, cfg.use_ema or cfg.to == "diffseg"))
            if cfg.to == "guided-diffusion":
                written = import_guided_diffusion(out, json.loads(out.with_suffix(".json").read_text()))
            elif cfg.to == "diffusers":
                from diffusers import UNet2DModel

                written = _DiffusersCall(UNet2DModel.from_pretrained(str(diffusers_unet_folder(out)),
                                                                     low_cpu_mem_usage=False))  # fmt: skip
            else:
                back = load_checkpoint(out)
                written = build_model(back.model_config)
                written.load_state_dict(_weights(back, True))
            diff = max_output_difference(source_net, written, mcfg.unet.image_size, mcfg.unet.num_classes)
            summary["max_abs_diff"] = diff
            tracker.log_metrics({"convert/max_abs_diff": diff})
            limit = 0.0
            if cfg.to == "diffusers":  # other kernels, same math: agreement to float32 rounding
                with torch.no_grad():
                    scale = source_net.eval()(*fixed_input(mcfg.unet.image_size, mcfg.unet.num_classes)).abs().max()
                limit = DIFFUSERS_TOLERANCE * (1.0 + float(scale))
            if diff > limit:
                raise RuntimeError(f"{out}: the converted network's output differs from the source's by {diff}")
        tracker.log_metrics({"convert/num_parameters": sum(v.numel() for v in ckpt.model.values())})
        tracker.set_tags({"diffseg.from": kind, "diffseg.to": cfg.to, "diffseg.dst": str(out)})
        logged = log_checkpoint_model(
            tracker, out if cfg.to in ("diffseg", "safetensors") else ckpt, name=model_name(Path(str(out)).stem)
        )
        if logged is not None:
            summary["model_uri"] = logged.registered_uri or logged.model_uri
    log.info(f"[convert] {kind} {cfg.src} -> {cfg.to} {out}" + (f" ({summary['model_uri']})" if logged else ""))
    if "max_abs_diff" in summary:
        log.info(f"[convert] read back: max |output difference| = {summary['max_abs_diff']} on a fixed input")
    return summary
