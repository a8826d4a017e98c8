"""The label-efficient protocol (Baranchuk et al.): train the pixel ensemble from shards, evaluate, compare.

    run_pixel_job(PixelJobConfig)   shards -> ensemble -> PixelSegmenter bundle; test mIoU / per-class IoU pooled over
                                    the test set (ignore index honoured); prediction maps, overlays; MLflow
    run_compare(CompareConfig)      the same ensemble on DDPM features, on a randomly initialised U-Net of the same
                                    architecture, and on raw RGB pixels, plus a supervised U-Net on the same
                                    labelled images; one table (markdown + JSON)
    run_gap_curve(GapCurveConfig)   finished comparisons at several DDPM training lengths -> the DDPM-vs-random gap
                                    against the DDPM's training images: table, fitted trend, plot

Evaluation is THE evaluation path (`diffseg.evaluation.evaluate.evaluate_segmenter`): the bundle segments the test
images batch by batch (features are recomputed, never stored for the test set), so it measures exactly what a served
segmenter would return, with metric keys `test/miou` (classes present in target or prediction), `test/miou_official`
(the reference's averaging: every class, absent ones as 0, predictions on ignored pixels counted; see
`diffseg.scoring.metrics.ConfusionMatrix`) and `test/iou/<class>`. Every row of a comparison carries its compute: the
backbone's training (steps x batch from its checkpoint), the ensemble's or the network's iterations x batch, the
wall time and the machine it ran on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
import yaml

from diffseg.core.config import InputPath, Name, OutputPath, from_dict
from diffseg.core.report import markdown_table
from diffseg.core.runtime import resolve_device
from diffseg.core.tracking import Tracker, TrackingConfig, start_job
from diffseg.data.datasets import DataConfig, build_dataset, check_labelled, stack
from diffseg.data.shard_reader import ShardSet
from diffseg.evaluation.baselines import NetworkSegmenter, train_supervised_unet
from diffseg.evaluation.evaluate import EvalResult, evaluate_segmenter
from diffseg.methods.features import ExtractJobConfig, FeatureConfig, run_extract_job
from diffseg.methods.pixel import MLPEnsemble, PixelSegmenter
from diffseg.methods.pixel_training import PixelTrainConfig, TrainResult, train_ensemble
from diffseg.models.checkpoint import checkpoint_of, load_checkpoint
from diffseg.serving.pyfunc import log_bundle_model, model_name

log = logging.getLogger(__name__)


def machine(device: torch.device) -> str:
    """Where a row ran, for the tables: the accelerator, or the CPU's cores and torch threads."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def backbone_compute(checkpoint: str) -> dict[str, Any]:
    """The DDPM's training compute as its checkpoints record it: optimizer steps x global batch = images seen, summed
    along the `init_from` chain (a run started from another run's weights), e.g. 1136 + 1136 steps x 64 = 146k."""
    steps, images, batch, seen = 0, 0, 0, set()
    path: str | None = checkpoint
    while path and path not in seen:
        seen.add(path)
        ckpt = load_checkpoint(path)
        b = int((ckpt.config.get("optim") or {}).get("batch_size", 0))
        steps, images, batch = steps + int(ckpt.step), images + int(ckpt.step) * b, batch or b
        recorded = ckpt.config.get("init_from")
        path = _init_from_path(recorded, Path(path)) if recorded else None
        if recorded and path is None:
            log.warning(f"backbone_compute: {checkpoint} started from {recorded}, which is not here; its steps are "
                        "missing")  # fmt: skip
            break
    return {"backbone_steps": steps, "backbone_batch": batch, "backbone_images": images}


def _init_from_path(recorded: str, checkpoint: Path) -> str | None:
    """The checkpoint an `init_from` names, as a path that exists here: the record may carry a note after the path
    (the shipped models say `models/ddpm-celeba32.pt (its fp32 original)`), and a relative path means the folder the
    run started in: tried as it is, beside the checkpoint, and beside the checkpoint's folder."""
    token = recorded.split(" (", 1)[0].strip()
    for candidate in (Path(token), checkpoint.parent / token, checkpoint.parent.parent / token):
        if candidate.is_file() or (candidate / "checkpoint.pt").is_file():
            return str(candidate)
    return None


def class_ious(result: EvalResult, class_names: list[str], split: str = "test") -> list[float]:
    """Per-class IoU in class order (NaN for a class absent from prediction and ground truth)."""
    return [result.metrics.get(f"{split}/iou/{n}", float("nan")) for n in class_names]


# ---------------------------------------------------------------------------------------------------- pixel job
@dataclass(frozen=True)
class PixelJobConfig:
    name: Name = "pixel"  # run name: outputs go to <output_dir>/<name>/
    output_dir: OutputPath = "runs/pixel"  # where the bundle, predictions and metrics go
    train_shards: InputPath = ""  # a shard folder written by jobs/extract_features.py (its recipe is used for test)
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
    A shard folder must be a complete set (`diffseg.data.shards`) unless `allow_incomplete`."""
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
    log_bundle_model(
        tracker, out / "segmenter.pt", name=model_name(cfg.name)
    )  # an MLflow model (registered as tracking.register_as)
    tracker.finish()
    miou = result.metrics["test/miou"]
    log.info(f"[pixel] test mIoU {miou:.4f} over {result.num_images} images -> {out}")
    iou = class_ious(result, seg.class_names)
    return {"miou": miou, "iou": iou, "metrics": result.metrics, "out": str(out), "train": dataclasses.asdict(res)}


# ---------------------------------------------------------------------------------------------------- comparisons
@dataclass(frozen=True)
class CompareConfig:
    name: Name = "compare"
    output_dir: OutputPath = "runs/label"  # tables, figures and feature shards
    # the trained DDPM (our format or a converted guided-diffusion checkpoint)
    checkpoint: Annotated[str, checkpoint_of("ddpm", needed_by="the comparison")] = ""
    features: FeatureConfig = field(default_factory=FeatureConfig)  # blocks / timesteps / noise for both U-Nets
    train_data: DataConfig = field(default_factory=DataConfig)  # labelled training images (split "train")
    train_limit: int = 20  # the paper's few labelled images
    test_data: DataConfig = field(default_factory=DataConfig)  # test images (split "test")
    test_limit: int = 0
    variants: tuple[str, ...] = ("ddpm", "random", "rgb", "supervised")  # which rows of the table to run
    min_class_pixels: int = 0  # per labelled image, a class with fewer pixels is ignored (0 = off; the reference: 20)
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
        check_labelled(self.train_data, "train_data")
        check_labelled(self.test_data, "test_data")


def train_variant(
    variant: str, cfg: CompareConfig, out: Path, device: torch.device, tracker: Tracker | None = None
) -> tuple[Any, dict[str, Any]]:
    """The segmenter one row of a comparison stands for, trained on the labelled images of `cfg`:
    ddpm / random / rgb: features of the labelled images (the extract job: Ray Data, shards under out/shards/), the
    ensemble trained on them (`train_segmenter`) and saved as out/<variant>/segmenter.pt; supervised: the DDPM's
    U-Net architecture trained end to end on the same images. -> (segmenter, info: names, ignore index, compute)."""
    ckpt = load_checkpoint(cfg.checkpoint)
    size = int(ckpt.model_config.unet.image_size)
    if variant == "supervised":
        train = build_dataset(dataclasses.replace(cfg.train_data, flip=False, image_size=size), "train")
        data = stack(train, cfg.train_limit)
        names = list(train.class_names)
        model = train_supervised_unet(
            data["image"], data["mask"], len(names), cfg=ckpt.model_config.unet, steps=cfg.supervised_steps,
            batch_size=cfg.supervised_batch_size, lr=cfg.supervised_lr, ignore_index=train.ignore_index,
            device=device, seed=cfg.train.seed,
        )  # fmt: skip
        info = {"input": "image", "dim": None, "train_pixels": None, "names": names, "ignore": train.ignore_index}
        info |= {"iterations": cfg.supervised_steps, "batch_size": cfg.supervised_batch_size}
        return NetworkSegmenter(model, names), info
    backbones = {"ddpm": cfg.checkpoint, "random": f"random:{cfg.checkpoint}", "rgb": "rgb"}
    fcfg = dataclasses.replace(cfg.features, backbone=backbones[variant])
    ex = run_extract_job(
        ExtractJobConfig(
            name=variant,
            output_dir=str(out / "shards"),
            features=fcfg,
            data=dataclasses.replace(cfg.train_data, image_size=size),
            split="train",
            limit=cfg.train_limit,
            min_class_pixels=cfg.min_class_pixels,
            cpus_per_actor=cfg.cpus_per_actor,
        )
    )
    seg, res = train_segmenter(ex["shard_dir"], cfg.train, device, tracker)
    seg.save(out / variant / "segmenter.pt")
    info = {"input": fcfg.backbone, "dim": seg.ensemble.in_dim, "train_pixels": ex["num_rows"]}
    info |= {"names": seg.class_names, "ignore": int(seg.extra["ignore_index"])}
    info |= {"iterations": res.iterations, "batch_size": cfg.train.batch_size, "members": seg.ensemble.members}
    info |= {"bn_stats": res.bn_stats, "windows_per_epoch": res.windows_per_epoch}
    if variant == "ddpm":
        info |= backbone_compute(cfg.checkpoint)
    return seg, info


def score_variant(
    variant: str,
    cfg: CompareConfig,
    out: Path,
    device: torch.device,
    test: Any,
    parent: Tracker,
    run_name: str | None = None,
    eval_dir: Path | None = None,
    log_model: bool = True,
) -> dict[str, Any]:
    """One row of a comparison: `train_variant` on the labelled images of `cfg`, then the one evaluation path on
    `test` (predictions and metrics under `eval_dir`, default out/<variant>), in an MLflow child run of `parent`
    (named `run_name`, default <name>/<variant>) holding its metrics and, with `log_model`, the pixel ensemble's
    bundle as an MLflow model. -> the row: compute, mIoU both ways, per-class IoU, wall time, machine."""
    t0 = time.perf_counter()
    child = Tracker(cfg.tracking, run_name or f"{cfg.name}/{variant}", parent_run_id=parent.run_id)
    seg, info = train_variant(variant, cfg, out, device, child)
    if variant != "supervised" and log_model:  # the pixel ensemble's bundle as an MLflow model (registered on request)
        reg = cfg.tracking.register_as
        log_bundle_model(child, out / variant / "segmenter.pt", name=model_name(cfg.name, variant),
                         register_as=f"{reg}-{variant}" if reg else None)  # fmt: skip
    names = info.pop("names")
    result = evaluate_segmenter(
        seg, test, class_names=names, ignore_index=info.pop("ignore"), out_dir=eval_dir or out / variant
    )
    seconds = time.perf_counter() - t0
    miou = result.metrics["test/miou"]
    child.log_metrics(result.metrics | {"time/seconds": seconds})
    child.finish()
    log.info(f"[compare] {variant}: mIoU {miou:.4f} ({seconds:.0f}s)")
    return info | {
        "miou": miou,
        "miou_official": result.metrics["test/miou_official"],
        "iou": dict(zip(names, class_ious(result, names))),
        "seconds": seconds,
        "machine": machine(device),
    }


def run_compare(cfg: CompareConfig) -> dict[str, Any]:
    out, parent = start_job(cfg)
    device = resolve_device(cfg.device)
    size = int(load_checkpoint(cfg.checkpoint).model_config.unet.image_size)
    test = build_dataset(dataclasses.replace(cfg.test_data, flip=False, image_size=size), "test")
    if cfg.test_limit:
        test = torch.utils.data.Subset(test, range(min(cfg.test_limit, len(test))))
    rows: dict[str, dict[str, Any]] = {}
    for variant in cfg.variants:
        rows[variant] = score_variant(variant, cfg, out, device, test, parent)
        parent.log_metrics({f"test/miou/{variant}": rows[variant]["miou"]})
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


def row_compute(r: dict[str, Any]) -> str:
    """A row's training compute in words: backbone steps x batch (images), then the classifier's iterations x batch."""
    parts = []
    if r.get("backbone_steps") is not None:
        parts.append(
            f"DDPM {r['backbone_steps']} steps x {r['backbone_batch']} ({r['backbone_images'] / 1000:.0f}k img)"
        )
    elif str(r.get("input", "")).startswith("random:"):
        parts.append("U-Net random init")
    if r.get("members"):
        parts.append(f"{r['members']} MLPs {r['iterations']} it x {r['batch_size']}")
    elif r.get("iterations"):
        parts.append(f"{r['iterations']} steps x {r['batch_size']}")
    return "; ".join(parts) or "-"


def compare_table(rows: dict[str, dict[str, Any]]) -> str:
    """The comparison as Markdown: one row per variant (mIoU both ways, compute, wall time, machine), then per-class
    IoU (in %)."""
    body = []
    for k, r in rows.items():
        official = r.get("miou_official", float("nan"))
        body.append([
            LABELS.get(k, k), r.get("dim") or "-", f"{100 * r['miou']:.1f}", f"{100 * official:.1f}", row_compute(r),
            f"{r['seconds'] / 60:.1f}", r.get("machine", "-"),
        ])  # fmt: skip
    head = ["method", "input dim", "mIoU", "mIoU (official)", "training compute", "minutes", "machine"]
    out = markdown_table(head, body)
    names = list(next(iter(rows.values()))["iou"]) if rows else []
    if names:
        per_class = [
            [n, *("-" if v != v else f"{100 * v:.1f}" for v in (rows[k]["iou"].get(n, float("nan")) for k in rows))]
            for n in names
        ]
        out += "\n" + markdown_table(["class", *rows], per_class)
    return out


# ---------------------------------------------------------------------------------------------------- the gap curve
@dataclass(frozen=True)
class GapCurveConfig:
    name: Name = "gap-curve"  # output folder name under output_dir
    output_dir: OutputPath = "runs/label"  # gap.md, gap.json and gap.png go to <output_dir>/<name>/
    runs: tuple[
        InputPath, ...
    ] = ()  # comparison run folders (their results.json has a "ddpm" row), one per DDPM length
    baselines: tuple[
        InputPath, ...
    ] = ()  # runs with a "random" row, for runs without one: the one of the same MLP seed
    target_gap: float = 3.0  # mIoU points the DDPM features should gain over random-init features
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def check(self) -> None:
        """Cross-field checks (run by --dry-run and before the job)."""
        if not self.runs:
            raise ValueError("runs: give the comparison run folders, one per DDPM training length")


def _read_results(run: str | os.PathLike) -> dict[str, Any]:
    path = Path(run) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no results.json (is {run} a finished comparison run?)")
    return json.loads(path.read_text())


def _run_seed(run: str | os.PathLike) -> int | None:
    """The ensemble's seed of a comparison run (its config.yaml), None if the run has no config."""
    path = Path(run) / "config.yaml"
    if not path.is_file():
        return None
    return int(((yaml.safe_load(path.read_text()) or {}).get("train") or {}).get("seed", 0))


def gap_rows(runs: Sequence[str], baselines: Sequence[str] = ()) -> list[dict[str, Any]]:
    """One row per comparison run: the DDPM's training images, its features' mIoU, the random-init features' mIoU
    and the gap, in mIoU points. The random-init row is the run's own, else that of the baseline run with the same
    ensemble seed: it is the same architecture with the same fixed init, so it does not depend on the DDPM's training,
    but the ensemble's seed moves it (which is why seeds are matched)."""
    by_seed: dict[int | None, tuple[dict[str, Any], str]] = {}
    for b in baselines:
        res = _read_results(b)
        if "random" not in res:
            raise ValueError(f"{b}/results.json: a baseline needs a 'random' row")
        by_seed.setdefault(_run_seed(b), (res["random"], str(b)))
    rows = []
    for run in runs:
        res = _read_results(run)
        if "ddpm" not in res:
            raise ValueError(f"{run}/results.json: no 'ddpm' row (variants must include ddpm)")
        ddpm, seed = res["ddpm"], _run_seed(run)
        if ddpm.get("backbone_images") is None:
            raise ValueError(f"{run}/results.json: the ddpm row does not say how many images its DDPM was trained on")
        if "random" in res:
            random, source = res["random"], str(run)
        elif seed in by_seed:
            random, source = by_seed[seed]
        else:
            raise ValueError(
                f"{run}/results.json: no 'random' row, and no baseline run with MLP seed {seed} has one "
                f"(baselines: {list(baselines)})"
            )
        if ddpm.get("dim") != random.get("dim"):
            raise ValueError(f"{run}: DDPM features have {ddpm.get('dim')} dims, random-init {random.get('dim')}")
        rows.append({
            "run": str(run),
            "seed": seed,
            "ddpm_steps": int(ddpm["backbone_steps"]),
            "ddpm_images": int(ddpm["backbone_images"]),
            "ddpm_miou": 100 * float(ddpm["miou"]),
            "random_miou": 100 * float(random["miou"]),
            "random_from": str(source),
            "gap": 100 * (float(ddpm["miou"]) - float(random["miou"])),
        })  # fmt: skip
    return sorted(rows, key=lambda r: (r["ddpm_images"], r["seed"] or 0))


def gap_prediction(rows: Sequence[dict[str, Any]], target: float) -> dict[str, Any]:
    """What the curve predicts. Per training length: the seeds' gaps, their mean, standard deviation (ddof 1; None
    for one seed) and range. Then a least-squares line of the mean gap against log2(training images) (the gain per
    doubling of the DDPM's training) and the images at which that line reaches `target` (None when it does not
    rise). With fewer than two lengths there is no line. "largest_gap" is the largest mean gap."""
    by_images: dict[int, list[float]] = {}
    for r in rows:
        by_images.setdefault(r["ddpm_images"], []).append(r["gap"])
    lengths = [
        {"images": k, "seeds": len(g), "mean": float(np.mean(g)),
         "sd": float(np.std(g, ddof=1)) if len(g) > 1 else None, "min": float(min(g)), "max": float(max(g))}
        for k, g in sorted(by_images.items())
    ]  # fmt: skip
    x = np.log2(np.array([p["images"] for p in lengths], dtype=float))
    y = np.array([p["mean"] for p in lengths])
    out: dict[str, Any] = {"points": len(x), "target_gap": target, "largest_gap": float(y.max()) if len(y) else None}
    out["lengths"] = lengths
    if len(x) < 2:
        return out | {"slope_per_doubling": None, "images_at_target": None}
    slope, intercept = np.polyfit(x, y, 1)
    at_target = float(2 ** ((target - intercept) / slope)) if slope > 0 else None
    return out | {"slope_per_doubling": float(slope), "intercept": float(intercept), "images_at_target": at_target}


def gap_table(rows: Sequence[dict[str, Any]]) -> str:
    body = [
        [f"{r['ddpm_images'] / 1000:.0f}k", r["ddpm_steps"], "-" if r["seed"] is None else r["seed"],
         f"{r['ddpm_miou']:.1f}", f"{r['random_miou']:.1f}", f"{r['gap']:+.1f}", r["run"], r["random_from"]]
        for r in rows
    ]  # fmt: skip
    head = ["DDPM images", "DDPM steps", "MLP seed", "DDPM mIoU", "random-init mIoU", "gap", "run", "random row from"]
    return markdown_table(head, body)


def plot_gap_curve(rows: Sequence[dict[str, Any]], prediction: dict[str, Any], path: str | os.PathLike) -> Path:
    """mIoU of both feature types (left) and their gap (right) against the DDPM's training images (log scale)."""
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(8, 3.2))
    ax1, ax2 = fig.subplots(1, 2)
    images = np.array([r["ddpm_images"] for r in rows], dtype=float)
    ax1.plot(images, [r["ddpm_miou"] for r in rows], "o", color="tab:blue", label="DDPM features")
    ax1.plot(images, [r["random_miou"] for r in rows], "s", color="tab:gray", label="random-init features")
    ax2.plot(images, [r["gap"] for r in rows], "o", color="tab:red", alpha=0.6, label="measured (one per seed)")
    lengths = prediction.get("lengths", [])
    ax2.plot([p["images"] for p in lengths], [p["mean"] for p in lengths], "-", color="tab:red", lw=1.5, label="mean")
    ax2.axhline(prediction["target_gap"], color="k", ls=":", lw=1, label=f"target (+{prediction['target_gap']:g})")
    ax2.axhline(0, color="0.7", lw=0.8)
    if prediction.get("slope_per_doubling") is not None:
        xs = np.geomspace(images.min(), images.max(), 50)
        fit = prediction["intercept"] + prediction["slope_per_doubling"] * np.log2(xs)
        ax2.plot(xs, fit, "--", color="tab:red", lw=1, label=f"fit: {prediction['slope_per_doubling']:+.1f} / doubling")
    for ax, ylabel in ((ax1, "test mIoU (%)"), (ax2, "gap, DDPM - random (mIoU points)")):
        ax.set_xscale("log")
        ticks = sorted({r["ddpm_images"] for r in rows})
        ax.set_xticks(ticks, [f"{t / 1000:.0f}k" for t in ticks])
        ax.set_xticks([], minor=True)
        ax.set_xlabel("DDPM training images")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def run_gap_curve(cfg: GapCurveConfig) -> dict[str, Any]:
    """The DDPM-vs-random gap against the DDPM's training images from finished comparison runs: gap.md (table and
    prediction), gap.json, gap.png; MLflow."""
    out, tracker = start_job(cfg)
    rows = gap_rows(cfg.runs, cfg.baselines)
    pred = gap_prediction(rows, cfg.target_gap)
    text = gap_table(rows) + gap_summary(pred)
    (out / "gap.md").write_text(text)
    (out / "gap.json").write_text(json.dumps({"rows": rows, "prediction": pred}, indent=1))
    plot_gap_curve(rows, pred, out / "gap.png")
    for r in rows:
        tracker.log_metrics({"gap": r["gap"], "ddpm_miou": r["ddpm_miou"]}, step=r["ddpm_images"])
    for name in ("gap.md", "gap.json", "gap.png"):
        tracker.log_artifact(out / name)
    tracker.finish()
    log.info(text)
    return {"rows": rows, "prediction": pred}


def gap_summary(pred: dict[str, Any]) -> str:
    """The gap per training length over the ensemble seeds, then the prediction in one sentence."""
    body = [
        [f"{p['images'] / 1000:.0f}k", p["seeds"], f"{p['mean']:+.1f}", "-" if p["sd"] is None else f"{p['sd']:.1f}",
         f"{p['min']:+.1f} .. {p['max']:+.1f}"]
        for p in pred.get("lengths", [])
    ]  # fmt: skip
    s = "\n" + markdown_table(["DDPM images", "seeds", "mean gap", "sd", "range"], body)
    if pred.get("slope_per_doubling") is None:
        return s + f"\nOne training length only ({pred['points']} point): no curve.\n"
    s += (
        f"\nFit over {pred['points']} training lengths: {pred['slope_per_doubling']:+.2f} mIoU points per doubling of "
        f"the DDPM's training images; largest mean gap {pred['largest_gap']:+.1f}."
    )
    if pred["images_at_target"] is None:
        return s + f" The line does not rise: it never reaches +{pred['target_gap']:g}.\n"
    return s + f" The line reaches +{pred['target_gap']:g} at {pred['images_at_target'] / 1000:.0f}k images.\n"
