"""Segmentation metrics: pooled confusion matrices, the IEM/ReDO foreground protocol, Hungarian-matched mIoU.

Three protocols, each a streaming accumulator (`update` per batch, `compute` at the end) and a one-call function:

1. **Supervised mIoU** (`ConfusionMatrix`), as in the label-efficient paper (Baranchuk et al. 2022): intersections and
   unions are summed over the whole test set, then IoU_c = I_c / U_c is averaged over classes. Two averagings:
   - "present" (`miou`, the default): the mean runs over the classes that occur in the target or the prediction
     (U_c > 0); a class absent from both has no defined IoU and is left out rather than counted as 0 or 1; pixels
     whose target is the ignore index count nowhere.
   - "official" (`miou_official`), as ddpm-segmentation `src/pixel_classifier.py: compute_iou` computes it: IoU_c =
     I_c / (1e-8 + U_c) for EVERY class, so a class absent from both counts as 0; and an ignore-index pixel is not
     skipped: its target matches no class, so a prediction of class c there adds 1 to U_c (a false positive).
   The two agree when every class occurs and no pixel is ignored (celebamask's 200 test images at 32 px: all 19
   classes, no ignore pixels). "present" stays the default because a class missing from a small test set says nothing
   about the method, and a label nobody annotated (255) is not an error of the prediction.
2. **Foreground Acc / IoU / DICE** (`ForegroundAccumulator`, `foreground_scores`, `foreground_metrics`), as the ReDO
   (Chen et al. 2019, `mickaelChen/ReDO` `train.py: evaluate`) and IEM (Savarese et al. 2021) evaluation code computes
   them: per image, Acc = mean(pred == gt), IoU = |pred & gt| / |pred | gt|, DICE = 2 |pred & gt| / (|pred| + |gt|);
   per image and *separately for each metric* the better of the prediction and its inverse is kept (the polarity
   rule); the scores are averaged over images. A stricter variant fixes the foreground once per data set.
3. **Hungarian-matched mIoU** (`HungarianIoU`, `hungarian_miou`): K unsupervised regions are matched one-to-one to C
   ground-truth classes (scipy's `linear_sum_assignment`, maximising total IoU or intersection) and mIoU is computed
   with intersections and unions pooled over the set.

Inputs may be NumPy arrays or torch tensors (any device); label maps are (N, H, W) integers, or (N, K, H, W) soft masks
that are reduced by argmax over K. Pixels whose target equals `ignore_index` (255, the VOC convention) are excluded
everywhere: from every count, in the prediction as well as the target.

Metric keys are `split/name` (`test/miou`, `test/iou/<class>`, `test/fg_iou`, `test/hungarian_miou`), the same in Ray
Train reports, Tune and MLflow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

ArrayLike = np.ndarray | torch.Tensor
Reduction = Literal["best_single", "best_subset", "fixed"]
Averaging = Literal["present", "official"]
Polarity = Literal["per_image", "dataset"]

# best_subset enumerates 2^K - 2 subsets per image; beyond this the enumeration is pointless (and large).
MAX_SUBSET_REGIONS = 16


def _to_numpy(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    raise TypeError(f"{name}: expected a numpy array or a torch tensor, got {type(x).__name__}")


def _as_label_maps(x: ArrayLike, name: str) -> np.ndarray:
    """(N, H, W) int64 labels from (H, W) / (N, H, W) integer maps or (N, K, H, W) soft masks (argmax over K)."""
    a = _to_numpy(x, name)
    if a.ndim == 4:
        if np.issubdtype(a.dtype, np.integer) or a.dtype == bool:
            raise ValueError(f"{name}: a 4-d input must be soft masks (N, K, H, W) of floats, got dtype {a.dtype}")
        return a.argmax(axis=1).astype(np.int64)  # (N, H, W)
    if a.ndim == 2:
        a = a[None]  # (1, H, W)
    if a.ndim != 3:
        raise ValueError(f"{name}: expected (N, H, W) labels or (N, K, H, W) soft masks, got shape {a.shape}")
    if np.issubdtype(a.dtype, np.floating):
        if not np.all(a == np.round(a)):
            raise ValueError(f"{name}: (N, H, W) labels must be integers, got non-integral floats")
    return a.astype(np.int64)


def _check_same_shape(pred: np.ndarray, target: np.ndarray, pred_name: str, target_name: str) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"{pred_name} has shape {pred.shape} but {target_name} has shape {target.shape}")


def _safe_div(num: np.ndarray, den: np.ndarray, empty: float) -> np.ndarray:
    """num / den elementwise, `empty` where den == 0."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, empty, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# 1. Supervised mIoU from a pooled confusion matrix


class ConfusionMatrix:
    """A (C, C) confusion matrix summed over a data set; rows are targets, columns are predictions.

    IoU_c = M[c, c] / (sum_j M[c, j] + sum_i M[i, c] - M[c, c]), with every count pooled over all images seen (not an
    average of per-image IoUs). Pixels whose target is `ignore_index` are skipped; any other target or prediction
    outside [0, C) is an error.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)  # (C_target, C_pred)
        self.ignored_pred = np.zeros(num_classes, dtype=np.int64)  # (C_pred,) predictions at ignore-index pixels
        self.num_pixels = 0  # pixels given, ignored ones included: 0 means nothing was scored at all

    def reset(self) -> None:
        self.matrix[:] = 0
        self.ignored_pred[:] = 0
        self.num_pixels = 0

    def _check_nonempty(self) -> None:
        if self.num_pixels == 0:
            raise ValueError("ConfusionMatrix: a metric over zero images (no update had a pixel): is the data empty?")

    def update(self, pred: ArrayLike, target: ArrayLike) -> ConfusionMatrix:
        """Add a batch. `pred` and `target` are label maps of one shape ((N, H, W) or any), or `pred` soft masks
        (N, C, H, W) and `target` (N, H, W)."""
        p = _to_numpy(pred, "pred")
        t = _to_numpy(target, "target")
        if p.ndim == t.ndim + 1:
            if p.ndim != 4 or p.shape[1] != self.num_classes:
                raise ValueError(f"soft pred must be (N, {self.num_classes}, H, W), got shape {p.shape}")
            p = _as_label_maps(p, "pred")
        _check_same_shape(p, t, "pred", "target")
        p = p.reshape(-1).astype(np.int64)
        t = t.reshape(-1).astype(np.int64)
        self.num_pixels += t.size
        keep = t != self.ignore_index if self.ignore_index is not None else np.ones_like(t, dtype=bool)
        C = self.num_classes
        at_ignored = p[~keep]
        self.ignored_pred += np.bincount(at_ignored[(at_ignored >= 0) & (at_ignored < C)], minlength=C)[:C]
        p, t = p[keep], t[keep]
        if t.size and (t.min() < 0 or t.max() >= C):
            raise ValueError(f"target has labels outside [0, {C}) other than ignore_index={self.ignore_index}")
        if p.size and (p.min() < 0 or p.max() >= C):
            bad = np.unique(p[(p < 0) | (p >= C)])
            raise ValueError(f"pred has labels {bad} outside [0, {C}) at non-ignored pixels")
        self.matrix += np.bincount(t * C + p, minlength=C * C).reshape(C, C)
        return self

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another accumulator's counts (e.g. from another worker)."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes}-class counts into {self.num_classes}-class counts")
        self.matrix += other.matrix
        self.ignored_pred += other.ignored_pred
        self.num_pixels += other.num_pixels
        return self

    def intersection(self) -> np.ndarray:
        return np.diag(self.matrix).astype(np.int64)  # (C,)

    def union(self) -> np.ndarray:
        return self.matrix.sum(0) + self.matrix.sum(1) - np.diag(self.matrix)  # (C,)

    def iou(self, averaging: Averaging = "present") -> np.ndarray:
        """(C,) per-class IoU. "present": NaN for a class absent from both target and prediction (union 0).
        "official" (ddpm-segmentation `compute_iou`): predictions at ignore-index pixels count in the union, and an
        empty union gives 0 (the reference's I / (1e-8 + U); for a non-empty union the 1e-8 changes nothing).
        Over zero images it is an error, not NaN."""
        self._check_nonempty()
        if averaging == "present":
            return _safe_div(self.intersection(), self.union(), empty=np.nan)
        if averaging == "official":
            return _safe_div(self.intersection(), self.union() + self.ignored_pred, empty=0.0)
        raise ValueError(f"averaging must be 'present' or 'official', got {averaging!r}")

    def miou(self, averaging: Averaging = "present") -> float:
        """ "present": mean IoU over the classes present in the target or the prediction (union > 0), NaN if none is;
        "official": mean over all C classes (see `iou`)."""
        iou = self.iou(averaging)
        return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")

    def pixel_accuracy(self) -> float:
        """Fraction of non-ignored pixels labelled correctly; NaN if every pixel was ignored; an error over zero
        images."""
        self._check_nonempty()
        total = self.matrix.sum()
        return float(np.trace(self.matrix) / total) if total else float("nan")

    def as_dict(self, prefix: str = "test", class_names: Sequence[str] | None = None) -> dict[str, float]:
        """`{prefix}/miou` ("present"), `{prefix}/miou_official` (the reference's averaging), `{prefix}/pixel_accuracy`
        and `{prefix}/iou/<name>` for each class with a defined IoU (classes absent from target and prediction are
        left out: a NaN metric breaks some trackers)."""
        names = _class_names(class_names, self.num_classes)
        out = {
            f"{prefix}/miou": self.miou(),
            f"{prefix}/miou_official": self.miou("official"),
            f"{prefix}/pixel_accuracy": self.pixel_accuracy(),
        }
        for name, value in zip(names, self.iou()):
            if np.isfinite(value):
                out[f"{prefix}/iou/{name}"] = float(value)
        return out


def _class_names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    if class_names is None:
        return [str(c) for c in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f"class_names has {len(class_names)} names but there are {num_classes} classes")
    return list(class_names)


def mean_iou(
    pred: ArrayLike,
    target: ArrayLike,
    num_classes: int,
    ignore_index: int | None = 255,
    averaging: Averaging = "present",
) -> tuple[float, np.ndarray]:
    """(mIoU, per-class IoU (C,)) with intersections and unions pooled over all images given (see `ConfusionMatrix`
    for the two averagings)."""
    cm = ConfusionMatrix(num_classes, ignore_index).update(pred, target)
    return cm.miou(averaging), cm.iou(averaging)


# ---------------------------------------------------------------------------------------------------------------------
# 2. Foreground Acc / IoU / DICE (the IEM / ReDO protocol)


def binary_scores(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, tn: np.ndarray) -> dict[str, np.ndarray]:
    """Acc, IoU and DICE from counts of true/false positives/negatives (any matching shapes).

    Acc = (tp + tn) / (tp + fp + fn + tn); IoU = tp / (tp + fp + fn); DICE = 2 tp / (2 tp + fp + fn).
    Empty cases: when prediction and ground truth are both empty the mask is perfect, so IoU = DICE = 1 (ReDO's code
    would give 0/0 = NaN there); with no valid pixel at all Acc is NaN too, and such images are left out of means.
    """
    total = tp + fp + fn + tn
    acc = _safe_div(tp + tn, total, empty=np.nan)
    iou = _safe_div(tp, tp + fp + fn, empty=1.0)
    dice = _safe_div(2 * tp, 2 * tp + fp + fn, empty=1.0)
    no_pixels = total == 0
    iou = np.where(no_pixels, np.nan, iou)
    dice = np.where(no_pixels, np.nan, dice)
    return {"acc": acc, "iou": iou, "dice": dice}


@dataclass(frozen=True)
class ForegroundScores:
    """Foreground metrics of a data set. Reads like a dict for the means: `scores["iou"]`.

    `per_image[m]` is (N,) with the score of each image under metric m; `acc`, `iou`, `dice` are their means over the
    images with at least one non-ignored pixel. `choice` (N,) is, per image, the foreground used for the IoU, as a
    bitmask over regions (bit k set = region k is foreground). `fg_regions` is the foreground fixed for the whole data
    set under reduction "fixed" (given or chosen), else None.
    """

    acc: float
    iou: float
    dice: float
    per_image: dict[str, np.ndarray]
    choice: np.ndarray
    fg_regions: tuple[int, ...] | None = None

    def __getitem__(self, key: str) -> float:
        if key not in ("acc", "iou", "dice"):
            raise KeyError(f"{key!r}; ForegroundScores has 'acc', 'iou' and 'dice'")
        return getattr(self, key)

    def as_dict(self, prefix: str = "test") -> dict[str, float]:
        """`{prefix}/fg_acc`, `{prefix}/fg_iou`, `{prefix}/fg_dice`."""
        return {f"{prefix}/fg_acc": self.acc, f"{prefix}/fg_iou": self.iou, f"{prefix}/fg_dice": self.dice}


def _subset_matrix(num_regions: int, reduction: Reduction) -> np.ndarray:
    """Candidate foregrounds as rows of a (M, K) 0/1 matrix.

    best_single: each region and its complement (the polarity rule), 2K rows. best_subset and fixed: every non-trivial
    union of regions, 2^K - 2 rows (closed under complement, so polarity is already included).
    """
    K = num_regions
    if reduction == "best_single":
        eye = np.eye(K, dtype=np.int64)
        return np.concatenate([eye, 1 - eye], axis=0)  # (2K, K)
    if K > MAX_SUBSET_REGIONS:
        raise ValueError(f"reduction={reduction!r} enumerates 2^K - 2 subsets; K={K} > {MAX_SUBSET_REGIONS}")
    codes = np.arange(1, 2**K - 1)  # (M,) every subset but the empty one and the full one
    return (codes[:, None] >> np.arange(K)[None, :]) & 1  # (M, K)


class ForegroundAccumulator:
    """Streams the foreground protocol: per image it keeps only K + 2 counts, so any data set size fits.

    Per image n and region k it stores c[n, k] = |region k & gt| and s[n, k] = |region k| (non-ignored pixels), plus
    the ground-truth size g[n] and the number of valid pixels v[n]. Any union S of regions then has
    tp = sum_{k in S} c, fp = sum_{k in S} s - tp, fn = g - tp, tn = v - tp - fp - fn, so every candidate foreground is
    scored exactly without revisiting pixels.

    Reductions of K regions to one foreground:
      - "best_single": per image, the best of each single region and its complement (K = 2 with a binary prediction is
        exactly the ReDO/IEM polarity rule);
      - "best_subset": per image, the best of all 2^K - 2 non-trivial unions of regions;
      - "fixed": one union for the whole data set: `fg_regions` if given, else the union with the best mean IoU over
        the data set (which also fixes the polarity once: the stricter variant).
    For the per-image reductions the best candidate is taken separately for each metric, as the polarity rule does.

    The ground truth is binary: 0 background, any other value except `ignore_index` foreground. A mask stored as
    0/255 must be converted to 0/1 first (or passed with `ignore_index=None`), or its foreground would be ignored.
    """

    def __init__(
        self,
        num_regions: int,
        reduction: Reduction = "best_single",
        fg_regions: Sequence[int] | None = None,
        ignore_index: int | None = 255,
    ):
        if num_regions < 2:
            raise ValueError(f"num_regions must be >= 2 (a foreground and a background), got {num_regions}")
        if reduction not in ("best_single", "best_subset", "fixed"):
            raise ValueError(f"reduction must be 'best_single', 'best_subset' or 'fixed', got {reduction!r}")
        if fg_regions is not None:
            if reduction != "fixed":
                raise ValueError(f"fg_regions is only used with reduction='fixed', got reduction={reduction!r}")
            fg_regions = tuple(sorted({int(k) for k in fg_regions}))
            if not fg_regions or fg_regions[0] < 0 or fg_regions[-1] >= num_regions:
                raise ValueError(f"fg_regions={fg_regions} must be a non-empty subset of range({num_regions})")
        self.num_regions = num_regions
        self.reduction = reduction
        self.fg_regions = fg_regions
        self.ignore_index = ignore_index
        self._inter: list[np.ndarray] = []  # each (B, K)
        self._size: list[np.ndarray] = []  # each (B, K)
        self._gt: list[np.ndarray] = []  # each (B,)
        self._valid: list[np.ndarray] = []  # each (B,)

    def update(self, regions: ArrayLike, gt: ArrayLike) -> ForegroundAccumulator:
        """Add a batch: `regions` (N, H, W) ints in [0, K) or (N, K, H, W) soft masks; `gt` (N, H, W)."""
        K = self.num_regions
        a = _to_numpy(regions, "regions")
        if a.ndim == 4 and a.shape[1] != K:
            raise ValueError(f"regions are soft masks of shape {a.shape}; expected num_regions={K} at dim 1")
        r = _as_label_maps(a, "regions")  # (N, H, W)
        g = _to_numpy(gt, "gt")
        if g.ndim == 2:
            g = g[None]
        _check_same_shape(r, g, "regions", "gt")
        N = r.shape[0]
        valid = g != self.ignore_index if self.ignore_index is not None else np.ones(g.shape, dtype=bool)
        if np.any(((r < 0) | (r >= K)) & valid):
            raise ValueError(f"regions has labels outside [0, {K}) at non-ignored pixels")
        fg = (g != 0) & valid  # (N, H, W)
        r = np.where(valid, r, K)  # ignored pixels go to an extra bin that is dropped
        offset = (np.arange(N) * (K + 1))[:, None, None]
        size = np.bincount((r + offset).reshape(-1), minlength=N * (K + 1)).reshape(N, K + 1)[:, :K]
        inter = np.bincount((r + offset)[fg], minlength=N * (K + 1)).reshape(N, K + 1)[:, :K]
        self._inter.append(inter)
        self._size.append(size)
        self._gt.append(fg.reshape(N, -1).sum(1))
        self._valid.append(valid.reshape(N, -1).sum(1))
        return self

    def compute(self) -> ForegroundScores:
        if not self._inter:
            raise ValueError("ForegroundAccumulator.compute() called before any update()")
        inter = np.concatenate(self._inter)  # (N, K)
        size = np.concatenate(self._size)  # (N, K)
        g = np.concatenate(self._gt)[:, None]  # (N, 1)
        v = np.concatenate(self._valid)[:, None]  # (N, 1)
        if self.fg_regions is not None:
            cand = np.zeros((1, self.num_regions), dtype=np.int64)  # (1, K): the one given foreground
            cand[0, list(self.fg_regions)] = 1
        else:
            cand = _subset_matrix(self.num_regions, self.reduction)  # (M, K)
        tp = inter @ cand.T  # (N, M)
        fp = size @ cand.T - tp
        fn = g - tp
        tn = v - tp - fp - fn
        scores = binary_scores(tp, fp, fn, tn)  # each (N, M)
        codes = (cand << np.arange(self.num_regions)).sum(1)  # (M,) candidate as a bitmask over regions
        fg_regions = None
        if self.reduction == "fixed":
            # The strict variant: one foreground for the data set, given or the one with the best mean IoU.
            m = 0 if self.fg_regions is not None else int(np.argmax(np.nanmean(scores["iou"], axis=0)))
            fg_regions = tuple(int(k) for k in np.flatnonzero(cand[m]))
            per_image = {name: s[:, m] for name, s in scores.items()}
            choice = np.full(len(tp), codes[m], dtype=np.int64)
        else:
            # nan-safe max: images with no valid pixel stay NaN and are left out of the means.
            per_image = {name: _nanmax_rows(s) for name, s in scores.items()}
            choice = codes[np.argmax(np.nan_to_num(scores["iou"], nan=-1.0), axis=1)]
        means = {name: _nanmean(s) for name, s in per_image.items()}
        return ForegroundScores(**means, per_image=per_image, choice=choice, fg_regions=fg_regions)


def _nanmax_rows(s: np.ndarray) -> np.ndarray:
    out = np.full(s.shape[0], np.nan)
    ok = ~np.all(np.isnan(s), axis=1)
    out[ok] = np.nanmax(s[ok], axis=1)
    return out


def _nanmean(x: np.ndarray) -> float:
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


def foreground_scores(
    regions: ArrayLike,
    gt: ArrayLike,
    reduction: Reduction = "best_single",
    num_regions: int | None = None,
    fg_regions: Sequence[int] | None = None,
    ignore_index: int | None = 255,
) -> ForegroundScores:
    """Foreground Acc / IoU / DICE of K regions against a binary ground truth, over a whole data set.

    :param regions: (N, H, W) region indices in [0, K), or (N, K, H, W) soft masks (argmax over K).
    :param gt: (N, H, W); 0 background, `ignore_index` ignored, any other value foreground.
    :param reduction: how K regions become one foreground (see `ForegroundAccumulator`).
    :param num_regions: K; defaults to the K dimension of soft masks, else max label + 1 (at least 2).
    :param fg_regions: with reduction "fixed", the regions that are foreground; None chooses them by best mean IoU.
    """
    a = _to_numpy(regions, "regions")
    r = _as_label_maps(a, "regions")  # (N, H, W)
    if num_regions is None:
        num_regions = a.shape[1] if a.ndim == 4 else max(2, int(r.max()) + 1)
    elif a.ndim == 4 and a.shape[1] != num_regions:
        raise ValueError(f"regions are soft masks of shape {a.shape}; expected num_regions={num_regions} at dim 1")
    acc = ForegroundAccumulator(num_regions, reduction, fg_regions, ignore_index)
    return acc.update(r, gt).compute()


def foreground_metrics(
    pred: ArrayLike,
    gt: ArrayLike,
    polarity: Polarity = "per_image",
    invert: bool | None = None,
    ignore_index: int | None = 255,
) -> ForegroundScores:
    """The IEM / ReDO metrics of a binary prediction (N, H, W) (nonzero = foreground) against a binary gt (N, H, W).

    polarity="per_image" (the published protocol): per image and per metric, the better of `pred` and `1 - pred`.
    polarity="dataset" (stricter): one polarity for the data set, `invert` if given, else the one with the best mean
    IoU; `invert=False` with polarity="dataset" scores the prediction as it is.
    """
    if polarity not in ("per_image", "dataset"):
        raise ValueError(f"polarity must be 'per_image' or 'dataset', got {polarity!r}")
    if invert is not None and polarity != "dataset":
        raise ValueError("invert fixes one polarity for the data set; it needs polarity='dataset'")
    p = _as_label_maps(pred, "pred")
    binary = (p != 0).astype(np.int64)  # region 1 = predicted foreground, region 0 = its complement
    if polarity == "per_image":
        return foreground_scores(binary, gt, "best_single", num_regions=2, ignore_index=ignore_index)
    fg = None if invert is None else ((0,) if invert else (1,))
    return foreground_scores(binary, gt, "fixed", num_regions=2, fg_regions=fg, ignore_index=ignore_index)


# ---------------------------------------------------------------------------------------------------------------------
# 3. Hungarian matching of K regions to C classes


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
# 4. Image dependence of soft masks


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
