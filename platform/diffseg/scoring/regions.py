"""Scores of K unsupervised regions: Hungarian matching of regions to ground-truth classes (mIoU pooled over the set,
scipy `linear_sum_assignment` maximising total IoU or intersection), and the image dependence of soft masks (0 for a
fixed split that ignores the image). Shared input handling: `diffseg.scoring.metrics`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.optimize import linear_sum_assignment

from diffseg.scoring.metrics import (
    ArrayLike,
    _as_label_maps,
    _check_same_shape,
    _class_names,
    _nanmean,
    _safe_div,
    _to_numpy,
)


@dataclass(frozen=True)
class HungarianResult:
    """Matched mIoU of K regions against C classes.

    `iou` (C,) is pooled over the data set: a class matched to no region has IoU 0 if it occurs in the ground truth;
    a class absent from the ground truth and from its matched region's pixels has NaN and is left out of `miou`.
    `mapping` is {region: class} (dataset matching) or, with per-image matching, an (N, K) array with the class of
    each region in each image and -1 for an unmatched region. Unmatched regions predict no class: their pixels count
    as misses for the classes under them.
    """

    miou: float
    iou: np.ndarray
    mapping: dict[int, int] | np.ndarray
    intersection: np.ndarray
    union: np.ndarray
    per_image: bool = False

    def as_dict(self, prefix: str = "test", class_names: Sequence[str] | None = None) -> dict[str, float]:
        """`{prefix}/hungarian_miou` and `{prefix}/hungarian_iou/<name>` for each class with a defined IoU."""
        names = _class_names(class_names, len(self.iou))
        out = {f"{prefix}/hungarian_miou": self.miou}
        for name, value in zip(names, self.iou):
            if np.isfinite(value):
                out[f"{prefix}/hungarian_iou/{name}"] = float(value)
        return out


def _region_class_counts(r: np.ndarray, g: np.ndarray, K: int, C: int, ignore_index: int | None) -> np.ndarray:
    """(N, K, C) pixel counts of region k and class c per image, ignored pixels excluded."""
    N = r.shape[0]
    valid = g != ignore_index if ignore_index is not None else np.ones(g.shape, dtype=bool)
    gv, rv = g[valid], r[valid]
    if gv.size and (gv.min() < 0 or gv.max() >= C):
        raise ValueError(f"gt has labels outside [0, {C}) other than ignore_index={ignore_index}")
    if rv.size and (rv.min() < 0 or rv.max() >= K):
        raise ValueError(f"regions has labels outside [0, {K}) at non-ignored pixels")
    image = np.broadcast_to(np.arange(N)[:, None, None], r.shape)[valid]
    flat = (image * K + rv) * C + gv
    return np.bincount(flat, minlength=N * K * C).reshape(N, K, C)


def _match(counts: np.ndarray, match_by: Literal["iou", "intersection"]) -> tuple[np.ndarray, np.ndarray]:
    """Row (region) and column (class) indices of the assignment maximising total IoU or intersection of (K, C)."""
    if match_by == "iou":
        size = counts.sum(1, keepdims=True)  # (K, 1)
        gt = counts.sum(0, keepdims=True)  # (1, C)
        score = _safe_div(counts, size + gt - counts, empty=0.0)
    else:
        score = counts.astype(np.float64)
    return linear_sum_assignment(score, maximize=True)


class HungarianIoU:
    """Streams Hungarian-matched mIoU of K regions against C ground-truth classes.

    Dataset matching (default): the (K, C) region/class counts are pooled over all images, then one assignment
    maximises the total IoU (or intersection) and IoU_c = I_{k(c),c} / U_{k(c),c} from the pooled counts. Per-image
    matching: each image gets its own assignment from its own counts; its intersections and unions under that
    assignment are then summed over the set. With K != C, min(K, C) pairs are matched; see `HungarianResult`.
    """

    def __init__(
        self,
        num_regions: int,
        num_classes: int,
        per_image: bool = False,
        match_by: Literal["iou", "intersection"] = "iou",
        ignore_index: int | None = 255,
    ):
        if match_by not in ("iou", "intersection"):
            raise ValueError(f"match_by must be 'iou' or 'intersection', got {match_by!r}")
        self.num_regions = num_regions
        self.num_classes = num_classes
        self.per_image = per_image
        self.match_by = match_by
        self.ignore_index = ignore_index
        self.counts = np.zeros((num_regions, num_classes), dtype=np.int64)  # (K, C) pooled
        self._inter = np.zeros(num_classes, dtype=np.int64)  # (C,) per-image matching, summed
        self._union = np.zeros(num_classes, dtype=np.int64)  # (C,)
        self._mappings: list[np.ndarray] = []  # each (K,)
        self._num_pixels = 0  # pixels given (ignored ones included)

    def update(self, regions: ArrayLike, gt: ArrayLike) -> HungarianIoU:
        """Add a batch: `regions` (N, H, W) ints in [0, K) or (N, K, H, W) soft masks; `gt` (N, H, W) in [0, C)."""
        a = _to_numpy(regions, "regions")
        if a.ndim == 4 and a.shape[1] != self.num_regions:
            raise ValueError(
                f"regions are soft masks of shape {a.shape}; expected num_regions={self.num_regions} at dim 1"
            )
        r = _as_label_maps(a, "regions")  # (N, H, W)
        g = _to_numpy(gt, "gt").astype(np.int64)
        if g.ndim == 2:
            g = g[None]
        _check_same_shape(r, g, "regions", "gt")
        counts = _region_class_counts(r, g, self.num_regions, self.num_classes, self.ignore_index)  # (N, K, C)
        self._num_pixels += g.size
        self.counts += counts.sum(0)
        if self.per_image:
            for c_img in counts:
                inter, union, mapping = self._score(c_img)
                self._inter += inter
                self._union += union
                self._mappings.append(mapping)
        return self

    def _score(self, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-class intersection (C,), union (C,) and region->class mapping (K,) (-1 = unmatched) of one assignment."""
        rows, cols = _match(counts, self.match_by)
        inter = np.zeros(self.num_classes, dtype=np.int64)
        # An unmatched class predicts no pixel: its union is its ground-truth size.
        union = counts.sum(0).astype(np.int64)
        size = counts.sum(1)
        inter[cols] = counts[rows, cols]
        union[cols] = size[rows] + union[cols] - counts[rows, cols]
        mapping = np.full(self.num_regions, -1, dtype=np.int64)
        mapping[rows] = cols
        return inter, union, mapping

    def compute(self) -> HungarianResult:
        if self.per_image:
            if not self._mappings:
                raise ValueError("HungarianIoU.compute() called before any update()")
            inter, union, mapping = self._inter, self._union, np.stack(self._mappings)
        else:
            if not self._num_pixels:
                raise ValueError("HungarianIoU.compute() over zero images (no update() with any pixel)")
            inter, union, m = self._score(self.counts)
            mapping = {int(k): int(c) for k, c in enumerate(m) if c >= 0}
        iou = _safe_div(inter, union, empty=np.nan)
        return HungarianResult(_nanmean(iou), iou, mapping, inter, union, per_image=self.per_image)


def hungarian_miou(
    regions: ArrayLike,
    gt: ArrayLike,
    num_regions: int,
    num_classes: int,
    per_image: bool = False,
    match_by: Literal["iou", "intersection"] = "iou",
    ignore_index: int | None = 255,
) -> HungarianResult:
    """Hungarian-matched mIoU of K regions (N, H, W) against C classes (N, H, W) in one call; see `HungarianIoU`."""
    return HungarianIoU(num_regions, num_classes, per_image, match_by, ignore_index).update(regions, gt).compute()


# ---------------------------------------------------------------------------------------------------------------------
# Image dependence of soft masks


class ImageDependence:
    """Streaming `mask_image_dependence`: add batches of soft masks (B, K, H, W) or hard maps (B, H, W) of one size.

    Keeps, per (k, h, w), the sum and the sum of squares of the mask values over the images (for hard maps: one-hot
    counts, exact integers, with K growing as higher labels appear), so memory is one map, whatever the data set's
    size. `compute()` is NaN for fewer than two images or when the images differ in size.
    """

    def __init__(self) -> None:
        self.num_images = 0
        self.hard: bool | None = None  # hard maps or soft masks (set by the first update)
        self.s1: np.ndarray | None = None  # (K, H, W) sum over images
        self.s2: np.ndarray | None = None  # (K, H, W) sum of squares (== s1 for one-hot maps)
        self.mixed_sizes = False

    def update(self, masks: ArrayLike) -> ImageDependence:
        a = _to_numpy(masks, "masks")
        if a.ndim not in (3, 4):
            raise ValueError(f"masks must be (N, K, H, W) or (N, H, W), got shape {a.shape}")
        hard = a.ndim == 3
        if self.hard is not None and hard != self.hard:
            raise ValueError("ImageDependence: hard maps and soft masks cannot be mixed")
        self.hard = hard
        if len(a) == 0:
            return self
        if hard:
            k = int(a.max()) + 1
            one_hot = a[:, None] == np.arange(k)[None, :, None, None]  # (N, K, H, W)
            s1 = one_hot.sum(0, dtype=np.int64)
            s2 = s1
        else:
            a = a.astype(np.float64)
            s1, s2 = a.sum(0), (a * a).sum(0)
        if self.s1 is not None and self.s1.shape[1:] != s1.shape[1:]:
            self.mixed_sizes = True
        elif self.s1 is None:
            self.s1, self.s2 = s1, (s2.copy() if hard else s2)
        else:
            if s1.shape[0] > self.s1.shape[0]:  # a higher label: new one-hot planes, zero for the earlier images
                pad = ((0, s1.shape[0] - self.s1.shape[0]), (0, 0), (0, 0))
                self.s1, self.s2 = np.pad(self.s1, pad), np.pad(self.s2, pad)
            elif s1.shape[0] < self.s1.shape[0]:
                pad = ((0, self.s1.shape[0] - s1.shape[0]), (0, 0), (0, 0))
                s1, s2 = np.pad(s1, pad), np.pad(s2, pad)
            self.s1 = self.s1 + s1
            self.s2 = self.s2 + s2
        self.num_images += len(a)
        return self

    def compute(self) -> float:
        n = self.num_images
        if n < 2 or self.mixed_sizes:
            return float("nan")  # one image has no across-image variance to speak of
        s1, s2 = self.s1.astype(np.float64), self.s2.astype(np.float64)
        mean = s1 / n  # (K, H, W)
        across = np.clip(s2 / n - mean**2, 0, None).mean()  # mean over (k, h, w) of the variance over images
        hw = s1[0].size
        mean_k = s1.reshape(len(s1), -1).sum(1) / (n * hw)  # (K,)
        total_k = s2.reshape(len(s2), -1).sum(1) / (n * hw) - mean_k**2  # (K,) variance over (n, h, w)
        total = np.clip(total_k, 0, None).mean()
        return float(across / total) if total > 1e-12 else 0.0


def mask_image_dependence(masks: ArrayLike) -> float:
    """The across-image variance share of a set of soft masks (N, K, H, W) (or hard maps (N, H, W)).

        share = mean_{k,h,w} Var_n(m[n, k, h, w]) / mean_k Var_{n,h,w}(m[n, k, h, w])

    The numerator is how much a pixel's mask value changes from image to image; the denominator is the total
    variance of the mask values (across images and positions). By the law of total variance the share is in [0, 1]:
    0 for masks that are the same for every image (a fixed spatial split, however sharp), 1 for masks whose every
    pixel's mean over images is the same (no positional prior at all). It is 0 for masks without any variance.
    Ground-truth horse masks at 32 px score about 0.55. With hard maps (N, H, W) each region is one-hot encoded.
    NaN for a single image. `ImageDependence` computes the same batch by batch.
    """
    return ImageDependence().update(masks).compute()


# ---------------------------------------------------------------------------------------------------------------------
# 5. Band share: how much of a mask is horizontal bands


class BandShare:
    """Streaming `mask_band_share`: add batches of soft masks (B, K, H, W) or hard maps (B, H, W).

    Keeps two sums over (image, region): the variance of the region's row means and the region's total variance
    over (h, w), so memory is two numbers whatever the data set's size.
    """

    def __init__(self) -> None:
        self.rows = 0.0  # sum over (n, k) of Var_h(mean_w m[n, k])
        self.total = 0.0  # sum over (n, k) of Var_{h,w}(m[n, k])
        self.num_images = 0

    def update(self, masks: ArrayLike) -> BandShare:
        a = _to_numpy(masks, "masks")
        if a.ndim == 3:  # hard maps: one plane per label present
            a = (a[:, None] == np.unique(a)[None, :, None, None]).astype(np.float64)  # (N, K, H, W)
        elif a.ndim != 4:
            raise ValueError(f"masks must be (N, K, H, W) or (N, H, W), got shape {a.shape}")
        a = a.astype(np.float64)
        mean = a.mean(axis=(2, 3))  # (N, K)
        row_means = a.mean(axis=3)  # (N, K, H)
        self.rows += float(((row_means - mean[..., None]) ** 2).mean(axis=2).sum())
        self.total += float(((a - mean[..., None, None]) ** 2).mean(axis=(2, 3)).sum())
        self.num_images += len(a)
        return self

    def compute(self) -> float:
        return self.rows / self.total if self.total > 1e-12 else float("nan")


def mask_band_share(masks: ArrayLike) -> float:
    """The share of the masks' spatial variance that their row means explain (soft (N, K, H, W) or hard (N, H, W)).

        band = sum_{n,k} Var_h(mean_w m[n, k, h, w]) / sum_{n,k} Var_{h,w}(m[n, k, h, w])

    1 for masks made of horizontal bands (every row constant: the horizon splits of a collapsed factorized model),
    0 for vertical stripes; a centred square of half the side scores 1/3, and the ground-truth horse masks at 32 px
    score about 0.5 (the reference each table prints beside it). It complements `mask_image_dependence`, which
    cannot tell bands that move from image to image from objects. NaN when no mask has any spatial variance.
    """
    return BandShare().update(masks).compute()
