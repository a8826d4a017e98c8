"""Stage `train`: a TrainConfig trained for its time box, its fp16 EMA exported and evaluated against the baselines."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch

from diffseg.core.config import ConfigError, load_config, replace, to_dict
from diffseg.core.tracking import TrackingConfig
from diffseg.data.datasets import CLASS_MERGES, build_dataset, read_dataset_json
from diffseg.evaluation.evaluate import DatasetSpec, EvalConfig, evaluate
from diffseg.methods.segment import FactorizedSegmenter
from diffseg.models.builder import build_model
from diffseg.models.checkpoint import export_weights
from diffseg.training.config import TrainConfig
from diffseg.training.loop import LocalContext, fit, resolve_precision
from kit.stage import SMOKE_TRAIN_OVERRIDES, Recorder, Skip, left, pct


def resolve_train_config(spec: dict) -> TrainConfig:
    """The job's TrainConfig: its YAML, the kit's overrides, data read from the kit's data folder (a folder data set
    is looked up by its folder name there, for training and for the mask diagnostics), output in the stage's work
    folder, no MLflow."""
    overrides = list(spec.get("overrides", []))
    if spec["smoke"]:  # toy sizes; the run's own overrides keep what they set, the smoke's sizes win
        overrides = overrides + SMOKE_TRAIN_OVERRIDES + ["optim.lr_scaling=none"]
    cfg = load_config(TrainConfig, spec["config"], overrides)
    changes: dict[str, Any] = {"output_dir": str(Path(spec["work"]) / "runs"), "tracking.enabled": False}
    if spec["smoke"] and cfg.loop.eval_every:
        changes["loop.eval_every"] = 3  # the mask diagnostics run, at toy cost
    if spec["smoke"] and cfg.data.name == "layers":  # a few scenes: rendering 6200 would take the smoke's time
        changes["data.num_images"], changes["data.num_test"] = 24, 8
        changes["loop.compile"] = False
    sources = [("data", cfg.data), ("eval.data", cfg.eval.data)]
    sources += [(f"data.mix[{i}]", m) for i, m in enumerate(cfg.data.mix)]
    for key, data in sources:
        if data is not None and data.name == "folder":
            if not data.root:
                raise ConfigError(f"{spec['config']}: {key}.root is empty")
            if key.startswith("data.mix"):
                continue
            changes[f"{key}.root"] = str(Path(spec["data_dir"]) / Path(data.root).name)
    if cfg.data.mix:  # each source read from the kit's data folder too
        mix = tuple(replace(m, root=str(Path(spec["data_dir"]) / Path(m.root).name)) if m.name == "folder" else m
                    for m in cfg.data.mix)  # fmt: skip
        cfg = replace(cfg, data=replace(cfg.data, mix=mix))
    return replace(cfg, **changes)


def eval_protocol(cfg: TrainConfig) -> str | None:
    """foreground (2 classes, IEM/ReDO), multiclass (more, Hungarian), or None (no held-out labelled split)."""
    if cfg.model.kind != "factorized" or not cfg.data.num_test:
        return None
    if cfg.data.name == "layers":  # object / background
        return "foreground"
    if cfg.data.name != "folder":
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
    for data in (cfg.data, cfg.eval.data, *cfg.data.mix):
        if data is not None and data.name == "folder" and not Path(data.root).is_dir():
            raise Skip(f"data folder {data.root} is missing: run `python bench/gpu_kit.py --prepare` and carry .kit")
    protocol = eval_protocol(cfg)
    # After training: the final checkpoint, samples, export, evaluation; before it: building the state and workers.
    reserve = min(max(10.0, 0.15 * left(spec)), 30.0)
    # before the first step: CUDA's start, the data decoded onto the device, the held-out set (several runs share
    # the machine's cores while they do it)
    setup_s = 15.0 if device.type == "cuda" else 2.0
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
    if cfg.loop.compile:  # a graph dynamo cannot compile runs eagerly instead of costing the run (a private switch:
        torch._dynamo.config.suppress_errors = True  # torch has no public one; the rate stage compiled one run first)
    t0 = time.perf_counter()
    summary = fit(cfg, LocalContext(device))
    wall = time.perf_counter() - t0
    history = summary["loss_history"]
    rec.set("loss_history", history)
    if summary.get("mask_diagnostics"):
        rec.set("mask_diagnostics", summary["mask_diagnostics"])
    seconds = summary.get("train_seconds", wall)
    steady = summary.get("steady_images_per_s")
    gflop = spec.get("gflop_per_image")  # forward + backward per image, counted by the rate stage
    tflops = steady * gflop / 1e3 if steady and gflop else None
    rec.set(
        "training",
        {
            "steps": summary["step"],
            "seconds": seconds,
            "wall_s": wall,
            "images_seen": summary["step"] * cfg.optim.batch_size,
            "images_per_s": summary["step"] * cfg.optim.batch_size / max(seconds, 1e-9),
            "steady_images_per_s": steady,  # after the first log window (compilation, allocations)
            "tflops": tflops,
            "pct_peak": pct(tflops, spec.get("peak_tflops")) if tflops else None,
            "epochs": summary["step"] * cfg.optim.batch_size / max(n_train, 1),
            "loss_last": history[-1][1] if history else None,
            "stopped_by": "time box (loop.max_minutes)" if summary.get("stopped_early") else "loop.num_steps",
            "compiled": cfg.loop.compile,
        },
    )
    full = Path(summary["checkpoint"])
    export = Path(spec["work"]) / f"{cfg.name}.pt"
    export_weights(full, export, dtype=torch.float16, extra={"made_by": "bench/gpu_kit.py", "device": str(device)})
    info = {"file": export.name, "bytes": export.stat().st_size, "dtype": "float16", "step": summary["step"]}
    rec.set("checkpoint", {**info, "weights": "EMA"})
    rec.add_file(export, "checkpoint", priority=5 if cfg.model.kind == "ddpm" else 10)
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
    set_name = Path(cfg.data.root).name if cfg.data.root else cfg.data.name
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
        methods=tuple(
            spec.get("eval_methods") or ("all_foreground", "centred_box", "kmeans_rgb", "grabcut", "factorized")
        ),  # fmt: skip
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
