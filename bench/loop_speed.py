"""The training loop's throughput against the bare training step: is the loop paced by the network, or by Python?

    python bench/loop_speed.py                       # CPU, one thread: the tiny and micro configs
    python bench/loop_speed.py --device cuda         # also images/s and % of the bf16 peak

For each config: `bare` is `train_step` on one fixed batch already on the device, repeated (the network's forward,
backward, AdamW and EMA, nothing else); `loop` is `diffseg.training.loop.fit` on the same config (data drawn and
augmented each step, the loss accumulated, progress logged every `log_every` steps), its steady rate after the first
log window (summary["steady_images_per_s"]). loop / bare is the share of the step the loop keeps: 1 = the loop adds
nothing. The target is >= 0.9 (issue 33). On a CPU the ratio uses process CPU time (one thread: what the step costs,
whatever else shares the machine); wall time is printed beside it.

Configs: `tiny` is jobs/configs/factorized_layers32.yaml (the CPU scale map's 0.48M-parameter factorized model, 32 px,
batch 16, circular padding and rolls: tens of milliseconds a step on a CPU); `micro` is the same at 16 px, 8 channels,
batch 4 (a few milliseconds a step), where the loop's own overhead shows most.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from harness import bf16_peak_tflops, command_line, count_flops, machine_line, sync

from diffseg.core.config import load_config
from diffseg.training.config import TrainConfig
from diffseg.training.loop import LocalContext, build_train_state, fit, step_generator, train_step

CONFIG = "jobs/configs/factorized_layers32.yaml"
COMMON = [
    "model.factorized.uniform_from_t=100",
    "model.unet.padding_mode=circular",
    "data.roll=true",
    "data.num_images=1200",
    "data.num_test=0",
    "loop.eval_every=0",
    "loop.num_samples=0",
    "loop.log_every=50",
    "tracking.enabled=false",
]
CONFIGS = {
    "tiny": [],
    "micro": [
        "model.unet.image_size=16",
        "data.image_size=16",
        "model.unet.model_channels=8",
        "model.unet.channel_mult=[1,2]",
        "model.unet.attention_resolutions=[]",
        "optim.batch_size=4",
    ],
}


def measure(name: str, overrides: list[str], args: argparse.Namespace, device: torch.device) -> dict:
    steps = args.steps if device.type == "cpu" else args.steps * 10
    cfg = load_config(TrainConfig, CONFIG, [*COMMON, *CONFIGS[name], *args.override, f"loop.num_steps={steps}",
                                            f"loop.checkpoint_every={steps}"])  # fmt: skip
    # bare: the step alone, on a fixed batch on the device
    state, _ = build_train_state(cfg, device)
    size = cfg.model.unet.image_size
    batch = {"image": torch.rand(cfg.optim.batch_size, 3, size, size, device=device) * 2 - 1}
    gen = step_generator(cfg, 0, 0, device)
    for _ in range(5):
        train_step(state, batch, gen)
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    bare_steps = max(steps - cfg.loop.log_every, 10)
    for _ in range(bare_steps):
        loss = train_step(state, batch, gen)
    loss.item()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    bare = {"wall": bare_steps * cfg.optim.batch_size / wall, "cpu": bare_steps * cfg.optim.batch_size / cpu}
    flops = count_flops(lambda: train_step(state, batch, gen)) if device.type == "cuda" else None
    # loop: fit on the same config, in a scratch folder
    with tempfile.TemporaryDirectory() as tmp:
        summary = fit(load_config(TrainConfig, CONFIG, [*COMMON, *CONFIGS[name], *args.override,
                                                        f"loop.num_steps={steps}", f"loop.checkpoint_every={steps}",
                                                        f"output_dir={tmp}"]), LocalContext(device))  # fmt: skip
    loop = {"wall": summary["steady_images_per_s"], "cpu": summary["steady_images_per_cpu_s"]}
    params = sum(p.numel() for p in build_train_state(cfg, "cpu")[0].model.parameters())
    out = {"config": name, "params_m": params / 1e6, "batch": cfg.optim.batch_size, "size": size, "bare": bare,
           "loop": loop, "steps": steps}  # fmt: skip
    if flops:
        peak = bf16_peak_tflops(device)
        out["tflops"] = flops * loop["wall"] / cfg.optim.batch_size / 1e12
        out["pct_peak"] = 100 * out["tflops"] / peak if peak else None
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--configs", default="tiny,micro", help="comma-separated: tiny, micro")
    p.add_argument("--steps", type=int, default=300, help="loop steps on a CPU (x10 on a GPU); the first log window "
                   "(50 steps) is warm-up")  # fmt: skip
    p.add_argument("--threads", type=int, default=1, help="torch threads on a CPU")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="applied to both configs")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    print(machine_line(device))
    print(command_line())
    clock = "cpu" if device.type == "cpu" else "wall"
    print(
        f"| config | params | batch x px | bare img/s (wall) | loop img/s (wall) | bare img/s ({clock}) | "
        f"loop img/s ({clock}) | loop / bare ({clock}) |" + (" TFLOP/s | % bf16 peak |" if clock == "wall" else "")
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if clock == "wall" else ""))
    rows = []
    for name in args.configs.split(","):
        r = measure(name, [], args, device)
        rows.append(r)
        ratio = r["loop"][clock] / r["bare"][clock]
        r["ratio"] = ratio
        line = (
            f"| {name} | {r['params_m']:.2f}M | {r['batch']} x {r['size']} | {r['bare']['wall']:.0f} | "
            f"{r['loop']['wall']:.0f} | {r['bare'][clock]:.0f} | {r['loop'][clock]:.0f} | **{ratio:.2f}** |"
        )
        if clock == "wall":
            pct = f"{r['pct_peak']:.2f}" if r.get("pct_peak") is not None else "-"
            line += f" {r.get('tflops', 0):.2f} | {pct} |"
        print(line, flush=True)
    return rows


if __name__ == "__main__":
    main()
