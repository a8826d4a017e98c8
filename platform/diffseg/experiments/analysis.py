"""Which blocks and timesteps carry the semantics: the paper's Figure 2 and Figure 4, for any backbone and data set.

    Figure 2  one pixel MLP per (decoder block, timestep) cell, trained on that cell's features alone on the labelled
              images and scored by test mIoU (pooled) -> a block x timestep heatmap (heatmap.png, grid.json)
    Figure 4  k-means (k clusters) of each cell's features on a few images -> cluster maps, one row per cell
              (kmeans.png)

The U-Net runs once per timestep and image batch, and all requested blocks are read from that one forward. The
features of ONE timestep for the labelled images (and then for the test images) are held in memory at a time: this
is an analysis at modest sizes (tens of labelled images, test_limit test images), not the streamed production path.
The per-cell MLP uses the same trainer (and stopping rule) as the ensemble, with `members` members (default 1).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffseg.core.config import Name, OutputPath
from diffseg.core.runtime import resolve_device
from diffseg.core.tracking import TrackingConfig, start_job
from diffseg.core.viz import colorize, grid, save_png, to_uint8
from diffseg.data.datasets import DataConfig, build_dataset, stack
from diffseg.data.shard_reader import MemoryShardSet
from diffseg.evaluation.baselines import kmeans_segment
from diffseg.methods.features import BackboneSpec, FeatureConfig, FeaturePipeline, drop_small_annotations, load_backbone
from diffseg.methods.pixel import predict_pixels
from diffseg.methods.pixel_training import PixelTrainConfig, train_ensemble
from diffseg.scoring.metrics import ConfusionMatrix

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnalysisConfig:
    name: Name = "analysis"
    output_dir: OutputPath = "runs/analysis"  # figures and tables
    backbone: BackboneSpec = ""  # checkpoint path, random:<ckpt> or diffusers:<dir>
    blocks: tuple[str, ...] = ()  # cells' blocks; empty = every decoder block (dec.N / up.N)
    timesteps: tuple[int, ...] = (50, 150, 250, 500, 800)  # cells' timesteps
    noise_seed: int = 0
    train_data: DataConfig = field(default_factory=DataConfig)  # labelled images: split "train"
    train_limit: int = 20
    min_class_pixels: int = 0  # per labelled image, a class with fewer pixels is ignored (0 = off; the reference: 20)
    test_data: DataConfig = field(default_factory=DataConfig)  # split "test"
    test_limit: int = 50
    train: PixelTrainConfig = field(default_factory=lambda: PixelTrainConfig(members=1))  # one MLP per cell
    kmeans_k: int = 5  # clusters for Figure 4
    kmeans_images: int = 4  # images shown in Figure 4
    batch_size: int = 8
    device: str = "auto"
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def check(self) -> None:
        """Cross-field checks (run by --dry-run and before the job)."""
        if not self.backbone:
            raise ValueError("backbone: a checkpoint (or random:<ckpt>, diffusers:<dir>) is required")
        if not self.timesteps:
            raise ValueError("timesteps: at least one timestep is required")


@torch.no_grad()
def block_features(pipe: FeaturePipeline, images: torch.Tensor, t: int, batch_size: int) -> dict[str, torch.Tensor]:
    """{block: (N, C, H, W) float16} at timestep t for every block of the pipeline's recipe: the one feature
    extraction (`FeaturePipeline`, one forward per batch for all blocks), split back into its blocks."""
    one_t = FeaturePipeline(dataclasses.replace(pipe.cfg, timesteps=(t,)), pipe.device, pipe.model, pipe.diffusion)
    widths = [pipe.model.feature_channels(b) for b in pipe.cfg.blocks]  # concatenation order: blocks within t
    out: dict[str, list[torch.Tensor]] = {b: [] for b in pipe.cfg.blocks}
    for s in range(0, len(images), batch_size):
        feats = one_t(images[s : s + batch_size])  # (b, sum(widths), H, W)
        for b, f in zip(pipe.cfg.blocks, feats.split(widths, dim=1)):
            out[b].append(f.half().cpu())
    return {b: torch.cat(v) for b, v in out.items()}


def _pixels(f: torch.Tensor) -> np.ndarray:
    return f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]).numpy()


def heatmap_png(grid: np.ndarray, rows: list[str], cols: list[int], path: Path, title: str) -> None:
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend (a notebook's inline) alone

    fig = Figure(figsize=(1.2 + 0.9 * len(cols), 1.0 + 0.45 * len(rows)))
    ax = fig.add_subplot()
    im = ax.imshow(100 * grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), [str(c) for c in cols])
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("timestep t")
    ax.set_ylabel("decoder block")
    for i in range(len(rows)):
        for j in range(len(cols)):
            ax.text(j, i, f"{100 * grid[i, j]:.1f}", ha="center", va="center", color="w", fontsize=7)
    fig.colorbar(im, ax=ax, label="mIoU (%)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_analysis(cfg: AnalysisConfig) -> dict[str, Any]:
    out, tracker = start_job(cfg)
    device = resolve_device(cfg.device)
    model, diffusion = load_backbone(cfg.backbone, device)
    blocks = tuple(cfg.blocks) or tuple(n for n in model.feature_names if n.startswith(("dec.", "up.")))
    fcfg = FeatureConfig(
        backbone=cfg.backbone, blocks=blocks, timesteps=tuple(cfg.timesteps), noise_seed=cfg.noise_seed
    )
    pipe = FeaturePipeline(fcfg, device, model=model, diffusion=diffusion)
    size = pipe.image_size
    train = build_dataset(dataclasses.replace(cfg.train_data, flip=False, image_size=size), "train")
    test = build_dataset(dataclasses.replace(cfg.test_data, flip=False, image_size=size), "test")
    names = list(train.class_names)
    k, ignore = len(names), train.ignore_index
    tr, te = stack(train, cfg.train_limit), stack(test, cfg.test_limit or None)
    ytr = drop_small_annotations(tr["mask"].numpy(), cfg.min_class_pixels, ignore).reshape(-1)
    keep = ytr != ignore
    grid_miou = np.full((len(blocks), len(cfg.timesteps)), np.nan)
    km_rows: list[np.ndarray] = []
    shown = te["image"][: cfg.kmeans_images]
    for j, t in enumerate(cfg.timesteps):
        ftr = block_features(pipe, tr["image"], t, cfg.batch_size)
        fte = block_features(pipe, te["image"], t, cfg.batch_size)
        for i, b in enumerate(blocks):
            x = _pixels(ftr[b])[keep]
            ens, _ = train_ensemble(MemoryShardSet(x, ytr[keep]), k, cfg.train, device)
            labels, _, _ = predict_pixels(ens, torch.from_numpy(_pixels(fte[b])))
            cm = ConfusionMatrix(k, ignore).update(labels.reshape(te["mask"].shape).numpy(), te["mask"].numpy())
            grid_miou[i, j] = cm.miou()
            tracker.log_metrics({f"analysis/{b}/t{t}/miou": cm.miou()})
            log.info(f"[analysis] {b} t={t}: mIoU {100 * cm.miou():.1f}")
            maps = [kmeans_segment(fte[b][n].float(), cfg.kmeans_k, seed=0) for n in range(len(shown))]
            km_rows.append(np.concatenate([colorize(m, cfg.kmeans_k) for m in maps], axis=1))
        del ftr, fte
    rows = list(blocks)
    (out / "grid.json").write_text(
        json.dumps({"blocks": rows, "timesteps": list(cfg.timesteps), "miou": grid_miou.tolist()}, indent=1)
    )
    heatmap_png(grid_miou, rows, list(cfg.timesteps), out / "heatmap.png", f"{cfg.backbone}: one MLP per cell")
    # Figure 4: header row = the images, then one row per (timestep, block) cell in the loop order
    header = np.concatenate(list(to_uint8(shown)), axis=1)
    save_png(grid([header, *km_rows], nrow=1), out / "kmeans.png")
    (out / "kmeans_rows.txt").write_text("images\n" + "".join(f"{b} t={t}\n" for t in cfg.timesteps for b in blocks))
    for name in ("heatmap.png", "kmeans.png", "grid.json"):
        tracker.log_artifact(out / name)
    tracker.finish()
    best = np.unravel_index(np.nanargmax(grid_miou), grid_miou.shape)
    log.info(f"[analysis] best cell {rows[best[0]]} t={cfg.timesteps[best[1]]}: {100 * grid_miou[best]:.1f} -> {out}")
    return {"blocks": rows, "timesteps": list(cfg.timesteps), "miou": grid_miou.tolist(), "out": str(out)}
