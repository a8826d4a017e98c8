"""Stage `train_step`: the factorized paper-64 K=3 bf16 train step, images/s, FLOPs, TFLOP/s, % of peak; eager and
compiled."""

from __future__ import annotations

import time

import torch
from harness import count_flops

from diffseg.core.config import load_config
from diffseg.training.config import TrainConfig
from diffseg.training.loop import build_train_state, step_generator, train_step
from kit import REPO
from kit.stage import SMOKE_STEP_OVERRIDES, Recorder, gpu_peak_gib, maybe_compile, pct, progress, sync, timed


def stage_train_step(spec: dict, rec: Recorder) -> None:
    """The factorized paper-64 K=3 train step through the library's loop (bf16, channels_last, fused AdamW):
    images/s, FLOPs per step (FlopCounterMode, forward+backward), TFLOP/s and % of peak; eager, then compiled."""
    device = torch.device(spec["device"])
    batch_size = 2 if spec["smoke"] else spec["batch_size"]
    overrides = [
        "loop.precision=bf16" if device.type == "cuda" else "loop.precision=fp32",
        f"optim.batch_size={batch_size}",
        "tracking.enabled=false",
    ]
    if spec["smoke"]:
        overrides += SMOKE_STEP_OVERRIDES
    cfg = load_config(TrainConfig, REPO / "jobs" / "configs" / "factorized_paper64.yaml", overrides)
    state, _ = build_train_state(cfg, device)
    size = cfg.model.unet.image_size
    batch = {"image": torch.rand(cfg.optim.batch_size, 3, size, size, device=device) * 2 - 1}
    gen = step_generator(cfg, 0, 0, device)
    params = sum(p.numel() for p in state.model.parameters())
    k = cfg.model.factorized.num_components
    info = {
        "model": f"factorized {'tiny (smoke)' if spec['smoke'] else 'paper-64'}, K={k}",
        "config": "jobs/configs/factorized_paper64.yaml",
        "params_m": params / 1e6,
        "batch": cfg.optim.batch_size,
        "image_size": size,
        "precision": str(state.autocast_dtype or "fp32").removeprefix("torch."),
        "channels_last": state.memory_format == torch.channels_last,
        "fused_adamw": device.type == "cuda",
    }
    rec.set("setup", info)
    peak = spec.get("peak_tflops")
    progress("train_step: model built; timing the eager step")
    # Throughput first (the figure that matters if the box runs out), FLOPs next (FlopCounterMode dispatches every op
    # through Python: slow on a 210M-parameter network), compilation last (minutes of inductor on a cold cache).
    eager = timed(lambda: train_step(state, batch, gen), device, spec)
    flops: float | None = None

    def row(r: dict, **extra) -> dict:
        tflops = flops / r["s"] / 1e12 if flops else None
        return {
            "ms_per_step": 1e3 * r["s"],
            "images_per_s": cfg.optim.batch_size / r["s"],
            "tflops": tflops,
            "pct_peak": pct(tflops, peak) if tflops else None,
            "steps_timed": r["iters"],
            "gpu_peak_gib": gpu_peak_gib(device),
            **extra,
        }

    rec.set("eager", row(eager))
    progress(f"train_step: eager {1e3 * eager['s']:.1f} ms/step; counting FLOPs")
    flops = count_flops(lambda: train_step(state, batch, gen))  # forward+backward; AdamW and EMA are not counted
    rec.set("gflop_per_step", flops / 1e9)
    rec.set("eager", row(eager))
    progress("train_step: compiling")
    t0 = time.perf_counter()
    state.model = maybe_compile(state.model, spec)  # train_step and the EMA update see through the wrapper
    for _ in range(2):  # the first calls compile forward and backward
        train_step(state, batch, gen)
    sync(device)
    compile_s = time.perf_counter() - t0
    rec.set("compile_s", compile_s)
    rec.set("compiled", row(timed(lambda: train_step(state, batch, gen), device, spec, warmup=1), compile_s=compile_s))
    rec.set(
        "speedup_compiled", rec.data["results"]["eager"]["ms_per_step"] / rec.data["results"]["compiled"]["ms_per_step"]
    )
