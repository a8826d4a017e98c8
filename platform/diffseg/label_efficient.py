"""The label-efficient protocol (Baranchuk et al.): train the pixel ensemble from shards, evaluate, compare.

    run_pixel_job(PixelJobConfig)   shards -> ensemble -> PixelSegmenter bundle; test mIoU / per-class IoU pooled over
                                    the test set (ignore index honoured); prediction maps, overlays; MLflow
    run_compare(CompareConfig)      the same ensemble on DDPM features, on a randomly initialised U-Net of the same
                                    architecture, and on raw RGB pixels, plus a supervised U-Net on the same
                                    labelled images; one table (markdown + JSON)

Evaluation is THE evaluation path (`diffseg.evaluate.evaluate_segmenter`): the bundle segments the test images batch
by batch (features are recomputed, never stored for the test set), so it measures exactly what a served segmenter
would return, with metric keys `test/miou`, `test/iou/<class>`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from diffseg.baselines import NetworkSegmenter, train_supervised_unet
from diffseg.checkpoint import load_checkpoint
from diffseg.config import Name, from_dict
from diffseg.data import DataConfig, build_dataset, stack
from diffseg.evaluate import EvalResult, evaluate_segmenter
from diffseg.features import ExtractJobConfig, FeatureConfig, run_extract_job
from diffseg.pixel import MLPEnsemble, PixelSegmenter, PixelTrainConfig, TrainResult, train_ensemble
from diffseg.pyfunc import log_bundle_model
from diffseg.report import markdown_table
from diffseg.runtime import resolve_device
from diffseg.shards import ShardSet
from diffseg.tracking import Tracker, TrackingConfig, start_job

log = logging.getLogger(__name__)


def class_ious(result: EvalResult, class_names: list[str], split: str = "test") -> list[float]:
    """Per-class IoU in class order (NaN for a class absent from prediction and ground truth)."""
    return [result.metrics.get(f"{split}/iou/{n}", float("nan")) for n in class_names]


# ---------------------------------------------------------------------------------------------------- pixel job
@dataclass(frozen=True)
class PixelJobConfig:
    name: Name = "pixel"  # run name: outputs go to <output_dir>/<name>/
    output_dir: str = "runs/pixel"
    train_shards: str = ""  # a shard folder written by jobs/extract_features.py (its recipe is used for test)
    data: DataConfig = field(default_factory=DataConfig)  # where the TEST images come from
    test_split: Literal["train", "test", "all"] = "test"
    test_limit: int = 0  # first N test images (0 = all)
    train: PixelTrainConfig = field(default_factory=PixelTrainConfig)  # ensemble size and the paper's training
    allow_incomplete_shards: bool = False  # train on a shard folder whose extraction did not finish (logged)
    device: str = "auto"  # auto = cuda when available
    save_overlays: int = 16  # test images shown in overlays.png (all prediction maps are saved)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def check(self) -> None:
        """Cross-field checks (run by --dry-run and before the job)."""
        if not self.train_shards:
            raise ValueError("train_shards: the shard folder written by jobs/extract_features.py is required")


def recipe_from_shards(ss: ShardSet) -> FeatureConfig:
    """The FeatureConfig that produced a shard set (stored by the extract job in the shard metadata)."""
    fc = ss.meta.extra.get("feature_config")
    if fc:
        return from_dict(FeatureConfig, fc)
    return FeatureConfig(
        backbone=ss.meta.backbone,
        blocks=tuple(ss.meta.blocks),
        timesteps=tuple(ss.meta.timesteps),
        noise_seed=ss.meta.noise_seed,
    )


def train_segmenter(
    shards: str | Path | ShardSet,
    train_cfg: PixelTrainConfig,
    device: torch.device | str = "cpu",
    tracker: Tracker | None = None,
    ensemble: MLPEnsemble | None = None,
    allow_incomplete: bool = False,
) -> tuple[PixelSegmenter, TrainResult]:
    """THE way to a servable pixel segmenter: train the ensemble on a shard set (continuing `ensemble` if given) and
    bundle it with the shards' feature recipe and class names (`PixelSegmenter.save` writes what Serve loads).
    A shard folder must be a complete set (`diffseg.shards`) unless `allow_incomplete`."""
    ss = shards if isinstance(shards, ShardSet) else ShardSet(shards, allow_incomplete=allow_incomplete)
    names = ss.meta.class_names
    if not names:
        raise ValueError(f"{ss.paths[0]}: the shards carry no class names (were they extracted from labelled data?)")
    log_fn = (lambda m, step: tracker.log_metrics(m, step)) if tracker else None
    ens, res = train_ensemble(ss, len(names), train_cfg, device, ensemble=ensemble, log=log_fn)
    seg = PixelSegmenter(
        ens,
        recipe_from_shards(ss),
        names,
        ss.meta.image_size,
        {
            "train_shards": ss.source,
            "recipe_hash": ss.meta.recipe_hash,
            "train_rows": ss.num_rows,
            "train_images": ss.meta.extra.get("num_images"),
            "ignore_index": ss.meta.extra.get("ignore_index", 255),
            "iterations": res.iterations,
        },
        device,
    )
    return seg, res


def run_pixel_job(cfg: PixelJobConfig) -> dict[str, Any]:
    out, tracker = start_job(cfg)
    device = resolve_device(cfg.device)
    shards = ShardSet(cfg.train_shards, allow_incomplete=cfg.allow_incomplete_shards)
    # the test images first: an empty or unreadable test set fails before any training
    test = build_dataset(dataclasses.replace(cfg.data, flip=False, image_size=shards.meta.image_size), cfg.test_split)
    if cfg.test_limit:
        test = torch.utils.data.Subset(test, range(min(cfg.test_limit, len(test))))
    seg, res = train_segmenter(shards, cfg.train, device, tracker)
    seg.save(out / "segmenter.pt")
    log.info(
        f"[pixel] trained {seg.ensemble.members} members on {seg.extra['train_rows']} pixels "
        f"(D={seg.ensemble.in_dim}): {res.iterations} iterations, {res.epochs} epochs, {res.seconds:.1f}s, "
        f"stopped at {res.stopped_at}"
    )
    result = evaluate_segmenter(
        seg, test, class_names=seg.class_names, ignore_index=int(seg.extra["ignore_index"]), out_dir=out,
        save_overlays=cfg.save_overlays,
    )  # fmt: skip
    metrics = result.metrics | {
        "train/iterations": res.iterations,
        "train/seconds": res.seconds,
        "test/mean_uncertainty": float(np.mean([r["uncertainty"] for r in result.per_image])),
    }
    tracker.log_metrics(metrics)
    for name in ("segmenter.pt", "overlays.png", "per_image.csv", "metrics.json", "config.yaml"):
        if (out / name).exists():
            tracker.log_artifact(out / name)
    log_bundle_model(tracker, out / "segmenter.pt")  # an MLflow model (registered as tracking.register_as)
    tracker.finish()
    miou = result.metrics["test/miou"]
    log.info(f"[pixel] test mIoU {miou:.4f} over {result.num_images} images -> {out}")
    iou = class_ious(result, seg.class_names)
    return {"miou": miou, "iou": iou, "metrics": result.metrics, "out": str(out), "train": dataclasses.asdict(res)}


# ---------------------------------------------------------------------------------------------------- comparisons
@dataclass(frozen=True)
class CompareConfig:
    name: Name = "compare"
    output_dir: str = "runs/label"
    checkpoint: str = ""  # the trained DDPM (our format or a converted guided-diffusion checkpoint)
    features: FeatureConfig = field(default_factory=FeatureConfig)  # blocks / timesteps / noise for both U-Nets
    train_data: DataConfig = field(default_factory=DataConfig)  # labelled training images (split "train")
    train_limit: int = 20  # the paper's few labelled images
    test_data: DataConfig = field(default_factory=DataConfig)  # test images (split "test")
    test_limit: int = 0
    variants: tuple[str, ...] = ("ddpm", "random", "rgb", "supervised")  # which rows of the table to run
    train: PixelTrainConfig = field(default_factory=PixelTrainConfig)
    supervised_steps: int = 1500  # Adam steps of the supervised U-Net (same architecture as the DDPM)
    supervised_batch_size: int = 8
    supervised_lr: float = 1e-3
    device: str = "auto"
    cpus_per_actor: float = 0.5
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def check(self) -> None:
        """Cross-field checks (run by --dry-run and before the job)."""
        if not self.checkpoint:
            raise ValueError("checkpoint: the trained DDPM whose features are compared is required")
        unknown = sorted(set(self.variants) - set(LABELS))
        if unknown:
            raise ValueError(f"variants: unknown {unknown}; known: {list(LABELS)}")


def run_compare(cfg: CompareConfig) -> dict[str, Any]:
    out, parent = start_job(cfg)
    device = resolve_device(cfg.device)
    backbones = {"ddpm": cfg.checkpoint, "random": f"random:{cfg.checkpoint}", "rgb": "rgb"}
    ckpt = load_checkpoint(cfg.checkpoint)
    size = int(ckpt.model_config.unet.image_size)
    test = build_dataset(dataclasses.replace(cfg.test_data, flip=False, image_size=size), "test")
    if cfg.test_limit:
        test = torch.utils.data.Subset(test, range(min(cfg.test_limit, len(test))))
    rows: dict[str, dict[str, Any]] = {}
    for variant in cfg.variants:
        t0 = time.perf_counter()
        vout = out / variant
        child = Tracker(cfg.tracking, f"{cfg.name}/{variant}", parent_run_id=parent.run_id)
        if variant == "supervised":
            train = build_dataset(dataclasses.replace(cfg.train_data, flip=False, image_size=size), "train")
            data = stack(train, cfg.train_limit)
            names = list(train.class_names)
            model = train_supervised_unet(
                data["image"], data["mask"], len(names), cfg=ckpt.model_config.unet, steps=cfg.supervised_steps,
                batch_size=cfg.supervised_batch_size, lr=cfg.supervised_lr, ignore_index=train.ignore_index,
                device=device,
            )  # fmt: skip
            seg: Any = NetworkSegmenter(model, names)
            ignore, info = train.ignore_index, {"input": "image", "dim": None, "train_pixels": None}
        else:
            fcfg = dataclasses.replace(cfg.features, backbone=backbones[variant])
            ex = run_extract_job(
                ExtractJobConfig(
                    name=variant,
                    output_dir=str(out / "shards"),
                    features=fcfg,
                    data=dataclasses.replace(cfg.train_data, image_size=size),
                    split="train",
                    limit=cfg.train_limit,
                    cpus_per_actor=cfg.cpus_per_actor,
                )
            )
            seg, res = train_segmenter(ex["shard_dir"], cfg.train, device, child)
            seg.save(vout / "segmenter.pt")
            reg = cfg.tracking.register_as
            log_bundle_model(child, vout / "segmenter.pt", register_as=f"{reg}-{variant}" if reg else None)
            names, ignore = seg.class_names, int(seg.extra["ignore_index"])
            info = {"input": fcfg.backbone, "dim": seg.ensemble.in_dim, "train_pixels": ex["num_rows"]}
            info["iterations"] = res.iterations
        result = evaluate_segmenter(seg, test, class_names=names, ignore_index=ignore, out_dir=vout)
        seconds = time.perf_counter() - t0
        miou = result.metrics["test/miou"]
        child.log_metrics(result.metrics | {"time/seconds": seconds})
        child.finish()
        parent.log_metrics({f"test/miou/{variant}": miou})
        rows[variant] = info | {"miou": miou, "iou": dict(zip(names, class_ious(result, names))), "seconds": seconds}
        log.info(f"[compare] {variant}: mIoU {miou:.4f} ({seconds:.0f}s)")
    table = compare_table(rows)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    (out / "results.md").write_text(table)
    parent.log_artifact(out / "results.md")
    parent.finish()
    log.info(table)
    return rows


LABELS = {
    "ddpm": "MLP ensemble on DDPM features",
    "random": "MLP ensemble on random-init U-Net features",
    "rgb": "MLP ensemble on raw RGB pixels",
    "supervised": "supervised U-Net (same architecture)",
}


def compare_table(rows: dict[str, dict[str, Any]]) -> str:
    """The comparison as Markdown: one row per variant, then per-class IoU (in %)."""
    body = []
    for k, r in rows.items():
        body.append([LABELS.get(k, k), r.get("dim") or "-", f"{100 * r['miou']:.1f}", f"{r['seconds']:.0f}"])
    out = markdown_table(["method", "input dim", "mIoU", "time (s)"], body)
    names = list(next(iter(rows.values()))["iou"]) if rows else []
    if names:
        per_class = [
            [n, *("-" if v != v else f"{100 * v:.1f}" for v in (rows[k]["iou"].get(n, float("nan")) for k in rows))]
            for n in names
        ]
        out += "\n" + markdown_table(["class", *rows], per_class)
    return out
