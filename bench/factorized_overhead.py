"""What factorizing costs: the step time of the factorized model (K regions) over that of the plain DDPM U-Net of
the same widths, against the same ratio of FLOPs; and the batched K-branch decoder against a Python loop over K.

FLOPs (counted with torch's FlopCounterMode over forward+backward, matmuls/convolutions/attention):
    DDPM        = E + D                 (encoder+middle E, decoder D)
    factorized  = E + D + K*D           (mask generator: a decoder half; the shared decoder applied K times)
so the ratio is (E + (K+1) D) / (E + D), about 1 + K/2 when the two halves cost the same. The measured ratio of
forward+backward times (the work the counter sees; `--with-optimizer` adds AdamW) should land near it: what the
counter does not see (mask resizing, skip masking, concatenations over B*K rows, the K-way sum) is overhead of the
implementation, and this bench shows how much of it there is.

    python bench/factorized_overhead.py                 # CPU defaults: 32 px, C=32, mult 1,2,2, K=3, batch 8
    python bench/factorized_overhead.py --device cuda --size paper-64 --batch-size 32 --compile   # % of bf16 peak
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

from diffseg.models.factorized import FactorizedConfig, FactorizedUNet
from diffseg.models.unet import UNET_SIZES, UNet, UNetConfig, count_parameters


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--size", default=None, help="a named size from unet.UNET_SIZES (e.g. paper-64)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--model-channels", type=int, default=32)
    p.add_argument("--channel-mult", default="1,2,2")
    p.add_argument("--num-res-blocks", type=int, default=1)
    p.add_argument("--attention-resolutions", default="16")
    p.add_argument("--num-head-channels", type=int, default=32)
    p.add_argument("--resblock-updown", action="store_true", help="ADM residual up/downsampling (paper sizes)")
    p.add_argument("--num-components", "-K", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tolerance", type=float, default=0.15, help="allowed |measured/FLOP ratio - 1|")
    p.add_argument("--no-loop", action="store_true", help="skip the batched-vs-loop comparison")
    p.add_argument("--compile", action="store_true", help="torch.compile the models (slow to compile on CPU)")
    p.add_argument(
        "--with-optimizer",
        action="store_true",
        help="time AdamW updates too (default: forward+backward, exactly the work the FLOP ratio counts; the "
        "optimizer's cost follows parameter counts, 1.6x here, not FLOPs)",
    )
    p.set_defaults(iters=1)
    return p.parse_args(argv)


def make_step(model: nn.Module, forward, x, t, noise, device, use_bf16: bool, with_optimizer: bool = True):
    """Forward, MSE on eps, backward (and an AdamW update unless with_optimizer=False, as the FLOP counter sees it)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step():
        with autocast(device, use_bf16):
            eps = forward(x, t)
        F.mse_loss(eps.float(), noise).backward()
        if with_optimizer:
            opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main(argv=None) -> None:
    args = parse_args(argv)
    device, use_bf16 = setup(args)
    cfg = UNET_SIZES[args.size]() if args.size else UNetConfig(
        image_size=args.image_size,
        model_channels=args.model_channels,
        num_res_blocks=args.num_res_blocks,
        channel_mult=tuple(int(m) for m in args.channel_mult.split(",")),
        attention_resolutions=tuple(int(r) for r in args.attention_resolutions.split(",")),
        num_head_channels=args.num_head_channels,
        resblock_updown=args.resblock_updown,
    )  # fmt: skip
    k = args.num_components
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    ddpm = UNet(cfg).to(device, memory_format=memory_format).train()
    fact = FactorizedUNet(cfg, FactorizedConfig(num_components=k)).to(device, memory_format=memory_format).train()
    # Random (not zero) residual outputs, so that no branch computes on zeros.
    for model in (ddpm, fact):
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv1d, nn.Linear)) and m.weight.abs().sum() == 0:
                nn.init.normal_(m.weight, std=0.02)

    g = torch.Generator().manual_seed(args.seed)
    shape = (args.batch_size, cfg.in_channels, cfg.image_size, cfg.image_size)
    x = torch.randn(shape, generator=g).to(device, memory_format=memory_format)
    noise = torch.randn(shape, generator=g).to(device)
    t = torch.randint(0, 1000, (args.batch_size,), generator=g).to(device)

    forwards = {"ddpm": (ddpm, ddpm), "factorized": (fact, fact)}
    if not args.no_loop:
        forwards["factorized-loop"] = (fact, fact.forward_looped)
    flops = {
        name: count_flops(make_step(m, f, x, t, noise, device, use_bf16, with_optimizer=False))
        for name, (m, f) in forwards.items()
    }
    if args.compile:
        forwards = {name: (m, torch.compile(f)) for name, (m, f) in forwards.items()}
    steps = {
        name: make_step(m, f, x, t, noise, device, use_bf16, with_optimizer=args.with_optimizer)
        for name, (m, f) in forwards.items()
    }
    secs = time_interleaved(steps, device, args.warmup, args.repeats, args.iters)

    print(machine_line(device))
    print(command_line())
    print(
        f"# {'train step (fwd+bwd+AdamW)' if args.with_optimizer else 'forward+backward'}, "
        f"{args.size or 'custom'}: {cfg.image_size} px, C={cfg.model_channels}, "
        f"mult {cfg.channel_mult}, {cfg.num_res_blocks} res blocks/level, attention at {cfg.attention_resolutions} px, "
        f"K={k}, batch {args.batch_size}, {'bf16 autocast, channels_last' if use_bf16 else 'fp32'}"
        f"{', torch.compile' if args.compile else ''}; median of {args.repeats} interleaved rounds of {args.iters}"
    )
    params = {"ddpm": count_parameters(ddpm), "factorized": count_parameters(fact)}
    params["factorized-loop"] = params["factorized"]
    peak = bf16_peak_tflops(device) if use_bf16 else None
    print(
        f"{'model':<16} {'params':>11} {'ms/step':>8} {'img/s':>8} {'cpu ms/step':>11} {'GFLOP/step':>10} "
        f"{'TFLOP/s':>8} {'% peak':>7}"
    )
    for name in steps:
        wall = secs[name]["wall"]
        tflops = flops[name] / wall / 1e12
        pct = f"{100 * tflops / peak:.1f}" if peak else "-"
        print(
            f"{name:<16} {params[name]:>11,} {1e3 * wall:>8.1f} {args.batch_size / wall:>8.2f} "
            f"{1e3 * secs[name]['cpu']:>11.1f} {flops[name] / 1e9:>10.2f} {tflops:>8.3f} {pct:>7}"
        )
    flop_ratio = flops["factorized"] / flops["ddpm"]
    print(f"FLOP ratio factorized/ddpm = {flop_ratio:.3f}  (1 + K/2 = {1 + k / 2:.2f} if both halves cost alike)")
    clocks = ("wall", "cpu") if device.type == "cpu" else ("wall",)
    for clock in clocks:
        measured = secs["factorized"][clock] / secs["ddpm"][clock]
        off = measured / flop_ratio - 1
        verdict = "within" if abs(off) <= args.tolerance else "OUTSIDE"
        print(
            f"step-time ratio factorized/ddpm ({clock}) = {measured:.3f}: {100 * off:+.1f}% from the FLOP ratio "
            f"({verdict} {100 * args.tolerance:.0f}%)"
        )
    if not args.no_loop:
        for clock in clocks:
            speedup = secs["factorized-loop"][clock] / secs["factorized"][clock]
            print(f"batched K branches vs Python loop over K ({clock}): {speedup:.2f}x")


if __name__ == "__main__":
    main()
