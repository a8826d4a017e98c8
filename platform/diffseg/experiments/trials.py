"""What one sweep trial does: train in `num_reports` chunks, and after each, score with THE evaluation path.

Each task is a generator of metric dicts (`split/name` keys), one per report; `diffseg.experiments.sweep` turns them
into Tune reports.

- `pixel_chunks` (label-efficient): validation without test images. The labelled images' features come from the
  feature store (`FeatureCache`, extracted once per recipe and data, `labelled_shards`); k folds over the labelled
  images (`fold_split`) index them (`ShardSet.select`); per fold `train_segmenter` trains the ensemble on the other
  folds and `evaluate_pixel_rows` scores it on this one. The trial reports `val/*` (the mean over folds) and
  `val/fold<f>/miou`; it never reads a test image. `pixel_final` then trains the sweep's chosen recipe on all the
  labelled images and scores it ONCE on the test images; its bundle is the sweep's servable best model. Before any
  of it, `check_pixel_sweep` and `check_pixel_protocol` refuse a sweep whose test images could choose the recipe.
- `factorized_chunks`: the training loop writes `checkpoint.pt` (resuming itself between chunks); the
  `FactorizedSegmenter` of that checkpoint is scored against the held-out foreground and part masks, and is the
  trial's servable model.

Nothing here calls Ray but the factorized task with `scaling.num_workers > 0`, which trains on its own TorchTrainer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from diffseg.core import storage
from diffseg.core.config import ConfigError, from_dict, replace
from diffseg.data.datasets import DataConfig, build_dataset, item_ids
from diffseg.data.feature_cache import FeatureCache, feature_key
from diffseg.data.shard_reader import ShardSet
from diffseg.evaluation.evaluate import evaluate_pixel_rows, evaluate_segmenter
from diffseg.experiments.label_efficient import train_segmenter
from diffseg.methods.features import FeatureConfig, FeaturePipeline, extract_dataset
from diffseg.methods.pixel import MLPEnsemble, PixelSegmenter
from diffseg.methods.pixel_training import PixelTrainConfig
from diffseg.methods.segment import FactorizedSegmenter
from diffseg.training.config import TrainConfig
from diffseg.training.loop import LocalContext, fit
from diffseg.training.ray_train import run as train_on_ray

# each task's servable model: the factorized trial's own checkpoint; for pixel sweeps, pixel_final's refit (best/)
BEST_MODEL = {"pixel": "segmenter.pt", "factorized": "checkpoint.pt"}


@dataclass(frozen=True)
class PixelTrialConfig:
    """One label-efficient trial: which features, which labelled images, which ensemble."""

    features: FeatureConfig = field(default_factory=FeatureConfig)  # backbone, blocks, timesteps, noise
    # the labelled images are data's train split (trials validate on folds of them); the test images, scored once
    # for the sweep's chosen recipe, are data's test split, or test_data's when given
    data: DataConfig = field(default_factory=lambda: DataConfig(num_images=24, num_train=8, num_test=8))
    test_data: DataConfig | None = None  # e.g. a held-out range of a folder that data's split cannot express
    pixel: dict[str, Any] = field(
        default_factory=dict
    )  # diffseg.methods.pixel_training.PixelTrainConfig fields (members, hidden, lr)
    eval_batch_size: int = 8  # test images per segmentation batch


@dataclass
class TrialState:
    """What a trial carries across reports (and across a restore, inside its Tune checkpoint)."""

    report: int = 0  # reports made so far
    mlflow_run_id: str | None = None  # the trial's nested MLflow run
    extra: dict[str, Any] = field(default_factory=dict)  # task-specific (the factorized loss history)


# ---------------------------------------------------------------------------------------------------- pixel
def check_pixel_sweep(metric: str, folds: int, space: Iterable[str]) -> None:
    """What a pixel sweep may ask for, from its own keys: a metric that is not the test images', >= 2 folds, and no
    swept test set. Raises ConfigError naming the key."""
    if metric.startswith("test/"):
        raise ConfigError(
            f"metric: {metric!r} scores the test images; a pixel sweep chooses its recipe on validation folds of the "
            f"labelled images: use val/{metric.removeprefix('test/')} (the chosen recipe is scored once on test after "
            "the sweep)"
        )
    if folds < 2:
        raise ConfigError(f"folds: k-fold validation needs at least 2 folds, got {folds}")
    for key in space:
        if key.split(".")[0] == "test_data":
            raise ConfigError(f"space.{key}: a pixel sweep does not vary its test images (trials never see them)")


def _same_images(a: DataConfig, b: DataConfig) -> bool:
    """Whether two data configs draw their items from one source, so equal ids are the same images."""
    if a.name != b.name:
        return False
    if a.name == "folder":
        return a.root is not None and b.root is not None and Path(a.root).resolve() == Path(b.root).resolve()
    return a.seed == b.seed and a.layers == b.layers  # synthetic scenes: scene i depends only on (seed, i)


def check_pixel_protocol(cfg: PixelTrialConfig, folds: int) -> list[str]:
    """Validation without test images (issue 35), the data's part: the test images (test_data's test split, or
    data's) share no image with the labelled ones (data's train split), which the trials train and validate on, and
    there are at least `folds` labelled images. Raises ConfigError naming the key; returns the labelled ids."""
    labelled = item_ids(build_dataset(dataclasses.replace(cfg.data, flip=False, mix=()), "train"))
    key, test_cfg = ("test_data", cfg.test_data) if cfg.test_data is not None else ("data", cfg.data)
    test = item_ids(build_dataset(dataclasses.replace(test_cfg, flip=False), "test"))
    shared = sorted(set(labelled) & set(test)) if _same_images(cfg.data, test_cfg) else []
    if shared:
        raise ConfigError(
            f"{key}: {len(shared)} of its test images are labelled images of data (ids {shared[:4]}...); the test "
            "images must be held out from the labelled ones, which the trials train and validate on"
        )
    if len(labelled) < folds:
        raise ConfigError(
            f"folds: {folds} validation folds need at least {folds} labelled images; data's train split has "
            f"{len(labelled)} (data.num_train)"
        )
    return labelled


def fold_split(ids: Sequence[str], folds: int, seed: int = 0) -> list[list[str]]:
    """The validation folds of k-fold over the labelled images: `ids` in a seeded random order, cut into `folds`
    parts of sizes differing by at most one (each part sorted). Every id is in exactly one fold; fold f trains on
    the others. The same ids give the same folds in every trial, so trials are compared on the same splits."""
    ids = sorted(str(i) for i in ids)
    if folds < 2 or folds > len(ids):
        raise ValueError(f"folds: {folds} validation folds need 2 <= folds <= the {len(ids)} labelled images")
    order = np.random.default_rng(seed).permutation(len(ids))
    return [sorted(ids[i] for i in part) for part in np.array_split(order, folds)]


def labelled_shards(cfg: PixelTrialConfig, device: torch.device, cache_root: str) -> ShardSet:
    """The features of ALL the labelled images (data's train split) from the feature store: extracted once per
    (backbone, blocks, timesteps, noise, data) and shared by every trial, fold and the final refit."""
    train_data = dataclasses.replace(cfg.data, flip=False)

    def build(tmp: Path) -> None:
        extract_dataset(FeaturePipeline(cfg.features, device), build_dataset(train_data, "train"), tmp)

    return ShardSet(FeatureCache(cache_root).get(feature_key(cfg.features, train_data), build))


def chunk_config(pcfg: PixelTrainConfig, r: int, num_reports: int) -> PixelTrainConfig:
    """Chunk r of n of the ensemble's training: its epochs (or its iteration cap) split evenly over the reports."""
    n = num_reports
    iters = max(1, math.ceil(pcfg.max_iterations / n)) if pcfg.max_iterations else 0
    return replace(pcfg, max_epochs=max(1, math.ceil(pcfg.max_epochs / n)), max_iterations=iters, seed=pcfg.seed + r)


def _save(seg: PixelSegmenter, location: str) -> None:
    """A bundle to a local path (atomically) or a URI (through a temp file)."""
    if not storage.is_remote(location):
        seg.save(location)
        return
    with tempfile.TemporaryDirectory(prefix="diffseg-trial-") as tmp:
        storage.put_file(seg.save(Path(tmp) / storage.name(location)), location)


def _load_ensemble(location: str, device: torch.device) -> MLPEnsemble | None:
    with tempfile.TemporaryDirectory(prefix="diffseg-trial-") as tmp:
        local = Path(tmp) / storage.name(location)
        return PixelSegmenter.load(local, device).ensemble if storage.fetch_file(location, local) else None


def _mean_over_folds(per_fold: list[dict[str, float]]) -> dict[str, float]:
    """Each metric's mean over the folds that report it (a class absent from a fold has no IoU there)."""
    keys = dict.fromkeys(k for m in per_fold for k in m)
    return {k: float(np.mean([m[k] for m in per_fold if k in m])) for k in keys}


def pixel_chunks(
    cfg: PixelTrialConfig,
    state: TrialState,
    trial_dir: str,
    *,
    num_reports: int,
    device: torch.device,
    cache_root: str,
    folds: int = 5,
) -> Iterator[dict[str, float]]:
    """k-fold validation over the labelled images, never the test images: for each fold, train the ensemble on the
    other folds' images and score it on this fold's (`evaluate_pixel_rows`), all from ONE extraction of the
    labelled images (`ShardSet.select` views of the cached shards). After each of `num_reports` chunks of training
    yield `val/*` as the mean over the folds and `val/fold<f>/miou` per fold. `folds.json` in the trial's folder
    records each fold's training, validation and scored image ids. The fold ensembles are kept between chunks
    (`folds/fold-<f>.pt`, for a restored trial) and removed after the last. `trial_dir` and `cache_root` are local
    folders or URIs."""
    t0 = time.perf_counter()
    shards = labelled_shards(cfg, device, cache_root)
    feature_s = time.perf_counter() - t0
    ids = shards.source_ids()
    val_folds = fold_split(ids, folds)
    train_folds = [sorted(set(ids) - set(v)) for v in val_folds]
    views = [(shards.select(tr), shards.select(va)) for tr, va in zip(train_folds, val_folds)]
    names, ignore = shards.meta.class_names, int(shards.meta.extra.get("ignore_index", 255))
    pcfg = from_dict(PixelTrainConfig, cfg.pixel, "pixel")
    fold_dir = storage.join(trial_dir, "folds")
    bundles = [storage.join(fold_dir, f"fold-{f}.pt") for f in range(len(views))]
    ensembles = [_load_ensemble(b, device) if state.report > 0 else None for b in bundles]
    record: dict[str, Any] = {"train": train_folds, "val": val_folds, "scored": [[] for _ in views]}
    n = num_reports
    for r in range(state.report, n):
        chunk = chunk_config(pcfg, r, n)
        per_fold, losses, iterations, train_s = [], [], 0, 0.0
        for f, (train, val) in enumerate(views):
            t1 = time.perf_counter()
            seg, res = train_segmenter(train, chunk, device, ensemble=ensembles[f])
            ensembles[f], train_s = seg.ensemble, train_s + time.perf_counter() - t1
            if r + 1 < n:  # a later chunk continues it (also in a restored trial)
                _save(seg, bundles[f])
            metrics, record["scored"][f] = evaluate_pixel_rows(seg.ensemble, val, names, ignore, split="val")
            per_fold.append(metrics)
            losses += [x for x in res.final_loss if math.isfinite(x)]
            iterations += res.iterations
        storage.write_text(storage.join(trial_dir, "folds.json"), json.dumps(record, indent=1))
        if r + 1 == n:
            storage.delete_dir(fold_dir)
        yield {
            **_mean_over_folds(per_fold),
            **{f"val/fold{f}/miou": m["val/miou"] for f, m in enumerate(per_fold)},
            "train/loss": float(np.mean(losses)) if losses else float("nan"),
            "train/iterations": iterations / len(views),  # per fold
            "time/features_s": feature_s,
            "time/train_s": train_s,
            "feature_dim": shards.meta.feature_dim,
        }
        feature_s = 0.0


def pixel_final(
    cfg: PixelTrialConfig, bundle: str, *, num_reports: int, device: torch.device, cache_root: str
) -> dict[str, Any]:
    """The sweep's chosen recipe, scored ONCE on the test images: the ensemble trains on ALL the labelled images
    (the cached features every trial used; the chunks a trial trains in, one after the other), is saved to
    `bundle` (the sweep's servable best model) and scored by THE evaluation path on the test images (test_data's
    test split, or data's). Returns {"metrics": `test/*` and `test/num_images`, "test_ids": the scored images,
    "labelled_ids": the images it trained on, "train_s"}."""
    shards = labelled_shards(cfg, device, cache_root)
    test = build_dataset(dataclasses.replace(cfg.test_data or cfg.data, flip=False), "test")
    pcfg = from_dict(PixelTrainConfig, cfg.pixel, "pixel")
    seg, ensemble, t0 = None, None, time.perf_counter()
    for r in range(num_reports):
        seg, res = train_segmenter(shards, chunk_config(pcfg, r, num_reports), device, ensemble=ensemble)
        ensemble = seg.ensemble
    train_s = time.perf_counter() - t0
    _save(seg, bundle)
    ignore = int(seg.extra["ignore_index"])
    result = evaluate_segmenter(
        seg, test, class_names=seg.class_names, ignore_index=ignore, batch_size=cfg.eval_batch_size
    )
    return {
        "metrics": {**result.metrics, "test/num_images": result.num_images},
        "test_ids": [str(row["id"]) for row in result.per_image],
        "labelled_ids": shards.source_ids(),
        "train_s": train_s,
    }


def factorized_chunks(
    cfg: TrainConfig,
    state: TrialState,
    trial_dir: str,
    *,
    num_reports: int,
    device: torch.device,
    segment_t: int = 30,
    fg_reduction: Literal["best_single", "best_subset", "fixed"] = "best_single",
) -> Iterator[dict[str, float]]:
    """Train the factorized model in chunks (each resumes the trial's own checkpoint); after each chunk segment the
    test images at `segment_t` and score them against their foreground (`test/fg_*`) and part masks
    (`test/hungarian_*`)."""
    if cfg.model.kind != "factorized":
        raise ValueError(f"model.kind: a factorized sweep needs model.kind=factorized, got {cfg.model.kind!r}")
    test = build_dataset(cfg.data, "test")
    if len(test) == 0:
        raise ValueError("data.num_test: a factorized sweep scores segmentations of held-out images; set num_test > 0")
    names = list(getattr(test, "class_names", None) or [])
    for r in range(state.report, num_reports):
        steps = max(1, round(cfg.loop.num_steps * (r + 1) / num_reports))
        changes = {"loop.num_steps": steps, "tracking.enabled": False}  # the trial's own MLflow run holds the metrics
        parent, name = str(trial_dir).rstrip("/").rsplit("/", 1)
        train_cfg = replace(cfg, name=name, output_dir=parent, **changes)
        t0 = time.perf_counter()
        if cfg.scaling.num_workers == 0:
            out = fit(train_cfg, LocalContext(device))
        else:  # distributed trial: its own TorchTrainer (workers reserve their own resources)
            out = train_on_ray(train_cfg).return_value
        train_s = time.perf_counter() - t0
        seg = FactorizedSegmenter.load(out["checkpoint"], device, t=segment_t)
        result = evaluate_segmenter(
            seg, test, protocol=("foreground", "multiclass"), class_names=names, reduction=fg_reduction, strict=False
        )
        history = out.get("loss_history") or [[steps, float("nan")]]
        state.extra["loss_history"] = history
        yield {**result.metrics, "train/loss": float(history[-1][1]), "train/step": steps, "time/train_s": train_s}
