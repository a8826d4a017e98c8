"""The kit's plan: which stages run, in which order, and the time box each one gets from what is left."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kit import DEFAULT_TRAIN, REPO

ORDER = ["env", "tests", "train_step", "unet", "ensemble", "sampling", "memory", "train"]

# Shares of the time left when a stage starts (the train jobs share TRAIN_WEIGHT), with floors and caps in seconds.
WEIGHTS = {"env": 1, "tests": 6, "train_step": 14, "unet": 4, "ensemble": 3, "sampling": 12, "memory": 15}

TRAIN_WEIGHT = 45

FLOORS = {"env": 30, "tests": 45, "unet": 25, "ensemble": 20}

CAPS = {"env": 60, "tests": 240}


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
