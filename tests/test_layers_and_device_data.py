"""The layers testbed (deterministic, its knobs, its splits and masks), the on-device training batches (the same
transforms as the per-item augmentation, no host copies, the same stream when resumed) and the low-t factorization
(masks 1/K above uniform_from_t, no mask gradient there, more small t with low_t_share)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffseg.core.config import load_config
from diffseg.data.augment import augment
from diffseg.data.datasets import DataConfig, LayersConfig, build_dataset, layers_scene, write_layers_folder
from diffseg.data.device_data import Augment, DeviceBatches, _crop_resize, augment_batch, dataset_images, to_uint8
from diffseg.models.factorized import FactorizedConfig, build_factorized, training_timesteps
from diffseg.models.unet import UNetConfig
from diffseg.scoring.regions import mask_image_dependence
from diffseg.training.batches import build_batches
from diffseg.training.config import TrainConfig


# ---------------------------------------------------------------------------------------------------- layers
def test_layers_scene_is_a_function_of_seed_index_and_knobs():
    a, ma = layers_scene(0, 5, 32)
    b, mb = layers_scene(0, 5, 32)
    assert np.array_equal(a, b) and np.array_equal(ma, mb)
    c, _ = layers_scene(1, 5, 32)
    assert not np.array_equal(a, c)
    # the layout does not depend on the size: the 64 px mask, pooled, is the 32 px one
    _, m64 = layers_scene(0, 5, 64)
    pooled = m64.reshape(32, 2, 32, 2).mean(axis=(1, 3))
    assert np.abs(pooled - ma).mean() < 0.05
    _, big = layers_scene(0, 5, 32, LayersConfig(radius=(0.4, 0.45)))
    assert big.mean() > ma.mean() or ma.mean() > 0.3


def test_layers_object_and_background_are_separate_layers():
    """Inside the mask the object's colour, outside the background's: per image the two means differ, so colour
    clustering of one image finds the object (the testbed is easy by construction), and the object's place and size
    vary across images."""
    gaps, areas, centres = [], [], []
    for i in range(40):
        image, mask = layers_scene(0, i, 32, LayersConfig(min_contrast=0.3, noise=0.0))
        fg, bg = image[mask == 1].mean(0), image[mask == 0].mean(0)
        gaps.append(np.linalg.norm(fg - bg) / 255)
        areas.append(mask.mean())
        ys, xs = np.nonzero(mask)
        centres.append((ys.mean(), xs.mean()))
    assert min(gaps) > 0.2
    assert 0.05 < np.mean(areas) < 0.5 and np.std(areas) > 0.03
    assert np.std([c[0] for c in centres]) > 4 and np.std([c[1] for c in centres]) > 4


def test_layers_data_set_splits_masks_and_config(tmp_path):
    cfg = DataConfig(name="layers", num_images=30, num_test=10, image_size=16)
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert len(train) == 20 and len(test) == 10 and test.ids[0] == "000020"
    item = test[0]
    assert item["image"].shape == (3, 16, 16) and set(item["mask"].unique().tolist()) <= {0, 1}
    assert torch.equal(item["image"], build_dataset(cfg, "all")[20]["image"])
    assert test.num_classes == 2 and test.class_names == ["background", "object"]
    tc = load_config(TrainConfig, "jobs/configs/factorized_layers32.yaml", ["data.layers.num_objects=2"])
    assert tc.data.name == "layers" and tc.data.layers.num_objects == 2
    with pytest.raises(ValueError, match="data.layers.radius"):
        build_dataset(DataConfig(name="layers", num_images=4, layers=LayersConfig(radius=(0.3, 0.1))), "all")
    root = write_layers_folder(tmp_path / "layers", 3, 16)
    folder = build_dataset(DataConfig(name="folder", root=str(root), image_size=16), "all")
    assert torch.equal(folder[1]["mask"], build_dataset(cfg, "all")[1]["mask"])


# ---------------------------------------------------------------------------------------------------- device data
def test_device_augmentation_is_the_per_item_one():
    """Each batched transform moves pixels exactly as the per-item `augment` does for the same draw."""
    x = torch.rand(1, 3, 12, 12) * 2 - 1
    gen = torch.Generator().manual_seed(0)
    # roll by (3, 5): per item, a roll; batched, the gather
    rolled = torch.roll(x[0], (3, 5), dims=(-2, -1))
    from diffseg.data.device_data import _gather_shift

    assert torch.equal(_gather_shift(x, torch.tensor([3]), torch.tensor([5]), wrap=True)[0], rolled)
    from diffseg.data.augment import _shift

    assert torch.equal(_gather_shift(x, torch.tensor([-2]), torch.tensor([4]), wrap=False)[0], _shift(x[0], -2, 4, 0.0))
    crop = torch.nn.functional.interpolate(x[:, :, 2:10, 3:11], size=(12, 12), mode="bilinear", align_corners=False)
    got = _crop_resize(x, torch.tensor([2.0]), torch.tensor([3.0]), torch.tensor([8.0]))
    torch.testing.assert_close(got, crop, atol=1e-5, rtol=0)
    # every transform at once keeps the value range and shape, and differs per row
    xb = x.repeat(8, 1, 1, 1)
    out = augment_batch(xb, Augment(flip=True, roll=True, crop_scale=0.7, translate=0.1), gen)
    assert out.shape == xb.shape and out.abs().max() <= 1 + 1e-6
    assert len({tuple(o.flatten()[:20].tolist()) for o in out}) > 4
    # per-item augment still serves the DataLoader path
    assert augment({"image": x[0]}, gen, roll=True)["image"].shape == x[0].shape


def test_device_batches_cover_an_epoch_and_resume_the_same_stream():
    cfg = DataConfig(name="layers", num_images=40, image_size=8)
    images = dataset_images(build_dataset(cfg, "train"))
    assert images.dtype == torch.uint8 and images.shape == (40, 3, 8, 8)
    assert torch.equal(images[3], to_uint8(build_dataset(cfg, "train")[3]["image"][None])[0])
    stream = DeviceBatches(images, 8, seed=1)
    epoch = torch.cat([to_uint8(next(stream)["image"]) for _ in range(5)])  # 5 x 8 = the 40 images once each
    seen = {bytes(im.numpy()) for im in epoch}
    assert seen == {bytes(im.numpy()) for im in images}
    again = DeviceBatches(images, 8, seed=1, start_step=3)  # a resumed stream at step 3: the same batch 3
    assert torch.equal(next(again)["image"], DeviceBatches(images, 8, seed=1, start_step=3).__next__()["image"])
    plain = DeviceBatches(images, 8, seed=1)
    for _ in range(3):
        next(plain)
    assert torch.equal(next(plain)["image"], next(DeviceBatches(images, 8, seed=1, start_step=3))["image"])
    # two ranks split each global batch
    r0, r1 = DeviceBatches(images, 8, seed=1, rank=0, world=2), DeviceBatches(images, 8, seed=1, rank=1, world=2)
    both = torch.cat([next(r0)["image"], next(r1)["image"]])
    assert torch.equal(both, next(DeviceBatches(images, 8, seed=1))["image"])


def test_the_loop_uses_device_batches_unless_told_otherwise():
    cfg = load_config(TrainConfig, "jobs/configs/factorized_layers32.yaml", ["data.num_images=40", "data.num_test=8"])
    batches = build_batches(cfg, 0, 1, 0, torch.device("cpu"))
    assert isinstance(batches, DeviceBatches) and next(batches)["image"].shape == (16, 3, 32, 32)
    off = load_config(TrainConfig, "jobs/configs/factorized_layers32.yaml",
                      ["data.num_images=40", "data.num_test=8", "loop.data_on_device=off"])  # fmt: skip
    assert "mask" in next(build_batches(off, 0, 1, 0, torch.device("cpu")))
    labelled = load_config(TrainConfig, "jobs/configs/ddpm_tiny.yaml", ["model.unet.num_classes=5",
                                                                        "loop.data_on_device=on"])  # fmt: skip
    with pytest.raises(ValueError, match="class-conditional"):
        build_batches(labelled, 0, 1, 0, torch.device("cpu"))


# ---------------------------------------------------------------------------------------------------- low t
def tiny_factorized(**kw) -> torch.nn.Module:
    unet = UNetConfig(image_size=16, model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=())
    return build_factorized(unet, FactorizedConfig(num_components=2, **kw))


def test_uniform_from_t_makes_masks_uniform_and_gradient_free_above_it():
    torch.manual_seed(0)
    model = tiny_factorized(uniform_from_t=100).train()
    for p in model.parameters():  # away from the zero-initialised outputs, which give every mask a zero gradient
        p.data.add_(0.05 * torch.randn_like(p))
    x = torch.randn(4, 3, 16, 16)
    t = torch.tensor([10, 50, 100, 900])
    eps, masks, _ = model.forward_with_masks(x, t)
    assert torch.allclose(masks[2:], torch.full_like(masks[2:], 0.5))
    assert mask_image_dependence(masks[:2]) > 0 and not torch.allclose(masks[:2], torch.full_like(masks[:2], 0.5))
    # the mask generator learns from the low rows only
    model.zero_grad()
    model(x[2:], t[2:]).square().mean().backward()
    mask_grads = [p.grad for n, p in model.named_parameters() if n.startswith(("mask_blocks.", "mask_out."))]
    assert all(g is None or g.abs().max() == 0 for g in mask_grads)
    model.zero_grad()
    model(x[:2], t[:2]).square().mean().backward()
    assert any(g is not None and g.abs().max() > 0 for n, p in model.named_parameters()
               if n.startswith("mask_out.") for g in [p.grad])  # fmt: skip
    # the paper's model (off) is unchanged: learned masks at every t
    off = tiny_factorized().train()
    assert not torch.allclose(off.forward_with_masks(x, t)[1][3], torch.full_like(masks[3], 0.5))


def test_low_t_share_draws_that_share_of_rows_below_uniform_from_t():
    gen = torch.Generator().manual_seed(0)
    fcfg = FactorizedConfig(uniform_from_t=100, low_t_share=0.5)
    ts = torch.cat([training_timesteps(16, 1000, fcfg, gen, "cpu") for _ in range(200)])
    share = (ts < 100).float().mean().item()
    assert 0.5 + 0.5 * 0.1 - 0.03 < share < 0.55 + 0.03  # half below 100, plus the uniform half's 10 %
    plain = torch.cat([training_timesteps(16, 1000, FactorizedConfig(), gen, "cpu") for _ in range(200)])
    assert abs((plain < 100).float().mean().item() - 0.1) < 0.03
    with pytest.raises(ValueError, match="low_t_share"):
        tiny_factorized(low_t_share=0.5)  # needs uniform_from_t
