"""Serving without Ray: request validation and image decoding (the package's other modules: the app's config,
the model wrappers, the sample scheduler, response encoding and the ingress's request flow).

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

import io
import json
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from diffseg.data.datasets import resize_images, to_tensor_image
from diffseg.serving.app_config import Limits


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
    """RGB image -> (3, size, size) float32 in [-1, 1] by the one resize policy (`diffseg.data.datasets.resize_images`),
    the resize `jobs/segment.py` applies to the same image."""
    x = resize_images(to_tensor_image(im)[None], size)[0]  # (3, size, size)
    return np.ascontiguousarray(x.numpy(), dtype=np.float32)


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
