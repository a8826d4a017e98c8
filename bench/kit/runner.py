"""Running the plan: each stage in its own process under its time box, its results and files collected into --out."""

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

from kit import BENCH, DEFAULT_DATA, REPO
from kit.plan import plan, time_box
from kit.report import TITLES, render_report

MAX_FILES, MAX_FILE_BYTES = 8, 16 * 2**20
REPORT_RESERVE_S = 15  # kept back at the end of the budget for the last report


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
        return [sys.executable, str(BENCH / "gpu_kit.py"), "--run-stage", str(spec_path)]

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
