"""Stage `sampling`: DDIM-50 on the factorized paper-64 model, eager / torch.compile "reduce-overhead" (CUDA graphs)."""

from __future__ import annotations

import time

import torch

from diffseg.core.config import replace
from diffseg.methods.sampling import sample
from diffseg.models.diffusion import DiffusionConfig, GaussianDiffusion
from diffseg.models.factorized import FactorizedConfig, FactorizedUNet
from diffseg.models.unet import count_parameters, named_size
from kit.stage import Recorder, progress, sync


def stage_sampling(spec: dict, rec: Recorder) -> None:
    """DDIM-50 with the factorized paper-64 K=3 model: eager, then torch.compile mode="reduce-overhead" (CUDA
    graphs), the compiled path of bench/sampling.py (its `_Compiled`), through `diffseg.methods.sampling.sample`."""
    import sampling as sampling_bench
    from harness import autocast

    device = torch.device(spec["device"])
    use_bf16 = device.type == "cuda"
    ucfg = named_size("tiny" if spec["smoke"] else "paper-64")
    if spec["smoke"]:
        ucfg = replace(ucfg, image_size=16, attention_resolutions=[8])
    model = FactorizedUNet(ucfg, FactorizedConfig(num_components=3))
    mf = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model = model.to(device, memory_format=mf).eval()
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(num_timesteps=1000))
    n, steps = (2, 5) if spec["smoke"] else (64, 50)
    rec.set(
        "setup",
        {
            "model": f"factorized {'tiny (smoke)' if spec['smoke'] else 'paper-64'}, K=3",
            "image_size": ucfg.image_size,
            "num_images": n,
            "sampler": f"DDIM-{steps}",
            "precision": "bf16" if use_bf16 else "fp32",
            "params_m": count_parameters(model) / 1e6,
        },
    )

    def run(net) -> float:
        gen = torch.Generator(device).manual_seed(0)
        sync(device)
        t0 = time.perf_counter()
        with autocast(device, use_bf16):
            sample(net, diffusion, n, method="ddim", steps=steps, generator=gen, device=device)
        sync(device)
        return time.perf_counter() - t0

    def row(secs: list[float]) -> dict:
        s = sorted(secs)[len(secs) // 2]
        return {"s_per_batch": s, "images_per_s": n / s, "ms_per_step": 1e3 * s / steps, "runs": len(secs)}

    progress("sampling: model built; warm-up")
    run(model)  # warm-up: cuDNN autotuning, allocator
    progress("sampling: timing eager")
    rec.set("eager", row([run(model) for _ in range(3)]))
    progress("sampling: compiling (CUDA graphs)")
    mode = "reduce-overhead" if device.type == "cuda" else None
    t0 = time.perf_counter()
    backend = "eager" if spec["smoke"] else "inductor"
    compiled = sampling_bench._Compiled(model, mode, backend=backend)
    with torch.no_grad(), autocast(device, use_bf16):
        x = torch.zeros(n, 3, ucfg.image_size, ucfg.image_size, device=device)
        tt = torch.zeros(n, dtype=torch.long, device=device)
        for _ in range(3):  # reduce-overhead records its graphs on the later calls
            compiled(x, tt)
    sync(device)
    compile_s = time.perf_counter() - t0
    rec.set("compile_s", compile_s)
    run(compiled)
    label = "cuda_graphs" if device.type == "cuda" else "compiled"
    rec.set(label, {**row([run(compiled) for _ in range(3)]), "compile_s": compile_s, "mode": mode, "backend": backend})
    rec.set("speedup", rec.data["results"]["eager"]["s_per_batch"] / rec.data["results"][label]["s_per_batch"])
