"""Robustness to corruptions (the paper's Figure 6): corruptions at the native size, the job on a tiny config (slow)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffseg.core.tracking import TrackingConfig
from diffseg.core.viz import to_uint8
from diffseg.data.datasets import DataConfig, build_dataset, write_synthetic_folder
from diffseg.evaluation.evaluate import evaluate_segmenter
from diffseg.experiments.robustness import CORRUPTIONS, RobustnessConfig, corrupt_images, model_items
from diffseg.methods.features import FeatureConfig
from diffseg.methods.pixel import PixelSegmenter
from diffseg.methods.pixel_training import PixelTrainConfig
from test_extract_features import tiny_checkpoint


def test_config_checks_names_and_severities():
    assert len(CORRUPTIONS) == 19 and len(set(CORRUPTIONS)) == 19
    RobustnessConfig(checkpoint="c.pt").check()
    with pytest.raises(ValueError, match="corruptions: unknown"):
        RobustnessConfig(checkpoint="c.pt", corruptions=("gaussian_noise", "rain")).check()
    with pytest.raises(ValueError, match="severities"):
        RobustnessConfig(checkpoint="c.pt", severities=(0, 6)).check()


def test_corruptions_are_seeded_and_grow_with_severity():
    pytest.importorskip("imagecorruptions")
    rng = np.random.default_rng(0)
    images = rng.integers(60, 200, (2, 64, 64, 3), dtype=np.uint8)
    np.testing.assert_array_equal(corrupt_images(images, "gaussian_noise", 0), images)  # severity 0: clean
    a = corrupt_images(images, "gaussian_noise", 3, seed=1)
    np.testing.assert_array_equal(a, corrupt_images(images, "gaussian_noise", 3, seed=1))  # repeatable
    assert not np.array_equal(a, corrupt_images(images, "gaussian_noise", 3, seed=2))
    noise = a.astype(int) - images
    assert not np.array_equal(noise[0], noise[1])  # each image its own noise
    diffs = [np.abs(corrupt_images(images, "gaussian_noise", s).astype(int) - images).mean() for s in (1, 3, 5)]
    assert diffs[0] < diffs[1] < diffs[2]
    for name in ("frost", "contrast", "pixelate"):
        out = corrupt_images(images, name, 5)
        assert out.shape == images.shape and out.dtype == np.uint8 and not np.array_equal(out, images)


@pytest.mark.slow
def test_robustness_job_scores_every_method_corruption_and_severity(tmp_path, label_ray):
    pytest.importorskip("imagecorruptions")
    import mlflow

    from diffseg.experiments.robustness import run_robustness

    # 64 px originals (corrupted at 64), a 16 px DDPM (scored at 16)
    root = write_synthetic_folder(tmp_path / "data", num_images=6, image_size=64)
    data = DataConfig(name="folder", root=str(root), image_size=16, num_train=3, num_test=3)
    tracking = TrackingConfig(experiment="robust", uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg = RobustnessConfig(
        name="rb",
        output_dir=str(tmp_path / "out"),
        checkpoint=str(tiny_checkpoint(tmp_path / "c.pt")),
        features=FeatureConfig(blocks=("dec.1", "dec.2"), timesteps=(5, 30), batch_size=2),
        train_data=data,
        train_limit=3,
        test_data=data,
        variants=("ddpm", "supervised"),
        train=PixelTrainConfig(members=2, max_epochs=2),
        supervised_steps=3,
        supervised_batch_size=2,
        corruptions=("gaussian_noise", "contrast"),
        severities=(1, 5),
        corrupt_size=64,
        device="cpu",
        tracking=tracking,
    )
    res = run_robustness(cfg)
    out = tmp_path / "out" / "rb"
    saved = json.loads((out / "results.json").read_text())
    assert saved["corrupt_size"] == 64 and saved["model_size"] == 16
    for v in ("ddpm", "supervised"):
        assert set(saved["miou"][v]) == {"clean", "gaussian_noise", "contrast"}
        for c in ("gaussian_noise", "contrast"):
            assert set(saved["miou"][v][c]) == {"1", "5"}
            assert all(0.0 <= saved["miou"][v][c][s]["miou"] <= 1.0 for s in ("1", "5"))
        mean5 = np.mean([saved["miou"][v][c]["5"]["miou"] for c in ("gaussian_noise", "contrast")])
        assert res["summary"][v][5] == pytest.approx(mean5)
    # the clean score is the saved segmenter on the 64 px test images brought to 16 px by the one resize policy
    seg = PixelSegmenter.load(out / "ddpm" / "segmenter.pt", "cpu")
    native = build_dataset(DataConfig(name="folder", root=str(root), image_size=64, num_train=3, num_test=3), "test")
    small = build_dataset(data, "test")
    clean = to_uint8(torch.stack([native[i]["image"] for i in range(3)]))
    items = model_items(clean, torch.stack([small[i]["mask"] for i in range(3)]), ["a", "b", "c"], 16)
    expected = evaluate_segmenter(seg, items, class_names=seg.class_names).metrics["test/miou"]
    assert saved["miou"]["ddpm"]["clean"]["0"]["miou"] == pytest.approx(expected)
    table = (out / "table.md").read_text()
    assert "averaged over 2 corruptions" in table and "gaussian_noise" in table and "supervised U-Net" in table
    assert (out / "robustness.png").stat().st_size > 0
    client = mlflow.MlflowClient(tracking_uri=tracking.uri)
    runs = client.search_runs([client.get_experiment_by_name("robust").experiment_id])
    parent = next(r for r in runs if r.info.run_name == "rb")
    m = parent.data.metrics
    assert m["robust/ddpm/s5/miou"] == pytest.approx(res["summary"]["ddpm"][5])
    assert m["robust/supervised/contrast/s1/miou"] == pytest.approx(
        saved["miou"]["supervised"]["contrast"]["1"]["miou"]
    )
    assert {"rb/ddpm", "rb/supervised"} <= {r.info.run_name for r in runs}
