"""Checkpoints: our format, THE loader (checkpoint -> model, diffusion, config), safetensors export.

Our format is one payload file (`diffseg.models.integrity`: written by `torch.save` holding only tensors, numbers,
strings, lists and dicts, so it loads with `weights_only=True`, no pickled code runs on load; atomic writes; a SHA-256
of every tensor checked on every load):

    {"format": "diffseg/1", "config": <resolved run config as JSON>, "model": state_dict, "ema": state_dict | None,
     "optimizer": optimizer state | None, "step": int, "extra": {...},
     "integrity": {"algorithm": "sha256", "tensors": {"model/<key>": hex, ...}, "meta": hex}}

Every load error is a `CheckpointError` naming the real file and what is wrong with it.

Every job, the sweeps and the Serve replicas get a network the same way:

    loaded = load_diffusion_model("runs/x/checkpoint.pt" | "runs/x" | "runs:/<run_id>/checkpoint", device="auto")
    loaded.model, loaded.diffusion, loaded.config, loaded.step     # model in eval mode on the device, no gradients
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from diffseg.core import storage
from diffseg.core.config import ConfigError, PathField, atomic_write, from_dict, to_dict
from diffseg.core.runtime import resolve_device, unverified_allowed
from diffseg.models.builder import ModelConfig, build_model
from diffseg.models.diffusion import DiffusionConfig, GaussianDiffusion
from diffseg.models.integrity import (
    FORMAT,
    CheckpointError,
    file_sha256,
    read_payload,
    tensor_digest,
    write_payload,
)

CHECKPOINT_NAME = "checkpoint.pt"
# Config keys that checkpoints written by an older diffseg hold and this one no longer has (they were never read):
# dropped when a checkpoint's config is parsed, so old runs still load.
RETIRED_KEYS: dict[str, tuple[str, ...]] = {"diffusion": ("sample_steps", "eta", "clip_denoised")}
# Sources that are downloaded through MLflow's artifact API rather than read as local paths.
MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/", "s3://", "gs://", "wasbs://", "hdfs://", "dbfs:/")
log = logging.getLogger(__name__)


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
    """Write a checkpoint atomically, with the SHA-256 of every tensor; `config` is a config dataclass or a dict."""

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
    return write_payload(path, payload)


MLMODEL_FILE = "MLmodel"  # marks an MLflow model folder (our pyfunc models keep their files under data/)
MODEL_SPEC = "spec.json"  # in data/: what kind of diffseg model it is and which files make it (diffseg.serving.pyfunc)
SAFETENSORS_WEIGHTS = "diffusion_pytorch_model.safetensors"  # the diffusers file names of an exported model folder
SAFETENSORS_CONFIG = "config.json"
SCHEDULER_CONFIG = "scheduler_config.json"
SAFETENSORS_FORMAT = "diffseg-safetensors/1"


def mlflow_model_data(folder: Path) -> Path:
    """The data folder of an MLflow pyfunc model folder (its MLmodel's `python_function.data`)."""
    try:
        meta = yaml.safe_load((folder / MLMODEL_FILE).read_text()) or {}
        data = meta["flavors"]["python_function"]["data"]
    except (yaml.YAMLError, KeyError, TypeError) as e:
        raise CheckpointError(f"{folder}/{MLMODEL_FILE}: not a pyfunc model with a data folder ({e})") from None
    return folder / data


def checkpoint_file(path: str | os.PathLike, source: str | None = None) -> tuple[Path, str | None]:
    """The file to read for a checkpoint given as a file or a folder (a run folder, an MLflow model, a safetensors
    export), and how errors name it; FileNotFoundError naming what was looked for otherwise."""
    path = Path(path)
    if not path.is_dir():
        return path, source
    where = source or str(path)
    if (path / MLMODEL_FILE).is_file():  # an MLflow model (a downloaded models:/ or runs:/ URI)
        data = mlflow_model_data(path)
        return checkpoint_file(data, f"{where}/{data.relative_to(path)}" if source else None)
    for name in (CHECKPOINT_NAME, SAFETENSORS_WEIGHTS):
        if (path / name).is_file():
            return path / name, f"{source}/{name}" if source else None
    raise FileNotFoundError(
        f"{where}: a folder without {CHECKPOINT_NAME} (a run folder), {SAFETENSORS_WEIGHTS} + {SAFETENSORS_CONFIG} "
        f"(a safetensors export) or {MLMODEL_FILE} (an MLflow model)"
    )


def load_checkpoint(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    *,
    source: str | None = None,
    allow_unverified: bool = False,
) -> Checkpoint:
    """Read a checkpoint, verifying every tensor's SHA-256: our file, a run folder holding checkpoint.pt, an MLflow
    model folder (`diffseg.serving.pyfunc`: the checkpoint is under data/), or a safetensors export
    (`export_safetensors`).

    `source` is how errors name the file when `path` is a local copy of it (a downloaded URI). Every failure is a
    CheckpointError (FileNotFoundError when there is no file) that names the file and says what is wrong with it; a
    file without its integrity record is one of them unless `allow_unverified` (see `read_payload`).
    """
    path, source = checkpoint_file(path, source)
    if path.suffix == ".safetensors":
        return load_safetensors(path.parent, source=source, allow_unverified=allow_unverified)
    where = source or str(path)
    payload = read_payload(path, FORMAT, source=source, allow_unverified=allow_unverified)
    missing = [k for k in ("config", "model", "step") if k not in payload]
    if missing:
        raise CheckpointError(f"{where}: a diffseg checkpoint without {missing}")
    try:
        config = json.loads(payload["config"])
    except (TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{where}: its config is not JSON ({e})") from None
    ckpt = Checkpoint(
        config=config,
        model=payload["model"],
        ema=payload.get("ema"),
        optimizer=payload.get("optimizer"),
        step=int(payload["step"]),
        extra=payload.get("extra") or {},
    )
    if torch.device(map_location).type != "cpu":  # verified on the CPU, then moved
        ckpt.model = {k: v.to(map_location) if torch.is_tensor(v) else v for k, v in ckpt.model.items()}
        if ckpt.ema is not None:
            ckpt.ema = {k: v.to(map_location) if torch.is_tensor(v) else v for k, v in ckpt.ema.items()}
    return ckpt


def is_fetched(source: str | os.PathLike) -> bool:
    """A source that `resolve_source` downloads (an MLflow artifact URI or a storage URI), not a local path."""
    return str(source).startswith(MLFLOW_SCHEMES + ("file://",))


@contextlib.contextmanager
def fetched_source(source: str | os.PathLike) -> Iterator[Path]:
    """`resolve_source` for a caller that reads the model while the block runs: a URI is downloaded into a temp
    folder that is removed on exit (nothing fetched outlives the load); a local path is yielded as it is."""
    if not is_fetched(source):
        yield resolve_source(source)
        return
    with tempfile.TemporaryDirectory(prefix="diffseg-fetch-") as tmp:
        yield resolve_source(source, tmp)


def resolve_source(source: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local path, or a URI fetched to a local file or folder: an MLflow artifact URI (`runs:/<run_id>/checkpoint`,
    `models:/name@alias`) with `mlflow.artifacts.download_artifacts`; a storage file (`s3://`, `gs://`, `file://`)
    with pyarrow's filesystems, as every other location (`diffseg.core.storage`).

    A URI is fetched into `cache_dir`, which the caller owns (a job's own folder); without one, use
    `fetched_source`, which removes what it fetched."""
    if str(source).startswith(("s3://", "gs://", "file://")) and storage.is_file(str(source)):
        if cache_dir is None:
            raise ValueError(f"{source}: fetching a URI needs a folder to put it in (cache_dir or fetched_source)")
        folder = Path(cache_dir)
        folder.mkdir(parents=True, exist_ok=True)
        local = folder / storage.name(str(source))
        storage.fetch_file(str(source), local)
        return local
    if str(source).startswith(MLFLOW_SCHEMES):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "1")
        import mlflow  # costs seconds: only when a URI asks for it

        if cache_dir is None:
            raise ValueError(f"{source}: fetching a URI needs a folder to put it in (cache_dir or fetched_source)")
        local = mlflow.artifacts.download_artifacts(artifact_uri=str(source), dst_path=str(cache_dir))
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
    path: Path  # the local checkpoint file read (for a URI: its download, removed once read)
    weights: str  # "ema", "model" or "random"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def model_config(self) -> ModelConfig:
        return from_dict(ModelConfig, self.config["model"], prefix="model")


def checkpoint_of(*kinds: str, needed_by: str = "this job") -> PathField:
    """The location mark of a config field naming a checkpoint (a file, run folder, MLflow model or export) that
    must load and verify, and hold a model of one of `kinds` (`model.kind`: factorized, ddpm; none: any). Checked
    before the job starts and by --dry-run (`diffseg.core.config.check_inputs`), one line naming the key:

        checkpoint: Annotated[str, checkpoint_of("factorized", needed_by="segmenting")] = ""
    """

    def check(value: str, key: str) -> None:
        try:
            ckpt = load_checkpoint(value)
        except (CheckpointError, FileNotFoundError) as e:
            raise ConfigError(f"{key}: {e}") from None
        kind = ckpt.model_config.kind
        if kinds and kind not in kinds:
            raise ConfigError(
                f"{key}: {value} holds a {kind} model; {needed_by} needs a {' or '.join(kinds)} checkpoint "
                f"(model.kind={kinds[0]})"
            )

    return PathField("input", check=check)


def load_diffusion_model(
    source: str | os.PathLike,
    device: str | torch.device | None = "auto",
    use_ema: bool = True,
    random_init: bool = False,
    *,
    allow_unverified: bool = False,
) -> LoadedModel:
    """THE loader: a checkpoint (a file, a run folder, or an MLflow artifact URI) -> network, diffusion, config.

    The network is rebuilt from the config inside and gets the EMA weights (`use_ema`, when the checkpoint has them)
    or the raw ones; `random_init=True` keeps the architecture and a fixed random init (seed 0, without touching the
    caller's RNG) for the random-features baseline. The model comes back in eval mode with gradients off.

    Every tensor's SHA-256 is verified (`load_checkpoint`); a file that is damaged, not ours, without its integrity
    record (unless `allow_unverified`), or whose config or weights do not make a model is a CheckpointError naming
    the file (the URI, for a downloaded one).
    """
    uri = str(source) if is_fetched(source) else None  # errors name the URI, not a download
    with fetched_source(source) as path:  # a downloaded copy is removed once read
        ckpt = load_checkpoint(path, source=uri, allow_unverified=allow_unverified)
        local = checkpoint_file(path)[0]
    where = uri or str(path)
    dev = resolve_device(device)
    try:
        if random_init:
            with torch.random.fork_rng(devices=[]):  # a fixed random init that leaves the caller's RNG alone
                torch.manual_seed(0)
                model = build_model(ckpt.model_config)
            weights = "random"
        else:
            model = build_model(ckpt.model_config)
            use = use_ema and ckpt.ema is not None
            weights = "ema" if use else "model"
        diffusion = GaussianDiffusion.from_config(ckpt.diffusion_config)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{where}: its config does not describe a model we can build ({e})") from e
    if weights != "random":
        try:
            model.load_state_dict(ckpt.ema if weights == "ema" else ckpt.model)
        except RuntimeError as e:
            raise CheckpointError(f"{where}: the weights do not fit the model its config describes ({e})") from e
    model = model.eval().requires_grad_(False).to(dev)
    return LoadedModel(
        model=model,
        diffusion=diffusion,
        config=ckpt.config,
        step=ckpt.step,
        source=str(source),
        path=local,
        weights=weights,
    )


def save_checkpoint_as(ckpt: Checkpoint, dst: str | os.PathLike) -> Path:
    """Write a Checkpoint (loaded, imported, converted) in our format."""
    return save_checkpoint(
        dst, config=ckpt.config, model=ckpt.model, ema=ckpt.ema, optimizer=ckpt.optimizer, step=ckpt.step,
        extra=ckpt.extra,
    )  # fmt: skip


def export_weights(
    src: str | os.PathLike | Checkpoint,
    dst: str | os.PathLike,
    dtype: torch.dtype = torch.float16,
    use_ema: bool = True,
    extra: dict[str, Any] | None = None,
) -> Path:
    """An inference checkpoint: only the (EMA) weights, floating tensors cast to `dtype`, no optimizer.

    Half the size of the fp32 weights and a quarter of a training checkpoint (weights, EMA, AdamW moments), so a
    small model fits where files are capped. It is an ordinary checkpoint of our format: `load_diffusion_model`
    rebuilds the fp32 network and `load_state_dict` casts the weights back (so jobs and Serve read it unchanged); it
    cannot resume training. A weight outside `dtype`'s range is an error rather than a silent inf.
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


# ---------------------------------------------------------------------------------------------------- exports
def _export_weights(ckpt: Checkpoint, use_ema: bool) -> tuple[dict[str, torch.Tensor], str]:
    use = use_ema and ckpt.ema is not None
    return (ckpt.ema if use else ckpt.model), ("ema" if use else "model")


def scheduler_config(diffusion: DiffusionConfig, learn_sigma: bool) -> dict[str, Any]:
    """The process as a diffusers `DDPMScheduler` config (a `DDIMScheduler` reads it too). guided-diffusion's linear
    schedule scaled to T (betas from 1e-4 * 1000/T to 0.02 * 1000/T) is diffusers' "linear" with those endpoints; its
    cosine schedule is "squaredcos_cap_v2" (both clip betas at 0.999). diffusers' DDIM with these settings and
    `use_clipped_model_output=True` (eps recomputed from the clipped x0, as guided-diffusion does) is our DDIM on the
    uniform-stride respacing (`GaussianDiffusion.respace("ddim50")`; its step assumes that stride)."""
    scale = 1000 / diffusion.num_timesteps
    out: dict[str, Any] = {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": diffusion.num_timesteps,
        "prediction_type": "epsilon",
        "variance_type": "learned_range" if learn_sigma else "fixed_small",
        "clip_sample": True,
    }
    if diffusion.schedule == "linear":
        out.update(beta_schedule="linear", beta_start=1e-4 * scale, beta_end=0.02 * scale)
    else:
        out.update(beta_schedule="squaredcos_cap_v2")
    return out


def export_safetensors(
    src: str | os.PathLike | Checkpoint, dst: str | os.PathLike, use_ema: bool = True, dtype: torch.dtype | None = None
) -> Path:
    """A model folder as the diffusers ecosystem shares them: `diffusion_pytorch_model.safetensors` (the EMA weights,
    or the raw ones; guided-diffusion's key names), `config.json` (our model and diffusion config, class name, step)
    and `scheduler_config.json` (the process as a DDPMScheduler config). The SHA-256 of every tensor travels in the
    safetensors metadata; `load_checkpoint` / `load_diffusion_model` read the folder back (no pickle involved).
    Returns the folder. `dtype` casts the floating-point weights (e.g. torch.float16)."""
    ckpt = src if isinstance(src, Checkpoint) else load_checkpoint(src)
    from safetensors.torch import save  # lazy: only exports and safetensors loads need it

    weights, which = _export_weights(ckpt, use_ema)
    tensors = {
        k: (v.to(dtype) if dtype is not None and torch.is_floating_point(v) else v).detach().cpu().contiguous()
        for k, v in weights.items()
    }
    model_cfg, diff_cfg = ckpt.model_config, ckpt.diffusion_config
    config = {
        "_class_name": "FactorizedUNet" if model_cfg.kind == "factorized" else "UNet",
        "_diffseg_format": SAFETENSORS_FORMAT,
        "_note": "diffseg's ADM U-Net (guided-diffusion key names): load with "
        "diffseg.models.checkpoint.load_diffusion_model",
        "model": to_dict(model_cfg),
        "diffusion": to_dict(diff_cfg),
        "step": ckpt.step,
        "weights": which,
        "run_config": ckpt.config,
    }
    out = Path(dst)
    out.mkdir(parents=True, exist_ok=True)
    learn_sigma = bool(model_cfg.unet.learn_sigma)
    texts = {SAFETENSORS_CONFIG: json.dumps(config, indent=1),
             SCHEDULER_CONFIG: json.dumps(scheduler_config(diff_cfg, learn_sigma), indent=1)}  # fmt: skip
    digests = json.dumps({k: tensor_digest(v) for k, v in tensors.items()}, sort_keys=True)
    # one record over everything the loader reads: the tensors and the config files beside them
    files = json.dumps({name: _text_sha256(text) for name, text in texts.items()}, sort_keys=True)
    meta = {"format": SAFETENSORS_FORMAT, "sha256": digests, "files_sha256": files, "step": str(ckpt.step),
            "weights": which}  # fmt: skip
    blob = save(tensors, metadata=meta)  # bytes: written through atomic_write (safetensors' writer wants a path)
    atomic_write(out / SAFETENSORS_WEIGHTS, lambda tmp: Path(tmp).write_bytes(blob))
    for name, text in texts.items():
        atomic_write(out / name, lambda tmp, text=text: Path(tmp).write_text(text))
    return out


def _text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _check_export_files(folder: Path, where: str, meta: dict[str, str], allow_unverified: bool) -> None:
    """The config files of a safetensors export against the SHA-256 its weights file records for them (a changed
    schedule or step in config.json would otherwise load silently)."""
    if "files_sha256" not in meta:
        if not unverified_allowed(allow_unverified):
            raise CheckpointError(
                f"{where}/{SAFETENSORS_WEIGHTS}: records no SHA-256 of {SAFETENSORS_CONFIG} (an export written before "
                "that record existed), so nothing shows its config is the one written; refused. Export it again, or "
                "load it with --allow-unverified"
            )
        log.warning("%s: its config files are loaded WITHOUT an integrity check (allow_unverified)", where)
        return
    for name, expected in json.loads(meta["files_sha256"]).items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{where}/{name}: missing (the export records it)")
        if _text_sha256(path.read_text()) != expected:
            raise CheckpointError(f"{where}/{name}: does not match the SHA-256 its export recorded; refused")


def load_safetensors(
    folder: str | os.PathLike, *, source: str | None = None, allow_unverified: bool = False
) -> Checkpoint:
    """A folder written by `export_safetensors` -> a Checkpoint (weights as `model`, no EMA or optimizer), every
    tensor and config file checked against the SHA-256 in the weights file's metadata."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    folder = Path(folder)
    where = source.rsplit("/", 1)[0] if source else str(folder)
    weights_file, config_file = folder / SAFETENSORS_WEIGHTS, folder / SAFETENSORS_CONFIG
    for f in (weights_file, config_file):
        if not f.is_file():
            raise FileNotFoundError(f"{where}: no {f.name} (a safetensors export has {SAFETENSORS_WEIGHTS} and "
                                    f"{SAFETENSORS_CONFIG})")  # fmt: skip
    try:
        with safe_open(str(weights_file), framework="pt") as fh:
            meta = fh.metadata() or {}
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{where}/{SAFETENSORS_WEIGHTS}: damaged: {e}") from e
    config_text = config_file.read_text()
    _check_export_files(folder, where, meta, allow_unverified)
    try:
        config = json.loads(config_text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{where}/{SAFETENSORS_CONFIG}: not JSON ({e})") from None
    if config.get("_diffseg_format") != SAFETENSORS_FORMAT or "model" not in config:
        raise CheckpointError(
            f"{where}/{SAFETENSORS_CONFIG}: not a diffseg export (no _diffseg_format {SAFETENSORS_FORMAT!r}); a "
            "diffusers UNet2DModel folder is a feature backbone as diffusers:<folder>"
        )
    if "sha256" not in meta:
        raise CheckpointError(f"{where}/{SAFETENSORS_WEIGHTS}: no SHA-256 record in its metadata; refused")
    expected = json.loads(meta["sha256"])
    if sorted(expected) != sorted(tensors):
        raise CheckpointError(f"{where}/{SAFETENSORS_WEIGHTS}: its tensors are not those of its SHA-256 record")
    for name, tensor in tensors.items():
        if tensor_digest(tensor) != expected[name]:
            raise CheckpointError(f"{where}/{SAFETENSORS_WEIGHTS}: tensor {name!r} does not match its SHA-256")
    run_config = dict(config.get("run_config") or {})
    run_config.update(model=config["model"], diffusion=config.get("diffusion") or {})
    return Checkpoint(
        config=run_config,
        model=tensors,
        ema=None,
        optimizer=None,
        step=int(config.get("step", 0)),
        extra={"imported_from": "safetensors", "weights": config.get("weights", "model")},
    )


# ---------------------------------------------------------------------------------------------------- diffusers
FOLDER_SEAL = "diffseg_integrity.json"  # the SHA-256 of every file of an exported folder (a diffusers pipeline)
FOLDER_SEAL_FORMAT = "diffseg-folder-seal/1"


def seal_folder(folder: str | os.PathLike) -> Path:
    """Record the SHA-256 of every file under `folder` (but the record itself) in `diffseg_integrity.json`: what a
    loader of the folder checks before it reads anything (`check_folder_seal`)."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): file_sha256(p) for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != FOLDER_SEAL}  # fmt: skip
    text = json.dumps({"format": FOLDER_SEAL_FORMAT, "files": files}, indent=1, sort_keys=True)
    atomic_write(folder / FOLDER_SEAL, lambda tmp: Path(tmp).write_text(text))
    return folder / FOLDER_SEAL


def check_folder_seal(folder: str | os.PathLike, where: str | None = None, allow_unverified: bool = False) -> None:
    """Every file of an exported folder, weights and configs alike, against its seal (`seal_folder`): CheckpointError
    naming the file for a changed, missing or unrecorded one. A folder without a seal (a diffusers model from
    elsewhere) loads only unverified (`allow_unverified`, `--allow-unverified`), with a warning."""
    folder = Path(folder)
    where = where or str(folder)
    seal = folder / FOLDER_SEAL
    if not seal.is_file():
        if not unverified_allowed(allow_unverified):
            raise CheckpointError(
                f"{where}: no {FOLDER_SEAL} (the SHA-256 of its files, which jobs/convert_checkpoint.py to=diffusers "
                "writes), so nothing shows its weights and config are the ones written; refused. If you know where "
                "it comes from, load it with --allow-unverified (DIFFSEG_ALLOW_UNVERIFIED=1)"
            )
        log.warning("%s: loaded WITHOUT an integrity check (allow_unverified)", where)
        return
    try:
        record = json.loads(seal.read_text())
        files = dict(record["files"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}/{FOLDER_SEAL}: unreadable ({e})") from None
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != FOLDER_SEAL}
    if extra := sorted(present - set(files)):
        raise CheckpointError(f"{where}: {extra[:5]} are not in its {FOLDER_SEAL}; refused")
    for name, digest in files.items():
        if name not in present:
            raise CheckpointError(f"{where}/{name}: missing (its {FOLDER_SEAL} records it)")
        if file_sha256(folder / name) != digest:
            raise CheckpointError(f"{where}/{name}: does not match the SHA-256 its {FOLDER_SEAL} records; refused")


def diffusers_unet_folder(folder: str | os.PathLike, allow_unverified: bool = False) -> Path:
    """The `UNet2DModel` folder of a `diffusers:<folder>` backbone, after its seal is checked: `<folder>/unet` of a
    pipeline folder (model_index.json, what `jobs/convert_checkpoint.py to=diffusers` writes), else the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder (a diffusers backbone is diffusers:<folder>)")
    check_folder_seal(folder, allow_unverified=allow_unverified)
    return folder / "unet" if (folder / "model_index.json").is_file() else folder
