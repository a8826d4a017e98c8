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
run with batched matmuls, so all members train in one pass. Adam is elementwise, so one Adam over the stacked
weights is exactly E independent Adams; tests/test_pixel.py checks outputs, gradients and updates against E separate
`nn.Sequential` MLPs.

Training (`train_ensemble`) follows ddpm-segmentation `train_interpreter.py: train`, where every member draws its
batches of 64 from ALL labelled pixels of all images (`DataLoader(shuffle=True, drop_last=True)`, a new permutation
per member and epoch), Adam 1e-3, and the stopping rule per member: at most 100 epochs; from the 5th epoch on
(epoch > 3), a member whose batch loss has not beaten its best for more than 50 consecutive iterations stops (its
weights are then frozen while the others continue). The pixels are streamed from a `ShardSet` by `pixel_batches`:
windows of at most `shuffle_buffer_mb` of features, gathered from randomly chosen row groups of all shards, and each
member its own permutation of each window. When the labelled set fits in one window (20 images at 32 px: 27 MB)
this IS the reference's stream; when it does not, memory stays bounded by the window and each batch still mixes the
pixels of the many images in the window.

BatchNorm statistics (`bn_stats`): the reference keeps nn.BatchNorm1d's running averages (momentum 0.1) of its
shuffled batches, i.e. estimates of the whole labelled set's statistics. "running" does the same; "recompute"
replaces them after training by the exact mean and variance of each BatchNorm input over the whole labelled set
(`recompute_batchnorm`, streamed, layer by layer); "auto" (the default) is "running" when the set fits in one
window (the reference's behaviour) and "recompute" when it does not, where the running averages would describe
only the last windows.

Prediction: majority vote over members (ties go to the lower class index, as torch.mode); per-pixel uncertainty
H(mean_e p_e) - mean_e H(p_e); per-image score = mean of the top 10% pixel uncertainties (the paper's ranking score
for DatasetDDPM filtering).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

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


# ---------------------------------------------------------------------------------------------------- training
@dataclass(frozen=True)
class PixelTrainConfig:
    members: int = 10  # ensemble size E (the paper: 10)
    hidden: tuple[int, ...] = ()  # hidden widths; empty = the paper's (128, 32) below 30 classes, else (256, 128)
    lr: float = 1e-3  # Adam learning rate (the paper: 1e-3)
    batch_size: int = 64  # pixels per batch per member (the paper: 64)
    max_epochs: int = 100  # passes over all shards (the paper: at most 100)
    patience: int = 50  # stop a member after more than this many iterations without a new best batch loss
    check_after_epoch: int = 3  # the stopping rule is active for epochs > this (0-based, as the paper)
    max_iterations: int = 0  # hard cap on iterations (0 = none; for quick CPU runs, stated wherever used)
    member_shuffle: bool = True  # each member its own row order (the reference: one loader, reshuffled per member)
    shuffle_buffer_mb: float = 1024.0  # float16 features held at once for shuffling; the whole set when it fits
    bn_stats: Literal["auto", "running", "recompute"] = "auto"  # BatchNorm statistics at test time (module docstring)
    seed: int = 0  # init and shuffling


@dataclass
class TrainResult:
    iterations: int = 0
    epochs: int = 0
    stopped_at: list[int] = field(default_factory=list)  # iteration at which each member stopped (-1 = never)
    final_loss: list[float] = field(default_factory=list)  # each member's last batch loss
    seconds: float = 0.0
    peak_rows_in_memory: int = 0  # the largest window held (rows); memory is bounded by it
    windows_per_epoch: int = 0  # 1 = the whole labelled set was shuffled as one (the reference's stream)
    bn_stats: str = ""  # how the BatchNorm statistics were obtained ("running" or "recompute")


def make_optimizer(params: Any, lr: float) -> torch.optim.Optimizer:
    """Adam, fused when the build supports it: one pass over the stacked [E, ...] weights instead of ~10 elementwise
    passes, which otherwise dominate a CPU step of the batched ensemble (same update rule, same numbers)."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


def ensemble_train_step(
    ensemble: MLPEnsemble, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """One Adam step on x (E, B, D) / y (E, B); returns each member's loss (E,). The summed loss gives every member
    exactly the gradient of its own mean cross-entropy."""
    logits = ensemble(x)  # (E, B, K)
    losses = F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1)  # (E,)
    optimizer.zero_grad(set_to_none=True)
    losses.sum().backward()
    optimizer.step()
    return losses.detach()


def buffer_rows(cfg: PixelTrainConfig, feature_dim: int) -> int:
    """Rows of float16 features that fit in `cfg.shuffle_buffer_mb` (at least one batch)."""
    return max(cfg.batch_size, int(cfg.shuffle_buffer_mb * 2**20 // (2 * max(1, feature_dim))))


@dataclass
class StreamBatch:
    """One iteration's batches, one per member."""

    x: torch.Tensor  # (E, b, D) float16 features
    y: torch.Tensor  # (E, b) int64 labels
    shard: np.ndarray  # (E, b) int32: the shard each row came from (what the mixing test reads)
    window: int  # index of the window within the epoch
    window_rows: int  # rows of that window


def pixel_batches(
    shards: Any, members: int, batch_size: int, max_rows: int, epoch_seed: int, rng: np.random.Generator,
    member_shuffle: bool = True,
) -> Iterator[StreamBatch]:  # fmt: skip
    """One epoch of the ensemble's pixel stream: for each window of `shards.iter_windows(max_rows, epoch_seed)`,
    every member walks its own permutation of the window's rows in batches of `batch_size`, dropping the last
    incomplete batch as the reference's `DataLoader(drop_last=True)` (a window smaller than one batch is one batch).
    Rows with label < 0 (unlabelled) are skipped. All members step together, so each iteration is one (E, b, D)
    tensor; the window is released before the next one is read."""
    w = -1
    # (no enumerate: its cached result tuple would keep the previous window alive while the next one is read)
    for window in shards.iter_windows(max_rows, seed=epoch_seed):
        w += 1
        keep = window.labels >= 0
        feats, labels, source = window.features, window.labels, window.shard_index
        if not keep.all():
            feats, labels, source = feats[keep], labels[keep], source[keep]
        del window
        n = len(labels)
        if n < 2:  # BatchNorm needs 2 rows
            continue
        b = min(batch_size, n)
        num_batches = n // b
        if member_shuffle:
            order = np.stack([rng.permutation(n)[: num_batches * b] for _ in range(members)])  # (E, nb*b)
        else:
            order = np.broadcast_to(np.arange(num_batches * b), (members, num_batches * b))
        order = order.reshape(members, num_batches, b)
        feats_t, labels_t = torch.from_numpy(feats), torch.from_numpy(labels)
        for j in range(num_batches):
            idx = order[:, j]  # (E, b)
            idx_t = torch.from_numpy(np.ascontiguousarray(idx))
            yield StreamBatch(feats_t[idx_t], labels_t[idx_t], source[idx], w, n)
        del feats, labels, source, feats_t, labels_t, order


@torch.no_grad()
def recompute_batchnorm(
    ensemble: MLPEnsemble, shards: Any, max_rows: int, device: torch.device | str = "cpu", chunk_mb: float = 32.0
) -> None:
    """Set every BatchNorm layer's running mean and (unbiased) variance to the exact statistics of its input over
    ALL labelled rows of `shards` (label >= 0), one streamed pass per BatchNorm layer, in order, so each layer sees
    the inputs that the already-updated layers before it produce at test time (eval mode). Per member. Rows go
    through in chunks of `chunk_mb` of float32 features, so the pass adds little to the window's memory."""
    chunk = max(64, int(chunk_mb * 2**20 // (4 * ensemble.in_dim)))
    was_training = ensemble.training
    ensemble.eval()
    layers = list(ensemble.layers)
    for i, bn in enumerate(layers):
        if not isinstance(bn, BatchedBatchNorm1d):
            continue
        head = nn.Sequential(*layers[:i])
        count, mean, m2 = 0, None, None
        for window in shards.iter_windows(max_rows, seed=0):
            keep = window.labels >= 0
            feats = window.features[keep] if not keep.all() else window.features
            for s in range(0, len(feats), chunk):
                x = torch.from_numpy(feats[s : s + chunk]).to(device, torch.float32)
                h = head(x.unsqueeze(0).expand(ensemble.members, -1, -1)).double()  # (E, n, C)
                n = h.shape[1]
                b_mean = h.mean(1)  # (E, C)
                b_m2 = ((h - b_mean.unsqueeze(1)) ** 2).sum(1)
                if mean is None:
                    count, mean, m2 = n, b_mean, b_m2
                else:  # Chan et al.'s pairwise merge of (count, mean, M2)
                    delta = b_mean - mean
                    total = count + n
                    mean = mean + delta * (n / total)
                    m2 = m2 + b_m2 + delta**2 * (count * n / total)
                    count = total
            del window, feats
        if count < 2:
            raise ValueError("recompute_batchnorm: fewer than 2 labelled rows")
        bn.running_mean.copy_(mean.to(bn.running_mean))
        bn.running_var.copy_((m2 / (count - 1)).to(bn.running_var))
    ensemble.train(was_training)


def train_ensemble(
    shards: Any,
    num_classes: int,
    cfg: PixelTrainConfig = PixelTrainConfig(),
    device: torch.device | str = "cpu",
    ensemble: MLPEnsemble | None = None,
    log: Callable[[dict[str, float], int], None] | None = None,
) -> tuple[MLPEnsemble, TrainResult]:
    """Train an ensemble on a `ShardSet` (or `MemoryShardSet`) by the reference's recipe (module docstring), streaming
    windows of at most `cfg.shuffle_buffer_mb` of features. Rows with label < 0 are skipped."""
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    dim = shards.meta.feature_dim
    ens = ensemble or MLPEnsemble(dim, num_classes, cfg.members, cfg.hidden or None)
    ens = ens.to(device).train()
    e_count = ens.members
    opt = make_optimizer(ens.parameters(), cfg.lr)
    best = [math.inf] * e_count
    breaks = [0] * e_count
    stopped_at = [-1] * e_count
    frozen: dict[int, dict[str, torch.Tensor]] = {}
    last_loss = [math.nan] * e_count
    rng = np.random.default_rng(cfg.seed)
    max_rows = buffer_rows(cfg, dim)
    windows = shards.num_windows(max_rows, seed=cfg.seed * 100003)  # the first epoch's (1 = the whole set at once)
    it, epoch, peak = 0, 0, 0
    t0 = time.perf_counter()
    done = False
    for epoch in range(cfg.max_epochs):
        stream = pixel_batches(
            shards, e_count, cfg.batch_size, max_rows, cfg.seed * 100003 + epoch, rng, cfg.member_shuffle
        )
        for batch in stream:
            peak = max(peak, batch.window_rows)
            x = batch.x.to(device, torch.float32)  # (E, b, D)
            y = batch.y.to(device)
            del batch
            losses = ensemble_train_step(ens, opt, x, y).tolist()
            it += 1
            for m, state in frozen.items():  # stopped members keep their weights (and BatchNorm statistics)
                ens.load_member_state(m, state)
            for e in range(e_count):
                if e in frozen:
                    continue
                last_loss[e] = losses[e]
                if epoch > cfg.check_after_epoch:
                    if losses[e] < best[e]:
                        best[e], breaks[e] = losses[e], 0
                    else:
                        breaks[e] += 1
                    if breaks[e] > cfg.patience:
                        stopped_at[e] = it
                        frozen[e] = ens.member_state(e)
            if log is not None and it % 100 == 0:
                live = [last_loss[e] for e in range(e_count) if e not in frozen] or last_loss
                log({"train/loss": float(np.mean(live)), "train/active_members": e_count - len(frozen)}, it)
            if len(frozen) == e_count or (cfg.max_iterations and it >= cfg.max_iterations):
                done = True
                break
        stream.close()  # releases the window it holds
        if done:
            break
    bn_mode = cfg.bn_stats if cfg.bn_stats != "auto" else ("running" if windows <= 1 else "recompute")
    if bn_mode == "recompute":
        recompute_batchnorm(ens, shards, max_rows, device)
    ens.eval()
    seconds = time.perf_counter() - t0
    return ens, TrainResult(it, epoch + 1, stopped_at, last_loss, seconds, peak, windows, bn_mode)


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
