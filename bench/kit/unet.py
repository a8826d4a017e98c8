"""Stage `unet`: our U-Net train step / diffusers UNet2DModel at matched size (skipped without diffusers)."""

from __future__ import annotations

from argparse import Namespace

import torch
from harness import count_flops

from diffseg.models.unet import count_parameters
from kit.stage import Recorder, Skip, pct, progress


def stage_unet(spec: dict, rec: Recorder) -> None:
    """Our ADM U-Net's train step / diffusers' UNet2DModel at matched size (bench/unet_step.py's mapping)."""
    try:
        import diffusers
    except Exception as e:
        raise Skip(f"diffusers is not importable ({type(e).__name__}: {str(e)[:160]}); carry its wheel (.whl)") from e
    import unet_step
    from harness import time_interleaved

    device = torch.device(spec["device"])
    use_bf16 = device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    size = dict(
        image_size=64,
        model_channels=128,
        channel_mult="1,2,2",
        num_res_blocks=2,
        attention_resolutions="16,8",
        num_head_channels=32,
        batch_size=64,
        seed=0,
    )
    if spec["smoke"]:
        size.update(
            image_size=16,
            model_channels=32,
            channel_mult="1,2",
            num_res_blocks=1,
            attention_resolutions="8",
            batch_size=2,
        )
    args = Namespace(**size)
    ours, theirs = unet_step.build_pair(args)
    mf = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    ours, theirs = (m.to(device, memory_format=mf).train() for m in (ours, theirs))
    g = torch.Generator().manual_seed(0)
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    x = torch.randn(shape, generator=g).to(device, memory_format=mf)
    noise = torch.randn(shape, generator=g).to(device)
    t = torch.randint(0, 1000, (args.batch_size,), generator=g).to(device)
    fwd_theirs = lambda x, t: theirs(x, t).sample  # noqa: E731
    pairs = {"ours": (ours, ours), "diffusers": (theirs, fwd_theirs)}
    steps = {k: unet_step.make_step(m, f, x, t, noise, device, use_bf16)[0] for k, (m, f) in pairs.items()}
    progress("unet: both networks built; timing")
    rec.set(
        "setup",
        {
            **size,
            "diffusers_version": diffusers.__version__,
            "precision": "bf16" if use_bf16 else "fp32",
            "params_ours": count_parameters(ours),
            "params_diffusers": count_parameters(theirs),
        },
    )
    repeats = 3 if spec["smoke"] else 5
    secs = time_interleaved(steps, device, warmup=2, repeats=repeats, iters=1 if spec["smoke"] else 3)
    rec.set("ratio", secs["diffusers"]["wall"] / secs["ours"]["wall"])  # the figure first; FLOPs (slow) after
    progress(f"unet: diffusers/ours = {rec.data['results']['ratio']:.3f}; counting FLOPs")
    flops = {k: count_flops(unet_step.make_step(m, f, x, t, noise, device, use_bf16)[1]) for k, (m, f) in pairs.items()}
    for k in steps:
        wall = secs[k]["wall"]
        tflops = flops[k] / wall / 1e12
        rec.set(
            k,
            {
                "ms_per_step": 1e3 * wall,
                "images_per_s": args.batch_size / wall,
                "gflop_per_step": flops[k] / 1e9,
                "tflops": tflops,
                "pct_peak": pct(tflops, spec.get("peak_tflops")),
            },
        )
