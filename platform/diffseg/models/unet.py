"""The ADM U-Net (Dhariwal & Nichol 2021), state-dict compatible with openai/guided-diffusion's `UNetModel`.

One implementation from a 16 px, 8-channel test model to the 256 px, 552M-parameter LSUN model: size is config.
Module names (`input_blocks.N`, `middle_block`, `output_blocks.N`, `out`, `time_embed`, `label_emb`) are
guided-diffusion's, so its checkpoints load unchanged. Features are API, not hooks: every block's output has a name
(`enc.N`, `mid`, `dec.N`, numbered like guided-diffusion's `input_blocks`/`output_blocks`) and `features()` returns
the requested ones, stopping as soon as it has them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    image_size: int = 32  # input resolution in pixels (sets which levels get attention)
    in_channels: int = 3  # image channels
    model_channels: int = 32  # base width C; level i has C * channel_mult[i] channels
    num_res_blocks: int = 1  # residual blocks per level in the encoder (the decoder has one more)
    channel_mult: tuple[int | float, ...] = (1, 2, 2)  # width multiplier per level (ImageNet-512: 0.5 first)
    attention_resolutions: tuple[int, ...] = (16,)  # resolutions (in pixels) whose blocks get self-attention
    num_heads: int = 1  # attention heads, used when num_head_channels is None
    num_head_channels: int | None = None  # channels per head (overrides num_heads)
    num_heads_upsample: int | None = None  # heads in the decoder; None = num_heads
    use_scale_shift_norm: bool = True  # FiLM-like timestep conditioning (ADM) instead of adding the embedding
    resblock_updown: bool = False  # up/downsample with residual blocks (ADM) instead of plain conv/pool
    use_new_attention_order: bool = False  # split qkv before heads (guided-diffusion's QKVAttention)
    conv_resample: bool = True  # convolutions in plain up/downsampling layers
    dropout: float = 0.0  # dropout in residual blocks
    learn_sigma: bool = False  # also predict the variance: 2 x in_channels outputs
    num_classes: int | None = None  # class-conditional with this many classes
    padding_mode: Literal["zeros", "circular", "reflect"] = "zeros"  # 3x3 convs' padding; circular = no position cue

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)

    @property
    def attention_ds(self) -> tuple[int, ...]:
        """Downsampling rates (1, 2, 4, ...) whose blocks get attention, as guided-diffusion stores them."""
        for res in self.attention_resolutions:
            if self.image_size % res:
                raise ValueError(f"attention_resolutions: {res} does not divide image_size {self.image_size}")
        return tuple(self.image_size // res for res in self.attention_resolutions)


# Named sizes: one-line factories, as DiT keeps them, for both networks (`build_unet`, `build_factorized`). Paper sizes
# are configs, not code paths.
UNET_SIZES: dict[str, Callable[[], UNetConfig]] = {
    "tiny": lambda: UNetConfig(image_size=32, model_channels=16, channel_mult=(1, 2), attention_resolutions=(16,)),
    "small-64": lambda: UNetConfig(image_size=64, model_channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=2),
    # The factorized paper (Yuan & Maire), 64 px: 4 stages of 3 res blocks, channels C, 2C, 3C, 4C with C = 128
    "paper-64": lambda: UNetConfig(
        image_size=64,
        model_channels=128,
        num_res_blocks=3,
        channel_mult=(1, 2, 3, 4),
        attention_resolutions=(32, 16, 8),
        num_head_channels=64,
        use_scale_shift_norm=True,
        resblock_updown=True,
    ),  # fmt: skip
    # The factorized paper, 128 px: 5 stages of 2 res blocks, channels C, C, 2C, 3C, 4C with C = 128
    "paper-128": lambda: UNetConfig(
        image_size=128,
        model_channels=128,
        num_res_blocks=2,
        channel_mult=(1, 1, 2, 3, 4),
        attention_resolutions=(32, 16, 8),
        num_head_channels=64,
        use_scale_shift_norm=True,
        resblock_updown=True,
    ),  # fmt: skip
    # openai/guided-diffusion LSUN bedroom/cat/horse and FFHQ-256 (the label-efficient paper's backbones)
    "adm-lsun256": lambda: UNetConfig(
        image_size=256,
        model_channels=256,
        num_res_blocks=2,
        channel_mult=(1, 1, 2, 2, 4, 4),
        attention_resolutions=(32, 16, 8),
        num_heads=4,  # unused with num_head_channels; 4 is what guided-diffusion's flags give
        num_head_channels=64,
        learn_sigma=True,
        resblock_updown=True,
        use_scale_shift_norm=True,
        dropout=0.1,
    ),  # fmt: skip
}


def named_size(name: str) -> UNetConfig:
    """A UNetConfig from UNET_SIZES, with an error that lists the names."""
    if name not in UNET_SIZES:
        raise KeyError(f"unknown model size {name!r}; known: {sorted(UNET_SIZES)}")
    return UNET_SIZES[name]()


# What a `create_model` flag is when a checkpoint's MODEL_FLAGS leave it out: guided-diffusion's scripts take their
# defaults from `model_and_diffusion_defaults()` (guided_diffusion/script_util.py), not from `create_model`'s own
# keyword defaults (num_heads=1, attention "16", no scale-shift norm). A class-conditional model has NUM_CLASSES = 1000
# classes there (ImageNet); `num_classes` is our extension for other counts.
GUIDED_MODEL_DEFAULTS: dict[str, Any] = {
    "image_size": 64,
    "num_channels": 128,
    "num_res_blocks": 2,
    "num_heads": 4,
    "num_heads_upsample": -1,
    "num_head_channels": -1,
    "attention_resolutions": "16,8",
    "channel_mult": "",
    "dropout": 0.0,
    "class_cond": False,
    "use_checkpoint": False,
    "use_scale_shift_norm": True,
    "resblock_updown": False,
    "use_fp16": False,
    "use_new_attention_order": False,
    "learn_sigma": False,
}
GUIDED_DIFFUSION_DEFAULTS: dict[str, Any] = {  # `diffusion_defaults()`: the process the flags describe
    "diffusion_steps": 1000,
    "noise_schedule": "linear",
    "timestep_respacing": "",
    "use_kl": False,
    "predict_xstart": False,
    "rescale_timesteps": False,
    "rescale_learned_sigmas": False,
}
GUIDED_NUM_CLASSES = 1000
GUIDED_EXTRA_FLAGS = ("in_channels", "num_classes")  # ours: not create_model flags, but accepted
# Channel multipliers guided-diffusion picks for `channel_mult=""` (ImageNet-512 starts at half width).
GUIDED_CHANNEL_MULT: dict[int, tuple[int | float, ...]] = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}


def parse_guided_flags(text: str) -> dict[str, Any]:
    """A MODEL_FLAGS string as guided-diffusion's README writes it ("--image_size 256 --learn_sigma True ...") -> a
    flags dict with typed values (True/False -> bool, integers, floats; "32,16,8" stays a string, as its argparse
    keeps it). Unknown flags are an error (`check_guided_flags`)."""
    tokens = text.split()
    flags: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        key = tokens[i]
        if not key.startswith("--") or i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
            raise ValueError(f"guided-diffusion flags: expected '--name value' pairs, got {key!r} in {text!r}")
        raw = tokens[i + 1]
        value: Any = raw
        if raw in ("True", "true", "False", "false"):
            value = raw.lower() == "true"
        else:
            for cast in (int, float):
                try:
                    value = cast(raw)
                    break
                except ValueError:
                    pass
        flags[key[2:]] = value
        i += 2
    check_guided_flags(flags)
    return flags


def check_guided_flags(flags: dict[str, Any]) -> None:
    """Reject flags that are not guided-diffusion's model/diffusion flags: a typo would otherwise fall back to the
    default silently (and a model that loads strictly can still compute something else)."""
    known = set(GUIDED_MODEL_DEFAULTS) | set(GUIDED_DIFFUSION_DEFAULTS) | set(GUIDED_EXTRA_FLAGS)
    unknown = sorted(set(flags) - known)
    if unknown:
        raise ValueError(f"unknown guided-diffusion flag(s) {unknown}; known: {sorted(known)}")


def unet_config_from_guided_flags(flags: dict[str, Any]) -> UNetConfig:
    """Translate guided-diffusion's `create_model` flags ("16,8" strings, -1 sentinels) into a UNetConfig.

    A flag that is not given takes the value guided-diffusion's scripts give it (`GUIDED_MODEL_DEFAULTS`), so the
    MODEL_FLAGS of its README build the network its checkpoint was trained as; `class_cond=True` means 1000 classes
    unless `num_classes` says otherwise. Unknown flags are an error.
    """
    check_guided_flags(flags)
    f = {**GUIDED_MODEL_DEFAULTS, **flags}
    image_size = int(f["image_size"])
    channel_mult = f["channel_mult"]
    if not channel_mult:
        if image_size not in GUIDED_CHANNEL_MULT:
            raise ValueError(f"no default channel_mult for image_size {image_size}; give channel_mult")
        channel_mult = GUIDED_CHANNEL_MULT[image_size]
    elif isinstance(channel_mult, str):
        channel_mult = tuple(float(c) if "." in c else int(c) for c in channel_mult.split(","))
    attn = f["attention_resolutions"]
    attn = tuple(int(r) for r in str(attn).split(",")) if isinstance(attn, (str, int)) else tuple(attn)
    head_channels = int(f["num_head_channels"])
    heads_up = int(f["num_heads_upsample"])
    num_classes = None
    if f["class_cond"]:
        num_classes = int(f.get("num_classes") or GUIDED_NUM_CLASSES)
    return UNetConfig(
        image_size=image_size,
        in_channels=int(f.get("in_channels", 3)),
        model_channels=int(f["num_channels"]),
        num_res_blocks=int(f["num_res_blocks"]),
        channel_mult=tuple(channel_mult),
        attention_resolutions=attn,
        num_heads=int(f["num_heads"]),
        num_head_channels=None if head_channels == -1 else head_channels,
        num_heads_upsample=None if heads_up == -1 else heads_up,
        use_scale_shift_norm=bool(f["use_scale_shift_norm"]),
        resblock_updown=bool(f["resblock_updown"]),
        use_new_attention_order=bool(f["use_new_attention_order"]),
        dropout=float(f["dropout"]),
        learn_sigma=bool(f["learn_sigma"]),
        num_classes=num_classes,
    )


def guided_flags_from_unet_config(cfg: UNetConfig) -> dict[str, Any]:
    """The `create_model` flags that build `cfg` in guided-diffusion (the inverse of `unet_config_from_guided_flags`;
    every flag written out). Refused for what guided-diffusion cannot express (another padding, 1-channel images)."""
    if cfg.padding_mode != "zeros" or cfg.in_channels != 3 or not cfg.conv_resample:
        raise ValueError(
            "guided-diffusion's UNetModel has 3 input channels, zero padding and conv resampling; this network "
            f"(in_channels={cfg.in_channels}, padding_mode={cfg.padding_mode!r}, conv_resample={cfg.conv_resample}) "
            "has no guided-diffusion equivalent"
        )
    if cfg.num_classes not in (None, GUIDED_NUM_CLASSES):
        raise ValueError(f"guided-diffusion's class-conditional models have 1000 classes, this one {cfg.num_classes}")
    mult = tuple(cfg.channel_mult)
    if mult == GUIDED_CHANNEL_MULT.get(cfg.image_size):
        channel_mult = ""  # its default for the size (the only way it writes ImageNet-512's 0.5)
    elif all(float(m).is_integer() for m in mult):
        channel_mult = ",".join(str(int(m)) for m in mult)
    else:
        raise ValueError(f"guided-diffusion parses channel_mult as integers; {mult} has no flag form")
    return {
        "image_size": cfg.image_size,
        "num_channels": cfg.model_channels,
        "num_res_blocks": cfg.num_res_blocks,
        "channel_mult": channel_mult,
        "attention_resolutions": ",".join(str(r) for r in cfg.attention_resolutions),
        "num_heads": cfg.num_heads,
        "num_head_channels": -1 if cfg.num_head_channels is None else cfg.num_head_channels,
        "num_heads_upsample": -1 if cfg.num_heads_upsample is None else cfg.num_heads_upsample,
        "use_scale_shift_norm": cfg.use_scale_shift_norm,
        "resblock_updown": cfg.resblock_updown,
        "use_new_attention_order": cfg.use_new_attention_order,
        "dropout": cfg.dropout,
        "learn_sigma": cfg.learn_sigma,
        "class_cond": cfg.num_classes is not None,
    }


# ---------------------------------------------------------------------------------------------------- layers
def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim), [cos | sin] as guided-diffusion orders it."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


@functools.lru_cache(maxsize=64)
def _circular_index(
    h: int, w: int, pad: tuple[int, int, int, int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat indices of circular padding of an (h, w) image by pad = (left, right, top, bottom):
    (source pixel of every padded pixel, padded position of every interior pixel, padded positions of the border,
    their source pixels). Cached: every conv of a level shares them."""
    left, right, top, bottom = pad
    rows = torch.arange(-top, h + bottom, device=device)  # (H + top + bottom,)
    cols = torch.arange(-left, w + right, device=device)  # (W + left + right,)
    source = ((rows[:, None] % h) * w + cols[None, :] % w).flatten()  # (N,) pixel of x each padded pixel copies
    inside = ((rows[:, None] >= 0) & (rows[:, None] < h) & (cols[None, :] >= 0) & (cols[None, :] < w)).flatten()
    position = torch.arange(len(source), device=device)
    return source, position[inside], position[~inside], source[~inside]


class _CircularPad(torch.autograd.Function):
    """Circular padding of (B, C, H, W): one gather forward; backward, one copy of the interior's gradient and one
    scatter-add of the border's (the same numbers as F.pad's).

    `F.pad(mode="circular")` copies the interior and then each border slice, and autograd differentiates each copy on
    its own (a zero tensor of the input's size per slice, filled and summed); its column copies stride across every
    row. For every 3x3 conv of every step that made circular padding cost 1.7x zero padding per train step on a CPU
    (bench/circular_padding.py). Here the forward gathers the padded image from the input with one flat index; the
    backward copies the interior's gradient and adds the border's onto the pixels it was copied from. A
    channels_last tensor is gathered pixel by pixel (C contiguous values each), which is cheaper still.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, pad: tuple[int, int, int, int]) -> torch.Tensor:
        b, c, h, w = x.shape
        source, *_ = _circular_index(h, w, pad, x.device)
        ctx.shape, ctx.pad = x.shape, pad
        hp, wp = h + pad[2] + pad[3], w + pad[0] + pad[1]
        if x.is_contiguous(memory_format=torch.channels_last):  # gather whole pixels (C values each)
            out = x.permute(0, 2, 3, 1).reshape(b, h * w, c).index_select(1, source)  # (B, N, C)
            return out.view(b, hp, wp, c).permute(0, 3, 1, 2)  # (B, C, H', W'), channels_last
        out = x.reshape(b * c, h * w).index_select(1, source)  # (B*C, N), N = (H + top + bottom) * (W + left + right)
        return out.view(b, c, hp, wp)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        b, c, h, w = ctx.shape
        _, interior, border, border_source = _circular_index(h, w, ctx.pad, grad.device)
        if grad.is_contiguous(memory_format=torch.channels_last):
            flat = grad.permute(0, 2, 3, 1).reshape(b, -1, c)  # (B, N, C)
            out = flat.index_select(1, interior)  # (B, H*W, C)
            out.index_add_(1, border_source, flat.index_select(1, border))
            return out.view(b, h, w, c).permute(0, 3, 1, 2), None
        left, _, top, _ = ctx.pad
        out = grad[..., top : top + h, left : left + w].clone(memory_format=torch.contiguous_format)  # (B, C, H, W)
        flat = grad.reshape(b * c, -1)  # (B*C, N)
        out.view(b * c, h * w).index_add_(1, border_source, flat.index_select(1, border))
        return out, None


def circular_pad(x: torch.Tensor, pad: tuple[int, int, int, int]) -> torch.Tensor:
    """`F.pad(x, pad, mode="circular")` for (B, C, H, W) (pad = (left, right, top, bottom)), with a fast backward."""
    if x.ndim != 4 or any(not 0 <= p <= n for p, n in zip(pad, (x.shape[-1],) * 2 + (x.shape[-2],) * 2)):
        return F.pad(x, pad, mode="circular")  # F.pad's own checks and messages
    return _CircularPad.apply(x, tuple(pad))


class Conv2d(nn.Conv2d):
    """nn.Conv2d whose circular padding goes through `circular_pad` (the same numbers, a fraction of the cost).

    Every conv of the U-Nets is one, so `set_padding_mode(model, "circular")` gets the fast path; parameters and
    state-dict keys are nn.Conv2d's. Other padding modes are nn.Conv2d's own.
    """

    reference_padding = False  # True: nn.Conv2d's own circular padding (the reference of the test and the bench)

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.padding_mode != "circular" or self.reference_padding:
            return super()._conv_forward(input, weight, bias)
        x = circular_pad(input, self._reversed_padding_repeated_twice)  # (B, C, H + 2p, W + 2p)
        return F.conv2d(x, weight, bias, self.stride, 0, self.dilation, self.groups)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (stable under bf16/fp16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int) -> nn.Module:
    return GroupNorm32(32 if channels % 32 == 0 else math.gcd(32, channels), channels)


class TimestepBlock(nn.Module):
    """A block whose forward takes the timestep embedding as a second argument."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """Sequential that hands the embedding to the children that take it."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels, self.out_channels, self.use_conv = channels, out_channels or channels, use_conv
        if use_conv:
            self.conv = Conv2d(self.channels, self.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels, self.out_channels = channels, out_channels or channels
        if use_conv:
            self.op = Conv2d(self.channels, self.out_channels, 3, stride=2, padding=1)
        else:
            if self.channels != self.out_channels:
                raise ValueError("a pooling Downsample cannot change the number of channels")
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """ADM residual block: GroupNorm-SiLU-conv, timestep conditioning (add, or scale-shift), optional up/down."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), Conv2d(channels, self.out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            Conv2d(self.out_channels, self.out_channels, 3, padding=1),
        )
        self.skip_connection = (
            nn.Identity() if self.out_channels == channels else Conv2d(channels, self.out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            # Resample between the norm/activation and the conv, as ADM does.
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]  # (B, C or 2C, 1, 1)
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = torch.addcmul(shift, self.out_layers[0](h), 1 + scale)  # norm(h) * (1 + scale) + shift, one pass
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Spatial self-attention; `scaled_dot_product_attention` (flash/fused where available) does the math.

    The weights are guided-diffusion's 1x1 `Conv1d`s (`qkv`, `proj_out`; same keys and shapes), but they are applied
    as matmuls on a (B, L, C) view: a 1x1 Conv1d falls to a slow im2col path on CPU, and token-major q/k/v in 4-D
    (B, heads, L, ch) is the layout the flash kernels take (CPU and CUDA) without a copy. With a channels_last input
    the (B, L, C) view is free.
    """

    def __init__(
        self, channels: int, num_heads: int = 1, num_head_channels: int | None = None, new_order: bool = False
    ):
        super().__init__()
        if num_head_channels is not None:
            if channels % num_head_channels:
                raise ValueError(f"{channels} channels are not divisible by num_head_channels {num_head_channels}")
            num_heads = channels // num_head_channels
        self.num_heads, self.new_order = num_heads, new_order
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        heads, ch = self.num_heads, c // self.num_heads
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, L, C)
        length = tokens.shape[1]
        qkv = F.linear(tokens, self.qkv.weight.squeeze(-1), self.qkv.bias)  # (B, L, 3C)
        if self.new_order:  # channel = which * C + head * ch + i
            q, k, v = qkv.reshape(b, length, 3, heads, ch).permute(2, 0, 3, 1, 4)  # (B, H, L, ch) each
        else:  # guided-diffusion's legacy order: heads first, then q|k|v within each head
            q, k, v = qkv.reshape(b, length, heads, 3, ch).permute(3, 0, 2, 1, 4)  # (B, H, L, ch) each
        h = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, ch)
        h = h.transpose(1, 2).reshape(b, length, c)  # (B, L, C)
        h = F.linear(h, self.proj_out.weight.squeeze(-1), self.proj_out.bias)  # (B, L, C)
        return x + h.transpose(1, 2).reshape(b, c, *spatial)


# ---------------------------------------------------------------------------------------------------- halves
@dataclass(frozen=True)
class EncoderLayout:
    """What a decoder needs to know about the encoder it is wired to."""

    skip_channels: tuple[int, ...]  # channels of each input block's output, in order (the skips)
    skip_ds: tuple[int, ...]  # downsampling rate of each skip
    channels: int  # channels at the bottom (middle block)
    ds: int  # downsampling rate at the bottom


def build_encoder(cfg: UNetConfig, emb_dim: int) -> tuple[nn.ModuleList, TimestepEmbedSequential, EncoderLayout]:
    """guided-diffusion's `input_blocks` and `middle_block`."""
    ch = int(cfg.channel_mult[0] * cfg.model_channels)
    blocks = nn.ModuleList([TimestepEmbedSequential(Conv2d(cfg.in_channels, ch, 3, padding=1))])
    chans, dss, ds = [ch], [1], 1
    attention_ds = cfg.attention_ds
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            layers: list[nn.Module] = [
                ResBlock(ch, emb_dim, cfg.dropout, int(mult * cfg.model_channels), cfg.use_scale_shift_norm)
            ]
            ch = int(mult * cfg.model_channels)
            if ds in attention_ds:
                layers.append(AttentionBlock(ch, cfg.num_heads, cfg.num_head_channels, cfg.use_new_attention_order))
            blocks.append(TimestepEmbedSequential(*layers))
            chans.append(ch)
            dss.append(ds)
        if level != len(cfg.channel_mult) - 1:
            down = (
                ResBlock(ch, emb_dim, cfg.dropout, ch, cfg.use_scale_shift_norm, down=True)
                if cfg.resblock_updown
                else Downsample(ch, cfg.conv_resample, ch)
            )
            blocks.append(TimestepEmbedSequential(down))
            ds *= 2
            chans.append(ch)
            dss.append(ds)
    middle = TimestepEmbedSequential(
        ResBlock(ch, emb_dim, cfg.dropout, use_scale_shift_norm=cfg.use_scale_shift_norm),
        AttentionBlock(ch, cfg.num_heads, cfg.num_head_channels, cfg.use_new_attention_order),
        ResBlock(ch, emb_dim, cfg.dropout, use_scale_shift_norm=cfg.use_scale_shift_norm),
    )
    return blocks, middle, EncoderLayout(tuple(chans), tuple(dss), ch, ds)


def build_decoder(cfg: UNetConfig, emb_dim: int, layout: EncoderLayout) -> tuple[nn.ModuleList, int]:
    """guided-diffusion's `output_blocks`: block N consumes skip number len(skips) - 1 - N. Returns (blocks, ch)."""
    chans = list(layout.skip_channels)
    ch, ds = layout.channels, layout.ds
    heads_up = cfg.num_heads_upsample if cfg.num_heads_upsample is not None else cfg.num_heads
    attention_ds = cfg.attention_ds
    blocks = nn.ModuleList()
    for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
        for i in range(cfg.num_res_blocks + 1):
            skip_ch = chans.pop()
            layers: list[nn.Module] = [
                ResBlock(
                    ch + skip_ch,
                    emb_dim,
                    cfg.dropout,
                    int(cfg.model_channels * mult),
                    cfg.use_scale_shift_norm,
                )
            ]
            ch = int(cfg.model_channels * mult)
            if ds in attention_ds:
                layers.append(AttentionBlock(ch, heads_up, cfg.num_head_channels, cfg.use_new_attention_order))
            if level and i == cfg.num_res_blocks:
                layers.append(
                    ResBlock(ch, emb_dim, cfg.dropout, ch, cfg.use_scale_shift_norm, up=True)
                    if cfg.resblock_updown
                    else Upsample(ch, cfg.conv_resample, ch)
                )
                ds //= 2
            blocks.append(TimestepEmbedSequential(*layers))
    return blocks, ch


def build_out(ch: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(normalization(ch), nn.SiLU(), Conv2d(ch, out_channels, 3, padding=1))


def zero_init_residual_outputs(module: nn.Module) -> None:
    """ADM's zero_module: every residual branch starts as the identity (out convs and attention projections)."""
    for m in module.modules():
        if isinstance(m, ResBlock):
            nn.init.zeros_(m.out_layers[-1].weight)
            nn.init.zeros_(m.out_layers[-1].bias)
        elif isinstance(m, AttentionBlock):
            nn.init.zeros_(m.proj_out.weight)
            nn.init.zeros_(m.proj_out.bias)


def set_padding_mode(module: nn.Module, mode: str) -> None:
    """Every 3x3 convolution of `module` pads with `mode` ("zeros", "circular", "reflect").

    Zero padding tells a conv net where the image border is, so its outputs can depend on absolute position; with
    circular padding every layer is translation-equivariant (up to the stride of the downsampling layers), so a
    network cannot produce a fixed spatial split. No parameter changes: state dicts load either way.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1:
            m.padding_mode = mode


# ---------------------------------------------------------------------------------------------------- models
class UNetTrunk(nn.Module):
    """What the ADM U-Net and the factorized U-Net share: the timestep (and class) embedding, the encoder
    (`input_blocks`) and the middle block, under guided-diffusion's module names. Subclasses add their decoder(s)."""

    # With circular padding on a CPU the network computes in channels_last (NHWC): every 3x3 conv pads its input, and
    # `circular_pad` then gathers whole pixels (C contiguous values) instead of single values strided across rows.
    # Measured on the K=3 recipe's train step (bench/circular_padding.py, 1 thread): 1.19x -> 1.03x of zero padding
    # (CPU time). The same numbers up to float rounding; False keeps the input's memory format (the test's reference).
    circular_channels_last = True

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        self.emb_dim = cfg.model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(cfg.model_channels, self.emb_dim), nn.SiLU(), nn.Linear(self.emb_dim, self.emb_dim)
        )
        if cfg.num_classes is not None:
            self.label_emb = nn.Embedding(cfg.num_classes, self.emb_dim)
        self.input_blocks, self.middle_block, self.layout = build_encoder(cfg, self.emb_dim)

    def initialize_weights(self) -> None:
        """ADM's init: every residual branch and the output conv start at zero, so the network starts as a skip."""
        zero_init_residual_outputs(self)
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def embed(self, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) timesteps (and class labels) -> (B, 4C). A class-conditional network needs y; others refuse one."""
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels))  # (B, 4C)
        if self.cfg.num_classes is not None:
            if y is None:
                raise ValueError(f"this {type(self).__name__} is class-conditional: pass class labels y")
            emb = emb + self.label_emb(y)
        elif y is not None:
            raise ValueError(f"y was given but this {type(self).__name__} has num_classes=None")
        return emb

    def encode(
        self, x: torch.Tensor, emb: torch.Tensor, taps: dict | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Input blocks and middle block: x (B, C, H, W) -> (h_mid (B, C_mid, H/ds, W/ds), skips, one per block)."""
        skips, h = [], x
        if self.cfg.padding_mode == "circular" and self.circular_channels_last and x.device.type == "cpu":
            h = x.contiguous(memory_format=torch.channels_last)  # every block after this one follows its format
        for i, block in enumerate(self.input_blocks):
            h = block(h, emb)
            skips.append(h)
            if taps is not None:
                taps[f"enc.{i}"] = h
        h = self.middle_block(h, emb)
        if taps is not None:
            taps["mid"] = h
        return h, skips

    @staticmethod
    def run_decoder(
        blocks: nn.ModuleList,
        h: torch.Tensor,
        skips: list[torch.Tensor],
        emb: torch.Tensor,
        taps: dict | None = None,
        stop_after: int | None = None,
    ) -> torch.Tensor:
        """A decoder half: block N takes [h, the last unused skip] (guided-diffusion's wiring). `skips` is not
        modified. `taps` collects `dec.N`; `stop_after` ends after block N (feature extraction)."""
        skips = list(skips)
        for i, block in enumerate(blocks):
            h = block(torch.cat([h, skips.pop()], dim=1), emb)  # (B, C_i, H_i, W_i)
            if taps is not None:
                taps[f"dec.{i}"] = h
            if stop_after is not None and i >= stop_after:
                break
        return h


class UNet(UNetTrunk):
    """ADM U-Net: `forward(x_t, t, y=None) -> (B, out_channels, H, W)`; `features()` for named block outputs."""

    def __init__(self, cfg: UNetConfig):
        super().__init__(cfg)
        self.output_blocks, ch = build_decoder(cfg, self.emb_dim, self.layout)
        self.out = build_out(ch, cfg.out_channels)
        self.initialize_weights()
        set_padding_mode(self, cfg.padding_mode)

    @property
    def feature_names(self) -> list[str]:
        return (
            [f"enc.{i}" for i in range(len(self.input_blocks))]
            + ["mid"]
            + [f"dec.{i}" for i in range(len(self.output_blocks))]
            + ["out"]
        )

    def feature_channels(self, name: str) -> int:
        """Channels of a named feature, computed from the config (no forward pass)."""
        kind, _, idx = name.partition(".")
        if kind == "enc":
            return self.layout.skip_channels[int(idx)]
        if kind == "mid":
            return self.layout.channels
        if kind == "dec":
            block = self.output_blocks[int(idx)]
            res = next(m for m in block if isinstance(m, ResBlock))
            return res.out_channels
        if kind == "out":
            return self.cfg.out_channels
        raise KeyError(f"unknown feature {name!r}; known: enc.N, mid, dec.N, out")

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.embed(t, y)  # (B, 4C)
        h, skips = self.encode(x, emb)  # (B, C_mid, h, w), skips
        h = self.run_decoder(self.output_blocks, h, skips, emb)  # (B, C, H, W)
        return self.out(h.type(x.dtype))  # (B, out_channels, H, W)

    def features(
        self, x: torch.Tensor, t: torch.Tensor, names: Iterable[str], y: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """The named block outputs for input x_t at timesteps t; stops after the deepest decoder block asked for."""
        names = list(names)
        unknown = sorted(set(names) - set(self.feature_names))
        if unknown:
            raise KeyError(f"unknown feature name(s) {unknown}; this U-Net has {self.feature_names}")
        taps: dict[str, torch.Tensor] = {}
        emb = self.embed(t, y)
        h, skips = self.encode(x, emb, taps)
        dec_needed = [int(n.split(".")[1]) for n in names if n.startswith("dec.")]
        last = len(self.output_blocks) - 1 if "out" in names else max(dec_needed, default=-1)
        if last >= 0:
            h = self.run_decoder(self.output_blocks, h, skips, emb, taps, stop_after=last)
        if "out" in names:
            taps["out"] = self.out(h)
        return {n: taps[n] for n in names}


def build_unet(cfg: UNetConfig | str) -> UNet:
    return UNet(named_size(cfg) if isinstance(cfg, str) else cfg)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
