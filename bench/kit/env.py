"""Stage `env`: versions, the GPU, the TFLOP/s of a large bf16 matmul."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess

import torch

from kit.stage import GIB, Recorder, timed


def stage_env(spec: dict, rec: Recorder) -> None:
    """The machine: versions, the GPU, and what a large bf16 matmul reaches on it (the practical peak)."""
    device = torch.device(spec["device"])
    rec.set("python", platform.python_version())
    rec.set("torch", torch.__version__)
    rec.set("cpu_count", os.cpu_count())
    rec.set("host_memory_gib", round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1))
    rec.set("cuda_available", torch.cuda.is_available())
    for name in ("ray", "mlflow", "diffusers"):  # installed? (importing costs seconds; `unet` imports diffusers)
        try:
            rec.set(f"{name}_version", importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            rec.set(f"{name}_version", None)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        rec.set("gpu", props.name)
        rec.set("gpu_memory_gib", round(props.total_memory / GIB, 1))
        rec.set("sm_count", props.multi_processor_count)
        rec.set("capability", f"{props.major}.{props.minor}")
        rec.set("cuda", torch.version.cuda)
        rec.set("cudnn", torch.backends.cudnn.version())
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            rec.set("nvidia_smi", smi.stdout.strip() or smi.stderr.strip()[:200])
        except (OSError, subprocess.TimeoutExpired) as e:
            rec.set("nvidia_smi", f"unavailable ({e})")
    n = 256 if spec["smoke"] else 8192
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    r = timed(lambda: a @ b, device, spec, warmup=3, min_iters=10, target_s=1.0)
    rec.set("matmul", {"n": n, "dtype": str(dtype).removeprefix("torch."), "tflops": 2 * n**3 / r["s"] / 1e12})
