"""Response encoding: a model's result at the upload's size (the one resize policy, in bands of rows so no full-size
float map is kept: about 10 bytes per pixel), class statistics, PNG masks, colour maps and overlays, JSON bodies;
what /v1/info shows (`public_info`)."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from diffseg.core import viz
from diffseg.data.datasets import resize_labels, resize_maps, resize_probs
from diffseg.serving.requests import SampleParams, SegmentParams


def _entropy(p: torch.Tensor, dim: int) -> torch.Tensor:
    return -(p * p.clamp(min=1e-12).log()).sum(dim)


def encode_png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# ---------------------------------------------------------------------------------------------------- responses


def upsample_result(result: Mapping[str, np.ndarray], size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A model-resolution result -> (labels (H, W) int, uncertainty (H, W) float32) at the upload's size (H, W), by the
    one resize policy (`diffseg.data.datasets`): soft masks bilinearly before the argmax (the masks `jobs/segment.py`
    writes), hard labels by nearest neighbour. For soft masks the uncertainty is their entropy divided by log C (0 =
    certain, 1 = uniform).
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
