"""The GPU evidence kit (bench/gpu_kit.py) cannot rot between GPU windows: its smoke mode runs every stage on the
CPU at toy sizes with `import ray` and `import mlflow` made to fail (the GPU box has neither), writes the report
layout docs/performance.md quotes, stays within the device's file limits, and ships a checkpoint that jobs and Serve
load on a CPU. Missing data or diffusers are reported as skipped stages, not failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffseg.data.datasets import DataConfig, PairedFolderDataset, write_synthetic_folder
from diffseg.methods.segment import SegmentJobConfig, run_segment_job
from diffseg.models.checkpoint import load_checkpoint, load_diffusion_model
from diffseg.models.factorized import FactorizedUNet
from diffseg.serving.wrappers import FactorizedSegmenter

REPO = Path(__file__).resolve().parents[1]
KIT = REPO / "bench" / "gpu_kit.py"
SET = "weizmann-horse-200"  # the set jobs/configs/gpu_kit_factorized64.yaml names
MAX_FILES, MAX_BYTES = 8, 16 * 2**20


def blocker(root: Path, *names: str) -> Path:
    """A folder of packages whose import fails, put first on PYTHONPATH of the kit and every process it starts."""
    for name in names:
        (root / name).mkdir(parents=True)
        (root / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked: the GPU box has none')\n")
    return root


def horse_like_folder(root: Path, num_images: int = 200, size: int = 16) -> Path:
    """Synthetic scenes as a two-class (background / foreground) paired folder under the set's name."""
    folder = write_synthetic_folder(root / SET, num_images, size)
    for mask in (folder / "masks").iterdir():
        Image.fromarray((np.asarray(Image.open(mask)) > 0).astype(np.uint8)).save(mask)
    meta = json.loads((folder / "dataset.json").read_text())
    (folder / "dataset.json").write_text(json.dumps({**meta, "classes": ["background", "horse"]}))
    return root


def run_kit(tmp_path: Path, *args: str, block=("ray", "mlflow"), cwd: Path | None = None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(blocker(tmp_path / "blocked", *block)), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, str(KIT), *args], cwd=cwd or tmp_path, env=env, capture_output=True, text=True, timeout=600
    )


def test_smoke_runs_every_stage_without_ray_or_mlflow(tmp_path):
    data = horse_like_folder(tmp_path / "data")
    out = tmp_path / "out"
    res = run_kit(tmp_path, "--out", "out", "--smoke", "--data", "data", "--work", "work")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= MAX_FILES and all((out / f).stat().st_size < MAX_BYTES for f in files)
    assert not [p for p in out.iterdir() if p.is_dir()]
    assert {"report.md", "figures.json", "kit.log", "training.png", "models.tar.00"} <= set(files)

    figures = json.loads((out / "figures.json").read_text())
    assert figures["kit"]["smoke"] and figures["kit"]["finished"] and set(files) == set(figures["kit"]["files"])
    stages = {s["id"]: s for s in figures["stages"]}
    runs = ["train:layers-paper", "train:layers-lever", "train:ddpm-synthetic"]
    kinds = ["env", "rate", "research:factorized", *runs[:2], "research:ddpm", runs[2], "train_step", "unet",
             "ensemble", "sampling", "memory", "tests"]  # fmt: skip
    assert list(stages) == kinds  # research first, measurements last
    assert {k: s["status"] for k, s in stages.items()} == dict.fromkeys(kinds, "ok")
    assert all(s["seconds"] <= s["box_s"] + 5 for s in stages.values())
    r = {k: s["results"] for k, s in stages.items()}
    # the plan: every run's rate measured first, the images each run gets stated from it
    plan = r["rate"]["runs"]
    assert set(plan) == {"layers-paper", "layers-lever", "ddpm-synthetic"}
    assert all(x["images_per_s"] > 0 and x["gflop_per_image"] > 0 and x["planned_images"] > 0 for x in plan.values())
    assert r["rate"]["compile"]["compile_s"] > 0 and r["rate"]["planned_boxes_s"]["factorized"] > 0
    for run in runs:  # each run trained through the loop, with its rate, % of peak and fp16 export
        t = r[run]["training"]
        assert t["steps"] == 6 and t["images_per_s"] > 0 and t["tflops"] > 0 and t["pct_peak"] >= 0
        assert r[run]["checkpoint"]["file"] == run.removeprefix("train:") + ".pt"
    lever = r["train:layers-lever"]
    assert lever["setup"]["resolved"]["model"]["factorized"]["uniform_from_t"] == 100
    assert lever["mask_diagnostics"] and "val/mask_band" in lever["mask_diagnostics"][-1]
    assert set(lever["eval"]["rows"]) == {"all_foreground", "centred_box", "kmeans_rgb", "factorized"}
    assert lever["eval"]["key"] == "fg_iou" and lever["fp16_label_agreement"] > 0.9
    assert r["tests"]["counts"]["skipped"] >= 2 and not r["tests"]["counts"]["failed"]  # gpu tests skip on a CPU
    for key in ("eager", "compiled"):
        assert r["train_step"][key]["images_per_s"] > 0 and r["train_step"][key]["tflops"] > 0
    assert r["train_step"]["gflop_per_step"] > 0 and r["unet"]["ratio"] > 0 and r["ensemble"]["result"]["speedup"] > 0
    assert r["sampling"]["eager"]["images_per_s"] > 0 and r["sampling"]["compiled"]["images_per_s"] > 0
    points = r["memory"]["points"]
    assert [p["images"] for p in points] == [1, 2, 4] and points[0]["network_s_per_image"] > 0

    report = (out / "report.md").read_text()
    for heading in (
        "## Stages",
        "## Research runs",
        "## The plan: every research run's rate, measured first",
        "## Research: group factorized",
        "## Trained model: layers-lever (jobs/configs/factorized_layers32.yaml)",
        "## Machine",
        "## gpu-marked tests",
        "## Throughput: factorized paper-64 train step",
        "## Throughput: U-Net train step vs diffusers",
        "## Throughput: batched MLP ensemble",
        "## Throughput: DDIM-50 sampling",
        "## Memory: 256 px feature extraction",
        "Centred box (prior)",
    ):
        assert heading in report, heading

    # The models come back in one archive (cat models.tar.* | tar x), the DDPM first
    archive = tmp_path / "models.tar"
    archive.write_bytes(b"".join((out / n).read_bytes() for n in sorted(files) if n.startswith("models.tar.")))
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        tar.extractall(tmp_path / "models", filter="data")
    assert names[0] == "ddpm-synthetic.pt" and {"layers-paper.pt", "layers-lever.pt"} <= set(names)
    assert names == figures["kit"]["archive"]
    name = "layers-lever"

    # The shipped checkpoint: fp16 EMA weights that the segment job and Serve's segmenter load on a CPU.
    ckpt_path = tmp_path / "models" / f"{name}.pt"
    loaded, ckpt = load_diffusion_model(ckpt_path, "cpu"), load_checkpoint(ckpt_path)
    assert isinstance(loaded.model, FactorizedUNet) and ckpt.extra["export"]["dtype"] == "float16" and loaded.step == 6
    seg = FactorizedSegmenter.load(str(ckpt_path), device="cpu")
    images = np.random.default_rng(0).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    masks = seg.segment(images, ts=[30, 30], seeds=[0, 1])
    assert len(masks) == 2
    job = run_segment_job(
        SegmentJobConfig(
            checkpoint=str(ckpt_path),
            output_dir=str(tmp_path / "seg"),
            limit=3,
            data=DataConfig(name="folder", root=str(data / SET), image_size=0),
        )
    )
    assert job["images"] == 3 and len(list((tmp_path / "seg" / "segment" / "masks").iterdir())) == 3


def test_missing_data_or_diffusers_skip_a_crash_is_reported_and_the_next_stage_runs(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: " + str(REPO / "jobs" / "configs" / "gpu_kit_factorized64.yaml") + "\noptim: {lr: oops}\n")
    out = tmp_path / "out"
    args = ["--out", str(out), "--smoke", "--stages", "unet,train", "--data", str(tmp_path / "none")]
    args += ["--train", str(bad), "--train", "jobs/configs/gpu_kit_factorized64.yaml"]
    res = run_kit(tmp_path, *args, block=("ray", "mlflow", "diffusers"), cwd=REPO)
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]  # a crashed stage: non-zero, after the report
    stages = {s["id"]: s for s in json.loads((out / "figures.json").read_text())["stages"]}
    assert list(stages) == ["env", "unet", "train:bad", "train:gpu_kit_factorized64"]
    assert stages["env"]["status"] == "ok" and stages["env"]["results"]["matmul"]["tflops"] > 0
    assert stages["unet"]["status"] == "skipped" and "diffusers" in stages["unet"]["reason"]
    assert stages["train:bad"]["status"] == "crashed" and "optim.lr" in stages["train:bad"]["reason"]
    assert "Traceback" in stages["train:bad"]["error"]
    train = stages["train:gpu_kit_factorized64"]  # the stage after the crash still ran
    assert train["status"] == "skipped" and "missing" in train["reason"]
    report = (out / "report.md").read_text()
    assert "--prepare" in report and "Error:" in report
    assert sorted(p.name for p in out.iterdir()) == ["figures.json", "kit.log", "report.md"]


def test_an_overrunning_stage_is_cut_at_its_box_with_its_partial_results(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import gpu_kit

    class Stalling(gpu_kit.Kit):
        def stage_command(self, spec_path):  # a stage that records a result, then never finishes
            code = (
                "import json, sys, time; spec = json.load(open(sys.argv[1])); "
                "json.dump({'status': 'running', 'results': {'partial': 1}, 'notes': [], 'files': []}, "
                "open(spec['result'], 'w')); print('stalling', flush=True); time.sleep(600)"
            )
            return [sys.executable, "-c", code, str(spec_path)]

    kit = Stalling(gpu_kit.parse_args(["--out", str(tmp_path / "out"), "--work", str(tmp_path / "w"), "--smoke"]))
    record = {"status": "not run", "reason": None, "results": {}}
    t0 = time.perf_counter()
    kit.run_stage({"id": "memory", "kind": "memory"}, record, box=3)
    assert time.perf_counter() - t0 < 20
    assert record["status"] == "cut" and record["results"] == {"partial": 1} and "stalling" in record["log_tail"]
    sys.modules.pop("gpu_kit", None)


def test_time_boxes_share_what_is_left(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import gpu_kit
    from kit.plan import RESEARCH_WEIGHT, plan, time_box
    from kit.prepare import device_command

    args = gpu_kit.parse_args(
        [
            "--out",
            "x",
            "--train",
            "jobs/configs/gpu_kit_factorized64.yaml=2",
            "--train",
            "jobs/configs/factorized_tiny.yaml",
            "--box",
            "unet=40",
        ]
    )
    stages = plan(args)
    ids = [s["id"] for s in stages]
    assert ids == ["env", "rate", "research:factorized", "research:ddpm", "train_step", "unet", "ensemble", "sampling",
                   "memory", "tests", "train:gpu_kit_factorized64", "train:factorized_tiny"]  # fmt: skip
    unet, fixed_train, flexible_train = stages[5], stages[10], stages[11]
    assert unet["fixed_s"] == 40 and fixed_train["fixed_s"] == 120 and flexible_train["fixed_s"] is None
    # The research groups share RESEARCH_WEIGHT by their `share` (0.65 / 0.35 in bench/sprint.yaml)
    assert stages[2]["weight"] == pytest.approx(RESEARCH_WEIGHT * 0.65) and stages[3]["weight"] == pytest.approx(
        RESEARCH_WEIGHT * 0.35
    )
    assert len(stages[2]["group"]["runs"]) == 8 and stages[1]["runs"][-1]["name"] == "ddpm-horse-cifar32"
    # The fixed boxes come off first; the rest is shared by weight.
    box = time_box(stages[2], stages[3:], 600)
    flexible = [s for s in stages[3:] if s["fixed_s"] is None]
    assert box == pytest.approx((600 - 40 - 120) * stages[2]["weight"] / (stages[2]["weight"] + sum(
        s["weight"] for s in flexible)))  # fmt: skip
    assert time_box(fixed_train, stages[11:], 60) == 60  # never more than what is left
    command, carry = device_command(True, 8)
    assert command.endswith("bench/gpu_kit.py --out $OUT --budget-min 8") and len(command) <= 2000
    assert carry == [".kit", ".whl"]
    sys.modules.pop("gpu_kit", None)


def test_prepare_copies_sets_at_the_loaders_pixels(tmp_path, data_dir):
    res = subprocess.run(
        [
            sys.executable,
            str(KIT),
            "--prepare",
            "--sets",
            SET,
            "--no-wheels",
            "--data",
            str(tmp_path / "kit" / "data"),
            "--shared",
            str(data_dir.parent),
            "--size",
            "64",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "bench/gpu_kit.py --out $OUT" in res.stdout and '".kit"' in res.stdout
    copy = tmp_path / "kit" / "data" / SET
    assert len(list((copy / "images").iterdir())) == len(list((data_dir / SET / "images").iterdir()))
    assert json.loads((copy / "dataset.json").read_text())["prepared"]["size"] == 64
    assert json.loads((tmp_path / "kit" / "prepared.json").read_text())["git_sha"]
    original = PairedFolderDataset(data_dir / SET, image_size=64)
    prepared = PairedFolderDataset(copy, image_size=64)
    for i in (0, 57):
        a, b = original[i], prepared[i]
        assert a["id"] == b["id"] and torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])


def test_the_sprint_file_names_runs_that_load(monkeypatch, tmp_path):
    """Every research run of the GPU sprint resolves to a valid training config here, so a GPU window never spends
    its minutes on a typo; a bad sprint file stops the kit with a line naming the place."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    from kit.plan import load_sprint

    from diffseg.core.config import load_config
    from diffseg.training.config import TrainConfig

    for path in ("bench/sprint.yaml", "bench/sprint_smoke.yaml"):
        for group in load_sprint(path):
            for run in group["runs"]:
                cfg = load_config(TrainConfig, run["config"], run["overrides"])
                cfg.check()
                assert cfg.optim.batch_size >= 256 or "smoke" in path
    groups = {g["name"]: g for g in load_sprint("bench/sprint.yaml")}
    widths = {load_config(TrainConfig, r["config"], r["overrides"]).model.unet.model_channels
              for r in groups["factorized"]["runs"]}  # fmt: skip
    assert widths == {32, 64, 128}
    lr = load_config(
        TrainConfig, groups["factorized"]["runs"][0]["config"], groups["factorized"]["runs"][0]["overrides"]
    )
    assert lr.optim.batch_lr == pytest.approx(1e-4 * 2**0.5)  # the paper's 1e-4 at 128, sqrt-scaled to 256
    with pytest.raises(SystemExit, match="runs\\[0\\].config"):
        bad = tmp_path / "bad.yaml"
        bad.write_text("groups: [{name: g, runs: [{name: r, config: nowhere.yaml}]}]\n")
        load_sprint(str(bad))
    sys.modules.pop("gpu_kit", None)


def test_every_sprint_run_finds_its_data_the_way_the_box_will(monkeypatch, data_dir):
    """Each research run, resolved as the GPU box resolves it (folder sets looked up by name in the kit's data folder:
    here ../shared/data, whose names --prepare copies), has a training split the device batches can hold and, for
    a factorized model, held-out masks for its diagnostics: a window never dies on a path."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    from kit.plan import load_sprint
    from kit.train import eval_protocol, resolve_train_config

    from diffseg.data.datasets import build_dataset
    from diffseg.training.batches import build_eval_set, use_device_data

    seen = {}
    for group in load_sprint("bench/sprint.yaml"):
        for run in group["runs"]:
            spec = {"config": run["config"], "overrides": run["overrides"], "smoke": False, "work": "/tmp/unused",
                    "data_dir": str(data_dir)}  # fmt: skip
            cfg = resolve_train_config(spec)
            key = (cfg.data.name, cfg.data.root, len(cfg.data.mix))
            if key not in seen:  # one check per data set
                train = build_dataset(cfg.data, "train")
                seen[key] = len(train)
                assert use_device_data(cfg), run["name"]
                if cfg.model.kind == "factorized":
                    held_out = build_eval_set(cfg)
                    assert held_out is not None and len(held_out["mask"]) >= 200, run["name"]
            if cfg.model.kind == "factorized" and cfg.data.name == "layers":
                assert eval_protocol(cfg) == "foreground"
    assert sorted(seen.values()) == [600, 814, 6000, 6000]  # faces (600 of 800), flowers, CIFAR horses, layers
    sys.modules.pop("gpu_kit", None)
