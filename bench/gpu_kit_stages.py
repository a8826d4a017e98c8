"""The stages of the GPU evidence kit (`bench/gpu_kit.py`): what each one measures, run in its own process.

Every stage is `stage_<name>(spec, rec)`: `spec` is the JSON the launcher wrote (device, deadline, sizes, paths),
`rec` records results as they come (a stage cut at its deadline still reports what it finished). Nothing here
imports Ray, MLflow or diffusers at module level; diffusers is optional (stage `unet` is skipped without it).
Stages reuse the library and the other benches: `diffseg.training.loop` (build_train_state, train_step), `features`
(FeatureExtractor, the Ray Data job's callable, called directly), `evaluate`, `checkpoint.export_weights`,
`bench/unet_step.py` (matched sizes), `bench/bench_ensemble_speed.py`, `bench/sampling.py` (the compiled sampler).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from argparse import Namespace
from pathlib import Path
from typing import Any

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))  # harness, unet_step, bench_ensemble_speed, sampling
sys.path.insert(0, str(REPO / "platform"))

from harness import count_flops  # noqa: E402

from diffseg.core.config import ConfigError, load_config, replace, to_dict  # noqa: E402
from diffseg.core.tracking import TrackingConfig  # noqa: E402
from diffseg.data.datasets import CLASS_MERGES, SyntheticDataset, build_dataset, read_dataset_json  # noqa: E402
from diffseg.evaluation.evaluate import DatasetSpec, EvalConfig, evaluate  # noqa: E402
from diffseg.methods.features import FeatureConfig, FeatureExtractor, FeaturePipeline, feature_dim  # noqa: E402
from diffseg.methods.sampling import sample  # noqa: E402
from diffseg.methods.segment import FactorizedSegmenter  # noqa: E402
from diffseg.models.builder import build_model  # noqa: E402
from diffseg.models.checkpoint import export_weights  # noqa: E402
from diffseg.models.diffusion import DiffusionConfig, GaussianDiffusion  # noqa: E402
from diffseg.models.factorized import FactorizedConfig, FactorizedUNet  # noqa: E402
from diffseg.models.unet import UNetConfig, build_unet, count_parameters, named_size  # noqa: E402
from diffseg.training.loop import (  # noqa: E402
    LocalContext,
    TrainConfig,
    build_train_state,
    fit,
    resolve_precision,
    step_generator,
    train_step,
)

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


# ---------------------------------------------------------------------------------------------------- helpers
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


# ---------------------------------------------------------------------------------------------------- env
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


# ---------------------------------------------------------------------------------------------------- tests
def gpu_test_files() -> list[str]:
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py") if "mark.gpu" in p.read_text())


def stage_tests(spec: dict, rec: Recorder) -> None:
    """`pytest -m gpu` over the test files that have gpu-marked tests (only those: other files may import Ray)."""
    files = gpu_test_files()
    rec.set("files", files)
    xml = Path(spec["work"]) / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-s", f"--junitxml={xml}"]
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd + files, cwd=REPO, capture_output=True, text=True, timeout=max(5.0, left(spec) - 3))
        output, rc = out.stdout + out.stderr, out.returncode
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        rec.set("tail", tail(output))
        raise
    rec.set("seconds", time.perf_counter() - t0)
    rec.set("exit_code", rc)
    rec.set("tail", tail(output))
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    cases = []
    if xml.is_file():
        for case in ET.parse(xml).getroot().iter("testcase"):
            outcome = "passed"
            for child, name in (("failure", "failed"), ("error", "errors"), ("skipped", "skipped")):
                if case.find(child) is not None:
                    outcome = name
            counts[outcome] += 1
            cases.append(
                {
                    "test": f"{case.get('classname')}::{case.get('name')}",
                    "outcome": outcome,
                    "seconds": float(case.get("time") or 0),
                }
            )
    rec.set("counts", counts)
    rec.set("cases", cases)
    if rc not in (0, 5) or counts["failed"] or counts["errors"]:  # 5 = nothing collected
        rec.finish("failed", reason=f"pytest exit code {rc}: {counts}")


# ---------------------------------------------------------------------------------------------------- throughput
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


def stage_ensemble(spec: dict, rec: Recorder) -> None:
    """The batched E=10 MLP ensemble vs ten MLPs trained one after another (bench/bench_ensemble_speed.py)."""
    import bench_ensemble_speed

    # 4096 rows are enough for 200 batches of 64 per member (rows are drawn at random); 20000 rows of 8448 float16
    # features cost more Parquet writing than the whole time box on the GPU run of 2026-11-26.
    kw = dict(members=10, dim=8448, classes=19, rows=4096, shards=4, iters=200)
    progress("ensemble: writing shards and timing")
    if spec["smoke"]:
        kw.update(dim=64, rows=2000, shards=2, iters=10)
    rec.set("result", bench_ensemble_speed.measure(**kw, device=spec["device"]))


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


# ---------------------------------------------------------------------------------------------------- memory
class TimedPipeline:
    """A FeaturePipeline that also adds up the time of its calls (synchronised), so a stage can tell the network's
    share of extraction from the host's (moving, reshaping and writing the features)."""

    def __init__(self, pipeline: FeaturePipeline):
        self.pipeline, self.cfg, self.model, self.seconds = pipeline, pipeline.cfg, pipeline.model, 0.0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self.pipeline(images)
        sync(out.device)
        self.seconds += time.perf_counter() - t0
        return out


def stage_memory(spec: dict, rec: Recorder) -> None:
    """256 px feature extraction, LSUN-256 ADM architecture (random weights), the paper's blocks and timesteps
    (D=8448), through the Ray Data job's callable (`FeatureExtractor`) called directly: GPU peak memory, host peak
    RSS and s/image after every call up to 8 and 64 images (one process; the peaks are running maxima), the
    network's share of the time apart. Shards are written as the job writes them, then deleted (64 images at 256 px
    are ~70 GB of float16 features)."""
    device = torch.device(spec["device"])
    counts = [2, 4] if spec["smoke"] else [8, 64]
    fcfg = FeatureConfig(backbone="adm-lsun256 (random init)")
    with torch.device(device):  # initialise on the device: 552M parameters
        model = build_unet(SMOKE_ADM if spec["smoke"] else "adm-lsun256").eval()
    size = model.cfg.image_size
    dim = feature_dim(model, fcfg.blocks, fcfg.timesteps)
    pipe = FeaturePipeline(fcfg, device, model=model, diffusion=GaussianDiffusion.from_config(fcfg.diffusion))
    timed_pipe = TimedPipeline(pipe)
    batch_size = 2 if spec["smoke"] else fcfg.batch_size
    rec.set(
        "setup",
        {
            "architecture": "toy 6-level ADM (smoke)" if spec["smoke"] else "adm-lsun256",
            "params_m": count_parameters(model) / 1e6,
            "image_size": size,
            "blocks": list(fcfg.blocks),
            "timesteps": list(fcfg.timesteps),
            "feature_dim": dim,
            "batch_size": batch_size,
            "precision": str(pipe.autocast or "fp32").removeprefix("torch."),
            "images": "synthetic scenes, every pixel labelled",
            "targets": counts,
        },
    )
    data = SyntheticDataset(max(counts), size, seed=0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    points, shard_bytes, done = [], 0, 0
    with tempfile.TemporaryDirectory(dir=spec["work"]) as tmp:
        fx = FeatureExtractor.from_pipeline(timed_pipe, tmp, {"num_classes": 5, "class_names": data.class_names})
        t0 = time.perf_counter()
        while done < max(counts):
            # One image first, so that even a box too short for a full batch at 256 px gives a row, then up to
            # batch_size images per call (the job's batch), landing on each target count.
            n = 1 if done == 0 else min(batch_size, *(c - done for c in counts if c > done))
            items = [data[i] for i in range(done, done + n)]
            batch = {
                "id": np.array([it["id"] for it in items]),
                "image": np.stack(
                    [((it["image"].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy() for it in items]
                ),
                "mask": np.stack([it["mask"].numpy().astype(np.uint8) for it in items]),
            }  # the rows the Ray Data reader gives the callable
            shard = Path(str(fx(batch)["shard"][0]))
            shard_bytes += shard.stat().st_size
            shard.unlink()
            done += len(items)
            sync(device)
            elapsed = time.perf_counter() - t0
            points.append(
                {
                    "images": done,
                    "batch": n,
                    "seconds": elapsed,
                    "s_per_image": elapsed / done,
                    "network_s_per_image": timed_pipe.seconds / done,
                    "gpu_peak_gib": gpu_peak_gib(device),
                    "rss_peak_gib": peak_rss_gib(),
                    "shard_gb_per_image": shard_bytes / done / 1e9,
                }
            )
            rec.set("points", points)


# ---------------------------------------------------------------------------------------------------- train
def resolve_train_config(spec: dict) -> TrainConfig:
    """The job's TrainConfig: its YAML, the kit's overrides, data read from the kit's data folder (a folder data set
    is looked up by its folder name there, for training and for the mask diagnostics), output in the stage's work
    folder, no MLflow."""
    overrides = list(spec.get("overrides", []))
    if spec["smoke"]:
        overrides = SMOKE_TRAIN_OVERRIDES + overrides
    cfg = load_config(TrainConfig, spec["config"], overrides)
    changes: dict[str, Any] = {"output_dir": str(Path(spec["work"]) / "runs"), "tracking.enabled": False}
    if spec["smoke"] and cfg.loop.eval_every:
        changes["loop.eval_every"] = 3  # the mask diagnostics run, at toy cost
    for key, data in (("data", cfg.data), ("eval.data", cfg.eval.data)):
        if data is not None and data.name == "folder":
            if not data.root:
                raise ConfigError(f"{spec['config']}: {key}.root is empty")
            changes[f"{key}.root"] = str(Path(spec["data_dir"]) / Path(data.root).name)
    return replace(cfg, **changes)


def eval_protocol(cfg: TrainConfig) -> str | None:
    """foreground (2 classes, IEM/ReDO), multiclass (more, Hungarian), or None (no held-out labelled split)."""
    if cfg.model.kind != "factorized" or cfg.data.name != "folder" or not cfg.data.num_test:
        return None
    if not (Path(cfg.data.root) / "masks").is_dir():
        return None
    classes = read_dataset_json(Path(cfg.data.root))["classes"]
    if cfg.data.class_merge:
        classes = CLASS_MERGES[cfg.data.class_merge]["classes"]
    return "foreground" if len(classes) == 2 else "multiclass"


def stage_train(spec: dict, rec: Recorder) -> None:
    """Train a TrainConfig for the time box with the library's loop (`diffseg.training.loop.fit` in this process, its
    `loop.max_minutes` set from the box), then: export the EMA weights in fp16, evaluate them on the held-out split
    against the baselines with the project's evaluator (factorized models), and keep the final sample grid."""
    device = torch.device(spec["device"])
    cfg = resolve_train_config(spec)
    for data in (cfg.data, cfg.eval.data):
        if data is not None and data.name == "folder" and not Path(data.root).is_dir():
            raise Skip(f"data folder {data.root} is missing: run `python bench/gpu_kit.py --prepare` and carry .kit")
    protocol = eval_protocol(cfg)
    # After training: the final checkpoint, samples, export, evaluation; before it: building the state and workers.
    reserve = min(max(10.0, 0.15 * left(spec)), 30.0)
    setup_s = 5.0 if device.type == "cuda" else 2.0
    minutes = max(0.05, (left(spec) - reserve - setup_s) / 60)
    cfg = replace(cfg, **{"loop.max_minutes": minutes})
    with torch.device("meta"):  # the parameter count without building the weights
        params = sum(p.numel() for p in build_model(cfg.model).parameters())
    n_train = len(build_dataset(cfg.data, "train"))
    rec.set(
        "setup",
        {
            "config": spec.get("config_label", spec["config"]),
            "overrides": spec.get("overrides", []),
            "name": cfg.name,
            "kind": cfg.model.kind,
            "unet": to_dict(cfg.model.unet),
            "K": cfg.model.factorized.num_components if cfg.model.kind == "factorized" else None,
            "params_m": params / 1e6,
            "data": cfg.data.root or cfg.data.name,
            "train_images": n_train,
            "image_size": cfg.data.image_size,
            "batch": cfg.optim.batch_size,
            "lr": cfg.optim.lr,
            "ema_decay": cfg.optim.ema_decay,
            "precision": "bf16" if resolve_precision(cfg.loop, device) else "fp32",
            "max_minutes": round(minutes, 2),
            "device": str(device),
            "eval_protocol": protocol,
            "resolved": to_dict(cfg),
        },
    )
    t0 = time.perf_counter()
    summary = fit(cfg, LocalContext(device))
    wall = time.perf_counter() - t0
    history = summary["loss_history"]
    rec.set("loss_history", history)
    if summary.get("mask_diagnostics"):
        rec.set("mask_diagnostics", summary["mask_diagnostics"])
    seconds = summary.get("train_seconds", wall)
    rec.set(
        "training",
        {
            "steps": summary["step"],
            "seconds": seconds,
            "wall_s": wall,
            "images_seen": summary["step"] * cfg.optim.batch_size,
            "images_per_s": summary["step"] * cfg.optim.batch_size / max(seconds, 1e-9),
            "epochs": summary["step"] * cfg.optim.batch_size / max(n_train, 1),
            "loss_last": history[-1][1] if history else None,
            "stopped_by": "time box (loop.max_minutes)" if summary.get("stopped_early") else "loop.num_steps",
        },
    )
    full = Path(summary["checkpoint"])
    export = Path(spec["work"]) / f"{cfg.name}.pt"
    export_weights(full, export, dtype=torch.float16, extra={"made_by": "bench/gpu_kit.py", "device": str(device)})
    info = {"file": export.name, "bytes": export.stat().st_size, "dtype": "float16", "step": summary["step"]}
    rec.set("checkpoint", {**info, "weights": "EMA"})
    rec.add_file(export, "checkpoint", priority=10)
    grids = sorted((full.parent / "samples").glob("step_*.png"))
    if grids:  # fit's last sample grid (EMA weights)
        named = Path(spec["work"]) / f"{cfg.name}_samples.png"
        shutil.copyfile(grids[-1], named)
        layout = "image | mask | overlay per sample" if cfg.model.kind == "factorized" else "a grid of images"
        samples = {"file": named.name, "num": cfg.loop.num_samples, "sampler": f"DDIM-{cfg.loop.sample_steps}"}
        rec.set("samples", {**samples, "layout": layout})
        rec.add_file(named, "figure", priority=30)
    if protocol is not None:
        evaluate_export(spec, rec, cfg, protocol, full, export, device)


def evaluate_export(
    spec: dict, rec: Recorder, cfg: TrainConfig, protocol: str, full: Path, export: Path, device: torch.device
) -> None:
    """The fp16 export on the held-out split with the project's evaluator, against the trivial priors, k-means on
    colour and GrabCut; the mask figure; and how often the fp16 weights pick the same region as the fp32 EMA."""
    eval_dir = Path(spec["work"]) / "eval"
    set_name = Path(cfg.data.root).name
    ecfg = EvalConfig(
        name=cfg.name,
        output_dir=str(eval_dir),
        datasets=(
            DatasetSpec(
                name=set_name,
                protocol=protocol,
                data=replace(cfg.data, flip=False),
                split="test",
                factorized=str(export),
            ),
        ),
        methods=("all_foreground", "centred_box", "kmeans_rgb", "grabcut", "factorized"),
        device=str(device),
        tracking=TrackingConfig(enabled=False),
        num_figure_images=8,
    )
    res = evaluate(ecfg, out_dir=eval_dir)
    rows = {r["method"]: r["metrics"] for r in res["rows"]}
    key = "fg_iou" if protocol == "foreground" else "hungarian_miou"  # the regions' score (evaluate's row keys)
    rec.set(
        "eval",
        {
            "protocol": protocol,
            "split": "test",
            "num_images": res["rows"][0]["num_images"],
            "t": ecfg.segment.t,
            "key": key,
            "rows": rows,
            "markdown": res["markdown"],
            "beats_centred_box": rows["factorized"][key] > rows["centred_box"][key],
        },
    )
    figure = eval_dir / "figures" / f"{set_name}.png"
    if figure.is_file():
        named = Path(spec["work"]) / f"{cfg.name}_masks.png"
        figure.replace(named)
        rec.set("mask_figure", {"file": named.name, "columns": "image | ground truth | " + " | ".join(ecfg.methods)})
        rec.add_file(named, "figure", priority=20)
    test = build_dataset(replace(cfg.data, flip=False), "test")
    images = torch.stack([test[i]["image"] for i in range(min(16, len(test)))])
    labels = []
    for path in (full, export):  # the fp32 EMA of the run's checkpoint, then the fp16 export of it (same noise)
        labels.append(FactorizedSegmenter.load(str(path), device).segment(images).labels)
    rec.set("fp16_label_agreement", float((labels[0] == labels[1]).float().mean()))


STAGES = {
    "env": stage_env,
    "tests": stage_tests,
    "train_step": stage_train_step,
    "unet": stage_unet,
    "ensemble": stage_ensemble,
    "sampling": stage_sampling,
    "memory": stage_memory,
    "train": stage_train,
}


def run_stage(spec_path: str) -> int:
    """The child process: run one stage from its spec file, recording results, a skip, or the error."""
    spec = json.loads(Path(spec_path).read_text())
    rec = Recorder(spec["result"])
    if spec["smoke"]:
        torch.set_num_threads(1)
    if spec["device"].startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    try:
        if spec["device"].startswith("cuda") and not torch.cuda.is_available():
            raise Skip("CUDA is not available")
        STAGES[spec["kind"]](spec, rec)
    except Skip as e:
        rec.finish("skipped", reason=str(e))
        return 0
    except BaseException as e:  # recorded for the report, then the process fails
        rec.finish("crashed", reason=f"{type(e).__name__}: {str(e)[:500]}", error=traceback.format_exc()[-4000:])
        traceback.print_exc()
        return 1
    if rec.data["status"] == "running":
        rec.finish("ok")
    return 0
