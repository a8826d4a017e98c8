"""Robustness to image corruptions (Baranchuk et al., ICLR 2022, Figure 6): mIoU against corruption severity.

    train the methods of a comparison on the clean labelled images (`label_efficient.train_variant`: the MLP
        ensemble on DDPM features, on random-init features of the same U-Net, and the supervised U-Net)
    for each corruption c of Hendrycks & Dietterich (ICLR 2019) and each severity s in 1..5:
        corrupt every test image at `corrupt_size` (256 px: the test images' native size, where the corruptions are
        defined), bring it to the model's size by the one resize policy (`diffseg.data.datasets.resize_images`:
        bilinear, antialiased), and score each method by the one evaluation path (`test/miou`, `test/miou_official`)
    severity 0 is the clean test images through the same path (256 px -> the one resize policy)

The corruptions come from the `imagecorruptions` package (Michaelis et al. 2019), which implements the 15 benchmark
corruptions and the 4 extra ones (speckle_noise, gaussian_blur, spatter, saturate) of Hendrycks & Dietterich. Its
PyPI release 1.1.2 (2020) no longer imports with this stack (it imports `pkg_resources`, gone from setuptools 84, and
uses `np.float_` and scikit-image's `multichannel=`, gone from NumPy 2 and scikit-image 0.19+); the maintained fork
`imagecorruptions-imaug` (same module name, same corruption definitions, numba for the slow blurs) works: all 19
run offline (frost's textures ship inside the package). It requires opencv-python, which would clash with our
opencv-python-headless, so it is installed without dependencies (`make venv` does; its other dependencies,
scikit-image and numba, are in the `test` extra). The paper reports 18 types; the default here is all 19.

Corruptions draw from NumPy's global generator, seeded per (corruption, severity, image) from `corruption_seed`, so a
run is repeatable (the numba-compiled parts of glass_blur keep their own generator).

Outputs under <output_dir>/<name>/: results.json (every method x corruption x severity), table.md (the mean over
corruptions per severity, then one corruption x severity table per method), robustness.png (mean mIoU vs severity,
then one panel per corruption), the resolved config; MLflow: one run with `robust/<method>/s<k>/miou` (mean over
corruptions), `robust/<method>/<corruption>/s<k>/miou` and the artifacts, and a child run per method (its training).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffseg.core.report import markdown_table
from diffseg.core.runtime import resolve_device
from diffseg.core.tracking import Tracker, start_job
from diffseg.core.viz import to_uint8
from diffseg.data.datasets import build_dataset, resize_images
from diffseg.evaluation.evaluate import evaluate_segmenter
from diffseg.experiments.label_efficient import LABELS, CompareConfig, machine, row_compute, train_variant
from diffseg.models.checkpoint import load_checkpoint

log = logging.getLogger(__name__)

# Hendrycks & Dietterich's 15 benchmark corruptions, then the 4 extra ones (imagecorruptions' "all").
CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur", "snow",
    "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
    "speckle_noise", "gaussian_blur", "spatter", "saturate",
)  # fmt: skip


Results = dict[str, dict[str, dict[int, dict[str, float]]]]  # method -> corruption -> severity -> metrics


@dataclass(frozen=True)
class RobustnessConfig(CompareConfig):
    """A comparison's training (every `CompareConfig` field), then its methods scored on corrupted test images."""

    name: str = "robustness"
    variants: tuple[str, ...] = ("ddpm", "random", "supervised")  # methods (rows of the comparison) to corrupt-test
    corruptions: tuple[str, ...] = CORRUPTIONS  # corruption types (imagecorruptions names); default: all 19
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)  # severity levels (1..5); 0, the clean images, is always scored
    corrupt_size: int = 256  # side at which images are corrupted (their native size), before resizing to the model
    corruption_seed: int = 0  # seeds NumPy's generator per (corruption, severity, image)

    def check(self) -> None:
        """Cross-field checks (run by --dry-run and before the job)."""
        super().check()
        unknown = sorted(set(self.corruptions) - set(CORRUPTIONS))
        if unknown:
            raise ValueError(f"corruptions: unknown {unknown}; known: {list(CORRUPTIONS)}")
        bad = [s for s in self.severities if not 1 <= s <= 5]
        if bad:
            raise ValueError(f"severities: {bad} not in 1..5 (severity 0, the clean images, is always scored)")
        if "rgb" in self.variants:
            log.info("variants: rgb is scored too (not in the paper's figure)")


def corruption_seed(seed: int, corruption: str, severity: int, index: int) -> int:
    """A stable 32-bit seed for image `index` under (corruption, severity)."""
    return zlib.crc32(f"{seed}/{corruption}/{severity}/{index}".encode())


def corrupt_images(images: np.ndarray, corruption: str, severity: int, seed: int = 0) -> np.ndarray:
    """uint8 (N, H, W, 3) -> the same images corrupted (uint8, same shape) by imagecorruptions; severity 0 = a copy."""
    if severity == 0:
        return images.copy()
    try:
        from imagecorruptions import corrupt  # optional: installed by `make venv` (see the module docstring)
    except ImportError as e:
        raise ImportError(
            "the robustness job needs the `imagecorruptions` module: `make venv`, or pip install scikit-image numba "
            "&& pip install --no-deps imagecorruptions-imaug==1.1.5"
        ) from e
    out = np.empty_like(images)
    for i, im in enumerate(images):
        np.random.seed(corruption_seed(seed, corruption, severity, i))
        c = np.asarray(corrupt(im, corruption_name=corruption, severity=severity))
        out[i] = np.clip(c, 0, 255).astype(np.uint8)[..., :3]
    return out


def model_items(images: np.ndarray, masks: torch.Tensor, ids: list[str], size: int) -> list[dict[str, Any]]:
    """uint8 images at their native size -> evaluation items at the model's size (the one resize policy)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 3, H, W) in [-1, 1]
    x = resize_images(x, size)
    return [{"image": x[i], "mask": masks[i], "id": ids[i]} for i in range(len(ids))]


def run_robustness(cfg: RobustnessConfig) -> dict[str, Any]:
    out, parent = start_job(cfg)
    device = resolve_device(cfg.device)
    size = int(load_checkpoint(cfg.checkpoint).model_config.unet.image_size)
    # the test images at their native size (corrupted there) and their masks at the model's size
    native = build_dataset(dataclasses.replace(cfg.test_data, flip=False, image_size=cfg.corrupt_size), "test")
    small = build_dataset(dataclasses.replace(cfg.test_data, flip=False, image_size=size), "test")
    n = min(cfg.test_limit, len(native)) if cfg.test_limit else len(native)
    clean = to_uint8(torch.stack([native[i]["image"] for i in range(n)]))  # (N, S, S, 3) uint8
    masks = torch.stack([small[i]["mask"] for i in range(n)])  # (N, size, size)
    ids = [str(small[i]["id"]) for i in range(n)]
    log.info(f"[robustness] {n} test images corrupted at {cfg.corrupt_size} px, scored at {size} px")

    methods: dict[str, tuple[Any, dict[str, Any]]] = {}
    for variant in cfg.variants:
        t0 = time.perf_counter()
        child = Tracker(cfg.tracking, f"{cfg.name}/{variant}", parent_run_id=parent.run_id)
        seg, info = train_variant(variant, cfg, out, device, child)
        info["train_seconds"] = time.perf_counter() - t0
        child.finish()
        methods[variant] = (seg, info)

    results: Results = {v: {} for v in cfg.variants}
    settings = [("clean", 0)] + [(c, s) for c in cfg.corruptions for s in cfg.severities]
    for c, s in settings:
        t0 = time.perf_counter()
        items = model_items(corrupt_images(clean, c, s, cfg.corruption_seed), masks, ids, size)
        t_corrupt = time.perf_counter() - t0
        for variant, (seg, info) in methods.items():
            metrics = evaluate_segmenter(seg, items, class_names=info["names"], ignore_index=info["ignore"]).metrics
            results[variant].setdefault(c, {})[s] = {
                "miou": metrics["test/miou"], "miou_official": metrics["test/miou_official"]
            }  # fmt: skip
            key = f"robust/{variant}/s0/miou" if c == "clean" else f"robust/{variant}/{c}/s{s}/miou"
            parent.log_metrics({key: metrics["test/miou"]})
        shown = ", ".join(f"{v} {100 * results[v][c][s]['miou']:.1f}" for v in cfg.variants)
        log.info(f"[robustness] {c} s{s}: {shown} (corrupt {t_corrupt:.1f}s, {time.perf_counter() - t0:.0f}s)")
        (out / "results.json").write_text(json.dumps(_payload(cfg, results, methods, device, size), indent=1))

    summary = mean_over_corruptions(results, cfg.corruptions, cfg.severities)
    for variant, by_severity in summary.items():
        parent.log_metrics({f"robust/{variant}/s{s}/miou": v for s, v in by_severity.items() if s > 0})
    table = robustness_table(results, summary, cfg, methods)
    (out / "table.md").write_text(table)
    robustness_png(results, summary, cfg, out / "robustness.png")
    for name in ("table.md", "results.json", "robustness.png", "config.yaml"):
        parent.log_artifact(out / name)
    parent.finish()
    log.info(table)
    return {"summary": summary, "results": results, "out": str(out)}


def _payload(cfg, results, methods, device, size) -> dict[str, Any]:
    compute = {v: {k: x for k, x in info.items() if k != "names"} for v, (_, info) in methods.items()}
    return {
        "corrupt_size": cfg.corrupt_size,
        "model_size": size,
        "machine": machine(device),
        "methods": compute,
        "miou": {v: {c: {str(s): r for s, r in by_s.items()} for c, by_s in rc.items()} for v, rc in results.items()},
    }


def mean_over_corruptions(
    results: dict[str, dict[str, dict[int, dict[str, float]]]],
    corruptions: tuple[str, ...],
    severities: tuple[int, ...],
) -> dict[str, dict[int, float]]:
    """{method: {severity: mIoU averaged over the corruptions}}; severity 0 is the clean score."""
    out = {}
    for variant, by_c in results.items():
        row = {0: by_c["clean"][0]["miou"]}
        for s in severities:
            row[s] = float(np.mean([by_c[c][s]["miou"] for c in corruptions]))
        out[variant] = row
    return out


def robustness_table(results, summary, cfg: RobustnessConfig, methods) -> str:
    """Markdown: mean mIoU over corruptions per severity (with each method's compute), then per method a corruption x
    severity table; numbers in %."""
    sev = list(cfg.severities)
    body = []
    for v, row in summary.items():
        drop = row[0] - row[sev[-1]] if sev else float("nan")
        cells = [f"{100 * row[s]:.1f}" for s in [0, *sev]]
        body.append([LABELS.get(v, v), *cells, f"{100 * drop:.1f}", row_compute(methods[v][1])])
    head = ["method", "clean", *[f"s{s}" for s in sev], f"drop at s{sev[-1]}" if sev else "drop", "training compute"]
    out = [f"mIoU (%) averaged over {len(cfg.corruptions)} corruptions, per severity\n", markdown_table(head, body)]
    for v, by_c in results.items():
        rows = [[c, *[f"{100 * by_c[c][s]['miou']:.1f}" for s in sev]] for c in cfg.corruptions]
        out += [f"\n{LABELS.get(v, v)}: mIoU (%) per corruption (clean {100 * summary[v][0]:.1f})\n"]
        out += [markdown_table(["corruption", *[f"s{s}" for s in sev]], rows)]
    return "\n".join(out) + "\n"


def robustness_png(results, summary, cfg: RobustnessConfig, path: Path) -> None:
    """Mean mIoU vs severity (first panel), then one panel per corruption; one line per method."""
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone

    panels = ["mean over corruptions", *cfg.corruptions]
    cols = 5
    rows = (len(panels) + cols - 1) // cols
    fig = Figure(figsize=(3.0 * cols, 2.4 * rows))
    sev = [0, *cfg.severities]
    for k, panel in enumerate(panels):
        ax = fig.add_subplot(rows, cols, k + 1)
        for v in results:
            if k == 0:
                ys = [summary[v][s] for s in sev]
            else:
                ys = [results[v]["clean"][0]["miou"], *[results[v][panel][s]["miou"] for s in cfg.severities]]
            ax.plot(sev, [100 * y for y in ys], marker="o", ms=3, label=LABELS.get(v, v) if k == 0 else None)
        ax.set_title(panel, fontsize=9, fontweight="bold" if k == 0 else "normal")
        ax.set_xticks(sev)
        ax.tick_params(labelsize=7)
        if k % cols == 0:
            ax.set_ylabel("mIoU (%)", fontsize=8)
        if k >= len(panels) - cols:
            ax.set_xlabel("severity", fontsize=8)
    fig.legend(loc="lower right", fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
