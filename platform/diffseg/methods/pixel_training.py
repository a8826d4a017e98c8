"""Training the pixel classifiers' ensemble (`diffseg.methods.pixel.MLPEnsemble`) on streamed diffusion features.

    ensemble, result = train_ensemble(shards, num_classes, PixelTrainConfig(...), device)  # MLPEnsemble, TrainResult

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
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffseg.core.runtime import PhaseLog
from diffseg.methods.pixel import BatchedBatchNorm1d, MLPEnsemble


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
    phase = PhaseLog("ensemble", cfg.max_iterations, "it")  # open-ended (early stopping) unless max_iterations
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
            phase.update(it, lambda: f"epoch {epoch + 1}, {e_count - len(frozen)}/{e_count} members training")  # noqa: B023
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
    phase.finish(f"{epoch + 1} epochs, {e_count} members ({sum(s >= 0 for s in stopped_at)} stopped early)")
    return ens, TrainResult(it, epoch + 1, stopped_at, last_loss, seconds, peak, windows, bn_mode)
