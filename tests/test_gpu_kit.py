"""The GPU evidence kit (bench/gpu_kit.py) cannot rot between GPU windows: its smoke mode runs every stage on the
CPU at toy sizes with `import ray` and `import mlflow` made to fail (the GPU box has neither), writes the report
layout docs/performance.md quotes, stays within the device's file limits, and ships a checkpoint that jobs and Serve
load on a CPU. Missing data or diffusers are reported as skipped stages, not failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
    res = run_kit(tmp_path, "--out", "out", "--smoke", "--budget-min", "6", "--data", "data", "--work", "work")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= MAX_FILES and all((out / f).stat().st_size < MAX_BYTES for f in files)
    assert not [p for p in out.iterdir() if p.is_dir()]
    name = "gpu-kit-factorized64"
    expected = {"report.md", "figures.json", "kit.log", "training.png", f"{name}.pt", f"{name}_masks.png"}
    assert expected <= set(files)

    figures = json.loads((out / "figures.json").read_text())
    assert figures["kit"]["smoke"] and figures["kit"]["finished"] and set(files) == set(figures["kit"]["files"])
    stages = {s["id"]: s for s in figures["stages"]}
    kinds = ["env", "tests", "train_step", "unet", "ensemble", "sampling", "memory", "train:gpu_kit_factorized64"]
    assert list(stages) == kinds
    assert {k: s["status"] for k, s in stages.items()} == dict.fromkeys(kinds, "ok")
    assert all(s["seconds"] <= s["box_s"] + 5 for s in stages.values())
    r = {k: s["results"] for k, s in stages.items()}
    assert r["tests"]["counts"]["skipped"] >= 2 and not r["tests"]["counts"]["failed"]  # gpu tests skip on a CPU
    for key in ("eager", "compiled"):
        assert r["train_step"][key]["images_per_s"] > 0 and r["train_step"][key]["tflops"] > 0
    assert r["train_step"]["gflop_per_step"] > 0 and r["unet"]["ratio"] > 0 and r["ensemble"]["result"]["speedup"] > 0
    assert r["sampling"]["eager"]["images_per_s"] > 0 and r["sampling"]["compiled"]["images_per_s"] > 0
    points = r["memory"]["points"]
    assert [p["images"] for p in points] == [1, 2, 4] and points[0]["network_s_per_image"] > 0
    assert r["memory"]["setup"]["feature_dim"] > 0 and all(p["rss_peak_gib"] > 0 for p in points)
    train = r["train:gpu_kit_factorized64"]
    assert train["training"]["steps"] == 6 and train["checkpoint"]["file"] == f"{name}.pt"
    assert set(train["eval"]["rows"]) == {"all_foreground", "centred_box", "kmeans_rgb", "grabcut", "factorized"}
    assert train["eval"]["key"] == "fg_iou" and all("fg_iou" in m for m in train["eval"]["rows"].values())
    assert train["fp16_label_agreement"] > 0.9

    report = (out / "report.md").read_text()
    for heading in (
        "## Stages",
        "## Machine",
        "## gpu-marked tests",
        "## Throughput: factorized paper-64 train step",
        "## Throughput: U-Net train step vs diffusers",
        "## Throughput: batched MLP ensemble",
        "## Throughput: DDIM-50 sampling",
        "## Memory: 256 px feature extraction",
        "## Trained model: jobs/configs/gpu_kit_factorized64.yaml",
        "Centred box (prior)",
    ):
        assert heading in report, heading

    # The shipped checkpoint: fp16 EMA weights that the segment job and Serve's segmenter load on a CPU.
    ckpt_path = out / f"{name}.pt"
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
    from kit.plan import plan, time_box
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
    assert [s["id"] for s in stages] == [
        "env",
        "tests",
        "train_step",
        "unet",
        "ensemble",
        "sampling",
        "memory",
        "train:gpu_kit_factorized64",
        "train:factorized_tiny",
    ]
    assert stages[3]["fixed_s"] == 40 and stages[7]["fixed_s"] == 120 and stages[8]["fixed_s"] is None
    # The fixed boxes come off first; the rest is shared by weight (train_step 14 of 14+4... excluding fixed ones).
    box = time_box(stages[2], stages[3:], 600)
    flexible = [s for s in stages[3:] if s["fixed_s"] is None]
    assert box == pytest.approx((600 - 40 - 120) * 14 / (14 + sum(s["weight"] for s in flexible)))
    assert time_box(stages[7], stages[8:], 60) == 60  # never more than what is left
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
