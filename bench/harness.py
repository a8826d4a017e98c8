"""What every benchmark here shares: device setup, a synchronising timer, interleaved repeats, FLOP counting, the
machine description printed with every table, and the bf16 peaks achieved TFLOP/s is compared with.

Not a framework: plain functions, imported by the bench scripts next to it (`python bench/<name>.py`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

# The bench scripts import the checkout's own library, installed or not.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from the vendors' data sheets, matched by substring of
# torch.cuda.get_device_name(); the first match wins, so the more specific names come first.
BF16_PEAK_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("RTX 4090", 165.0),
]


def bf16_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key in name), None)


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU); default: torch's own")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per model before timing")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timed rounds; the median round is reported")
    p.add_argument("--iters", type=int, default=2, help="steps per timed round")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="auto: bf16 autocast + channels_last on CUDA, fp32 on CPU",
    )


def setup(args: argparse.Namespace) -> tuple[torch.device, bool]:
    """-> (device, use_bf16). Honours --threads; enables TF32 on CUDA for the fp32 parts."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    use_bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    return device, use_bf16


def autocast(device: torch.device, use_bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int, iters: int
) -> dict[str, dict[str, float]]:
    """Median seconds per call of each fn, measured in interleaved rounds (A B, B A, A B, ...) so that a machine whose
    speed drifts (other jobs, clocks, thermal) penalises every candidate alike.

    -> {name: {"wall": s, "cpu": s}}. "cpu" is this process's CPU time (all its threads): on a CPU shared with other
    jobs, wall time counts the time the OS gave to them; CPU time does not, so with one thread it is the steadier
    measure of the work a step costs. On CUDA only wall time means anything.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    rounds: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in fns}
    for r in range(repeats):
        order = list(fns.items()) if r % 2 == 0 else list(fns.items())[::-1]
        for name, fn in order:
            sync(device)
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(iters):
                fn()
            sync(device)
            rounds[name]["wall"].append((time.perf_counter() - wall) / iters)
            rounds[name]["cpu"].append((time.process_time() - cpu) / iters)
    return {name: {k: statistics.median(v) for k, v in times.items()} for name, times in rounds.items()}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call, counted by torch's dispatcher-level counter (matmuls, convolutions, attention; 2 per MAC).

    torch registers formulas for the CUDA attention kernels only; the CPU flash kernel gets the same formula here, or
    a model whose attention runs in it would look cheaper than one whose attention falls back to bmm.
    """
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    cpu_sdpa = {  # FlopCounterMode hands these the shapes of the op's arguments
        aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *_, **__: sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward: (
            lambda g, q, k, v, *_, **__: sdpa_backward_flop_count(g, q, k, v)
        ),
    }
    with FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as counter:
        fn()
    return counter.get_total_flops()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(device: torch.device) -> str:
    if device.type == "cuda":
        what = f"GPU {torch.cuda.get_device_name(device)}"
    else:
        what = f"CPU {cpu_model()} ({os.cpu_count()} logical cores), torch threads {torch.get_num_threads()}"
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"# {what}; torch {torch.__version__}; python {platform.python_version()}; {now}"


def command_line() -> str:
    return "# command: python " + " ".join(sys.argv)
