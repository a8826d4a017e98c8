"""Training-step throughput of our ADM U-Net against diffusers' `UNet2DModel` at the same size, side by side.

One step = forward, MSE loss on eps, backward, AdamW update (the same optimizer for both; fused on CUDA). The two
models are timed in interleaved rounds after a warmup, in one process, and the ratio ours/diffusers is printed.

How the sizes are matched (both are the DDPM/ADM U-Net; diffusers' UNet2DModel was ported from it):

    ours (UNetConfig)                          diffusers (UNet2DModel)
    model_channels C, channel_mult (m_i)   ->  block_out_channels (C*m_i)
    num_res_blocks N                       ->  layers_per_block N (both decoders have N+1 blocks per level)
    attention_resolutions (pixels)         ->  AttnDownBlock2D/AttnUpBlock2D at the levels with those resolutions,
                                               DownBlock2D/UpBlock2D elsewhere; mid block res-attn-res in both
    num_head_channels                      ->  attention_head_dim
    GroupNorm(32) (normalization())        ->  norm_num_groups=32 (so C must be a multiple of 32)
    use_scale_shift_norm=True              ->  resnet_time_scale_shift="scale_shift"
    conv up/downsampling (resblock_updown=False) -> downsample_type="conv", upsample_type="conv"
    time embedding dim 4C, [cos | sin]     ->  time_embedding_dim 4C, flip_sin_to_cos=True, freq_shift=0

The parameter counts of the two are printed; they differ only by diffusers' separate q/k/v biases layout (equal in
count) and nothing else, so they should agree to within a fraction of a percent.

    python bench/unet_step.py                       # CPU defaults: 32 px, C=64, (1,2,2), 2 res blocks, batch 8
    python bench/unet_step.py --threads 1
    python bench/unet_step.py --device cuda --image-size 64 --model-channels 128 --batch-size 64   # bf16 + NHWC
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from harness import (
    add_common_args,
    autocast,
    bf16_peak_tflops,
    command_line,
    count_flops,
    machine_line,
    setup,
    time_interleaved,
)
from torch import nn

from diffseg.models.unet import UNet, UNetConfig, count_parameters


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--model-channels", type=int, default=64)
    p.add_argument("--channel-mult", default="1,2,2")
    p.add_argument("--num-res-blocks", type=int, default=2)
    p.add_argument("--attention-resolutions", default="16,8", help="resolutions in pixels, e.g. 16,8")
    p.add_argument("--num-head-channels", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--compile", action="store_true", help="torch.compile both models (slow to compile on CPU)")
    return p.parse_args(argv)


def build_pair(args: argparse.Namespace) -> tuple[nn.Module, nn.Module]:
    from diffusers import UNet2DModel

    mult = tuple(int(m) for m in args.channel_mult.split(","))
    attn = tuple(int(r) for r in args.attention_resolutions.split(","))
    cfg = UNetConfig(
        image_size=args.image_size,
        in_channels=3,
        model_channels=args.model_channels,
        num_res_blocks=args.num_res_blocks,
        channel_mult=mult,
        attention_resolutions=attn,
        num_head_channels=args.num_head_channels,
        use_scale_shift_norm=True,
        resblock_updown=False,
    )
    if any((m * args.model_channels) % 32 for m in mult):
        raise SystemExit("--model-channels * every channel_mult must be a multiple of 32 (both models use 32 groups)")
    ours = UNet(cfg)
    attn_levels = [args.image_size // 2**i in attn for i in range(len(mult))]
    theirs = UNet2DModel(
        sample_size=args.image_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(m * args.model_channels for m in mult),
        layers_per_block=args.num_res_blocks,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn_levels),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in attn_levels[::-1]),
        attention_head_dim=args.num_head_channels,
        norm_num_groups=32,
        norm_eps=1e-5,  # torch's GroupNorm default, what ADM uses
        resnet_time_scale_shift="scale_shift",
        downsample_type="conv",
        upsample_type="conv",
        flip_sin_to_cos=True,
        freq_shift=0,
        time_embedding_type="positional",
        add_attention=True,
        dropout=0.0,
    )
    # diffusers zero-inits nothing; ours zero-inits residual outputs (ADM). Give both ordinary random weights so
    # neither computes on all-zero branches (the FLOPs are the same either way, the numbers should be too).
    torch.manual_seed(args.seed)
    for model in (ours, theirs):
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv1d, nn.Linear)) and m.weight.abs().sum() == 0:
                nn.init.normal_(m.weight, std=0.02)
    return ours, theirs


def make_step(model: nn.Module, forward, x, t, noise, device, use_bf16: bool):
    """One training step with no host synchronisation inside (no .item(), no data-dependent control flow)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step():
        with autocast(device, use_bf16):
            eps = forward(x, t)
        loss = F.mse_loss(eps.float(), noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def fwd_bwd():  # what the FLOP counter sees: the optimizer's elementwise work is not counted
        with autocast(device, use_bf16):
            eps = forward(x, t)
        F.mse_loss(eps.float(), noise).backward()
        model.zero_grad(set_to_none=True)

    return step, fwd_bwd


def main(argv=None) -> None:
    args = parse_args(argv)
    device, use_bf16 = setup(args)
    ours, theirs = build_pair(args)
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    ours, theirs = (m.to(device, memory_format=memory_format).train() for m in (ours, theirs))
    n_ours, n_theirs = count_parameters(ours), count_parameters(theirs)

    g = torch.Generator().manual_seed(args.seed)
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    x = torch.randn(shape, generator=g).to(device, memory_format=memory_format)
    noise = torch.randn(shape, generator=g).to(device)
    t = torch.randint(0, 1000, (args.batch_size,), generator=g).to(device)

    fwd_ours = ours
    fwd_theirs = lambda x, t: theirs(x, t).sample  # noqa: E731
    flops = {
        "ours": count_flops(make_step(ours, fwd_ours, x, t, noise, device, use_bf16)[1]),
        "diffusers": count_flops(make_step(theirs, fwd_theirs, x, t, noise, device, use_bf16)[1]),
    }
    if args.compile:
        fwd_ours, fwd_theirs = torch.compile(fwd_ours), torch.compile(fwd_theirs)
    steps = {
        "ours": make_step(ours, fwd_ours, x, t, noise, device, use_bf16)[0],
        "diffusers": make_step(theirs, fwd_theirs, x, t, noise, device, use_bf16)[0],
    }
    secs = time_interleaved(steps, device, args.warmup, args.repeats, args.iters)

    peak = bf16_peak_tflops(device) if use_bf16 else None
    precision = "bf16 autocast, channels_last" if use_bf16 else "fp32"
    print(machine_line(device))
    print(command_line())
    print(
        f"# U-Net train step (fwd+bwd+AdamW), {args.image_size} px, C={args.model_channels}, mult {args.channel_mult}, "
        f"{args.num_res_blocks} res blocks/level, attention at {args.attention_resolutions} px, "
        f"batch {args.batch_size}, "
        f"{precision}{', torch.compile' if args.compile else ''}; median of {args.repeats} interleaved rounds "
        f"of {args.iters} steps after {args.warmup} warmup"
    )
    print(
        f"{'model':<10} {'params':>11} {'ms/step':>8} {'img/s':>7} {'cpu ms/step':>11} {'GFLOP/step':>10} "
        f"{'TFLOP/s':>8} {'% peak':>7}"
    )
    for name, n in (("ours", n_ours), ("diffusers", n_theirs)):
        wall, cpu = secs[name]["wall"], secs[name]["cpu"]
        tflops = flops[name] / wall / 1e12
        pct = f"{100 * tflops / peak:.1f}" if peak else "-"
        print(
            f"{name:<10} {n:>11,} {1e3 * wall:>8.1f} {args.batch_size / wall:>7.2f} {1e3 * cpu:>11.1f} "
            f"{flops[name] / 1e9:>10.2f} {tflops:>8.3f} {pct:>7}"
        )
    print(f"params ours/diffusers = {n_ours / n_theirs:.4f}")
    ratio = secs["diffusers"]["wall"] / secs["ours"]["wall"]
    print(f"throughput ratio ours/diffusers (wall) = {ratio:.3f}  (>= 1.0: ours is at least as fast)")
    if device.type == "cpu":
        cpu_ratio = secs["diffusers"]["cpu"] / secs["ours"]["cpu"]
        print(f"throughput ratio ours/diffusers (CPU time) = {cpu_ratio:.3f}  (steadier on a shared machine)")
    if device.type == "cuda" and use_bf16 and peak is None:
        print(f"# no bf16 peak on file for {torch.cuda.get_device_name(device)}: add it to harness.BF16_PEAK_TFLOPS")


if __name__ == "__main__":
    main()
