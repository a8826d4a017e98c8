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
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from diffseg.config import Name
from diffseg.data import DataConfig, build_dataset
from diffseg.models import resolve_device
from diffseg.tracking import TrackingConfig, start_job


@dataclass(frozen=True)
class DatasetDDPMConfig:
    name: Name = "dataset-ddpm"
    output_dir: str = "runs/label"
    segmenter: str = ""  # a PixelSegmenter bundle (segmenter.pt); its recipe names the DDPM checkpoint
    checkpoint: str = ""  # the DDPM to sample from ("" = the segmenter's backbone)
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


class DeepLabSegmenter:
    """`predict(images (B, 3, H, W) in [-1, 1]) -> (labels, zeros)` for evaluate_segmenter."""

    def __init__(self, model: torch.nn.Module, train_size: int, device: torch.device):
        self.model, self.train_size, self.device = model.eval(), train_size, device

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        x = images.to(self.device).float()
        h, w = x.shape[-2:]
        if self.train_size and self.train_size != h:
            x = F.interpolate(x, size=(self.train_size, self.train_size), mode="bilinear", align_corners=False)
        logits = self.model(x)["out"]
        if logits.shape[-2:] != (h, w):
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        labels = logits.argmax(1).cpu().numpy().astype(np.int64)
        return labels, np.zeros(labels.shape, np.float32)


def train_deeplab(
    images: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg: DatasetDDPMConfig, device: torch.device
) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = build_deeplab(cfg.arch, num_classes).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    for step in range(cfg.steps):
        idx = torch.randint(0, len(images), (min(cfg.batch_size, len(images)),), generator=gen)
        x, y = images[idx].to(device), labels[idx].to(device)
        flip = torch.rand(len(idx), generator=gen) < 0.5
        x[flip], y[flip] = x[flip].flip(-1), y[flip].flip(-1)
        if cfg.train_size and cfg.train_size != x.shape[-1]:
            x = F.interpolate(x, size=(cfg.train_size, cfg.train_size), mode="bilinear", align_corners=False)
            y = F.interpolate(y[:, None].float(), size=x.shape[-2:], mode="nearest")[:, 0].long()
        if len(x) < 2:  # BatchNorm in the ASPP head needs 2 images
            continue
        loss = F.cross_entropy(model(x)["out"], y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0:
            print(f"[dataset-ddpm] deeplab step {step + 1}/{cfg.steps} loss {loss.item():.4f}", flush=True)
    return model.eval()


def run_dataset_ddpm(cfg: DatasetDDPMConfig) -> dict[str, Any]:
    from PIL import Image

    from diffseg.features import load_backbone
    from diffseg.label_efficient import evaluate_segmenter, metric_dict
    from diffseg.pixel import PixelSegmenter
    from diffseg.sampling import sample
    from diffseg.viz import to_uint8

    out, tracker = start_job(cfg)
    device = resolve_device(cfg.device)
    seg = PixelSegmenter.load(cfg.segmenter, device)
    ckpt = cfg.checkpoint or seg.recipe.backbone
    model, diffusion = load_backbone(ckpt, device)
    if diffusion is None:
        raise ValueError(f"{ckpt}: DatasetDDPM samples from one of our (or a converted) DDPM checkpoints")

    # 1-2. sample and label, batch by batch
    folder = out / "synthetic"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    images, labels, scores = [], [], []
    for s in range(0, cfg.num_samples, cfg.sample_batch_size):
        n = min(cfg.sample_batch_size, cfg.num_samples - s)
        x, _ = sample(model, diffusion, n, steps=cfg.sample_steps, generator=gen, device=device)
        det = seg.predict_detailed(x.cpu())
        images.append(x.cpu())
        labels.append(torch.from_numpy(det["labels"]))
        scores += det["image_score"].tolist()
        print(f"[dataset-ddpm] sampled and labelled {s + n}/{cfg.num_samples}", flush=True)
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

    # 5. evaluate on real test images
    size = images_t.shape[-1]
    test = build_dataset(dataclasses.replace(cfg.test_data, flip=False, image_size=size), "test")
    if cfg.test_limit:
        test = torch.utils.data.Subset(test, range(min(cfg.test_limit, len(test))))
    result = evaluate_segmenter(
        DeepLabSegmenter(deeplab, cfg.train_size, device), test, seg.num_classes, 255, out / "eval",
        class_names=seg.class_names,
    )  # fmt: skip
    tracker.log_metrics(metric_dict(result, seg.class_names) | {"dataset/kept": len(kept)})
    tracker.finish()
    print(f"[dataset-ddpm] {len(kept)}/{cfg.num_samples} samples kept; DeepLabV3 test mIoU {result['miou']:.4f}")
    return {"miou": result["miou"], "kept": len(kept), "num_samples": cfg.num_samples, "out": str(out)}
