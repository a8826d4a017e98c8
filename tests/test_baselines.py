"""Baselines on synthetic inputs: GrabCut finds a disc, the priors have the stated geometry, k-means finds clusters,
IEM finds an off-centre object."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from diffseg.core.config import load_config
from diffseg.core.tracking import TrackingConfig
from diffseg.data.datasets import DataConfig
from diffseg.evaluation.baselines import KMeans, all_foreground, centred_box, feature_pixels, grabcut, kmeans_segment
from diffseg.evaluation.evaluate import DatasetSpec, EvalConfig, evaluate
from diffseg.evaluation.iem import IEMParams, IEMSegmenter, iem, iem_inpaint, iem_params
from diffseg.experiments.ablation import AblationConfig
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


# ---------------------------------------------------------------------------------------------------- IEM
def _off_centre_object(size: int = 32, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """A textured warm ellipse in the top-left quadrant of a noisy blue-green background: (3, H, W) in [-1, 1] and
    its (H, W) 0/1 mask. Off centre, so the centred box (and IEM's initial square) overlaps it only in part."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    obj = (((yy - 0.36) / 0.24) ** 2 + ((xx - 0.34) / 0.2) ** 2 <= 1).astype(np.uint8)
    background = np.array([-0.5, 0.1, 0.2]) + 0.15 * rng.normal(size=(size, size, 3)) + 0.2 * yy[..., None]
    foreground = np.array([0.7, 0.3, -0.4]) + 0.15 * rng.normal(size=(size, size, 3))
    image = np.where(obj[..., None] == 1, foreground, background).clip(-1, 1)
    return torch.from_numpy(image).permute(2, 0, 1).float(), obj


def test_iem_params_are_the_reference_at_128_px_and_scale_with_the_size():
    assert iem_params(128) == IEMParams()  # lolemacs/iem-code main.py: sigma 5, 11 taps, 2 reps, lmbda 0.001
    p64, p32 = iem_params(64), iem_params(32)
    assert (p64.sigma, p64.kernel_size) == (2.5, 7)  # the reference README's 2x-downsampled setting
    assert (p32.sigma, p32.kernel_size, p32.iters) == (1.25, 5, 150)
    assert p32.lmbda == pytest.approx(0.016)  # 0.001 * (128 / 32)^2: the same per-pixel balance
    assert (
        iem_params(32, sigma=2.0, kernel_size=None).sigma == 2.0 and iem_params(32, kernel_size=None).kernel_size == 5
    )
    with pytest.raises(ValueError, match="odd"):
        iem_params(32, kernel_size=4)
    with pytest.raises(ValueError, match="unknown setting"):
        iem_params(32, sigmaa=1.0)


def test_iem_inpainter_fills_a_hole_from_its_surroundings():
    """phi(x m, m) is a normalised convolution: a constant image is inpainted exactly, wherever the hole is."""
    x = torch.full((1, 3, 16, 16), 0.3)
    m = torch.ones(1, 1, 16, 16)
    m[..., 4:12, 4:12] = 0
    pred = iem_inpaint(x * m, m, torch.tensor([0.25, 0.5, 0.25]), reps=2)
    assert torch.allclose(pred, x, atol=1e-5)


def test_iem_finds_an_off_centre_object():
    image, obj = _off_centre_object()
    box = centred_box(obj.shape).astype(np.uint8)
    labels = IEMSegmenter().segment(image[None]).labels[0].numpy().astype(np.uint8)
    iou_box = foreground_metrics(box[None], obj[None]).iou
    iou_iem = foreground_metrics(labels[None], obj[None]).iou
    assert iou_iem > 0.8 and iou_iem > iou_box + 0.3, (iou_iem, iou_box)


def test_iem_is_deterministic_and_each_image_independent_of_its_batch():
    images = torch.stack([_off_centre_object(seed=s)[0] for s in range(3)])
    images[2] = images[2].flip(-1)
    seg = IEMSegmenter(batch_size=2)
    out = seg.segment(images, seeds=[5, 6, 7])
    assert out.labels.shape == (3, 32, 32) and out.labels.dtype == torch.long
    assert set(out.labels.unique().tolist()) <= {0, 1} and seg.kind == "regions" and len(seg.class_names) == 2
    torch.testing.assert_close(seg.segment(images).labels, out.labels)  # no randomness: the seeds change nothing
    torch.testing.assert_close(IEMSegmenter().segment(images[2:]).labels, out.labels[2:])  # alone == in a batch
    assert not torch.equal(out.labels[0], out.labels[2])  # the flipped image gets its own (flipped) mask
    masks = iem(images[:1], iem_params(32, iters=0))  # no update: the initial square (margin 0.2 = size // 5)
    assert masks[0, 6:26, 6:26].all() and masks.sum() == 20 * 20


def test_iem_in_the_evaluation_tables(tmp_path):
    """`iem` is a method of evaluate (config section `iem:`), of every evaluation table and of the ablations'
    baselines; it scores a synthetic folder end to end."""
    configs = Path(__file__).resolve().parents[1] / "jobs" / "configs"
    for name in ("eval_horse.yaml", "eval_face3.yaml", "eval_flowers.yaml", "eval_flowers17.yaml"):
        cfg = load_config(EvalConfig, configs / name)
        assert "iem" in cfg.methods and cfg.iem.iters == 150, name
    for name in ("ablation_cpu_horses.yaml", "ablation_tiny.yaml"):
        load_config(AblationConfig, configs / name).check()
        assert "iem" in load_config(AblationConfig, configs / name).baselines, name
    flowers = load_config(EvalConfig, configs / "eval_flowers17.yaml")
    assert flowers.datasets[0].data.image_size == 32 and "flowers17-dev-300" in flowers.datasets[0].data.root
    spec = DatasetSpec(name="syn", protocol="foreground", data=DataConfig(name="synthetic", image_size=16,
                       num_images=12, num_test=4))  # fmt: skip
    cfg = EvalConfig(name="t", output_dir=str(tmp_path), datasets=(spec,), methods=("centred_box", "iem"),
                     num_figure_images=0, tracking=TrackingConfig(enabled=False))  # fmt: skip
    rows = {r["method"]: r for r in evaluate(cfg, tmp_path / "t")["rows"]}
    assert 0.0 <= rows["iem"]["metrics"]["fg_iou"] <= 1.0 and rows["iem"]["info"]["kernel_size"] == 3
