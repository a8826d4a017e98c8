"""Serving without Ray: app config, request validation, image decoding, model wrappers and response encoding.

The Serve deployments in `serve/app.py` are thin shells around this module, so all of it is unit-tested in plain
Python. The contract with a client:

    POST /v1/segment   an image (multipart field `image`/`file`, or the raw bytes) + query parameters
    POST /v1/sample    a JSON object {num_images, steps, seed, label, output}

Every way a request can be wrong raises `RequestError(status, message, field)` here, before any model sees it; the
ingress turns it into a 4xx JSON body `{"error": {"status", "message", "field"}}`. Model replicas receive only
validated, fixed-size float arrays, which is what keeps a replica alive whatever a client sends.

Images are decoded in two steps so a decompression bomb is refused from its header: `Image.open` reads only the
header, the declared size is checked against `max_image_pixels` / `max_image_side`, and only then are pixels decoded.
"""

from __future__ import annotations

import base64
import io
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from diffseg import segment, viz
from diffseg.checkpoint import LoadedModel, load_diffusion_model, resolve_source
from diffseg.data import resize_images, resize_labels, resize_maps, resize_probs, to_tensor_image
from diffseg.pixel import PixelSegmenter
from diffseg.runtime import image_generators, image_seed, resolve_device
from diffseg.sampling import sample

# ---------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 8 * 2**20  # largest request body accepted (413 above); checked before and while reading
    max_json_bytes: int = 64 * 2**10  # largest JSON body for /v1/sample
    max_image_pixels: int = 16 * 2**20  # largest declared width x height (413 above): decompression-bomb guard
    max_image_side: int = 8192  # largest declared width or height
    formats: tuple[str, ...] = ("PNG", "JPEG")  # image formats accepted (sniffed from the bytes, not the header)
    max_t: int = 300  # largest noise level t for the factorized segmenter (also capped at T - 1)
    max_num_images: int = 16  # most images one /v1/sample request may ask for
    max_steps: int = 250  # most DDIM steps one /v1/sample request may ask for (also capped at T)
    max_seed: int = 2**31 - 1  # seeds are integers in [0, max_seed]
    request_timeout_s: float = 120.0  # the ingress gives up on a model call after this long (504)


@dataclass(frozen=True)
class BatchingConfig:
    enabled: bool = True  # route requests through @serve.batch (False: each request is its own forward pass)
    max_batch_size: int = 8  # most requests in one segmenter pass; the sampler's counts images (>= max_num_images)
    batch_wait_timeout_s: float = 0.01  # how long a batch waits to fill up after its first request


@dataclass(frozen=True)
class AutoscalingSection:
    enabled: bool = False  # autoscale replicas between min and max (otherwise num_replicas is fixed)
    min_replicas: int = 1  # lower bound while autoscaling
    max_replicas: int = 2  # upper bound while autoscaling
    target_ongoing_requests: float = 4.0  # requests in flight per replica the autoscaler aims for


@dataclass(frozen=True)
class DeploymentSection:
    num_replicas: int = 1  # replicas when autoscaling is off
    autoscaling: AutoscalingSection = field(default_factory=AutoscalingSection)  # replica autoscaling
    num_cpus: float = 1.0  # CPUs reserved per replica (also the replica's torch thread count, at least 1)
    use_gpu: Literal["auto", "yes", "no"] = "auto"  # auto: one GPU per model replica when the cluster has any
    max_ongoing_requests: int = 64  # requests a replica holds at once (batching needs this >= max_batch_size)
    max_queued_requests: int = 512  # requests waiting for a replica before Serve answers 503


@dataclass(frozen=True)
class ServeAppConfig:
    segmenter: str | None = None  # factorized checkpoint: a path, a run folder, or an MLflow artifact URI
    pixel: str | None = None  # pixel-ensemble bundle (diffseg.pixel): a path or an MLflow artifact URI
    sampler: str | None = None  # checkpoint to sample from (ddpm or factorized); None = the segmenter's
    use_sampler: bool = True  # serve /v1/sample (False: segmenters only, one replica fewer)
    device: str = "auto"  # torch device of the model replicas: auto (cuda when visible), cpu, cuda, cuda:1
    use_ema: bool = True  # load the EMA weights when the checkpoint has them
    batching: BatchingConfig = field(default_factory=BatchingConfig)  # @serve.batch on/off and sizes
    limits: Limits = field(default_factory=Limits)  # request size, pixel and parameter limits
    models: DeploymentSection = field(default_factory=DeploymentSection)  # replicas/resources of each model
    ingress: DeploymentSection = field(
        default_factory=lambda: DeploymentSection(num_cpus=0.5, use_gpu="no", max_ongoing_requests=256)
    )  # replicas/resources of the HTTP front

    def __post_init__(self):
        if not (self.segmenter or self.pixel or (self.sampler and self.use_sampler)):
            raise ValueError("nothing to serve: set at least one of segmenter, pixel, sampler")
        if self.batching.max_batch_size < 1:
            raise ValueError("batching.max_batch_size must be >= 1")

    @property
    def sampler_source(self) -> str | None:
        return (self.sampler or self.segmenter) if self.use_sampler else None


# ---------------------------------------------------------------------------------------------------- errors


class RequestError(Exception):
    """A client error: HTTP `status` (4xx), a message that says what is wrong, and the offending field if any."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field

    def to_json(self) -> dict[str, Any]:
        return {"error": {"status": self.status, "message": self.message, "field": self.field}}


# ---------------------------------------------------------------------------------------------------- images

_MAGIC = {"PNG": (b"\x89PNG\r\n\x1a\n",), "JPEG": (b"\xff\xd8\xff",)}


def sniff_format(data: bytes) -> str | None:
    """The image format from the first bytes (never from a client's Content-Type or file name)."""
    for fmt, magics in _MAGIC.items():
        if any(data.startswith(m) for m in magics):
            return fmt
    return None


def decode_image(data: bytes, limits: Limits) -> Image.Image:
    """Bytes -> RGB PIL image, or RequestError: 400 empty/corrupt, 415 not an allowed format, 413 too many pixels."""
    if not data:
        raise RequestError(400, "the request has no image bytes", "image")
    if len(data) > limits.max_body_bytes:
        raise RequestError(413, f"image is {len(data)} bytes; the limit is {limits.max_body_bytes}", "image")
    fmt = sniff_format(data)
    if fmt is None:
        raise RequestError(415, f"not a PNG or JPEG image (starts with {data[:8]!r})", "image")
    if fmt not in limits.formats:
        raise RequestError(415, f"{fmt} images are not accepted; allowed: {list(limits.formats)}", "image")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data), formats=[fmt])  # reads the header only
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise RequestError(413, f"image too large: {e}", "image") from e
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
            raise RequestError(400, f"cannot read the {fmt} header: {e}", "image") from e
        w, h = im.size
        if w < 1 or h < 1:
            raise RequestError(400, f"image has an empty size {w}x{h}", "image")
        if w * h > limits.max_image_pixels or max(w, h) > limits.max_image_side:
            raise RequestError(
                413,
                f"image is {w}x{h} = {w * h} pixels; limits are {limits.max_image_pixels} pixels "
                f"and {limits.max_image_side} per side",
                "image",
            )
        try:
            im.load()
            im = ImageOps.exif_transpose(im) or im
        except Exception as e:  # any decoder failure on client bytes is the client's error
            raise RequestError(400, f"corrupt or truncated {fmt} image: {type(e).__name__}: {e}", "image") from e
    return to_rgb(im)


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB uint8; 16/32-bit greyscale is rescaled rather than clipped, alpha is dropped."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        a = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        im = Image.fromarray(a, "L")
    return im.convert("RGB")


def to_model_input(im: Image.Image, size: int) -> np.ndarray:
    """RGB image -> (3, size, size) float32 in [-1, 1] by the one resize policy (`diffseg.data.resize_images`), the
    resize `jobs/segment.py` applies to the same image."""
    x = resize_images(to_tensor_image(im)[None], size)[0]  # (3, size, size)
    return np.ascontiguousarray(x.numpy(), dtype=np.float32)


def encode_png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# ---------------------------------------------------------------------------------------------------- parameters


def _int_param(raw: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(raw, bool) or raw is None:
        raise RequestError(422, f"{name} must be an integer in [{lo}, {hi}], got {raw!r}", name)
    if isinstance(raw, str):
        try:
            raw = int(raw.strip(), 10)
        except ValueError:
            raise RequestError(422, f"{name} must be an integer in [{lo}, {hi}], got {raw!r}", name) from None
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    if not isinstance(raw, int):
        raise RequestError(422, f"{name} must be an integer in [{lo}, {hi}], got {raw!r}", name)
    if not lo <= raw <= hi:
        raise RequestError(422, f"{name}={raw} is outside [{lo}, {hi}]", name)
    return raw


def _float_param(raw: Any, name: str, lo: float, hi: float) -> float:
    try:
        value = float(raw) if isinstance(raw, (str, int, float)) and not isinstance(raw, bool) else None
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or not lo <= value <= hi:
        raise RequestError(422, f"{name} must be a number in [{lo}, {hi}], got {raw!r}", name)
    return value


def _choice(raw: Any, name: str, options: Sequence[str]) -> str:
    if raw not in options:
        raise RequestError(422, f"{name} must be one of {list(options)}, got {raw!r}", name)
    return raw


def _bool_param(raw: Any, name: str) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return raw.lower() in ("1", "true", "yes", "on")
    raise RequestError(422, f"{name} must be true or false, got {raw!r}", name)


SEGMENT_OUTPUTS = ("json", "mask", "color", "overlay")
SAMPLE_OUTPUTS = ("json", "grid")


@dataclass(frozen=True)
class SegmentParams:
    method: str  # "factorized" or "pixel"
    t: int  # noise level (factorized only)
    seed: int  # seed of the noise added at t
    output: str  # json | mask (class-id PNG) | color (PNG) | overlay (PNG)
    overlay: bool  # include an overlay PNG in the JSON answer
    alpha: float  # overlay opacity


def parse_segment_params(query: Mapping[str, str], limits: Limits, models: Mapping[str, Mapping[str, Any]]):
    """Query parameters of /v1/segment -> SegmentParams; `models` is {method: model info} of what is served."""
    known = {"method", "t", "seed", "output", "overlay", "alpha"}
    unknown = sorted(set(query) - known)
    if unknown:
        raise RequestError(422, f"unknown query parameter(s) {unknown}; known: {sorted(known)}", unknown[0])
    if not models:
        raise RequestError(404, "this deployment serves no segmenter", "method")
    method = _choice(query.get("method", next(iter(models))), "method", list(models))
    info = models[method]
    t_hi = min(limits.max_t, int(info.get("num_timesteps", limits.max_t + 1)) - 1)
    return SegmentParams(
        method=method,
        t=_int_param(query.get("t", min(int(info.get("default_t", 30)), t_hi)), "t", 0, t_hi),
        seed=_int_param(query.get("seed", "0"), "seed", 0, limits.max_seed),
        output=_choice(query.get("output", "json"), "output", SEGMENT_OUTPUTS),
        overlay=_bool_param(query.get("overlay", "false"), "overlay"),
        alpha=_float_param(query.get("alpha", "0.5"), "alpha", 0.0, 1.0),
    )


@dataclass(frozen=True)
class SampleParams:
    num_images: int  # images to generate
    steps: int  # DDIM steps (respaced)
    seed: int  # image i uses the generator seeded with seed * 10_000 + i, whatever else is in its batch
    label: int | None  # class label for a class-conditional model
    output: str  # json (PNGs in base64) | grid (one PNG: image | mask | overlay per sample)


def parse_sample_request(body: bytes, limits: Limits, info: Mapping[str, Any]) -> SampleParams:
    """A /v1/sample JSON body -> SampleParams; `info` is the sampler's model info (T, num_classes)."""
    if len(body) > limits.max_json_bytes:
        raise RequestError(413, f"JSON body is {len(body)} bytes; the limit is {limits.max_json_bytes}")
    try:
        data = json.loads(body.decode("utf-8")) if body.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise RequestError(400, f"body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise RequestError(422, f"body must be a JSON object, got {type(data).__name__}")
    known = {"num_images", "steps", "seed", "label", "output"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RequestError(422, f"unknown field(s) {unknown}; known: {sorted(known)}", unknown[0])
    for key in ("num_images", "steps", "seed", "label"):  # JSON integers only: no "3", 3.0 or true
        if data.get(key) is not None and (isinstance(data[key], bool) or not isinstance(data[key], int)):
            raise RequestError(422, f"{key} must be a JSON integer, got {data[key]!r}", key)
    steps_hi = min(limits.max_steps, int(info.get("num_timesteps", limits.max_steps)))
    seed = _int_param(data.get("seed", 0), "seed", 0, limits.max_seed)
    num_classes = info.get("num_classes")
    label = data.get("label")
    if num_classes:
        if label is None:  # a class-conditional model and no label: one drawn from the seed, so answers repeat
            label = int(np.random.default_rng(seed).integers(num_classes))
        label = _int_param(label, "label", 0, int(num_classes) - 1)
    elif label is not None:
        raise RequestError(422, "label given, but the sampler's model is not class-conditional", "label")
    return SampleParams(
        num_images=_int_param(data.get("num_images", 4), "num_images", 1, limits.max_num_images),
        steps=_int_param(data.get("steps", min(50, steps_hi)), "steps", 1, steps_hi),
        seed=seed,
        label=label,
        output=_choice(data.get("output", "json"), "output", SAMPLE_OUTPUTS),
    )


# ---------------------------------------------------------------------------------------------------- models


def _entropy(p: torch.Tensor, dim: int) -> torch.Tensor:
    return -(p * p.clamp(min=1e-12).log()).sum(dim)


class ServedModel(Protocol):
    """What a Serve model replica needs from a segmenter: validated (B, 3, S, S) arrays in, arrays out, and info.

    The segmenters themselves are `diffseg.segmenter.Segmenter`s (the ones the jobs and `evaluate` use); these
    adapters only convert arrays and describe the model for /v1/info.
    """

    method: str

    def info(self) -> dict[str, Any]: ...

    def segment(self, images: np.ndarray, ts: Sequence[int], seeds: Sequence[int]) -> list[dict[str, np.ndarray]]:
        """(B, 3, S, S) float32 in [-1, 1] -> per image {"probs": (C, S, S)} or {"labels", "uncertainty"}."""
        ...


class FactorizedSegmenter:
    """Serves `diffseg.segment.FactorizedSegmenter`: K soft masks from one forward pass at noise level t.

    A request's `seed` is the seed of a run of one image: its noise is `image_seed(seed, 0)`, the noise
    `jobs/segment.py seed=<seed>` gives the first image of its data set.
    """

    method = "factorized"

    def __init__(self, segmenter: segment.FactorizedSegmenter):
        self.segmenter = segmenter
        self.device = next(segmenter.model.parameters()).device

    @classmethod
    def load(cls, source: str, device: str = "auto", use_ema: bool = True) -> FactorizedSegmenter:
        return cls(segment.FactorizedSegmenter.load(source, device, use_ema))

    def info(self) -> dict[str, Any]:
        seg = self.segmenter
        return {
            "method": self.method,
            "kind": "factorized",
            "source": seg.source,
            "step": seg.step,
            "image_size": seg.image_size,
            "num_components": len(seg.class_names),
            "class_names": list(seg.class_names),
            "num_timesteps": seg.diffusion.num_timesteps,
            "default_t": seg.t,
            "num_classes": seg.model.cfg.num_classes,
            "device": str(self.device),
            "num_parameters": sum(p.numel() for p in seg.model.parameters()),
        }

    @torch.no_grad()
    def segment(self, images: np.ndarray, ts: Sequence[int], seeds: Sequence[int]) -> list[dict[str, np.ndarray]]:
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))  # (B, 3, S, S)
        out: list[dict[str, np.ndarray] | None] = [None] * len(x)
        for t in sorted(set(ts)):  # one forward pass per distinct t in the batch
            idx = [i for i, ti in enumerate(ts) if ti == t]
            res = self.segmenter.segment(x[idx], [image_seed(int(seeds[i]), 0) for i in idx], t=int(t))
            for j, i in enumerate(idx):
                out[i] = {"probs": res.probs[j].numpy()}  # (K, S, S)
        return out


class PixelEnsembleSegmenter:
    """Adapter for a pixel-segmenter bundle (`diffseg.pixel.PixelSegmenter`): DDPM features + MLP ensemble + class
    names. Labels are the ensemble's majority vote; the uncertainty is its per-pixel disagreement (entropy of the
    mean softmax minus the mean entropy), as the bundle computes it.

    The adapter needs of the bundle only `class_names`, `image_size` and `predict(images (B, 3, S, S) in [-1, 1])
    -> (labels (B, S, S), uncertainty (B, S, S))` (arrays or tensors).
    """

    method = "pixel"

    def __init__(self, bundle, *, source: str, device: torch.device):
        self.bundle, self.source, self.device = bundle, source, device

    @classmethod
    def load(cls, source: str, device: str = "auto") -> PixelEnsembleSegmenter:
        dev = resolve_device(device)
        bundle = PixelSegmenter.load(resolve_source(source), device=dev)
        return cls(bundle, source=source, device=dev)

    def info(self) -> dict[str, Any]:
        names = list(self.bundle.class_names)
        extra = getattr(self.bundle, "extra", {}) or {}
        return {
            "method": self.method,
            "kind": "pixel-ensemble",
            "source": self.source,
            "step": extra.get("step"),
            "image_size": int(self.bundle.image_size),
            "class_names": names,
            "num_classes": len(names),
            "device": str(self.device),
            "extra": {k: v for k, v in extra.items() if isinstance(v, (str, int, float, bool))},
        }

    @torch.no_grad()
    def segment(self, images: np.ndarray, ts: Sequence[int], seeds: Sequence[int]) -> list[dict[str, np.ndarray]]:
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))  # (B, 3, S, S); t, seed unused
        labels, uncertainty = self.bundle.predict(x)
        labels = labels.cpu().numpy() if torch.is_tensor(labels) else np.asarray(labels)
        unc = uncertainty.float().cpu().numpy() if torch.is_tensor(uncertainty) else np.asarray(uncertainty)
        return [{"labels": labels[i].astype(np.int32), "uncertainty": unc[i].astype(np.float32)} for i in range(len(x))]


class DiffusionSampler:
    """DDIM sampling from a DDPM or factorized checkpoint; the factorized one also gives each image its masks.

    Image j of a request seeded `seed` uses `image_generators(seed, [j])`: the images `jobs/sample.py seed=<seed>`
    writes first, bit for bit on the same device.
    """

    def __init__(self, loaded: LoadedModel):
        self.model, self.diffusion = loaded.model, loaded.diffusion
        self.source, self.step, self.device = loaded.source, loaded.step, loaded.device

    @classmethod
    def load(cls, source: str, device: str = "auto", use_ema: bool = True) -> DiffusionSampler:
        return cls(load_diffusion_model(source, device, use_ema))

    def info(self) -> dict[str, Any]:
        cfg = self.model.cfg
        k = getattr(self.model, "num_components", None)
        return {
            "kind": "factorized" if k else "ddpm",
            "source": self.source,
            "step": self.step,
            "image_size": cfg.image_size,
            "num_components": k,
            "num_classes": cfg.num_classes,
            "num_timesteps": self.diffusion.num_timesteps,
            "device": str(self.device),
            "num_parameters": sum(p.numel() for p in self.model.parameters()),
        }

    @torch.no_grad()
    def sample(self, requests: Sequence[SampleParams]) -> list[dict[str, np.ndarray | None]]:
        """One batched DDIM run per distinct step count -> per request {"images" (N, H, W, 3) uint8, "labels"}."""
        out: list[dict[str, np.ndarray | None] | None] = [None] * len(requests)
        for steps in sorted({r.steps for r in requests}):
            idx = [i for i, r in enumerate(requests) if r.steps == steps]
            gens = [g for i in idx for g in image_generators(requests[i].seed, range(requests[i].num_images))]
            y = None
            if self.model.cfg.num_classes:
                y = torch.tensor([requests[i].label for i in idx for _ in range(requests[i].num_images)])
                y = y.to(self.device)
            images, masks = sample(
                self.model, self.diffusion, len(gens), steps=steps, generator=gens, device=self.device, y=y
            )
            images_u8 = viz.to_uint8(images)  # (N, H, W, 3)
            labels = masks.argmax(dim=1).to(torch.uint8).cpu().numpy() if masks is not None else None
            start = 0
            for i in idx:
                n = requests[i].num_images
                out[i] = {
                    "images": images_u8[start : start + n],
                    "labels": labels[start : start + n] if labels is not None else None,
                }
                start += n
        return out


# ---------------------------------------------------------------------------------------------------- responses


def upsample_result(result: Mapping[str, np.ndarray], size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A model-resolution result -> (labels (H, W) int, uncertainty (H, W) float32) at the upload's size (H, W), by the
    one resize policy (`diffseg.data`): soft masks bilinearly before the argmax (the masks `jobs/segment.py` writes),
    hard labels by nearest neighbour. For soft masks the uncertainty is their entropy divided by log C (0 = certain,
    1 = uniform).
    """
    if "probs" in result:
        p = resize_probs(torch.from_numpy(np.asarray(result["probs"], dtype=np.float32))[None], size)[0]  # (C, H, W)
        c = p.shape[0]
        unc = _entropy(p, 0) / math.log(c) if c > 1 else torch.zeros(p.shape[1:])
        return p.argmax(0).numpy(), unc.clamp(0, 1).numpy().astype(np.float32)
    labels = torch.from_numpy(np.asarray(result["labels"], dtype=np.int64))[None]  # (1, S, S)
    unc = torch.from_numpy(np.asarray(result["uncertainty"], dtype=np.float32))[None]
    return resize_labels(labels, size)[0].numpy(), resize_maps(unc, size)[0].numpy()


def segmentation_stats(labels: np.ndarray, uncertainty: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Per-class pixel areas and mean uncertainty, for the JSON answer."""
    total = labels.size
    counts = np.bincount(labels.ravel(), minlength=len(class_names))
    unc_sums = np.bincount(labels.ravel(), weights=uncertainty.ravel().astype(np.float64), minlength=len(class_names))
    classes = []
    for cid, name in enumerate(class_names):
        n = int(counts[cid])
        classes.append(
            {
                "id": cid,
                "name": name,
                "area_px": n,
                "area_frac": round(n / total, 6),
                "mean_uncertainty": round(float(unc_sums[cid] / n), 6) if n else None,
            }
        )
    return {
        "classes": classes,
        "present": [c["id"] for c in classes if c["area_px"] > 0],
        "uncertainty": {"mean": round(float(uncertainty.mean()), 6), "max": round(float(uncertainty.max()), 6)},
    }


def label_png(labels: np.ndarray) -> bytes:
    """Class ids as a greyscale PNG (8-bit below 256 classes, 16-bit otherwise)."""
    if labels.max(initial=0) < 256:
        return encode_png(labels.astype(np.uint8))
    buf = io.BytesIO()
    Image.fromarray(labels.astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def render_segmentation(
    image: Image.Image, result: Mapping[str, np.ndarray], params: SegmentParams, info: Mapping[str, Any]
) -> tuple[str, bytes | dict[str, Any]]:
    """-> ("image/png", bytes) or ("application/json", dict), as `params.output` asks."""
    w, h = image.size
    labels, unc = upsample_result(result, (h, w))
    names = list(info["class_names"])
    k = len(names)
    if params.output == "mask":
        return "image/png", label_png(labels)
    color = viz.colorize(labels, k)
    if params.output == "color":
        return "image/png", encode_png(color)
    over = viz.overlay(np.asarray(image), labels, alpha=params.alpha, num_classes=k, skip_background=False)
    if params.output == "overlay":
        return "image/png", encode_png(over)
    body: dict[str, Any] = {
        "method": params.method,
        "width": w,
        "height": h,
        "t": params.t if params.method == "factorized" else None,
        "seed": params.seed,
        **segmentation_stats(labels, unc, names),
        "mask_png": b64(label_png(labels)),
        "color_png": b64(encode_png(color)),
        "model": {key: info.get(key) for key in ("kind", "source", "step", "image_size")},
    }
    if params.overlay:
        body["overlay_png"] = b64(encode_png(over))
    return "application/json", body


def render_samples(
    result: Mapping[str, np.ndarray | None], params: SampleParams, info: Mapping[str, Any]
) -> tuple[str, bytes | dict[str, Any]]:
    images, labels = result["images"], result["labels"]
    k = info.get("num_components") or 1
    if params.output == "grid":
        tiles = []
        for i, img in enumerate(images):
            tiles.append(img)
            if labels is not None:
                tiles += [viz.colorize(labels[i], k), viz.overlay(img, labels[i], num_classes=k, skip_background=False)]
        per_row = (3 if labels is not None else 1) * min(4, len(images))
        return "image/png", encode_png(viz.grid(tiles, nrow=per_row))
    samples = []
    for i, img in enumerate(images):
        entry = {"image_png": b64(encode_png(img))}
        if labels is not None:
            entry["mask_png"] = b64(label_png(labels[i]))
            entry["color_png"] = b64(encode_png(viz.colorize(labels[i], k)))
        samples.append(entry)
    return "application/json", {
        "num_images": params.num_images,
        "steps": params.steps,
        "seed": params.seed,
        "label": params.label,
        "samples": samples,
        "model": {key: info.get(key) for key in ("kind", "source", "step", "image_size")},
    }


def config_summary(cfg: ServeAppConfig) -> dict[str, Any]:
    return asdict(cfg)
