"""What one sweep trial does: train in `num_reports` chunks, and after each, score with THE evaluation path.

Each task is a generator of metric dicts (`split/name` keys), one per report; `diffseg.experiments.sweep` turns them
into Tune reports. Both leave a servable model in the trial's folder, which Serve loads as it is:

- `pixel_chunks` (label-efficient): the labelled images' features come from the feature store (`FeatureCache`,
  extracted once per recipe and data); `train_segmenter` trains the ensemble into a `PixelSegmenter`, saved as
  `segmenter.pt` after every chunk and scored on the test images.
- `factorized_chunks`: the training loop writes `checkpoint.pt` (resuming itself between chunks); the
  `FactorizedSegmenter` of that checkpoint is scored against the held-out foreground and part masks.

Nothing here calls Ray but the factorized task with `scaling.num_workers > 0`, which trains on its own TorchTrainer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from diffseg.core import storage
from diffseg.core.config import from_dict, replace
from diffseg.data.datasets import DataConfig, build_dataset
from diffseg.data.feature_cache import FeatureCache, feature_key
from diffseg.data.shard_reader import ShardSet
from diffseg.evaluation.evaluate import evaluate_segmenter
from diffseg.experiments.label_efficient import train_segmenter
from diffseg.methods.features import FeatureConfig, FeaturePipeline, extract_dataset
from diffseg.methods.pixel import PixelSegmenter
from diffseg.methods.pixel_training import PixelTrainConfig
from diffseg.methods.segment import FactorizedSegmenter
from diffseg.training.config import TrainConfig
from diffseg.training.loop import LocalContext, fit
from diffseg.training.ray_train import run as train_on_ray

BEST_MODEL = {"pixel": "segmenter.pt", "factorized": "checkpoint.pt"}  # each task's servable model in its trial folder


@dataclass(frozen=True)
class PixelTrialConfig:
    """One label-efficient trial: which features, which labelled images, which ensemble."""

    features: FeatureConfig = field(default_factory=FeatureConfig)  # backbone, blocks, timesteps, noise
    # the labelled images are data's train split; the test images its test split, or test_data's when given
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


def pixel_chunks(
    cfg: PixelTrialConfig,
    state: TrialState,
    trial_dir: str,
    *,
    num_reports: int,
    device: torch.device,
    cache_root: str,
) -> Iterator[dict[str, float]]:
    """Train the ensemble in chunks on the cached shards of the labelled images; after each chunk save the bundle and
    score it on the test images. `trial_dir` and `cache_root` are local folders or URIs."""
    train_data = dataclasses.replace(cfg.data, flip=False)

    def build(tmp: Path) -> None:
        extract_dataset(FeaturePipeline(cfg.features, device), build_dataset(train_data, "train"), tmp)

    t0 = time.perf_counter()
    shards = ShardSet(FeatureCache(cache_root).get(feature_key(cfg.features, train_data), build))
    feature_s = time.perf_counter() - t0
    test = build_dataset(dataclasses.replace(cfg.test_data or cfg.data, flip=False), "test")
    pcfg = from_dict(PixelTrainConfig, cfg.pixel, "pixel")
    bundle = storage.join(trial_dir, BEST_MODEL["pixel"])
    remote = storage.is_remote(trial_dir)
    # The bundle is saved in the trial's own folder (atomically), or, for a bucket, in a temp folder that goes with
    # the trial (also when the scheduler stops it: closing the generator leaves this block).
    with tempfile.TemporaryDirectory(prefix="diffseg-trial-") if remote else contextlib.nullcontext() as tmp:
        local = Path(tmp) / BEST_MODEL["pixel"] if remote else Path(bundle)
        ensemble = None
        if state.report > 0 and (storage.fetch_file(bundle, local) if remote else local.is_file()):
            ensemble = PixelSegmenter.load(local, device).ensemble
        n = num_reports
        for r in range(state.report, n):  # the ensemble's epochs (or its iteration cap) split evenly over the reports
            iters = max(1, math.ceil(pcfg.max_iterations / n)) if pcfg.max_iterations else 0
            chunk = replace(
                pcfg, max_epochs=max(1, math.ceil(pcfg.max_epochs / n)), max_iterations=iters, seed=pcfg.seed + r
            )
            t1 = time.perf_counter()
            seg, res = train_segmenter(shards, chunk, device, ensemble=ensemble)
            ensemble, train_s = seg.ensemble, time.perf_counter() - t1
            seg.save(local)  # servable as it is: the best trial's bundle is the sweep's result
            if remote:
                storage.put_file(local, bundle)
            ignore = int(seg.extra["ignore_index"])
            result = evaluate_segmenter(
                seg, test, class_names=seg.class_names, ignore_index=ignore, batch_size=cfg.eval_batch_size
            )
            finite = [x for x in res.final_loss if math.isfinite(x)]
            yield {
                **result.metrics,
                "train/loss": float(np.mean(finite)) if finite else float("nan"),
                "train/iterations": res.iterations,
                "time/features_s": feature_s,
                "time/train_s": train_s,
                "feature_dim": shards.meta.feature_dim,
            }
            feature_s = 0.0


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
