"""diffseg models as MLflow models (pyfunc): the factorized segmenter, the DDPM sampler, the pixel-ensemble segmenter.

    model = mlflow.pyfunc.load_model("models:/horse-seg@champion")    # or runs:/..., models:/m-<id>, a folder
    labels = model.predict(images)                       # uint8 (B, H, W, 3) -> int64 (B, H, W), at the input's size
    labels = model.predict(images, params={"t": 30, "seed": 0})        # factorized: noise level and seed
    images = ddpm.predict(np.arange(8), params={"seed": 1, "steps": 50})   # DDPM: images 0..7 of a run seeded 1

A factorized model segments as `jobs/segment.py` does (image i of a call draws its noise from `image_seed(seed, i)`,
the one resize policy), so `predict` on a folder's images in order gives the job's masks; the pixel ensemble gives
its majority vote; a DDPM has no masks of its own and samples instead (uint8 (N, S, S, 3): the images
`jobs/sample.py seed=<seed>` writes). Serve deploys the same URIs (`serve/app.py`).

How it is stored (nothing pickled): the model is logged with `loader_module="diffseg.serving.pyfunc"`; MLflow keeps our
files in the model's `data/` folder and a copy of the library in `code/diffseg/`, and `mlflow.pyfunc.load_model`
calls `_load_pyfunc(<model>/data)`. `data/` holds `spec.json` (kind, files, backbone), then

    factorized, ddpm   checkpoint.pt       the inference weights (EMA, fp32) in our checkpoint format (SHA-256 checked)
    pixel              segmenter.pt        the bundle (`diffseg.methods.pixel`), and its backbone: packaged in backbone/
                                           when it was a local file, or referenced by a pinned model URI
                                           (models:/<name>/<version>: an alias is resolved when the bundle is logged,
                                           so a moved alias never swaps the features under a trained ensemble)

Every model is logged with a signature and an input example, which MLflow checks by loading the model and
predicting on it before anything is uploaded.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffseg.core.registry import resolve_model_uri
from diffseg.core.runtime import image_generators, image_seed
from diffseg.core.tracking import LoggedModel, Tracker
from diffseg.core.viz import to_uint8
from diffseg.methods.pixel import BACKBONE_DIR, BUNDLE_FILE, PixelSegmenter, split_backbone
from diffseg.methods.sampling import sample
from diffseg.methods.segment import FactorizedSegmenter
from diffseg.models.checkpoint import (
    CHECKPOINT_NAME,
    MLFLOW_SCHEMES,
    MODEL_SPEC,
    Checkpoint,
    checkpoint_file,
    export_weights,
    load_checkpoint,
    load_diffusion_model,
)
from diffseg.models.integrity import CheckpointError

log = logging.getLogger(__name__)

PYFUNC_FORMAT = "diffseg-pyfunc/1"
LOADER_MODULE = "diffseg.serving.pyfunc"
BATCH = 16  # images per forward pass inside predict (image i's noise depends on i only: batching changes nothing)


def images_to_tensor(images: Any) -> torch.Tensor:
    """uint8 images (B, H, W, 3) or one (H, W, 3) -> float (B, 3, H, W) in [-1, 1], by
    `diffseg.data.datasets.to_tensor_image`'s arithmetic (the jobs' reading of a PNG), so predict and the jobs see the
    same numbers."""
    if isinstance(images, Mapping) and len(images) == 1:  # a named tensor input
        images = next(iter(images.values()))
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"images must be uint8 (B, H, W, 3) or (H, W, 3), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (0..255), got {arr.dtype}")
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1)


class DiffsegPyfunc:
    """What `mlflow.pyfunc.load_model` wraps: `predict(model_input, params)` by the model's kind (module docstring)."""

    def __init__(self, kind: str, model: Any, spec: Mapping[str, Any]):
        self.kind, self.model, self.spec = kind, model, dict(spec)

    def predict(self, model_input: Any, params: Mapping[str, Any] | None = None) -> np.ndarray:
        params = dict(params or {})
        if self.kind == "ddpm":
            return self._sample(model_input, params)
        x = images_to_tensor(model_input)  # (B, 3, H, W)
        labels = []
        for start in range(0, len(x), BATCH):
            chunk = x[start : start + BATCH]
            if self.kind == "factorized":
                seeds = [image_seed(int(params.get("seed", 0)), i) for i in range(start, start + len(chunk))]
                out = self.model.segment(chunk, seeds, t=int(params.get("t", self.model.t)))
            else:
                out = self.model.segment(chunk)
            labels.append(out.labels.cpu().numpy().astype(np.int64))
        return np.concatenate(labels) if labels else np.zeros((0, *x.shape[-2:]), dtype=np.int64)

    @torch.no_grad()
    def _sample(self, indices: Any, params: dict[str, Any]) -> np.ndarray:
        idx = [int(i) for i in np.asarray(indices).reshape(-1)]
        loaded, seed = self.model, int(params.get("seed", 0))
        steps, label = int(params.get("steps", 50)), int(params.get("label", -1))
        num_classes = loaded.model.cfg.num_classes
        out = []
        for start in range(0, len(idx), BATCH):
            part = idx[start : start + BATCH]
            y = None
            if num_classes is not None:  # as jobs/sample.py: one class for all, or image i gets class i mod C
                y = torch.tensor([label if label >= 0 else i % num_classes for i in part], device=loaded.device)
            images, _ = sample(
                loaded.model, loaded.diffusion, len(part), steps=steps or None,
                generator=image_generators(seed, part), device=loaded.device, y=y,
            )  # fmt: skip
            out.append(to_uint8(images.cpu()))
        return np.concatenate(out) if out else np.zeros((0, 0, 0, 3), dtype=np.uint8)


def read_spec(folder: Path) -> dict[str, Any]:
    spec_file = folder / MODEL_SPEC
    if not spec_file.is_file():
        raise FileNotFoundError(f"{folder}: no {MODEL_SPEC}: not the data folder of a diffseg MLflow model")
    spec = json.loads(spec_file.read_text())
    if spec.get("format") != PYFUNC_FORMAT:
        raise CheckpointError(f"{spec_file}: format {spec.get('format')!r}, expected {PYFUNC_FORMAT!r}")
    return spec


def _load_pyfunc(data_path: str) -> DiffsegPyfunc:
    """MLflow's loader-module entry point: the model's data/ folder -> the model (device: CUDA when visible)."""
    folder = Path(data_path)
    spec = read_spec(folder)
    kind, device = spec["kind"], os.environ.get("DIFFSEG_DEVICE", "auto")
    if kind == "factorized":
        label = spec.get("class_label")
        model: Any = FactorizedSegmenter.load(str(folder / CHECKPOINT_NAME), device, t=int(spec.get("t", 30)),
                                              class_label=label)  # fmt: skip
    elif kind == "ddpm":
        model = load_diffusion_model(folder / CHECKPOINT_NAME, device)
    elif kind == "pixel":
        model = PixelSegmenter.load(folder, device)
    else:
        raise CheckpointError(f"{folder}/{MODEL_SPEC}: unknown model kind {kind!r}")
    return DiffsegPyfunc(kind, model, spec)


# ---------------------------------------------------------------------------------------------------- signatures
def _segmenter_signature(params: Mapping[str, tuple[str, Any]]):
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
        outputs=Schema([TensorSpec(np.dtype(np.int64), (-1, -1, -1))]),
        params=ParamSchema([ParamSpec(k, dtype, default) for k, (dtype, default) in params.items()])
        if params
        else None,
    )


def _sampler_signature(image_size: int):
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.int64), (-1,))]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, image_size, image_size, 3))]),
        params=ParamSchema(
            [ParamSpec("seed", "long", 0), ParamSpec("steps", "long", 50), ParamSpec("label", "long", -1)]
        ),
    )


def example_images(size: int, num: int = 1) -> np.ndarray:
    """A small deterministic uint8 input example (B, S, S, 3): a colour gradient with a bright square."""
    s = min(size, 64)
    yy, xx = np.mgrid[0:s, 0:s]
    img = np.stack([xx * 255 // max(s - 1, 1), yy * 255 // max(s - 1, 1), np.full_like(xx, 96)], -1).astype(np.uint8)
    img[s // 4 : 3 * s // 4, s // 4 : 3 * s // 4] = 230
    return np.repeat(img[None], num, axis=0)


# ---------------------------------------------------------------------------------------------------- logging
def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst)
        return
    try:
        os.link(src, dst)  # MLflow copies it again into the model: no third copy of a large file
    except OSError:
        shutil.copyfile(src, dst)


def _write_spec(data: Path, spec: Mapping[str, Any]) -> None:
    (data / MODEL_SPEC).write_text(json.dumps({"format": PYFUNC_FORMAT, **spec}, indent=1))


def model_name(*parts: str) -> str:
    """The name of a logged model, after the run that made it (the MLflow UI lists models by name: `model` for every
    run told nothing): the parts joined by '-', characters other than letters, digits, '.', '_' and '-' replaced."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join(p for p in parts if p)).strip("-") or "model"


def log_checkpoint_model(
    tracker: Tracker,
    checkpoint: str | os.PathLike | Checkpoint,
    *,
    name: str = "model",
    register_as: str | None = None,
    t: int = 30,
    class_label: int | None = None,
) -> LoggedModel | None:
    """Log a checkpoint (factorized: a segmenter; DDPM: a sampler) as an MLflow model of `tracker`'s run: its EMA
    weights in fp32 (what the jobs and Serve use by default), a signature, an input example; registered as
    `register_as` (default `tracking.register_as`). None when tracking or model logging is off."""
    if not (tracker.enabled and tracker.cfg.log_models):
        return None
    if isinstance(checkpoint, Checkpoint):
        ckpt, staging = checkpoint, None
    else:
        path = checkpoint_file(checkpoint)[0]
        ckpt, staging = load_checkpoint(path), path.parent  # stage beside it: a large model stays on its disk
    mcfg = ckpt.model_config
    kind, size = mcfg.kind, int(mcfg.unet.image_size)
    if kind == "factorized" and mcfg.unet.num_classes is not None and class_label is None:
        class_label = 0  # a class-conditional segmenter needs one; predict uses it
    with tempfile.TemporaryDirectory(prefix=".model-", dir=staging) as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        export_weights(ckpt, data / CHECKPOINT_NAME, dtype=torch.float32, extra={"mlflow_run_id": tracker.run_id})
        _write_spec(data, {"kind": kind, "checkpoint": CHECKPOINT_NAME, "t": t, "class_label": class_label})
        meta = {
            "diffseg_kind": kind,
            "image_size": size,
            "step": ckpt.step,
            "num_timesteps": ckpt.diffusion_config.num_timesteps,
        }
        if kind == "factorized":
            meta["num_components"] = mcfg.factorized.num_components
            signature = _segmenter_signature({"t": ("long", t), "seed": ("long", 0)})
            example: Any = example_images(size)
        else:
            signature = _sampler_signature(size)
            example = (np.array([0], dtype=np.int64), {"steps": 2})  # two steps: the check stays quick
        return tracker.log_pyfunc_model(
            name, data, loader_module=LOADER_MODULE, signature=signature, input_example=example, metadata=meta,
            step=ckpt.step, register_as=register_as,
        )  # fmt: skip


def log_bundle_model(
    tracker: Tracker, bundle: str | os.PathLike, *, name: str = "segmenter", register_as: str | None = None
) -> LoggedModel | None:
    """Log a pixel-segmenter bundle as an MLflow model: its backbone is packaged (a local checkpoint: its inference
    weights; a diffusers folder: copied) or referenced by a pinned model URI (an MLflow URI in the recipe), never by
    a local path. None when tracking or model logging is off."""
    if not (tracker.enabled and tracker.cfg.log_models):
        return None
    bundle = Path(bundle)
    seg = PixelSegmenter.load(bundle, device="cpu")
    prefix, target = split_backbone(seg.recipe.backbone)
    with tempfile.TemporaryDirectory(prefix=".model-", dir=bundle.parent) as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        _link_or_copy(bundle, data / BUNDLE_FILE)
        packaged, backbone = False, seg.recipe.backbone
        if target == "rgb":
            pass
        elif target.startswith(MLFLOW_SCHEMES):
            backbone = prefix + resolve_model_uri(target, tracker.uri).pinned
        elif prefix == "diffusers:":
            _link_or_copy(Path(target), data / BACKBONE_DIR / Path(target).name)
            packaged, backbone = True, f"{prefix}{BACKBONE_DIR}/{Path(target).name}"
        else:
            dst = data / BACKBONE_DIR / CHECKPOINT_NAME
            dst.parent.mkdir(parents=True)
            export_weights(target, dst, dtype=torch.float32, use_ema=seg.recipe.use_ema)
            packaged, backbone = True, f"{prefix}{BACKBONE_DIR}/{CHECKPOINT_NAME}"
        _write_spec(data, {"kind": "pixel", "bundle": BUNDLE_FILE, "backbone": backbone, "backbone_packaged": packaged,
                           "class_names": seg.class_names, "image_size": seg.image_size})  # fmt: skip
        meta = {"diffseg_kind": "pixel", "image_size": seg.image_size, "class_names": seg.class_names,
                "feature_dim": seg.ensemble.in_dim, "members": seg.ensemble.members, "backbone": backbone}  # fmt: skip
        return tracker.log_pyfunc_model(
            name, data, loader_module=LOADER_MODULE, signature=_segmenter_signature({}),
            input_example=example_images(seg.image_size), metadata=meta, register_as=register_as,
        )  # fmt: skip
