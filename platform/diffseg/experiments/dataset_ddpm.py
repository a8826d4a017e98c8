"""DatasetDDPM (Baranchuk et al., Sec. 5): a synthetic labelled data set from the DDPM itself.

    1. sample N images from the DDPM
    2. label them with a trained pixel segmenter (the ensemble's majority vote) and score each image by its
       uncertainty (mean of the top 10% pixel uncertainties)
    3. filter by that score
    4. train torchvision DeepLabV3 on the rest, validating after every epoch
    5. evaluate the selected epoch on REAL test images: mIoU / per-class IoU pooled over the test set

Each step has the reference's behaviour (yandex-research/ddpm-segmentation) as an option, and it is the default
wherever this machine can do it (defaults in brackets):

1. sampling: the full DDPM chain (`generate_dataset.py`: `p_sample_loop`, `timestep_respacing 1000`,
   `clip_denoised`). Options `sampler` ("ddpm"), `sample_steps` (0 = all T).
2. labels and scores: the ensemble's vote and the mean of the top 10% pixel uncertainties (`src/pixel_classifier.py:
   predict_labels`), the same here.
3. filter (`train_deeplab.py: train`): `idxs = argsort(scores)[30 : -f + 30]` with f = int(N x 0.1), which keeps
   N - f samples: the 30 most certain and the f - 30 most uncertain go. Options `drop_fraction` (0.1),
   `drop_most_certain` (30; it needs f > 30, i.e. N >= 310 at 0.1, or the reference's slice keeps nothing).
4. network: DeepLabV3-ResNet101 whose backbone is ImageNet-pretrained (the pinned torchvision loads it even with
   `pretrained=False`, through `pretrained_backbone=True`), ImageNet-normalised inputs (`src/datasets.py:
   make_transform("deeplab")`) at `deeplab_res`, Adam 1e-3, batch 8, 20 epochs of a shuffled loader (drop_last), no
   flips. Options `arch` ("resnet101"), `backbone_weights` ("none": see below), `input_norm` ("imagenet"),
   `train_size`, `lr`, `batch_size`, `epochs`, `flip` (False).
5. the epoch (`train_deeplab.py: test`): every epoch's checkpoint is scored on the validation images (the labelled
   real images, `validation_path`) by `compute_iou`, the first best one is tested. Options `select` ("val"),
   `val_data`, `val_split`, `val_limit`; the tables report `test/miou_official` beside `test/miou`.

`backbone_weights="imagenet"` loads torchvision's ImageNet weights for the ResNet (from the torch hub cache, or
downloaded into it). This machine has no internet (`download.pytorch.org` is unreachable), so the shipped configs
use "none": DeepLabV3 from scratch, the one deviation from the reference; "imagenet" fails with a message saying so.

The comparison the paper's DatasetDDPM row needs: with `real_baseline`, the same network is also trained on the
real labelled images (the `val_limit` images of `val_split`) for the same number of optimizer steps, the last step
kept, and scored on the same test images (result "real_baseline", MLflow `real/miou`). samples.png shows the first
`grid_samples` samples, samples_labelled.png 16 of them with the ensemble's labels.

Samples and their labels are written as a paired folder (images/, masks/, dataset.json, scores.csv) under the run
folder, so the synthetic set can be inspected or reused by any other job.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import logging
import urllib.error
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import nn

from diffseg.core.config import InputPath, Name, OutputPath
from diffseg.core.runtime import image_generators, resolve_device
from diffseg.core.tracking import TrackingConfig, start_job
from diffseg.core.viz import sample_grid, save_png, to_uint8
from diffseg.data.datasets import DataConfig, build_dataset, stack
from diffseg.evaluation.baselines import DictOutput, NetworkSegmenter, train_supervised
from diffseg.evaluation.evaluate import evaluate_segmenter
from diffseg.methods.pixel import PixelSegmenter
from diffseg.methods.sampling import sample
from diffseg.models.checkpoint import checkpoint_of, load_diffusion_model

log = logging.getLogger(__name__)

# The reference's input normalisation for DeepLabV3 (torchvision's ImageNet statistics).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetDDPMConfig:
    name: Name = "dataset-ddpm"
    output_dir: OutputPath = "runs/label"  # samples, labels, the segmentation network
    segmenter: InputPath = ""  # a PixelSegmenter bundle (segmenter.pt); its recipe names the DDPM checkpoint
    checkpoint: Annotated[str, checkpoint_of("ddpm", needed_by="sampling a labelled data set")] = ""  # the DDPM
    # to sample from ("" = the segmenter's backbone)
    num_samples: int = 10000  # N synthetic images (the reference: 10000 generated, up to 50000 used)
    sampler: Literal["ddpm", "ddim"] = "ddpm"  # ancestral DDPM sampling (the reference) or DDIM
    sample_steps: int = 0  # sampling steps; 0 = the full chain of T steps (the reference)
    sample_batch_size: int = 16
    drop_fraction: float = 0.1  # f = int(N x this) samples are dropped in all (the reference: 0.1)
    drop_most_certain: int = 30  # of those f, this many are the MOST certain (the reference: 30; 0 = f most uncertain)
    seed: int = 0
    arch: Literal["resnet50", "resnet101", "mobilenet_v3_large"] = "resnet101"  # DeepLabV3 backbone (the reference)
    backbone_weights: Literal["none", "imagenet"] = "none"  # the reference: imagenet (cannot be downloaded here)
    input_norm: Literal["imagenet", "none"] = "imagenet"  # ImageNet mean/std on [0, 1] inputs (the reference)
    epochs: int = 20  # passes over the kept samples (the reference: 20)
    batch_size: int = 8  # the reference: 8
    lr: float = 1e-3  # Adam (the reference: 1e-3)
    flip: bool = False  # random horizontal flips (the reference: none)
    train_size: int = 0  # upsample images for DeepLabV3 to this side (0 = the DDPM's size; the reference: 256)
    select: Literal["val", "last"] = "val"  # the epoch with the best validation mIoU (the reference), or the last
    val_data: DataConfig = field(default_factory=DataConfig)  # real labelled images for the epoch choice
    val_split: Literal["train", "test", "all"] = "train"  # the reference validates on the labelled real images
    val_limit: int = 20  # first N images of val_split (the labelled ones)
    test_data: DataConfig = field(default_factory=DataConfig)  # real test images (split "test")
    test_limit: int = 0
    reuse_samples: bool = False  # reuse the synthetic/ folder of a previous run of this name (same DDPM and N)
    real_baseline: bool = False  # also train the same network on the val images (the real labels), same steps
    grid_samples: int = 64  # the first N samples (and their labels) in samples.png / samples_labelled.png
    device: str = "auto"
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def check(self) -> None:
        """Cross-field checks (run by --dry-run and before the job)."""
        if self.real_baseline and not self.val_limit:
            raise ValueError("real_baseline: needs val_limit, the number of real labelled images it trains on")
        if not self.segmenter:
            raise ValueError("segmenter: a PixelSegmenter bundle (segmenter.pt) is required")
        if not 0.0 <= self.drop_fraction < 1.0:
            raise ValueError(f"drop_fraction must be in [0, 1), got {self.drop_fraction}")
        drop = int(self.num_samples * self.drop_fraction)
        if self.drop_fraction > 0 and self.drop_most_certain and drop <= self.drop_most_certain:
            raise ValueError(
                f"drop_most_certain={self.drop_most_certain} needs int(num_samples x drop_fraction) = {drop} > "
                f"{self.drop_most_certain} (the reference's slice keeps nothing otherwise): raise num_samples to at "
                f"least {int((self.drop_most_certain + 1) / self.drop_fraction) + 1} or set drop_most_certain=0"
            )
        if self.backbone_weights == "imagenet" and self.arch not in IMAGENET_BACKBONES:
            raise ValueError(f"backbone_weights=imagenet: supported for arch {sorted(IMAGENET_BACKBONES)}")


def select_confident(scores: np.ndarray, drop_fraction: float, drop_most_certain: int = 0) -> np.ndarray:
    """Sorted indices of the samples kept, by uncertainty score (higher = less certain).

    f = int(N x drop_fraction) samples are dropped in all. With `drop_most_certain` = c > 0 this is the reference
    (ddpm-segmentation `train_deeplab.py: train`: `idxs = argsort(scores); idxs[c : -f + c]`, c = 30): the window
    of N - f samples starting after the c most certain, i.e. the c most certain and the f - c most uncertain go.
    The reference's slice is empty when f <= c; this raises there instead. With c = 0, the f most uncertain go.
    drop_fraction 0 keeps everything (the reference skips the filter).
    """
    n = len(scores)
    f = int(n * drop_fraction)
    if drop_fraction <= 0:
        return np.arange(n)
    if drop_most_certain and f <= drop_most_certain:
        raise ValueError(
            f"dropping {f} of {n} samples with the {drop_most_certain} most certain among them needs more than "
            f"{drop_most_certain} dropped (the reference's slice would keep nothing)"
        )
    order = np.argsort(scores, kind="stable")  # most certain first
    return np.sort(order[drop_most_certain : n - f + drop_most_certain])


# ---------------------------------------------------------------------------------------------------- DeepLabV3
IMAGENET_BACKBONES = {"resnet50": "ResNet50_Weights", "resnet101": "ResNet101_Weights"}


class ImageNetInput(nn.Module):
    """Images in [-1, 1] -> ((x + 1) / 2 - mean) / std with ImageNet's statistics, as the reference feeds DeepLabV3
    (`make_transform("deeplab")`: ToTensor, then Normalize)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x + 1) / 2 - self.mean) / self.std


def imagenet_backbone_state(arch: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights of the ResNet behind DeepLabV3 (IMAGENET1K_V1, what the reference's torchvision
    loads), from the torch hub cache or downloaded into it; a clear error where neither works (no internet here)."""
    import torchvision.models as tvm  # heavy: only DeepLabV3 needs it

    weights = getattr(tvm, IMAGENET_BACKBONES[arch]).IMAGENET1K_V1
    try:
        return torch.hub.load_state_dict_from_url(weights.url, progress=False, check_hash=True)
    except (urllib.error.URLError, OSError) as e:
        raise RuntimeError(
            f"backbone_weights=imagenet: torchvision's ImageNet {arch} weights ({weights.url}) are not in the torch "
            f"hub cache ({torch.hub.get_dir()}/checkpoints) and cannot be downloaded from this machine ({e}). "
            "Copy the file there from a machine with internet, or use backbone_weights=none (from scratch)."
        ) from e


def build_deeplab(arch: str, num_classes: int, backbone_weights: str = "none") -> nn.Module:
    """torchvision DeepLabV3 (no auxiliary head), from scratch or with an ImageNet-pretrained ResNet backbone."""
    from torchvision.models import segmentation as seg  # heavy: only DeepLabV3 needs it

    ctor = {
        "resnet50": seg.deeplabv3_resnet50,
        "resnet101": seg.deeplabv3_resnet101,
        "mobilenet_v3_large": seg.deeplabv3_mobilenet_v3_large,
    }[arch]
    net = ctor(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)
    if backbone_weights == "imagenet":
        state = {k: v for k, v in imagenet_backbone_state(arch).items() if not k.startswith("fc.")}
        net.backbone.load_state_dict(state)  # strict: the backbone is the ResNet without avgpool and fc
    elif backbone_weights != "none":
        raise ValueError(f"backbone_weights must be 'none' or 'imagenet', got {backbone_weights!r}")
    return net


def build_segmentation_net(cfg: DatasetDDPMConfig, num_classes: int) -> nn.Module:
    """`net(x in [-1, 1]) -> logits`: the input normalisation, then DeepLabV3."""
    net = DictOutput(build_deeplab(cfg.arch, num_classes, cfg.backbone_weights))
    return nn.Sequential(ImageNetInput(), net) if cfg.input_norm == "imagenet" else net


def train_deeplab(
    images: torch.Tensor,
    labels: torch.Tensor,
    class_names: list[str],
    cfg: DatasetDDPMConfig,
    device: torch.device,
    val: Any = None,
) -> tuple[nn.Module, list[dict[str, float]]]:
    """DeepLabV3 on the kept samples by the one supervised trainer, `cfg.epochs` epochs; with `val` (a labelled real
    data set) and `select="val"`, every epoch is scored there and the best one is returned (the reference keeps the
    first epoch with the highest validation mIoU, `compute_iou`: `val/miou_official`). -> (network, per-epoch log)."""
    torch.manual_seed(cfg.seed)  # the initial weights
    net = build_segmentation_net(cfg, len(class_names))
    per_epoch = max(1, len(images) // cfg.batch_size)
    history: list[dict[str, float]] = []
    best: dict[str, Any] = {"score": -1.0, "state": None, "epoch": 0}

    def validate(model: nn.Module, step: int) -> None:
        epoch = step // per_epoch
        row: dict[str, float] = {"epoch": epoch}
        if val is not None and cfg.select == "val":
            seg = NetworkSegmenter(model, class_names, image_size=cfg.train_size or None)
            metrics = evaluate_segmenter(seg, val, class_names=class_names, split="val").metrics
            row |= {"val/miou": metrics["val/miou"], "val/miou_official": metrics["val/miou_official"]}
            if row["val/miou_official"] > best["score"]:  # strictly better: the first best epoch is kept
                best.update(score=row["val/miou_official"], state=copy.deepcopy(model.state_dict()), epoch=epoch)
            log.info(f"[dataset-ddpm] epoch {epoch}: val mIoU {100 * row['val/miou_official']:.1f}")
        history.append(row)

    net = train_supervised(
        net, images, labels, steps=cfg.epochs * per_epoch, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
        flip=cfg.flip, train_size=cfg.train_size, device=device, log_every=100, name="dataset-ddpm",
        order="epochs", callback=validate, callback_every=per_epoch,
    )  # fmt: skip
    if best["state"] is not None:
        net.load_state_dict(best["state"])
        history.append({"selected_epoch": best["epoch"], "val/miou_official": best["score"]})
    return net.eval(), history


def sample_and_label(
    cfg: DatasetDDPMConfig, loaded: Any, seg: PixelSegmenter, folder: Any, source: str, device: torch.device
):
    """Steps 1-3: sample, label with the ensemble, score, filter; the paired folder written under `folder`.
    -> (images in [-1, 1], labels, scores, kept indices)."""
    images, labels, scores = [], [], []
    steps = cfg.sample_steps or None  # None: all T steps
    for s in range(0, cfg.num_samples, cfg.sample_batch_size):
        n = min(cfg.sample_batch_size, cfg.num_samples - s)
        gens = image_generators(cfg.seed, range(s, s + n))
        x, _ = sample(loaded.model, loaded.diffusion, n, method=cfg.sampler, steps=steps, generator=gens, device=device)
        det = seg.predict_detailed(x.cpu())
        images.append(x.cpu())
        labels.append(torch.from_numpy(det["labels"]))
        scores += det["image_score"].tolist()
        log.info(f"[dataset-ddpm] sampled and labelled {s + n}/{cfg.num_samples}")
    images_t, labels_t, scores_np = torch.cat(images), torch.cat(labels), np.asarray(scores)
    kept = select_confident(scores_np, cfg.drop_fraction, cfg.drop_most_certain)
    with open(folder / "scores.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "uncertainty", "kept"])
        kept_set = set(kept.tolist())
        for i, (img, lab) in enumerate(zip(to_uint8(images_t), labels_t.numpy())):
            Image.fromarray(img).save(folder / "images" / f"{i:06d}.png")
            Image.fromarray(lab.astype(np.uint8)).save(folder / "masks" / f"{i:06d}.png")
            w.writerow([f"{i:06d}", f"{scores_np[i]:.6f}", int(i in kept_set)])
    (folder / "dataset.json").write_text(
        json.dumps({"name": "dataset-ddpm", "classes": seg.class_names, "ignore_index": 255, "source": source})
    )
    return images_t, labels_t, scores_np, kept


def read_synthetic(folder: Any, num_samples: int, source: str) -> tuple[torch.Tensor, torch.Tensor, np.ndarray] | None:
    """The samples, labels and scores a previous run wrote to `folder` (images back in [-1, 1] from their PNGs), or
    None when there are none; samples of another DDPM or another number of them are an error."""
    path = folder / "scores.csv"
    if not path.is_file():
        return None
    meta = json.loads((folder / "dataset.json").read_text())
    with open(path) as f:
        rows = list(csv.DictReader(f))
    if len(rows) != num_samples or meta.get("source") != source:
        raise ValueError(
            f"{path}: {len(rows)} samples of {meta.get('source')}, this run asks for {num_samples} of {source}; "
            "set reuse_samples=false to sample again"
        )
    imgs = np.stack([np.asarray(Image.open(folder / "images" / f"{r['id']}.png").convert("RGB")) for r in rows])
    masks = np.stack([np.asarray(Image.open(folder / "masks" / f"{r['id']}.png")) for r in rows])
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, torch.from_numpy(masks.astype(np.int64)), np.array([float(r["uncertainty"]) for r in rows])


def run_dataset_ddpm(cfg: DatasetDDPMConfig) -> dict[str, Any]:
    cfg.check()
    out, tracker = start_job(cfg)
    device = resolve_device(cfg.device)
    seg = PixelSegmenter.load(cfg.segmenter, device)
    ckpt = cfg.checkpoint or seg.recipe.backbone
    if ckpt.startswith(("random:", "diffusers:")) or ckpt == "rgb":
        raise ValueError(f"checkpoint: DatasetDDPM samples from one of our (or a converted) DDPMs, not {ckpt!r}")
    loaded = load_diffusion_model(ckpt, device)
    if cfg.backbone_weights == "imagenet":
        imagenet_backbone_state(cfg.arch)  # fail now, not after hours of sampling

    # 1-2. sample and label, batch by batch (image i's noise: image_generators(seed, [i]), as jobs/sample.py)
    folder = out / "synthetic"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    reused = read_synthetic(folder, cfg.num_samples, str(ckpt)) if cfg.reuse_samples else None
    if reused is not None:
        images_t, labels_t, scores_np = reused
        kept = select_confident(scores_np, cfg.drop_fraction, cfg.drop_most_certain)
        log.info(f"[dataset-ddpm] reusing the {len(scores_np)} samples and labels of {folder}")
    else:
        images_t, labels_t, scores_np, kept = sample_and_label(cfg, loaded, seg, folder, str(ckpt), device)
    if cfg.grid_samples:  # are they images of the domain? the first samples, then with the ensemble's labels
        g = images_t[: cfg.grid_samples]
        save_png(sample_grid(g, nrow=int(np.ceil(np.sqrt(len(g))))), out / "samples.png")
        onehot = nn.functional.one_hot(labels_t[: cfg.grid_samples], len(seg.class_names)).permute(0, 3, 1, 2)
        save_png(sample_grid(g[:16], onehot[:16]), out / "samples_labelled.png")

    # 3-4. train DeepLabV3 on the kept samples, choosing the epoch on the labelled real images
    size = images_t.shape[-1]
    val = None
    if cfg.select == "val":
        val = build_dataset(dataclasses.replace(cfg.val_data, flip=False, image_size=size), cfg.val_split)
        if cfg.val_limit:
            val = torch.utils.data.Subset(val, range(min(cfg.val_limit, len(val))))
    deeplab, history = train_deeplab(images_t[kept], labels_t[kept], seg.class_names, cfg, device, val)
    (out / "epochs.json").write_text(json.dumps(history, indent=1))
    for row in history:
        if "epoch" in row and len(row) > 1:
            tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))

    # 5. evaluate on real test images, by the one evaluation path
    test = build_dataset(dataclasses.replace(cfg.test_data, flip=False, image_size=size), "test")
    if cfg.test_limit:
        test = torch.utils.data.Subset(test, range(min(cfg.test_limit, len(test))))
    segmenter = NetworkSegmenter(deeplab, seg.class_names, image_size=cfg.train_size or None)
    result = evaluate_segmenter(segmenter, test, class_names=seg.class_names, out_dir=out / "eval")
    selected = history[-1].get("selected_epoch", cfg.epochs) if history else cfg.epochs
    tracker.log_metrics(result.metrics | {"dataset/kept": len(kept), "train/selected_epoch": selected})
    real = train_real_baseline(cfg, val, seg.class_names, len(kept), size, device, out) if cfg.real_baseline else None
    if real is not None:
        tracker.log_metrics({f"real/{k}": v for k, v in real.items() if isinstance(v, float | int)})
    for name in ("samples.png", "samples_labelled.png", "epochs.json"):
        if (out / name).exists():
            tracker.log_artifact(out / name)
    tracker.finish()
    miou = result.metrics["test/miou"]
    log.info(
        f"[dataset-ddpm] {len(kept)}/{cfg.num_samples} samples kept; DeepLabV3 (epoch {selected}) test mIoU "
        f"{miou:.4f} (official averaging {result.metrics['test/miou_official']:.4f})"
    )
    return {
        "miou": miou,
        "miou_official": result.metrics["test/miou_official"],
        "kept": len(kept),
        "num_samples": cfg.num_samples,
        "selected_epoch": selected,
        "real_baseline": real,
        "out": str(out),
    }


def train_real_baseline(
    cfg: DatasetDDPMConfig, val: Any, class_names: list[str], num_kept: int, size: int, device: torch.device, out: Any
) -> dict[str, Any]:
    """The same network trained on the real labelled images (`val`: the first `val_limit` of `val_split`) for the
    same number of optimizer steps as on the `num_kept` synthetic images (epochs scaled to the smaller set), the last
    step kept (the labelled images are its training set, so they cannot choose an epoch); scored on the real test
    images by the one evaluation path (under out/real/). -> its test mIoU both ways, epochs and steps."""
    if val is None:
        val = build_dataset(dataclasses.replace(cfg.val_data, flip=False, image_size=size), cfg.val_split)
        val = torch.utils.data.Subset(val, range(min(cfg.val_limit, len(val))))
    data = stack(val)
    steps = cfg.epochs * max(1, num_kept // cfg.batch_size)
    per_epoch = max(1, len(data["image"]) // cfg.batch_size)
    epochs = max(1, steps // per_epoch)
    rcfg = dataclasses.replace(cfg, epochs=epochs, select="last")
    net, _ = train_deeplab(data["image"], data["mask"], class_names, rcfg, device, None)
    test = build_dataset(dataclasses.replace(cfg.test_data, flip=False, image_size=size), "test")
    if cfg.test_limit:
        test = torch.utils.data.Subset(test, range(min(cfg.test_limit, len(test))))
    segmenter = NetworkSegmenter(net, class_names, image_size=cfg.train_size or None)
    result = evaluate_segmenter(segmenter, test, class_names=class_names, out_dir=out / "real")
    log.info(
        f"[dataset-ddpm] the same network on {len(data['image'])} real labelled images ({epochs} epochs, "
        f"{epochs * per_epoch} steps): test mIoU {result.metrics['test/miou']:.4f}"
    )
    return {
        "miou": result.metrics["test/miou"],
        "miou_official": result.metrics["test/miou_official"],
        "images": len(data["image"]),
        "epochs": epochs,
        "steps": epochs * per_epoch,
    }
