"""Stage `rate`: every research run's bare train step, measured in the window's first seconds (the plan's figures):
images/s (eager), GFLOP per image (forward + backward), TFLOP/s and % of peak; and for the first run, torch.compile
against eager with the compile time apart, which decides whether the research runs compile."""

from __future__ import annotations

import json
import time
from functools import partial

import torch
from harness import count_flops

from diffseg.core.config import to_dict
from diffseg.training.loop import build_train_state, step_generator, train_step
from kit.stage import Recorder, left, maybe_compile, pct, progress, sync, timed
from kit.train import resolve_train_config


def stage_rate(spec: dict, rec: Recorder) -> None:
    device = torch.device(spec["device"])
    peak = spec.get("peak_tflops")
    runs: dict[str, dict] = {}
    first = None
    flops_of: dict[str, float] = {}  # per architecture: the lever runs share their paper run's network
    per_run = max(1.0, min(3.0, (left(spec) - 40) / max(3 * len(spec["runs"]), 1)))  # seconds of timing per run
    for run in spec["runs"]:
        if left(spec) < 5:
            rec.note(f"out of time before {run['name']}")
            break
        cfg = resolve_train_config({**spec, "config": run["config"], "overrides": run["overrides"]})
        state, _ = build_train_state(cfg, device)
        size, batch_size = cfg.model.unet.image_size, cfg.optim.batch_size
        batch = {"image": torch.rand(batch_size, 3, size, size, device=device) * 2 - 1}
        gen = step_generator(cfg, 0, 0, device)
        step = partial(train_step, state, batch, gen)
        r = timed(step, device, {**spec, "deadline": time.time() + per_run + 2}, warmup=3, target_s=per_run)
        arch = json.dumps([cfg.model.kind, to_dict(cfg.model.unet), cfg.model.factorized.num_components, batch_size],
                          sort_keys=True)  # fmt: skip
        if arch not in flops_of:
            flops_of[arch] = count_flops(step)
        flops = flops_of[arch]
        gflop_per_image = flops / batch_size / 1e9
        ips = batch_size / r["s"]
        tflops = ips * gflop_per_image / 1e3
        runs[run["name"]] = {
            "kind": cfg.model.kind,
            "params_m": sum(p.numel() for p in state.model.parameters()) / 1e6,
            "batch": batch_size,
            "image_size": size,
            "images_per_s": ips,
            "gflop_per_image": gflop_per_image,
            "tflops": tflops,
            "pct_peak": pct(tflops, peak),
            "steps_timed": r["iters"],
        }
        rec.set("runs", runs)
        progress(f"rate: {run['name']}: {ips:,.0f} images/s eager ({gflop_per_image:.2f} GFLOP/image)")
        if first is None:
            first = (run["name"], state, batch, gen, ips)
        else:
            del state
        if device.type == "cuda":
            torch.cuda.empty_cache()
    need = 5 if spec["smoke"] else 40  # compiling takes tens of seconds (dynamo alone in the smoke: seconds)
    if first is None or left(spec) < need:
        if first is not None:
            rec.note(f"torch.compile not measured: {left(spec):.0f} s left in the box")
        return
    name, state, batch, gen, eager = first
    progress(f"rate: compiling {name}")
    t0 = time.perf_counter()
    state.model = maybe_compile(state.model, spec)
    for _ in range(2):  # the first calls compile forward and backward
        train_step(state, batch, gen)
    sync(device)
    compile_s = time.perf_counter() - t0
    r = timed(lambda: train_step(state, batch, gen), device, spec, warmup=1, target_s=min(3.0, left(spec) / 2))
    compiled = batch["image"].shape[0] / r["s"]
    rec.set("compile", {"run": name, "eager_images_per_s": eager, "compiled_images_per_s": compiled,
                        "compile_s": compile_s, "speedup": compiled / eager})  # fmt: skip
