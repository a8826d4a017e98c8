"""report.md from figures.json: one section per stage (torch-free: the launcher never imports torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TITLES = {
    "env": "Machine",
    "tests": "gpu-marked tests",
    "train_step": "Throughput: factorized paper-64 train step",
    "unet": "Throughput: U-Net train step vs diffusers",
    "ensemble": "Throughput: batched MLP ensemble",
    "sampling": "Throughput: DDIM-50 sampling",
    "memory": "Memory: 256 px feature extraction",
    "train": "Trained model",
    "rate": "The plan: every research run's rate, measured first",
    "research": "Research",
}

PEAK_TFLOPS = 790.0  # bf16 dense matmul measured on this workplace's H100s (the data sheet says 989)


def _f(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def _table(head: list[str], rows: list[list[Any]], digits: int = 1) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(_f(v, digits) if not isinstance(v, str) else v for v in row) + " |" for row in rows]
    return out + [""]


def render_report(figures: dict[str, Any]) -> str:
    kit, stages = figures["kit"], figures["stages"]
    env = next((s["results"] for s in stages if s["id"] == "env"), {})
    machine = env.get("gpu") or f"CPU ({env.get('cpu_count', '?')} cores)"
    lines = [
        "# diffseg GPU sprint report"
        + (" (SMOKE: toy sizes on the CPU; no figure here is a GPU measurement)" if kit["smoke"] else ""),
        "",
        f"- machine: {machine}; python {env.get('python', '?')}, torch {env.get('torch', '?')}, "
        f"CUDA {env.get('cuda', '-')}; diffusers {env.get('diffusers_version') or 'absent'}",
        f"- command: `{kit['command']}`; git {kit['git_sha'] or '?'}; started {kit['started_utc']}; budget "
        f"{kit['budget_min']:g} min; wall {kit['wall_s']:.0f} s{'' if kit['finished'] else ' (RUNNING)'}",
        f"- % of peak is of {kit['peak_tflops']:g} TFLOP/s (bf16 dense matmul measured on this workplace's H100s); "
        "FLOPs counted with torch.utils.flop_counter over forward+backward (matmuls, convolutions, attention)",
        f"- files: {', '.join(kit['files'])}"
        + (f"; left out: {'; '.join(kit['dropped_files'])}" if kit["dropped_files"] else ""),
        "",
        "## Stages",
        "",
    ]
    lines += _table(
        ["stage", "status", "seconds", "time box (s)", "reason"],
        [[s["id"], s["status"], s["seconds"], s["box_s"], (s["reason"] or "").replace("|", "/")] for s in stages],
    )
    lines += _research_summary(stages, kit)
    for s in stages:
        lines += [f"## {s['title']}", ""]
        body = RENDERERS[s["kind"]](s["results"]) if s["results"] else []
        lines += body or [f"No results ({s['status']}{': ' + s['reason'] if s['reason'] else ''}).", ""]
        for note in s.get("notes", []):
            lines.append(f"- note: {note}")
        if s.get("notes"):
            lines.append("")
        if s.get("error"):
            lines += ["Error:", "", "```", s["error"][-1500:], "```", ""]
        elif s.get("log_tail") and s["status"] in ("crashed", "cut", "failed"):
            lines += ["Output (tail):", "", "```", s["log_tail"][-1500:], "```", ""]
    return "\n".join(lines) + "\n"


def _env(r: dict) -> list[str]:
    rows = [
        [k, _f(r.get(k))]
        for k in (
            "gpu",
            "gpu_memory_gib",
            "sm_count",
            "capability",
            "cuda",
            "cudnn",
            "nvidia_smi",
            "python",
            "torch",
            "cpu_count",
            "host_memory_gib",
            "ray_version",
            "mlflow_version",
            "diffusers_version",
        )
        if k in r
    ]
    if "matmul" in r:
        m = r["matmul"]
        rows.append([f"{m['n']}^3 {m['dtype']} matmul", f"{m['tflops']:.1f} TFLOP/s"])
    return _table(["", ""], rows)


def _tests(r: dict) -> list[str]:
    c = r.get("counts", {})
    out = [
        f"`pytest -m gpu {' '.join(r.get('files', []))}`: {c.get('passed', 0)} passed, {c.get('failed', 0)} "
        f"failed, {c.get('errors', 0)} errors, {c.get('skipped', 0)} skipped in {_f(r.get('seconds'))} s",
        "",
    ]
    out += _table(["test", "outcome", "s"], [[x["test"], x["outcome"], x["seconds"]] for x in r.get("cases", [])])
    if r.get("tail"):
        out += ["Output (tail):", "", "```", r["tail"][-2000:], "```", ""]
    return out


def _train_step(r: dict) -> list[str]:
    s = r.get("setup", {})
    out = [
        f"{s.get('model')} ({_f(s.get('params_m'))}M params), {s.get('image_size')} px, batch {s.get('batch')}, "
        f"{s.get('precision')}, channels_last {s.get('channels_last')}, fused AdamW {s.get('fused_adamw')}, "
        f"through diffseg.training.loop.train_step; {_f(r.get('gflop_per_step'))} GFLOP/step",
        "",
    ]
    rows = []
    for key, label in (("eager", "eager"), ("compiled", "torch.compile")):
        if key in r:
            x = r[key]
            rows.append(
                [
                    label,
                    x["ms_per_step"],
                    x["images_per_s"],
                    x["tflops"],
                    x["pct_peak"],
                    x["gpu_peak_gib"],
                    x.get("compile_s"),
                ]
            )
    out += _table(["step", "ms/step", "images/s", "TFLOP/s", "% of peak", "GPU peak GiB", "compile s"], rows)
    if "speedup_compiled" in r:
        out += [f"compiled / eager speed-up: {r['speedup_compiled']:.2f}x", ""]
    return out


def _unet(r: dict) -> list[str]:
    s = r.get("setup", {})
    out = [
        f"{s.get('image_size')} px, C={s.get('model_channels')}, mult {s.get('channel_mult')}, "
        f"{s.get('num_res_blocks')} res blocks, attention {s.get('attention_resolutions')}, batch "
        f"{s.get('batch_size')}, {s.get('precision')}; params ours {_f(s.get('params_ours'))}, diffusers "
        f"{_f(s.get('params_diffusers'))} (diffusers {s.get('diffusers_version')})",
        "",
    ]
    rows = [
        [k, r[k]["ms_per_step"], r[k]["images_per_s"], r[k]["gflop_per_step"], r[k]["tflops"], r[k]["pct_peak"]]
        for k in ("ours", "diffusers")
        if k in r
    ]
    out += _table(["model", "ms/step", "images/s", "GFLOP/step", "TFLOP/s", "% of peak"], rows)
    if "ratio" in r:
        out += [f"**throughput ratio ours / diffusers: {r['ratio']:.3f}**", ""]
    return out


def _ensemble(r: dict) -> list[str]:
    x = r.get("result")
    if not x:
        return []
    return _table(
        ["E", "D", "classes", "batch", "iterations", "batched s", "10 separate MLPs s", "speed-up"],
        [
            [
                x["members"],
                x["dim"],
                x["classes"],
                x["batch"],
                x["iters"],
                x["batched_s"],
                x["separate_s"],
                f"**{x['speedup']:.2f}x**",
            ]
        ],
    )


def _sampling(r: dict) -> list[str]:
    s = r.get("setup", {})
    out = [
        f"{s.get('model')} ({_f(s.get('params_m'))}M params), {s.get('image_size')} px, {s.get('num_images')} "
        f"images per batch, {s.get('sampler')}, {s.get('precision')}",
        "",
    ]
    rows = []
    for key, label in (
        ("eager", "eager"),
        ("cuda_graphs", "torch.compile reduce-overhead (CUDA graphs)"),
        ("compiled", "torch.compile (smoke: dynamo only)"),
    ):
        if key in r:
            x = r[key]
            rows.append([label, x["s_per_batch"], x["images_per_s"], x["ms_per_step"], x.get("compile_s")])
    out += _table(["network", "s/batch", "images/s", "ms/step", "compile s"], rows)
    if "speedup" in r:
        out += [f"speed-up over eager: {r['speedup']:.2f}x", ""]
    return out


def _memory(r: dict) -> list[str]:
    s = r.get("setup", {})
    out = [
        f"{s.get('architecture')} ({_f(s.get('params_m'))}M params, random weights), {s.get('image_size')} px, "
        f"blocks {','.join(s.get('blocks', []))} at t={','.join(map(str, s.get('timesteps', [])))} -> D="
        f"{s.get('feature_dim')}, batch {s.get('batch_size')}, {s.get('precision')}; {s.get('images')}; "
        "diffseg.methods.features.FeatureExtractor called directly (shards written, then deleted). Rows: the first "
        "call (1 image), each target, the last; "
        "peaks are running maxima; 'network s/image' is the U-Net forwards and upsampling, the rest of s/image is "
        "the host (copy to the CPU, reshaping, float16, the Parquet shard).",
        "",
    ]
    targets = s.get("targets", [])
    points = r.get("points", [])
    shown = [p for p in points if p["images"] in targets or p is points[-1] or p is points[0]]
    rows = [
        [
            f"**{p['images']}**" if p["images"] in targets else p["images"],
            p.get("batch"),
            p["seconds"],
            p["s_per_image"],
            p.get("network_s_per_image"),
            p["gpu_peak_gib"],
            p["rss_peak_gib"],
            p["shard_gb_per_image"],
        ]
        for p in shown
    ]
    out += _table(
        [
            "images",
            "last batch",
            "s",
            "s/image",
            "network s/image",
            "GPU peak GiB",
            "host peak RSS GiB",
            "shard GB/image",
        ],
        rows,
    )
    missing = [t for t in targets if not any(p["images"] == t for p in points)]
    if missing:
        out += [f"Not reached within the time box: {', '.join(map(str, missing))} images.", ""]
    return out


def _train(r: dict) -> list[str]:
    s, t = r.get("setup", {}), r.get("training", {})
    u = s.get("unet", {})
    k_text = f" K={s['K']}" if s.get("K") else ""
    out = [
        f"{s.get('kind')}{k_text}, {_f(s.get('params_m'))}M params (C={u.get('model_channels')}, mult "
        f"{u.get('channel_mult')}, {u.get('num_res_blocks')} res blocks, attention {u.get('attention_resolutions')}), "
        f"{s.get('image_size')} px, data {Path(str(s.get('data'))).name} ({s.get('train_images')} training images, "
        f"masks unused), batch {s.get('batch')}, lr {s.get('lr')}, EMA {s.get('ema_decay')}, {s.get('precision')}"
        f", time box loop.max_minutes={s.get('max_minutes')}; config `{s.get('config')}`"
        + (f" with {' '.join(s.get('overrides'))}" if s.get("overrides") else ""),
        "",
    ]
    if t:
        out += _table(
            [
                "steps",
                "seconds",
                "images/s",
                "steady images/s",
                "% of peak",
                "images seen",
                "epochs",
                "last loss",
                "stopped by",
            ],  # fmt: skip
            [
                [
                    t["steps"],
                    t["seconds"],
                    t["images_per_s"],
                    t.get("steady_images_per_s"),
                    t.get("pct_peak"),
                    t["images_seen"],
                    t["epochs"],
                    t["loss_last"],
                    t["stopped_by"],
                ]
            ],
        )
    elif "progress" in r:
        p = r["progress"]
        out += [f"progress: step {p['step']} after {p['seconds']:.0f} s ({p['images_per_s']:.0f} images/s)", ""]
    diags = r.get("mask_diagnostics")
    if diags:
        keys = [k for k in diags[-1] if k.startswith("val/")]
        out += ["Mask diagnostics during training (`loop.eval_every`, EMA weights, held-out images):", ""]
        rows = [[d["step"], *[d.get(k) for k in keys]] for d in diags]
        out += _table(["step", *[k.removeprefix("val/") for k in keys]], rows, digits=3)
    e = r.get("eval")
    if e:
        out += [
            f"Evaluation ({e['protocol']} protocol, {e['num_images']} held-out images, t={e['t']}, the fp16 "
            "checkpoint; scores in %):",
            "",
            e["markdown"].strip(),
            "",
        ]
        verdict = "beats" if e["beats_centred_box"] else "does NOT beat"
        f_, b_ = e["rows"]["factorized"][e["key"]], e["rows"]["centred_box"][e["key"]]
        out += [
            f"**The factorized model {verdict} the centred box** ({e['key']} {100 * f_:.1f} vs {100 * b_:.1f}).",
            "",
        ]
    if "fp16_label_agreement" in r:
        out += [f"fp16 export vs fp32 EMA: {100 * r['fp16_label_agreement']:.2f}% of pixels get the same region.", ""]
    c = r.get("checkpoint")
    if c:
        use = (
            f"`python jobs/segment.py checkpoint={c['file']} data.root=...` and Serve's segmenter read it on a CPU"
            if s.get("kind") == "factorized"
            else "every job that takes a checkpoint reads it (`load_diffusion_model`)"
        )
        out += [
            f"Checkpoint: `{c['file']}` ({c['bytes'] / 2**20:.1f} MiB, {c['dtype']} {c['weights']} weights, step "
            f"{c['step']}); {use}.",
            "",
        ]
    if "mask_figure" in r:
        out += [f"Figure `{r['mask_figure']['file']}`: columns {r['mask_figure']['columns']}.", ""]
    if "samples" in r:
        x = r["samples"]
        out += [f"Figure `{x['file']}`: {x['num']} {x['sampler']} samples of the EMA weights, {x.get('layout')}.", ""]
    return out


def _research_summary(stages: list[dict], kit: dict) -> list[str]:
    """One row per research run: compute (images seen, images/s, % of peak) and where its masks ended."""
    runs = [s for s in stages if s["kind"] == "train" and s.get("group")]
    if not runs:
        return []
    rows = []
    for s in runs:
        r = s["results"]
        st, tr = r.get("setup", {}), r.get("training", {})
        diags = r.get("mask_diagnostics") or [{}]
        last = diags[-1]
        score = next((last[k] for k in ("val/fg_iou", "val/hungarian_miou") if k in last), None)
        ev = r.get("eval") or {}
        test = ev.get("rows", {}).get("factorized", {}).get(ev.get("key")) if ev else None
        rows.append([
            s["id"].removeprefix("train:"), s["status"], st.get("params_m"), st.get("batch"), tr.get("steps"),
            tr.get("images_seen"), tr.get("images_per_s"), tr.get("pct_peak"),
            None if score is None else 100 * score, last.get("val/mask_dependence"), last.get("val/mask_band"),
            None if test is None else 100 * test, (r.get("checkpoint") or {}).get("file"),
        ])  # fmt: skip
    archived = set(kit.get("archive", []))
    rows = [[*row[:-1], (f"{row[-1]}" + ("" if row[-1] in archived else " (not brought back)")) if row[-1] else "-"]
            for row in rows]  # fmt: skip
    return [
        "## Research runs",
        "",
        "Held-out diagnostics: the EMA model's masks at t=30 on the run's held-out split at its last `eval_every`"
        " (fg IoU or Hungarian mIoU, image dependence 0 = one split for every image, band share 1 = horizontal bands);"
        " `scored` is the fp16 export through the project's evaluator. Curves against images seen: training.png.",
        "",
        *_table(
            [
                "run",
                "status",
                "params (M)",
                "batch",
                "steps",
                "images seen",
                "images/s",
                "% of peak",
                "held-out score",
                "dependence",
                "band",
                "scored",
                "checkpoint",
            ],
            rows,
            digits=2,
        ),  # fmt: skip
    ]


def _rate(r: dict) -> list[str]:
    runs = r.get("runs") or {}
    boxes = r.get("planned_boxes_s") or {}
    out = [
        "Bare train step of each research run (a fixed batch on the device, eager), measured before they train; "
        "'planned images' assumes the group's runs share the GPU evenly for their box (minus 20 s of start-up and "
        f"scoring): a floor when the runs leave it idle. Group boxes planned: {boxes or '-'} s.",
        "",
    ]
    out += _table(["run", "params (M)", "batch x px", "images/s alone", "GFLOP/image", "TFLOP/s", "% of peak",
                   "planned images"],  # fmt: skip
                  [[name, x["params_m"], f"{x['batch']} x {x['image_size']}", x["images_per_s"],
                    x["gflop_per_image"], x["tflops"], x["pct_peak"], x.get("planned_images")]
                   for name, x in runs.items()], digits=2)  # fmt: skip
    c = r.get("compile")
    if c:
        out += [f"torch.compile on {c['run']}: {c['compiled_images_per_s']:,.0f} images/s compiled vs "
                f"{c['eager_images_per_s']:,.0f} eager ({c['speedup']:.2f}x) after {c['compile_s']:.1f} s of "
                "compiling.", ""]  # fmt: skip
    return out


def _research(r: dict) -> list[str]:
    c = r.get("compile") or {}
    return [
        f"Runs, trained at once for {r.get('box_s', 0):.0f} s: {', '.join(r.get('runs', []))}; torch.compile "
        f"{'on' if c.get('compile') else 'off'} ({c.get('why', '-')}). Each run's section follows.",
        "",
    ]


RENDERERS = {
    "env": _env,
    "tests": _tests,
    "train_step": _train_step,
    "unet": _unet,
    "ensemble": _ensemble,
    "sampling": _sampling,
    "memory": _memory,
    "train": _train,
    "rate": _rate,
    "research": _research,
}
