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
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from kit import BENCH, DEFAULT_DATA, REPO
from kit.plan import plan, time_box
from kit.report import TITLES, render_report

MAX_FILES, MAX_FILE_BYTES = 8, 16 * 2**20
PART_BYTES = MAX_FILE_BYTES - 2**19  # one part of models.tar: under the device's 16 MiB per file
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
        self.parts: list[str] = []  # models.tar.NN in --out
        self.archived: list = []  # what the parts hold (name, path, size, mtime)
        self.dropped: list[str] = []
        self.log(
            f"diffseg GPU sprint: out {self.out}, work {self.work}, device {self.device}, budget "
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
            if stage["kind"] == "research":
                record["title"] = f"{TITLES['research']}: group {stage['group']['name']}"
            self.stages.append(record)
            box = time_box(stage, planned[i + 1 :], remaining)
            if box < 10:
                record["reason"] = f"budget spent ({remaining:.0f} s left, {box:.0f} s box)"
                self.log(f"{stage['id']}: not run, {record['reason']}")
            elif stage["kind"] == "research":
                self.run_group(stage, record, box)
            else:
                self.run_stage(stage, record, box)
            if stage["kind"] == "rate":  # the plan: the images each research run gets, from the rates measured
                self.plan_images(record, planned[i + 1 :])
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
                overrides=[*stage.get("overrides", []), *self.args.train_override],
                data_dir=str(self.args.data),
                run_name=stage.get("run_name"),
                eval_methods=stage.get("eval_methods"),
            )
            rate = self.rate_of(stage.get("run_name"))
            if rate:
                spec["gflop_per_image"] = rate.get("gflop_per_image")
        if stage["kind"] == "rate":
            spec["runs"] = stage["runs"]
            spec["data_dir"] = str(self.args.data)
        return spec

    # ------------------------------------------------------------------------------------------------ research
    def rate_results(self) -> dict:
        return next((s["results"] for s in self.stages if s["id"] == "rate"), {})

    def rate_of(self, run_name: str | None) -> dict | None:
        return (self.rate_results().get("runs") or {}).get(run_name) if run_name else None

    def research_boxes(self, later: list[dict], remaining: float) -> dict[str, float]:
        """The research groups' time boxes if every stage before each used its whole box (the plan's estimate)."""
        out = {}
        for j, stage in enumerate(later):
            box = time_box(stage, later[j + 1 :], remaining)
            if stage["kind"] == "research":
                out[stage["group"]["name"]] = round(box, 1)
            remaining -= box
        return out

    def plan_images(self, record: dict, later: list[dict]) -> None:
        """The research groups' boxes as they stand after `rate`, and each run's planned images: its rate alone x
        (box - 20 s of start-up and scoring) / the runs sharing the GPU. Logged, and in the report."""
        boxes = self.research_boxes(later, self.end - REPORT_RESERVE_S - time.time())
        record["results"]["planned_boxes_s"] = boxes
        runs = record["results"].get("runs") or {}
        for stage in later:
            if stage["kind"] != "research":
                continue
            group = stage["group"]
            box = boxes.get(group["name"], 0.0)
            for run in group["runs"]:
                if run["name"] in runs:
                    x = runs[run["name"]]
                    x["planned_images"] = int(x["images_per_s"] * max(box - 20, 0) / len(group["runs"]))
                    self.log(f"plan: {run['name']}: {x['planned_images']:,} images in a {box:.0f} s box shared by "
                             f"{len(group['runs'])} runs ({x['images_per_s']:,.0f} images/s alone)")  # fmt: skip

    def run_group(self, stage: dict, record: dict, box: float) -> None:
        """A research group: its runs train at once on the device, each a `train` stage in its own process with
        the group's box; each gets its own record (kind train) after the group's. torch.compile is on when the
        rate stage found that it pays within this box."""
        group = stage["group"]
        compile_note = self.compile_decision(box)
        members = []
        for run in group["runs"]:
            overrides = [*run["overrides"], f"name={run['name']}"]
            if compile_note["compile"]:
                overrides.append("loop.compile=true")
            member = {
                "id": f"train:{run['name']}",
                "kind": "train",
                "config": run["config"],
                "overrides": overrides,
                "run_name": run["name"],
                "eval_methods": ["all_foreground", "centred_box", "kmeans_rgb", "factorized"],
            }
            members.append(member)
        record["results"] = {"runs": [m["run_name"] for m in members], "compile": compile_note, "box_s": box}
        records = []
        for m in members:
            rec = {"id": m["id"], "kind": "train", "title": f"{TITLES['train']}: {m['run_name']} "
                   f"({_repo_relative(m['config'])})", "status": "not run", "box_s": round(box, 1), "seconds": 0.0,
                   "reason": None, "results": {}, "notes": [], "group": group["name"]}  # fmt: skip
            self.stages.append(rec)
            records.append(rec)
        self.run_stages_at_once(members, records, box)
        statuses = [r["status"] for r in records]
        record["status"] = "ok" if all(x == "ok" for x in statuses) else "partial"
        record["seconds"] = max((r["seconds"] for r in records), default=0.0)
        record["box_s"] = round(box, 1)
        record["reason"] = (
            None
            if record["status"] == "ok"
            else ", ".join(f"{m['run_name']}: {r['status']}" for m, r in zip(members, records) if r["status"] != "ok")
        )

    def compile_decision(self, box: float) -> dict:
        """Compile when the rate stage measured compiled faster by more than its compile time costs in `box`."""
        c = self.rate_results().get("compile") or {}
        if not c.get("compiled_images_per_s") or not c.get("eager_images_per_s"):
            return {"compile": False, "why": "not measured (eager)"}
        speedup = c["compiled_images_per_s"] / c["eager_images_per_s"]
        usable = max(box - 20 - c["compile_s"], 0)  # 20 s: start-up, data, the final export and scoring
        pays = speedup * usable > (box - 20)
        why = (f"compiled {speedup:.2f}x eager after {c['compile_s']:.0f} s of compiling: "
               f"{'pays' if pays else 'does not pay'} in a {box:.0f} s box")  # fmt: skip
        return {"compile": pays, "why": why, "speedup": speedup}

    def stage_command(self, spec_path: Path) -> list[str]:
        return [sys.executable, str(BENCH / "gpu_kit.py"), "--run-stage", str(spec_path)]

    def run_stage(self, stage: dict, record: dict, box: float) -> None:
        self.run_stages_at_once([stage], [record], box)

    def run_stages_at_once(self, stages: list[dict], records: list[dict], box: float) -> None:
        """Each stage in its own process (its own session), all started now and all cut at `box`."""
        start = time.time()
        deadline = start + box - 3  # the children's own deadline: 3 s to write their results
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "MLFLOW_DISABLE_TELEMETRY": "1", "RAY_USAGE_STATS_ENABLED": "0"}
        if self.smoke:
            env.setdefault("OMP_NUM_THREADS", "1")
        running = []
        for stage, record in zip(stages, records):
            stage_work = self.work / stage["id"].replace(":", "_")
            stage_work.mkdir(parents=True, exist_ok=True)
            spec = self.spec_for(stage, deadline, stage_work)
            spec_path = stage_work / "spec.json"
            spec_path.write_text(json.dumps(spec, indent=1))
            record["box_s"] = round(box, 1)
            self.log(f"{stage['id']}: start, time box {box:.0f} s")
            log = open(stage_work / "stage.log", "w")  # noqa: SIM115 (closed when the process is collected)
            proc = subprocess.Popen(
                self.stage_command(spec_path),
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
            running.append((stage, record, stage_work, proc, log))
        for stage, record, stage_work, proc, log in running:
            cut = False
            try:
                rc = proc.wait(timeout=max(1.0, start + box - time.time()))
            except subprocess.TimeoutExpired:
                cut = True
                _kill_group(proc)
                rc = proc.returncode
            log.close()
            self.collect(stage, record, stage_work, rc, cut, time.time() - start, box)

    def collect(self, stage: dict, record: dict, stage_work: Path, rc: int, cut: bool, seconds: float, box: float):
        record["seconds"] = round(seconds, 1)
        output = (stage_work / "stage.log").read_text(errors="replace")
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
        """The stages' files (fp16 checkpoints, figures) that go into the archive: lowest priority number first,
        then smallest first, as many as the archive's parts hold (MAX_FILES minus report.md, figures.json, kit.log
        and training.png, each part under 16 MiB); the rest are named in `self.dropped`."""
        candidates = []
        for s in self.stages:
            for f in s.get("files", []):
                path = Path(f["path"])
                if path.is_file():
                    candidates.append((f["priority"], path.stat().st_size, path.name, path))
        fixed = 3 + (1 if (self.work / "training.png").is_file() else 0)
        capacity = (MAX_FILES - fixed) * PART_BYTES
        chosen, dropped, used = [], [], 0
        for _, size, name, path in sorted(candidates):
            cost = size + 1024 + 512  # the tar header and padding
            if used + cost + 1024 > capacity:
                dropped.append(f"{name} ({size / 2**20:.1f} MiB: the archive's {MAX_FILES - fixed} parts are full)")
                continue
            chosen.append((name, path))
            used += cost
        self.dropped = dropped
        return chosen

    def write_archive(self, chosen: list[tuple[str, Path]]) -> list[str]:
        """models.tar (the chosen files, in order) split into parts models.tar.NN of at most PART_BYTES in --out
        (`cat models.tar.* | tar x` joins and unpacks them); rewritten only when the chosen files changed."""
        key = [(n, str(p), p.stat().st_size, p.stat().st_mtime) for n, p in chosen]
        if key == self.archived and all((self.out / n).is_file() for n in self.parts):
            return self.parts
        for old in self.out.glob("models.tar.*"):
            old.unlink()
        self.parts, self.archived = [], key
        if not chosen:
            return self.parts
        tar_path = self.work / "models.tar"
        with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for name, path in chosen:
                tar.add(path, arcname=name)
        with open(tar_path, "rb") as f:
            i = 0
            while chunk := f.read(PART_BYTES):
                name = f"models.tar.{i:02d}"
                _write_bytes(self.out / name, chunk)
                self.parts.append(name)
                i += 1
        return self.parts

    def render(self, final: bool = False) -> None:
        for s in self.stages:  # the chosen names go into the report before it is written
            for f in s.get("files", []):
                f["name"] = Path(f["path"]).name
        self.training_figure()
        chosen = self.select_files()
        parts = self.write_archive(chosen)
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
                + parts,
                "archive": [n for n, _ in chosen],
                "dropped_files": self.dropped,
            },
            "stages": self.stages,
        }
        _write(self.out / "figures.json", json.dumps(figures, indent=1, default=str))
        _write(self.out / "report.md", render_report(figures))
        if (self.work / "training.png").is_file():
            shutil.copyfile(self.work / "training.png", self.out / "training.png")
        log = self.log_path.read_bytes()
        (self.out / "kit.log").write_bytes(log[-(MAX_FILE_BYTES - 2**20) :])

    def training_figure(self) -> None:
        """The training jobs against images seen (one PNG): their loss, and the held-out score and image dependence
        of a factorized model's masks (`loop.eval_every`)."""
        runs = [s for s in self.stages if s["kind"] == "train" and s["results"].get("loss_history")]
        if not runs:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(15, 4), dpi=100)
        for s in runs:
            r = s["results"]
            batch = (r.get("setup") or {}).get("batch") or 1
            label = s["id"].removeprefix("train:")
            hist = r["loss_history"]
            axes[0].plot([h[0] * batch for h in hist], [h[1] for h in hist], label=label)
            diags = r.get("mask_diagnostics") or []
            score = next((k for k in (diags[0] if diags else {}) if k in ("val/fg_iou", "val/hungarian_miou")), None)
            if score:
                seen = [d["step"] * batch for d in diags]
                axes[1].plot(seen, [100 * d[score] for d in diags], marker=".", label=label)
                axes[2].plot(seen, [d.get("val/mask_dependence") for d in diags], marker=".", label=label)
        axes[0].set_ylabel("training loss (mean over log interval)")
        axes[0].set_yscale("log")
        axes[1].set_ylabel("held-out score of the masks (%)")
        axes[2].set_ylabel("image dependence of the masks")
        for ax in axes:
            ax.set_xlabel("training images seen")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        if axes[1].lines:
            axes[1].legend(fontsize=7)
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


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


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
