"""The fast circular padding of the U-Nets' convolutions (`models.unet.circular_pad`, `Conv2d`): the same outputs
and gradients as PyTorch's own `padding_mode="circular"`, for single convolutions and for the whole factorized
model, in both memory formats; state dicts unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffseg.models.factorized import FactorizedConfig, FactorizedUNet
from diffseg.models.unet import Conv2d, UNet, UNetConfig, circular_pad

CFG = UNetConfig(
    image_size=16, model_channels=8, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=(8,),
    padding_mode="circular",
)  # fmt: skip


def test_circular_pad_backward_leaves_the_incoming_gradient_alone():
    x = torch.randn(1, 1, 4, 5, requires_grad=True)  # one plane: an H-only slice of the gradient is contiguous
    g = torch.randn(1, 1, 7, 5)
    kept = g.clone()
    circular_pad(x, (0, 0, 1, 2)).backward(g)
    assert torch.equal(g, kept) and torch.allclose(
        x.grad, torch.autograd.grad(F.pad(x, (0, 0, 1, 2), mode="circular"), x, g)[0]
    )


@pytest.mark.parametrize("pad", [(1, 1, 1, 1), (2, 1, 0, 3), (0, 0, 1, 2), (5, 5, 4, 4)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_circular_pad_is_f_pad_with_an_exact_adjoint(pad, channels_last):
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    assert torch.equal(circular_pad(x, pad), F.pad(x, pad, mode="circular"))
    assert torch.autograd.gradcheck(lambda v: circular_pad(v, pad), (x,))
    g = torch.randn_like(F.pad(x, pad, mode="circular"))
    (ours,) = torch.autograd.grad(circular_pad(x, pad), x, g)
    (ref,) = torch.autograd.grad(F.pad(x, pad, mode="circular"), x, g)
    assert torch.allclose(ours, ref, atol=1e-12)


def test_circular_pad_leaves_what_f_pad_refuses_to_f_pad():
    with pytest.raises(RuntimeError, match="wrapping around more than once"):  # F.pad's own error
        circular_pad(torch.randn(1, 1, 2, 2), (3, 3, 0, 0))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(8, 8), (7, 5), (1, 3)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_equals_torch_circular_conv(stride, size, channels_last):
    torch.manual_seed(0)
    ours = Conv2d(4, 6, 3, stride=stride, padding=1, padding_mode="circular").double()
    ref = nn.Conv2d(4, 6, 3, stride=stride, padding=1, padding_mode="circular").double()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 4, *size, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    y, y_ref = ours(x), ref(x)
    assert torch.allclose(y, y_ref, atol=1e-12)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *ours.parameters()], g)
    grads_ref = torch.autograd.grad(y_ref, [x, *ref.parameters()], g)
    for a, b in zip(grads, grads_ref):
        assert torch.allclose(a, b, atol=1e-12)


def _use_reference_padding(model: nn.Module) -> nn.Module:
    """The implementation before `circular_pad`: nn.Conv2d's own circular padding, in the input's memory format."""
    model.circular_channels_last = False
    for m in model.modules():
        if isinstance(m, Conv2d):
            m.reference_padding = True
    return model


@pytest.mark.parametrize("channels_last", [False, True])
def test_factorized_model_outputs_and_gradients_equal_the_reference(channels_last):
    """The whole K=3 factorized model with circular padding: eps, masks and every parameter's gradient match
    PyTorch's own circular padding in the input's memory format (float32 tolerance), whether the input is
    contiguous (then the fast model computes in channels_last on the CPU) or channels_last."""
    fcfg = FactorizedConfig(num_components=3, decoding="masked_skips_and_mid")
    torch.manual_seed(0)
    fast = FactorizedUNet(CFG, fcfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random (not zero-initialised) outputs, so every path shows
        for p in fast.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    ref = _use_reference_padding(FactorizedUNet(CFG, fcfg))
    ref.load_state_dict(fast.state_dict())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    fast, ref = fast.to(memory_format=fmt), ref.to(memory_format=fmt)
    x = torch.randn(2, 3, 16, 16, generator=g).contiguous(memory_format=fmt)
    t = torch.tensor([10, 600])
    eps, masks, _ = fast.forward_with_masks(x, t)
    eps_ref, masks_ref, _ = ref.forward_with_masks(x, t)
    assert torch.allclose(eps, eps_ref, atol=1e-5) and torch.allclose(masks, masks_ref, atol=1e-5)
    assert fast.circular_channels_last and not ref.circular_channels_last
    (eps.square().mean() + masks[:, 0].mean()).backward()
    (eps_ref.square().mean() + masks_ref[:, 0].mean()).backward()
    for (name, p), p_ref in zip(fast.named_parameters(), ref.parameters()):
        assert torch.allclose(p.grad, p_ref.grad, rtol=1e-4, atol=1e-6), name


def test_state_dict_keys_are_unchanged_and_load_either_way():
    circular, zeros = UNet(CFG), UNet(UNetConfig(**{**CFG.__dict__, "padding_mode": "zeros"}))
    assert list(circular.state_dict()) == list(zeros.state_dict())
    zeros.load_state_dict(circular.state_dict())  # strict: the same keys and shapes
    convs = [m for m in circular.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(isinstance(m, Conv2d) for m in convs)  # every conv gets the fast path
