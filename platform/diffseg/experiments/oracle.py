"""The oracle-mask experiment: does the denoising loss reward semantic masks yet, at this scale?

The factorized network is trained several times with the SAME initial weights, data order, flips, timesteps and noise;
the only difference between the arms is where its masks come from:

    learned                the mask generator (the method itself)
    ground_truth           the image's ground-truth mask, one-hot (K = 2 for figure/ground, else the classes)
    band                   a fixed horizontal band (rows [band_rows) of the image) against the rest: position only
    uniform                1/K everywhere (a plain DDPM with the decoder's input scaled)
    shuffled_ground_truth  another image's ground truth (shape statistics without the image's own layout)

Then every arm's denoising error (eps-MSE) is measured on held-out images at fixed timesteps, with the same (paired)
noise for every arm, and each arm is compared with the reference arm (default: band) by the relative difference of
the mean eps-MSE, with a bootstrap 95% interval over images. If ground_truth does not beat band at low t, the loss
does not (yet) reward masks that follow objects at this scale, and no mask generator can be expected to find them.
`docs/factorized.md` reads the numbers.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from diffseg.core.config import ConfigPath, Name, OutputPath, find_config, job_dir, load_config, save_config, to_dict
from diffseg.core.runtime import image_generators, resolve_device
from diffseg.core.tracking import Tracker, TrackingConfig, status_for
from diffseg.data.datasets import build_dataset, stack
from diffseg.models.diffusion import randn
from diffseg.training.batches import build_batches
from diffseg.training.config import TrainConfig
from diffseg.training.loop import build_train_state, step_generator, train_step

log = logging.getLogger(__name__)

Arm = Literal["learned", "ground_truth", "band", "uniform", "shuffled_ground_truth"]
ARMS: tuple[str, ...] = ("learned", "ground_truth", "band", "uniform", "shuffled_ground_truth")


@dataclass(frozen=True)
class OracleConfig:
    name: Name = "oracle"  # the folder under output_dir and the MLflow run name
    output_dir: OutputPath = "runs/oracle"  # where the table, results.json and the figure go
    train_config: ConfigPath = "factorized_horse32.yaml"  # the factorized TrainConfig (model, data WITH masks, recipe)
    train_overrides: tuple[str, ...] = ()  # `key=value` overrides of it
    arms: tuple[Arm, ...] = ARMS  # which mask sources to train
    reference: Arm = "band"  # the arm every other one is compared with
    num_steps: int = 2000  # training steps of every arm (equal compute)
    batch_size: int = 16  # batch of every arm
    band_rows: tuple[float, float] = (0.25, 0.625)  # the band, as fractions of the height (rows 8-19 at 32 px)
    timesteps: tuple[int, ...] = (10, 30, 100, 300, 600, 900)  # where the held-out eps-MSE is measured
    test_split: Literal["train", "test", "all"] = "test"  # the held-out images (of the training config's data)
    num_test: int = 0  # the first N held-out images (0 = all)
    num_bootstrap: int = 2000  # bootstrap resamples of the images for the intervals
    seed: int = 0  # initial weights, data order, timesteps, noise (the same for every arm)
    device: str = "auto"  # torch device (auto = CUDA when there is one)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # MLflow

    def check(self) -> None:
        """Cross-field checks (run by --dry-run and before the job)."""
        if not find_config(self.train_config).is_file():
            raise ValueError(f"train_config: {self.train_config} is not a file (nor in jobs/configs)")
        if self.reference not in self.arms:
            raise ValueError(f"reference: {self.reference!r} is not among arms {list(self.arms)}")
        if not 0 <= self.band_rows[0] < self.band_rows[1] <= 1:
            raise ValueError(f"band_rows: {list(self.band_rows)} is not a band [start, end) of fractions in [0, 1]")
        if not self.timesteps:
            raise ValueError("timesteps: at least one t to measure the held-out eps-MSE at")


def num_components(arm: str, num_classes: int, cfg: TrainConfig) -> int:
    """K of an arm: the ground-truth arms have one region per class, band and uniform two, learned the config's."""
    if arm in ("ground_truth", "shuffled_ground_truth"):
        return num_classes
    if arm in ("band", "uniform"):
        return 2
    return cfg.model.factorized.num_components


def fixed_masks(arm: str, gt: torch.Tensor, num_classes: int, band_rows: tuple[float, float]) -> torch.Tensor | None:
    """The arm's masks (B, K, H, W) for a batch whose ground truth is gt (B, H, W); None for the learned arm.
    Ignored ground-truth pixels (255) count as class 0."""
    b, h, w = gt.shape
    if arm == "learned":
        return None
    if arm in ("ground_truth", "shuffled_ground_truth"):
        labels = torch.where((gt >= 0) & (gt < num_classes), gt, torch.zeros_like(gt))
        if arm == "shuffled_ground_truth":
            labels = labels.roll(1, dims=0)  # image i gets image i-1's mask
        return torch.nn.functional.one_hot(labels, num_classes).permute(0, 3, 1, 2).float()  # (B, K, H, W)
    if arm == "band":
        band = torch.zeros(h, w)
        band[round(band_rows[0] * h) : round(band_rows[1] * h)] = 1
        return torch.stack([1 - band, band])[None].expand(b, -1, -1, -1).clone()  # (B, 2, H, W)
    if arm == "uniform":
        return torch.full((b, 2, h, w), 0.5)
    raise ValueError(f"unknown arm {arm!r}; known: {list(ARMS)}")


def _with_masks(batches: Iterator[dict], arm: str, num_classes: int, band_rows) -> Iterator[dict]:
    for batch in batches:
        masks = fixed_masks(arm, batch["mask"], num_classes, band_rows) if "mask" in batch else None
        if arm != "learned" and masks is None:
            raise ValueError(f"arm {arm!r} needs ground-truth masks in the training data (data.root/masks)")
        yield batch if masks is None else {**batch, "fixed_masks": masks}


@torch.no_grad()
def held_out_mse(state, arm: str, images: torch.Tensor, gt: torch.Tensor, num_classes: int, cfg: OracleConfig):
    """Per-image eps-MSE (N,) at each of cfg.timesteps, image i's noise from its own generator (paired across arms)."""
    model = state.ema.model.eval()
    device = state.device
    out = {}
    for t in cfg.timesteps:
        errs = []
        for i in range(0, len(images), 32):
            idx = range(i, min(i + 32, len(images)))
            x0 = images[i : idx.stop]
            noise = randn(x0.shape, image_generators(cfg.seed + 7919 * t, idx), "cpu")
            steps = torch.full((len(x0),), t, dtype=torch.long)
            x_t = state.diffusion.q_sample(x0, steps, noise)
            masks = fixed_masks(arm, gt[i : idx.stop], num_classes, cfg.band_rows)
            kwargs = {} if masks is None else {"masks": masks.to(device)}
            eps = model(x_t.to(device), steps.to(device), **kwargs).float().cpu()
            errs.append(((eps - noise) ** 2).mean(dim=(1, 2, 3)))
        out[t] = torch.cat(errs).numpy()
    return out


def bootstrap_relative(a: np.ndarray, ref: np.ndarray, num: int, seed: int = 0) -> tuple[float, float, float]:
    """(mean(a) - mean(ref)) / mean(ref) and its 95% bootstrap interval, resampling the (paired) images."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(num, len(a)))
    rel = (a[idx].mean(1) - ref[idx].mean(1)) / ref[idx].mean(1)
    return float((a.mean() - ref.mean()) / ref.mean()), float(np.quantile(rel, 0.025)), float(np.quantile(rel, 0.975))


def run(cfg: OracleConfig) -> dict[str, Any]:
    """Train every arm at equal compute, measure held-out eps-MSE per t, compare with the reference arm."""
    cfg.check()
    out = job_dir(cfg.output_dir, cfg.name)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    device = resolve_device(cfg.device)
    base = load_config(TrainConfig, cfg.train_config, list(cfg.train_overrides))
    if base.model.kind != "factorized":
        raise ValueError(f"{cfg.train_config}: model.kind must be factorized")
    base = replace(base, optim=replace(base.optim, batch_size=cfg.batch_size), loop=replace(base.loop, seed=cfg.seed))
    test = build_dataset(base.data, split=cfg.test_split)
    held = stack(test, limit=cfg.num_test or None)
    if "mask" not in held:
        raise ValueError(f"{base.data.root}: the held-out images have no masks; the oracle arms need them")
    num_classes = len(getattr(test, "class_names", [])) or int(held["mask"][held["mask"] != 255].max()) + 1
    tracker = Tracker(cfg.tracking, cfg.name)
    tracker.log_config(cfg)
    results: dict[str, Any] = {}
    shared: dict[str, torch.Tensor] | None = None
    try:
        for arm in cfg.arms:
            k = num_components(arm, num_classes, base)
            arm_cfg = replace(
                base, model=replace(base.model, factorized=replace(base.model.factorized, num_components=k))
            )
            state, _ = build_train_state(arm_cfg, device)
            # Every arm starts from the same weights: K changes the mask head's shape, and with it the random draws of
            # the modules built after it, so the first arm's weights (all but the mask head) are copied into the rest.
            if shared is None:
                shared = {n: v.clone() for n, v in state.model.state_dict().items() if not n.startswith("mask_out.")}
            else:
                state.model.load_state_dict(shared, strict=False)
                state.ema.model.load_state_dict(state.model.state_dict())
            gen = step_generator(arm_cfg, 0, 0, device)
            items = build_batches(arm_cfg, 0, 1, 0, device, on_device=False)  # items with their masks
            batches = _with_masks(items, arm, num_classes, cfg.band_rows)
            t0, losses = time.perf_counter(), []
            state.model.train()
            for _ in range(cfg.num_steps):
                losses.append(float(train_step(state, next(batches), gen)))
            minutes = (time.perf_counter() - t0) / 60
            mse = held_out_mse(state, arm, held["image"], held["mask"], num_classes, cfg)
            results[arm] = {"K": k, "minutes": minutes, "final_train_loss": float(np.mean(losses[-50:])), "mse": mse}
            log.info("oracle %s: arm %s (K=%d) trained %d steps in %.1f min; held-out eps-MSE %s", cfg.name, arm, k,
                     cfg.num_steps, minutes, {t: round(float(v.mean()), 4) for t, v in mse.items()})  # fmt: skip
            tracker.log_metrics({f"oracle/{arm}/eps_mse_t{t}": float(v.mean()) for t, v in mse.items()})
        table = compare(cfg, results)
        md = render(cfg, base, table, results, len(held["image"]), str(device))
        (out / "table.md").write_text(md)
        serial = {arm: {**r, "mse": {str(t): v.tolist() for t, v in r["mse"].items()}} for arm, r in results.items()}
        (out / "results.json").write_text(json.dumps({"config": to_dict(cfg), "comparison": table, "arms": serial}))
        plot(cfg, table, out / "relative_mse.png")
        for path in (out / "table.md", out / "results.json", out / "relative_mse.png"):
            tracker.log_artifact(path)
        tracker.finish()
    except BaseException as e:
        tracker.finish(status_for(e))  # FAILED, or KILLED for an interrupt
        raise
    log.info(md)
    log.info("oracle table -> %s", out / "table.md")
    return {"table": table, "markdown": md, "out_dir": str(out), "results": results}


def compare(cfg: OracleConfig, results: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows {arm, t, mse, rel, low, high}: each arm against the reference at each t (paired images)."""
    ref = results[cfg.reference]["mse"]
    rows = []
    for arm, r in results.items():
        for t in cfg.timesteps:
            rel, lo, hi = bootstrap_relative(r["mse"][t], ref[t], cfg.num_bootstrap, cfg.seed)
            rows.append({"arm": arm, "t": t, "mse": float(r["mse"][t].mean()), "rel": rel, "low": lo, "high": hi})
    return rows


def render(cfg: OracleConfig, base: TrainConfig, table, results, num_images: int, device: str) -> str:
    head = "| arm | K | " + " | ".join(f"t={t}" for t in cfg.timesteps) + " | min |"
    lines = [
        f"Held-out eps-MSE on {num_images} images ({cfg.test_split} split of {base.data.root or base.data.name}), "
        f"each arm trained {cfg.num_steps} steps x batch {cfg.batch_size} from the same initial weights, data order, "
        f"timesteps and noise, on {device}. Cells: mean eps-MSE, and in brackets the difference from the "
        f"'{cfg.reference}' arm in % with its 95% bootstrap interval over images ({cfg.num_bootstrap} resamples); "
        "negative = lower error than the reference.\n",
        head,
        "|---|---:|" + "---:|" * len(cfg.timesteps) + "---:|",
    ]
    for arm, r in results.items():
        cells = []
        for t in cfg.timesteps:
            row = next(x for x in table if x["arm"] == arm and x["t"] == t)
            if arm == cfg.reference:
                cells.append(f"{row['mse']:.4f}")
            else:
                cells.append(f"{row['mse']:.4f} ({100 * row['rel']:+.1f}% [{100 * row['low']:+.1f}, "
                             f"{100 * row['high']:+.1f}])")  # fmt: skip
        lines.append(f"| {arm} | {r['K']} | " + " | ".join(cells) + f" | {r['minutes']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(cfg: OracleConfig, table, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in dict.fromkeys(r["arm"] for r in table):
        rows = [r for r in table if r["arm"] == arm]
        ts = [r["t"] for r in rows]
        ax.plot(ts, [100 * r["rel"] for r in rows], marker="o", label=arm)
        ax.fill_between(ts, [100 * r["low"] for r in rows], [100 * r["high"] for r in rows], alpha=0.15)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("t")
    ax.set_ylabel(f"held-out eps-MSE vs '{cfg.reference}' (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
