"""DatasetDDPM (Baranchuk et al., Sec. 5): a synthetic labelled data set from the DDPM itself.

    1. sample N images from the DDPM (DDIM, `sample_steps`)
    2. label them with a trained pixel segmenter (the ensemble's majority vote) and score each image by its
       uncertainty (mean of the top 10% pixel uncertainties)
    3. drop the `drop_fraction` (10%) most uncertain images
    4. train torchvision DeepLabV3 (weights=None, weights_backbone=None) on the rest
    5. evaluate it on REAL test images: mIoU / per-class IoU pooled over the test set

Samples and their labels are written as a paired folder (images/, masks/, dataset.json, scores.csv) under the run
folder, so the synthetic set can be inspected or reused by any other job.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from diffseg.baselines import DictOutput, NetworkSegmenter, train_supervised
from diffseg.checkpoint import load_diffusion_model
from diffseg.config import InputPath, Name, OutputPath
from diffseg.data import DataConfig, build_dataset
from diffseg.evaluate import evaluate_segmenter
from diffseg.pixel import PixelSegmenter
from diffseg.runtime import image_generators, resolve_device
from diffseg.sampling import sample
from diffseg.tracking import TrackingConfig, start_job
from diffseg.viz import to_uint8

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetDDPMConfig:
    name: Name = "dataset-ddpm"
    output_dir: OutputPath = "runs/label"  # samples, labels, the segmentation network
    segmenter: InputPath = ""  # a PixelSegmenter bundle (segmenter.pt); its recipe names the DDPM checkpoint
    checkpoint: InputPath = ""  # the DDPM to sample from ("" = the segmenter's backbone)
    num_samples: int = 64  # N synthetic images
    sample_steps: int = 50  # DDIM steps
    sample_batch_size: int = 16
    drop_fraction: float = 0.1  # the most uncertain fraction of images is dropped (the paper: 10%)
    seed: int = 0
    arch: Literal["resnet50", "resnet101", "mobilenet_v3_large"] = "resnet50"  # DeepLabV3 backbone
    steps: int = 1000  # DeepLabV3 Adam steps
    batch_size: int = 16
    lr: float = 1e-3
    train_size: int = 0  # upsample images for DeepLabV3 to this side (0 = the DDPM's size)
    test_data: DataConfig = field(default_factory=DataConfig)  # real test images (split "test")
    test_limit: int = 0
    device: str = "auto"
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def check(self) -> None:
        """Cross-field checks (run by --dry-run and before the job)."""
        if not self.segmenter:
            raise ValueError("segmenter: a PixelSegmenter bundle (segmenter.pt) is required")
        if not 0.0 <= self.drop_fraction < 1.0:
            raise ValueError(f"drop_fraction must be in [0, 1), got {self.drop_fraction}")


def build_deeplab(arch: str, num_classes: int) -> torch.nn.Module:
    """torchvision DeepLabV3 from scratch (no pretrained weights of any kind)."""
    from torchvision.models import segmentation as seg

    ctor = {
        "resnet50": seg.deeplabv3_resnet50,
        "resnet101": seg.deeplabv3_resnet101,
        "mobilenet_v3_large": seg.deeplabv3_mobilenet_v3_large,
    }[arch]
    return ctor(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)


def select_confident(scores: np.ndarray, drop_fraction: float) -> np.ndarray:
    """Indices of the images kept after dropping the `drop_fraction` with the highest uncertainty score."""
    n = len(scores)
    n_drop = int(round(n * drop_fraction))
    order = np.argsort(scores, kind="stable")  # most certain first
    return np.sort(order[: n - n_drop])


def train_deeplab(
    images: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg: DatasetDDPMConfig, device: torch.device
) -> torch.nn.Module:
    """DeepLabV3 from scratch on the confident samples, by the one supervised trainer (flips, `train_size`)."""
    torch.manual_seed(cfg.seed)  # the initial weights
    net = DictOutput(build_deeplab(cfg.arch, num_classes))
    return train_supervised(
        net, images, labels, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
        train_size=cfg.train_size, device=device, log_every=100, name="dataset-ddpm",
    )  # fmt: skip


def run_dataset_ddpm(cfg: DatasetDDPMConfig) -> dict[str, Any]:
    out, tracker = start_job(cfg)
    device = resolve_device(cfg.device)
    seg = PixelSegmenter.load(cfg.segmenter, device)
    ckpt = cfg.checkpoint or seg.recipe.backbone
    if ckpt.startswith(("random:", "diffusers:")) or ckpt == "rgb":
        raise ValueError(f"checkpoint: DatasetDDPM samples from one of our (or a converted) DDPMs, not {ckpt!r}")
    loaded = load_diffusion_model(ckpt, device)

    # 1-2. sample and label, batch by batch (image i's noise: image_generators(seed, [i]), as jobs/sample.py)
    folder = out / "synthetic"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    images, labels, scores = [], [], []
    for s in range(0, cfg.num_samples, cfg.sample_batch_size):
        n = min(cfg.sample_batch_size, cfg.num_samples - s)
        gens = image_generators(cfg.seed, range(s, s + n))
        x, _ = sample(loaded.model, loaded.diffusion, n, steps=cfg.sample_steps, generator=gens, device=device)
        det = seg.predict_detailed(x.cpu())
        images.append(x.cpu())
        labels.append(torch.from_numpy(det["labels"]))
        scores += det["image_score"].tolist()
        log.info(f"[dataset-ddpm] sampled and labelled {s + n}/{cfg.num_samples}")
    images_t, labels_t, scores_np = torch.cat(images), torch.cat(labels), np.asarray(scores)
    kept = select_confident(scores_np, cfg.drop_fraction)
    with open(folder / "scores.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "uncertainty", "kept"])
        kept_set = set(kept.tolist())
        for i, (img, lab) in enumerate(zip(to_uint8(images_t), labels_t.numpy())):
            Image.fromarray(img).save(folder / "images" / f"{i:06d}.png")
            Image.fromarray(lab.astype(np.uint8)).save(folder / "masks" / f"{i:06d}.png")
            w.writerow([f"{i:06d}", f"{scores_np[i]:.6f}", int(i in kept_set)])
    (folder / "dataset.json").write_text(
        json.dumps({"name": "dataset-ddpm", "classes": seg.class_names, "ignore_index": 255, "source": str(ckpt)})
    )

    # 3-4. train DeepLabV3 on the confident samples
    deeplab = train_deeplab(images_t[kept], labels_t[kept], seg.num_classes, cfg, device)

    # 5. evaluate on real test images, by the one evaluation path
    size = images_t.shape[-1]
    test = build_dataset(dataclasses.replace(cfg.test_data, flip=False, image_size=size), "test")
    if cfg.test_limit:
        test = torch.utils.data.Subset(test, range(min(cfg.test_limit, len(test))))
    segmenter = NetworkSegmenter(deeplab, seg.class_names, image_size=cfg.train_size or None)
    result = evaluate_segmenter(segmenter, test, class_names=seg.class_names, out_dir=out / "eval")
    tracker.log_metrics(result.metrics | {"dataset/kept": len(kept)})
    tracker.finish()
    miou = result.metrics["test/miou"]
    log.info(f"[dataset-ddpm] {len(kept)}/{cfg.num_samples} samples kept; DeepLabV3 test mIoU {miou:.4f}")
    return {"miou": miou, "kept": len(kept), "num_samples": cfg.num_samples, "out": str(out)}
