"""Baselines on synthetic inputs: GrabCut finds a disc, the priors have the stated geometry, k-means finds clusters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffseg.evaluation.baselines import KMeans, all_foreground, centred_box, feature_pixels, grabcut, kmeans_segment
from diffseg.scoring.metrics import foreground_metrics
from diffseg.scoring.regions import hungarian_miou


def _disc_image(size: int = 64, radius: int = 18, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A bright textured disc on a dark noisy background: (H, W, 3) uint8 image and (H, W) 0/1 disc mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    disc = ((yy - size / 2 + 0.5) ** 2 + (xx - size / 2 + 0.5) ** 2 <= radius**2).astype(np.uint8)
    background = rng.normal(40, 12, size=(size, size, 3))
    # Texture: a stripe pattern plus noise, so the disc is not a flat colour.
    stripes = 25 * np.sin(xx / 2.0)[..., None] * np.array([1.0, 0.6, 0.3])
    foreground = np.array([210, 170, 90]) + stripes + rng.normal(0, 15, size=(size, size, 3))
    image = np.where(disc[..., None] == 1, foreground, background)
    return np.clip(image, 0, 255).astype(np.uint8), disc


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_grabcut_recovers_disc():
    image, disc = _disc_image()
    mask = grabcut(image, margin=0.1, iterations=5, seed=0)
    assert mask.shape == disc.shape and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 1}
    assert _iou(mask, disc) > 0.8
    # Scored by the foreground protocol too; and deterministic for a fixed seed.
    assert foreground_metrics(mask[None], disc[None]).iou > 0.8
    np.testing.assert_array_equal(grabcut(image, margin=0.1, iterations=5, seed=0), mask)


def test_grabcut_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(8, 8\)"):
        grabcut(np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        grabcut(np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="margin"):
        grabcut(np.zeros((8, 8, 3), dtype=np.uint8), margin=0.5)


def test_trivial_priors():
    assert all_foreground((5, 7)).sum() == 35
    box = centred_box((8, 12))  # default margin 0.25 per side: the central 4 x 6, a quarter of the area
    assert box.shape == (8, 12) and box.dtype == np.uint8
    assert box.sum() == 8 * 12 // 4
    rows, cols = np.nonzero(box)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (2, 5, 3, 8)
    batch = centred_box((3, 10, 10), margin=0.1)  # central 8 x 8 of each image
    assert batch.shape == (3, 10, 10) and (batch.sum(axis=(1, 2)) == 64).all()


def _two_cluster_features(seed: int = 0, c: int = 6, size: int = 16) -> tuple[torch.Tensor, np.ndarray]:
    """(C, H, W) features whose pixels form two clusters (a centred square vs the rest) and the (H, W) truth."""
    g = torch.Generator().manual_seed(seed)
    truth = np.zeros((size, size), dtype=np.int64)
    truth[4:12, 4:12] = 1
    means = torch.randn(2, c, generator=g) * 3  # (2, C) cluster centres
    # Channels on very different scales, as DDPM decoder blocks are: standardisation must cope.
    scale = torch.logspace(-2, 2, c)[:, None, None]
    feats = means[torch.from_numpy(truth)].permute(2, 0, 1) + 0.3 * torch.randn(c, size, size, generator=g)
    return feats * scale, truth


def test_kmeans_segment_recovers_clusters():
    feats, truth = _two_cluster_features()
    labels = kmeans_segment(feats, k=2, seed=0)
    assert labels.shape == truth.shape and labels.dtype == np.int64
    # Up to a permutation of cluster indices.
    assert hungarian_miou(labels[None], truth[None], num_regions=2, num_classes=2).miou == 1.0
    for normalize in ("l2", "none"):
        out = kmeans_segment(feats.numpy(), k=2, seed=0, normalize=normalize)
        assert hungarian_miou(out[None], truth[None], 2, 2).miou == 1.0


def test_kmeans_deterministic():
    feats, _ = _two_cluster_features(c=8)
    feats = feats + torch.randn(feats.shape, generator=torch.Generator().manual_seed(3))  # harder: more overlap
    a = kmeans_segment(feats, k=4, seed=7, num_iters=10)
    b = kmeans_segment(feats, k=4, seed=7, num_iters=10)
    np.testing.assert_array_equal(a, b)
    km1 = KMeans(4, num_iters=10, seed=7).fit(feature_pixels(feats))
    km2 = KMeans(4, num_iters=10, seed=7).fit(feature_pixels(feats))
    torch.testing.assert_close(km1.centers, km2.centers, rtol=0, atol=0)


def test_kmeans_fit_pooled_predict_per_image():
    # Fit once on pixels pooled over a set of images (as the paper clusters per data set), assign each image.
    f1, t1 = _two_cluster_features(seed=0)
    f2 = f1.flip(-1) + 0.01  # same clusters, mirrored layout
    t2 = t1[:, ::-1]
    km = KMeans(2, seed=0).fit(feature_pixels(torch.stack([f1, f2])))  # (2 * 16 * 16, C) pixels
    maps = km.predict_map(torch.stack([f1, f2]))  # (2, H, W)
    assert maps.shape == (2, 16, 16)
    np.testing.assert_array_equal(km.predict_map(f2), maps[1])
    # One labelling for the whole set: dataset-level matching is exact.
    assert hungarian_miou(maps, np.stack([t1, t2]), 2, 2).miou == 1.0
    assert km.centers.shape == (2, 6)


def test_kmeans_errors_and_edge_cases():
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        kmeans_segment(torch.zeros(4, 4), k=2)
    with pytest.raises(RuntimeError, match="before fit"):
        KMeans(2).predict(torch.zeros(3, 2))
    # Fewer distinct points than clusters: still k centres, no NaN.
    km = KMeans(3, seed=0).fit(torch.tensor([[0.0, 1.0]] * 5 + [[1.0, 0.0]] * 5))
    assert km.centers.shape == (3, 2) and torch.isfinite(km.centers).all()
