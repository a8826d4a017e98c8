"""Issue 26's levers on tiny configs: the band diagnostic, several training sources, image-only sets, zero-filled
translations, the anti-collapse priors (area hinge, binarisation, mask generator weight decay, restarts), the
ablation's extra noise levels."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffseg.core.cli import describe
from diffseg.core.config import ConfigError, from_dict, load_config
from diffseg.data.datasets import DataConfig, DataError, PairedFolderDataset, augment, build_dataset, item_ids
from diffseg.models.factorized import FactorizedConfig, FactorizedUNet, mask_prior, reset_mask_generator
from diffseg.models.unet import UNetConfig
from diffseg.scoring.regions import BandShare, mask_band_share
from diffseg.training.config import OptimConfig, TrainConfig
from diffseg.training.loop import LocalContext, build_train_state, fit, train_step
from diffseg.training.mask_levers import maybe_restart_masks, param_groups

REPO = Path(__file__).resolve().parents[1]
CFG = UNetConfig(image_size=16, model_channels=8, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=(8,))


# ---------------------------------------------------------------------------------------------------- band share
def test_band_share_golden_values():
    n, h, w = 3, 8, 8
    bands = torch.zeros(n, 2, h, w)
    bands[:, 0, :3], bands[:, 1, 3:] = 1, 1  # horizontal bands (the collapse)
    assert mask_band_share(bands) == pytest.approx(1.0)
    assert mask_band_share(bands.transpose(2, 3)) == pytest.approx(0.0)  # vertical stripes
    square = torch.zeros(1, 1, h, w)
    square[..., 2:6, 2:6] = 1  # a centred square of half the side: 1/3 (worked out in the docstring)
    assert mask_band_share(square) == pytest.approx(1 / 3)
    hard = bands.argmax(1)  # hard maps give the same share as their one-hot masks
    assert mask_band_share(hard) == pytest.approx(1.0)
    assert np.isnan(mask_band_share(torch.full((2, 2, h, w), 0.5)))  # no spatial variance: no share to speak of


def test_band_share_streams():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(10, 3, 8, 8, generator=g).softmax(1)
    acc = BandShare()
    for chunk in masks.split(3):
        acc.update(chunk)
    assert acc.compute() == pytest.approx(mask_band_share(masks))


def test_band_share_in_evaluate_and_ablation_table(tmp_path):
    from diffseg.experiments.ablation import AblationConfig, render_table

    cfg = load_config(AblationConfig, REPO / "jobs" / "configs" / "ablation_tiny.yaml")
    rows = [{"dataset": "synthetic", "kind": "baseline", "name": "centred_box",
             "metrics": {"fg_iou": 0.4, "dependence": 0.0, "band": 0.33, "gt_band": 0.5}}]  # fmt: skip
    md = render_table(cfg, rows, "cpu", 1.0)
    assert "| band |" in md and "| 0.33 |" in md and "band share of the ground truth: 0.50" in md


# ---------------------------------------------------------------------------------------------------- data
def _folder(root: Path, n: int, masks: bool, meta_masks=None, size=20) -> Path:
    (root / "images").mkdir(parents=True)
    if masks:
        (root / "masks").mkdir()
    for i in range(n):
        Image.fromarray(np.full((size, size, 3), 10 * i, np.uint8)).save(root / "images" / f"{i:04d}.png")
        if masks:
            Image.fromarray(np.zeros((size, size), np.uint8)).save(root / "masks" / f"{i:04d}.png")
    meta = {"name": root.name, "classes": ["background", "fg"], "ignore_index": 255}
    if meta_masks is not None:
        meta["masks"] = meta_masks
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_mixed_sources_train_split(tmp_path):
    a = _folder(tmp_path / "a", 6, masks=True)
    b = _folder(tmp_path / "b", 5, masks=False, size=40)
    cfg = from_dict(DataConfig, {"name": "folder", "root": str(a), "num_train": 4, "num_test": 2, "image_size": 16,
                                 "mix": [{"name": "folder", "root": str(b)}]})  # fmt: skip
    train = build_dataset(cfg, "train")
    assert len(train) == 4 + 5
    assert item_ids(train) == [f"0:{i:04d}" for i in range(4)] + [f"1:{i:04d}" for i in range(5)]
    items = [train[i] for i in range(len(train))]
    assert all(set(it) == {"image", "id"} for it in items)  # one source has no masks: images only, same keys
    assert all(it["image"].shape == (3, 16, 16) for it in items)  # every source at the primary's size
    test = build_dataset(cfg, "test")  # the test split is the primary's alone, with its masks
    assert len(test) == 2 and "mask" in test[0]
    both = replace(cfg, mix=(replace(cfg.mix[0], root=str(a), num_train=6),))
    assert "mask" in build_dataset(both, "train")[7]  # every source labelled: masks kept


def test_dataset_json_may_say_no_masks(tmp_path):
    root = _folder(tmp_path / "c", 3, masks=True, meta_masks=False)
    ds = PairedFolderDataset(root, image_size=16)
    assert not ds.has_masks and "mask" not in ds[0]
    with pytest.raises(DataError, match=r"c: this job needs masks.*masks: false"):
        PairedFolderDataset(root, image_size=16, require_masks=True)
    (root / "dataset.json").write_text(json.dumps({"classes": ["bg", "fg"], "masks": "no"}))
    with pytest.raises(DataError, match=r"dataset.json: 'masks' must be true or false"):
        PairedFolderDataset(root, image_size=16)


def test_help_lists_a_self_nested_section_once():
    keys = [k for k, _, _ in describe(TrainConfig)]
    assert "data.mix" in keys and "data.translate" in keys
    assert not any(k.startswith("data.mix[].") for k in keys)


def test_translate_zero_fill():
    image = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(1)) + 0.5  # no zeros of its own
    mask = torch.ones(8, 8, dtype=torch.long)
    borders = set()
    for seed in range(30):
        out = augment({"image": image, "mask": mask}, torch.Generator().manual_seed(seed), translate=0.25)
        filled = (out["image"] == 0).all(0)  # (H, W) the uncovered border
        assert ((out["mask"] == 255) == filled).all()  # zeros in the image, ignore_index in the mask
        rows, cols = int(filled.all(1).sum()), int(filled.all(0).sum())
        assert rows <= 2 and cols <= 2  # at most 0.25 * 8 = 2 px each way: the object stays near the centre
        kept = out["image"][:, ~filled.all(1)][:, :, ~filled.all(0)]
        assert kept.shape[1:] == (8 - rows, 8 - cols)  # what is left is the image, moved, not wrapped around
        borders.add((rows, cols))
    assert len(borders) > 3  # the shift varies


# ---------------------------------------------------------------------------------------------------- priors
def test_mask_prior_terms():
    m = torch.zeros(2, 2, 4, 4)
    m[:, 0] = 1  # region 1 has vanished
    terms = mask_prior(m, FactorizedConfig(num_components=2, area_weight=2.0, min_area=0.25, binarize_weight=1.0))
    assert torch.allclose(terms["area"], torch.full((2,), 2.0 * 0.25))
    assert torch.allclose(terms["binarize"], torch.zeros(2))  # hard masks: nothing to binarise
    soft = torch.full((1, 2, 4, 4), 0.5)
    terms = mask_prior(soft, FactorizedConfig(num_components=2, area_weight=1.0, min_area=0.25, binarize_weight=1.0))
    assert torch.allclose(terms["area"], torch.zeros(1)) and torch.allclose(terms["binarize"], torch.full((1,), 0.5))
    assert mask_prior(soft, FactorizedConfig()) == {}  # off by default: the paper's loss


def _tiny_train_cfg(**factorized) -> TrainConfig:
    cfg = load_config(TrainConfig, REPO / "jobs" / "configs" / "factorized_tiny16.yaml")
    return replace(cfg, model=replace(cfg.model, factorized=replace(cfg.model.factorized, **factorized)))


def test_priors_change_the_mask_gradient_only_when_on():
    batch = {"image": torch.rand(4, 3, 16, 16) * 2 - 1}
    grads = {}
    for name, kw in {"off": {}, "on": {"area_weight": 10.0, "min_area": 0.6, "binarize_weight": 1.0}}.items():
        state, _ = build_train_state(_tiny_train_cfg(**kw), "cpu")
        train_step(state, batch, torch.Generator().manual_seed(0))
        grads[name] = state.model.mask_out[-1].weight.grad.clone()
    assert not torch.allclose(grads["off"], grads["on"])


def test_mask_generator_weight_decay_group():
    model = FactorizedUNet(CFG, FactorizedConfig(num_components=2))
    groups = param_groups(model, OptimConfig(weight_decay=0.0, mask_weight_decay=0.1))
    assert len(groups) == 2 and groups[1]["weight_decay"] == 0.1 and "weight_decay" not in groups[0]
    n_mask = sum(1 for n, _ in model.named_parameters() if n.startswith(("mask_blocks.", "mask_out.")))
    assert len(groups[1]["params"]) == n_mask
    assert len(param_groups(model, OptimConfig())) == 1  # the paper: one group


def test_reset_mask_generator_redraws_only_the_mask_generator():
    model = FactorizedUNet(CFG, FactorizedConfig(num_components=2))
    before = {n: p.clone() for n, p in model.named_parameters()}
    reset_mask_generator(model, seed=5)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(("mask_blocks.", "mask_out.")) for n in changed)
    again = FactorizedUNet(CFG, FactorizedConfig(num_components=2))
    reset_mask_generator(again, seed=5)
    assert torch.equal(again.mask_out[-1].weight, model.mask_out[-1].weight)  # seeded


def test_restart_on_image_independent_masks(tmp_path):
    cfg = replace(_tiny_train_cfg(restart_dependence=0.5, restart_steps=100, max_restarts=2), output_dir=str(tmp_path))
    state, _ = build_train_state(cfg, "cpu")
    fixed = torch.zeros(8, 2, 16, 16)
    fixed[:, 0, :8], fixed[:, 1, 8:] = 1, 1  # one split for every image: dependence 0
    restarted = []
    for step in range(60):
        state.step = step
        restarted.append(maybe_restart_masks(state, fixed))
    assert state.restart_steps == [20, 40]  # after 20 steps to settle, then 20 more; at most max_restarts
    assert sum(restarted) == 2
    ema = dict(state.ema.model.named_parameters())
    assert torch.equal(ema["mask_out.2.weight"], state.model.mask_out[2].weight)  # the EMA follows the redraw
    assert state.extra()["mask_restarts"] == [20, 40]


def test_fit_with_every_prior(tmp_path):
    cfg = _tiny_train_cfg(area_weight=1.0, min_area=0.1, binarize_weight=0.1, restart_area=0.05, restart_steps=4)
    cfg = replace(cfg, output_dir=str(tmp_path), data=replace(cfg.data, translate=0.125),
                  optim=replace(cfg.optim, mask_lr_scale=0.1, mask_weight_decay=0.1))  # fmt: skip
    summary = fit(cfg, LocalContext("cpu"))
    assert summary["step"] == cfg.loop.num_steps


def test_unknown_prior_key_is_an_error():
    with pytest.raises(ConfigError, match="model.factorized.area_weigth"):
        load_config(TrainConfig, REPO / "jobs" / "configs" / "factorized_tiny16.yaml",
                    ["model.factorized.area_weigth=1"])  # fmt: skip
