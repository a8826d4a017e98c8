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
    kmeans_ddpm                      k-means (k = K) on a DDPM U-Net's decoder features ("DatasetDDPM-unsup")
    kmeans_rgb                       k-means on the pixels' colours (a feature-free reference for kmeans_ddpm)
    factorized                       the factorized model's argmax mask at t (default 30)
    supervised                       a U-Net trained on the labelled training split (the upper bound)

Everything here is plain PyTorch / NumPy; `jobs/evaluate.py` is the command line. Outputs: table.md, table.csv,
results.json, figures/<dataset>.png, the resolved config, and an MLflow run with the metrics and those files.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from diffseg import baselines
from diffseg.config import Name, job_dir, save_config, to_dict
from diffseg.data import DataConfig, build_dataset
from diffseg.diffusion import DiffusionConfig, GaussianDiffusion
from diffseg.metrics import ConfusionMatrix, HungarianIoU, foreground_scores, mask_image_dependence
from diffseg.tracking import Tracker, TrackingConfig
from diffseg.viz import comparison_grid, save_png, to_uint8

METHODS = ("all_foreground", "centred_box", "grabcut", "kmeans_rgb", "kmeans_ddpm", "factorized", "supervised")
METHOD_TITLES = {
    "all_foreground": "All foreground (prior)",
    "centred_box": "Centred box (prior)",
    "grabcut": "GrabCut",
    "kmeans_rgb": "k-means on RGB",
    "kmeans_ddpm": "k-means on DDPM features (DatasetDDPM-unsup)",
    "factorized": "Factorized diffusion (ours)",
    "supervised": "Supervised U-Net (upper bound)",
}


@dataclass(frozen=True)
class DatasetSpec:
    name: Name = "data"  # the data set's name in the table
    protocol: Literal["foreground", "multiclass"] = "foreground"  # binary fg/bg ground truth, or C classes
    data: DataConfig = field(default_factory=DataConfig)  # the folder, size, split (and class_merge)
    split: Literal["train", "test", "all"] = "test"  # which images are scored (num_train/num_test in data)
    factorized: str | None = None  # checkpoint of the factorized model (method "factorized")
    ddpm: str | None = None  # checkpoint of the DDPM whose features k-means clusters (method "kmeans_ddpm")
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
    output_dir: str = "runs/eval"  # where tables and figures go
    datasets: tuple[DatasetSpec, ...] = ()  # the data sets (rows are grouped by data set)
    methods: tuple[str, ...] = ("all_foreground", "centred_box", "grabcut", "kmeans_ddpm", "factorized")  # columns
    segment: SegmentSection = field(default_factory=SegmentSection)  # the factorized model's segmentation
    grabcut: GrabCutSection = field(default_factory=GrabCutSection)
    centred_box: BoxSection = field(default_factory=BoxSection)
    kmeans: KMeansSection = field(default_factory=KMeansSection)
    supervised: SupervisedSection = field(default_factory=SupervisedSection)
    foreground: ForegroundSection = field(default_factory=ForegroundSection)
    num_figure_images: int = 8  # rows of the image | ground truth | methods figure (0 = no figure)
    device: str = "cpu"  # torch device for the networks
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # MLflow


# ---------------------------------------------------------------------------------------------------- data
@dataclass
class EvalData:
    """The scored images of one data set, held in memory (test sets of hundreds of small images)."""

    spec: DatasetSpec
    images: torch.Tensor  # (N, 3, H, W) in [-1, 1]
    masks: torch.Tensor  # (N, H, W) long ground truth
    ids: list[str]
    class_names: list[str]
    ignore_index: int


def load_eval_data(spec: DatasetSpec) -> EvalData:
    dataset = build_dataset(spec.data, split=spec.split)
    n = len(dataset) if not spec.limit else min(spec.limit, len(dataset))
    if n == 0:
        raise ValueError(f"data set {spec.name!r}: split {spec.split!r} is empty (set data.num_train/num_test)")
    items = [dataset[i] for i in range(n)]
    if "mask" not in items[0]:
        raise ValueError(f"data set {spec.name!r}: no ground-truth masks under {spec.data.root}")
    names = list(getattr(dataset, "class_names", None) or [])
    if not names:
        from diffseg.data import SYNTHETIC_CLASSES

        names = SYNTHETIC_CLASSES
    return EvalData(
        spec=spec,
        images=torch.stack([it["image"] for it in items]),
        masks=torch.stack([it["mask"] for it in items]),
        ids=[str(it["id"]) for it in items],
        class_names=names,
        ignore_index=int(getattr(dataset, "ignore_index", 255)),
    )


def binary_ground_truth(data: EvalData) -> np.ndarray:
    """0 background, 1 foreground (any non-background class), ignore_index kept."""
    m = data.masks.numpy()
    return np.where(m == data.ignore_index, data.ignore_index, (m != 0).astype(np.int64))


# ---------------------------------------------------------------------------------------------------- methods
@dataclass
class Prediction:
    labels: np.ndarray  # (N, H, W) int64 region / class indices
    num_regions: int  # K: the label range
    kind: Literal["regions", "classes"] = "regions"  # unsupervised regions (matched) or class labels (not matched)
    seconds: float = 0.0  # wall time of the method on the scored images
    info: dict[str, Any] = field(default_factory=dict)  # what the row was computed with (steps, size, ...)


def _load_diffusion(ckpt) -> GaussianDiffusion:
    from diffseg.config import from_dict

    cfg = from_dict(DiffusionConfig, ckpt.config.get("diffusion", {}), "diffusion")
    return GaussianDiffusion.from_config(cfg)


def _num_regions(cfg: EvalConfig, data: EvalData) -> int:
    if data.spec.num_regions:
        return data.spec.num_regions
    if data.spec.factorized:
        from diffseg.checkpoint import load_checkpoint

        return load_checkpoint(data.spec.factorized).model_config.factorized.num_components
    return 2 if data.spec.protocol == "foreground" else len(data.class_names)


def _need(path: str | None, method: str, data: EvalData, key: str) -> str:
    if not path:
        raise ValueError(f"method {method!r} on data set {data.spec.name!r} needs a checkpoint: set {key}")
    return path


def predict_all_foreground(cfg: EvalConfig, data: EvalData) -> Prediction:
    n, _, h, w = data.images.shape
    return Prediction(baselines.all_foreground((n, h, w)).astype(np.int64), 2)


def predict_centred_box(cfg: EvalConfig, data: EvalData) -> Prediction:
    n, _, h, w = data.images.shape
    margin = cfg.centred_box.margin
    return Prediction(baselines.centred_box((n, h, w), margin).astype(np.int64), 2, info={"margin": margin})


def predict_grabcut(cfg: EvalConfig, data: EvalData) -> Prediction:
    g = cfg.grabcut
    imgs = to_uint8(data.images)  # (N, H, W, 3)
    labels = np.stack([baselines.grabcut(img, g.margin, g.iterations, g.seed) for img in imgs]).astype(np.int64)
    return Prediction(labels, 2, info={"margin": g.margin, "iterations": g.iterations})


def _kmeans_fit_predict(cfg: EvalConfig, feats: torch.Tensor, k: int) -> np.ndarray:
    """(N, D, H, W) features -> (N, H, W) cluster maps, one k-means over the data set or one per image."""
    km_cfg = cfg.kmeans
    if km_cfg.scope == "image":
        return np.stack(
            [
                baselines.kmeans_segment(f, k, seed=km_cfg.seed, num_iters=km_cfg.num_iters, normalize=km_cfg.normalize)
                for f in feats
            ]
        )
    pixels = baselines.feature_pixels(feats)  # (N*H*W, D)
    if pixels.shape[0] > km_cfg.fit_pixels:
        gen = torch.Generator().manual_seed(km_cfg.seed)
        pixels = pixels[torch.randperm(pixels.shape[0], generator=gen)[: km_cfg.fit_pixels]]
    km = baselines.KMeans(k, num_iters=km_cfg.num_iters, seed=km_cfg.seed, normalize=km_cfg.normalize).fit(pixels)
    return np.concatenate([km.predict_map(feats[i : i + 64]) for i in range(0, len(feats), 64)])


def predict_kmeans_rgb(cfg: EvalConfig, data: EvalData) -> Prediction:
    k = _num_regions(cfg, data)
    return Prediction(_kmeans_fit_predict(cfg, data.images.float(), k), k, info={"k": k, "scope": cfg.kmeans.scope})


def predict_kmeans_ddpm(cfg: EvalConfig, data: EvalData) -> Prediction:
    from diffseg.checkpoint import load_model
    from diffseg.features import extract, shared_noise

    path = _need(data.spec.ddpm, "kmeans_ddpm", data, "datasets[].ddpm")
    model, ckpt = load_model(path, use_ema=True, map_location=cfg.device)
    diffusion = _load_diffusion(ckpt)
    km_cfg = cfg.kmeans
    size = model.cfg.image_size
    images = data.images.float()
    h, w = images.shape[-2:]
    noise = shared_noise((images.shape[1], size, size), km_cfg.noise_seed)
    feats = []
    for i in range(0, len(images), km_cfg.batch_size):
        x = images[i : i + km_cfg.batch_size]
        if (h, w) != (size, size):
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        f = extract(model, diffusion, x.to(cfg.device), km_cfg.blocks, km_cfg.timesteps, noise).cpu()
        if (h, w) != (size, size):
            f = torch.nn.functional.interpolate(f, size=(h, w), mode="bilinear", align_corners=False)
        feats.append(f)
    feats = torch.cat(feats)  # (N, D, H, W)
    k = _num_regions(cfg, data)
    info = {
        "k": k,
        "ddpm": path,
        "ddpm_step": ckpt.step,
        "blocks": list(km_cfg.blocks),
        "timesteps": list(km_cfg.timesteps),
        "feature_dim": int(feats.shape[1]),
        "scope": km_cfg.scope,
    }
    return Prediction(_kmeans_fit_predict(cfg, feats, k), k, info=info)


def predict_factorized(cfg: EvalConfig, data: EvalData) -> Prediction:
    from diffseg.checkpoint import load_model
    from diffseg.segment import image_generators, segment_images

    path = _need(data.spec.factorized, "factorized", data, "datasets[].factorized")
    model, ckpt = load_model(path, use_ema=cfg.segment.use_ema, map_location=cfg.device)
    if model.cfg.num_classes is not None:
        raise ValueError(f"{path}: a class-conditional model needs labels to segment; use an unconditional one")
    diffusion = _load_diffusion(ckpt)
    s = cfg.segment
    labels = []
    for i in range(0, len(data.images), s.batch_size):
        x = data.images[i : i + s.batch_size]
        gens = image_generators(s.seed, range(i, i + len(x)))
        labels.append(segment_images(model, diffusion, x, t=s.t, generator=gens)["labels"].cpu().numpy())
    k = model.num_components
    info = {"K": k, "t": s.t, "checkpoint": path, "train_step": ckpt.step, "image_size": model.cfg.image_size}
    return Prediction(np.concatenate(labels).astype(np.int64), k, info=info)


def predict_supervised(cfg: EvalConfig, data: EvalData) -> Prediction:
    from diffseg.unet import UNetConfig

    s = cfg.supervised
    train_spec = DatasetSpec(**{**data.spec.__dict__, "split": "train", "limit": 0})
    train = load_eval_data(train_spec)
    if data.spec.protocol == "foreground":
        y, num_classes = torch.from_numpy(binary_ground_truth(train)), 2
    else:
        y, num_classes = train.masks, len(train.class_names)
    size = train.images.shape[-1]
    ucfg = UNetConfig(
        image_size=size, model_channels=s.model_channels, channel_mult=(1, 2, 2), attention_resolutions=()
    )
    model = baselines.train_supervised_unet(
        train.images, y, num_classes, ucfg, steps=s.steps, batch_size=s.batch_size, lr=s.lr,
        ignore_index=data.ignore_index, seed=s.seed, device=cfg.device,
    )  # fmt: skip
    labels = baselines.predict_supervised(model, data.images).numpy().astype(np.int64)
    info = {"train_images": len(train.images), "steps": s.steps, "batch_size": s.batch_size}
    return Prediction(labels, num_classes, kind="classes", info=info)


PREDICTORS = {
    "all_foreground": predict_all_foreground,
    "centred_box": predict_centred_box,
    "grabcut": predict_grabcut,
    "kmeans_rgb": predict_kmeans_rgb,
    "kmeans_ddpm": predict_kmeans_ddpm,
    "factorized": predict_factorized,
    "supervised": predict_supervised,
}


# ---------------------------------------------------------------------------------------------------- scoring
def score(cfg: EvalConfig, data: EvalData, pred: Prediction) -> dict[str, float]:
    """The table's numbers for one method on one data set (fractions in [0, 1])."""
    ignore = data.ignore_index
    if data.spec.protocol == "foreground":
        gt = binary_ground_truth(data)
        if pred.kind == "classes":  # a supervised fg/bg prediction: class 1 is foreground, no polarity search
            s = foreground_scores(pred.labels, gt, "fixed", num_regions=2, fg_regions=(1,), ignore_index=ignore)
            return {"acc": s.acc, "iou": s.iou, "dice": s.dice, "iou_strict": s.iou}
        k = max(pred.num_regions, 2)
        reduction = cfg.foreground.reduction
        s = foreground_scores(pred.labels, gt, reduction, num_regions=k, ignore_index=ignore)
        out = {"acc": s.acc, "iou": s.iou, "dice": s.dice}
        if cfg.foreground.strict:
            strict = foreground_scores(pred.labels, gt, "fixed", num_regions=k, ignore_index=ignore)
            out["iou_strict"] = strict.iou
        out["dependence"] = mask_image_dependence(pred.labels)
        return out
    c = len(data.class_names)
    gt = data.masks.numpy()
    names = data.class_names
    if pred.kind == "classes":
        cm = ConfusionMatrix(c, ignore).update(pred.labels, gt)
        iou = cm.iou()
        out = {"miou": cm.miou(), "miou_per_image_match": cm.miou()}
    else:
        k = pred.num_regions
        res = HungarianIoU(k, c, per_image=False, ignore_index=ignore).update(pred.labels, gt).compute()
        per_image = HungarianIoU(k, c, per_image=True, ignore_index=ignore).update(pred.labels, gt).compute()
        iou = res.iou
        out = {"miou": res.miou, "miou_per_image_match": per_image.miou}
    out["dependence"] = mask_image_dependence(pred.labels)
    for name, v in zip(names, iou):
        out[f"iou_{name}"] = float(v)
    return out


# ---------------------------------------------------------------------------------------------------- table
def columns(protocol: str, class_names: list[str], strict: bool = True) -> list[tuple[str, str]]:
    """(key, header) of the table columns for a protocol."""
    if protocol == "foreground":
        cols = [("acc", "Acc"), ("iou", "IoU"), ("dice", "DICE")]
        return cols + ([("iou_strict", "IoU (fixed fg)")] if strict else []) + [("dependence", "Image dep.")]
    cols = [("miou", "mIoU"), ("miou_per_image_match", "mIoU (per-image match)")]
    return cols + [(f"iou_{n}", f"IoU {n}") for n in class_names] + [("dependence", "Image dep.")]


def _fmt(v: Any, key: str = "") -> str:
    """Scores in %; the image dependence (`metrics.mask_image_dependence`, a share in [0, 1]) as it is."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.2f}" if key == "dependence" else f"{100 * v:.1f}"


def render_markdown(rows: list[dict[str, Any]], cfg: EvalConfig) -> str:
    """One Markdown table per protocol (the columns differ), rows grouped by data set; numbers in %."""
    out = []
    for protocol in ("foreground", "multiclass"):
        prow = [r for r in rows if r["protocol"] == protocol]
        if not prow:
            continue
        names: list[str] = []
        for r in prow:
            names += [n for n in r.get("class_names", []) if n not in names]
        cols = columns(protocol, names, cfg.foreground.strict)
        head = ["Data set", "Method", *[h for _, h in cols], "N", "s"]
        out.append(f"**{protocol}** protocol (scores in %; image dependence: across-image variance share, 0-1)\n")
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|")
        for r in prow:
            vals = [_fmt(r["metrics"].get(k), k) for k, _ in cols]
            out.append(f"| {r['dataset']} | {METHOD_TITLES.get(r['method'], r['method'])} | " + " | ".join(vals)
                       + f" | {r['num_images']} | {r['seconds']:.1f} |")  # fmt: skip
        out.append("")
    return "\n".join(out)


def render_csv(rows: list[dict[str, Any]]) -> str:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r["metrics"] if k not in keys]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["dataset", "protocol", "method", *keys, "num_images", "seconds"])
    for r in rows:
        vals = [r["metrics"].get(k, "") for k in keys]
        vals = ["" if isinstance(v, float) and math.isnan(v) else (f"{v:.6f}" if isinstance(v, float) else v)
                for v in vals]  # fmt: skip
        writer.writerow([r["dataset"], r["protocol"], r["method"], *vals, r["num_images"], f"{r['seconds']:.2f}"])
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------- driver
def evaluate(cfg: EvalConfig, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Run every method on every data set; write table.md, table.csv, results.json and figures under out_dir."""
    unknown = sorted(set(cfg.methods) - set(PREDICTORS))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {sorted(PREDICTORS)}")
    if not cfg.datasets:
        raise ValueError("no data sets to evaluate: set datasets in the config")
    out = Path(out_dir or job_dir(cfg.output_dir, cfg.name))
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    tracker = Tracker(cfg.tracking, cfg.name)
    tracker.log_params(to_dict(cfg))
    rows: list[dict[str, Any]] = []
    figures = []
    try:
        for spec in cfg.datasets:
            data = load_eval_data(spec)
            print(f"[evaluate] {spec.name}: {len(data.images)} images ({spec.split}), protocol {spec.protocol}")
            preds: dict[str, Prediction] = {}
            for method in cfg.methods:
                t0 = time.perf_counter()
                pred = PREDICTORS[method](cfg, data)
                pred.seconds = time.perf_counter() - t0
                preds[method] = pred
                metrics = score(cfg, data, pred)
                rows.append({
                    "dataset": spec.name, "protocol": spec.protocol, "method": method, "metrics": metrics,
                    "num_images": len(data.images), "seconds": pred.seconds, "info": pred.info,
                    "class_names": data.class_names if spec.protocol == "multiclass" else [],
                })  # fmt: skip
                shown = ", ".join(
                    f"{k} {100 * v:.1f}" for k, v in metrics.items() if not k.startswith("iou_") or k == "iou_strict"
                )
                print(f"[evaluate]   {method:15s} {shown}  ({pred.seconds:.1f}s)", flush=True)
                tracker.log_metrics({f"{spec.name}/{method}/{k}": v for k, v in metrics.items() if np.isfinite(v)})
            if cfg.num_figure_images:
                n = min(cfg.num_figure_images, len(data.images))
                gt = binary_ground_truth(data) if spec.protocol == "foreground" else data.masks.numpy()
                gt_classes = 2 if spec.protocol == "foreground" else len(data.class_names)
                fig = comparison_grid(
                    data.images[:n], gt[:n], [preds[m].labels[:n] for m in cfg.methods],
                    [preds[m].num_regions for m in cfg.methods], gt_classes,
                )  # fmt: skip
                path = save_png(fig, out / "figures" / f"{spec.name}.png")
                (out / "figures" / f"{spec.name}.txt").write_text(
                    "columns: image | ground truth | " + " | ".join(cfg.methods) + "\n"
                )
                figures.append(path)
        md, table_csv = render_markdown(rows, cfg), render_csv(rows)
        (out / "table.md").write_text(md)
        (out / "table.csv").write_text(table_csv)
        (out / "results.json").write_text(json.dumps(rows, indent=1, default=str))
        for path in [out / "table.md", out / "table.csv", out / "results.json", out / "config.yaml", *figures]:
            tracker.log_artifact(path, "figures" if path.suffix == ".png" else None)
        tracker.finish()
    except BaseException:
        tracker.finish("FAILED")
        raise
    print(md)
    print(f"[evaluate] table -> {out / 'table.md'}, {out / 'table.csv'}; figures -> {out / 'figures'}")
    return {"rows": rows, "markdown": md, "csv": table_csv, "out_dir": str(out), "mlflow_run_id": tracker.run_id}
