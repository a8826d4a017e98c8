"""The Segmenter protocol: images in, masks out. What `evaluate` scores, the jobs write and Serve serves.

    seg.segment(images, seeds) -> Segmentation(labels (B, H, W), probs (B, C, H, W) | None, uncertainty | None)

`images` are (B, 3, H, W) floats in [-1, 1] at any size; masks come back at that size (a segmenter with a fixed
resolution applies the one resize policy of `diffseg.data.datasets`: `resize_images` in, `resize_probs`/`resize_labels`
out). `seeds` are per-image noise seeds, already through the one seeding rule
(`diffseg.core.runtime.image_seed(seed, i)` for image i of a run seeded `seed`); a deterministic segmenter ignores them.

Implementations: the factorized model (`diffseg.methods.segment.FactorizedSegmenter`, K unsupervised regions), the pixel
ensemble (`diffseg.methods.pixel.PixelSegmenter`, classes), the baselines (`diffseg.evaluation.baselines`: priors,
GrabCut, k-means, any supervised network through `NetworkSegmenter`). `kind` says how a score must read the labels:
"regions" are unsupervised (matched to the ground truth: polarity search, Hungarian matching), "classes" are class
indices.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from diffseg.core.runtime import image_seed

Kind = Literal["regions", "classes"]


@dataclass
class Segmentation:
    """A batch of masks at the input's resolution."""

    labels: torch.Tensor  # (B, H, W) long: region or class index per pixel
    probs: torch.Tensor | None = None  # (B, C, H, W) float32 summing to 1 over C (soft masks, mean probabilities)
    uncertainty: torch.Tensor | None = None  # (B, H, W) float32, >= 0 (the method's own measure; None = none)

    def __len__(self) -> int:
        return len(self.labels)


@runtime_checkable
class Segmenter(Protocol):
    """Anything that segments images: see the module docstring."""

    kind: Kind  # "regions" (unsupervised, matched when scored) or "classes"
    class_names: list[str]  # one name per label value ("region 0".. for regions)

    def segment(self, images: torch.Tensor, seeds: Sequence[int] | None = None) -> Segmentation: ...


def num_labels(seg: Segmenter) -> int:
    """K (regions) or C (classes): the range of the segmenter's labels."""
    return len(seg.class_names)


def default_seeds(n: int, seeds: Sequence[int] | None) -> list[int]:
    """The seeds a segmenter uses when none are given: image i of a run seeded 0."""
    if seeds is None:
        return [image_seed(0, i) for i in range(n)]
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for a batch of {n} images")
    return [int(s) for s in seeds]


def segment_dataset(
    seg: Segmenter, dataset: Sequence[dict[str, Any]] | torch.utils.data.Dataset, seed: int = 0, batch_size: int = 16
) -> Iterator[tuple[list[int], list[dict[str, Any]], Segmentation]]:
    """Segment every item ({"image", "id", "mask"?, ...}) of a data set; yields (indices, items, Segmentation) per
    batch. Image i's noise seed is `image_seed(seed, i)`, so its masks do not depend on the batch. Consecutive
    images of one size share a call; a size change starts a new batch (native-resolution folders work)."""
    pending: list[tuple[int, dict[str, Any]]] = []

    def flush():
        idx = [i for i, _ in pending]
        items = [it for _, it in pending]
        images = torch.stack([it["image"] for it in items])  # (B, 3, H, W)
        out = seg.segment(images, [image_seed(seed, i) for i in idx])
        pending.clear()
        return idx, items, out

    for i in range(len(dataset)):
        item = dataset[i]
        if pending and (len(pending) == batch_size or pending[0][1]["image"].shape != item["image"].shape):
            yield flush()
        pending.append((i, item))
    if pending:
        yield flush()
