"""The first run a newcomer makes (`make demo`): label-efficient segmentation end to end, on a CPU, in minutes.

    1. train a tiny DDPM on the built-in synthetic scenes (no labels; the Ray-free loop, in this process)
    2. extract its decoder features at a few timesteps for a handful of LABELLED images into Parquet shards
    3. train the pixel-MLP ensemble on them: a servable bundle (`segmenter.pt`, what `serve/` loads)
    4. the same ensemble on raw RGB pixels: the baseline
    5. segment held-out images with both and score them against ground truth (the one evaluation path)
    6. a figure: image | ground truth | DDPM features | raw RGB, one row per test image

Every step is a library call a researcher can run on its own; sizes are configs (`jobs/demo.py --help`). The
synthetic scenes draw objects and background from one palette, so colour alone cannot tell the parts apart: the
raw-pixel baseline is weak by construction, and the DDPM's features (shape and context) are what segment.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffseg.core.config import OutputPath, replace, save_config
from diffseg.core.report import markdown_table
from diffseg.core.runtime import resolve_device
from diffseg.core.tracking import TrackingConfig
from diffseg.core.viz import colorize, grid, save_png, to_uint8
from diffseg.data.datasets import DataConfig, build_dataset
from diffseg.evaluation.evaluate import evaluate_segmenter
from diffseg.experiments.label_efficient import train_segmenter
from diffseg.methods.features import FeatureConfig, FeaturePipeline, extract_dataset
from diffseg.methods.pixel_training import PixelTrainConfig
from diffseg.models.builder import ModelConfig
from diffseg.models.diffusion import DiffusionConfig
from diffseg.models.unet import UNetConfig
from diffseg.scoring.segmenter import segment_dataset
from diffseg.training.config import LoopConfig, OptimConfig, TrainConfig
from diffseg.training.loop import LocalContext, fit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    output_dir: OutputPath = "runs/demo"  # everything goes here: ddpm/ (checkpoint, samples), shards/, bundles, figure
    image_size: int = 32  # side of the synthetic scenes and of the DDPM
    num_images: int = 512  # synthetic scenes the DDPM trains on (no labels used)
    ddpm_steps: int = 200  # DDPM optimizer steps (batch ddpm_batch_size): about a minute on a laptop CPU
    ddpm_batch_size: int = 16  # images per DDPM step
    model_channels: int = 32  # DDPM U-Net width (channel_mult 1,2,2, one res block per level, attention at 8 px)
    num_train: int = 16  # labelled images the ensemble learns from (the paper: 20)
    num_test: int = 24  # held-out labelled images it is scored on
    blocks: tuple[str, ...] = ("dec.2", "dec.3", "dec.4", "dec.5")  # decoder blocks read as features
    timesteps: tuple[int, ...] = (50, 150)  # diffusion steps the blocks are read at
    pixel: PixelTrainConfig = field(
        default_factory=lambda: PixelTrainConfig(members=4, max_epochs=8)
    )  # the ensemble (4 members, at most 8 epochs: a CPU budget; the paper: 10 members, up to 100 epochs)
    figure_images: int = 6  # rows of the figure
    seed: int = 0  # DDPM init and data order, noise seeds
    device: str = "auto"  # torch device: auto (cuda when visible), cpu, cuda
    num_threads: int = 1  # torch CPU threads; 1 is fastest for these tiny models (0 = torch's default)
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(enabled=False))  # MLflow for the DDPM

    def check(self) -> None:
        """Cross-field checks (run by --dry-run and before the demo)."""
        if self.num_train < 1 or self.num_test < 1:
            raise ValueError(f"num_train ({self.num_train}) and num_test ({self.num_test}) must be >= 1")
        if self.image_size % 8:
            raise ValueError(f"image_size must be a multiple of 8 (the U-Net downsamples twice), got {self.image_size}")


def ddpm_config(cfg: DemoConfig) -> TrainConfig:
    """The tiny DDPM's training config (what `jobs/train_ddpm.py` would take as YAML)."""
    unet = UNetConfig(image_size=cfg.image_size, model_channels=cfg.model_channels, num_res_blocks=1,
                      channel_mult=(1, 2, 2), attention_resolutions=(8,))  # fmt: skip
    return TrainConfig(
        name="ddpm",
        output_dir=cfg.output_dir,
        model=ModelConfig(kind="ddpm", unet=unet),
        diffusion=DiffusionConfig(num_timesteps=1000, schedule="linear"),
        data=DataConfig(name="synthetic", image_size=cfg.image_size, num_images=cfg.num_images, seed=cfg.seed),
        optim=OptimConfig(lr=1e-3, batch_size=cfg.ddpm_batch_size, ema_decay=0.99),
        loop=LoopConfig(
            num_steps=cfg.ddpm_steps,
            log_every=50,
            checkpoint_every=cfg.ddpm_steps,
            num_samples=8,
            sample_steps=20,
            seed=cfg.seed,
        ),  # fmt: skip
        tracking=cfg.tracking,
    )


def labelled_data(cfg: DemoConfig) -> DataConfig:
    """Labelled scenes that the DDPM never trained on (another scene seed): the first num_train, then num_test."""
    return DataConfig(name="synthetic", image_size=cfg.image_size, num_images=cfg.num_train + cfg.num_test,
                      seed=cfg.seed + 1, num_train=cfg.num_train, num_test=cfg.num_test)  # fmt: skip


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    t_start = time.perf_counter()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "demo_config.yaml")
    device = resolve_device(cfg.device)
    if cfg.num_threads:  # threads spinning against each other make tiny-model steps many times slower on few cores
        torch.set_num_threads(cfg.num_threads)
    times: dict[str, float] = {}

    log.info(f"== 1/4 a tiny DDPM learns the synthetic scenes ({cfg.ddpm_steps} steps, no labels) ==")
    t0 = time.perf_counter()
    trained = fit(ddpm_config(cfg), LocalContext(device))
    checkpoint = trained["checkpoint"]
    times["ddpm"] = time.perf_counter() - t0

    data = labelled_data(cfg)
    train, test = build_dataset(data, "train"), build_dataset(data, "test")
    recipes = {
        "ddpm": FeatureConfig(backbone=checkpoint, blocks=cfg.blocks, timesteps=cfg.timesteps, batch_size=8),
        "rgb": FeatureConfig(backbone="rgb", batch_size=8),
    }
    log.info(
        f"== 2/4 features of {cfg.num_train} labelled images -> shards; pixel ensembles on DDPM features and RGB =="
    )
    t0 = time.perf_counter()
    segmenters, info = {}, {}
    for name, recipe in recipes.items():
        shards = out / "shards" / name
        extract_dataset(FeaturePipeline(recipe, device), train, shards)
        seg, res = train_segmenter(shards, replace(cfg.pixel, seed=cfg.seed), device)
        seg.save(out / f"segmenter_{name}.pt")
        segmenters[name] = seg
        info[name] = {"dim": seg.ensemble.in_dim, "train_pixels": seg.extra["train_rows"], "iterations": res.iterations}
    times["ensembles"] = time.perf_counter() - t0

    log.info(f"== 3/4 segment {cfg.num_test} held-out images and score them against their ground truth ==")
    t0 = time.perf_counter()
    results = {name: evaluate_segmenter(seg, test, class_names=test.class_names) for name, seg in segmenters.items()}
    times["evaluation"] = time.perf_counter() - t0

    log.info("== 4/4 figure ==")
    n = min(cfg.figure_images, len(test))
    items = [test[i] for i in range(n)]
    k = len(test.class_names)
    preds = {name: next(segment_dataset(seg, items, batch_size=n))[2].labels for name, seg in segmenters.items()}
    tiles = []
    for i, it in enumerate(items):
        tiles += [
            to_uint8(it["image"]),
            colorize(it["mask"], k),
            colorize(preds["ddpm"][i], k),
            colorize(preds["rgb"][i], k),
        ]
    zoom = max(1, 128 // cfg.image_size)  # tiny scenes drawn large enough to see (nearest neighbour)
    tiles = [t.repeat(zoom, axis=0).repeat(zoom, axis=1) for t in tiles]
    figure = save_png(grid(tiles, nrow=4), out / "demo.png")
    (out / "demo.txt").write_text("columns: image | ground truth | MLP ensemble on DDPM features | on raw RGB\n")

    rows = []
    for name, title in (("ddpm", "pixel MLPs on DDPM features"), ("rgb", "pixel MLPs on raw RGB (baseline)")):
        m = results[name].metrics
        rows.append([title, info[name]["dim"], f"{100 * m['test/miou']:.1f}", f"{100 * m['test/pixel_accuracy']:.1f}"])
    per_class = [[c, *(f"{100 * results[n].metrics.get(f'test/iou/{c}', float('nan')):.1f}" for n in recipes)]
                 for c in test.class_names]  # fmt: skip
    table = markdown_table(["method", "input dim", "test mIoU (%)", "pixel acc (%)"], rows)
    table += "\n" + markdown_table(["class IoU (%)", "DDPM features", "raw RGB"], per_class)
    summary = {
        "miou": {n: results[n].metrics["test/miou"] for n in recipes},
        "metrics": {n: results[n].metrics for n in recipes},
        "info": info,
        "seconds": {**times, "total": time.perf_counter() - t_start},
        "checkpoint": checkpoint,
        "segmenter": str(out / "segmenter_ddpm.pt"),
        "figure": str(figure),
    }
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps(summary, indent=1, default=float))
    return {**summary, "table": table, "num_test": len(test), "image_size": cfg.image_size}
