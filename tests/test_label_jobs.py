"""The label-efficient jobs end to end on tiny configs: analysis (Figures 2 and 4), DatasetDDPM, comparisons (slow)."""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffseg.core.tracking import TrackingConfig
from diffseg.data.datasets import DataConfig, build_dataset, write_synthetic_folder
from diffseg.data.shard_reader import MemoryShardSet
from diffseg.methods.features import FeatureConfig, FeaturePipeline
from diffseg.methods.pixel import MLPEnsemble, PixelSegmenter
from diffseg.methods.pixel_training import PixelTrainConfig
from test_extract_features import tiny_checkpoint


def _mlflow(tmp_path) -> TrackingConfig:
    return TrackingConfig(experiment="label-jobs", uri=f"sqlite:///{tmp_path / 'mlflow.db'}")


def _runs(tracking: TrackingConfig):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking.uri)
    exp = client.get_experiment_by_name(tracking.experiment)
    return client, client.search_runs([exp.experiment_id])


def test_analysis_job_grid_heatmap_and_kmeans(tmp_path):
    from diffseg.experiments.analysis import AnalysisConfig, run_analysis

    root = write_synthetic_folder(tmp_path / "data", num_images=6, image_size=16)
    data = DataConfig(name="folder", root=str(root), image_size=16, num_train=4, num_test=2)
    ckpt = tiny_checkpoint(tmp_path / "c.pt")
    tracking = _mlflow(tmp_path)
    cfg = AnalysisConfig(
        name="a",
        output_dir=str(tmp_path / "out"),
        backbone=str(ckpt),
        blocks=("dec.1", "dec.3"),
        timesteps=(5, 50, 90),
        train_data=data,
        train_limit=4,
        test_data=data,
        train=PixelTrainConfig(members=1, max_epochs=2, batch_size=64),
        kmeans_k=3,
        kmeans_images=2,
        device="cpu",
        tracking=tracking,
    )
    res = run_analysis(cfg)
    out = tmp_path / "out" / "a"
    grid = np.asarray(res["miou"])
    assert grid.shape == (2, 3) and np.isfinite(grid).all() and ((grid >= 0) & (grid <= 1)).all()
    assert json.loads((out / "grid.json").read_text()) == {
        "blocks": ["dec.1", "dec.3"],
        "timesteps": [5, 50, 90],
        "miou": grid.tolist(),
    }
    # Figure 4: a header row of the 2 test images, then one row of k-means maps per (timestep, block) cell
    km = np.asarray(Image.open(out / "kmeans.png"))
    pad = 2
    assert km.shape[:2] == (7 * (16 + pad) + pad, 2 * 16 + 2 * pad)
    lines = (out / "kmeans_rows.txt").read_text().splitlines()
    assert lines == ["images", "dec.1 t=5", "dec.3 t=5", "dec.1 t=50", "dec.3 t=50", "dec.1 t=90", "dec.3 t=90"]
    test = build_dataset(data, "test")
    header = km[pad : pad + 16, pad : pad + 16]
    expected = ((test[0]["image"].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
    assert np.abs(header.astype(int) - expected.astype(int)).max() <= 1  # the header is the first test image
    for r in range(1, 7):  # each cell's map uses at most k colours
        tile = km[pad + r * (16 + pad) : pad + r * (16 + pad) + 16, pad : pad + 16].reshape(-1, 3)
        assert 1 <= len(np.unique(tile, axis=0)) <= 3
    # heatmap.png: 2 blocks x 3 timesteps of distinct values -> at least 6 distinct strongly coloured pixel values
    heat = np.asarray(Image.open(out / "heatmap.png").convert("RGB")).reshape(-1, 3).astype(int)
    assert len(np.unique(heat[np.ptp(heat, axis=1) > 60], axis=0)) >= len(np.unique(grid))
    # every cell is a metric in MLflow, equal to the grid
    _, runs = _runs(tracking)
    (run,) = runs
    for i, b in enumerate(("dec.1", "dec.3")):
        for j, t in enumerate((5, 50, 90)):
            assert run.data.metrics[f"analysis/{b}/t{t}/miou"] == pytest.approx(grid[i, j])


def test_analysis_cell_equals_one_mlp_on_that_blocks_features(tmp_path):
    """One cell of the grid is exactly: features of one block at one t -> one MLP -> pooled mIoU on the test set."""
    from diffseg.experiments.analysis import AnalysisConfig, run_analysis
    from diffseg.methods.pixel import predict_pixels
    from diffseg.methods.pixel_training import train_ensemble
    from diffseg.scoring.metrics import ConfusionMatrix

    root = write_synthetic_folder(tmp_path / "data", num_images=5, image_size=16, seed=3)
    data = DataConfig(name="folder", root=str(root), image_size=16, num_train=3, num_test=2)
    ckpt = tiny_checkpoint(tmp_path / "c.pt")
    train_cfg = PixelTrainConfig(members=1, max_epochs=20, seed=1)  # long enough to predict more than background
    cfg = AnalysisConfig(
        name="a", output_dir=str(tmp_path / "out"), backbone=str(ckpt), blocks=("dec.2",), timesteps=(20,),
        train_data=data, train_limit=3, test_data=data, train=train_cfg, kmeans_images=1, device="cpu",
        tracking=TrackingConfig(enabled=False),
    )  # fmt: skip
    res = run_analysis(cfg)

    pipe = FeaturePipeline(FeatureConfig(backbone=str(ckpt), blocks=("dec.2",), timesteps=(20,)), "cpu")
    train, test = build_dataset(data, "train"), build_dataset(data, "test")
    xtr = torch.stack([train[i]["image"] for i in range(3)])
    ytr = torch.stack([train[i]["mask"] for i in range(3)]).reshape(-1).numpy()
    xte = torch.stack([test[i]["image"] for i in range(2)])
    yte = torch.stack([test[i]["mask"] for i in range(2)])
    ftr = pipe(xtr).permute(0, 2, 3, 1).reshape(-1, pipe.dim).half().numpy()
    fte = pipe(xte).permute(0, 2, 3, 1).reshape(-1, pipe.dim).half().float()
    keep = ytr != 255
    ens, _ = train_ensemble(MemoryShardSet(ftr[keep], ytr[keep]), train.num_classes, train_cfg, torch.device("cpu"))
    labels, _, _ = predict_pixels(ens, fte)
    assert len(np.unique(labels.numpy())) > 1
    cm = ConfusionMatrix(train.num_classes, 255).update(labels.reshape(yte.shape).numpy(), yte.numpy())
    assert res["miou"][0][0] == pytest.approx(cm.miou(), abs=1e-6)


def _segmenter(tmp_path, ckpt, class_names):
    torch.manual_seed(0)
    fcfg = FeatureConfig(backbone=str(ckpt), blocks=("dec.1",), timesteps=(10,))
    pipe = FeaturePipeline(fcfg, "cpu")
    ens = MLPEnsemble(pipe.dim, len(class_names), members=3)
    for p in ens.parameters():  # spread the logits so labels and uncertainty vary between samples
        p.data.add_(torch.randn_like(p) * 0.5)
    seg = PixelSegmenter(ens.eval(), fcfg, class_names, image_size=16, device="cpu")
    return seg.save(tmp_path / "seg" / "segmenter.pt")


def test_dataset_ddpm_job_samples_labels_filters_and_trains_deeplab(tmp_path, monkeypatch):
    from diffseg.experiments import dataset_ddpm
    from diffseg.experiments.dataset_ddpm import DatasetDDPMConfig, run_dataset_ddpm

    calls = []  # the reference samples with the full DDPM chain: method ddpm over all T steps (respacing None)
    real_sample = dataset_ddpm.sample

    def recording_sample(model, diffusion, n, **kw):
        calls.append((kw["method"], kw["steps"], diffusion.num_timesteps))
        return real_sample(model, diffusion, n, **kw)

    monkeypatch.setattr(dataset_ddpm, "sample", recording_sample)

    root = write_synthetic_folder(tmp_path / "data", num_images=4, image_size=16)
    data = DataConfig(name="folder", root=str(root), image_size=16, num_train=2, num_test=2)
    names = build_dataset(data, "test").class_names
    ckpt = tiny_checkpoint(tmp_path / "c.pt")
    tracking = _mlflow(tmp_path)
    cfg = DatasetDDPMConfig(
        name="d",
        output_dir=str(tmp_path / "out"),
        segmenter=str(_segmenter(tmp_path, ckpt, names)),
        num_samples=10,
        sample_batch_size=5,
        drop_fraction=0.2,
        drop_most_certain=0,  # the reference's 30 needs more than 300 samples
        arch="mobilenet_v3_large",
        epochs=2,
        batch_size=4,
        train_size=32,
        val_data=data,
        val_limit=2,
        test_data=data,
        real_baseline=True,
        device="cpu",
        tracking=tracking,
    )
    res = run_dataset_ddpm(cfg)
    out = tmp_path / "out" / "d"
    assert res["num_samples"] == 10 and res["kept"] == 8 and 0.0 <= res["miou"] <= 1.0
    assert calls == [("ddpm", None, 100)] * 2  # defaults: ancestral sampling over the checkpoint's T = 100 steps
    # two epochs of 8 // 4 = 2 steps, each validated on the 2 labelled images; the better one was kept
    epochs = json.loads((out / "epochs.json").read_text())
    assert [e["epoch"] for e in epochs[:2]] == [1, 2] and epochs[-1]["selected_epoch"] in (1, 2)
    best = max(epochs[:2], key=lambda e: e["val/miou_official"])
    assert (
        epochs[-1]["val/miou_official"] == best["val/miou_official"] == max(e["val/miou_official"] for e in epochs[:2])
    )
    assert res["selected_epoch"] == epochs[-1]["selected_epoch"]
    # the synthetic set is a valid paired folder of our format, labelled by the segmenter
    synth = build_dataset(DataConfig(name="folder", root=str(out / "synthetic"), image_size=16, num_train=10), "train")
    assert len(synth) == 10 and synth.class_names == names
    masks = np.stack([synth[i]["mask"].numpy() for i in range(10)])
    assert masks.max() < len(names) and len(np.unique(masks)) > 1
    # the segmenter's labels for a sample are what was written
    seg = PixelSegmenter.load(cfg.segmenter, "cpu")
    img = np.asarray(Image.open(out / "synthetic" / "images" / "000003.png"))
    relabel, _ = seg.predict(img)
    agree = (relabel[0] == np.asarray(Image.open(out / "synthetic" / "masks" / "000003.png"))).mean()
    assert agree > 0.9  # PNG quantisation of the image may flip a few borderline pixels
    # the most uncertain 20% are the ones dropped
    with open(out / "synthetic" / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    scores = np.array([float(r["uncertainty"]) for r in rows])
    kept = np.array([r["kept"] == "1" for r in rows])
    assert kept.sum() == 8 and scores[~kept].min() >= scores[kept].max()
    assert len(list((out / "eval" / "predictions").glob("*.png"))) == 2
    _, runs = _runs(tracking)
    assert runs[0].data.metrics["dataset/kept"] == 8 and runs[0].data.metrics["test/miou"] == pytest.approx(res["miou"])
    # the same network on the 2 real labelled images, as many steps as on the 8 kept samples (2 epochs x 2 steps):
    # 2 // 4 -> 1 step per epoch, so 4 epochs; scored on the real test images
    real = res["real_baseline"]
    assert real["images"] == 2 and real["steps"] == 4 and real["epochs"] == 4 and 0.0 <= real["miou"] <= 1.0
    assert len(list((out / "real" / "predictions").glob("*.png"))) == 2
    assert runs[0].data.metrics["real/miou"] == pytest.approx(real["miou"])
    assert (out / "samples.png").is_file() and (out / "samples_labelled.png").is_file()
    # reuse_samples: a re-run trains on the written samples and labels without sampling again
    monkeypatch.setattr(dataset_ddpm, "sample", lambda *a, **k: pytest.fail("sampled although reuse_samples"))
    again = run_dataset_ddpm(dataclasses.replace(cfg, reuse_samples=True, real_baseline=False))
    assert again["kept"] == 8 and again["real_baseline"] is None
    with open(out / "synthetic" / "scores.csv") as f:
        assert [r["kept"] for r in csv.DictReader(f)] == [r["kept"] for r in rows]
    with pytest.raises(ValueError, match="asks for 12"):
        run_dataset_ddpm(dataclasses.replace(cfg, reuse_samples=True, num_samples=12))


@pytest.mark.slow
def test_compare_job_runs_every_variant_into_one_table(tmp_path, label_ray):
    from diffseg.experiments.label_efficient import CompareConfig, run_compare

    root = write_synthetic_folder(tmp_path / "data", num_images=6, image_size=16)
    data = DataConfig(name="folder", root=str(root), image_size=16, num_train=3, num_test=3)
    names = build_dataset(data, "train").class_names
    ckpt = tiny_checkpoint(tmp_path / "c.pt")
    tracking = _mlflow(tmp_path)
    cfg = CompareConfig(
        name="cmp",
        output_dir=str(tmp_path / "out"),
        checkpoint=str(ckpt),
        features=FeatureConfig(blocks=("dec.1", "dec.2"), timesteps=(5, 30), batch_size=2),
        train_data=data,
        train_limit=3,
        test_data=data,
        train=PixelTrainConfig(members=2, max_epochs=2),
        supervised_steps=3,
        supervised_batch_size=2,
        device="cpu",
        tracking=tracking,
    )
    rows = run_compare(cfg)
    out = tmp_path / "out" / "cmp"
    assert list(rows) == ["ddpm", "random", "rgb", "supervised"]
    for r in rows.values():
        assert 0.0 <= r["miou"] <= 1.0 and set(r["iou"]) == set(names)
    # DDPM and random-init features have the same recipe and dimension; RGB is 3-dim
    assert rows["ddpm"]["dim"] == rows["random"]["dim"] == 2 * (16 + 8) and rows["rgb"]["dim"] == 3
    assert rows["ddpm"]["train_pixels"] == rows["rgb"]["train_pixels"] == 3 * 16 * 16
    for v in ("ddpm", "random", "rgb"):
        seg = PixelSegmenter.load(out / v / "segmenter.pt", "cpu")
        assert seg.recipe.backbone == {"ddpm": str(ckpt), "random": f"random:{ckpt}", "rgb": "rgb"}[v]
    table = (out / "results.md").read_text()
    assert "MLP ensemble on DDPM features" in table and "supervised U-Net" in table
    assert json.loads((out / "results.json").read_text())["rgb"]["miou"] == pytest.approx(rows["rgb"]["miou"])
    # one parent run with a child per variant, each child holding that variant's mIoU
    _, runs = _runs(tracking)
    by_name = {r.info.run_name: r for r in runs}
    parent = by_name["cmp"]
    for v in rows:
        child = by_name[f"cmp/{v}"]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.metrics["test/miou"] == pytest.approx(rows[v]["miou"])
        assert parent.data.metrics[f"test/miou/{v}"] == pytest.approx(rows[v]["miou"])
