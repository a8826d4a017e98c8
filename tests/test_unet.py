"""The ADM U-Net: named feature shapes, guided-diffusion key/shape parity at 256 px, parity vectors, class
conditioning, overfitting one batch."""

from __future__ import annotations

import json
import time

import pytest
import torch

from diffseg.models.diffusion import GaussianDiffusion, get_named_beta_schedule
from diffseg.models.guided import import_guided_diffusion
from diffseg.models.unet import (
    UNET_SIZES,
    UNet,
    UNetConfig,
    build_unet,
    count_parameters,
    guided_flags_from_unet_config,
    parse_guided_flags,
    unet_config_from_guided_flags,
)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Replace ADM's zero-initialised output layers with random weights, so that every path shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


TINY = UNetConfig(image_size=16, model_channels=8, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=(8,))


def test_every_named_feature_has_the_expected_shape():
    model = randomize_(UNet(TINY)).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 900])
    feats = model.features(x, t, model.feature_names)
    # (channels, resolution) by guided-diffusion's construction, written out for this config:
    # enc: conv-in, res(8), down, res(16); mid at 8 px; dec: 2 per level + 1 (num_res_blocks + 1), upsampling in
    # the last block of every level but the top one.
    expected = {
        "enc.0": (8, 16), "enc.1": (8, 16), "enc.2": (8, 8), "enc.3": (16, 8),
        "mid": (16, 8),
        "dec.0": (16, 8), "dec.1": (16, 16), "dec.2": (8, 16), "dec.3": (8, 16),
        "out": (3, 16),
    }  # fmt: skip
    assert model.feature_names == list(expected)
    for name, (ch, res) in expected.items():
        assert feats[name].shape == (2, ch, res, res), name
        assert model.feature_channels(name) == ch, name
    torch.testing.assert_close(feats["out"], model(x, t))


def test_features_stop_at_the_deepest_block_asked_for():
    model = UNet(TINY).eval()
    calls = []
    for i, block in enumerate(model.output_blocks):
        block.register_forward_hook(lambda *_a, i=i: calls.append(i))
    feats = model.features(torch.randn(1, 3, 16, 16), torch.tensor([10]), ["dec.1", "enc.2"])
    assert list(feats) == ["dec.1", "enc.2"] and calls == [0, 1]
    with pytest.raises(KeyError, match="dec.9"):
        model.features(torch.randn(1, 3, 16, 16), torch.tensor([10]), ["dec.9"])


@pytest.mark.parametrize("size", ["tiny", "small-64"])
def test_named_sizes_build_and_run(size):
    model = build_unet(size).eval()
    cfg = model.cfg
    x = torch.randn(1, 3, cfg.image_size, cfg.image_size)
    assert model(x, torch.tensor([5])).shape == (1, cfg.out_channels, cfg.image_size, cfg.image_size)
    assert len(model.output_blocks) == len(cfg.channel_mult) * (cfg.num_res_blocks + 1)
    assert len(model.input_blocks) == 1 + len(cfg.channel_mult) * (cfg.num_res_blocks + 1) - 1


# ---------------------------------------------------------------------------------------------------- guided-diffusion
def read_keys_tsv(path) -> dict[str, tuple[int, ...]]:
    keys = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        key, shape = line.split("\t")
        keys[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return keys


def test_lsun256_has_exactly_guided_diffusions_keys_and_shapes(reference_dir):
    expected = read_keys_tsv(reference_dir / "adm_lsun256_state_dict_keys.tsv")
    assert len(expected) == 566
    flags = {  # the public LSUN / FFHQ-256 checkpoints' flags (guided-diffusion README)
        "image_size": 256, "num_channels": 256, "num_res_blocks": 2, "attention_resolutions": "32,16,8",
        "num_head_channels": 64, "learn_sigma": True, "resblock_updown": True, "use_scale_shift_norm": True,
        "dropout": 0.1, "class_cond": False, "diffusion_steps": 1000, "noise_schedule": "linear",
    }  # fmt: skip
    for cfg in (unet_config_from_guided_flags(flags), UNET_SIZES["adm-lsun256"]()):
        with torch.device("meta"):  # shapes only: no memory, no time
            model = UNet(cfg)
        ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert sorted(set(ours) - set(expected)) == [] and sorted(set(expected) - set(ours)) == []
        assert ours == expected
        assert count_parameters(model) == 552_814_086
        assert len(model.output_blocks) == 18


@pytest.mark.parametrize("name", ["adm_tiny_a", "adm_tiny_b"])
def test_parity_with_guided_diffusion(reference_dir, name):
    ref = torch.load(reference_dir / f"{name}.pt", map_location="cpu", weights_only=True)
    flags = json.loads((reference_dir / f"{name}.json").read_text())
    model = import_guided_diffusion(ref["state_dict"], flags)
    assert model.cfg == unet_config_from_guided_flags(flags)
    blocks = sorted((k for k in ref if k.startswith("output_blocks.")), key=lambda k: int(k.split(".")[1]))
    assert len(blocks) == len(model.output_blocks)
    names = [f"dec.{k.split('.')[1]}" for k in blocks] + ["out"]
    with torch.no_grad():
        feats = model.features(ref["x"], ref["t"], names)
        out = model(ref["x"], ref["t"])
    for key, ours in zip(blocks + ["out"], feats.values()):
        assert ours.shape == ref[key].shape, key
        torch.testing.assert_close(ours, ref[key], atol=1e-5, rtol=0, msg=lambda m, key=key: f"{key}: {m}")
    torch.testing.assert_close(out, ref["out"], atol=1e-5, rtol=0)
    assert out.shape[1] == (6 if flags["learn_sigma"] else 3)


def _reference_output(reference_dir, name, flags, state=None, **kwargs):
    ref = torch.load(reference_dir / f"{name}.pt", map_location="cpu", weights_only=True)
    model = import_guided_diffusion(state or ref["state_dict"], flags)
    with torch.no_grad():
        return model, model(ref["x"], ref["t"], **kwargs), ref["out"]


def test_omitted_num_heads_is_guided_diffusions_default_of_4(reference_dir):
    """Flags that leave num_heads out mean 4 heads (guided-diffusion's scripts: model_and_diffusion_defaults), not
    create_model's keyword default of 1. The weights load strictly either way, so only the outputs tell: adm_tiny_a
    attends over 64 channels with 16 per head, i.e. 4 heads; without its head flags it must still match the
    reference, and the 1-head network it used to build is visibly off."""
    flags = json.loads((reference_dir / "adm_tiny_a.json").read_text())
    bare = {k: v for k, v in flags.items() if k not in ("num_heads", "num_head_channels")}
    model, out, expected = _reference_output(reference_dir, "adm_tiny_a", bare)
    assert model.cfg.num_heads == 4 and model.cfg.num_head_channels is None
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    _, one_head, _ = _reference_output(reference_dir, "adm_tiny_a", {**bare, "num_heads": 1})
    assert (one_head - expected).abs().max() > 1e-2  # what omitting the flag silently gave before
    # adm_tiny_b was built with 2 heads: its flags say so, and they win over the default
    flags_b = json.loads((reference_dir / "adm_tiny_b.json").read_text())
    _, out_b, expected_b = _reference_output(reference_dir, "adm_tiny_b", flags_b)
    torch.testing.assert_close(out_b, expected_b, atol=1e-5, rtol=0)


def test_class_conditional_import_has_guided_diffusions_1000_classes(reference_dir):
    """class_cond=True without num_classes (every guided-diffusion MODEL_FLAGS) imports a 1000-class model (it was a
    KeyError). adm_tiny_a's weights plus a zero label embedding give the reference output for any class; a non-zero
    embedding row changes exactly the images of that class."""
    flags = {**json.loads((reference_dir / "adm_tiny_a.json").read_text()), "class_cond": True}
    ref = torch.load(reference_dir / "adm_tiny_a.pt", map_location="cpu", weights_only=True)
    state = {**ref["state_dict"], "label_emb.weight": torch.zeros(1000, 4 * flags["num_channels"])}
    model, out, expected = _reference_output(reference_dir, "adm_tiny_a", flags, state, y=torch.tensor([0, 999]))
    assert model.cfg.num_classes == 1000 and model.label_emb.weight.shape == (1000, 128)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    state["label_emb.weight"][7] = 0.5
    _, out7, _ = _reference_output(reference_dir, "adm_tiny_a", flags, state, y=torch.tensor([7, 999]))
    assert (out7[0] - expected[0]).abs().max() > 1e-3
    torch.testing.assert_close(out7[1], expected[1], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="missing"):  # a class-conditional flag set needs the label embedding
        import_guided_diffusion(ref["state_dict"], flags)


def test_readme_model_flags_parse_and_invert():
    text = (  # guided-diffusion's README, LSUN models
        "--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --dropout 0.1 --image_size 256 "
        "--learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 "
        "--resblock_updown True --use_fp16 True --use_scale_shift_norm True"
    )
    flags = parse_guided_flags(text)
    assert flags["learn_sigma"] is True and flags["dropout"] == 0.1 and flags["attention_resolutions"] == "32,16,8"
    cfg = unet_config_from_guided_flags(flags)
    assert cfg == UNET_SIZES["adm-lsun256"]()
    assert unet_config_from_guided_flags(guided_flags_from_unet_config(cfg)) == cfg
    with pytest.raises(ValueError, match="num_head_channel"):  # a typo is an error, never a silent default
        unet_config_from_guided_flags({"image_size": 64, "num_head_channel": 64})
    # ImageNet-512 starts at half width: its channel_mult is only expressible as guided-diffusion's default
    big = unet_config_from_guided_flags({"image_size": 512, "num_channels": 256, "num_head_channels": 64})
    assert big.channel_mult[0] == 0.5 and guided_flags_from_unet_config(big)["channel_mult"] == ""


def test_guided_flags_translation():
    cfg = unet_config_from_guided_flags(
        {"image_size": 64, "num_channels": 64, "num_res_blocks": 3, "class_cond": True, "num_classes": 1000,
         "num_heads": 4, "num_head_channels": -1, "num_heads_upsample": -1, "attention_resolutions": "32,16,8"}
    )  # fmt: skip
    assert cfg.channel_mult == (1, 2, 3, 4) and cfg.num_classes == 1000
    assert cfg.num_head_channels is None and cfg.num_heads_upsample is None
    assert cfg.attention_ds == (2, 4, 8)
    with pytest.raises(ValueError, match="does not divide"):
        UNet(UNetConfig(image_size=32, attention_resolutions=(12,)))


def test_class_conditional():
    cfg = UNetConfig(image_size=16, model_channels=8, channel_mult=(1, 2), attention_resolutions=(8,), num_classes=5)
    model = randomize_(UNet(cfg)).eval()
    assert model.label_emb.weight.shape == (5, 32)  # nn.Embedding(num_classes, 4C), guided-diffusion's label_emb
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([100, 100])
    a = model(x, t, y=torch.tensor([0, 1]))
    b = model(x, t, y=torch.tensor([0, 4]))
    torch.testing.assert_close(a[0], b[0])
    assert not torch.allclose(a[1], b[1])
    with pytest.raises(ValueError, match="class-conditional"):
        model(x, t)
    with pytest.raises(ValueError, match="num_classes=None"):
        UNet(TINY)(x, t, y=torch.tensor([0, 1]))
    # the class embedding trains: a gradient reaches the rows that were used
    model(x, t, y=torch.tensor([2, 2])).square().mean().backward()
    grad = model.label_emb.weight.grad
    assert grad[2].abs().sum() > 0 and grad[[0, 1, 3, 4]].abs().sum() == 0


def test_zero_init_makes_the_initial_prediction_zero():
    model = UNet(TINY)
    out = model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]))
    assert torch.count_nonzero(out) == 0  # ADM's zero_module on the output conv: the initial eps is 0


def test_overfit_one_batch():
    """On one fixed batch (images, timesteps and noise fixed), the epsilon loss falls by 10x."""
    torch.manual_seed(0)
    cfg = UNetConfig(image_size=16, model_channels=16, channel_mult=(1, 2), attention_resolutions=(8,))
    model = UNet(cfg)
    d = GaussianDiffusion(get_named_beta_schedule("linear", 1000))
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    noise = torch.randn(4, 3, 16, 16, generator=g)
    t = torch.tensor([50, 300, 600, 900])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    start, losses = time.perf_counter(), []
    for _ in range(300):
        loss = d.training_losses(model, x0, t, noise)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if losses[-1] < losses[0] / 10:
            break
    assert losses[-1] < losses[0] / 10, f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps"
    print(f"overfit: {losses[0]:.3f} -> {losses[-1]:.4f} in {len(losses)} steps, {time.perf_counter() - start:.1f} s")
