"""The factorized U-Net: K branches as one batched decoder call, one set of decoder weights, masks, paper sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffseg.core.config import load_config
from diffseg.models.factorized import FactorizedConfig, FactorizedUNet
from diffseg.models.unet import UNET_SIZES, UNetConfig

REPO = Path(__file__).resolve().parents[1]


def tiny(num_classes: int | None = None) -> UNetConfig:
    return UNetConfig(
        image_size=16, model_channels=8, channel_mult=(1, 2), attention_resolutions=(8,), num_classes=num_classes
    )


def _randomize_zero_inits(model: FactorizedUNet) -> None:
    # The output convs start at zero (eps = 0 for every branch); give them weights so the comparison means something.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("num_classes", [None, 4])
def test_batched_k_equals_looped_k(num_classes):
    torch.manual_seed(0)
    model = FactorizedUNet(tiny(num_classes), FactorizedConfig(num_components=3)).eval()
    _randomize_zero_inits(model)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 700])
    y = torch.tensor([1, 3]) if num_classes else None
    with torch.no_grad():
        eps, masks, eps_k = model.forward_with_masks(x, t, y)
        looped = model.forward_looped(x, t, y)
    assert eps.shape == (2, 3, 16, 16) and masks.shape == (2, 3, 16, 16) and eps_k.shape == (2, 3, 3, 16, 16)
    assert eps.abs().max() > 1e-3, "a zero output would make the comparison vacuous"
    torch.testing.assert_close(eps, looped, rtol=1e-5, atol=1e-5)
    # The branches differ (each sees its own masked skips) and the masks are a partition of unity.
    assert (eps_k[:, 0] - eps_k[:, 1]).abs().max() > 1e-4
    torch.testing.assert_close(masks.sum(dim=1), torch.ones(2, 16, 16))


def test_decoder_runs_once_over_b_times_k_rows():
    """The K branches are one call of the decoder on B*K rows, not a Python loop over K."""
    model = FactorizedUNet(tiny(), FactorizedConfig(num_components=4)).eval()
    calls: list[int] = []
    model.output_blocks[0].register_forward_hook(lambda m, args, out: calls.append(out.shape[0]))
    with torch.no_grad():
        model(torch.randn(3, 3, 16, 16), torch.tensor([1, 2, 3]))
    assert calls == [3 * 4]


def test_decoder_weights_exist_once():
    """Weight sharing by construction: K only widens the mask head; the decoder is one module, counted once."""
    counts, decoder_sizes = {}, set()
    for k in (1, 2, 5):
        model = FactorizedUNet(tiny(), FactorizedConfig(num_components=k))
        counts[k] = sum(p.numel() for p in model.parameters())
        decoder_sizes.add(sum(p.numel() for p in model.output_blocks.parameters()))
        # every parameter is reachable under exactly one module path: no module (the decoder or a part of it) is
        # registered twice under two names. `named_parameters()` de-duplicates, `remove_duplicate=False` does not.
        every_path = [name for name, _ in model.named_parameters(remove_duplicate=False)]
        assert len(every_path) == len(list(model.named_parameters())), sorted(set(every_path))[:5]
    assert len(decoder_sizes) == 1  # one decoder, the same size whatever K
    head_in = model.mask_out[-1].in_channels
    per_region = head_in * 3 * 3 + 1  # one more output channel of the mask head's 3x3 conv (weights + bias)
    assert counts[2] - counts[1] == per_region and counts[5] - counts[1] == 4 * per_region
    # The shared decoder gets gradient from every branch: zeroing one region's mask changes the decoder's gradient.
    model = FactorizedUNet(tiny(), FactorizedConfig(num_components=2))
    _randomize_zero_inits(model)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 500])
    _, _, eps_k = model.forward_with_masks(x, t)
    grads = []
    for k in range(2):
        model.zero_grad()
        eps_k[:, k].square().sum().backward(retain_graph=True)
        grads.append(model.output_blocks[0][0].in_layers[-1].weight.grad.clone())
    assert grads[0].abs().sum() > 0 and grads[1].abs().sum() > 0


@pytest.mark.parametrize(
    ("config", "size", "stages", "blocks"),
    [
        ("factorized_paper64.yaml", "paper-64", (1, 2, 3, 4), 3),
        ("factorized_paper128.yaml", "paper-128", (1, 1, 2, 3, 4), 2),
    ],
)
def test_paper_sizes_are_named_configs(config, size, stages, blocks):
    from diffseg.training.config import TrainConfig

    cfg = load_config(TrainConfig, REPO / "jobs" / "configs" / config)
    unet = cfg.model.unet
    assert cfg.model.kind == "factorized" and unet.model_channels == 128
    assert unet.channel_mult == stages and unet.num_res_blocks == blocks
    assert unet == UNET_SIZES[size](), "the YAML config and the named size agree"
    assert cfg.data.image_size == unet.image_size
    assert cfg.optim.lr == 1e-4 and cfg.optim.ema_decay == 0.9999 and cfg.diffusion.num_timesteps == 1000
    # Built on the meta device: the real network's layout without allocating its weights.
    with torch.device("meta"):
        model = FactorizedUNet(unet, cfg.model.factorized)
    assert len(model.input_blocks) == 1 + len(stages) * blocks + (len(stages) - 1)
    assert len(model.output_blocks) == len(stages) * (blocks + 1)
