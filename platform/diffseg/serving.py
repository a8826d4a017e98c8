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

Cost is bounded per request and per replica (see `Limits`):

- **Ingress memory.** An upload reserves its declared pixels (`PixelBudget`) before it is decoded and holds them until
  its answer is rendered; at most `max_inflight_pixels` are decoded or rendered at once, so at most
  `max_inflight_pixels // max_image_pixels` maximum-size images are in memory together. Rendering at the upload's
  size works in bands of rows and keeps no full-size float map (`segment_labels`): about 10 bytes per pixel.
- **Sampler time.** A request may ask for at most `max_sample_cost` image-steps (num_images x steps); a replica admits
  at most `max_inflight_cost` image-steps at once (503 beyond). Requests run one DDIM step at a time, fairly by
  image-steps (`SampleScheduler`): a small request is never stuck behind a large one, and a request whose caller
  timed out or went away is dropped between two steps.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import io
import json
import logging
import math
import re
import socket
import threading
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from diffseg import segment, viz
from diffseg.checkpoint import LoadedModel, load_diffusion_model, resolve_source
from diffseg.config import WORKDIR_ENV, InputPath, is_uri
from diffseg.data import resize_images, resize_labels, resize_maps, resize_probs, to_tensor_image
from diffseg.pixel import PixelSegmenter
from diffseg.runtime import decide_gpu, image_generators, image_seed, resolve_device
from diffseg.sampling import sample_progressive

log = logging.getLogger(__name__)

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
    max_sample_cost: int = 16 * 250  # most image-steps (num_images x steps) one /v1/sample request may ask for (422)
    max_inflight_cost: int = 2 * 16 * 250  # image-steps a sampler replica runs or queues at once (503 above)
    max_inflight_pixels: int = 2 * 16 * 2**20  # declared pixels the ingress decodes/renders at once (others wait)
    request_timeout_s: float = 120.0  # the ingress gives up on a model call after this long (504) and cancels it


@dataclass(frozen=True)
class BatchingConfig:
    enabled: bool = True  # route requests through @serve.batch (False: each request is its own forward pass)
    max_batch_size: int = 8  # most requests in one segmenter pass; the sampler's counts images (>= max_num_images)
    batch_wait_timeout_s: float = 0.01  # how long a batch waits to fill up after its first request


# The deployments of the app, by name: Serve's own `deployments:` section of a config file (or `build_app(...,
# deployments=[...])` in Python) sets their replicas, autoscaling, queue limits and `ray_actor_options` by these names.
DEPLOYMENT_NAMES = {"factorized": "FactorizedSegmenter", "pixel": "PixelSegmenter", "sampler": "Sampler"}
INGRESS_NAME = "Ingress"
# What applies when the config says nothing (sized for a 2-core laptop; raise them in `deployments:` on real nodes).
MODEL_DEFAULTS: dict[str, Any] = {"num_replicas": 1, "max_ongoing_requests": 64, "max_queued_requests": 512,
                                  "ray_actor_options": {"num_cpus": 0.5}}  # fmt: skip
INGRESS_DEFAULTS: dict[str, Any] = {"num_replicas": 1, "max_ongoing_requests": 256, "max_queued_requests": 1024,
                                    "ray_actor_options": {"num_cpus": 0.25}}  # fmt: skip
MOVED_TO_DEPLOYMENTS = ("models", "ingress")  # args sections of older configs


def check_app_args(args: Mapping[str, Any]) -> None:
    """Refuse the `models:` / `ingress:` args of older configs with a message saying where those settings went."""
    moved = [k for k in MOVED_TO_DEPLOYMENTS if k in args]
    if moved:
        raise ValueError(
            f"args.{moved[0]}: replica, resource and autoscaling settings sit in Serve's own `deployments:` section "
            f"now (one entry per deployment, named {sorted([*DEPLOYMENT_NAMES.values(), INGRESS_NAME])}: "
            "num_replicas or autoscaling_config, max_ongoing_requests, max_queued_requests, ray_actor_options); "
            "see serve/config.yaml"
        )


def deployment_names(cfg: ServeAppConfig) -> list[str]:
    """The deployments `build_app` creates for this config: what a `deployments:` entry may name."""
    models = {"factorized": cfg.segmenter, "pixel": cfg.pixel, "sampler": cfg.sampler_source}
    return [DEPLOYMENT_NAMES[k] for k, source in models.items() if source] + [INGRESS_NAME]


def check_sources(cfg: ServeAppConfig) -> None:
    """Every model source of a resolved app config is a URI or exists here, where the app is built; else a ValueError
    naming the key, the path and how relative paths were resolved."""
    for key in ("segmenter", "pixel", "sampler"):
        value = getattr(cfg, key)
        if value and not is_uri(value) and not Path(value).exists():
            raise ValueError(
                f"{key}: {value} does not exist on {socket.gethostname()}, where this Serve application is built. "
                f"Relative paths resolve against ${WORKDIR_ENV} or the working directory of `serve run` "
                f"({Path.cwd()}); `serve deploy` builds the app on the cluster, so give a path that exists on its "
                "nodes, an s3:// URI or an MLflow URI (runs:/<run id>/checkpoint)"
            )


def model_num_gpus(use_gpu: str) -> int:
    """GPUs per model replica: 1 or 0 by the one `use_gpu` rule (`diffseg.runtime.decide_gpu`, printed)."""
    return 1 if decide_gpu(use_gpu, "serve").use_gpu else 0


@dataclass(frozen=True)
class ServeAppConfig:
    segmenter: InputPath | None = None  # factorized checkpoint: a path, a run folder, or models:/name@alias
    pixel: InputPath | None = None  # pixel-ensemble bundle (diffseg.pixel): a path, or models:/name@alias
    sampler: InputPath | None = None  # checkpoint to sample from (ddpm or factorized); None = the segmenter's
    use_sampler: bool = True  # serve /v1/sample (False: segmenters only, one replica fewer)
    device: str = "auto"  # torch device of the model replicas: auto (cuda when visible), cpu, cuda, cuda:1
    use_ema: bool = True  # load the EMA weights when the checkpoint has them
    expose_internals: bool = False  # /v1/info and answers show checkpoint paths, devices and pids (trusted clients)
    tracking_uri: str | None = None  # MLflow store of models:/ and runs:/ sources; None = $MLFLOW_TRACKING_URI
    batching: BatchingConfig = field(default_factory=BatchingConfig)  # @serve.batch on/off and sizes
    limits: Limits = field(default_factory=Limits)  # request size, pixel and parameter limits
    # A `deployments:` entry's ray_actor_options replaces the app's own (Serve's rule): give num_gpus there too.
    # Replicas, autoscaling, queues and CPUs: Serve's `deployments:` section (serve/config.yaml).
    use_gpu: Literal["auto", "yes", "no"] = "auto"  # a GPU per model replica; auto: the cluster has or can start GPUs
    promoted: str | None = None  # written by jobs/promote.py: "<name>@<alias>=<version>,...", the versions it moved
    # aliases to; a new value is a changed config, so Serve rebuilds the app (which resolves every alias again)

    def __post_init__(self):
        if not (self.segmenter or self.pixel or (self.sampler and self.use_sampler)):
            raise ValueError("nothing to serve: set at least one of segmenter, pixel, sampler")
        if self.batching.max_batch_size < 1:
            raise ValueError("batching.max_batch_size must be >= 1")
        lim = self.limits
        if lim.max_inflight_pixels < lim.max_image_pixels:
            raise ValueError("limits.max_inflight_pixels must be >= max_image_pixels (one maximum-size upload)")
        if not 1 <= lim.max_sample_cost <= lim.max_inflight_cost:
            raise ValueError("limits: need 1 <= max_sample_cost <= max_inflight_cost")

    @property
    def sampler_source(self) -> str | None:
        return (self.sampler or self.segmenter) if self.use_sampler else None


# ---------------------------------------------------------------------------------------------------- errors


def safe_text(text: Any, limit: int = 1000) -> str:
    """Text that always encodes as UTF-8 JSON (a client's lone surrogate becomes `\\udc80`), at most `limit` chars."""
    text = str(text)
    if len(text) > limit:
        text = text[:limit] + f"... ({len(text)} characters)"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def short_repr(value: Any, limit: int = 80) -> str:
    """repr() of a client's value for an error message, cut to `limit` characters (a 5000-digit number stays short)."""
    if isinstance(value, str) and len(value) > limit:
        return repr(value[:limit]) + f"... ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class RequestError(Exception):
    """A client error: HTTP `status` (4xx; 503/504 for overload and timeouts), a message that says what is wrong,
    and the offending field if any. Messages and fields are made JSON-safe here, whatever the client sent."""

    def __init__(self, status: int, message: str, field: str | None = None):
        message, field = safe_text(message), safe_text(field, 200) if field is not None else None
        super().__init__(message)
        self.status, self.message, self.field = status, message, field

    def __reduce__(self):  # crosses process boundaries (a model replica's 503) with its status intact
        return (RequestError, (self.status, self.message, self.field))

    def to_json(self) -> dict[str, Any]:
        return {"error": {"status": self.status, "message": self.message, "field": self.field}}

    @staticmethod
    def of(exc: BaseException) -> RequestError | None:
        """The RequestError an exception is, or carries (Ray wraps a replica's exception; `cause` is the original)."""
        for e in (exc, getattr(exc, "cause", None)):
            if isinstance(e, RequestError):
                return RequestError(e.status, e.message, e.field)
        return None


# ---------------------------------------------------------------------------------------------------- images

_MAGIC = {"PNG": (b"\x89PNG\r\n\x1a\n",), "JPEG": (b"\xff\xd8\xff",)}


def sniff_format(data: bytes) -> str | None:
    """The image format from the first bytes (never from a client's Content-Type or file name)."""
    for fmt, magics in _MAGIC.items():
        if any(data.startswith(m) for m in magics):
            return fmt
    return None


def open_image(data: bytes, limits: Limits) -> Image.Image:
    """Bytes -> a PIL image whose HEADER only has been read and checked (no pixel decoded yet), or RequestError: 400
    empty/corrupt, 415 not an allowed format, 413 too many bytes or declared pixels. Its `.size` is what decoding will
    cost, which is what `PixelBudget` reserves before `load_image`."""
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
    return im


def load_image(im: Image.Image) -> Image.Image:
    """Decode the pixels of an `open_image` result -> RGB, with no extra full-size copy for RGB uploads (EXIF
    rotation in place), or RequestError 400 for a corrupt or truncated stream."""
    fmt = im.format or "image"
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im.load()
            ImageOps.exif_transpose(im, in_place=True)
        except Exception as e:  # any decoder failure on client bytes is the client's error
            raise RequestError(400, f"corrupt or truncated {fmt} image: {type(e).__name__}: {e}", "image") from e
    return to_rgb(im)


def decode_image(data: bytes, limits: Limits) -> Image.Image:
    """Bytes -> RGB PIL image (`open_image`, then `load_image`)."""
    return load_image(open_image(data, limits))


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB uint8; 16/32-bit greyscale is rescaled rather than clipped, alpha is dropped."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        a = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        im = Image.fromarray(a, "L")
    return im if im.mode == "RGB" else im.convert("RGB")


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


MAX_INT_DIGITS = 18  # integers longer than this are refused before any conversion (Python's own limit is 4300)
_INT_RE = re.compile(rf"[+-]?[0-9]{{1,{MAX_INT_DIGITS}}}")


def _int_param(raw: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(raw, bool) or raw is None:
        raise RequestError(422, f"{name} must be an integer in [{lo}, {hi}], got {short_repr(raw)}", name)
    if isinstance(raw, str):
        if not _INT_RE.fullmatch(raw.strip()):  # checked before int(), which can raise on huge strings
            raise RequestError(422, f"{name} must be an integer in [{lo}, {hi}], got {short_repr(raw)}", name)
        raw = int(raw.strip(), 10)
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    if not isinstance(raw, int):
        raise RequestError(422, f"{name} must be an integer in [{lo}, {hi}], got {short_repr(raw)}", name)
    if not lo <= raw <= hi:
        raise RequestError(422, f"{name}={raw} is outside [{lo}, {hi}]", name)
    return raw


def _float_param(raw: Any, name: str, lo: float, hi: float) -> float:
    value = None
    if isinstance(raw, str) and len(raw) <= 64 or isinstance(raw, (int, float)) and not isinstance(raw, bool):
        try:
            value = float(raw)
        except (ValueError, OverflowError):
            value = None
    if value is None or not math.isfinite(value) or not lo <= value <= hi:
        raise RequestError(422, f"{name} must be a number in [{lo}, {hi}], got {short_repr(raw)}", name)
    return value


def _choice(raw: Any, name: str, options: Sequence[str]) -> str:
    if not isinstance(raw, str) or raw not in options:
        raise RequestError(422, f"{name} must be one of {list(options)}, got {short_repr(raw)}", name)
    return raw


def _bool_param(raw: Any, name: str) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return raw.lower() in ("1", "true", "yes", "on")
    raise RequestError(422, f"{name} must be true or false, got {short_repr(raw)}", name)


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
        shown = [short_repr(k, 40) for k in unknown[:5]]
        raise RequestError(422, f"unknown query parameter(s) {shown}; known: {sorted(known)}", unknown[0][:40])
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
    seed: int  # image i uses image_generators(seed, [i]) (jobs/sample.py seed=<seed>), whatever else is in its batch
    label: int | None  # class label for a class-conditional model
    output: str  # json (PNGs in base64) | grid (one PNG: image | mask | overlay per sample)

    @property
    def cost(self) -> int:
        """Image-steps: what a request costs the sampler (time is about proportional to it)."""
        return self.num_images * self.steps


def parse_sample_request(body: bytes, limits: Limits, info: Mapping[str, Any]) -> SampleParams:
    """A /v1/sample JSON body -> SampleParams; `info` is the sampler's model info (T, num_classes)."""
    if len(body) > limits.max_json_bytes:
        raise RequestError(413, f"JSON body is {len(body)} bytes; the limit is {limits.max_json_bytes}")
    try:
        data = json.loads(body.decode("utf-8"), parse_int=_json_int) if body.strip() else {}
    except RequestError:
        raise
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RequestError(400, f"body is not valid JSON: {e}") from None
    _check_unicode(data)
    if not isinstance(data, dict):
        raise RequestError(422, f"body must be a JSON object, got {type(data).__name__}")
    known = {"num_images", "steps", "seed", "label", "output"}
    unknown = sorted(set(data) - known)
    if unknown:
        shown = [short_repr(k, 40) for k in unknown[:5]]
        raise RequestError(422, f"unknown field(s) {shown}; known: {sorted(known)}", unknown[0][:40])
    for key in ("num_images", "steps", "seed", "label"):  # JSON integers only: no "3", 3.0 or true
        if data.get(key) is not None and (isinstance(data[key], bool) or not isinstance(data[key], int)):
            raise RequestError(422, f"{key} must be a JSON integer, got {short_repr(data[key])}", key)
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
    params = SampleParams(
        num_images=_int_param(data.get("num_images", 4), "num_images", 1, limits.max_num_images),
        steps=_int_param(data.get("steps", min(50, steps_hi)), "steps", 1, steps_hi),
        seed=seed,
        label=label,
        output=_choice(data.get("output", "json"), "output", SAMPLE_OUTPUTS),
    )
    if params.cost > limits.max_sample_cost:
        raise RequestError(
            422,
            f"num_images x steps = {params.num_images} x {params.steps} = {params.cost} image-steps; the limit per "
            f"request is {limits.max_sample_cost}",
            "steps",
        )
    return params


def _json_int(text: str) -> int:
    """json.loads' parse_int: refuse a huge integer literal before converting it (int() of 5000 digits raises)."""
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise RequestError(422, f"a JSON integer with {digits} digits; at most {MAX_INT_DIGITS} are accepted")
    return int(text)


def _check_unicode(value: Any, depth: int = 0) -> None:
    """Every string (and key) of a parsed JSON body must be valid Unicode: JSON escapes can spell a lone surrogate
    (\\ud800), which no UTF-8 answer could quote back."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError(400, "the JSON body holds a string that is not valid Unicode (lone surrogate)") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_unicode(k, depth + 1)
            _check_unicode(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_unicode(v, depth + 1)


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

    def sample(self, requests: Sequence[SampleParams]) -> list[dict[str, np.ndarray | None]]:
        """Run to the end: one batched DDIM run per distinct step count -> per request {"images" (N, H, W, 3) uint8,
        "labels"}."""
        out: list[dict[str, np.ndarray | None] | None] = [None] * len(requests)
        for steps in sorted({r.steps for r in requests}):
            idx = [i for i, r in enumerate(requests) if r.steps == steps]
            for i, result in zip(idx, run_steps(self.sample_steps([requests[i] for i in idx]))):
                out[i] = result
        return out

    @torch.no_grad()
    def sample_steps(
        self, requests: Sequence[SampleParams]
    ) -> Generator[int, None, list[dict[str, np.ndarray | None]]]:
        """One batched DDIM run for requests with the same step count, as a generator: it yields the number of images
        after every step (so a scheduler can interleave runs and drop a cancelled one between two steps) and returns
        the per-request results. Image j of a request uses `image_generators(seed, [j])` (the one seeding rule), so an
        answer does not depend on what else shares its batch and equals what `jobs/sample.py` writes."""
        steps = {r.steps for r in requests}
        if len(steps) != 1:
            raise ValueError(f"one step count per batched run, got {sorted(steps)}")
        gens = [g for r in requests for g in image_generators(r.seed, range(r.num_images))]
        y = None
        if self.model.cfg.num_classes:
            y = torch.tensor([r.label for r in requests for _ in range(r.num_images)]).to(self.device)
        last = None
        for out in sample_progressive(
            self.model, self.diffusion, len(gens), steps=steps.pop(), generator=gens, device=self.device, y=y
        ):
            last = out
            yield len(gens)
        images_u8 = viz.to_uint8(last["sample"].clamp(-1, 1))  # (N, H, W, 3)
        masks = last.get("masks")
        labels = masks.argmax(dim=1).to(torch.uint8).cpu().numpy() if masks is not None else None
        results, start = [], 0
        for r in requests:
            n = r.num_images
            part = labels[start : start + n] if labels is not None else None
            results.append({"images": images_u8[start : start + n], "labels": part})
            start += n
        return results


def run_steps(gen: Generator[Any, None, Any]) -> Any:
    """Drive a step generator to its end; its return value."""
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


# ---------------------------------------------------------------------------------------------------- scheduling
class SampleRequest:
    """One /v1/sample request inside a `SampleScheduler`: its parameters, its future, and whether it was cancelled."""

    def __init__(self, params: SampleParams):
        self.params = params
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.cancelled = False


@dataclass
class _Run:
    """A batched DDIM run: requests with the same step count that arrived together."""

    members: list[SampleRequest]
    steps: Generator[int, None, list[dict[str, Any]]]
    num_images: int  # images per step
    served: int  # image-steps this run has had, on the fair-share clock
    seq: int  # arrival order (ties go to the older run)
    cost: int  # the image-steps its members reserved
    steps_done: int = 0


class SampleScheduler:
    """Runs sampling requests on one thread, one denoising step at a time, sharing the thread fairly by image-steps.

    - **Admission by cost.** `submit` refuses (RequestError 503) a request whose image-steps would take the replica
      over `max_inflight_cost` (running and waiting together), so a replica's backlog is bounded in work, not count.
    - **Batching.** Requests that arrive while the thread is busy (or within `batch_wait_s` of an idle one) and have
      the same step count share one batched run, up to `max_batch_images` images.
    - **Fair share.** Each step goes to the run that has had the fewest image-steps so far (a new run starts at the
      smallest count of those running, so it neither jumps the queue nor waits for the old ones to finish). Runs are
      not preempted within a step. For a request of W image-steps sharing the thread with one run of n images per
      step, that run gets at most W / n + 2 steps while the request is alive: a 1-image x S-step request behind a
      16 x 250 one waits for at most S/16 + 2 of its steps, not for all 250.
    - **Cancellation.** `cancel` marks a request; a run whose requests are all cancelled is closed before its next
      step, so a timed-out or abandoned request stops costing anything within one step.

    `make_steps(requests)` returns a step generator (`DiffusionSampler.sample_steps`). Counters are in `stats()`.
    """

    def __init__(
        self,
        make_steps: Callable[[list[SampleParams]], Generator[int, None, list[dict[str, Any]]]],
        *,
        max_inflight_cost: int,
        max_batch_images: int,
        batch_wait_s: float = 0.0,
        batching: bool = True,
        name: str = "sampler",
    ):
        self.make_steps, self.max_inflight_cost = make_steps, max_inflight_cost
        self.max_batch_images, self.batch_wait_s, self.batching = max_batch_images, batch_wait_s, batching
        self._cond = threading.Condition()
        self._pending: list[SampleRequest] = []
        self._runs: list[_Run] = []
        self._inflight = 0
        self._seq = 0
        self._closed = False
        self.busy_since: float | None = None  # monotonic start of the step now running (a health check reads it)
        self.trace: list[tuple[int, int]] | None = None  # (run seq, images) per step, when a test turns it on
        self.counts = {"steps": 0, "image_steps": 0, "completed": 0, "cancelled": 0, "rejected": 0, "runs": 0}
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # ---- called from the event loop
    def submit(self, params: SampleParams) -> SampleRequest:
        with self._cond:
            if self._closed:
                raise RequestError(503, "the sampler is shutting down")
            if self._inflight + params.cost > self.max_inflight_cost:
                self.counts["rejected"] += 1
                raise RequestError(
                    503,
                    f"the sampler is busy: {self._inflight} image-steps in flight, this request needs {params.cost}, "
                    f"the replica's limit is {self.max_inflight_cost}; retry later",
                )
            self._inflight += params.cost
            req = SampleRequest(params)
            self._pending.append(req)
            self._cond.notify()
        return req

    def cancel(self, req: SampleRequest) -> None:
        """Drop a request (its caller timed out or left). Its future may already be cancelled: `asyncio.wrap_future`
        cancels the future it wraps when the awaiting task is cancelled."""
        with self._cond:
            if req.cancelled or (req.future.done() and not req.future.cancelled()):
                return  # cancelled before, or answered already
            req.cancelled = True
            self.counts["cancelled"] += 1
            req.future.cancel()
            self._cond.notify()

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {**self.counts, "inflight_cost": self._inflight, "active_runs": len(self._runs)}

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=10)

    # ---- the compute thread
    def _form_runs(self) -> None:
        """Pending requests -> runs (under the lock)."""
        pending = [r for r in self._pending if not r.cancelled]
        for r in self._pending:
            if r.cancelled:
                self._inflight -= r.params.cost
        self._pending = []
        start = min((run.served for run in self._runs), default=0)
        groups: dict[int, list[list[SampleRequest]]] = {}
        for req in pending:
            batches = groups.setdefault(req.params.steps, [])
            if (
                self.batching
                and batches
                and sum(m.params.num_images for m in batches[-1]) + req.params.num_images <= self.max_batch_images
            ):
                batches[-1].append(req)
            else:
                batches.append([req])
        for batches in groups.values():
            for members in batches:
                try:
                    steps = self.make_steps([m.params for m in members])
                except Exception as e:
                    self._finish(members, error=e)
                    continue
                self._seq += 1
                self.counts["runs"] += 1
                n = sum(m.params.num_images for m in members)
                self._runs.append(_Run(members, steps, n, start, self._seq, sum(m.params.cost for m in members)))

    def _finish(self, members: list[SampleRequest], result: list[Any] | None = None, error: Exception | None = None):
        """Deliver a run's results (under the lock) and give its cost back."""
        for i, m in enumerate(members):
            self._inflight -= m.params.cost
            if m.future.done():
                continue
            if error is not None:
                m.future.set_exception(error)
            else:
                m.future.set_result(result[i])
                self.counts["completed"] += 1

    def _drop_cancelled(self) -> None:
        for run in list(self._runs):
            if all(m.cancelled for m in run.members):
                run.steps.close()  # the generator's finally blocks run; its tensors go
                self._runs.remove(run)
                self._finish(run.members)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._pending and not self._runs:
                    self._cond.wait()
                if self._closed:
                    error = RequestError(503, "the sampler shut down")
                    for run in self._runs:
                        self._finish(run.members, error=error)
                    self._finish(self._pending, error=error)
                    return
                if self._pending and not self._runs and self.batch_wait_s > 0:
                    self._cond.wait(self.batch_wait_s)  # an idle thread waits a moment for more requests to batch
                self._form_runs()
                self._drop_cancelled()
                if not self._runs:
                    continue
                run = min(self._runs, key=lambda r: (r.served, r.seq))
                self.busy_since = time.monotonic()
            try:
                next(run.steps)  # one denoising step, outside the lock
                finished, result, error = False, None, None
            except StopIteration as stop:
                finished, result, error = True, stop.value, None
            except Exception as e:
                log.exception("sampling failed")
                finished, result, error = True, None, e
            with self._cond:
                self.busy_since = None
                if not finished:  # a denoising step ran (the call that finishes only assembles the results)
                    run.served += run.num_images
                    run.steps_done += 1
                    self.counts["steps"] += 1
                    self.counts["image_steps"] += run.num_images
                    if self.trace is not None:
                        self.trace.append((run.seq, run.num_images))
                if finished:
                    self._runs.remove(run)
                    self._finish(run.members, result=result, error=error)


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
    counts = np.bincount(labels.ravel(), minlength=len(class_names))
    unc_sums = np.bincount(labels.ravel(), weights=uncertainty.ravel().astype(np.float64), minlength=len(class_names))
    return _stats(counts, unc_sums, float(uncertainty.mean()), float(uncertainty.max()), class_names)


def _stats(counts, unc_sums, unc_mean: float, unc_max: float, class_names: Sequence[str]) -> dict[str, Any]:
    total = int(counts.sum())
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
        "uncertainty": {"mean": round(unc_mean, 6), "max": round(unc_max, 6)},
    }


BAND_PIXELS = 1 << 18  # output pixels per band when a result is brought to the upload's size


def _bilinear_rows(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source rows (i0, i1) and weight of i1 for bilinear resizing of n_in rows to n_out (align_corners=False), as
    F.interpolate computes them (float32 scale and source index)."""
    scale = torch.tensor(float(n_in), dtype=torch.float32) / n_out
    src = (scale * (torch.arange(n_out, dtype=torch.float32) + 0.5) - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    lam = (src - i0).clamp(0, 1)
    i1 = torch.where(i0 < n_in - 1, i0 + 1, i0)
    return i0, i1, lam


def _nearest_rows(n_in: int, n_out: int) -> torch.Tensor:
    scale = torch.tensor(float(n_in), dtype=torch.float32) / n_out
    return (torch.arange(n_out, dtype=torch.float32) * scale).floor().long().clamp(max=n_in - 1)


def segment_labels(
    result: Mapping[str, np.ndarray], size: tuple[int, int], class_names: Sequence[str]
) -> tuple[np.ndarray, dict[str, Any]]:
    """A model-resolution result -> (labels (H, W) at the upload's size (H, W), uint8 below 256 classes, and the
    per-class stats of `segmentation_stats`), with the arithmetic of `upsample_result` but in bands of rows: no
    full-size float map is ever held (the widest temporary is (C, S, W) floats), so a maximum-size upload costs one
    byte per pixel here."""
    h, w = size
    c = len(class_names)
    labels = np.empty((h, w), np.uint8 if c <= 256 else np.uint16)
    counts = np.zeros(c, np.int64)
    unc_sums = np.zeros(c, np.float64)
    unc_total, unc_max = 0.0, 0.0
    band = max(1, BAND_PIXELS // w)
    if "probs" in result:
        p = torch.from_numpy(np.asarray(result["probs"], dtype=np.float32))  # (C, S, S)
        s_h, s_w = p.shape[-2:]
        wide = F.interpolate(p[None], size=(s_h, w), mode="bilinear", align_corners=False)[0] if s_w != w else p
        i0, i1, lam = _bilinear_rows(s_h, h)
    else:
        lab_small = torch.from_numpy(np.asarray(result["labels"], dtype=np.int64))  # (S, S)
        unc_small = torch.from_numpy(np.asarray(result["uncertainty"], dtype=np.float32))
        s_h, s_w = lab_small.shape
        rows, cols = _nearest_rows(s_h, h), _nearest_rows(s_w, w)
        unc_wide = (
            F.interpolate(unc_small[None, None], size=(s_h, w), mode="bilinear", align_corners=False)[0, 0]
            if s_w != w
            else unc_small
        )  # (S, W)
        i0, i1, lam = _bilinear_rows(s_h, h)
    for y0 in range(0, h, band):
        y1 = min(h, y0 + band)
        lw = lam[y0:y1, None]  # (b, 1)
        if "probs" in result:
            pb = wide[:, i0[y0:y1]].mul_(1 - lw).add_(wide[:, i1[y0:y1]].mul_(lw))  # (C, b, W)
            pb.div_(pb.sum(0, keepdim=True).clamp_(min=1e-8))
            lab = pb.argmax(0)
            unc = (_entropy(pb, 0) / math.log(c)).clamp_(0, 1) if c > 1 else torch.zeros(lab.shape)
            del pb
        else:
            lab = lab_small[rows[y0:y1]][:, cols]  # (b, W)
            unc = unc_wide[i0[y0:y1]].mul_(1 - lw).add_(unc_wide[i1[y0:y1]].mul_(lw))
        lab_np, unc_np = lab.numpy().ravel(), unc.numpy().ravel()
        labels[y0:y1] = lab.numpy()
        counts += np.bincount(lab_np, minlength=c)[:c]
        unc_sums += np.bincount(lab_np, weights=unc_np, minlength=c)[:c]
        unc_total += float(unc_np.sum(dtype=np.float64))
        unc_max = max(unc_max, float(unc_np.max()))
    return labels, _stats(counts, unc_sums, unc_total / (h * w), unc_max, class_names)


def label_png(labels: np.ndarray) -> bytes:
    """Class ids as a greyscale PNG (8-bit below 256 classes, 16-bit otherwise)."""
    if labels.max(initial=0) < 256:
        return encode_png(labels.astype(np.uint8, copy=False))
    buf = io.BytesIO()
    Image.fromarray(labels.astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def _banded_png(size: tuple[int, int], band_rgb: Callable[[int, int], np.ndarray]) -> bytes:
    """An RGB PNG of (W, H) = size painted band by band: `band_rgb(y0, y1)` -> (y1 - y0, W, 3) uint8."""
    w, h = size
    canvas = Image.new("RGB", (w, h))
    band = max(1, BAND_PIXELS // w)
    for y0 in range(0, h, band):
        y1 = min(h, y0 + band)
        canvas.paste(Image.fromarray(band_rgb(y0, y1)), (0, y0))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


INTERNAL_KEYS = ("source", "pid", "device", "extra")  # what /v1/info shows only with expose_internals


def public_info(info: Mapping[str, Any], expose: bool) -> dict[str, Any]:
    """A model's (or the ingress's) info as shown to clients: without paths, devices and pids unless `expose`."""
    return dict(info) if expose else {k: v for k, v in info.items() if k not in INTERNAL_KEYS}


def _model_identity(info: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("kind", "source", "step", "image_size", "registered_model", "model_version", "alias")
    return {key: info[key] for key in keys if key in info}


def render_segmentation(
    image: Image.Image | None,
    result: Mapping[str, np.ndarray],
    params: SegmentParams,
    info: Mapping[str, Any],
    size: tuple[int, int] | None = None,
) -> tuple[str, bytes | dict[str, Any]]:
    """-> ("image/png", bytes) or ("application/json", dict), as `params.output` asks, at the upload's size (W, H):
    `image.size`, or `size` when the upload itself is not needed (no overlay asked for). Built in bands of rows."""
    w, h = image.size if image is not None else size
    names = list(info["class_names"])
    k = len(names)
    labels, stats = segment_labels(result, (h, w), names)
    if params.output == "mask":
        return "image/png", label_png(labels)
    color = _banded_png((w, h), lambda y0, y1: viz.colorize(labels[y0:y1], k))
    if params.output == "color":
        return "image/png", color
    over = None
    if params.output == "overlay" or params.overlay:
        if image is None:
            raise ValueError("an overlay needs the uploaded image")

        def blend(y0: int, y1: int) -> np.ndarray:
            rgb = np.asarray(image.crop((0, y0, w, y1)))
            return viz.overlay(rgb, labels[y0:y1], alpha=params.alpha, num_classes=k, skip_background=False)

        over = _banded_png((w, h), blend)
    if params.output == "overlay":
        return "image/png", over
    body: dict[str, Any] = {
        "method": params.method,
        "width": w,
        "height": h,
        "t": params.t if params.method == "factorized" else None,
        "seed": params.seed,
        **stats,
        "mask_png": b64(label_png(labels)),
        "color_png": b64(color),
        "model": _model_identity(info),
    }
    if over is not None:
        body["overlay_png"] = b64(over)
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
        "model": _model_identity(info),
    }


def config_summary(cfg: ServeAppConfig) -> dict[str, Any]:
    return asdict(cfg)


# ---------------------------------------------------------------------------------------------------- ingress
class PixelBudget:
    """Declared pixels of the uploads being decoded and rendered at the ingress, at most `capacity` at once.

    `reserve(n)` waits (without holding anything) until n more pixels fit, then holds them until the block ends.
    Admission is first-fit: an ordinary upload is not held up behind a queue of large ones while there is room for
    it (a large one waits for room, within the request timeout). Single event loop; no locks needed.
    """

    def __init__(self, capacity: int, threads: int = 2):
        self.capacity, self.used, self.peak, self.waits = capacity, 0, 0, 0
        self._waiters: list[asyncio.Future] = []
        # The decoding/rendering threads: few, so that few malloc arenas hold the freed full-size buffers (each
        # thread of a large pool keeps its own, and RSS grows with the pool, not with the work).
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pixels")

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run CPU work on an upload (decode, resize, render) on the budget's threads."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    @contextlib.asynccontextmanager
    async def reserve(self, pixels: int) -> AsyncIterator[None]:
        if pixels > self.capacity:
            raise RequestError(413, f"an image of {pixels} pixels exceeds the decoding budget of {self.capacity}")
        if self.used + pixels > self.capacity:
            self.waits += 1
        while self.used + pixels > self.capacity:
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            finally:
                if fut in self._waiters:
                    self._waiters.remove(fut)
        self.used += pixels
        self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            self.used -= pixels
            for fut in self._waiters:  # everyone re-checks whether they fit now
                if not fut.done():
                    fut.set_result(None)


async def segment_upload(
    data: bytes,
    params: SegmentParams,
    info: Mapping[str, Any],
    limits: Limits,
    budget: PixelBudget,
    call_model: Callable[[np.ndarray], Awaitable[Mapping[str, np.ndarray]]],
) -> tuple[str, bytes]:
    """An uploaded image -> (media type, response bytes): header check, then, holding its declared pixels in
    `budget`, decode, resize to the model's input, `call_model`, render at the upload's size and serialise. The
    full-size upload is dropped before the model call unless an overlay needs it."""
    header = open_image(data, limits)  # 4xx before any pixel is decoded
    w, h = header.size
    async with budget.reserve(w * h):
        image = await budget.run(load_image, header)
        del header
        x = await budget.run(to_model_input, image, int(info["image_size"]))
        if not (params.output == "overlay" or params.overlay):
            image = None  # not needed again: its memory goes back before the model call
        result = await call_model(x)
        media, out = await budget.run(render_segmentation, image, result, params, info, (w, h))
        if media == "application/json":
            out = await budget.run(lambda body: json.dumps(body).encode(), out)
        return media, out


async def await_model(response: Awaitable[Any], timeout_s: float, what: str = "the model") -> Any:
    """Await a model call (a Serve DeploymentResponse) for at most `timeout_s`. On timeout (504), or when this request
    is itself cancelled (the client went away), the model call is cancelled too (`response.cancel()`), so the replica
    stops its work instead of finishing it for nobody. A RequestError raised in the replica comes back as itself."""

    def cancel() -> None:
        if callable(getattr(response, "cancel", None)):
            response.cancel()

    try:
        return await asyncio.wait_for(response, timeout=timeout_s)
    except TimeoutError:
        cancel()
        raise RequestError(504, f"{what} did not answer within {timeout_s} s; the request was cancelled") from None
    except asyncio.CancelledError:
        cancel()
        raise
    except Exception as e:
        err = RequestError.of(e)
        if err is not None:
            raise err from None
        raise
