"""The built-in synthetic data sets, which need no download: a function of (seed, index) each.

- `synthetic`: scenes of an animal-like object with parts (body, head, legs, spots) over a textured background, with
  part masks; objects and background share one palette, so colour alone cannot tell the parts apart (the
  label-efficient demo's data).
- `layers`: synthetic independent layers, the first place to test an UNSUPERVISED segmenter. Each image is a
  background layer and one (or more) object layers composited over it; every layer has its own colour and its own
  texture, drawn independently, and the object is anywhere in the frame with a wobbly outline. There is no horizon, no
  fixed position and no shared palette: the one thing that separates the regions is that they are independent layers.
  A mechanism that cannot segment this is not ready for real data (`docs/data.md`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffseg.data.augment import augment

SYNTHETIC_CLASSES = ["background", "body", "head", "legs", "spots"]


def _texture(rng: np.random.Generator, h: int, w: int, palette: np.ndarray) -> np.ndarray:
    """A random stripes / noise / gradient texture in colours drawn from a shared palette. (H, W, 3) float."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c1, c2 = palette[rng.integers(len(palette))], palette[rng.integers(len(palette))]
    kind = rng.integers(3)
    if kind == 0:  # stripes at a random angle and frequency
        a, f = rng.uniform(0, np.pi), rng.uniform(0.15, 0.6)
        m = (np.sin((xx * np.cos(a) + yy * np.sin(a)) * f) > 0).astype(np.float32)
    elif kind == 1:  # blotchy noise
        m = rng.random((h // 4 + 1, w // 4 + 1)).repeat(4, 0).repeat(4, 1)[:h, :w].astype(np.float32)
    else:  # gradient
        m = (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)) / max(h, w)
        m = (m - m.min()) / (m.max() - m.min() + 1e-6)
    return c1 * m[..., None] + c2 * (1 - m[..., None])


def synthetic_scene(seed: int, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene (image uint8 (H, W, 3), part mask uint8 (H, W)), a function of (seed, index) only.

    An animal-like object (body ellipse, head disc, legs bars, spots on the body) over a textured background, plus
    a distractor shape. Objects and background draw colours from ONE palette, so no class has a colour of its own:
    telling parts apart takes shape and context.
    """
    rng = np.random.default_rng([seed, index])
    palette = rng.uniform(0, 255, (6, 3)).astype(np.float32)
    h = w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) / size
    image = _texture(rng, h, w, palette)
    mask = np.zeros((h, w), np.uint8)
    # distractor: a textured rectangle in the same palette, part of the background class
    x0, y0 = rng.uniform(0, 0.7, 2)
    dist = (xx > x0) & (xx < x0 + rng.uniform(0.15, 0.3)) & (yy > y0) & (yy < y0 + rng.uniform(0.15, 0.3))
    image[dist] = _texture(rng, h, w, palette)[dist]
    # the object
    cx, cy = rng.uniform(0.35, 0.65), rng.uniform(0.4, 0.6)
    rx, ry = rng.uniform(0.18, 0.28), rng.uniform(0.1, 0.16)
    body = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1
    side = rng.choice([-1, 1])
    hx, hy, hr = cx + side * rx * 1.05, cy - ry * 0.9, rng.uniform(0.07, 0.11)
    head = (xx - hx) ** 2 + (yy - hy) ** 2 < hr**2
    legs = np.zeros_like(body)
    for lx in np.linspace(cx - rx * 0.7, cx + rx * 0.7, 4):
        legs |= (np.abs(xx - lx) < 0.025) & (yy > cy) & (yy < cy + ry + rng.uniform(0.12, 0.2))
    spots = body & (np.sin(xx * 60 + rng.uniform(0, 6)) * np.sin(yy * 60) > 0.6)
    for cls, region in ((3, legs), (1, body), (2, head), (4, spots)):
        image[region] = _texture(rng, h, w, palette)[region]
        mask[region] = cls
    image += rng.normal(0, 8, image.shape)
    return image.clip(0, 255).astype(np.uint8), mask


class GeneratedScenes(torch.utils.data.Dataset):
    """Scenes `offset` .. `offset + num_images - 1` of a generator, as items {"image" (3, H, W) in [-1, 1], "mask",
    "foreground", "id"} with the training augmentation; a subclass says how scene i is made (`scene`)."""

    class_names: list[str] = []
    ignore_index = 255

    def __init__(
        self,
        num_images: int,
        image_size: int = 32,
        seed: int = 0,
        offset: int = 0,
        flip: bool = False,
        roll: bool = False,
        crop_scale: float = 1.0,
        translate: float = 0.0,
    ):
        self.num_images, self.image_size, self.seed, self.offset = num_images, image_size, seed, offset
        self.flip, self.roll, self.crop_scale, self.translate = flip, roll, crop_scale, translate
        self._gen = torch.Generator().manual_seed(seed)

    def scene(self, idx: int) -> tuple[np.ndarray, np.ndarray]:
        """Item idx's image (H, W, 3) uint8 and mask (H, W)."""
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return self.num_images

    @property
    def ids(self) -> list[str]:
        return [f"{self.offset + i:06d}" for i in range(self.num_images)]

    def __getitem__(self, idx: int) -> dict[str, Any]:
        if not 0 <= idx < self.num_images:
            raise IndexError(idx)
        image, mask = self.scene(idx)
        x = torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1  # (3, H, W)
        m = torch.from_numpy(mask.astype(np.int64))  # (H, W)
        item = augment({"image": x, "mask": m, "id": f"{self.offset + idx:06d}"}, self._gen, self.flip, self.roll,
                       self.crop_scale, self.translate, self.ignore_index)  # fmt: skip
        return {**item, "foreground": (item["mask"] > 0).long()}


class SyntheticDataset(GeneratedScenes):
    """The embedded default: `num_images` synthetic scenes with part masks and a foreground mask."""

    class_names = SYNTHETIC_CLASSES

    def __init__(self, num_images: int = 512, image_size: int = 32, seed: int = 0, offset: int = 0, **augment_kw):
        super().__init__(num_images, image_size, seed, offset, **augment_kw)

    def scene(self, idx: int) -> tuple[np.ndarray, np.ndarray]:
        return synthetic_scene(self.seed, self.offset + idx, self.image_size)


def write_synthetic_folder(root: str | os.PathLike, num_images: int, image_size: int, seed: int = 0) -> Path:
    """Write synthetic scenes in the paired-folder format, so every folder tool works on them too."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(num_images):
        image, mask = synthetic_scene(seed, i, image_size)
        Image.fromarray(image).save(root / "images" / f"{i:06d}.png")
        Image.fromarray(mask).save(root / "masks" / f"{i:06d}.png")
    meta = {
        "name": "synthetic",
        "classes": SYNTHETIC_CLASSES,
        "ignore_index": 255,
        "source": "diffseg",
        "license": "CC0",
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return root


# ---------------------------------------------------------------------------------------------------- layers
LAYERS_CLASSES = ["background", "object"]


@dataclass(frozen=True)
class LayersConfig:
    """The knobs of the `layers` testbed (sizes are fractions of the image side, so a scene looks the same at any
    resolution; colours are RGB in [0, 1])."""

    num_objects: int = 1  # object layers per image, composited in order over the background (all are foreground)
    radius: tuple[float, float] = (0.18, 0.32)  # an object's mean radius, uniform in this range
    aspect: tuple[float, float] = (0.6, 1.0)  # the ratio of an object's two axes, uniform in this range
    wobble: float = 0.15  # the outline's radial wobble, as a fraction of the radius (0 = a plain ellipse)
    object_texture: float = 0.25  # the object's texture wavelength (smooth: a few waves across the object)
    background_texture: float = 0.08  # the background's texture wavelength (finer than the object's)
    texture_amplitude: float = 0.12  # how far a texture moves a layer's colour (in [0, 1] RGB units)
    min_contrast: float = 0.0  # the least RGB distance between the layers' colours; 0 = drawn independently, so
    # an image can have an object of nearly the background's colour (as in the issue-34 probes)
    noise: float = 0.02  # pixel noise (std, [0, 1] units)

    def check(self) -> None:
        for key in ("radius", "aspect"):
            lo, hi = getattr(self, key)
            if not 0 < lo <= hi:
                raise ValueError(f"data.layers.{key}: need 0 < low <= high, got {getattr(self, key)}")
        if self.num_objects < 1:
            raise ValueError(f"data.layers.num_objects: must be >= 1, got {self.num_objects}")
        if not 0 <= self.min_contrast < 1.5:
            raise ValueError(f"data.layers.min_contrast: must be in [0, 1.5) (RGB distance), got {self.min_contrast}")


def _wave_texture(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, wavelength: float) -> np.ndarray:
    """An isotropic texture in about [-1, 1]: a sum of 8 plane waves of random direction and phase, wavelengths
    within 30 % of `wavelength` (coordinates in units of the side: the same scene at every resolution). (H, W)."""
    n = 8
    theta = rng.uniform(0, np.pi, n)
    freq = 2 * np.pi / (wavelength * rng.uniform(0.7, 1.3, n))
    phase = rng.uniform(0, 2 * np.pi, n)
    proj = xx[..., None] * np.cos(theta) + yy[..., None] * np.sin(theta)  # (H, W, n)
    return (np.cos(proj * freq + phase).sum(-1) / np.sqrt(n / 2)).astype(np.float32)


def _colours(rng: np.random.Generator, count: int, min_contrast: float) -> np.ndarray:
    """`count` RGB colours in [0.1, 0.9], independent; redrawn (at most 100 times) until every pair is at least
    `min_contrast` apart."""
    for _ in range(100):
        c = rng.uniform(0.1, 0.9, (count, 3))
        if min_contrast <= 0:
            return c
        d = np.linalg.norm(c[:, None] - c[None], axis=-1) + np.eye(count) * 9
        if d.min() >= min_contrast:
            return c
    return c


def layers_scene(seed: int, index: int, size: int, cfg: LayersConfig = LayersConfig()) -> tuple[np.ndarray, np.ndarray]:
    """One `layers` image (uint8 (H, W, 3)) and its foreground mask (uint8 (H, W): 1 = object), a function of
    (seed, index, size) and the knobs only; the layout does not depend on `size`."""
    rng = np.random.default_rng([seed, index, 7])  # 7: the layers stream (not the scenes' (seed, index))
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    yy, xx = np.meshgrid(coords, coords, indexing="ij")  # (H, W) in (0, 1)
    colours = _colours(rng, 1 + cfg.num_objects, cfg.min_contrast)  # (1 + n, 3)
    image = colours[0] + cfg.texture_amplitude * _wave_texture(rng, yy, xx, cfg.background_texture)[..., None]
    mask = np.zeros((size, size), np.uint8)
    for k in range(cfg.num_objects):
        r = rng.uniform(*cfg.radius)
        a = rng.uniform(*cfg.aspect)
        rx, ry = r / np.sqrt(a), r * np.sqrt(a)  # the same area as a disc of radius r
        cx, cy = rng.uniform(0, 1, 2)  # anywhere: the object may be cut by the frame
        angle = rng.uniform(0, np.pi)
        dx, dy = xx - cx, yy - cy
        u = dx * np.cos(angle) + dy * np.sin(angle)
        v = -dx * np.sin(angle) + dy * np.cos(angle)
        rho = np.sqrt((u / rx) ** 2 + (v / ry) ** 2)  # 1 on the ellipse
        phi = np.arctan2(v / ry, u / rx)
        harmonics = np.arange(2, 6)  # a wobbly outline: low angular harmonics of random amplitude and phase
        amp = rng.normal(0, 1, 4) / harmonics
        ph = rng.uniform(0, 2 * np.pi, 4)
        wob = (amp * np.cos(phi[..., None] * harmonics + ph)).sum(-1)
        wob = cfg.wobble * wob / (np.abs(amp).sum() + 1e-6)  # within +-wobble
        inside = rho < 1 + wob
        texture = _wave_texture(rng, yy, xx, cfg.object_texture)
        layer = colours[1 + k] + cfg.texture_amplitude * texture[..., None]
        image = np.where(inside[..., None], layer, image)
        mask[inside] = 1
    image = image + rng.normal(0, cfg.noise, image.shape)
    return (image.clip(0, 1) * 255).round().astype(np.uint8), mask


class LayersDataset(GeneratedScenes):
    """`num_images` layers scenes from index `offset`, with their foreground masks (see `layers_scene`). Rendered
    once on first use and kept in memory (6000 x 32 x 32 RGB is 18 MB)."""

    class_names = LAYERS_CLASSES

    def __init__(
        self,
        num_images: int,
        image_size: int = 32,
        seed: int = 0,
        offset: int = 0,
        cfg: LayersConfig = LayersConfig(),
        **augment_kw,
    ):
        cfg.check()
        super().__init__(num_images, image_size, seed, offset, **augment_kw)
        self.cfg = cfg
        self._images: np.ndarray | None = None  # (N, H, W, 3) uint8
        self._masks: np.ndarray | None = None  # (N, H, W) uint8

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """All images (N, H, W, 3) uint8 and masks (N, H, W) uint8, rendered on first use."""
        if self._images is None:
            scenes = [layers_scene(self.seed, self.offset + i, self.image_size, self.cfg) for i in range(len(self))]
            self._images = np.stack([s[0] for s in scenes]) if scenes else np.zeros((0, 1, 1, 3), np.uint8)
            self._masks = np.stack([s[1] for s in scenes]) if scenes else np.zeros((0, 1, 1), np.uint8)
        return self._images, self._masks

    def scene(self, idx: int) -> tuple[np.ndarray, np.ndarray]:
        images, masks = self.arrays()
        return images[idx], masks[idx]


def write_layers_folder(
    root: str | os.PathLike, num_images: int, image_size: int, seed: int = 0, cfg: LayersConfig = LayersConfig()
) -> Path:
    """Write layers scenes in the paired-folder format (images/, masks/ with 0 = background, 1 = object)."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(num_images):
        image, mask = layers_scene(seed, i, image_size, cfg)
        Image.fromarray(image).save(root / "images" / f"{i:06d}.png")
        Image.fromarray(mask).save(root / "masks" / f"{i:06d}.png")
    meta = {"name": "layers", "classes": LAYERS_CLASSES, "ignore_index": 255, "source": "diffseg", "license": "CC0"}
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return root
