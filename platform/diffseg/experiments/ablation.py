"""The factorized model's ablation, in the style of the paper's Table 6: variants x data sets at EQUAL compute.

    for each data set (a training config + a held-out test split with masks):
        the baselines once (all-foreground, centred box, GrabCut, k-means on RGB, k-means on DDPM features)
        for each variant (named config overrides) and seed: train `num_steps` x `batch_size` from scratch with the
            mask diagnostics every `eval_every` steps on the test split, then score the final EMA model
    -> table.md / table.csv / results.json: per row the score (foreground IoU or Hungarian mIoU), the image
       dependence of the masks (`regions.mask_image_dependence`: 0 = a fixed split), the held-out eps-MSE, the
       compute (steps, batch, minutes, device); curves.png (score and dependence against steps); masks.png
       (image | ground truth | each variant's masks on test images)

Every row gets the same data, steps, batch, seed(s) and evaluation; only the overrides differ. Scores come from
`diffseg.evaluation.evaluate` (the same protocol as the tables in docs/results). Runs are resumable: a variant whose
checkpoint already reached `num_steps` is not trained again. `parallel` trains that many variants at once in separate
processes (one torch thread each on a CPU; on one GPU several small models share it). Nothing here imports Ray or needs
MLflow (tracking is optional), so the same command runs on a bare GPU box.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing as mp
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffseg.core.config import ConfigPath, Name, OutputPath, find_config, job_dir, load_config, save_config, to_dict
from diffseg.core.runtime import resolve_device, setup_logging
from diffseg.core.tracking import Tracker, TrackingConfig, prepare_store
from diffseg.core.viz import comparison_grid, save_png
from diffseg.evaluation.evaluate import METHODS, DatasetSpec, EvalConfig, evaluate, load_eval_data
from diffseg.methods.segment import FactorizedSegmenter
from diffseg.models.checkpoint import CHECKPOINT_NAME, load_checkpoint
from diffseg.training.config import TrainConfig
from diffseg.training.loop import LocalContext, fit

log = logging.getLogger(__name__)

BASELINES = ("all_foreground", "centred_box", "grabcut", "kmeans_rgb", "kmeans_ddpm")


@dataclass(frozen=True)
class Variant:
    name: Name = "paper"  # the row's name (part of its run folder's name)
    overrides: tuple[str, ...] = ()  # `key.path=value` overrides of the data set's training config
    note: str = ""  # why the variant exists (shown in the table)
    num_steps: int = 0  # this row's training steps; 0 = the ablation's num_steps (a scale map gives its long rows
    # more: their diagnostics every eval_every steps are the curve against images seen)


@dataclass(frozen=True)
class AblationData:
    name: Name = "data"  # the data set's name in the table (part of its runs' folder names)
    train_config: ConfigPath = ""  # TrainConfig YAML: model size, data (WITHOUT masks in training), the paper's recipe
    train_overrides: tuple[str, ...] = ()  # overrides applied to every variant (e.g. data.root=...)
    eval: DatasetSpec = field(default_factory=DatasetSpec)  # the held-out test split with masks (+ ddpm for k-means)


@dataclass(frozen=True)
class AblationConfig:
    name: Name = "ablation"  # the folder under output_dir
    output_dir: OutputPath = "runs/ablation"  # tables, figures and one training run per (data set, variant, seed)
    datasets: tuple[AblationData, ...] = ()  # the data sets
    variants: tuple[Variant, ...] = (Variant(),)  # the rows; the first is the reference
    num_steps: int = 2000  # training steps of EVERY variant (equal compute)
    batch_size: int = 16  # batch of every variant
    seeds: tuple[int, ...] = (0,)  # one run per seed; the table shows the mean (and each seed)
    eval_every: int = 250  # steps between mask diagnostics on the test split (the curves)
    baselines: tuple[str, ...] = BASELINES  # methods scored once per data set beside the variants
    parallel: int = 1  # variants trained at once, each in its own process
    max_minutes: float = 0.0  # time box per row (0 = none); a row that hits it reports the steps it reached
    device: str = "auto"  # torch device for training and scoring (auto = CUDA when there is one)
    num_figure_images: int = 8  # test images in masks.png
    t: int = 30  # noise level the masks are read at
    eval_ts: tuple[int, ...] = ()  # more noise levels every variant's final masks are also scored at (the paper
    # sweeps the segmentation t from 0 to 60); the table's score stays the one at `t`
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # MLflow (each training run and the table)
    train: bool = True  # false = train nothing: score the rows as far as their checkpoints have got (a long map's
    # progress report while it trains; rows not started yet are left out and named)

    def check(self) -> None:
        """Cross-field checks (run by --dry-run and before the job)."""
        if not self.datasets:
            raise ValueError("datasets: the ablation needs at least one data set")
        for i, ds in enumerate(self.datasets):
            if not ds.train_config:
                raise ValueError(f"datasets[{i}].train_config: a TrainConfig YAML is required ({ds.name!r})")
            if not find_config(ds.train_config).is_file():
                raise ValueError(f"datasets[{i}].train_config: {ds.train_config} is not a file (nor in jobs/configs)")
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variants: names must be unique, got {names}")
        if not self.variants or not self.seeds:
            raise ValueError("variants, seeds: the ablation needs at least one of each")
        known = [m for m in METHODS if m != "factorized"]  # the variants are the factorized rows
        unknown = sorted(set(self.baselines) - set(known))
        if unknown:
            raise ValueError(f"baselines: {unknown} are not baselines; known: {known}")


@dataclass(frozen=True)
class RunSpec:
    dataset: str
    variant: str
    seed: int
    config: TrainConfig


def run_specs(cfg: AblationConfig) -> list[RunSpec]:
    """One training config per (data set, variant, seed): the data set's config, its overrides, the variant's,
    then what makes the compute equal (steps, batch, seed) and the diagnostics on the test split."""
    cfg.check()
    out = job_dir(cfg.output_dir, cfg.name) / "runs"
    specs = []
    for ds in cfg.datasets:
        for v in cfg.variants:
            for seed in cfg.seeds:
                overrides = [*ds.train_overrides, *v.overrides]
                train = load_config(TrainConfig, ds.train_config, overrides)
                if train.model.kind != "factorized":
                    raise ValueError(f"{ds.train_config}: model.kind must be factorized, got {train.model.kind}")
                train = replace(
                    train,
                    name=f"{ds.name}--{v.name}--s{seed}",
                    output_dir=str(out),
                    init_from=_abs(train.init_from),
                    loop=replace(
                        train.loop,
                        num_steps=v.num_steps or cfg.num_steps,
                        max_minutes=cfg.max_minutes,
                        seed=seed,
                        eval_every=cfg.eval_every,
                        # every diagnostic is also a checkpoint: a long row killed between two loses little
                        checkpoint_every=min(max((v.num_steps or cfg.num_steps) // 4, 1), cfg.eval_every or 10**9),
                        sample_every=0,
                        log_every=max(min(train.loop.log_every, (v.num_steps or cfg.num_steps) // 10), 1),
                    ),
                    optim=replace(train.optim, batch_size=cfg.batch_size),
                    eval=replace(
                        train.eval,
                        data=ds.eval.data,
                        split=ds.eval.split,
                        num_images=ds.eval.limit or 10**9,
                        protocol=ds.eval.protocol,
                        t=cfg.t,
                    ),  # fmt: skip
                    tracking=replace(cfg.tracking, experiment=f"{cfg.tracking.experiment}-{cfg.name}"),
                )
                specs.append(RunSpec(ds.name, v.name, seed, train))
    return specs


def _abs(path: str | None) -> str | None:
    return None if not path or "://" in path else str(Path(path).resolve())


def _train_one(spec: RunSpec, device: str) -> dict[str, Any]:
    """Train one row (in a worker process when parallel > 1); skipped when its checkpoint is already complete.
    The row's wall time is kept beside its checkpoint (`ablation_run.json`), so a resumed ablation still reports it."""
    dev = resolve_device(device)
    if dev.type == "cpu":
        torch.set_num_threads(1)
    if mp.parent_process() is not None:  # a pool worker (parallel > 1): its lines, named, on the job's stdout
        setup_logging(prefix=f"[{spec.variant}] ")
    run_dir = job_dir(spec.config.output_dir, spec.config.name)
    record = run_dir / "ablation_run.json"
    if (run_dir / CHECKPOINT_NAME).is_file() and record.is_file():
        done = json.loads(record.read_text())
        if done.get("step", 0) >= spec.config.loop.num_steps:
            return {**done, "name": spec.config.name, "skipped": True}
    t0 = time.perf_counter()
    summary = fit(spec.config, LocalContext(dev))
    done = {"step": summary["step"], "minutes": (time.perf_counter() - t0) / 60, "device": str(dev)}
    record.write_text(json.dumps(done))
    return {**done, "name": spec.config.name, "skipped": False}


def train_all(cfg: AblationConfig, specs: list[RunSpec]) -> dict[str, dict[str, Any]]:
    """Train every row, `parallel` at a time; returns {run name: {"minutes", "skipped"}}."""
    if cfg.parallel <= 1:
        results = [_train_one(s, cfg.device) for s in specs]
    else:
        for tracking in {s.config.tracking for s in specs}:  # the store migrated once, here, not by every worker
            prepare_store(tracking)
        with mp.get_context("spawn").Pool(cfg.parallel, maxtasksperchild=1) as pool:
            results = pool.starmap(_train_one, [(s, cfg.device) for s in specs])
    return {r["name"]: r for r in results}


def _score(cfg: AblationConfig, spec: DatasetSpec, methods: tuple[str, ...], out: Path) -> list[dict[str, Any]]:
    ecfg = EvalConfig(
        name=out.name, output_dir=str(out.parent), datasets=(spec,), methods=methods, num_figure_images=0,
        device=str(resolve_device(cfg.device)), tracking=replace(cfg.tracking, enabled=False),
        segment=replace(EvalConfig().segment, t=cfg.t),
    )  # fmt: skip
    return evaluate(ecfg, out)["rows"]


def _variant_labels(path: str, images: torch.Tensor, t: int, device: torch.device) -> tuple[np.ndarray, int]:
    """The EMA model's masks of the figure's images, with the noise `evaluate` scored them with (image i: seed
    `image_seed(0, i)`)."""
    seg = FactorizedSegmenter.load(path, device, use_ema=True, t=t)
    return seg.segment(images).labels.numpy(), len(seg.class_names)


def run(cfg: AblationConfig) -> dict[str, Any]:
    """Train every variant, score them beside the baselines, write the table and figures; returns the rows."""
    out = job_dir(cfg.output_dir, cfg.name)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    specs = run_specs(cfg)
    device = resolve_device(cfg.device)
    log.info("ablation %s: %d runs (%d data sets x %d variants x %d seeds), %d steps x batch %d each, on %s",
             cfg.name, len(specs), len(cfg.datasets), len(cfg.variants), len(cfg.seeds), cfg.num_steps,
             cfg.batch_size, device)  # fmt: skip
    t0 = time.perf_counter()
    if cfg.train:
        timings = train_all(cfg, specs)
    else:  # a progress report: the rows as far as they have got
        timings = {}
        started = [s for s in specs if (job_dir(s.config.output_dir, s.config.name) / CHECKPOINT_NAME).is_file()]
        if not started:
            raise ValueError(f"train=false: no row of {cfg.name!r} has a checkpoint yet under {out / 'runs'}")
        for s in specs:
            if s not in started:
                log.warning("train=false: %s has no checkpoint yet; left out of the table", s.config.name)
        specs = started
    rows: list[dict[str, Any]] = []
    for ds in cfg.datasets:
        methods = tuple(m for m in cfg.baselines if m != "kmeans_ddpm" or ds.eval.ddpm)
        if len(methods) < len(cfg.baselines):
            log.warning("%s: no eval.ddpm checkpoint, so the kmeans_ddpm baseline is left out", ds.name)
            rows.append({"dataset": ds.name, "kind": "missing", "name": "kmeans_ddpm", "metrics": {},
                         "note": "left out: no datasets[].eval.ddpm checkpoint"})  # fmt: skip
        data_rows = _score(cfg, ds.eval, methods, out / "eval" / f"{ds.name}--baselines")
        for r in data_rows:
            rows.append({"dataset": ds.name, "kind": "baseline", "name": r["method"], "metrics": r["metrics"]})
        # The clustering baselines at every other K a variant uses: k-means with k = 3 is the fair rival of a K=3 model.
        default_k = (
            2 if ds.eval.protocol == "foreground" else len(load_eval_data(replace(ds.eval, limit=1)).class_names)
        )
        clustering = tuple(m for m in methods if m.startswith("kmeans"))
        for k in sorted(
            {s.config.model.factorized.num_components for s in specs if s.dataset == ds.name} - {default_k}
        ):
            if not clustering:
                break
            spec_k = replace(ds.eval, num_regions=k)
            for r in _score(cfg, spec_k, clustering, out / "eval" / f"{ds.name}--baselines-k{k}"):
                rows.append({"dataset": ds.name, "kind": "baseline", "name": f"{r['method']} (k={k})",
                             "metrics": r["metrics"]})  # fmt: skip
        test = load_eval_data(ds.eval)
        figure_preds, figure_names = [], []
        for v in cfg.variants:
            seeds = []
            for s in [s for s in specs if s.dataset == ds.name and s.variant == v.name]:
                ckpt_path = str(job_dir(s.config.output_dir, s.config.name) / CHECKPOINT_NAME)
                ckpt = load_checkpoint(ckpt_path)
                # minutes over every (re)start of the row; older checkpoints lack them (then this invocation's)
                seconds = ckpt.extra.get("train_seconds")
                minutes = seconds / 60 if seconds else timings.get(s.config.name, {}).get("minutes", math.nan)
                scored = _score(cfg, replace(ds.eval, factorized=ckpt_path), ("factorized",),
                                out / "eval" / s.config.name)[0]["metrics"]  # fmt: skip
                by_t = {}
                for tt in cfg.eval_ts:
                    scored_t = _score(replace(cfg, t=tt), replace(ds.eval, factorized=ckpt_path), ("factorized",),
                                      out / "eval" / f"{s.config.name}--t{tt}")[0]["metrics"]  # fmt: skip
                    by_t[tt] = _row_score(scored_t)
                diag = (ckpt.extra.get("mask_diagnostics") or [{}])[-1]
                seeds.append({
                    "seed": s.seed, "metrics": scored, "eps_mse": diag.get("val/eps_mse", math.nan),
                    "curve": ckpt.extra.get("mask_diagnostics", []), "minutes": minutes,
                    "checkpoint": ckpt_path, "step": ckpt.step, "target_steps": s.config.loop.num_steps,
                    "batch_size": s.config.optim.batch_size, "by_t": by_t,
                    "restarts": ckpt.extra.get("mask_restarts", []),
                })  # fmt: skip
            if not seeds:  # train=false and no seed of this row started
                continue
            metrics = {k: float(np.mean([sd["metrics"][k] for sd in seeds])) for k in seeds[0]["metrics"]}
            rows.append({
                "dataset": ds.name, "kind": "variant", "name": v.name, "note": v.note, "overrides": list(v.overrides),
                "metrics": metrics, "eps_mse": float(np.mean([sd["eps_mse"] for sd in seeds])), "seeds": seeds,
            })  # fmt: skip
            if cfg.num_figure_images:
                n = min(cfg.num_figure_images, len(test.images))
                figure_preds.append(_variant_labels(seeds[0]["checkpoint"], test.images[:n], cfg.t, device))
                figure_names.append(v.name)
        if figure_preds:
            n = min(cfg.num_figure_images, len(test.images))
            gt = test.masks[:n].numpy()
            if ds.eval.protocol == "foreground":
                gt = np.where(gt == test.ignore_index, test.ignore_index, (gt != 0).astype(np.int64))
            fig = comparison_grid(test.images[:n], gt, [p for p, _ in figure_preds], [k for _, k in figure_preds])
            save_png(fig, out / f"masks_{ds.name}.png")
            (out / f"masks_{ds.name}.txt").write_text(
                "columns: image | ground truth | " + " | ".join(figure_names) + "\n"
            )
    minutes = (time.perf_counter() - t0) / 60
    md = render_table(cfg, rows, str(device), minutes)
    (out / "table.md").write_text(md)
    (out / "results.json").write_text(json.dumps({"config": to_dict(cfg), "rows": rows}, indent=1, default=str))
    plot_curves(rows, out / "curves.png")
    tracker = Tracker(cfg.tracking, cfg.name)
    tracker.log_config(cfg)
    for path in [out / "table.md", out / "results.json", out / "curves.png", *out.glob("masks_*.png")]:
        tracker.log_artifact(path)
    tracker.finish()
    log.info(md)
    log.info("ablation table -> %s", out / "table.md")
    return {"rows": rows, "markdown": md, "out_dir": str(out), "minutes": minutes}


SCORE_KEYS = ("fg_iou", "hungarian_miou", "miou")  # a row's score: foreground IoU, else (Hungarian-matched) mIoU


def _row_score(metrics: dict[str, float]) -> float:
    """The score of an evaluate row: foreground IoU (foreground protocol), else the Hungarian-matched mIoU of
    regions, else the mIoU of a class segmenter (multiclass protocol)."""
    return next((metrics[k] for k in SCORE_KEYS if k in metrics), math.nan)


def render_table(cfg: AblationConfig, rows: list[dict[str, Any]], device: str, minutes: float) -> str:
    """One Markdown table per data set: baselines, then variants (score, image dependence, eps-MSE, compute)."""
    boxed = any(s["step"] < s["target_steps"] for r in rows if r["kind"] == "variant" for s in r["seeds"])
    own = sorted({v.num_steps for v in cfg.variants if v.num_steps and v.num_steps != cfg.num_steps})
    lines = [
        f"Every variant: {cfg.num_steps} steps x batch {cfg.batch_size} = {cfg.num_steps * cfg.batch_size} training "
        f"images{' (rows with their own steps say so)' if own else ''}, seeds {list(cfg.seeds)}, on {device}; masks "
        f"at t={cfg.t}; total {minutes:.1f} min."
        + (" Rows short of their steps (time-boxed, or still training) say the step they reached." if boxed else "")
        + "\n"
    ]
    for ds in cfg.datasets:
        drows = [r for r in rows if r["dataset"] == ds.name]
        title = "Foreground IoU (%)" if ds.eval.protocol == "foreground" else "Hungarian mIoU (%)"
        gt_band = next((r["metrics"]["gt_band"] for r in drows if "gt_band" in r.get("metrics", {})), math.nan)
        lines += [f"**{ds.name}** ({ds.eval.protocol} protocol, {ds.eval.split} split; band share of the ground "
                  f"truth: {gt_band:.2f})\n",
                  f"| row | {title} | per seed | image dependence | band | held-out eps-MSE | min/run | what |",
                  "|---|---:|---|---:|---:|---:|---:|---|"]  # fmt: skip
        for r in drows:
            m = r["metrics"]
            dep, band = m.get("dependence", math.nan), m.get("band", math.nan)
            if r["kind"] == "missing":
                lines.append(f"| {r['name']} (baseline) | - | | | | | | {r['note']} |")
                continue
            if r["kind"] == "baseline":
                lines.append(f"| {r['name']} (baseline) | {100 * _row_score(m):.1f} | | {dep:.2f} | {band:.2f} | | | |")
                continue
            steps = min(s["step"] for s in r["seeds"])
            target = r["seeds"][0]["target_steps"]
            if steps < target:  # time-boxed, or still training: say how far it got
                why = "still training, or stopped" if not cfg.max_minutes else "stopped by max_minutes"
                r = {**r, "note": f"{r['note'] or ''} [at step {steps} of {target}: {why}]".strip()}
            elif target != cfg.num_steps:
                r = {**r, "note": f"{r['note'] or ''} [{target} steps]".strip()}
            per_seed = ", ".join(f"{100 * _row_score(s['metrics']):.1f}" for s in r["seeds"])
            mins = np.nanmean([s["minutes"] for s in r["seeds"]])
            what = r["note"] or ", ".join(r["overrides"]) or "the paper's recipe"
            if cfg.eval_ts:  # the score at the other noise levels, mean over seeds
                at = ", ".join(
                    f"t={tt}: {100 * np.mean([sd['by_t'][tt] for sd in r['seeds']]):.1f}" for tt in cfg.eval_ts
                )
                what = f"{what} [{at}]"
            if restarts := sum(len(sd.get("restarts", [])) for sd in r["seeds"]):
                what = f"{what} [mask generator restarted {restarts}x]"
            lines.append(f"| **{r['name']}** | {100 * _row_score(m):.1f} | {per_seed} | {dep:.2f} | {band:.2f} "
                         f"| {r['eps_mse']:.4f} "
                         f"| {mins:.1f} | {what} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def plot_curves(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Score, image dependence and band share of the EMA masks against training images seen (steps x batch), one line
    per variant and data set (the first seed's curve)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [r for r in rows if r["kind"] == "variant"]
    if not variants:
        return None
    datasets = sorted({r["dataset"] for r in variants})
    fig, axes = plt.subplots(3, len(datasets), figsize=(5.5 * len(datasets), 8.5), squeeze=False)
    for j, name in enumerate(datasets):
        for r in [r for r in variants if r["dataset"] == name]:
            seed = r["seeds"][0]
            curve = seed["curve"]
            if not curve:
                continue
            seen = [c["step"] * seed.get("batch_size", 1) for c in curve]
            score = next((k for k in curve[0] if k in ("val/fg_iou", "val/hungarian_miou")), None)
            axes[0, j].plot(seen, [100 * c[score] for c in curve], marker=".", label=r["name"])
            axes[1, j].plot(seen, [c["val/mask_dependence"] for c in curve], marker=".", label=r["name"])
            axes[2, j].plot(seen, [c.get("val/mask_band", math.nan) for c in curve], marker=".", label=r["name"])
        for r in [r for r in rows if r["kind"] == "baseline" and r["dataset"] == name]:  # the references, dashed
            axes[0, j].axhline(100 * _row_score(r["metrics"]), ls="--", lw=0.8, color="grey")
            axes[0, j].annotate(r["name"], (0, 100 * _row_score(r["metrics"])), xycoords=("axes fraction", "data"),
                                fontsize=6, color="grey", va="bottom")  # fmt: skip
        axes[0, j].set_title(name)
        axes[0, j].set_ylabel("score (%)")
        axes[1, j].set_ylabel("image dependence")
        axes[2, j].set_ylabel("band share (1 = horizontal bands)")
        axes[2, j].set_xlabel("training images seen")
        for ax in axes[:, j]:
            ax.set_xscale("log")  # images seen: 12.8k ... millions
            ax.grid(alpha=0.3, which="both")
        axes[0, j].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
