"""The sprint's plan: which stages run, in which order, and the time box each one gets from what is left.

Research first, measurements last: `env` (the machine, seconds), `rate` (every research run's images/s, measured in
the window's first seconds), one `research` stage per group of the sprint file (bench/sprint.yaml: its runs
train at once on the GPU), then the throughput figures (`train_step`, `unet`, `ensemble`, `sampling`, `memory`),
the `gpu` tests, and any `--train CONFIG` given (a single training job, as the kit's first version ran).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from kit import REPO

ORDER = ["env", "rate", "research", "train_step", "unet", "ensemble", "sampling", "memory", "tests", "train"]

# Shares of the time left when a stage starts (the research groups share RESEARCH_WEIGHT by their `share`; --train
# jobs share TRAIN_WEIGHT), with floors and caps in seconds.
WEIGHTS = {"env": 1, "rate": 6, "train_step": 5, "unet": 2, "ensemble": 2, "sampling": 4, "memory": 3, "tests": 3}

RESEARCH_WEIGHT = 72

TRAIN_WEIGHT = 20

FLOORS = {"env": 20, "rate": 45, "unet": 15, "ensemble": 15, "tests": 20}

CAPS = {"env": 60, "rate": 90, "tests": 240}


def parse_train(items: list[str]) -> list[tuple[str, float | None]]:
    """--train CONFIG[=MINUTES] -> [(config path, minutes or None)]; a relative CONFIG is the caller's, else the
    repository's (`jobs/configs/x.yaml` works from anywhere)."""
    jobs = []
    for item in items:
        path, _, minutes = item.partition("=")
        found = find_file(path)
        if found is None:
            raise SystemExit(f"--train {item}: no config file {path}")
        try:
            jobs.append((str(found.resolve()), float(minutes) if minutes else None))
        except ValueError:
            raise SystemExit(f"--train {item}: MINUTES must be a number") from None
    return jobs


def find_file(path: str) -> Path | None:
    return next((p for p in (Path(path), REPO / path) if p.is_file()), None)


def load_sprint(path: str) -> list[dict[str, Any]]:
    """The sprint file's groups: [{"name", "share", "overrides", "runs": [{"name", "config", "overrides"}]}], checked
    (a bad file stops the kit before the window is spent)."""
    found = find_file(path)
    if found is None:
        raise SystemExit(f"--sprint {path}: no such file")
    try:
        data = yaml.safe_load(found.read_text()) or {}
    except yaml.YAMLError as e:
        raise SystemExit(f"--sprint {found}: invalid YAML ({e})") from None
    groups = data.get("groups")
    if not isinstance(groups, list) or not groups:
        raise SystemExit(f"--sprint {found}: 'groups' must be a non-empty list")
    names: set[str] = set()
    out = []
    for i, g in enumerate(groups):
        where = f"--sprint {found}: groups[{i}]"
        if not isinstance(g, dict) or not g.get("name") or not isinstance(g.get("runs"), list) or not g["runs"]:
            raise SystemExit(f"{where}: needs a name and a non-empty list of runs")
        runs = []
        for j, r in enumerate(g["runs"]):
            if not isinstance(r, dict) or not r.get("name") or not r.get("config"):
                raise SystemExit(f"{where}.runs[{j}]: needs a name and a config")
            if r["name"] in names:
                raise SystemExit(f"{where}.runs[{j}]: run name {r['name']!r} is used twice")
            names.add(r["name"])
            config = find_file(r["config"])
            if config is None:
                raise SystemExit(f"{where}.runs[{j}].config: no config file {r['config']}")
            overrides = [*(g.get("overrides") or []), *(r.get("overrides") or [])]
            runs.append({"name": r["name"], "config": str(config.resolve()), "overrides": [str(o) for o in overrides]})
        share = float(g.get("share", 1.0))
        if share <= 0:
            raise SystemExit(f"{where}.share: must be > 0, got {share}")
        out.append({"name": str(g["name"]), "share": share, "runs": runs})
    return out


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The stages to run, in order: {"id", "kind", "weight" | "fixed_s", ...}."""
    wanted = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(wanted) - set(ORDER))
    if unknown:
        raise SystemExit(f"--stages: unknown {unknown}; known: {ORDER}")
    if args.train:
        wanted.append("train")
    boxes = {}
    for item in args.box:
        name, _, secs = item.partition("=")
        boxes[name] = float(secs)
    groups = load_sprint(args.sprint) if {"rate", "research"} & set(wanted) else []
    total_share = sum(g["share"] for g in groups) or 1.0
    stages = []
    for kind in ORDER:
        if kind not in wanted and kind != "env":  # env is always measured: the report names the machine
            continue
        if kind == "rate":
            runs = [r for g in groups for r in g["runs"]]
            stages.append({"id": "rate", "kind": "rate", "runs": runs, "weight": WEIGHTS["rate"],
                           "fixed_s": boxes.get("rate")})  # fmt: skip
        elif kind == "research":
            for g in groups:
                sid = f"research:{g['name']}"
                stages.append({"id": sid, "kind": "research", "group": g,
                               "weight": RESEARCH_WEIGHT * g["share"] / total_share,
                               "fixed_s": boxes.get(sid, boxes.get("research"))})  # fmt: skip
        elif kind == "train":
            jobs = parse_train(args.train)
            flexible = sum(1 for _, m in jobs if m is None)
            for path, minutes in jobs:
                sid = f"train:{Path(path).stem}"
                if any(s["id"] == sid for s in stages):  # the same config twice (e.g. with other overrides later)
                    sid += f"-{sum(1 for s in stages if s['id'].startswith(sid)) + 1}"
                fixed = minutes * 60 if minutes is not None else boxes.get(sid, boxes.get("train"))
                stages.append({"id": sid, "kind": "train", "config": path, "weight": TRAIN_WEIGHT / max(flexible, 1),
                               "fixed_s": fixed})  # fmt: skip
        else:
            stages.append({"id": kind, "kind": kind, "weight": WEIGHTS[kind], "fixed_s": boxes.get(kind)})
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
