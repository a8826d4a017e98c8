"""What every stage shares: the `Recorder` of its results, `Skip`, timing, memory peaks, the smoke sizes."""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path
from typing import Any

import torch

from diffseg.models.unet import UNetConfig

GIB = 2**30

# Tiny stand-ins for --smoke (CPU, seconds): the same code paths at toy sizes.
SMOKE_TRAIN_OVERRIDES = [
    "model.unet.image_size=16",
    "data.image_size=16",
    "model.unet.model_channels=16",
    "model.unet.channel_mult=[1,2]",
    "model.unet.num_res_blocks=1",
    "model.unet.attention_resolutions=[8]",
    "model.unet.num_head_channels=null",
    "optim.batch_size=4",
    "loop.num_steps=6",
    "loop.log_every=2",
    "loop.num_data_workers=0",
    "loop.num_samples=2",
    "loop.sample_steps=4",
    "loop.checkpoint_every=3",
    "eval.num_images=4",
]

SMOKE_STEP_OVERRIDES = [o for o in SMOKE_TRAIN_OVERRIDES if o.startswith("model.")]

SMOKE_ADM = UNetConfig(  # the LSUN-256 ADM's layout (6 levels, 18 decoder blocks) at toy width and size
    image_size=32,
    model_channels=32,
    num_res_blocks=2,
    channel_mult=(1, 1, 2, 2, 4, 4),
    attention_resolutions=(),
    learn_sigma=True,
    resblock_updown=True,
)


class Skip(Exception):
    """The stage cannot run here (no diffusers, no data, no CUDA); the message says why."""


class Recorder:
    """A stage's results, rewritten atomically after every change so a stage killed at its deadline keeps them."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.data: dict[str, Any] = {"status": "running", "results": {}, "notes": [], "files": []}
        self.flush()

    def set(self, key: str, value: Any) -> None:
        self.data["results"][key] = value
        self.flush()

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        print(f"[kit] note: {text}", flush=True)
        self.flush()

    def add_file(self, path: str | os.PathLike, kind: str, priority: int) -> None:
        """An output for the launcher to copy to --out (lower priority number = kept first under the file cap)."""
        self.data["files"].append({"path": str(path), "kind": kind, "priority": priority})
        self.flush()

    def finish(self, status: str, reason: str | None = None, error: str | None = None) -> None:
        self.data.update(status=status, reason=reason, error=error)
        self.flush()

    def flush(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


def left(spec: dict) -> float:
    """Seconds to this stage's deadline."""
    return spec["deadline"] - time.time()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, spec: dict, warmup: int = 3, min_iters: int = 3, target_s: float = 5.0) -> dict:
    """Mean seconds per call after `warmup` calls: at least `min_iters` calls and about `target_s` of them, never
    past the deadline (then fewer, said in "iters"). Smoke mode: one warm-up, two calls."""
    if spec["smoke"]:
        warmup, min_iters, target_s = min(warmup, 1), 2, 0.0
    for _ in range(warmup):
        fn()
    sync(device)
    iters, t0 = 0, time.perf_counter()
    while iters < min_iters or (
        time.perf_counter() - t0 < target_s and left(spec) > 2 * (time.perf_counter() - t0) / iters
    ):
        fn()
        iters += 1
        if iters % 5 == 0:
            sync(device)
        if left(spec) < 1:
            break
    sync(device)
    return {"s": (time.perf_counter() - t0) / iters, "iters": iters}


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def gpu_peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def pct(tflops: float, peak: float | None) -> float | None:
    return 100 * tflops / peak if peak else None


def maybe_compile(fn, spec: dict, **kwargs):
    """torch.compile on the real run; dynamo tracing only (backend "eager", no code generation) in smoke mode,
    which exercises the same plumbing in seconds instead of minutes of CPU inductor builds."""
    if spec["smoke"]:
        kwargs = {**kwargs, "backend": "eager"}
        kwargs.pop("mode", None)
    return torch.compile(fn, **kwargs)


def progress(text: str) -> None:
    """A progress line: a stage cut at its time box shows in its log tail how far it got."""
    print(f"[stage] {text}", flush=True)


def tail(text: str, n: int = 3000) -> str:
    return text[-n:]
