"""The GPU evidence kit: one command that proves the GPU path and trains a real model in one short GPU window.

    python bench/gpu_kit.py --prepare                        # here, once: data -> .kit/data, diffusers -> .whl
    python bench/gpu_kit.py --out DIR --budget-min 8         # on the GPU box: no Ray, MLflow, diffusers or network
    python bench/gpu_kit.py --out DIR --smoke                # every stage on the CPU at toy sizes (CI, < 60 s)

Stages, in order (`--stages a,b` picks some; each runs in its own process with a time box, so a stage that
overruns is cut and reported and a crash is recorded, while the next stage runs):

    env         versions, the GPU, the TFLOP/s of a large bf16 matmul
    tests       the `gpu`-marked pytest tests: pass/fail/skip counts and the output's tail
    train_step  factorized paper-64 K=3 bf16 train step: images/s, FLOPs, TFLOP/s, % of peak; eager and compiled
    unet        our U-Net train step / diffusers UNet2DModel at matched size (skipped without diffusers)
    ensemble    the batched MLP ensemble (E=10, D=8448) / ten MLPs trained one after another
    sampling    DDIM-50, factorized paper-64: eager / torch.compile "reduce-overhead" (CUDA graphs)
    memory      256 px features, LSUN-256 ADM (random weights, D=8448) on 8 and 64 images: GPU peak, RSS, s/image
    train       each `--train CONFIG[=MINUTES]` (default jobs/configs/gpu_kit_factorized64.yaml, the time left):
                trained for its time through diffseg.training.loop, its fp16 EMA exported, evaluated against the baselines

Time boxes: a stage with MINUTES gets them; the others share what is left by weight (`WEIGHTS`), recomputed at
each start, so time a stage leaves unused goes to the later ones (the last training job gets the rest).
`--box STAGE=SECONDS` fixes one. Everything lands in --out, at most 8 files, each under 16 MiB: report.md,
figures.json (every number the report shows), kit.log, PNG figures, the fp16 checkpoint(s); rewritten after every
stage, so a run killed from outside still leaves its report.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TRAIN = "jobs/configs/gpu_kit_factorized64.yaml"
DEFAULT_DATA = ".kit/data"
WHEELS = ".whl"
ORDER = ["env", "tests", "train_step", "unet", "ensemble", "sampling", "memory", "train"]
# Shares of the time left when a stage starts (the train jobs share TRAIN_WEIGHT), with floors and caps in seconds.
WEIGHTS = {"env": 1, "tests": 6, "train_step": 14, "unet": 4, "ensemble": 3, "sampling": 12, "memory": 15}
TRAIN_WEIGHT = 45
FLOORS = {"env": 30, "tests": 45, "unet": 25, "ensemble": 20}
CAPS = {"env": 60, "tests": 240}
TITLES = {
    "env": "Machine",
    "tests": "gpu-marked tests",
    "train_step": "Throughput: factorized paper-64 train step",
    "unet": "Throughput: U-Net train step vs diffusers",
    "ensemble": "Throughput: batched MLP ensemble",
    "sampling": "Throughput: DDIM-50 sampling",
    "memory": "Memory: 256 px feature extraction",
    "train": "Trained model",
}
MAX_FILES, MAX_FILE_BYTES = 8, 16 * 2**20
REPORT_RESERVE_S = 15  # kept back at the end of the budget for the last report
PEAK_TFLOPS = 790.0  # bf16 dense matmul measured on this workplace's H100s (the data sheet says 989)
SETS = ("weizmann-horse-200", "celebamask-hq-800")
DIFFUSERS = "diffusers==0.42.1"
DIFFUSERS_DEPS = ("importlib_metadata",)  # what diffusers needs beyond the GPU box's packages (device/KINDS.md)
PIP_PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="output folder (at most 8 files)")
    p.add_argument("--budget-min", type=float, default=8.0, help="wall-clock minutes for the whole kit")
    p.add_argument("--smoke", action="store_true", help="every stage on the CPU at toy sizes")
    p.add_argument("--stages", default=",".join(ORDER), help=f"comma-separated subset of {','.join(ORDER)}")
    p.add_argument(
        "--train",
        action="append",
        default=[],
        metavar="CONFIG[=MINUTES]",
        help=f"a TrainConfig YAML to train (repeatable; default {DEFAULT_TRAIN} with the time left)",
    )
    p.add_argument(
        "--train-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override applied to every training job (e.g. optim.lr=3e-4)",
    )
    p.add_argument("--box", action="append", default=[], metavar="STAGE=SECONDS", help="fix a stage's time box")
    p.add_argument(
        "--data", default=None, help=f"the kit's data folder (default <repo>/{DEFAULT_DATA}, from --prepare)"
    )
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed at the end)")
    p.add_argument("--device", default=None, help="default: cuda when present (cpu with --smoke)")
    p.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS, help="bf16 peak that %% of peak refers to")
    p.add_argument("--step-batch", type=int, default=32, help="batch of the paper-64 train-step throughput")
    g = p.add_argument_group("--prepare (here, before a GPU window)")
    g.add_argument("--prepare", action="store_true", help="copy the dev data and fetch the diffusers wheel")
    g.add_argument("--shared", default=os.environ.get("DIFFSEG_SHARED", str(REPO.parent / "shared")))
    g.add_argument("--sets", default=",".join(SETS), help="data sets to copy from <shared>/data")
    g.add_argument("--size", type=int, default=64, help="side the copies are resized and centre-cropped to (0 = as is)")
    g.add_argument("--no-wheels", action="store_true", help="skip fetching the diffusers wheel")
    p.add_argument("--run-stage", help=argparse.SUPPRESS)  # internal: the child process of one stage
    args = p.parse_args(argv)
    if not args.prepare and not args.run_stage and not args.out:
        p.error("--out is required")
    # Paths given on the command line are the caller's (relative to the working directory); defaults are the repo's.
    args.data = Path(args.data).resolve() if args.data else REPO / DEFAULT_DATA
    return args


# ---------------------------------------------------------------------------------------------------- prepare
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


# ---------------------------------------------------------------------------------------------------- planning
def parse_train(items: list[str]) -> list[tuple[str, float | None]]:
    """--train CONFIG[=MINUTES] -> [(config path, minutes or None)]; a relative CONFIG is the caller's, else the
    repository's (`jobs/configs/x.yaml` works from anywhere)."""
    jobs = []
    for item in items or [DEFAULT_TRAIN]:
        path, _, minutes = item.partition("=")
        found = next((p for p in (Path(path), REPO / path) if p.is_file()), None)
        if found is None:
            raise SystemExit(f"--train {item}: no config file {path}")
        try:
            jobs.append((str(found.resolve()), float(minutes) if minutes else None))
        except ValueError:
            raise SystemExit(f"--train {item}: MINUTES must be a number") from None
    return jobs


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The stages to run, in order: {"id", "kind", "weight" | "fixed_s", ...}."""
    wanted = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(wanted) - set(ORDER))
    if unknown:
        raise SystemExit(f"--stages: unknown {unknown}; known: {ORDER}")
    boxes = {}
    for item in args.box:
        name, _, secs = item.partition("=")
        boxes[name] = float(secs)
    stages = []
    for kind in ORDER:
        if kind not in wanted and kind != "env":  # env is always measured: the report names the machine
            continue
        if kind != "train":
            stages.append({"id": kind, "kind": kind, "weight": WEIGHTS[kind], "fixed_s": boxes.get(kind)})
            continue
        jobs = parse_train(args.train)
        flexible = sum(1 for _, m in jobs if m is None)
        for path, minutes in jobs:
            sid = f"train:{Path(path).stem}"
            if any(s["id"] == sid for s in stages):  # the same config twice (e.g. with other overrides later)
                sid += f"-{sum(1 for s in stages if s['id'].startswith(sid)) + 1}"
            fixed = minutes * 60 if minutes is not None else boxes.get(sid, boxes.get("train"))
            stages.append(
                {
                    "id": sid,
                    "kind": "train",
                    "config": path,
                    "weight": TRAIN_WEIGHT / max(flexible, 1),
                    "fixed_s": fixed,
                }
            )
    return stages


def time_box(stage: dict, later: list[dict], remaining: float) -> float:
    """This stage's seconds: fixed, or its weight's share of what is left after the later stages' fixed boxes."""
    if stage["fixed_s"] is not None:
        return min(stage["fixed_s"], remaining)
    pool = remaining - sum(s["fixed_s"] for s in later if s["fixed_s"] is not None)
    weights = stage["weight"] + sum(s["weight"] for s in later if s["fixed_s"] is None)
    box = pool * stage["weight"] / weights
    box = max(box, FLOORS.get(stage["kind"], 0))
    box = min(box, CAPS.get(stage["kind"], box))
    return max(0.0, min(box, remaining))


# ---------------------------------------------------------------------------------------------------- running
class Kit:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.t0 = time.time()
        self.end = self.t0 + args.budget_min * 60
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work or tempfile.mkdtemp(prefix="diffseg-kit-")).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.log_path = self.work / "kit.log"
        self.smoke = args.smoke
        if args.device:
            self.device = args.device
        elif args.smoke:
            self.device = "cpu"
        else:
            self.device = "cuda" if _cuda_present() else "cpu"
        self.stages: list[dict[str, Any]] = []
        self.copied: dict[str, str] = {}  # name in --out -> source path
        self.dropped: list[str] = []
        self.log(
            f"diffseg GPU kit: out {self.out}, work {self.work}, device {self.device}, budget "
            f"{args.budget_min:g} min{', smoke' if self.smoke else ''}"
        )

    def log(self, text: str) -> None:
        line = f"[kit {time.time() - self.t0:6.1f}s] {text}"
        print(line, flush=True)
        with open(self.log_path, "a") as f:
            f.write(line + "\n")

    def run(self) -> int:
        planned = plan(self.args)
        for i, stage in enumerate(planned):
            remaining = self.end - REPORT_RESERVE_S - time.time()
            record = {
                "id": stage["id"],
                "kind": stage["kind"],
                "title": TITLES[stage["kind"]],
                "status": "not run",
                "box_s": None,
                "seconds": 0.0,
                "reason": None,
                "results": {},
                "notes": [],
            }
            if stage["kind"] == "train":
                record["title"] = f"{TITLES['train']}: {_repo_relative(stage['config'])}"
            self.stages.append(record)
            box = time_box(stage, planned[i + 1 :], remaining)
            if box < 10:
                record["reason"] = f"budget spent ({remaining:.0f} s left, {box:.0f} s box)"
                self.log(f"{stage['id']}: not run, {record['reason']}")
            else:
                self.run_stage(stage, record, box)
            self.render()
        self.render(final=True)
        if not self.args.work:
            shutil.rmtree(self.work, ignore_errors=True)
        bad = [s["id"] for s in self.stages if s["status"] in ("crashed", "failed")]
        return 1 if bad else 0

    def spec_for(self, stage: dict, deadline: float, stage_work: Path) -> dict[str, Any]:
        spec = {
            "kind": stage["kind"],
            "device": self.device,
            "smoke": self.smoke,
            "deadline": deadline,
            "work": str(stage_work),
            "result": str(stage_work / "result.json"),
            "peak_tflops": self.args.peak_tflops,
            "batch_size": self.args.step_batch,
        }
        env = next((s for s in self.stages if s["id"] == "env"), None)
        if env and env["results"].get("matmul") and self.device.startswith("cuda"):
            spec["matmul_tflops"] = env["results"]["matmul"]["tflops"]
        if stage["kind"] == "train":
            config = stage["config"]
            spec.update(
                config=config,
                config_label=_repo_relative(config),
                overrides=self.args.train_override,
                data_dir=str(self.args.data),
            )
        return spec

    def stage_command(self, spec_path: Path) -> list[str]:
        return [sys.executable, str(Path(__file__).resolve()), "--run-stage", str(spec_path)]

    def run_stage(self, stage: dict, record: dict, box: float) -> None:
        stage_work = self.work / stage["id"].replace(":", "_")
        stage_work.mkdir(parents=True, exist_ok=True)
        start = time.time()
        deadline = start + box - 3  # the child's own deadline: 3 s to write its results
        spec = self.spec_for(stage, deadline, stage_work)
        spec_path = stage_work / "spec.json"
        spec_path.write_text(json.dumps(spec, indent=1))
        record["box_s"] = round(box, 1)
        self.log(f"{stage['id']}: start, time box {box:.0f} s")
        stage_log = stage_work / "stage.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "MLFLOW_DISABLE_TELEMETRY": "1", "RAY_USAGE_STATS_ENABLED": "0"}
        if self.smoke:
            env.setdefault("OMP_NUM_THREADS", "1")
        cut = False
        with open(stage_log, "w") as log:
            proc = subprocess.Popen(
                self.stage_command(spec_path),
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
            try:
                rc = proc.wait(timeout=max(1.0, box))
            except subprocess.TimeoutExpired:
                cut = True
                _kill_group(proc)
                rc = proc.returncode
        record["seconds"] = round(time.time() - start, 1)
        output = stage_log.read_text(errors="replace")
        with open(self.log_path, "a") as f:
            f.write(f"----- {stage['id']} (exit {rc}) -----\n{output}\n")
        result = _read_json(stage_work / "result.json") or {}
        record["results"] = result.get("results", {})
        record["notes"] = result.get("notes", [])
        record["files"] = result.get("files", [])
        status = result.get("status", "crashed")
        if cut:
            record["status"] = "cut"
            record["reason"] = f"time box of {box:.0f} s reached; results up to then are kept"
        elif status == "running" or (rc != 0 and status not in ("crashed", "failed")):
            record["status"] = "crashed"
            last = [line for line in output.splitlines() if line.strip()][-1:] or [""]
            record["reason"] = f"the stage process exited with {rc}: {last[0][:300]}"
        else:
            record["status"] = status
            record["reason"] = result.get("reason")
        if result.get("error"):
            record["error"] = result["error"]
        if record["status"] != "ok":
            record["log_tail"] = output[-2500:]
        self.log(
            f"{stage['id']}: {record['status']} in {record['seconds']:.0f} s"
            + (f" ({record['reason']})" if record["reason"] else "")
        )

    # ------------------------------------------------------------------------------------------------ outputs
    def select_files(self) -> list[tuple[str, Path]]:
        """(name in --out, source) for the artifacts that fit: at most 8 files with report.md, figures.json,
        kit.log and training.png, each under 16 MiB, the lowest priority numbers first."""
        candidates = []
        for s in self.stages:
            for f in s.get("files", []):
                candidates.append((f["priority"], len(candidates), Path(f["path"])))
        fixed = 3 + (1 if (self.work / "training.png").is_file() else 0)
        chosen, dropped = [], []
        for _, _, path in sorted(candidates):
            if not path.is_file():
                continue
            if path.stat().st_size >= MAX_FILE_BYTES:
                dropped.append(f"{path.name} ({path.stat().st_size / 2**20:.1f} MiB, over the 16 MiB limit)")
            elif len(chosen) + fixed >= MAX_FILES:
                dropped.append(f"{path.name} (over the {MAX_FILES}-file limit)")
            else:
                chosen.append((path.name, path))
        self.dropped = dropped
        return chosen

    def render(self, final: bool = False) -> None:
        for s in self.stages:  # the chosen names go into the report before it is written
            for f in s.get("files", []):
                f["name"] = Path(f["path"]).name
        self.training_figure()
        chosen = self.select_files()
        figures = {
            "kit": {
                "command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]),
                "git_sha": _git_sha(),
                "started_utc": dt.datetime.fromtimestamp(self.t0, dt.UTC).isoformat(timespec="seconds"),
                "budget_min": self.args.budget_min,
                "smoke": self.smoke,
                "device": self.device,
                "wall_s": round(time.time() - self.t0, 1),
                "finished": final,
                "peak_tflops": self.args.peak_tflops,
                "files": ["report.md", "figures.json", "kit.log"]
                + (["training.png"] if (self.work / "training.png").is_file() else [])
                + [n for n, _ in chosen],
                "dropped_files": self.dropped,
            },
            "stages": self.stages,
        }
        _write(self.out / "figures.json", json.dumps(figures, indent=1, default=str))
        _write(self.out / "report.md", render_report(figures))
        for name, src in chosen:
            if self.copied.get(name) != str(src) or not (self.out / name).is_file():
                shutil.copyfile(src, self.out / name)
                self.copied[name] = str(src)
        if (self.work / "training.png").is_file():
            shutil.copyfile(self.work / "training.png", self.out / "training.png")
        log = self.log_path.read_bytes()
        (self.out / "kit.log").write_bytes(log[-(MAX_FILE_BYTES - 2**20) :])

    def training_figure(self) -> None:
        """Loss curves of the training jobs (one PNG), when any trained."""
        curves = [(s["id"], s["results"].get("loss_history")) for s in self.stages if s["kind"] == "train"]
        curves = [(n, h) for n, h in curves if h]
        if not curves:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        for name, hist in curves:
            ax.plot([h[0] for h in hist], [h[1] for h in hist], label=name.removeprefix("train:"))
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (mean over log interval)")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(self.work / "training.png")
        plt.close(fig)


# ---------------------------------------------------------------------------------------------------- report
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
        "# diffseg GPU kit report"
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
            ["steps", "seconds", "images/s", "images seen", "epochs", "last loss", "stopped by"],
            [
                [
                    t["steps"],
                    t["seconds"],
                    t["images_per_s"],
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


RENDERERS = {
    "env": _env,
    "tests": _tests,
    "train_step": _train_step,
    "unet": _unet,
    "ensemble": _ensemble,
    "sampling": _sampling,
    "memory": _memory,
    "train": _train,
}


# ---------------------------------------------------------------------------------------------------- utilities
def _cuda_present() -> bool:
    """Asked in a child process, so that this launcher never holds a CUDA context the stages would compete with."""
    out = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return out.stdout.strip() == "True"


def _kill_group(proc: subprocess.Popen) -> None:
    """End the stage's process group (its own session: the stage and what it started, nothing else)."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _repo_relative(path: str) -> str:
    p = Path(path)
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _git_sha() -> str | None:
    """$DIFFSEG_GIT_SHA, else git, else the commit --prepare recorded in .kit/prepared.json (the GPU box's copy of
    the working tree has no .git; "+dirty" when it had uncommitted changes then)."""
    if sha := os.environ.get("DIFFSEG_GIT_SHA"):
        return sha
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    stamp = _read_json(REPO / DEFAULT_DATA.split("/")[0] / "prepared.json") or {}
    if stamp.get("git_sha"):
        return stamp["git_sha"] + ("+dirty (at --prepare)" if stamp.get("dirty") else " (at --prepare)")
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.run_stage:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from gpu_kit_stages import run_stage

        return run_stage(args.run_stage)
    if args.prepare:
        return prepare(args)
    return Kit(args).run()


if __name__ == "__main__":
    sys.exit(main())
