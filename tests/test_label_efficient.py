"""The pixel job end to end on a tiny synthetic folder (raw-RGB recipe, no Ray), and DatasetDDPM's filtering."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffseg.core.config import to_dict
from diffseg.core.tracking import TrackingConfig
from diffseg.core.viz import overlay, to_uint8
from diffseg.data.datasets import DataConfig, write_synthetic_folder
from diffseg.data.shard_reader import ShardSet
from diffseg.data.shards import IncompleteShardSet, begin_shard_set, end_shard_set
from diffseg.experiments.dataset_ddpm import select_confident
from diffseg.experiments.label_efficient import (
    GapCurveConfig,
    PixelJobConfig,
    gap_prediction,
    gap_rows,
    run_gap_curve,
    run_pixel_job,
)
from diffseg.methods.features import FeatureConfig, FeatureExtractor
from diffseg.methods.pixel import PixelSegmenter
from diffseg.methods.pixel_training import PixelTrainConfig


def test_pixel_job_trains_evaluates_and_saves_a_bundle(tmp_path):
    root = write_synthetic_folder(tmp_path / "data", num_images=6, image_size=16)
    data = DataConfig(name="folder", root=str(root), image_size=16, num_train=4, num_test=2)
    from diffseg.data.datasets import build_dataset

    train = build_dataset(data, "train")
    fx = FeatureExtractor(
        to_dict(FeatureConfig(backbone="rgb")),
        str(tmp_path / "shards"),
        {"num_classes": train.num_classes, "class_names": train.class_names, "ignore_index": 255},
    )
    begin_shard_set(tmp_path / "shards", [train[i]["id"] for i in range(4)])

    def extract(batch):
        items = [train[i] for i in batch]
        fx({
            "id": np.array([it["id"] for it in items]),
            "image": np.stack([((it["image"].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy() for it in items]),
            "mask": np.stack([it["mask"].numpy().astype(np.uint8) for it in items]),
        })  # fmt: skip

    extract([0, 1])  # the extraction "fails" after its first batch
    cfg = PixelJobConfig(
        name="p",
        output_dir=str(tmp_path / "out"),
        train_shards=str(tmp_path / "shards"),
        data=data,
        train=PixelTrainConfig(members=2, max_epochs=2),
        device="cpu",
        tracking=TrackingConfig(enabled=False),
    )
    with pytest.raises(IncompleteShardSet, match=r"2 of 4 images have no shard \(e.g. \['000002', '000003'\]\)"):
        run_pixel_job(cfg)  # never trains on part of the data silently
    assert ShardSet(tmp_path / "shards", allow_incomplete=True).image_ids() == ["000000", "000001"]  # if asked to
    extract([2, 3])  # the rerun finishes it
    end_shard_set(tmp_path / "shards")
    res = run_pixel_job(cfg)
    out = tmp_path / "out" / "p"
    assert 0.0 <= res["miou"] <= 1.0 and len(res["iou"]) == train.num_classes
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 2 and metrics["test/miou"] == res["miou"]
    per_class = {k.split("/", 2)[2] for k in metrics if k.startswith("test/iou/")}
    assert per_class and per_class <= set(train.class_names)  # classes absent from prediction and truth are left out
    assert len(list((out / "predictions").glob("*.png"))) == 2
    # overlays.png: per test image, image | ground truth | prediction; the first tile is the first test image
    sheet = np.asarray(Image.open(out / "overlays.png"))
    assert sheet.shape == (2 * (16 + 2) + 2, 3 * (16 + 2) + 2, 3)
    test = build_dataset(data, "test")
    np.testing.assert_array_equal(sheet[2:18, 2:18], to_uint8(test[0]["image"]))
    prediction = np.asarray(Image.open(out / "predictions" / f"{test[0]['id']}.png"))
    expected = overlay(to_uint8(test[0]["image"]), prediction, num_classes=train.num_classes)
    np.testing.assert_array_equal(sheet[2:18, 2 + 2 * 18 : 18 + 2 * 18], expected)
    seg = PixelSegmenter.load(out / "segmenter.pt", device="cpu")
    assert seg.recipe.backbone == "rgb" and seg.class_names == train.class_names and seg.image_size == 16
    labels, unc = seg.predict(np.zeros((3, 16, 16, 3), np.uint8))
    assert labels.shape == (3, 16, 16) and (unc >= 0).all()


def test_select_confident_drops_the_most_uncertain_tenth():
    scores = np.array([0.5, 0.1, 0.9, 0.3, 0.2, 0.8, 0.05, 0.6, 0.7, 0.4])
    kept = select_confident(scores, 0.1)
    assert kept.tolist() == [0, 1, 3, 4, 5, 6, 7, 8, 9]  # index 2 (0.9) dropped
    assert len(select_confident(np.arange(100.0), 0.1)) == 90


def test_select_confident_the_reference_rule_drops_30_most_certain_too():
    """Hand-computed for the reference (train_deeplab.py: idxs = argsort(s)[30 : -f + 30]): N = 400 scores 0..399
    in a shuffled order, f = int(400 x 0.1) = 40: kept are the sorted positions 30..389, so the 30 most certain
    (scores 0..29) and the 10 most uncertain (390..399) go; 360 are kept."""
    rng = np.random.default_rng(0)
    scores = rng.permutation(400).astype(float)
    kept = select_confident(scores, 0.1, drop_most_certain=30)
    assert len(kept) == 360 and sorted(scores[kept].tolist()) == list(range(30, 390))
    assert list(kept) == sorted(kept)  # indices in sample order
    assert len(select_confident(scores, 0.0, 30)) == 400  # no filtering at all (the reference skips it)
    with pytest.raises(ValueError, match="keep nothing"):
        select_confident(scores[:300], 0.1, 30)  # f = 30: the reference's slice idxs[30:0] is empty


def test_deeplab_imagenet_backbone_errors_clearly_offline_and_loads_when_cached(tmp_path, monkeypatch):
    import urllib.error

    import torch
    import torchvision

    from diffseg.experiments import dataset_ddpm as dd

    def offline(url, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match=r"resnet50-[0-9a-f]+\.pth.*cannot be downloaded.*backbone_weights=none"):
        dd.build_deeplab("resnet50", 3, "imagenet")
    with pytest.raises(ValueError, match="num_samples"):  # the reference's filter needs more than 30 dropped
        dd.DatasetDDPMConfig(segmenter="s.pt", num_samples=300).check()
    dd.DatasetDDPMConfig(segmenter="s.pt", num_samples=320).check()
    # with the file in the cache, its weights land in the DeepLabV3 backbone (fc dropped, the rest strict)
    torch.manual_seed(1)
    resnet = torchvision.models.resnet50(weights=None)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda url, **kw: resnet.state_dict())
    net = dd.build_deeplab("resnet50", 3, "imagenet")
    torch.testing.assert_close(net.backbone.conv1.weight, resnet.conv1.weight)
    torch.testing.assert_close(net.backbone.layer4[2].conv3.weight, resnet.layer4[2].conv3.weight)
    # the reference's input normalisation: [-1, 1] -> [0, 1] -> ImageNet mean / std
    x = torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1)
    expected = (torch.tensor([0.0, 0.5, 1.0]) - torch.tensor(dd.IMAGENET_MEAN)) / torch.tensor(dd.IMAGENET_STD)
    torch.testing.assert_close(dd.ImageNetInput()(x).view(3), expected)


def test_pixel_job_with_an_empty_test_set_exits_nonzero_before_training(tmp_path):
    """`jobs/train_pixel_classifier.py` with no test images fails (exit != 0) instead of reporting mIoU NaN."""
    root = write_synthetic_folder(tmp_path / "data", num_images=3, image_size=8)
    data = DataConfig(name="folder", root=str(root), image_size=8)
    from diffseg.data.datasets import build_dataset

    ds = build_dataset(data, "all")
    fx = FeatureExtractor(to_dict(FeatureConfig(backbone="rgb")), str(tmp_path / "shards"),
                          {"num_classes": ds.num_classes, "class_names": ds.class_names})  # fmt: skip
    begin_shard_set(tmp_path / "shards", ["000000"])
    it = ds[0]
    fx({"id": np.array([it["id"]]), "image": ((it["image"].permute(1, 2, 0) + 1) * 127.5).byte().numpy()[None],
        "mask": it["mask"].numpy().astype(np.uint8)[None]})  # fmt: skip
    end_shard_set(tmp_path / "shards")
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, str(repo / "jobs" / "train_pixel_classifier.py"), f"train_shards={tmp_path / 'shards'}",
         f"data.root={root}", "data.name=folder", "data.num_test=0", "test_split=test", f"output_dir={tmp_path}",
         "tracking.enabled=false", "device=cpu"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert out.returncode != 0
    assert "the 'test' split of" in out.stderr and "is empty" in out.stderr, out.stderr[-2000:]
    assert "[pixel] trained" not in out.stdout  # it failed before training


def test_pixel_job_refuses_a_damaged_shard_naming_it_and_the_set(tmp_path):
    """Issue 29: 20 flipped bytes in one shard of a complete set, and `jobs/train_pixel_classifier.py` trained on the
    changed values with exit 0. The manifest's SHA-256 now stops it, naming the shard and the set."""
    root = write_synthetic_folder(tmp_path / "data", num_images=4, image_size=16)
    data = DataConfig(name="folder", root=str(root), image_size=16, num_train=2, num_test=2)
    from diffseg.data.datasets import build_dataset
    from diffseg.data.shards import DamagedShard

    train = build_dataset(data, "train")
    shards = tmp_path / "shards"
    fx = FeatureExtractor(
        to_dict(FeatureConfig(backbone="rgb")),
        str(shards),
        {"num_classes": train.num_classes, "class_names": train.class_names, "ignore_index": 255},
    )
    begin_shard_set(shards, [train[i]["id"] for i in range(2)])
    items = [train[i] for i in range(2)]
    fx(
        {
            "id": np.array([it["id"] for it in items]),
            "image": np.stack([((it["image"].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy() for it in items]),
            "mask": np.stack([it["mask"].numpy().astype(np.uint8) for it in items]),
        }
    )
    end_shard_set(shards)
    shard = sorted(shards.glob("*.parquet"))[0]
    raw = bytearray(shard.read_bytes())
    for i in range(20):
        raw[len(raw) // 4 + 3 * i] ^= 0xFF
    shard.write_bytes(bytes(raw))
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, str(repo / "jobs" / "train_pixel_classifier.py"), f"train_shards={shards}",
         f"data.root={root}", "data.name=folder", "data.num_train=2", "data.num_test=2", "data.image_size=16",
         f"output_dir={tmp_path / 'out'}", "tracking.enabled=false", "device=cpu", "train.members=2",
         "train.max_epochs=1"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert out.returncode == 1  # a user error (issue 36.8): one line naming the shard and the set, no traceback
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(shard) in last and f"feature set {shards}" in last, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and issubclass(DamagedShard, ValueError)
    assert "[pixel] trained" not in out.stdout


def _compare_run(folder, images, ddpm=None, random=None, seed=0):
    """A finished comparison run as the compare job leaves it: results.json (+ config.yaml with the MLP seed)."""
    folder.mkdir(parents=True)
    rows = {}
    if ddpm is not None:
        rows["ddpm"] = {"dim": 672, "miou": ddpm, "backbone_steps": images // 64, "backbone_images": images}
    if random is not None:
        rows["random"] = {"dim": 672, "miou": random, "input": "random:x.pt"}
    (folder / "results.json").write_text(json.dumps(rows))
    (folder / "config.yaml").write_text(f"name: {folder.name}\ntrain: {{seed: {seed}}}\n")
    return str(folder)


def test_gap_curve_rows_prediction_and_job(tmp_path):
    """Hand-computed: gaps 0, +1, +2 points at 16k, 32k, 64k images (+2 is the mean of +1.5 and +2.5 over two MLP
    seeds) are a line of +1 per doubling through 0 at 16k, which reaches +3 at 128k images. A run without a random
    row takes the one of the baseline run with its MLP seed."""
    base0 = _compare_run(tmp_path / "base0", 32000, ddpm=0.21, random=0.20)
    base1 = _compare_run(tmp_path / "base1", 64000, ddpm=0.225, random=0.19, seed=1)
    runs = [
        _compare_run(tmp_path / "a", 16000, ddpm=0.20),
        base0,
        _compare_run(tmp_path / "c", 64000, ddpm=0.215),
        _compare_run(tmp_path / "d", 64000, ddpm=0.215, seed=1),
    ]
    rows = gap_rows(runs, baselines=[base0, base1])
    assert [r["ddpm_images"] for r in rows] == [16000, 32000, 64000, 64000]
    assert [round(r["gap"], 6) for r in rows] == [0.0, 1.0, 1.5, 2.5]
    assert [r["random_from"] for r in rows] == [base0, base0, base0, base1] and rows[3]["seed"] == 1
    pred = gap_prediction(rows, 3.0)
    assert pred["points"] == 3 and pred["slope_per_doubling"] == pytest.approx(1.0)
    assert pred["images_at_target"] == pytest.approx(128000) and pred["largest_gap"] == pytest.approx(2.0)
    flat = gap_prediction([dict(r, gap=1.0 - 0.1 * i) for i, r in enumerate(rows)], 3.0)
    assert flat["slope_per_doubling"] < 0 and flat["images_at_target"] is None  # a falling line never gets there
    with pytest.raises(ValueError, match="no baseline run with MLP seed 1"):
        gap_rows(runs, baselines=[base0])
    with pytest.raises(FileNotFoundError, match="no results.json"):
        gap_rows([str(tmp_path / "missing")], baselines=[base0])
    cfg = GapCurveConfig(output_dir=str(tmp_path / "out"), runs=tuple(runs), baselines=(base0, base1),
                         tracking=TrackingConfig(enabled=False))  # fmt: skip
    out = run_gap_curve(cfg)
    assert out["prediction"]["images_at_target"] == pytest.approx(128000)
    text = (tmp_path / "out" / "gap-curve" / "gap.md").read_text()
    assert "| 64k | 1000 | 1 | 21.5 | 19.0 | +2.5 |" in text and "+1.00 mIoU points per doubling" in text
    assert "reaches +3 at 128k images" in text and "| 64k | 2 | +2.0 | 0.7 | +1.5 .. +2.5 |" in text
    assert pred["lengths"][0] == {"images": 16000, "seeds": 1, "mean": 0.0, "sd": None, "min": 0.0, "max": 0.0}
    assert Image.open(tmp_path / "out" / "gap-curve" / "gap.png").size[0] > 100


def test_the_145k_faces_ddpm_counts_all_its_training_from_anywhere(tmp_path, monkeypatch):
    """Issue 37.4: the comparison's compute column halved the shipped 145k model: its `init_from` record holds a note
    after the path, so the 73k images of the run it continued were dropped with a warning that the file was not
    here. The chain is followed from any working directory."""
    from diffseg.experiments.label_efficient import backbone_compute

    shipped = Path(__file__).resolve().parents[1] / "models" / "ddpm-celeba32-145k.pt"
    monkeypatch.chdir(tmp_path)
    assert backbone_compute(str(shipped)) == {"backbone_steps": 2272, "backbone_batch": 64, "backbone_images": 145408}
