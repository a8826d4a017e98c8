"""Feature extraction: diffusers taps, the FeaturePipeline, and the Ray Data job writing shards (slow)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffseg.core.config import to_dict
from diffseg.methods.features import (
    ExtractJobConfig,
    FeatureConfig,
    FeaturePipeline,
    extract,
    feature_dim,
    load_backbone,
)
from diffseg.models.unet import UNetConfig


def tiny_checkpoint(path, size=16):
    from diffseg.models.builder import ModelConfig, build_model
    from diffseg.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    mcfg = ModelConfig(
        unet=UNetConfig(image_size=size, model_channels=8, channel_mult=(1, 2), attention_resolutions=())
    )
    model = build_model(mcfg)
    for p in model.parameters():  # break the zero init so every block carries signal
        p.data.add_(torch.randn_like(p) * 0.05)
    cfg = {"model": to_dict(mcfg), "diffusion": {"num_timesteps": 100, "schedule": "linear"}}
    return save_checkpoint(path, config=cfg, model=model, step=0, ema=model)


def test_diffusers_tiny_backbone_taps(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    unet.save_pretrained(tmp_path / "unet")
    from diffseg.models.checkpoint import seal_folder

    seal_folder(tmp_path / "unet")  # a diffusers folder from elsewhere has no seal: whoever uses it vouches for it
    model, diffusion = load_backbone(f"diffusers:{tmp_path / 'unet'}")
    assert diffusion is None and model.feature_names == ["up.0", "up.1", "out"]
    x = torch.randn(2, 3, 16, 16)
    taps = model.features(x, torch.tensor([10, 10]), ["up.0", "up.1", "out"])
    for name, t in taps.items():
        assert t.shape[1] == model.feature_channels(name), name
    assert taps["up.0"].shape[-1] == 16 // 2 * 2 or taps["up.0"].shape[-1] == 8  # up.0 upsamples 8 -> 16 or stays
    cfg = FeatureConfig(backbone=f"diffusers:{tmp_path / 'unet'}", blocks=("up.0", "up.1"), timesteps=(5, 20))
    pipe = FeaturePipeline(cfg, "cpu")
    f = pipe(x.clamp(-1, 1))
    assert f.shape == (2, feature_dim(model, cfg.blocks, cfg.timesteps), 16, 16) == (2, pipe.dim, 16, 16)
    assert pipe.dim == 2 * (16 + 8)


def test_extract_is_per_timestep_with_shared_noise(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "c.pt")
    model, diffusion = load_backbone(str(ckpt))
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    noise = torch.randn(3, 16, 16)
    f = extract(model, diffusion, x, ["dec.1", "dec.3"], [5, 50], noise)
    d1, d3 = model.feature_channels("dec.1"), model.feature_channels("dec.3")
    assert f.shape == (3, 2 * (d1 + d3), 16, 16)
    # image 1 alone gives the same features: noise is shared, not drawn per batch
    f1 = extract(model, diffusion, x[1:2], ["dec.1", "dec.3"], [5, 50], noise)
    torch.testing.assert_close(f[1:2], f1, rtol=1e-4, atol=1e-5)
    # the second timestep block is the t=50 forward
    t = torch.full((1,), 50)
    taps = model.features(diffusion.q_sample(x[:1], t, noise[None]), diffusion.model_timesteps(t), ["dec.1"])
    up = torch.nn.functional.interpolate(taps["dec.1"], size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(f[:1, d1 + d3 : 2 * d1 + d3], up, rtol=1e-4, atol=1e-5)
    # a random-init backbone of the same architecture differs but has the same dim
    rnd, _ = load_backbone(f"random:{ckpt}")
    assert feature_dim(rnd, ["dec.1"], [5]) == feature_dim(model, ["dec.1"], [5])


@pytest.mark.slow
def test_extract_job_through_ray_data(tmp_path, label_ray):
    from diffseg.data.datasets import DataConfig, write_synthetic_folder
    from diffseg.data.shard_reader import ShardSet, read_shard
    from diffseg.methods.features import run_extract_job

    root = write_synthetic_folder(tmp_path / "data", num_images=5, image_size=16)
    # make a few pixels "ignored" to check they are dropped
    from PIL import Image

    m = np.asarray(Image.open(root / "masks" / "000000.png")).copy()
    m[0, :4] = 255
    Image.fromarray(m).save(root / "masks" / "000000.png")
    ckpt = tiny_checkpoint(tmp_path / "c.pt")
    cfg = ExtractJobConfig(
        name="x",
        output_dir=str(tmp_path / "feats"),
        features=FeatureConfig(backbone=str(ckpt), blocks=("dec.1", "dec.2"), timesteps=(5, 30), batch_size=2),
        data=DataConfig(name="folder", root=str(root), image_size=16, num_train=4, num_test=1),
        split="train",
        limit=3,
        cpus_per_actor=0.5,
        gpus_per_actor=0,
    )
    summary = run_extract_job(cfg)
    ss = ShardSet(summary["shard_dir"])
    assert summary["num_images"] == 3 and len(ss) == 2  # batches of 2 -> 2 shards
    assert ss.num_rows == 3 * 256 - 4  # ignored pixels dropped
    assert ss.meta.feature_dim == summary["feature_dim"] == 2 * (16 + 8)  # dec.1: 16 channels, dec.2: 8
    assert ss.meta.class_names[0] == "background" and ss.meta.extra["ignore_index"] == 255
    assert ss.image_ids() == ["000000", "000001", "000002"]
    # the rows equal a direct extraction of the same image with the same recipe
    pipe = FeaturePipeline(cfg.features, "cpu")
    from diffseg.data.datasets import PairedFolderDataset

    item = PairedFolderDataset(root, ["000001"], 16)[0]
    direct = pipe(item["image"][None])[0].permute(1, 2, 0).numpy()  # (16, 16, D)
    shard = next(read_shard(p) for p in ss.paths if "000001" in set(read_shard(p).image_ids))
    sel = shard.image_ids == "000001"
    np.testing.assert_allclose(
        shard.features[sel].astype(np.float32), direct[shard.ys[sel], shard.xs[sel]], rtol=2e-3, atol=2e-3
    )
    np.testing.assert_array_equal(shard.labels[sel], item["mask"].numpy()[shard.ys[sel], shard.xs[sel]])
    # a re-run skips finished shards (checked in-process: the actor class is a plain callable)
    from diffseg.methods.features import FeatureExtractor

    fx = FeatureExtractor(to_dict(cfg.features), summary["shard_dir"])
    assert fx({"id": np.array(["000000"]), "image": np.zeros((1, 16, 16, 3), np.uint8)})["num_pixels"][0] == -1


def test_small_annotation_rule_drops_19_pixels_and_keeps_20_per_image(tmp_path):
    """The reference's rule (train_interpreter.py: prepare_data), hand-computed: in image 0, class 1 has 19 pixels
    (dropped: 0 < 19 < 20) and class 2 has 20 (kept); in image 1, class 1 has 25 pixels (kept: the rule is per
    image); the ignore pixel stays ignored and class 0 fills the rest."""
    from diffseg.data.shard_reader import ShardSet, read_shard
    from diffseg.methods.features import OFFICIAL_MIN_CLASS_PIXELS, drop_small_annotations, write_feature_shard

    masks = np.zeros((2, 10, 10), dtype=np.int64)
    masks[0].reshape(-1)[:19] = 1
    masks[0].reshape(-1)[19:39] = 2
    masks[0, 9, 9] = 255
    masks[1].reshape(-1)[:25] = 1
    assert OFFICIAL_MIN_CLASS_PIXELS == 20
    out = drop_small_annotations(masks, 20)
    assert (out[0] == 1).sum() == 0 and (out[0] == 255).sum() == 19 + 1  # the 19-pixel class is ignored
    assert (out[0] == 2).sum() == 20 and (out[1] == 1).sum() == 25  # the 20-pixel class and image 1 untouched
    assert (out[0] == 0).sum() == 100 - 19 - 20 - 1 and (masks[0] == 1).sum() == 19  # the input is not modified
    np.testing.assert_array_equal(drop_small_annotations(masks, 0), masks)  # 0 = off
    # through the one extraction step: the dropped pixels are not written, and the rule is in the metadata
    pipe = FeaturePipeline(FeatureConfig(backbone="rgb"))
    images = torch.zeros(2, 3, 10, 10)
    meta = {"class_names": ["bg", "a", "b"], "ignore_index": 255}
    n_rule = write_feature_shard(pipe, images, ["i0", "i1"], tmp_path / "rule" / "s.parquet", masks, meta, 20)
    n_off = write_feature_shard(pipe, images, ["i0", "i1"], tmp_path / "off" / "s.parquet", masks, meta)
    assert n_off == 200 - 1 and n_rule == 200 - 1 - 19
    shard = read_shard(tmp_path / "rule" / "s.parquet")
    assert np.bincount(shard.labels[shard.image_ids == "i0"], minlength=3).tolist() == [60, 0, 20]
    assert np.bincount(shard.labels[shard.image_ids == "i1"], minlength=3).tolist() == [75, 25, 0]
    assert ShardSet(tmp_path / "rule" / "s.parquet").meta.extra["min_class_pixels"] == 20
    with pytest.raises(ValueError, match="min_class_pixels"):  # shards written under different rules do not mix
        ShardSet([tmp_path / "rule" / "s.parquet", tmp_path / "off" / "s.parquet"])


def test_extracting_an_image_only_set_stops_before_any_work(tmp_path, monkeypatch):
    """Issue 37.2: on an image-only folder the job wrote 20,480 rows all labelled -1 and exited 0 (the pixel job then
    trained 0 iterations). Now it stops with one error naming the folder, before Ray starts or a shard is written."""
    import json

    import diffseg.methods.features as features
    from diffseg.data.datasets import DataConfig, DataError, write_synthetic_folder

    root = write_synthetic_folder(tmp_path / "data", num_images=3, image_size=16)
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, "masks": False}))
    started = []
    monkeypatch.setattr(features, "init_ray", lambda *a, **k: started.append(1))
    cfg = ExtractJobConfig(name="x", output_dir=str(tmp_path / "out"), data=DataConfig(name="folder", root=str(root),
                           image_size=16), split="all", features=FeatureConfig(backbone="rgb"))  # fmt: skip
    with pytest.raises(DataError, match=f"{root}: extracting pixel features needs masks"):
        features.run_extract_job(cfg)
    assert not started and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_an_interrupted_extraction_keeps_its_shards_says_so_and_the_same_command_finishes_it(
    tmp_path, label_ray, monkeypatch
):
    """Ctrl-C during extraction (issue 37.3): the finished shards stay (written whole or not at all), the interrupt
    names how many images they hold and the command that goes on; the rerun skips them and completes the set. A rerun
    of another recipe into the same folder is refused before any work, naming what changed."""
    import dataclasses
    import os
    import sys

    import diffseg.methods.features as features
    from diffseg.data.datasets import DataConfig, DataError, write_synthetic_folder
    from diffseg.data.shard_reader import ShardSet

    root = write_synthetic_folder(tmp_path / "data", num_images=6, image_size=16)
    cfg = ExtractJobConfig(
        name="x",
        output_dir=str(tmp_path / "feats"),
        features=FeatureConfig(
            backbone=str(tiny_checkpoint(tmp_path / "c.pt")), blocks=("dec.1",), timesteps=(5,), batch_size=2
        ),  # fmt: skip
        data=DataConfig(name="folder", root=str(root), image_size=16, num_train=6, num_test=0),
        cpus_per_actor=0.5,
        gpus_per_actor=0,
    )
    real = features.extract_to_shards

    def stopped_after_one_shard(fcfg, ds, out, *args, **kwargs):
        real(fcfg, ds.limit(2), out, *args, **kwargs)  # the first batch of 2 ends in a shard
        raise KeyboardInterrupt

    monkeypatch.setattr(features, "extract_to_shards", stopped_after_one_shard)
    monkeypatch.setattr(sys, "argv", ["jobs/extract_features.py", "name=x"])
    with pytest.raises(KeyboardInterrupt) as stopped:
        features.run_extract_job(cfg)
    message = str(stopped.value)
    assert message.startswith("Ctrl-C during extraction: 2 of 6 images are in finished shards in "), message
    assert message.endswith("the same command resumes it: python jobs/extract_features.py name=x"), message
    out = tmp_path / "feats" / "x"
    kept = {p.name: os.stat(p).st_mtime_ns for p in out.glob("*.parquet")}
    assert list(kept) == ["shard-000000.parquet"]

    monkeypatch.setattr(features, "extract_to_shards", real)
    summary = features.run_extract_job(cfg)  # the same command: the kept shard is skipped, the set completed
    assert summary["num_images"] == 6 and ShardSet(out).image_ids() == [f"{i:06d}" for i in range(6)]
    assert os.stat(out / "shard-000000.parquet").st_mtime_ns == kept["shard-000000.parquet"]

    other = dataclasses.replace(cfg, features=dataclasses.replace(cfg.features, timesteps=(50,)))
    changed = r"holds the shards of another extraction \(features\.timesteps: \[5\] -> \[50\]"
    with pytest.raises(DataError, match=changed):
        features.run_extract_job(other)
    assert ShardSet(out).image_ids() == [f"{i:06d}" for i in range(6)]  # nothing written was lost
