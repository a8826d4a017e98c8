"""Unsupervised segmentation evaluation: methods x data sets -> one table with the paper's columns.

    for each data set (a paired folder, a protocol, the trained models that go with it):
        for each method: predict a label map (N, H, W) for every test image
        foreground protocol (binary ground truth):  Acc / IoU / DICE as IEM/ReDO compute them (per image, per metric,
            the better polarity; K regions reduced to a foreground as `foreground.reduction` says), and the strict
            IoU with one foreground fixed for the whole data set
        multiclass protocol (e.g. face3):  mIoU after Hungarian matching of regions to classes, intersections and
            unions pooled over the set (per-image matching as an extra column); the supervised U-Net is scored
            without matching (its labels are classes)

Methods (`methods` in the config):
    all_foreground, centred_box      trivial priors (rows of every table)
    grabcut                          OpenCV GrabCut from a centred rectangle (margin, iterations stated)
    iem                              IEM: per-image inpainting error maximisation (defaults scaled to the image size)
    kmeans_ddpm                      k-means (k = K) on a DDPM U-Net's decoder features ("DatasetDDPM-unsup")
    kmeans_rgb                       k-means on the pixels' colours (a feature-free reference for kmeans_ddpm)
    factorized                       the factorized model's argmax mask at t (default 30)
    supervised                       a U-Net trained on the labelled training split (the upper bound)

THE evaluation path: every method is a `diffseg.scoring.segmenter.Segmenter`, run over the data set by
`evaluate_segmenter` and scored by `Scorer`, whose metric keys are `split/name` (`test/fg_iou`, `test/miou`,
`test/hungarian_miou`, ...), the keys Tune, MLflow and the tables use. The label-efficient jobs, DatasetDDPM and the
sweeps score their segmenters with the same function. A pixel ensemble's validation on labelled images whose
features are already extracted (a sweep trial's folds) goes through the same `Scorer`: `evaluate_pixel_rows`.

Everything here is plain PyTorch / NumPy; `jobs/evaluate.py` is the command line. Outputs: table.md, table.csv,
results.json, figures/<dataset>.png, the resolved config, and an MLflow run holding the table with one nested run
per (data set, method) holding that row's `test/...` metrics.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from PIL import Image

from diffseg.core.cli import resume_hint
from diffseg.core.config import Name, OutputPath, atomic_write, atomic_write_text, dumps, job_dir, save_config
from diffseg.core.runtime import resolve_device
from diffseg.core.tracking import Tracker, TrackingConfig, status_for
from diffseg.core.viz import comparison_grid, grid, overlay, save_png, to_uint8
from diffseg.data.datasets import (
    SYNTHETIC_CLASSES,
    DataConfig,
    build_dataset,
    check_labelled,
    resize_images,
    resize_maps,
)
from diffseg.data.shard_reader import ShardSet
from diffseg.evaluation import baselines, iem
from diffseg.evaluation.tables import METHOD_TITLES, format_cell, render_csv, render_markdown  # noqa: F401
from diffseg.methods.features import FeatureConfig, FeaturePipeline
from diffseg.methods.pixel import MLPEnsemble, image_score, predict_pixels
from diffseg.methods.segment import FactorizedSegmenter
from diffseg.models.checkpoint import checkpoint_of, load_checkpoint, load_diffusion_model
from diffseg.models.unet import UNetConfig
from diffseg.scoring.metrics import ConfusionMatrix, ForegroundAccumulator
from diffseg.scoring.regions import BandShare, HungarianIoU, ImageDependence
from diffseg.scoring.segmenter import Segmenter, num_labels, segment_dataset

log = logging.getLogger(__name__)

METHODS = (
    "all_foreground", "centred_box", "grabcut", "iem", "kmeans_rgb", "kmeans_ddpm", "factorized", "supervised",
)  # fmt: skip


@dataclass(frozen=True)
class DatasetSpec:
    name: Name = "data"  # the data set's name in the table
    protocol: Literal["foreground", "multiclass"] = "foreground"  # binary fg/bg ground truth, or C classes
    data: DataConfig = field(default_factory=DataConfig)  # the folder, size, split (and class_merge)
    split: Literal["train", "test", "all"] = "test"  # which images are scored (num_train/num_test in data)
    # the checkpoint of the factorized model (method "factorized")
    factorized: Annotated[str, checkpoint_of("factorized", needed_by="method factorized")] | None = None
    # the DDPM whose features k-means clusters (method "kmeans_ddpm")
    ddpm: Annotated[str, checkpoint_of("ddpm", needed_by="kmeans_ddpm")] | None = None
    num_regions: int = 0  # K for k-means; 0 = the factorized model's K, else the number of ground-truth classes
    limit: int = 0  # score only the first N images (0 = all)


@dataclass(frozen=True)
class SegmentSection:
    t: int = 30  # noise level the factorized model segments at (of T = 1000)
    seed: int = 0  # noise seed (image i uses its own generator from (seed, i))
    batch_size: int = 32  # images per forward pass
    use_ema: bool = True  # EMA weights


@dataclass(frozen=True)
class GrabCutSection:
    margin: float = 0.1  # border left free on each side, as a fraction of the side (box over the central 80%)
    iterations: int = 5  # GrabCut rounds
    seed: int = 0  # OpenCV RNG seed (GMM initialisation)


@dataclass(frozen=True)
class IEMSection:
    # Savarese et al. 2021 (lolemacs/iem-code); null = the reference's 128 px default scaled to the image size
    # (`diffseg.evaluation.iem.iem_params`: sigma 5 s, kernel 2 ceil(5 s) + 1, lmbda 0.001 / s^2, s = size / 128)
    iters: int = 150  # mask updates (the reference's)
    sigma: float | None = None  # the Gaussian inpainter's sigma in pixels (1.25 at 32 px)
    kernel_size: int | None = None  # its support in pixels, odd (5 at 32 px)
    reps: int = 2  # Gaussian filter passes per inpainting
    lmbda: float | None = None  # weight of the diversity regulariser (0.016 at 32 px)
    margin: float = 0.2  # the initial centred square leaves this fraction of each side on each border
    batch_size: int = 64  # images optimised at once (independent; only memory and speed depend on it)


@dataclass(frozen=True)
class BoxSection:
    margin: float = 0.25  # the centred-box prior covers the central (1 - 2 margin) of each side


@dataclass(frozen=True)
class KMeansSection:
    blocks: tuple[str, ...] = ("dec.2", "dec.3", "dec.4", "dec.5")  # DDPM U-Net decoder blocks read as features
    timesteps: tuple[int, ...] = (50, 150, 250)  # diffusion steps the blocks are read at
    noise_seed: int = 0  # the ONE noise tensor shared by all images and steps
    scope: Literal["dataset", "image"] = "dataset"  # one k-means over the pooled pixels, or one per image
    fit_pixels: int = 200_000  # dataset scope: at most this many pixels (a seeded subsample) fit the centres
    num_iters: int = 30  # Lloyd iterations
    normalize: Literal["standardize", "l2", "none"] = "standardize"  # per-channel feature scaling
    seed: int = 0  # k-means++ seed
    batch_size: int = 16  # images per feature forward pass


@dataclass(frozen=True)
class SupervisedSection:
    steps: int = 500  # training steps on the labelled training split
    batch_size: int = 8  # images per step
    lr: float = 1.0e-3  # Adam learning rate
    model_channels: int = 32  # U-Net width (channel_mult 1,2,2, no attention)
    seed: int = 0  # init and batch order


@dataclass(frozen=True)
class ForegroundSection:
    reduction: Literal["best_single", "best_subset", "fixed"] = "best_single"  # K regions -> foreground, per image
    strict: bool = True  # also report the strict IoU: one foreground (regions and polarity) fixed per data set


@dataclass(frozen=True)
class EvalConfig:
    name: Name = "eval"  # the run's folder under output_dir and its MLflow run name
    output_dir: OutputPath = "runs/eval"  # where tables and figures go
    datasets: tuple[DatasetSpec, ...] = ()  # the data sets (rows are grouped by data set)
    methods: tuple[str, ...] = ("all_foreground", "centred_box", "grabcut", "kmeans_ddpm", "factorized")  # columns
    segment: SegmentSection = field(default_factory=SegmentSection)  # the factorized model's segmentation
    grabcut: GrabCutSection = field(default_factory=GrabCutSection)
    iem: IEMSection = field(default_factory=IEMSection)
    centred_box: BoxSection = field(default_factory=BoxSection)
    kmeans: KMeansSection = field(default_factory=KMeansSection)
    supervised: SupervisedSection = field(default_factory=SupervisedSection)
    foreground: ForegroundSection = field(default_factory=ForegroundSection)
    num_figure_images: int = 8  # rows of the image | ground truth | methods figure (0 = no figure)
    device: str = "auto"  # torch device for the networks: auto (cuda when visible), cpu, cuda, cuda:1
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # MLflow

    def check(self) -> None:
        """Cross-field checks (run by --dry-run and before the job)."""
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ValueError(f"methods: unknown {unknown}; known: {list(METHODS)}")
        if not self.datasets:
            raise ValueError("datasets: no data sets to evaluate")
        needs = {"factorized": "factorized", "kmeans_ddpm": "ddpm"}
        for i, spec in enumerate(self.datasets):
            for method, key in needs.items():
                if method in self.methods and not getattr(spec, key):
                    raise ValueError(f"datasets[{i}].{key}: method {method!r} needs a checkpoint for {spec.name!r}")
            check_labelled(spec.data, f"datasets[{i}].data")  # every method is scored against the masks


# ---------------------------------------------------------------------------------------------------- scoring
def binary_ground_truth(masks: np.ndarray | torch.Tensor, ignore_index: int = 255) -> np.ndarray:
    """0 background, 1 foreground (any non-background class), ignore_index kept."""
    m = np.asarray(masks)
    return np.where(m == ignore_index, ignore_index, (m != 0).astype(np.int64))


class Scorer:
    """Streams label maps against ground truth under a protocol; `compute()` -> {`split/name`: value}.

    foreground (binary ground truth, any non-zero class is foreground):
        regions: `fg_acc`, `fg_iou`, `fg_dice` as IEM/ReDO compute them (per image and per metric the better
            polarity; K regions reduced to a foreground by `reduction`), and `fg_iou_strict` (one foreground fixed for
            the whole data set) when `strict`;
        classes: class 0 is background, every other class foreground, no polarity search (`fg_iou_strict` = `fg_iou`).
    multiclass (C ground-truth classes):
        classes: `miou`, `pixel_accuracy`, `iou/<class>` with intersections and unions pooled over the set;
        regions: `hungarian_miou` (regions matched to classes once for the set, then pooled), `hungarian_iou/<class>`
            and `hungarian_miou_per_image` (matched per image).
    """

    def __init__(
        self,
        protocol: Literal["foreground", "multiclass"],
        kind: Literal["regions", "classes"],
        num_labels: int,
        class_names: Sequence[str],
        ignore_index: int = 255,
        reduction: Literal["best_single", "best_subset", "fixed"] = "best_single",
        strict: bool = True,
        split: str = "test",
    ):
        if protocol not in ("foreground", "multiclass"):
            raise ValueError(f"protocol must be 'foreground' or 'multiclass', got {protocol!r}")
        self.protocol, self.kind, self.split, self.strict = protocol, kind, split, strict
        self.class_names, self.ignore_index = list(class_names), ignore_index
        k, c = max(int(num_labels), 2), len(self.class_names)
        self.parts: dict[str, Any] = {}
        if protocol == "foreground" and kind == "classes":
            self.parts["fg"] = ForegroundAccumulator(2, "fixed", fg_regions=(1,), ignore_index=ignore_index)
        elif protocol == "foreground":
            self.parts["fg"] = ForegroundAccumulator(k, reduction, ignore_index=ignore_index)
            if strict:
                self.parts["strict"] = ForegroundAccumulator(k, "fixed", ignore_index=ignore_index)
        elif kind == "classes":
            self.parts["cm"] = ConfusionMatrix(c, ignore_index)
        else:
            self.parts["matched"] = HungarianIoU(k, c, per_image=False, ignore_index=ignore_index)
            self.parts["per_image"] = HungarianIoU(k, c, per_image=True, ignore_index=ignore_index)

    def update(self, labels: np.ndarray | torch.Tensor, gt: np.ndarray | torch.Tensor) -> list[dict[str, float]]:
        """Add a batch of label maps (B, H, W) and ground truth (B, H, W); returns per-image scores where the
        protocol has them (a class segmenter's per-image mIoU)."""
        labels, gt = np.asarray(labels, dtype=np.int64), np.asarray(gt, dtype=np.int64)
        if self.protocol == "foreground":
            gt = binary_ground_truth(gt, self.ignore_index)
            if self.kind == "classes":
                labels = (labels != 0).astype(np.int64)
        rows: list[dict[str, float]] = [{} for _ in range(len(labels))]
        for name, part in self.parts.items():
            part.update(labels, gt)
            if name == "cm":
                for j in range(len(labels)):
                    one = ConfusionMatrix(part.num_classes, self.ignore_index).update(labels[j], gt[j])
                    rows[j]["miou"] = one.miou()
        return rows

    def compute(self) -> dict[str, float]:
        sp, parts = self.split, self.parts
        if self.protocol == "foreground":
            fg = parts["fg"].compute()
            out = fg.as_dict(sp)
            if "strict" in parts:
                out[f"{sp}/fg_iou_strict"] = parts["strict"].compute().iou
            elif self.kind == "classes":
                out[f"{sp}/fg_iou_strict"] = fg.iou
            return out
        if "cm" in parts:
            return parts["cm"].as_dict(sp, self.class_names)
        matched = parts["matched"].compute()
        out = matched.as_dict(sp, self.class_names)
        out[f"{sp}/hungarian_miou_per_image"] = parts["per_image"].compute().miou
        return out


@dataclass
class EvalResult:
    """What `evaluate_segmenter` measured."""

    metrics: dict[str, float]  # `split/name` keys (see `Scorer`)
    per_image: list[dict[str, Any]]  # {"id", per-image scores, "uncertainty" (top-10% score) when the method has one}
    num_images: int
    seconds: float  # wall time of segmenting and scoring
    labels: np.ndarray | None = None  # (N, H, W) when asked for (`keep_labels`, same-size images)


def evaluate_segmenter(
    seg: Segmenter,
    dataset: Sequence[dict[str, Any]] | torch.utils.data.Dataset,
    *,
    protocol: Literal["foreground", "multiclass"] | Sequence[str] = "multiclass",
    class_names: Sequence[str] | None = None,
    ignore_index: int = 255,
    seed: int = 0,
    batch_size: int = 16,
    reduction: Literal["best_single", "best_subset", "fixed"] = "best_single",
    strict: bool = True,
    split: str = "test",
    out_dir: str | os.PathLike | None = None,
    save_overlays: int = 16,
    keep_labels: bool = False,
) -> EvalResult:
    """THE evaluation of any Segmenter on a labelled data set ({"image", "mask", "id"} items).

    Image i is segmented with noise seed `image_seed(seed, i)`; the labels are scored by `Scorer` under `protocol`
    (or under each of several protocols, e.g. ("foreground", "multiclass") for regions against part masks: the
    foreground and the Hungarian-matched scores of one segmentation), plus `split/dependence`, the image dependence of
    the label maps (`regions.mask_image_dependence`: 0 when every image gets the same layout, as a prior does; NaN for
    one image or mixed sizes). Metric keys are `split/name`. With `out_dir`:
    predictions/<id>.png, overlays.png (image | ground truth | prediction, per row), per_image.csv and metrics.json.
    """
    if len(dataset) == 0:
        raise ValueError("evaluate_segmenter: the test set is empty; a metric over zero images is not a result")
    names = list(class_names or getattr(dataset, "class_names", None) or seg.class_names)
    protocols = [protocol] if isinstance(protocol, str) else list(protocol)
    scorers = [Scorer(p, seg.kind, num_labels(seg), names, ignore_index, reduction, strict, split) for p in protocols]
    out = Path(out_dir) if out_dir else None
    if out:
        (out / "predictions").mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    tiles: list[np.ndarray] = []
    kept: list[np.ndarray] = []
    dependence = ImageDependence()  # do the label maps follow the image, or a fixed layout? (0 = fixed)
    band, gt_band = BandShare(), BandShare()  # are they horizontal bands (1)? the ground truth's value is the reference
    t0 = time.perf_counter()
    for _, items, res in segment_dataset(seg, dataset, seed, batch_size):
        if "mask" not in items[0]:
            raise ValueError(f"image {items[0]['id']!r} has no ground-truth mask: evaluation needs labelled data")
        labels = res.labels.numpy()  # (B, H, W)
        masks = torch.stack([it["mask"] for it in items]).numpy()
        per_scorer = [sc.update(labels, masks) for sc in scorers]
        dependence.update(labels)
        band.update(labels)
        gt = np.where(masks == ignore_index, 0, masks)  # ignored pixels count as background here
        gt_band.update((gt != 0).astype(np.int64) if "foreground" in protocols else gt)
        scores = [{k: v for rows_j in per for k, v in rows_j.items()} for per in zip(*per_scorer)]
        for j, it in enumerate(items):
            row = {"id": str(it["id"]), **scores[j]}
            if res.uncertainty is not None:
                row["uncertainty"] = image_score(res.uncertainty[j])
            rows.append(row)
            if out:
                Image.fromarray(labels[j].astype(np.uint8)).save(out / "predictions" / f"{it['id']}.png")
                if len(tiles) < 3 * save_overlays:
                    rgb = to_uint8(it["image"])
                    c = max(len(names), num_labels(seg))
                    tiles += [rgb, overlay(rgb, masks[j], num_classes=c), overlay(rgb, labels[j], num_classes=c)]
        if keep_labels:
            kept.append(labels)
    metrics = {k: v for sc in scorers for k, v in sc.compute().items()}
    metrics[f"{split}/dependence"] = dependence.compute()
    metrics[f"{split}/band"] = band.compute()
    metrics[f"{split}/gt_band"] = gt_band.compute()
    seconds = time.perf_counter() - t0
    if out:
        if tiles and all(t.shape == tiles[0].shape for t in tiles):
            save_png(grid(tiles, nrow=3), out / "overlays.png")  # image | ground truth | prediction, per row
        fields = list(dict.fromkeys(k for r in rows for k in r))
        with open(out / "per_image.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
        (out / "metrics.json").write_text(json.dumps({**metrics, "num_images": len(rows)}, indent=1))
    labels_all = np.concatenate(kept) if kept and all(k.shape[1:] == kept[0].shape[1:] for k in kept) else None
    return EvalResult(metrics, rows, len(rows), seconds, labels_all)


def evaluate_pixel_rows(
    ensemble: MLPEnsemble,
    shards: ShardSet,
    class_names: Sequence[str],
    ignore_index: int = 255,
    split: str = "val",
) -> tuple[dict[str, float], list[str]]:
    """A pixel ensemble scored on the cached feature rows of labelled images (a sweep trial's validation fold,
    `ShardSet.select`), without running the backbone again: the majority vote of `predict_pixels` (what
    `PixelSegmenter.predict` labels) against the rows' labels, by the classes protocol of `Scorer` (pooled confusion
    mIoU: `split/miou`, `split/miou_official`, `split/pixel_accuracy`, `split/iou/<class>`). The rows hold every
    pixel of the images except the ignore index, which `Scorer` leaves out anyway, so this is the score
    `evaluate_segmenter` gives the same ensemble on the same images (from the float16 features the ensemble trained
    on). Returns the metrics and the ids of the images whose rows were scored."""
    scorer = Scorer("multiclass", "classes", len(class_names), class_names, ignore_index, split=split)
    scored: set[str] = set()
    for shard in shards.iter_shards(columns=["features", "label", "image_id"]):
        keep = shard.labels >= 0  # (rows of images without masks carry -1: nothing to score them against)
        if not keep.any():
            continue
        labels, _, _ = predict_pixels(ensemble, torch.from_numpy(shard.features[keep]))  # (N,)
        scorer.update(labels.cpu().numpy()[None, None], shard.labels[keep][None, None])  # one (1, 1, N) "image"
        scored.update(shard.image_ids[keep].tolist())
    if not scored:
        raise ValueError(f"evaluate_pixel_rows: {shards.source} holds no labelled rows to score")
    return scorer.compute(), sorted(scored)


# ---------------------------------------------------------------------------------------------------- data
@dataclass
class EvalData:
    """The scored images of one data set, held in memory (test sets of hundreds of small images)."""

    spec: DatasetSpec
    items: list[dict[str, Any]]  # {"image" (3, H, W) in [-1, 1], "mask" (H, W) long, "id"}
    class_names: list[str]
    ignore_index: int

    @property
    def images(self) -> torch.Tensor:
        return torch.stack([it["image"] for it in self.items])  # (N, 3, H, W)

    @property
    def masks(self) -> torch.Tensor:
        return torch.stack([it["mask"] for it in self.items])  # (N, H, W)


def load_eval_data(spec: DatasetSpec, split: str | None = None) -> EvalData:
    split = split or spec.split
    dataset = build_dataset(spec.data, split=split)
    n = len(dataset) if not spec.limit or split != spec.split else min(spec.limit, len(dataset))
    if n == 0:
        raise ValueError(f"data set {spec.name!r}: split {split!r} is empty (set data.num_train/num_test)")
    items = [dataset[i] for i in range(n)]
    if "mask" not in items[0]:
        raise ValueError(f"data set {spec.name!r}: no ground-truth masks under {spec.data.root}")
    names = list(getattr(dataset, "class_names", None) or SYNTHETIC_CLASSES)
    return EvalData(spec, items, names, int(getattr(dataset, "ignore_index", 255)))


# ---------------------------------------------------------------------------------------------------- methods
def _num_regions(data: EvalData) -> int:
    if data.spec.num_regions:
        return data.spec.num_regions
    if data.spec.factorized:
        return load_checkpoint(data.spec.factorized).model_config.factorized.num_components
    return 2 if data.spec.protocol == "foreground" else len(data.class_names)


def _need(path: str | None, method: str, data: EvalData, key: str) -> str:
    if not path:
        raise ValueError(f"method {method!r} on data set {data.spec.name!r} needs a checkpoint: set {key}")
    return path


def _ddpm_featurizer(cfg: EvalConfig, path: str) -> tuple[Any, dict[str, Any]]:
    """images (B, 3, H, W) -> DDPM decoder features (B, D, H, W): the one resize policy around the feature pipeline."""
    loaded = load_diffusion_model(path, cfg.device)
    km = cfg.kmeans
    recipe = FeatureConfig(backbone=path, blocks=km.blocks, timesteps=km.timesteps, noise_seed=km.noise_seed)
    pipe = FeaturePipeline(recipe, loaded.device, model=loaded.model, diffusion=loaded.diffusion)

    def featurize(images: torch.Tensor) -> torch.Tensor:
        return resize_maps(pipe(resize_images(images, pipe.image_size)).cpu(), tuple(images.shape[-2:]))

    info = {"ddpm": path, "ddpm_step": loaded.step, "blocks": list(km.blocks), "timesteps": list(km.timesteps),
            "feature_dim": pipe.dim}  # fmt: skip
    return featurize, info


def build_segmenter(method: str, cfg: EvalConfig, data: EvalData) -> tuple[Segmenter, dict[str, Any]]:
    """The Segmenter a table column stands for, built (and fitted or trained where it must be) for one data set."""
    if method in ("all_foreground", "centred_box"):
        margin = cfg.centred_box.margin
        return baselines.PriorSegmenter(method, margin), ({"margin": margin} if method == "centred_box" else {})
    if method == "grabcut":
        g = cfg.grabcut
        info = {"margin": g.margin, "iterations": g.iterations}
        return baselines.GrabCutSegmenter(g.margin, g.iterations, g.seed), info
    if method == "iem":
        c = cfg.iem
        opts = {"iters": c.iters, "sigma": c.sigma, "kernel_size": c.kernel_size, "reps": c.reps, "lmbda": c.lmbda,
                "margin": c.margin}  # fmt: skip
        seg = iem.IEMSegmenter(batch_size=c.batch_size, **opts)
        size = min(data.images.shape[-2:])
        return seg, {"image_size": size, **dataclasses.asdict(seg.params_for(size))}
    if method in ("kmeans_rgb", "kmeans_ddpm"):
        k, km = _num_regions(data), cfg.kmeans
        featurize, info = None, {}
        if method == "kmeans_ddpm":
            featurize, info = _ddpm_featurizer(cfg, _need(data.spec.ddpm, method, data, "datasets[].ddpm"))
        seg = baselines.KMeansSegmenter(k, featurize, km.scope, km.fit_pixels, km.num_iters, km.normalize, km.seed)
        return seg.fit(data.images, km.batch_size), {"k": k, "scope": km.scope, **info}
    if method == "factorized":
        path = _need(data.spec.factorized, method, data, "datasets[].factorized")
        seg = FactorizedSegmenter.load(path, cfg.device, cfg.segment.use_ema, cfg.segment.t)
        info = {"K": len(seg.class_names), "t": seg.t, "checkpoint": path, "train_step": seg.step,
                "image_size": seg.image_size}  # fmt: skip
        return seg, info
    if method == "supervised":
        s = cfg.supervised
        train = load_eval_data(data.spec, split="train")
        masks = train.masks
        names = ["background", "foreground"] if data.spec.protocol == "foreground" else train.class_names
        if data.spec.protocol == "foreground":
            masks = torch.from_numpy(binary_ground_truth(masks, train.ignore_index))
        images = train.images
        ucfg = UNetConfig(image_size=images.shape[-1], model_channels=s.model_channels, channel_mult=(1, 2, 2),
                          attention_resolutions=())  # fmt: skip
        net = baselines.train_supervised_unet(
            images, masks, len(names), ucfg, steps=s.steps, batch_size=s.batch_size, lr=s.lr,
            ignore_index=train.ignore_index, seed=s.seed, device=resolve_device(cfg.device),
        )  # fmt: skip
        info = {"train_images": len(images), "steps": s.steps, "batch_size": s.batch_size}
        return baselines.NetworkSegmenter(net, names, image_size=images.shape[-1]), info
    raise ValueError(f"unknown method {method!r}; known: {list(METHODS)}")


# ---------------------------------------------------------------------------------------------------- driver
class Cells:
    """The (data set, method) results of an evaluation as they finish, under `<out>/cells/`: a scores file and the
    predicted labels (for the figure) per cell, tagged with a hash of the whole config. An interrupted evaluation
    keeps them; the same command (the same config) reuses them and scores only the rest; another config ignores
    them. They are removed once the table is written."""

    def __init__(self, folder: Path, cfg: Any):
        self.folder = folder
        self.config_hash = hashlib.sha256(dumps(cfg).encode()).hexdigest()[:16]

    def _paths(self, dataset: str, method: str) -> tuple[Path, Path]:
        stem = self.folder / dataset / method
        return stem.with_suffix(".json"), stem.with_suffix(".npz")

    def load(self, dataset: str, method: str) -> dict[str, Any] | None:
        meta_path, labels_path = self._paths(dataset, method)
        try:
            cell = json.loads(meta_path.read_text())
            if cell.get("config_hash") != self.config_hash:
                return None
            with np.load(labels_path) as npz:
                labels = npz["labels"] if "labels" in npz.files else None
        except (OSError, ValueError, KeyError):  # absent, from another config, or cut short: scored again
            return None
        return {**cell, "labels": labels, "kept": True}

    def save(self, dataset: str, method: str, cell: dict[str, Any], labels: np.ndarray | None) -> dict[str, Any]:
        meta_path, labels_path = self._paths(dataset, method)
        meta_path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {} if labels is None else {"labels": labels}

        def write_labels(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        atomic_write(labels_path, write_labels)  # the labels first: the scores file is what makes a cell count
        text = json.dumps({**cell, "config_hash": self.config_hash}, indent=1, default=str)
        atomic_write_text(meta_path, text)
        return {**json.loads(text), "labels": labels, "kept": False}

    def done(self) -> int:
        """The cells of this config kept so far (their scores files; the labels are not read to count them)."""
        count = 0
        for path in self.folder.glob("*/*.json"):
            try:
                count += json.loads(path.read_text()).get("config_hash") == self.config_hash
            except (OSError, ValueError):
                pass
        return count

    def interrupted_message(self, total: int) -> str:
        return (
            f"during evaluation: {self.done()} of {total} (data set, method) cells scored and kept in {self.folder}, "
            f"which the same config reuses{resume_hint()}"
        )

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def evaluate(cfg: EvalConfig, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Run every method on every data set; write table.md, table.csv, results.json and figures under out_dir."""
    unknown = sorted(set(cfg.methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {list(METHODS)}")
    if not cfg.datasets:
        raise ValueError("no data sets to evaluate: set datasets in the config")
    out = Path(out_dir or job_dir(cfg.output_dir, cfg.name))
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    cells = Cells(out / "cells", cfg)
    tracker = Tracker(cfg.tracking, cfg.name)
    tracker.log_config(cfg)
    rows: list[dict[str, Any]] = []
    figures = []
    try:
        for spec in cfg.datasets:
            data = load_eval_data(spec)
            tracker.log_data_input(spec.data, context="evaluation")  # the runs table's Dataset column (read: it exists)
            log.info(f"[evaluate] {spec.name}: {len(data.items)} images ({spec.split}), protocol {spec.protocol}")
            labels: dict[str, np.ndarray] = {}
            ks: dict[str, int] = {}
            for method in cfg.methods:
                cell = cells.load(spec.name, method)  # scored by an interrupted run of this very config
                if cell is None:
                    t0 = time.perf_counter()
                    seg, info = build_segmenter(method, cfg, data)
                    res = evaluate_segmenter(
                        seg, data.items, protocol=spec.protocol, class_names=data.class_names,
                        ignore_index=data.ignore_index, seed=cfg.segment.seed, batch_size=cfg.segment.batch_size,
                        reduction=cfg.foreground.reduction, strict=cfg.foreground.strict, keep_labels=True,
                    )  # fmt: skip
                    seconds = time.perf_counter() - t0
                    cell = cells.save(spec.name, method, {
                        "scores": res.metrics, "num_images": res.num_images, "seconds": seconds, "info": info,
                        "num_labels": num_labels(seg),
                    }, res.labels)  # fmt: skip
                labels[method], ks[method] = cell["labels"], cell["num_labels"]
                seconds, info = cell["seconds"], cell["info"]
                metrics = {k.split("/", 1)[1]: v for k, v in cell["scores"].items()}  # the row: names without split
                rows.append({
                    "dataset": spec.name, "protocol": spec.protocol, "method": method, "metrics": metrics,
                    "num_images": cell["num_images"], "seconds": seconds, "info": info,
                    "class_names": data.class_names if spec.protocol == "multiclass" else [],
                })  # fmt: skip
                shown = ", ".join(f"{k} {format_cell(v, (k,))}" for k, v in metrics.items() if "/" not in k)
                kept = " (kept from the interrupted run)" if cell["kept"] else ""
                log.info(f"[evaluate]   {method:15s} {shown}  ({seconds:.1f}s){kept}")
                child = Tracker(cfg.tracking, f"{spec.name}/{method}", parent_run_id=tracker.run_id)
                child.log_params({"dataset": spec.name, "method": method, **info})
                child.log_data_input(spec.data, context="evaluation")
                scores = cell["scores"]
                child.log_metrics({k: v for k, v in scores.items() if np.isfinite(v)} | {"time/seconds": seconds})
                child.finish()
                # the table's columns on the evaluation's own run too (its runs-table row and charts are not empty)
                tracker.log_metrics({f"{spec.name}/{method}/{k}": v for k, v in metrics.items()
                                     if "/" not in k and isinstance(v, (int, float)) and np.isfinite(v)})  # fmt: skip
            if cfg.num_figure_images:
                n = min(cfg.num_figure_images, len(data.items))
                masks = data.masks.numpy()
                gt = binary_ground_truth(masks, data.ignore_index) if spec.protocol == "foreground" else masks
                gt_classes = 2 if spec.protocol == "foreground" else len(data.class_names)
                fig = comparison_grid(
                    data.images[:n], gt[:n], [labels[m][:n] for m in cfg.methods], [ks[m] for m in cfg.methods],
                    gt_classes,
                )  # fmt: skip
                path = save_png(fig, out / "figures" / f"{spec.name}.png")
                (out / "figures" / f"{spec.name}.txt").write_text(
                    "columns: image | ground truth | " + " | ".join(cfg.methods) + "\n"
                )
                figures.append(path)
        md, table_csv = render_markdown(rows, cfg.foreground.strict), render_csv(rows)
        (out / "table.md").write_text(md)
        (out / "table.csv").write_text(table_csv)
        (out / "results.json").write_text(json.dumps(rows, indent=1, default=str))
        for path in [out / "table.md", out / "table.csv", out / "results.json", out / "config.yaml", *figures]:
            tracker.log_artifact(path, "figures" if path.suffix == ".png" else None)
        tracker.finish()
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):  # Ctrl-C / SIGTERM: the scored cells stay; the same command goes on
            e.args = (f"{str(e) or 'Ctrl-C'} {cells.interrupted_message(len(cfg.datasets) * len(cfg.methods))}",)
        tracker.finish(status_for(e))  # FAILED, or KILLED for an interrupt
        raise
    cells.clear()  # the table holds them now
    log.info(md)
    log.info(f"[evaluate] table -> {out / 'table.md'}, {out / 'table.csv'}; figures -> {out / 'figures'}")
    return {"rows": rows, "markdown": md, "csv": table_csv, "out_dir": str(out), "mlflow_run_id": tracker.run_id}
