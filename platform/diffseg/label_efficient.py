"""The label-efficient protocol (Baranchuk et al.): train the pixel ensemble from shards, evaluate, compare.

    run_pixel_job(PixelJobConfig)   shards -> ensemble -> PixelSegmenter bundle; test mIoU / per-class IoU pooled over
                                    the test set (ignore index honoured); prediction maps, overlays; MLflow
    run_compare(CompareConfig)      the same ensemble on DDPM features, on a randomly initialised U-Net of the same
                                    architecture, and on raw RGB pixels, plus a supervised U-Net on the same
                                    labelled images; one table (markdown + JSON)

Evaluation runs the bundle's own `predict` on the test images batch by batch (features are recomputed, never
stored for the test set), so it measures exactly what a served segmenter would return.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from diffseg.config import Name, from_dict
from diffseg.data import DataConfig, build_dataset
from diffseg.features import ExtractJobConfig, FeatureConfig, run_extract_job
from diffseg.metrics import ConfusionMatrix
from diffseg.models import resolve_device
from diffseg.pixel import PixelSegmenter, PixelTrainConfig, train_ensemble
from diffseg.shards import ShardSet
from diffseg.tracking import Tracker, TrackingConfig, start_job


# ---------------------------------------------------------------------------------------------------- evaluation
def evaluate_segmenter(
    seg: Any,
    dataset: torch.utils.data.Dataset,
    num_classes: int,
    ignore_index: int = 255,
    out_dir: str | Path | None = None,
    save_overlays: int = 16,
    batch_size: int = 8,
    class_names: list[str] | None = None,
) -> dict[str, Any]:
    """Pooled mIoU / per-class IoU of `seg.predict` over a labelled data set; writes maps and overlays to out_dir.

    `seg` is anything with `predict(images (B, 3, H, W) in [-1, 1]) -> (labels, uncertainty)`.
    """
    from diffseg.viz import grid, overlay, save_png, to_uint8

    if len(dataset) == 0:
        raise ValueError("evaluate_segmenter: the test set is empty; a metric over zero images is not a result")
    cm = ConfusionMatrix(num_classes, ignore_index)
    rows: list[dict[str, Any]] = []
    tiles: list[np.ndarray] = []
    out = Path(out_dir) if out_dir else None
    if out:
        (out / "predictions").mkdir(parents=True, exist_ok=True)
    from diffseg.pixel import image_score

    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        images = torch.stack([it["image"] for it in items])
        masks = np.stack([it["mask"].numpy() for it in items])
        labels, unc = seg.predict(images)
        cm.update(labels, masks)
        for it, lab, u, m, img in zip(items, labels, unc, masks, images):
            one = ConfusionMatrix(num_classes, ignore_index).update(lab, m)
            rows.append({"id": it["id"], "miou": one.miou(), "uncertainty": image_score(u)})
            if out:
                from PIL import Image

                Image.fromarray(lab.astype(np.uint8)).save(out / "predictions" / f"{it['id']}.png")
                if len(tiles) < 3 * save_overlays:
                    rgb = to_uint8(img)
                    tiles += [rgb, overlay(rgb, m, num_classes=num_classes), overlay(rgb, lab, num_classes=num_classes)]
    result = {
        "miou": cm.miou(),
        "iou": cm.iou().tolist(),
        "pixel_accuracy": cm.pixel_accuracy(),
        "num_images": len(rows),
        "per_image": rows,
    }
    if out:
        if tiles:
            save_png(grid(tiles, nrow=3), out / "overlays.png")  # image | ground truth | prediction, per row
        with open(out / "per_image.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["id", "miou", "uncertainty"])
            w.writeheader()
            w.writerows(rows)
        names = class_names or [str(i) for i in range(num_classes)]
        (out / "metrics.json").write_text(
            json.dumps(
                {k: v for k, v in result.items() if k != "per_image"} | {"per_class": dict(zip(names, result["iou"]))},
                indent=1,
            )
        )
    return result


def metric_dict(result: dict[str, Any], class_names: list[str], prefix: str = "test") -> dict[str, float]:
    out = {f"{prefix}/miou": result["miou"], f"{prefix}/pixel_accuracy": result["pixel_accuracy"]}
    for name, v in zip(class_names, result["iou"]):
        if v == v:  # skip NaN (class absent from predictions and ground truth)
            out[f"{prefix}/iou/{name}"] = v
    return out


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
    train_shards: str | Path | ShardSet,
    train_cfg: PixelTrainConfig,
    device: torch.device,
    tracker: Tracker | None = None,
    allow_incomplete: bool = False,
) -> tuple[PixelSegmenter, Any]:
    if isinstance(train_shards, ShardSet):
        ss = train_shards
    else:
        ss = ShardSet(train_shards, allow_incomplete=allow_incomplete)
    names = ss.meta.class_names
    if not names:
        raise ValueError(f"{train_shards}: the shards carry no class names (were they extracted from labelled data?)")
    log = (lambda m, step: tracker.log_metrics(m, step)) if tracker else None
    ens, res = train_ensemble(ss, len(names), train_cfg, device, log=log)
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
    print(
        f"[pixel] trained {seg.ensemble.members} members on {seg.extra['train_rows']} pixels "
        f"(D={seg.ensemble.in_dim}): {res.iterations} iterations, {res.epochs} epochs, {res.seconds:.1f}s, "
        f"stopped at {res.stopped_at}"
    )
    result = evaluate_segmenter(
        seg, test, seg.num_classes, int(seg.extra["ignore_index"]), out, cfg.save_overlays, class_names=seg.class_names
    )
    metrics = metric_dict(result, seg.class_names) | {
        "train/iterations": res.iterations,
        "train/seconds": res.seconds,
        "test/mean_uncertainty": float(np.mean([r["uncertainty"] for r in result["per_image"]])),
    }
    tracker.log_metrics(metrics)
    for name in ("segmenter.pt", "overlays.png", "per_image.csv", "metrics.json", "config.yaml"):
        if (out / name).exists():
            tracker.log_artifact(out / name)
    tracker.finish()
    print(f"[pixel] test mIoU {result['miou']:.4f} over {result['num_images']} images -> {out}")
    return {"miou": result["miou"], "iou": result["iou"], "out": str(out), "train": dataclasses.asdict(res)}


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


class _SupervisedSegmenter:
    def __init__(self, model: torch.nn.Module):
        self.model = model

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        from diffseg.baselines import predict_supervised

        labels = predict_supervised(self.model, images).numpy().astype(np.int64)
        return labels, np.zeros(labels.shape, np.float32)


def run_compare(cfg: CompareConfig) -> dict[str, Any]:
    from diffseg.checkpoint import load_checkpoint

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
            from diffseg.baselines import train_supervised_unet
            from diffseg.data import stack

            train = build_dataset(dataclasses.replace(cfg.train_data, flip=False, image_size=size), "train")
            data = stack(train, cfg.train_limit)
            num_classes = len(train.class_names)
            model = train_supervised_unet(
                data["image"],
                data["mask"],
                num_classes,
                cfg=ckpt.model_config.unet,
                steps=cfg.supervised_steps,
                batch_size=cfg.supervised_batch_size,
                lr=cfg.supervised_lr,
                ignore_index=train.ignore_index,
                device=device,
            )
            names = list(train.class_names)
            result = evaluate_segmenter(
                _SupervisedSegmenter(model), test, num_classes, train.ignore_index, vout, class_names=names
            )
            info: dict[str, Any] = {"input": "image", "dim": None, "train_pixels": None}
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
            names = seg.class_names
            result = evaluate_segmenter(seg, test, seg.num_classes, 255, vout, class_names=names)
            info = {"input": fcfg.backbone, "dim": seg.ensemble.in_dim, "train_pixels": ex["num_rows"]}
            info["iterations"] = res.iterations
        seconds = time.perf_counter() - t0
        metrics = metric_dict(result, names)
        child.log_metrics(metrics | {"seconds": seconds})
        child.finish()
        parent.log_metrics({f"{variant}/miou": result["miou"]})
        rows[variant] = info | {"miou": result["miou"], "iou": dict(zip(names, result["iou"])), "seconds": seconds}
        print(f"[compare] {variant}: mIoU {result['miou']:.4f} ({seconds:.0f}s)", flush=True)
    table = compare_table(rows)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    (out / "results.md").write_text(table)
    parent.log_artifact(out / "results.md")
    parent.finish()
    print(table)
    return rows


LABELS = {
    "ddpm": "MLP ensemble on DDPM features",
    "random": "MLP ensemble on random-init U-Net features",
    "rgb": "MLP ensemble on raw RGB pixels",
    "supervised": "supervised U-Net (same architecture)",
}


def compare_table(rows: dict[str, dict[str, Any]]) -> str:
    lines = ["| method | input dim | mIoU | time (s) |", "| --- | --- | --- | --- |"]
    for k, r in rows.items():
        lines.append(f"| {LABELS.get(k, k)} | {r.get('dim') or '-'} | {100 * r['miou']:.1f} | {r['seconds']:.0f} |")
    names = list(next(iter(rows.values()))["iou"]) if rows else []
    if names:
        lines += ["", "| class | " + " | ".join(rows) + " |", "| --- |" + " --- |" * len(rows)]
        for n in names:
            vals = [rows[k]["iou"].get(n, float("nan")) for k in rows]
            lines.append(f"| {n} | " + " | ".join("-" if v != v else f"{100 * v:.1f}" for v in vals) + " |")
    return "\n".join(lines) + "\n"
