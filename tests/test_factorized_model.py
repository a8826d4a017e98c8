"""The factorized U-Net: one decoder whatever K, ADM names, gradients reach every branch, sizes and errors.

(Batched == looped over K is in test_factorized.py.)
"""

from __future__ import annotations

import pytest
import torch

from diffseg.models.factorized import FactorizedConfig, FactorizedUNet, build_factorized
from diffseg.models.unet import UNET_SIZES, UNet, UNetConfig, count_parameters

CFG = UNetConfig(image_size=16, model_channels=8, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=(8,))


def randomize_(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def test_one_decoder_whatever_k():
    unet = UNet(CFG)
    counts = {}
    for k in (2, 5):
        model = FactorizedUNet(CFG, FactorizedConfig(num_components=k))
        decoder = sum(p.numel() for n, p in model.named_parameters() if n.startswith("output_blocks."))
        assert decoder == count_parameters(unet.output_blocks)  # exactly one decoder's parameters
        dec_keys = {n for n in model.state_dict() if n.startswith("output_blocks.")}
        assert dec_keys == {n for n in unet.state_dict() if n.startswith("output_blocks.")}  # not one per region
        counts[k] = count_parameters(model)
        # names are the ADM U-Net's, so a DDPM checkpoint initialises encoder, middle and decoder
        shared = {n: p.shape for n, p in unet.state_dict().items()}
        ours = {n: p.shape for n, p in model.state_dict().items()}
        assert all(ours[n] == s for n, s in shared.items() if not n.startswith("out."))
    # K only changes the mask head's output conv: (K2 - K1) * (C_in * 9 + 1) parameters
    head_in = model.mask_out[-1].in_channels
    assert counts[5] - counts[2] == 3 * (head_in * 9 + 1)


def test_decoder_gets_gradient_from_every_branch():
    model = randomize_(FactorizedUNet(CFG, FactorizedConfig(num_components=3)))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 500])
    _, masks, eps_k = model.forward_with_masks(x, t)
    grads = []
    for k in range(3):
        model.zero_grad()
        eps_k[:, k].square().mean().backward(retain_graph=True)
        grads.append(model.out[-1].weight.grad.clone())
    assert all(g.abs().sum() > 0 for g in grads)
    assert not torch.allclose(grads[0], grads[1])


def test_sizes_and_errors():
    for name in ("tiny", "small-64"):
        model = build_factorized(name, FactorizedConfig(num_components=2)).eval()
        s = UNET_SIZES[name]().image_size
        assert model(torch.randn(1, 3, s, s), torch.tensor([3])).shape == (1, 3, s, s)
    with pytest.raises(ValueError, match="learn_sigma"):
        FactorizedUNet(UNetConfig(learn_sigma=True))
    with pytest.raises(ValueError, match="num_components"):
        FactorizedUNet(CFG, FactorizedConfig(num_components=0))
