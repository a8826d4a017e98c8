"""Pictures: image grids, mask colouring and overlays (PIL + NumPy; no plotting library needed)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def palette(num_colors: int) -> np.ndarray:
    """A fixed, distinguishable palette (num_colors, 3) uint8; class 0 is black (background)."""
    base = np.array(
        [
            [0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
            [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128],
            [220, 190, 255], [170, 110, 40], [255, 250, 200], [128, 0, 0], [170, 255, 195], [128, 128, 0],
            [255, 215, 180], [0, 0, 128], [128, 128, 128],
        ],
        dtype=np.uint8,
    )  # fmt: skip
    if num_colors <= len(base):
        return base[:num_colors]
    rng = np.random.default_rng(0)
    return np.concatenate([base, rng.integers(0, 256, (num_colors - len(base), 3), dtype=np.uint8)])


def to_uint8(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """Images in [-1, 1], (N, 3, H, W) or (3, H, W) -> uint8 (N, H, W, 3) or (H, W, 3)."""
    x = images.detach().float().cpu().numpy() if torch.is_tensor(images) else np.asarray(images, dtype=np.float32)
    x = np.clip((x + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return np.moveaxis(x, -3, -1)


def colorize(labels: torch.Tensor | np.ndarray, num_classes: int | None = None, ignore_index: int = 255) -> np.ndarray:
    """Class maps (..., H, W) int -> RGB (..., H, W, 3) uint8; ignored pixels are white."""
    lab = labels.detach().cpu().numpy() if torch.is_tensor(labels) else np.asarray(labels)
    lab = lab.astype(np.int64)
    valid = lab != ignore_index
    n = num_classes or int(lab[valid].max(initial=0)) + 1
    pal = palette(max(n, 1))
    out = pal[np.clip(lab, 0, len(pal) - 1)]
    out[~valid] = 255
    return out


def overlay(
    image_u8: np.ndarray,
    labels: np.ndarray,
    alpha: float = 0.5,
    num_classes: int | None = None,
    skip_background: bool = True,
) -> np.ndarray:
    """Blend colourised labels over an image (H, W, 3) uint8; class 0 is left unblended if `skip_background`."""
    colors = colorize(labels, num_classes).astype(np.float32)
    img = image_u8.astype(np.float32)
    fg = (np.asarray(labels) != 0)[..., None] if skip_background else np.ones((*img.shape[:2], 1), dtype=bool)
    out = np.where(fg, (1 - alpha) * img + alpha * colors, img)
    return out.clip(0, 255).astype(np.uint8)


def grid(tiles: Sequence[np.ndarray], nrow: int, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile equally sized (H, W, 3) uint8 images row by row into one picture."""
    if not tiles:
        raise ValueError("grid of no images")
    h, w = tiles[0].shape[:2]
    ncol = nrow
    rows = (len(tiles) + ncol - 1) // ncol
    canvas = np.full((rows * (h + pad) + pad, ncol * (w + pad) + pad, 3), pad_value, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        if tile.shape[:2] != (h, w):
            raise ValueError(f"grid tile {i} has shape {tile.shape[:2]}, expected {(h, w)}")
        r, c = divmod(i, ncol)
        canvas[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = tile
    return canvas


def save_png(array: np.ndarray, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def sample_grid(images: torch.Tensor, masks: torch.Tensor | None = None, nrow: int | None = None) -> np.ndarray:
    """Generated samples as a grid; with masks (N, K, H, W), each sample is image | argmax mask | overlay.

    `nrow` samples per row; by default about square (4 samples: one per row), so a viewer that fits the picture into a
    small box (the MLflow UI's 256 px image charts) still shows every tile.
    """
    imgs = to_uint8(images)
    if masks is None:
        return grid(list(imgs), nrow or int(np.ceil(np.sqrt(len(imgs)))))
    k = masks.shape[1]
    labels = masks.argmax(dim=1).cpu().numpy()
    tiles = []
    for img, lab in zip(imgs, labels):
        tiles += [img, colorize(lab, k), overlay(img, lab, num_classes=k, skip_background=False)]
    return grid(tiles, nrow=3 * (nrow or max(1, round(np.sqrt(len(imgs) / 3)))))


def refinement_strip(trajectory: Sequence[dict], num_images: int | None = None, pad: int = 2) -> np.ndarray:
    """The per-step refinement of generated images (the paper's strip), from `sampling.generate(record_every=N)`.

    For each image three rows, one column per recorded step (noisiest left): x_t, the predicted x_0, and (factorized
    model) the argmax mask at that step.
    """
    if not trajectory:
        raise ValueError("refinement_strip needs a recorded trajectory (generate(..., record_every=N))")
    n = trajectory[0]["sample"].shape[0] if num_images is None else min(num_images, trajectory[0]["sample"].shape[0])
    k = trajectory[0]["masks"].shape[1] if trajectory[0].get("masks") is not None else None
    tiles = []
    for i in range(n):
        tiles += [to_uint8(rec["sample"][i]) for rec in trajectory]
        tiles += [to_uint8(rec["pred_xstart"][i]) for rec in trajectory]
        if k is not None:
            tiles += [colorize(rec["masks"][i].argmax(0), k) for rec in trajectory]
    return grid(tiles, nrow=len(trajectory), pad=pad)


def comparison_grid(
    images: torch.Tensor | np.ndarray,
    ground_truth: np.ndarray,
    predictions: Sequence[np.ndarray],
    num_classes: Sequence[int | None] | None = None,
    gt_classes: int | None = None,
    pad: int = 2,
) -> np.ndarray:
    """One row per image: image | ground truth | each method's label map (N, H, W), colourised.

    `num_classes[j]` fixes method j's palette size (its number of regions); colours of unsupervised regions carry no
    class meaning.
    """
    imgs = to_uint8(images) if not (isinstance(images, np.ndarray) and images.dtype == np.uint8) else images
    num_classes = list(num_classes) if num_classes is not None else [None] * len(predictions)
    tiles = []
    for i, img in enumerate(imgs):
        tiles += [img, colorize(ground_truth[i], gt_classes)]
        tiles += [colorize(pred[i], k) for pred, k in zip(predictions, num_classes)]
    return grid(tiles, nrow=2 + len(predictions), pad=pad)
