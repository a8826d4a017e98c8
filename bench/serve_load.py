"""Load test of the Serve app: closed-loop clients at concurrency 1, 8, 32, with request batching on and off.

Each client posts an image to /v1/segment (or a /v1/sample request) and sends its next request as soon as the answer
arrives; a level runs for --duration seconds. Printed per (batching, concurrency): requests, requests/s, p50/p99
latency and errors (any non-200 or transport error; must be zero). The app runs on a local Ray instance started here,
on this machine's CPU (or GPU); the client shares the machine.

    python bench/serve_load.py                                   # tiny random-init factorized model, 30 s a level
    python bench/serve_load.py --duration 5 --concurrency 1,8    # quick look
    python bench/serve_load.py --checkpoint runs/factorized-tiny/checkpoint.pt --endpoint sample
"""

import argparse
import asyncio
import io
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "platform"), str(REPO)]


def tiny_checkpoint(folder: Path, config: Path) -> Path:
    """A random-init model with the architecture of a job config (weights do not change the cost of a pass)."""
    import torch

    from diffseg.core.config import from_dict, load_yaml, to_dict
    from diffseg.models.builder import ModelConfig, build_model
    from diffseg.models.checkpoint import save_checkpoint

    raw = load_yaml(config)
    mcfg = from_dict(ModelConfig, raw["model"], prefix="model")
    torch.manual_seed(0)
    model = build_model(mcfg)
    cfg = {"model": to_dict(mcfg), "diffusion": raw.get("diffusion", {})}
    return save_checkpoint(folder / "checkpoint.pt", config=cfg, model=model, step=0)


def upload_png(size: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


async def run_level(url: str, payload: dict, concurrency: int, duration: float) -> dict:
    import aiohttp

    latencies: list[float] = []
    errors: list[str] = []
    stop = time.perf_counter() + duration

    async def client(session):
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            try:
                async with session.post(url, **payload) as r:
                    await r.read()
                    if r.status != 200:
                        errors.append(f"HTTP {r.status}")
                        continue
            except Exception as e:  # transport errors count as errors, and the run goes on
                errors.append(type(e).__name__)
                continue
            latencies.append(time.perf_counter() - t0)

    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    lat = np.asarray(latencies) * 1000 if latencies else np.asarray([np.nan])
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "rps": len(latencies) / wall,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "errors": len(errors),
        "error_kinds": sorted(set(errors)),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="model to serve (default: random-init weights of --model-config)")
    ap.add_argument("--model-config", default=str(REPO / "jobs/configs/factorized_tiny.yaml"))
    ap.add_argument("--endpoint", choices=["segment", "sample"], default="segment")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds per concurrency level")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--batching", default="on,off", help="on, off or on,off")
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=64, help="side of the uploaded PNG")
    ap.add_argument("--steps", type=int, default=10, help="DDIM steps (sample endpoint)")
    ap.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per model replica (= its torch threads)")
    ap.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    import ray
    import torch
    from ray import serve

    import diffseg

    build_app = __import__("serve.app", fromlist=["build_application"]).build_application
    tmp = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    ckpt = args.checkpoint or str(tiny_checkpoint(tmp, Path(args.model_config)))
    levels = [int(c) for c in args.concurrency.split(",")]
    modes = [m.strip() == "on" for m in args.batching.split(",")]

    t0 = time.perf_counter()
    ray.init(
        address="local",
        num_cpus=max(4, os.cpu_count() or 1),  # logical CPUs: ingress + model replica must fit even on 2 cores
        include_dashboard=False,
        runtime_env={"py_modules": [str(Path(diffseg.__file__).parent), str(REPO / "serve")]},
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    print(f"[bench] Ray + Serve up in {time.perf_counter() - t0:.1f} s; model {ckpt}", flush=True)
    url = f"http://127.0.0.1:{port}/v1/{args.endpoint}"
    if args.endpoint == "segment":
        payload = {"data": upload_png(args.image_size), "headers": {"Content-Type": "image/png"}}
    else:
        payload = {"json": {"num_images": 1, "steps": args.steps, "seed": 0}}

    rows = []
    for batching in modes:
        only = {"segmenter": ckpt, "use_sampler": False} if args.endpoint == "segment" else {"sampler": ckpt}
        app_args = {
            **only,
            "device": "auto",
            "batching": {"enabled": batching, "max_batch_size": args.max_batch_size, "batch_wait_timeout_s": 0.005},
        }
        deployments = [  # what a Serve config's `deployments:` section says
            {"name": n, "max_ongoing_requests": 64, "ray_actor_options": {"num_cpus": args.num_cpus}}
            for n in ("FactorizedSegmenter", "Sampler")
        ] + [{"name": "Ingress", "max_ongoing_requests": 256, "ray_actor_options": {"num_cpus": 0.5}}]
        t1 = time.perf_counter()
        names = {"FactorizedSegmenter"} if args.endpoint == "segment" else {"Sampler"}
        deployments = [d for d in deployments if d["name"] in names | {"Ingress"}]
        serve.run(build_app(app_args, deployments=deployments), name="bench", route_prefix="/")
        asyncio.run(run_level(url, payload, 2, 2.0))  # warm-up, not counted
        print(f"[bench] app (batching {'on' if batching else 'off'}) ready in {time.perf_counter() - t1:.1f} s")
        for c in levels:
            row = {"batching": "on" if batching else "off", **asyncio.run(run_level(url, payload, c, args.duration))}
            row["load_avg_1m"] = os.getloadavg()[0]
            rows.append(row)
            print(
                f"[bench] batching {row['batching']:>3}  c={c:>2}  {row['requests']:>6} req  {row['rps']:8.1f} req/s  "
                f"p50 {row['p50_ms']:8.1f} ms  p99 {row['p99_ms']:8.1f} ms  errors {row['errors']} "
                f"{row['error_kinds']}",
                flush=True,
            )
        serve.delete("bench")
    serve.shutdown()
    ray.shutdown()

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    model = ckpt if args.checkpoint else f"random-init {Path(args.model_config).name}"
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(
        f"\nendpoint /v1/{args.endpoint}, {args.duration:.0f} s per level, model {model}, upload {args.image_size} px"
    )
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"machine: {platform.machine()} {cpu}, {os.cpu_count()} logical CPUs, GPU {gpu}; {when}; load avg {load}")
    print("\n| batching | concurrency | requests | req/s | p50 ms | p99 ms | errors | load avg (1 min) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['batching']} | {r['concurrency']} | {r['requests']} | {r['rps']:.1f} | {r['p50_ms']:.1f} | "
            f"{r['p99_ms']:.1f} | {r['errors']} | {r['load_avg_1m']:.1f} |"
        )
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
