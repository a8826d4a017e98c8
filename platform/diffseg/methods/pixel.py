"""Pixel classifiers on diffusion features (Baranchuk et al. 2022): an MLP ensemble held as ONE batched module.

Public API (stable; the Ray Serve segmenter loads bundles through it):

    seg = PixelSegmenter.load(path, device=None)          # a bundle written by PixelSegmenter.save / the train job
    labels, uncertainty = seg.predict(images)
        images:      uint8 (B, H, W, 3) or (H, W, 3) numpy, a list of PIL images / uint8 arrays,
                     or a float tensor (B, 3, H, W) in [-1, 1]
                     (images of another size go through the one resize policy, `diffseg.data.datasets.resize_images`)
        labels:      int64 numpy (B, S, S) at seg.image_size, the ensemble's majority vote
        uncertainty: float32 numpy (B, S, S), entropy of the mean softmax minus the mean member entropy
    seg.predict_detailed(images) -> {"labels", "uncertainty", "image_score" (B,), "probs" (B, K, S, S)}
    seg.segment(images (B, 3, H, W)) -> diffseg.scoring.segmenter.Segmentation at the input's size
                                     (the Segmenter protocol)
    seg.class_names, seg.num_classes, seg.image_size, seg.recipe (FeatureConfig), seg.ensemble (MLPEnsemble)

The ensemble: E members with the paper's architecture (Linear-ReLU-BatchNorm, Linear-ReLU-BatchNorm, Linear; hidden
128/32 for fewer than 30 classes, else 256/128; weights N(0, 0.02), zero biases), stored as weights [E, in, out] and
run with batched matmuls, so all members train in one pass (`diffseg.methods.pixel_training`). Adam is elementwise,
so one Adam over the stacked weights is exactly E independent Adams; tests/test_pixel.py checks outputs, gradients
and updates against E separate `nn.Sequential` MLPs.

Prediction: majority vote over members (ties go to the lower class index, as torch.mode); per-pixel uncertainty
H(mean_e p_e) - mean_e H(p_e); per-image score = mean of the top 10% pixel uncertainties (the paper's ranking score
for DatasetDDPM filtering).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from diffseg.core.config import from_dict, to_dict
from diffseg.core.runtime import resolve_device
from diffseg.data.datasets import resize_images, resize_labels, resize_maps, resize_probs, to_tensor_image
from diffseg.methods.features import FeatureConfig, FeaturePipeline
from diffseg.models.checkpoint import MLMODEL_FILE, MODEL_SPEC, mlflow_model_data
from diffseg.models.integrity import CheckpointError, read_payload, write_payload
from diffseg.scoring.segmenter import Segmentation

BUNDLE_FORMAT = "diffseg-pixel-segmenter/1"
BUNDLE_FILE = "segmenter.pt"  # the bundle's name inside an MLflow model's data/ folder
BACKBONE_DIR = "backbone"  # a packaged backbone inside data/ (diffseg.serving.pyfunc)
BACKBONE_PREFIXES = ("random:", "diffusers:")  # backbone specs that wrap a checkpoint or a folder (features.py)


def split_backbone(spec: str) -> tuple[str, str]:
    """ "random:runs/x.pt" -> ("random:", "runs/x.pt"); "runs/x.pt" -> ("", "runs/x.pt"); "rgb" -> ("", "rgb")."""
    for prefix in BACKBONE_PREFIXES:
        if spec.startswith(prefix):
            return prefix, spec[len(prefix) :]
    return "", spec


def bundle_in_folder(folder: Path) -> tuple[Path, str | None]:
    """A pixel segmenter saved as an MLflow model (the folder, or its data/ folder) -> (the bundle file, the backbone
    spec to use: the packaged copy inside the folder, or the model URI it references)."""
    if (folder / MLMODEL_FILE).is_file():
        folder = mlflow_model_data(folder)
    spec_file = folder / MODEL_SPEC
    if not spec_file.is_file():
        raise FileNotFoundError(f"{folder}: neither a pixel-segmenter bundle file nor an MLflow model of one")
    spec = json.loads(spec_file.read_text())
    if spec.get("kind") != "pixel":
        raise CheckpointError(f"{folder}: an MLflow model of a {spec.get('kind')!r} model, not of a pixel segmenter")
    backbone = spec["backbone"]
    if spec.get("backbone_packaged"):
        prefix, rel = split_backbone(backbone)
        backbone = prefix + str(folder / rel)
    return folder / spec.get("bundle", BUNDLE_FILE), backbone


def paper_hidden(num_classes: int) -> tuple[int, int]:
    """Hidden widths of the paper's pixel classifier: 128/32 below 30 classes, else 256/128."""
    return (128, 32) if num_classes < 30 else (256, 128)


# ---------------------------------------------------------------------------------------------------- modules
class BatchedLinear(nn.Module):
    """E independent linear layers: x (E, B, in) -> (E, B, out) with weight [E, in, out]."""

    def __init__(self, members: int, in_features: int, out_features: int, std: float = 0.02):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(members, in_features, out_features) * std)
        self.bias = nn.Parameter(torch.zeros(members, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight)


class BatchedBatchNorm1d(nn.Module):
    """E independent BatchNorm1d layers over (E, B, C): statistics per member over its own batch (as nn.BatchNorm1d:
    biased variance to normalise, unbiased variance in the running estimate, momentum 0.1, eps 1e-5)."""

    def __init__(self, members: int, channels: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(members, channels))
        self.bias = nn.Parameter(torch.zeros(members, channels))
        self.register_buffer("running_mean", torch.zeros(members, channels))
        self.register_buffer("running_var", torch.ones(members, channels))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            n = x.shape[1]
            if n < 2:
                raise ValueError("BatchNorm in training needs at least 2 rows per batch")
            mean = x.mean(dim=1)  # (E, C)
            var = x.var(dim=1, unbiased=False)
            with torch.no_grad():
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * n / (n - 1), self.momentum)
                self.num_batches_tracked += 1
        else:
            mean, var = self.running_mean, self.running_var
        x = (x - mean.unsqueeze(1)) * torch.rsqrt(var.unsqueeze(1) + self.eps)
        return x * self.weight.unsqueeze(1) + self.bias.unsqueeze(1)


class MLPEnsemble(nn.Module):
    """E pixel MLPs as one module. forward(x): x (N, D) shared by all members or (E, N, D) -> logits (E, N, K)."""

    def __init__(self, in_dim: int, num_classes: int, members: int = 10, hidden: Sequence[int] | None = None):
        super().__init__()
        self.in_dim, self.num_classes, self.members = int(in_dim), int(num_classes), int(members)
        self.hidden = tuple(hidden) if hidden else paper_hidden(num_classes)
        layers: list[nn.Module] = []
        prev = self.in_dim
        for h in self.hidden:
            layers += [BatchedLinear(members, prev, h), nn.ReLU(), BatchedBatchNorm1d(members, h)]
            prev = h
        layers.append(BatchedLinear(members, prev, self.num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(0).expand(self.members, -1, -1)
        return self.layers(x)

    def config(self) -> dict[str, Any]:
        return {
            "in_dim": self.in_dim,
            "num_classes": self.num_classes,
            "members": self.members,
            "hidden": list(self.hidden),
        }

    # ---- conversion to / from E ordinary MLPs (the paper's `pixel_classifier`), used by tests and for export
    @staticmethod
    def member_mlp(in_dim: int, num_classes: int, hidden: Sequence[int] | None = None) -> nn.Sequential:
        """One ordinary MLP of the paper's architecture, with the paper's init (normal(0, 0.02), zero bias)."""
        hidden = tuple(hidden) if hidden else paper_hidden(num_classes)
        layers: list[nn.Module] = []
        prev = in_dim
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.ReLU(), nn.BatchNorm1d(h)]
            prev = h
        layers.append(nn.Linear(prev, num_classes))
        mlp = nn.Sequential(*layers)
        for m in mlp:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.02)
                nn.init.zeros_(m.bias)
        return mlp

    @classmethod
    def from_members(cls, mlps: Sequence[nn.Sequential]) -> MLPEnsemble:
        first = [m for m in mlps[0] if isinstance(m, nn.Linear)]
        ens = cls(first[0].in_features, first[-1].out_features, len(mlps), [m.out_features for m in first[:-1]])
        with torch.no_grad():
            for e, mlp in enumerate(mlps):
                for mine, theirs in zip(ens.layers, mlp):
                    if isinstance(theirs, nn.Linear):
                        mine.weight[e].copy_(theirs.weight.t())
                        mine.bias[e].copy_(theirs.bias)
                    elif isinstance(theirs, nn.BatchNorm1d):
                        for name in ("weight", "bias", "running_mean", "running_var"):
                            getattr(mine, name)[e].copy_(getattr(theirs, name))
        return ens

    def member(self, e: int) -> nn.Sequential:
        """Member e as an ordinary nn.Sequential (a copy)."""
        mlp = self.member_mlp(self.in_dim, self.num_classes, self.hidden)
        with torch.no_grad():
            for mine, theirs in zip(self.layers, mlp):
                if isinstance(theirs, nn.Linear):
                    theirs.weight.copy_(mine.weight[e].t())
                    theirs.bias.copy_(mine.bias[e])
                elif isinstance(theirs, nn.BatchNorm1d):
                    for name in ("weight", "bias", "running_mean", "running_var"):
                        getattr(theirs, name).copy_(getattr(mine, name)[e])
        return mlp.train(self.training)

    def member_state(self, e: int) -> dict[str, torch.Tensor]:
        """A copy of member e's slice of every parameter and buffer (used to freeze stopped members)."""
        out = {}
        for name, t in list(self.named_parameters()) + list(self.named_buffers()):
            if t.dim() >= 1 and t.shape[0] == self.members:
                out[name] = t.detach()[e].clone()
        return out

    def load_member_state(self, e: int, state: dict[str, torch.Tensor]) -> None:
        tensors = dict(list(self.named_parameters()) + list(self.named_buffers()))
        with torch.no_grad():
            for name, value in state.items():
                tensors[name][e].copy_(value)


# ---------------------------------------------------------------------------------------------------- prediction
def vote_and_uncertainty(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (E, N, K) -> (majority-vote labels (N,), uncertainty (N,), mean probabilities (N, K)).

    uncertainty = H(mean_e softmax_e) - mean_e H(softmax_e) (the ensemble's mutual information, >= 0).
    """
    e, _, k = logits.shape
    logp = F.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    votes = F.one_hot(logits.argmax(-1), k).sum(0)  # (N, K)
    labels = votes.argmax(-1)  # ties -> the lowest class index
    mean_p = p.mean(0)
    h_mean = -(mean_p * mean_p.clamp_min(1e-12).log()).sum(-1)
    mean_h = -(p * logp).sum(-1).mean(0)
    return labels, (h_mean - mean_h).clamp_min(0.0), mean_p


def image_score(uncertainty: torch.Tensor | np.ndarray, top_fraction: float = 0.1) -> float:
    """The paper's per-image uncertainty: mean of the top `top_fraction` pixel uncertainties."""
    u = torch.as_tensor(uncertainty).reshape(-1).float()
    k = max(1, int(u.numel() * top_fraction))
    return float(u.topk(k).values.mean())


@torch.no_grad()
def predict_pixels(
    ensemble: MLPEnsemble, features: torch.Tensor, chunk: int = 65536
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """features (N, D) -> (labels (N,), uncertainty (N,), mean probs (N, K)), in chunks to bound memory."""
    was_training = ensemble.training
    ensemble.eval()
    device = next(ensemble.parameters()).device
    outs = [
        vote_and_uncertainty(ensemble(features[i : i + chunk].to(device, torch.float32)))
        for i in range(0, len(features), chunk)
    ]
    ensemble.train(was_training)
    if not outs:
        k = ensemble.num_classes
        return torch.zeros(0, dtype=torch.long), torch.zeros(0), torch.zeros(0, k)
    return tuple(torch.cat(parts) for parts in zip(*outs))  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------- bundle
def _to_model_input(images: Any, image_size: int) -> torch.Tensor:
    """Any accepted image input -> float (B, 3, S, S) in [-1, 1], resized by the one policy."""
    if torch.is_tensor(images):
        x = images.float()
        return resize_images(x.unsqueeze(0) if x.dim() == 3 else x, image_size)
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = [images]
    out = []
    for im in images:
        pil = im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im, dtype=np.uint8))
        out.append(resize_images(to_tensor_image(pil)[None], image_size)[0])
    return torch.stack(out)


class PixelSegmenter:
    """A trained pixel segmenter: feature recipe (backbone reference + blocks/timesteps/noise) + ensemble + classes.

    The backbone is referenced, not embedded (a path to a checkpoint, "random:<ckpt>", "diffusers:<dir>" or "rgb"),
    and loaded lazily on the first `predict`. As a `diffseg.scoring.segmenter.Segmenter` it segments class labels.
    """

    kind = "classes"

    def __init__(
        self,
        ensemble: MLPEnsemble,
        recipe: FeatureConfig,
        class_names: Sequence[str],
        image_size: int,
        extra: dict[str, Any] | None = None,
        device: torch.device | str | None = None,
    ):
        self.ensemble = ensemble.eval()
        self.recipe = recipe
        self.class_names = list(class_names)
        self.image_size = int(image_size)
        self.extra = dict(extra or {})
        self.device = resolve_device(device)
        self.ensemble.to(self.device)
        self._pipeline: FeaturePipeline | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def pipeline(self) -> FeaturePipeline:
        if self._pipeline is None:
            self._pipeline = FeaturePipeline(self.recipe, self.device)
            if self._pipeline.dim != self.ensemble.in_dim:
                raise ValueError(
                    f"backbone gives {self._pipeline.dim} dims, the ensemble expects {self.ensemble.in_dim}"
                )
        return self._pipeline

    def features(self, images: Any) -> torch.Tensor:
        """(B, D, S, S) features of the images (see the module docstring for accepted inputs)."""
        return self.pipeline(_to_model_input(images, self.image_size))

    @torch.no_grad()
    def predict_detailed(self, images: Any, batch_size: int = 8) -> dict[str, np.ndarray]:
        x = _to_model_input(images, self.image_size)
        labels, unc, probs, scores = [], [], [], []
        for i in range(0, len(x), batch_size):
            f = self.pipeline(x[i : i + batch_size])  # (b, D, H, W)
            b, d, h, w = f.shape
            lab, u, p = predict_pixels(self.ensemble, f.permute(0, 2, 3, 1).reshape(-1, d))
            labels.append(lab.reshape(b, h, w).cpu())
            u = u.reshape(b, h, w).cpu()
            unc.append(u)
            probs.append(p.reshape(b, h, w, -1).permute(0, 3, 1, 2).cpu())
            scores += [image_score(ui) for ui in u]
        return {
            "labels": torch.cat(labels).numpy().astype(np.int64),
            "uncertainty": torch.cat(unc).numpy().astype(np.float32),
            "image_score": np.asarray(scores, dtype=np.float32),
            "probs": torch.cat(probs).numpy().astype(np.float32),
        }

    def predict(self, images: Any) -> tuple[np.ndarray, np.ndarray]:
        """images -> (labels int64 (B, S, S), uncertainty float32 (B, S, S)); see the module docstring."""
        out = self.predict_detailed(images)
        return out["labels"], out["uncertainty"]

    def segment(self, images: torch.Tensor, seeds: Sequence[int] | None = None) -> Segmentation:
        """The Segmenter protocol: (B, 3, H, W) in [-1, 1] -> votes, mean probabilities and uncertainty at (H, W)
        (the one resize policy: labels nearest, probabilities and uncertainty bilinear). Deterministic: no seeds."""
        size = tuple(images.shape[-2:])
        out = self.predict_detailed(images)
        return Segmentation(
            labels=resize_labels(torch.from_numpy(out["labels"]), size),
            probs=resize_probs(torch.from_numpy(out["probs"]), size),
            uncertainty=resize_maps(torch.from_numpy(out["uncertainty"]), size),
        )

    # ---- persistence: one torch.save file of tensors/strings only (loads with weights_only=True)
    def save(self, path: str | os.PathLike) -> Path:
        payload = {
            "format": BUNDLE_FORMAT,
            "recipe": json.dumps(to_dict(self.recipe)),
            "ensemble_config": json.dumps(self.ensemble.config()),
            "ensemble": {k: v.detach().cpu() for k, v in self.ensemble.state_dict().items()},
            "class_names": json.dumps(self.class_names),
            "image_size": self.image_size,
            "extra": json.dumps(self.extra, default=str),
        }
        return write_payload(path, payload)

    @classmethod
    def load(
        cls, path: str | os.PathLike, device: torch.device | str | None = None, *, allow_unverified: bool = False
    ) -> PixelSegmenter:
        """A bundle file, or an MLflow model of one (`diffseg.serving.pyfunc`: its backbone packaged inside or
        referenced by a model URI). A bundle without its integrity record is refused unless `allow_unverified` (its
        backbone, loaded when first used, follows the process-wide rule:
        `diffseg.models.integrity.unverified_allowed`)."""
        path, backbone = Path(path), None
        if path.is_dir():
            path, backbone = bundle_in_folder(path)
        payload = read_payload(path, BUNDLE_FORMAT, allow_unverified=allow_unverified)
        try:
            ecfg = json.loads(payload["ensemble_config"])
            ens = MLPEnsemble(ecfg["in_dim"], ecfg["num_classes"], ecfg["members"], ecfg["hidden"])
            ens.load_state_dict(payload["ensemble"])
            recipe = from_dict(FeatureConfig, json.loads(payload["recipe"]))
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: a pixel-segmenter bundle that does not fit together ({e})") from e
        if backbone is not None:
            recipe = dataclasses.replace(recipe, backbone=backbone)
        return cls(
            ens,
            recipe,
            json.loads(payload["class_names"]),
            int(payload["image_size"]),
            json.loads(payload["extra"]),
            device,
        )
