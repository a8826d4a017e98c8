"""The serving cost bounds, measured: ingress memory for concurrent maximum-size uploads, and the latency of a small
/v1/sample request behind a large one. Ray-free: it drives the same functions the Serve deployments call.

    python bench/serve_bounds.py memory                 # 6 concurrent 4096x4096 PNG uploads (16 KB files), budget 2
    python bench/serve_bounds.py memory --side 2048 --slots 6    # the control: a budget as large as the burst
    python bench/serve_bounds.py latency                # 1 image x 50 steps behind 16 x 250, tiny factorized model

memory: a fresh process decodes, segments (a fake model answering random soft masks) and renders (JSON with mask,
colour and overlay PNGs at the upload's size) `--n` uploads at once through `segment_upload` with a `PixelBudget` of
`--slots` maximum-size images, and prints the growth of its peak RSS over a warmed-up baseline, per slot and pixel.

latency: a `SampleScheduler` over a random-init factorized model (jobs/configs/factorized_tiny.yaml): the time of one
step for 1 and for 16 images (t1, t16), then a 16 x 250 request, and 1 x S submitted while it runs: the small
request's latency against the scheduler's bound S*t1 + (S/16 + 2)*t16, and against waiting for the large one (FIFO).
Each prints one JSON line last (the tests read it).
"""

import argparse
import asyncio
import io
import json
import math
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from diffseg.serving.app_config import Limits  # noqa: E402
from diffseg.serving.ingress import PixelBudget, segment_upload  # noqa: E402
from diffseg.serving.requests import SampleParams, SegmentParams  # noqa: E402
from diffseg.serving.scheduler import SampleScheduler  # noqa: E402

BYTES_PER_PIXEL = 24  # the stated bound: ingress peak RSS growth <= slots * 24 B * max_image_pixels + OVERHEAD
OVERHEAD = 96 * 2**20  # thread stacks, PNG encoder state, allocator slack


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h)).save(buf, format="PNG")  # all zeros: a few KB that declare w x h (the attack)
    return buf.getvalue()


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory(side: int, n: int, slots: int, overlay: bool) -> dict:
    big = _png(side, side)
    limits = Limits(max_body_bytes=8 << 20, max_image_pixels=side * side, max_image_side=side,
                    max_inflight_pixels=slots * side * side)  # fmt: skip
    info = {"image_size": 32, "class_names": ["a", "b", "c"], "kind": "factorized"}
    params = SegmentParams("factorized", 30, 0, "json", overlay, 0.5)
    rng = np.random.default_rng(0)

    async def fake_model(x):
        await asyncio.sleep(0.05)  # every upload is decoded before the first answer comes back
        return {"probs": rng.random((3, 32, 32)).astype(np.float32)}

    async def run() -> dict:
        budget = PixelBudget(limits.max_inflight_pixels)
        await segment_upload(_png(64, 64), params, info, limits, budget, fake_model)  # warm-up: imports, pools
        base = _peak_rss()
        t0 = time.perf_counter()
        outs = await asyncio.gather(*(segment_upload(big, params, info, limits, budget, fake_model) for _ in range(n)))
        seconds = time.perf_counter() - t0
        assert all(media == "application/json" for media, _ in outs)
        delta = _peak_rss() - base
        pixels = side * side
        return {
            "bench": "memory", "side": side, "file_bytes": len(big), "n": n, "slots": slots, "overlay": overlay,
            "peak_rss_growth": delta, "bytes_per_pixel_per_slot": round(delta / (min(slots, n) * pixels), 2),
            "bound": slots * BYTES_PER_PIXEL * pixels + OVERHEAD, "peak_pixels": budget.peak,
            "max_images_at_once": budget.peak // pixels, "seconds": round(seconds, 2),
        }  # fmt: skip

    return asyncio.run(run())


def latency(steps_small: int, config: Path) -> dict:
    from diffseg.core.config import from_dict, load_yaml
    from diffseg.models.builder import ModelConfig, build_model
    from diffseg.models.checkpoint import LoadedModel
    from diffseg.models.diffusion import DiffusionConfig, GaussianDiffusion
    from diffseg.serving.wrappers import DiffusionSampler

    raw = load_yaml(config)
    torch.manual_seed(0)
    model = build_model(from_dict(ModelConfig, raw["model"], prefix="model")).eval().requires_grad_(False)
    diffusion = GaussianDiffusion.from_config(from_dict(DiffusionConfig, raw.get("diffusion", {}), "diffusion"))
    loaded = LoadedModel(model, diffusion, raw, step=0, source="random-init", path=config, weights="random")
    sampler = DiffusionSampler(loaded)  # what Serve's sampler replica runs, on a random-init network

    def step_time(n: int, reps: int = 5) -> float:
        gen = sampler.sample_steps([SampleParams(n, reps + 1, 0, None, "json")])
        next(gen)  # warm-up step
        t0 = time.perf_counter()
        for _ in range(reps):
            next(gen)
        gen.close()
        return (time.perf_counter() - t0) / reps

    t1, t16 = step_time(1), step_time(16)
    sched = SampleScheduler(sampler.sample_steps, max_inflight_cost=8000, max_batch_images=16)
    sched.trace = []
    big = sched.submit(SampleParams(16, 250, 1, None, "json"))
    while sched.counts["steps"] < 3:  # the large request is running
        time.sleep(0.01)
    mark = len(sched.trace)
    t0 = time.perf_counter()
    small = sched.submit(SampleParams(1, steps_small, 2, None, "json"))
    small.future.result(timeout=600)
    latency_s = time.perf_counter() - t0
    big_steps = sum(1 for seq, _ in sched.trace[mark:] if seq == 1)
    big_left = 250 - 3 - big_steps
    sched.cancel(big)
    sched.close()
    bound_steps = math.ceil(steps_small / 16) + 2
    return {
        "bench": "latency", "small_steps": steps_small, "t1_s": round(t1, 4), "t16_s": round(t16, 4),
        "latency_s": round(latency_s, 3), "bound_s": round(steps_small * t1 + bound_steps * t16, 3),
        "large_steps_during_small": big_steps, "bound_large_steps": bound_steps,
        "fifo_wait_s": round((250 - 3) * t16 + steps_small * t1, 3), "large_steps_left": big_left,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    m = sub.add_parser("memory")
    m.add_argument("--side", type=int, default=4096)
    m.add_argument("--n", type=int, default=6)
    m.add_argument("--slots", type=int, default=2)
    m.add_argument("--no-overlay", action="store_true")
    lat = sub.add_parser("latency")
    lat.add_argument("--steps", type=int, default=50)
    lat.add_argument("--config", default=str(REPO / "jobs" / "configs" / "factorized_tiny.yaml"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
    if args.what == "memory":
        out = memory(args.side, args.n, args.slots, not args.no_overlay)
    else:
        out = latency(args.steps, Path(args.config))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
