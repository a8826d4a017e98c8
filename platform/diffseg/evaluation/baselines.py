"""Baselines that need no diffusion model of their own: GrabCut, trivial priors, k-means on pixel features.

- `grabcut`: OpenCV's GrabCut (Rother et al. 2004) initialised with a centred rectangle, the classic unsupervised
  foreground baseline of the ReDO / IEM tables.
- `all_foreground`, `centred_box`: the trivial priors those tables also report (object-centric data sets put the object
  in the middle, so a centred box is a strong floor).
- IEM (Savarese et al., CVPR 2021), the training-free inpainting-error baseline, has its own module:
  `diffseg.evaluation.iem`.
- `KMeans`, `kmeans_segment`: k-means over per-pixel feature vectors. On DDPM U-Net decoder features supplied by the
  caller this is the "DatasetDDPM-unsup" baseline of Baranchuk et al. (2022), which clusters the pixels of a data set
  and assigns each image's pixels to the nearest centre; on raw pixels it is a colour clustering baseline.

Every mask is returned as NumPy, (H, W) or (..., H, W), ready for `diffseg.scoring.metrics`.

- Supervised networks: `SupervisedUNet` (the same ADM U-Net trained on labels, the upper bound) and ONE trainer for
  any segmentation network, `train_supervised` (also DatasetDDPM's DeepLabV3).

Each baseline is also a `diffseg.scoring.segmenter.Segmenter` (`PriorSegmenter`, `GrabCutSegmenter`,
`KMeansSegmenter`, `NetworkSegmenter`; `iem.IEMSegmenter`), so `diffseg.evaluation.evaluate` scores them on the
same path as the diffusion methods.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffseg.core.runtime import PhaseLog
from diffseg.core.viz import to_uint8
from diffseg.data.datasets import resize_images, resize_probs
from diffseg.models.unet import UNet, UNetConfig, build_out
from diffseg.scoring.segmenter import Segmentation

log = logging.getLogger(__name__)

ArrayLike = np.ndarray | torch.Tensor
Normalize = Literal["standardize", "l2", "none"]

# Distances are computed this many pixels at a time, so (P, K) never has to coexist with a (P, C) copy per chunk.
_CHUNK = 65536


# ---------------------------------------------------------------------------------------------------------------------
# GrabCut and trivial priors


def _box(height: int, width: int, margin: float) -> tuple[int, int, int, int]:
    """(x, y, w, h) of the rectangle that leaves `margin` of each side free on all four sides."""
    if not 0.0 <= margin < 0.5:
        raise ValueError(f"margin is a fraction of each side per border and must be in [0, 0.5), got {margin}")
    x0, y0 = round(margin * width), round(margin * height)
    w, h = width - 2 * x0, height - 2 * y0
    if w < 1 or h < 1:
        raise ValueError(f"margin={margin} leaves an empty box in a {height}x{width} image")
    return x0, y0, w, h


def grabcut(image: ArrayLike, margin: float = 0.1, iterations: int = 5, seed: int = 0) -> np.ndarray:
    """Foreground mask (H, W) uint8 in {0, 1} of an RGB image (H, W, 3) uint8 by GrabCut.

    GrabCut is initialised with a centred rectangle: the pixels outside it (a border of `margin` x H rows at top and
    bottom and `margin` x W columns at left and right; default 0.1, i.e. a box over the central 80% of each side) are
    hard background, those inside probable foreground. `iterations` (default 5) rounds of GMM re-estimation and
    graph cut follow (`cv2.grabCut(..., cv2.GC_INIT_WITH_RECT)`). Definite and probable foreground are foreground.
    The GMMs are seeded by k-means on OpenCV's global RNG, so `cv2.setRNGSeed(seed)` makes the result deterministic.
    Channel order (RGB or BGR) does not matter: the colour models treat the three channels alike.
    """
    img = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"grabcut needs an (H, W, 3) image, got shape {img.shape}")
    if img.dtype != np.uint8:
        raise ValueError(f"grabcut needs a uint8 image (0..255), got dtype {img.dtype}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    H, W = img.shape[:2]
    rect = _box(H, W, margin)
    mask = np.zeros((H, W), dtype=np.uint8)
    bgd_model = np.zeros((1, 65), dtype=np.float64)  # OpenCV's GMM state: 5 components x 13 numbers
    fgd_model = np.zeros((1, 65), dtype=np.float64)
    cv2.setRNGSeed(seed)
    cv2.grabCut(np.ascontiguousarray(img), mask, rect, bgd_model, fgd_model, iterations, cv2.GC_INIT_WITH_RECT)
    return ((mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)).astype(np.uint8)


def all_foreground(shape: tuple[int, ...]) -> np.ndarray:
    """Every pixel foreground: ones of `shape` ((H, W) or (N, H, W)), uint8."""
    return np.ones(shape, dtype=np.uint8)


def centred_box(shape: tuple[int, ...], margin: float = 0.25) -> np.ndarray:
    """A centred rectangle as foreground, uint8 of `shape` (..., H, W).

    `margin` is the fraction of each side left free on each border. The default 0.25 gives a box over the central
    half of the height and of the width, i.e. a quarter of the image area.
    """
    if len(shape) < 2:
        raise ValueError(f"centred_box needs a shape (..., H, W), got {shape}")
    H, W = shape[-2:]
    x0, y0, w, h = _box(H, W, margin)
    out = np.zeros(shape, dtype=np.uint8)
    out[..., y0 : y0 + h, x0 : x0 + w] = 1
    return out


# ---------------------------------------------------------------------------------------------------------------------
# k-means on per-pixel features


def feature_pixels(features: ArrayLike) -> torch.Tensor:
    """Per-pixel feature vectors (P, C) float32 of (C, H, W) or (N, C, H, W) features, pixels in row-major order."""
    x = torch.as_tensor(features)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"features must be (C, H, W) or (N, C, H, W), got shape {tuple(x.shape)}")
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).float()  # (N*H*W, C)


def _sq_dists(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """(P, K) squared Euclidean distances, chunked over pixels to bound memory."""
    c2 = (centers * centers).sum(1)  # (K,)
    out = []
    for chunk in x.split(_CHUNK):
        d = (chunk * chunk).sum(1, keepdim=True) - 2 * chunk @ centers.T + c2  # (p, K)
        out.append(d.clamp_min_(0))
    return torch.cat(out)


class KMeans:
    """k-means in torch: k-means++ initialisation from an explicit generator, then Lloyd iterations.

    Features are normalised before clustering, with statistics from the `fit` pixels that `predict` reuses:
      - "standardize" (default): per channel, (x - mean) / std, so channels of very different scale (DDPM decoder
        blocks differ by orders of magnitude) weigh alike;
      - "l2": standardise, then scale each pixel vector to unit L2 norm (spherical k-means on directions);
      - "none": raw features.
    Fit on the pixels of one image or on pixels pooled over a data set (the paper clusters per data set), then
    `predict` per image. Lloyd iterations stop early once no assignment changes; an empty cluster is re-seeded at the
    pixel farthest from its centre, so exactly `num_clusters` centres always exist.
    """

    def __init__(self, num_clusters: int, num_iters: int = 20, seed: int = 0, normalize: Normalize = "standardize"):
        if num_clusters < 1:
            raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
        if normalize not in ("standardize", "l2", "none"):
            raise ValueError(f"normalize must be 'standardize', 'l2' or 'none', got {normalize!r}")
        self.num_clusters = num_clusters
        self.num_iters = num_iters
        self.seed = seed
        self.normalize = normalize
        self.mean: torch.Tensor | None = None  # (C,)
        self.std: torch.Tensor | None = None  # (C,)
        self.centers: torch.Tensor | None = None  # (K, C), in normalised feature space

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize == "none":
            return x
        x = (x - self.mean) / self.std
        if self.normalize == "l2":
            x = torch.nn.functional.normalize(x, dim=1)
        return x

    def fit(self, pixels: ArrayLike) -> KMeans:
        """Cluster (P, C) pixel features (use `feature_pixels` for (N, C, H, W) maps). Returns self."""
        x = torch.as_tensor(pixels).float()
        if x.ndim != 2:
            raise ValueError(f"fit needs (P, C) pixel features, got shape {tuple(x.shape)}")
        P, K = x.shape[0], self.num_clusters
        if P < K:
            raise ValueError(f"cannot fit {K} clusters to {P} pixels")
        self.mean = x.mean(0)
        # A constant channel carries no information; dividing by 1 keeps it constant (0) instead of NaN.
        std = x.std(0)
        self.std = torch.where(std > 1e-12, std, torch.ones_like(std))
        x = self._normalise(x)
        # The generator lives on the CPU so the same seed gives the same centres on any device.
        generator = torch.Generator().manual_seed(self.seed)
        centers = self._kmeans_pp(x, generator)
        labels = None
        for _ in range(self.num_iters):
            d = _sq_dists(x, centers)  # (P, K)
            new_labels = d.argmin(1)  # (P,)
            if labels is not None and torch.equal(new_labels, labels):
                break
            labels = new_labels
            centers = self._update_centers(x, labels, d, centers)
        self.centers = centers
        return self

    def _kmeans_pp(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Arthur & Vassilvitskii (2007): each next centre drawn with probability proportional to D(x)^2."""
        P = x.shape[0]
        first = int(torch.randint(P, (1,), generator=generator))
        centers = [x[first]]
        d2 = _sq_dists(x, x[first][None])[:, 0]  # (P,)
        for _ in range(1, self.num_clusters):
            total = d2.sum()
            if total <= 0:  # fewer distinct points than clusters: any pixel will do
                idx = int(torch.randint(P, (1,), generator=generator))
            else:
                # Inverse-CDF sampling: unlike torch.multinomial it has no 2^24 limit on the number of pixels.
                cdf = torch.cumsum(d2.double(), 0)  # (P,)
                u = torch.rand((), generator=generator, dtype=torch.float64).to(cdf.device)
                idx = min(int(torch.searchsorted(cdf, u * cdf[-1], right=True)), P - 1)
            centers.append(x[idx])
            d2 = torch.minimum(d2, _sq_dists(x, x[idx][None])[:, 0])
        return torch.stack(centers)  # (K, C)

    def _update_centers(
        self, x: torch.Tensor, labels: torch.Tensor, d: torch.Tensor, centers: torch.Tensor
    ) -> torch.Tensor:
        K = self.num_clusters
        sums = torch.zeros_like(centers).index_add_(0, labels, x)  # (K, C)
        counts = torch.bincount(labels, minlength=K).to(x.dtype)  # (K,)
        new = sums / counts.clamp_min(1)[:, None]
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:
            # Re-seed each empty cluster at the pixel currently worst served (deterministic, no RNG draw).
            worst = d.gather(1, labels[:, None])[:, 0].argsort(descending=True)
            for k, idx in zip(empty, worst[: len(empty)].tolist()):
                new[k] = x[idx]
        return new

    def predict(self, pixels: ArrayLike) -> torch.Tensor:
        """(P,) int64 index of the nearest centre for each of (P, C) pixel features."""
        if self.centers is None:
            raise RuntimeError("KMeans.predict called before fit")
        x = torch.as_tensor(pixels).float()
        if x.ndim != 2 or x.shape[1] != self.centers.shape[1]:
            raise ValueError(f"predict needs (P, {self.centers.shape[1]}) pixel features, got shape {tuple(x.shape)}")
        return _sq_dists(self._normalise(x.to(self.centers.device)), self.centers).argmin(1)

    def predict_map(self, features: ArrayLike) -> np.ndarray:
        """(H, W) or (N, H, W) int64 cluster map of (C, H, W) or (N, C, H, W) features."""
        x = torch.as_tensor(features)
        single = x.ndim == 3
        labels = self.predict(feature_pixels(x))  # (N*H*W,)
        labels = labels.reshape(1 if single else x.shape[0], *x.shape[-2:]).cpu().numpy()
        return labels[0] if single else labels


def kmeans_segment(
    features: ArrayLike, k: int, seed: int = 0, num_iters: int = 20, normalize: Normalize = "standardize"
) -> np.ndarray:
    """(H, W) int64 segmentation of one image's (C, H, W) pixel features into `k` clusters (see `KMeans`)."""
    x = torch.as_tensor(features)
    if x.ndim != 3:
        raise ValueError(f"kmeans_segment needs (C, H, W) features of one image, got shape {tuple(x.shape)}")
    km = KMeans(k, num_iters=num_iters, seed=seed, normalize=normalize).fit(feature_pixels(x))
    return km.predict_map(x)


# ---------------------------------------------------------------------------------------------------- supervised
class SupervisedUNet(nn.Module):
    """The upper-bound baseline: the same ADM U-Net architecture trained directly on labels.

    The timestep input is fixed at 0 (the network is a plain segmenter) and the output convolution predicts
    `num_classes` logits per pixel.
    """

    def __init__(self, cfg: UNetConfig, num_classes: int):
        super().__init__()
        self.net = UNet(cfg)
        self.net.out = build_out(self.net.out[0].num_channels, num_classes)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return self.net(x, t)  # (B, num_classes, H, W)


def train_supervised(
    net: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    *,
    steps: int = 500,
    batch_size: int = 8,
    lr: float = 1e-3,
    ignore_index: int = 255,
    seed: int = 0,
    flip: bool = True,
    train_size: int = 0,
    device: torch.device | str = "cpu",
    log_every: int = 0,
    name: str = "supervised",
    order: Literal["random", "epochs"] = "random",
    callback: Callable[[nn.Module, int], None] | None = None,
    callback_every: int = 0,
) -> nn.Module:
    """THE supervised trainer: `net(x) -> logits (B, C, h, w)` on images (N, 3, H, W) in [-1, 1] and masks (N, H, W);
    cross-entropy (ignore index honoured), Adam, random horizontal flips (`flip`) from a generator seeded `seed`.

    `order`: "random" draws every batch at random (with replacement); "epochs" walks a new permutation per epoch in
    batches of `batch_size`, dropping the incomplete last one (a `DataLoader(shuffle=True, drop_last=True)`, as the
    reference trains DeepLabV3: ddpm-segmentation `train_deeplab.py: train`). `train_size` > 0 upsamples each batch
    (images bilinear, masks nearest) to that side first (DeepLabV3 on small images). A network with BatchNorm skips a
    batch of fewer than 2 images. `callback(net, step)` runs every `callback_every` steps with the network in eval
    mode (an epoch's validation). Returns the network in eval mode.
    """
    if images.ndim != 4 or masks.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"images {tuple(images.shape)} and masks {tuple(masks.shape)} do not pair up")
    gen = torch.Generator().manual_seed(seed)
    net = net.to(device).train()
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss(ignore_index=ignore_index)
    n, b = images.shape[0], min(batch_size, images.shape[0])
    perm = torch.zeros(0, dtype=torch.long)
    phase = PhaseLog(name, steps, "steps")  # a line every ~10 s and a summary: it trained for minutes in silence
    for step in range(steps):
        if order == "epochs":
            per_epoch = n // b
            if step % per_epoch == 0:
                perm = torch.randperm(n, generator=gen)[: per_epoch * b]
            idx = perm[(step % per_epoch) * b : (step % per_epoch + 1) * b]
        else:
            idx = torch.randint(0, n, (b,), generator=gen)
        x, y = images[idx].to(device), masks[idx].long().to(device)  # (b, 3, H, W), (b, H, W)
        if flip:
            f = torch.rand(len(idx), generator=gen) < 0.5
            x[f], y[f] = x[f].flip(-1), y[f].flip(-1)
        if train_size and train_size != x.shape[-1]:
            x = F.interpolate(x, size=(train_size, train_size), mode="bilinear", align_corners=False)
            y = F.interpolate(y[:, None].float(), size=x.shape[-2:], mode="nearest")[:, 0].long()
        if has_bn and len(x) < 2:  # BatchNorm in training needs 2 images
            continue
        loss = loss_fn(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log_every and (step + 1) % log_every == 0:
            log.info(f"[{name}] step {step + 1}/{steps} loss {loss.item():.4f}")
        phase.update(step + 1, lambda: f"loss {loss.item():.4f}")  # noqa: B023 (read at once, if at all)
        if callback is not None and callback_every and (step + 1) % callback_every == 0:
            callback(net.eval(), step + 1)
            net.train()
    phase.finish(f"{b} images a step")
    return net.eval()


def train_supervised_unet(
    images: torch.Tensor,
    masks: torch.Tensor,
    num_classes: int,
    cfg: UNetConfig | None = None,
    seed: int = 0,
    **train: Any,
) -> SupervisedUNet:
    """A SupervisedUNet (default: C=32, mult 1,2,2, no attention, at the images' size), initialised from `seed` and
    trained by `train_supervised` (`train`: its keyword arguments, e.g. steps, batch_size, lr, device)."""
    size = images.shape[-1]
    cfg = cfg or UNetConfig(image_size=size, model_channels=32, channel_mult=(1, 2, 2), attention_resolutions=())
    torch.manual_seed(seed)  # the initial weights
    return train_supervised(SupervisedUNet(cfg, num_classes), images, masks, seed=seed, **train)


@torch.no_grad()
def predict_supervised(model: nn.Module, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """(N, 3, H, W) -> class maps (N, H, W)."""
    device = next(model.parameters()).device
    return torch.cat(
        [model(images[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(images), batch_size)]
    )


# ---------------------------------------------------------------------------------------------------- segmenters
class PriorSegmenter:
    """A trivial prior as a Segmenter: "all_foreground" or "centred_box" (region 1 = foreground)."""

    kind = "regions"
    class_names = ["background", "foreground"]

    def __init__(self, prior: Literal["all_foreground", "centred_box"], margin: float = 0.25):
        if prior not in ("all_foreground", "centred_box"):
            raise ValueError(f"unknown prior {prior!r}; expected 'all_foreground' or 'centred_box'")
        self.prior, self.margin = prior, margin

    def segment(self, images: torch.Tensor, seeds: Sequence[int] | None = None) -> Segmentation:
        n, _, h, w = images.shape
        mask = all_foreground((n, h, w)) if self.prior == "all_foreground" else centred_box((n, h, w), self.margin)
        return Segmentation(labels=torch.from_numpy(mask.astype(np.int64)))


class GrabCutSegmenter:
    """GrabCut from a centred rectangle as a Segmenter (region 1 = foreground)."""

    kind = "regions"
    class_names = ["background", "foreground"]

    def __init__(self, margin: float = 0.1, iterations: int = 5, seed: int = 0):
        self.margin, self.iterations, self.seed = margin, iterations, seed

    def segment(self, images: torch.Tensor, seeds: Sequence[int] | None = None) -> Segmentation:
        masks = [grabcut(img, self.margin, self.iterations, self.seed) for img in to_uint8(images)]
        return Segmentation(labels=torch.from_numpy(np.stack(masks).astype(np.int64)))


class KMeansSegmenter:
    """k-means of per-pixel features as a Segmenter: `featurize(images (B, 3, H, W)) -> (B, D, H, W)` (default: the
    pixels' colours). scope "dataset" fits ONE k-means on pixels pooled over the images given to `fit` (a seeded
    subsample of at most `fit_pixels`) and assigns each image's pixels to its centres; scope "image" clusters each
    image on its own."""

    kind = "regions"

    def __init__(
        self,
        k: int,
        featurize: Callable[[torch.Tensor], torch.Tensor] | None = None,
        scope: Literal["dataset", "image"] = "dataset",
        fit_pixels: int = 200_000,
        num_iters: int = 30,
        normalize: Normalize = "standardize",
        seed: int = 0,
    ):
        self.k, self.featurize, self.scope, self.fit_pixels = k, featurize or (lambda x: x.float()), scope, fit_pixels
        self.num_iters, self.normalize, self.seed = num_iters, normalize, seed
        self.class_names = [f"cluster {i}" for i in range(k)]
        self.kmeans: KMeans | None = None

    def fit(self, images: torch.Tensor, batch_size: int = 16) -> KMeansSegmenter:
        """Fit the centres on the pixels of `images` (scope "dataset"; nothing to do for scope "image")."""
        if self.scope == "image":
            return self
        feats = torch.cat([self.featurize(images[i : i + batch_size]).cpu() for i in range(0, len(images), batch_size)])
        pixels = feature_pixels(feats)  # (N*H*W, D)
        if pixels.shape[0] > self.fit_pixels:
            gen = torch.Generator().manual_seed(self.seed)
            pixels = pixels[torch.randperm(pixels.shape[0], generator=gen)[: self.fit_pixels]]
        self.kmeans = KMeans(self.k, num_iters=self.num_iters, seed=self.seed, normalize=self.normalize).fit(pixels)
        return self

    def segment(self, images: torch.Tensor, seeds: Sequence[int] | None = None) -> Segmentation:
        feats = self.featurize(images).cpu()  # (B, D, H, W)
        if self.scope == "image":
            opts = {"seed": self.seed, "num_iters": self.num_iters, "normalize": self.normalize}
            labels = np.stack([kmeans_segment(f, self.k, **opts) for f in feats])
        else:
            if self.kmeans is None:
                raise RuntimeError("KMeansSegmenter with scope='dataset': call fit(images) before segment")
            labels = self.kmeans.predict_map(feats)
        return Segmentation(labels=torch.from_numpy(np.asarray(labels, dtype=np.int64)))


class NetworkSegmenter:
    """Any supervised segmentation network `net(x) -> logits (B, C, h, w)` as a Segmenter of classes. With
    `image_size`, inputs go through the one resize policy to that side and the probabilities come back at the
    input's size."""

    kind = "classes"

    def __init__(self, net: nn.Module, class_names: Sequence[str], image_size: int | None = None, batch_size: int = 16):
        self.net, self.class_names = net.eval(), list(class_names)
        self.image_size, self.batch_size = image_size, batch_size

    @torch.no_grad()
    def segment(self, images: torch.Tensor, seeds: Sequence[int] | None = None) -> Segmentation:
        device = next(self.net.parameters()).device
        size = tuple(images.shape[-2:])
        probs = []
        for i in range(0, len(images), self.batch_size):
            x = images[i : i + self.batch_size]
            x = resize_images(x, self.image_size) if self.image_size else x.float()
            probs.append(resize_probs(self.net(x.to(device)).float().softmax(1), size).cpu())  # (b, C, H, W)
        p = torch.cat(probs)
        return Segmentation(labels=p.argmax(1), probs=p)


class DictOutput(nn.Module):
    """Wraps a torchvision segmentation model (which returns {"out": logits, ...}) as `net(x) -> logits`."""

    def __init__(self, model: nn.Module, key: str = "out"):
        super().__init__()
        self.model, self.key = model, key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[self.key]
