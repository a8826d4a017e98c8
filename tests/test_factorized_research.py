"""The factorized model's research levers (variants off by default), the mask diagnostics, the oracle and the ablation
jobs, on tiny configs."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffseg.core.config import load_config
from diffseg.data.datasets import DataConfig, augment
from diffseg.experiments.ablation import AblationConfig, run_specs
from diffseg.experiments.ablation import run as run_ablation
from diffseg.experiments.oracle import OracleConfig, fixed_masks
from diffseg.experiments.oracle import run as run_oracle
from diffseg.methods.segment import mask_diagnostics
from diffseg.models.diffusion import DiffusionConfig, GaussianDiffusion
from diffseg.models.factorized import FactorizedConfig, FactorizedUNet
from diffseg.models.unet import UNetConfig
from diffseg.scoring.regions import mask_image_dependence
from diffseg.training.config import OptimConfig, TrainConfig
from diffseg.training.loop import LocalContext, build_train_state, fit
from diffseg.training.mask_levers import param_groups

REPO = Path(__file__).resolve().parents[1]
CFG = UNetConfig(image_size=16, model_channels=8, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=(8,))


def randomize_(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


# ---------------------------------------------------------------------------------------------------- defaults
def test_defaults_are_the_papers_recipe():
    """K=3, Adam 1e-4, EMA 0.9999, no clipping, masks from every t, no warm-up, shared decoder on masked skips,
    zero padding, no position-removing augmentation: every research lever is off unless asked for."""
    f, o, u, d = FactorizedConfig(), OptimConfig(), UNetConfig(), DataConfig()
    assert (f.num_components, f.decoding, f.mask_grad_max_t, f.mask_warmup_steps) == (3, "masked_skips", 0, 0)
    assert (o.lr, o.ema_decay, o.grad_clip, o.mask_lr_scale) == (1e-4, 0.9999, 0.0, 1.0)
    assert u.padding_mode == "zeros" and (d.roll, d.crop_scale) == (False, 1.0)
    for name in ("factorized_paper64.yaml", "factorized_horse32.yaml", "factorized_face32.yaml"):
        cfg = load_config(TrainConfig, REPO / "jobs" / "configs" / name)
        assert cfg.optim.lr == 1e-4 and cfg.optim.ema_decay == 0.9999 and cfg.optim.grad_clip == 0.0, name
        assert cfg.model.factorized.decoding == "masked_skips" and cfg.model.unet.padding_mode == "zeros", name


# ---------------------------------------------------------------------------------------------------- image dependence
def test_image_dependence_of_constructed_masks():
    n, h, w = 5, 4, 6
    split = torch.zeros(n, 2, h, w)
    split[:, 0, : h // 2], split[:, 1, h // 2 :] = 1, 1  # the same hard top/bottom split for every image
    assert mask_image_dependence(split) == 0.0
    assert mask_image_dependence(torch.full((n, 3, h, w), 1 / 3)) == 0.0  # no variance at all
    # Two images, two pixels: A = [1, 1], B = [1, 0] (region 0). Across images: var 0 and 0.25 -> 0.125 per region;
    # all values of region 0: [1, 1, 1, 0] -> var 0.1875 (region 1 the same): share 0.125 / 0.1875 = 2/3.
    m0 = torch.tensor([[[[1.0, 1.0]]], [[[1.0, 0.0]]]])  # (2, 1, 1, 2)
    masks = torch.cat([m0, 1 - m0], dim=1)  # (2, 2, 1, 2)
    assert mask_image_dependence(masks) == pytest.approx(2 / 3)
    # A = [1, 0], B = [0, 1]: every pixel's mean over images is 0.5, so all variance is across images: share 1.
    swap = torch.tensor([[[[1.0, 0.0]]], [[[0.0, 1.0]]]])
    assert mask_image_dependence(torch.cat([swap, 1 - swap], dim=1)) == pytest.approx(1.0)
    # hard label maps are one-hot encoded: the same numbers
    assert mask_image_dependence(np.array([[[0, 0]], [[0, 1]]])) == pytest.approx(2 / 3)
    assert math.isnan(mask_image_dependence(masks[:1]))


# ---------------------------------------------------------------------------------------------------- variants
@pytest.mark.parametrize("decoding", ["masked_skips", "masked_skips_and_mid", "mask_channel", "parallel"])
@pytest.mark.parametrize("padding", ["zeros", "circular", "reflect"])
def test_every_decoding_and_padding_trains(decoding, padding):
    cfg = UNetConfig(**{**CFG.__dict__, "padding_mode": padding})
    model = randomize_(FactorizedUNet(cfg, FactorizedConfig(num_components=2, decoding=decoding)))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 700])
    eps, masks, eps_k = model.forward_with_masks(x, t)
    assert eps.shape == (2, 3, 16, 16) and masks.shape == (2, 2, 16, 16) and eps_k.shape == (2, 2, 3, 16, 16)
    assert torch.allclose(masks.sum(1), torch.ones(2, 16, 16), atol=1e-5)
    eps.square().mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("mask_out"))
    if decoding == "parallel":
        assert not hasattr(model, "output_blocks") and len(model.decoders) == 2
    else:
        assert not hasattr(model, "decoders")


def test_masked_mid_hides_other_regions_from_a_branch():
    """With h_mid masked too, branch k's output changes less when the input changes only outside region k (the
    encoder still mixes the halves through 3x3 convs and attention, so "less", summed over seeded draws: one draw's
    maximum difference was a coin toss)."""
    masks = torch.zeros(1, 2, 16, 16)
    masks[:, 0, :8], masks[:, 1, 8:] = 1, 1  # region 0 = top half (aligned with every pooling level)
    hidden, leaked = 0.0, 0.0
    for seed in range(6):
        torch.manual_seed(seed)
        model = randomize_(FactorizedUNet(CFG, FactorizedConfig(num_components=2, decoding="masked_skips_and_mid")))
        model.eval()
        x, t = torch.randn(1, 3, 16, 16), torch.tensor([10])
        x2 = x.clone()
        x2[..., 8:, :] += 1.0  # change only region 1
        base = FactorizedUNet(CFG, FactorizedConfig(num_components=2))
        base.load_state_dict(model.state_dict())
        base.eval()
        with torch.no_grad():
            _, _, a = model.forward_with_masks(x, t, masks=masks)
            _, _, b = model.forward_with_masks(x2, t, masks=masks)
            _, _, c = base.forward_with_masks(x, t, masks=masks)
            _, _, d = base.forward_with_masks(x2, t, masks=masks)
        assert not torch.allclose(a[:, 1], b[:, 1])  # region 1's branch sees the change
        hidden += float((a[:, 0] - b[:, 0]).abs().mean())
        leaked += float((c[:, 0] - d[:, 0]).abs().mean())
    # without masking h_mid, the unmasked bottleneck carries region 1's change into region 0's branch
    assert leaked > hidden


def test_circular_padding_removes_the_position_cue():
    """With circular padding the masks of a circularly shifted image are the shifted masks (shifts by multiples of
    the downsampling stride): a fixed spatial split cannot be expressed. Zero padding breaks this."""
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([30])
    for padding, equivariant in (("circular", True), ("zeros", False)):
        cfg = UNetConfig(**{**CFG.__dict__, "padding_mode": padding})
        model = randomize_(FactorizedUNet(cfg, FactorizedConfig(num_components=2))).eval()
        with torch.no_grad():
            _, m, _ = model.forward_with_masks(x, t)
            _, m_shift, _ = model.forward_with_masks(x.roll((4, 6), dims=(-2, -1)), t)
        same = torch.allclose(m.roll((4, 6), dims=(-2, -1)), m_shift, atol=1e-5)
        assert same == equivariant, padding


def test_mask_gradient_only_from_low_t():
    """mask_grad_max_t: rows with t >= it send no gradient to the mask generator; the decoder still learns."""
    model = randomize_(FactorizedUNet(CFG, FactorizedConfig(num_components=2, mask_grad_max_t=300))).train()
    x = torch.randn(2, 3, 16, 16)

    def grads(t):
        model.zero_grad()
        model(x, torch.tensor(t)).square().mean().backward()
        mask = sum(p.grad.abs().sum() for n, p in model.named_parameters() if n.startswith("mask_out"))
        dec = sum(p.grad.abs().sum() for n, p in model.named_parameters() if n.startswith("output_blocks"))
        return float(mask), float(dec)

    assert grads([500, 900])[0] == 0 and grads([500, 900])[1] > 0
    assert grads([10, 900])[0] > 0
    model.eval()  # at evaluation nothing is cut (and nothing needs to be)
    assert grads([500, 900])[0] > 0


@pytest.mark.parametrize("mode", ["uniform", "frozen"])
def test_warmup_modes_stop_the_mask_generator(mode):
    model = randomize_(FactorizedUNet(CFG, FactorizedConfig(num_components=2))).train()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 20])
    eps, masks, _ = model.forward_with_masks(x, t, mask_mode=mode)
    eps.square().mean().backward()
    mask_grad = sum(p.grad.abs().sum() for n, p in model.named_parameters() if n.startswith("mask_"))
    assert float(mask_grad) == 0
    assert (masks == 0.5).all() if mode == "uniform" else not (masks == 0.5).all()


def test_warmup_and_mask_lr_scale_in_the_loop():
    cfg = load_config(
        TrainConfig,
        REPO / "jobs" / "configs" / "factorized_tiny16.yaml",
        ["model.factorized.mask_warmup_steps=2", "optim.mask_lr_scale=0.1", "loop.num_steps=4"],
    )
    state, _ = build_train_state(cfg, "cpu")
    groups = state.optimizer.param_groups
    assert len(groups) == 2 and groups[1]["lr"] == pytest.approx(cfg.optim.lr * 0.1)
    mask_ids = {id(p) for n, p in state.model.named_parameters() if n.startswith(("mask_blocks.", "mask_out."))}
    assert {id(p) for p in groups[1]["params"]} == mask_ids
    assert len(param_groups(state.model, OptimConfig())) == 1  # scale 1: one group, as before
    from diffseg.training.mask_levers import mask_mode

    assert [mask_mode(cfg, s) for s in range(4)] == ["uniform", "uniform", None, None]


def test_roll_and_crop_move_image_and_mask_together():
    g = torch.Generator().manual_seed(0)
    image = torch.arange(3 * 8 * 8, dtype=torch.float32).reshape(3, 8, 8)
    mask = (torch.arange(64).reshape(8, 8) % 5).long()
    item = {"image": image, "mask": mask, "id": "a"}
    for _ in range(5):
        out = augment(item, g, roll=True)
        shift = [
            (dy, dx) for dy in range(8) for dx in range(8) if torch.equal(out["mask"], mask.roll((dy, dx), (0, 1)))
        ]
        assert any(torch.equal(out["image"], image.roll(s, (1, 2))) for s in shift)
    out = augment(item, g, crop_scale=0.5)
    assert out["image"].shape == image.shape and out["mask"].shape == mask.shape
    assert set(out["mask"].unique().tolist()) <= set(mask.unique().tolist())  # nearest: no new classes
    assert torch.equal(item["image"], image)  # the input (a cached item) is not modified


# ---------------------------------------------------------------------------------------------------- diagnostics
def test_mask_diagnostics_in_a_training_run(tmp_path):
    cfg = load_config(
        TrainConfig,
        REPO / "jobs" / "configs" / "factorized_tiny16.yaml",
        [f"output_dir={tmp_path}", "loop.num_steps=4", "loop.eval_every=2", "eval.num_images=6"],
    )
    out = fit(cfg, LocalContext("cpu"))
    diag = out["mask_diagnostics"]
    assert [d["step"] for d in diag] == [2, 4]
    for key in ("val/fg_iou", "val/mask_dependence", "val/eps_mse", "val/eps_mse_t30", "val_raw/fg_iou"):
        assert all(np.isfinite(d[key]) for d in diag), key
    from diffseg.models.checkpoint import load_checkpoint

    assert load_checkpoint(out["checkpoint"]).extra["mask_diagnostics"] == diag  # the curve travels with the run


def test_mask_diagnostics_scores_a_fixed_split_as_image_independent():
    """A mask generator that ignores the image (its logits are a bias that splits top from bottom) scores
    dependence 0 whatever its IoU."""
    model = FactorizedUNet(CFG, FactorizedConfig(num_components=2)).eval()
    with torch.no_grad():
        for p in model.mask_out.parameters():
            p.zero_()
    split = torch.zeros(2, 16, 16)
    split[0, :8], split[1, 8:] = 10, 10

    def fixed(h_mid, skips, emb):
        return split[None].expand(h_mid.shape[0], -1, -1, -1).softmax(dim=1)

    model.masks = fixed
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(num_timesteps=100))
    images, gt = torch.randn(6, 3, 16, 16), torch.randint(0, 2, (6, 16, 16))
    out = mask_diagnostics(model, diffusion, images, gt, t=10, mse_timesteps=(10,))
    assert out["val/mask_dependence"] == pytest.approx(0.0, abs=1e-9)
    assert 0 <= out["val/fg_iou"] <= 1 and out["val/eps_mse_t10"] > 0


def test_max_minutes_stops_a_run_with_a_final_checkpoint(tmp_path):
    cfg = load_config(
        TrainConfig,
        REPO / "jobs" / "configs" / "factorized_tiny16.yaml",
        [f"output_dir={tmp_path}", "loop.num_steps=100000", "loop.max_minutes=0.001", "loop.log_every=1000"],
    )
    out = fit(cfg, LocalContext("cpu"))
    assert out["stopped_early"] and 1 <= out["step"] < 100000
    from diffseg.models.checkpoint import load_checkpoint

    assert load_checkpoint(out["checkpoint"]).step == out["step"]


# ---------------------------------------------------------------------------------------------------- jobs
def test_oracle_masks_and_job(tmp_path):
    gt = torch.tensor([[[0, 1], [1, 1]], [[0, 0], [0, 1]]])  # (2, 2, 2)
    band = fixed_masks("band", gt, 2, (0.5, 1.0))
    assert torch.equal(band[0], band[1]) and torch.equal(band[0, 1], torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    assert torch.equal(fixed_masks("ground_truth", gt, 2, (0, 1))[:, 1].long(), gt)
    assert torch.equal(fixed_masks("shuffled_ground_truth", gt, 2, (0, 1))[:, 1].long(), gt.roll(1, 0))
    assert fixed_masks("learned", gt, 2, (0, 1)) is None
    cfg = load_config(OracleConfig, REPO / "jobs" / "configs" / "oracle_tiny.yaml", [f"output_dir={tmp_path}"])
    res = run_oracle(cfg)
    arms = {r["arm"] for r in res["table"]}
    assert arms == set(cfg.arms)
    band_rows = [r for r in res["table"] if r["arm"] == "band"]
    assert all(r["rel"] == 0 and r["low"] == 0 for r in band_rows)  # the reference against itself
    for r in res["table"]:
        assert r["low"] <= r["rel"] <= r["high"]
    assert (Path(res["out_dir"]) / "relative_mse.png").stat().st_size > 1000
    assert "| ground_truth |" in res["markdown"]


def test_ablation_job_is_equal_compute_and_resumable(tmp_path):
    cfg = load_config(AblationConfig, REPO / "jobs" / "configs" / "ablation_tiny.yaml", [f"output_dir={tmp_path}"])
    specs = run_specs(cfg)
    assert len(specs) == len(cfg.variants) * len(cfg.seeds)
    for s in specs:  # every row: the same steps, batch, diagnostics
        assert (s.config.loop.num_steps, s.config.optim.batch_size) == (cfg.num_steps, cfg.batch_size)
        assert s.config.loop.eval_every == cfg.eval_every and s.config.eval.split == "test"
    circular = next(s for s in specs if s.variant == "circular")
    assert circular.config.model.unet.padding_mode == "circular" and circular.config.data.roll
    res = run_ablation(cfg)
    rows = res["rows"]
    assert [r["name"] for r in rows if r["kind"] == "baseline"] == list(cfg.baselines)
    variants = [r for r in rows if r["kind"] == "variant"]
    assert [r["name"] for r in variants] == [v.name for v in cfg.variants]
    for r in variants:
        assert len(r["seeds"]) == 2 and all(s["step"] == cfg.num_steps for s in r["seeds"])
        assert 0 <= r["metrics"]["dependence"] <= 1 and np.isfinite(r["eps_mse"])
        assert [c["step"] for c in r["seeds"][0]["curve"]] == [3, 6]
    box = next(r for r in rows if r["name"] == "centred_box")
    assert box["metrics"]["dependence"] == 0.0  # a prior is image-independent by construction
    out = Path(res["out_dir"])
    for name in ("table.md", "results.json", "curves.png", "masks_synthetic.png"):
        assert (out / name).is_file(), name
    # a second run trains nothing: every row's checkpoint is complete
    record = json.loads((Path(specs[0].config.output_dir) / specs[0].config.name / "ablation_run.json").read_text())
    before = (Path(specs[0].config.output_dir) / specs[0].config.name / "checkpoint.pt").stat().st_mtime_ns
    res2 = run_ablation(cfg)
    after = (Path(specs[0].config.output_dir) / specs[0].config.name / "checkpoint.pt").stat().st_mtime_ns
    assert before == after and record["step"] == cfg.num_steps
    assert res2["markdown"].split("total")[1:] and "paper" in res2["markdown"]


def test_ablation_and_oracle_commands_dry_run():
    """The shipped configs by name from another directory; their relative paths (the shipped models the dry run now
    checks) mean $DIFFSEG_WORKDIR, here the checkout, as they mean the working directory without it."""
    env = {**os.environ, "DIFFSEG_WORKDIR": str(REPO)}
    for job, config in (("ablate_factorized.py", "ablation_factorized.yaml"), ("oracle_masks.py", "oracle_horse.yaml")):
        out = subprocess.run(
            [sys.executable, str(REPO / "jobs" / job), "--config", config, "--dry-run"],
            capture_output=True, text=True, timeout=120, cwd="/", env=env,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert "name:" in out.stdout
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "ablate_factorized.py"), "--config",
                          "ablation_factorized.yaml", "--dry-run"], capture_output=True, text=True, timeout=120,
                         cwd="/")  # fmt: skip
    # without it they mean the working directory, /: the first input checked is not there (every input is checked)
    assert out.returncode == 2 and re.search(r": /(shared|models)/\S+ does not exist", out.stderr), out.stderr
