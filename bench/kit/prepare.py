"""Preparing the kit where there is network: the data sets copied small, diffusers' wheels, the command for the GPU
box."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from kit import DEFAULT_DATA, REPO, WHEELS
from kit.runner import _git_sha

# The research runs' folder sets (bench/sprint.yaml; `layers` is generated on the box) and the horses of
# `--train jobs/configs/gpu_kit_factorized64.yaml` (which wants `--size 64`).
SETS = (
    "celebamask-hq-800",
    "cifar10-horse-6000",
    "flowers17-unlabelled-514",
    "flowers17-dev-300",
    "weizmann-horse-200",
)

DIFFUSERS = "diffusers==0.42.1"

DIFFUSERS_DEPS = ("importlib_metadata",)  # what diffusers needs beyond the GPU box's packages (device/KINDS.md)

PIP_PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)


def copy_set(src: Path, dst: Path, size: int) -> dict[str, Any]:
    """A paired folder, resized with the project's one resize policy (data.resize_pair: shorter side, centre crop)
    and saved as PNG, so a loader at `size` reads exactly the pixels it would have made from the originals."""
    sys.path.insert(0, str(REPO / "platform"))
    from PIL import Image

    from diffseg.data.datasets import IMAGE_EXTS, read_dataset_json, resize_pair

    meta = read_dataset_json(src)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    has_masks = (src / "masks").is_dir()
    if has_masks:
        (tmp / "masks").mkdir()
    n = 0
    for path in sorted(p for p in (src / "images").iterdir() if p.suffix.lower() in IMAGE_EXTS):
        image = Image.open(path).convert("RGB")
        mask = Image.open(src / "masks" / f"{path.stem}.png") if has_masks else None
        if size:
            image, mask = resize_pair(image, mask, size)
        image.save(tmp / "images" / f"{path.stem}.png")
        if mask is not None:
            mask.save(tmp / "masks" / f"{path.stem}.png")
        n += 1
    meta["prepared"] = {"from": str(src), "size": size or "original", "by": "bench/gpu_kit.py --prepare"}
    (tmp / "dataset.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return {"set": dst.name, "images": n, "bytes": sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())}


def fetch_wheels(dest: Path) -> list[Path]:
    """The diffusers wheel (and what it needs that the GPU box lacks) for CPython 3.12 on x86-64 Linux."""
    dest.mkdir(exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        "3.12",
        "--implementation",
        "cp",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(dest),
    ]
    for plat in PIP_PLATFORMS:
        cmd += ["--platform", plat]
    subprocess.run(cmd + [DIFFUSERS, *DIFFUSERS_DEPS], check=True)
    return sorted(dest.glob("*.whl"))


def device_command(with_wheels: bool, budget_min: float = 8.0) -> tuple[str, list[str]]:
    """The command line for the device tool's `run`, and its `carry` list."""
    install = (
        "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "
        "/tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; "
    )
    kit = f"PYTHONUNBUFFERED=1 python3 bench/gpu_kit.py --out $OUT --budget-min {budget_min:g}"
    return (install if with_wheels else "") + kit, [DEFAULT_DATA.split("/")[0]] + ([WHEELS] if with_wheels else [])


def prepare(args: argparse.Namespace) -> int:
    data = args.data
    src_root = Path(args.shared) / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name in [s for s in args.sets.split(",") if s]:
        src = src_root / name
        if not src.is_dir():
            print(f"[prepare] {src} is missing: skipped (the kit reports stages that need it as skipped)")
            continue
        info = copy_set(src, data / name, args.size)
        print(
            f"[prepare] {name}: {info['images']} images at {args.size or 'original'} px -> {data / name} "
            f"({info['bytes'] / 1e6:.1f} MB)"
        )
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    stamp = {
        "git_sha": _git_sha(),
        "dirty": bool(dirty),
        "prepared_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    (data.parent / "prepared.json").write_text(json.dumps(stamp, indent=1))  # the GPU box's copy has no .git
    wheels: list[Path] = sorted((REPO / WHEELS).glob("*.whl"))
    if not args.no_wheels:
        try:
            wheels = fetch_wheels(REPO / WHEELS)
        except (subprocess.CalledProcessError, OSError) as e:
            print(f"[prepare] could not fetch the diffusers wheel ({e}): stage `unet` will be skipped")
    for w in wheels:
        print(f"[prepare] wheel {w.name} ({w.stat().st_size / 1e6:.1f} MB)")
    carried = sum(f.stat().st_size for d in (data, REPO / WHEELS) if d.exists() for f in d.rglob("*") if f.is_file())
    command, carry = device_command(bool(wheels), args.budget_min)
    print(f"[prepare] carried folders: {carry} ({carried / 2**20:.1f} MiB; the working tree's limit is 64 MiB)")
    print("\nOn the GPU box (the device tool's run), from the repository root:")
    print(f"  command: {command}")
    print(f"  carry:   {json.dumps(carry)}")
    print(
        f"  timeout_s: {int(args.budget_min * 60 + 60)} (the budget, the wheel install, the last report); "
        "a rerun goes at once, on the warm machine"
    )
    return 0
