"""Sampling throughput: images/s for DDPM over all T steps and for DDIM-50, eager and with torch.compile.

The samplers are the library's (`diffseg.methods.sampling.sample`); only the network call is compiled. On CUDA,
`--compile` uses mode="reduce-overhead", which captures the network in CUDA graphs (the fixed shapes of a sampling
loop are what graphs need); on CPU it uses the default inductor mode (C++/OpenMP kernels), which takes a while to
compile: the compile time is reported apart from the timed runs, so the images/s are steady-state.

    python bench/sampling.py                            # CPU: tiny U-Net, 32 px, 8 images, DDPM-200, DDIM-50
    python bench/sampling.py --compile                  # + torch.compile (CPU: slow to compile, see the report)
    python bench/sampling.py --model factorized         # the factorized model (masks come out with the samples)
    python bench/sampling.py --device cuda --size paper-64 --model factorized --num-images 64 --compile
"""

from __future__ import annotations

import argparse
import time

import torch
from harness import add_common_args, autocast, command_line, machine_line, setup, sync
from torch import nn

from diffseg.methods.sampling import sample
from diffseg.models.diffusion import DiffusionConfig, build_diffusion
from diffseg.models.factorized import FactorizedConfig, FactorizedUNet
from diffseg.models.unet import UNET_SIZES, UNet


class _Compiled(nn.Module):
    """The model with a compiled forward and the `cfg` the sampler reads. A compiled factorized model is sampled
    through its eps-only forward (the same network calls; the masks are not kept)."""

    def __init__(self, model: nn.Module, mode: str | None, backend: str = "inductor"):
        super().__init__()
        self.model, self.cfg = model, model.cfg
        # backend="eager" only traces (dynamo, no code generation): the gpu_kit smoke test's cheap stand-in
        self._forward = torch.compile(model.forward, mode=mode, dynamic=False, backend=backend)

    def forward(self, x, t, **kwargs):
        return self._forward(x, t, **kwargs)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--model", choices=["unet", "factorized"], default="unet")
    p.add_argument("--size", default="tiny", help="a named size (unet.UNET_SIZES)")
    p.add_argument("--num-components", "-K", type=int, default=3)
    p.add_argument("--num-images", type=int, default=8)
    p.add_argument(
        "--num-timesteps", type=int, default=None, help="T, all of whose steps DDPM takes (default: 1000 CUDA, 200 CPU)"
    )
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--compile", action="store_true", help="also time the torch.compile'd network")
    p.set_defaults(warmup=0, repeats=1)  # a sampling run is hundreds of network calls: it warms itself up
    return p.parse_args(argv)


def time_sampler(model, diffusion, args, device, use_bf16, method: str, steps: int | None) -> tuple[float, float]:
    """(wall, process CPU) seconds for one batch of samples: the median of --repeats runs, after --warmup runs."""
    times, cpu_times = [], []
    for i in range(args.warmup + args.repeats):
        gen = torch.Generator(device).manual_seed(args.seed)
        sync(device)
        start, cpu = time.perf_counter(), time.process_time()
        with autocast(device, use_bf16):
            sample(model, diffusion, args.num_images, method=method, steps=steps, generator=gen, device=device)
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu)
    return sorted(times)[len(times) // 2], sorted(cpu_times)[len(cpu_times) // 2]


def main(argv=None) -> None:
    args = parse_args(argv)
    device, use_bf16 = setup(args)
    if args.num_timesteps is None:
        args.num_timesteps = 1000 if device.type == "cuda" else 200
    if args.model == "unet":
        model: nn.Module = UNet(UNET_SIZES[args.size]())
    else:
        model = FactorizedUNet(UNET_SIZES[args.size](), FactorizedConfig(num_components=args.num_components))
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model = model.to(device, memory_format=memory_format).eval()
    diffusion = build_diffusion(DiffusionConfig(num_timesteps=args.num_timesteps))
    variants = {"eager": model}
    compile_s = None
    if args.compile:
        compiled = _Compiled(model, "reduce-overhead" if device.type == "cuda" else None)
        start = time.perf_counter()  # compile on the sampling shapes, outside the timed runs
        with torch.no_grad(), autocast(device, use_bf16):
            x = torch.zeros(args.num_images, model.cfg.in_channels, model.cfg.image_size, model.cfg.image_size)
            t = torch.zeros(args.num_images, dtype=torch.long)
            for _ in range(3):  # reduce-overhead records its graphs on the later calls
                compiled(x.to(device), t.to(device))
        sync(device)
        compile_s = time.perf_counter() - start
        variants["torch.compile" + (" (CUDA graphs)" if device.type == "cuda" else "")] = compiled

    print(machine_line(device))
    print(command_line())
    print(
        f"# sampling, {args.model} '{args.size}' ({model.cfg.image_size} px), {args.num_images} images per batch, "
        f"T={args.num_timesteps}, {'bf16 autocast, channels_last' if use_bf16 else 'fp32'}; "
        f"median of {args.repeats} runs after {args.warmup} warmup"
    )
    if compile_s is not None:
        print(f"# torch.compile: {compile_s:.1f} s to compile (not in the figures below)")
    print(f"{'sampler':<12} {'network':<28} {'s/batch':>8} {'img/s':>8} {'ms/step':>8} {'cpu ms/step':>11}")
    for method, steps, label in (
        ("ddpm", None, f"DDPM-{args.num_timesteps}"),
        ("ddim", args.ddim_steps, f"DDIM-{args.ddim_steps}"),
    ):
        n_steps = args.num_timesteps if steps is None else steps
        for name, net in variants.items():
            secs, cpu = time_sampler(net, diffusion, args, device, use_bf16, method, steps)
            print(
                f"{label:<12} {name:<28} {secs:>8.2f} {args.num_images / secs:>8.2f} {1e3 * secs / n_steps:>8.2f} "
                f"{1e3 * cpu / n_steps:>11.2f}"
            )


if __name__ == "__main__":
    main()
