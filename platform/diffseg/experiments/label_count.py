"""The label-count curve (Baranchuk et al.: the few labels are the point): a comparison at several labelled-set sizes.

    for each count n in `counts` and each ensemble seed:
        the comparison's rows (`label_efficient.score_variant`: the MLP ensemble on DDPM features, on random-init
        features of the same U-Net, the supervised U-Net of the same architecture) trained on the first n labelled
        images with `train.seed` = that seed, scored on the test images by the one evaluation path
    per count and method: mean, standard deviation and range over the seeds; the DDPM's gain over each other method
    per seed (matched seeds), its mean and range

The score is `metric` (a key under `test/`: "miou", or "iou/<class>", e.g. "iou/horse", the foreground IoU).

Each (count, seed, method) is a cell, written to <output_dir>/<name>/cells/n<count>/s<seed>/<method>.json when it is
done; a re-run reuses every finished cell (so an interrupted curve resumes) and refuses cells of another recipe (the
cell records a hash of everything but counts, seeds, name and tracking). The features of one count are extracted
once (n<count>/shards/, shared by its seeds); each cell's predictions, metrics and bundle go to its own folder.

Seeds: `seeds` at every count, plus `extra_seeds` for the methods in `extra_seeds_variants` at counts up to
`extra_seeds_max_count` (where they are cheap), and for every method at the counts in `extra_seeds_at` (the headline
count, e.g. 20, where the table's comparison needs every row on the same seeds).

With `compute: false` nothing is trained: the table and plot are made from the finished cells (the others listed).

Outputs: curve.md (the table), curve.json (cells and summary), curve.png (score against labelled images, mean and
range per method; the DDPM's gains); MLflow: a parent run (`curve/<method>/mean` at step = count, the artifacts)
with a child run per computed cell.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffseg.core.config import to_dict
from diffseg.core.report import markdown_table
from diffseg.core.runtime import resolve_device
from diffseg.core.tracking import start_job
from diffseg.data.datasets import build_dataset
from diffseg.experiments.label_efficient import LABELS, CompareConfig, score_variant
from diffseg.models.checkpoint import load_checkpoint

log = logging.getLogger(__name__)

# fields that do not change what a cell computes (the rest are hashed into every cell)
_NOT_RECIPE = ("name", "output_dir", "tracking", "compute", "variants", "counts", "seeds", "extra_seeds",
               "extra_seeds_max_count", "extra_seeds_variants", "extra_seeds_at", "train_limit")  # fmt: skip


@dataclass(frozen=True)
class LabelCountConfig(CompareConfig):
    """A comparison's recipe (every `CompareConfig` field; `train_limit` is replaced by each count) at several
    labelled-set sizes and ensemble seeds."""

    name: str = "label-count"
    variants: tuple[str, ...] = ("ddpm", "random", "supervised")  # methods (rows of the comparison) at each count
    counts: tuple[int, ...] = (1, 5, 20, 50, 200)  # labelled images: the first n of the training split
    seeds: tuple[int, ...] = (0, 1)  # ensemble seeds (train.seed; the supervised U-Net's init and order) at every count
    extra_seeds: tuple[int, ...] = ()  # more seeds where they are cheap
    extra_seeds_max_count: int = 0  # ... at counts up to this
    extra_seeds_variants: tuple[str, ...] = ("ddpm", "random")  # ... for these methods
    extra_seeds_at: tuple[int, ...] = ()  # and at these counts for every method (the headline count)
    metric: str = "miou"  # the score, a key under test/: miou, miou_official or iou/<class> (foreground: iou/horse)
    compute: bool = True  # false: no training, the table and plot from the cells already finished (the rest listed)

    def check(self) -> None:
        """Cross-field checks (run by --dry-run and before the job)."""
        super().check()
        if not self.counts or any(n < 1 for n in self.counts):
            raise ValueError(f"counts: give labelled-set sizes >= 1, got {list(self.counts)}")
        if not self.seeds:
            raise ValueError("seeds: give at least one ensemble seed")
        if len(set(self.seeds) | set(self.extra_seeds)) != len(self.seeds) + len(self.extra_seeds):
            raise ValueError(f"seeds {list(self.seeds)} and extra_seeds {list(self.extra_seeds)} repeat a seed")
        if self.metric not in ("miou", "miou_official") and not self.metric.startswith("iou/"):
            raise ValueError(f"metric: 'miou', 'miou_official' or 'iou/<class>', got {self.metric!r}")
        unknown = sorted(set(self.extra_seeds_variants) - set(LABELS))  # methods not run are ignored
        if unknown:
            raise ValueError(f"extra_seeds_variants: unknown {unknown}; known: {list(LABELS)}")


def cell_seeds(cfg: LabelCountConfig, count: int, variant: str) -> tuple[int, ...]:
    """The ensemble seeds of one (count, method)."""
    extra = count in cfg.extra_seeds_at or (count <= cfg.extra_seeds_max_count and variant in cfg.extra_seeds_variants)
    return tuple(cfg.seeds) + (tuple(cfg.extra_seeds) if extra else ())


def recipe_hash(cfg: LabelCountConfig) -> str:
    """What a cell depends on besides its count, seed and method: everything but `_NOT_RECIPE` and train.seed."""
    d = {k: v for k, v in to_dict(cfg).items() if k not in _NOT_RECIPE}
    d["train"] = {k: v for k, v in d["train"].items() if k != "seed"}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def cell_score(row: dict[str, Any], metric: str) -> float:
    """The configured score of a comparison row (a fraction)."""
    if metric in ("miou", "miou_official"):
        return float(row[metric])
    name = metric.removeprefix("iou/")
    if name not in row["iou"]:
        raise KeyError(f"metric {metric!r}: no class {name!r} (classes: {list(row['iou'])})")
    return float(row["iou"][name])


def read_cell(path: Path, expected_hash: str) -> dict[str, Any] | None:
    """A finished cell, or None when it is not there; a cell of another recipe is an error."""
    if not path.is_file():
        return None
    cell = json.loads(path.read_text())
    if cell.get("recipe_hash") != expected_hash:
        raise ValueError(
            f"{path}: computed with another recipe (hash {cell.get('recipe_hash')}, this config {expected_hash}); "
            "give the run another name= or delete the cells to recompute them"
        )
    return cell


def summarize(cells: Sequence[dict[str, Any]], variants: Sequence[str]) -> list[dict[str, Any]]:
    """Per count: per method the seeds' scores (in points), n, mean, sd (ddof 1; None for one seed), min, max; then
    the DDPM's gain over each other method on the seeds both have: per-seed gains, mean, min, max."""
    by: dict[int, dict[str, dict[int, float]]] = {}
    for c in cells:
        by.setdefault(c["count"], {}).setdefault(c["variant"], {})[c["seed"]] = 100 * c["score"]
    out = []
    for count in sorted(by):
        row: dict[str, Any] = {"count": count, "methods": {}, "gains": {}}
        for v in variants:
            s = by[count].get(v, {})
            if not s:
                continue
            x = list(s.values())
            row["methods"][v] = {
                "seeds": sorted(s), "scores": [s[k] for k in sorted(s)], "n": len(x), "mean": float(np.mean(x)),
                "sd": float(np.std(x, ddof=1)) if len(x) > 1 else None, "min": float(min(x)), "max": float(max(x)),
            }  # fmt: skip
        ddpm = by[count].get("ddpm", {})
        for v in variants:
            other = by[count].get(v, {})
            common = sorted(set(ddpm) & set(other))
            if v == "ddpm" or not common:
                continue
            g = [ddpm[k] - other[k] for k in common]
            row["gains"][v] = {"seeds": common, "gains": g, "mean": float(np.mean(g)), "min": min(g), "max": max(g)}
        out.append(row)
    return out


def advantage(summary: Sequence[dict[str, Any]], over: str) -> str:
    """In words: at which counts the DDPM features beat `over` on the mean, and at which on every matched seed."""
    rows = [r for r in summary if over in r["gains"]]
    if not rows:
        return f"no count has both ddpm and {over} rows"
    mean_win = [r["count"] for r in rows if r["gains"][over]["mean"] > 0]
    all_win = [r["count"] for r in rows if r["gains"][over]["min"] > 0]
    return (
        f"over {LABELS.get(over, over)}: ahead on the mean at {mean_win or 'no count'} labelled images, "
        f"on every seed at {all_win or 'no count'} (of {[r['count'] for r in rows]})"
    )


def _fmt(m: dict[str, Any] | None) -> str:
    if not m:
        return "-"
    if m["n"] == 1:
        return f"{m['mean']:.1f} (1 seed)"
    return f"{m['mean']:.1f} ({m['min']:.1f}-{m['max']:.1f}, {m['n']} seeds)"


def curve_table(summary: Sequence[dict[str, Any]], variants: Sequence[str], metric: str) -> str:
    """Markdown: one row per count, per method mean (range, seeds), then the DDPM's gains (mean, range)."""
    others = [v for v in variants if v != "ddpm"]
    head = ["labelled images", *[LABELS.get(v, v) for v in variants]]
    head += [f"DDPM - {v}" for v in others if "ddpm" in variants]
    body = []
    for r in summary:
        cells = [r["count"], *[_fmt(r["methods"].get(v)) for v in variants]]
        for v in others if "ddpm" in variants else ():
            g = r["gains"].get(v)
            cells.append("-" if not g else f"{g['mean']:+.1f} ({g['min']:+.1f} .. {g['max']:+.1f})")
        body.append(cells)
    return f"test {metric} (%): mean (range over ensemble seeds)\n\n" + markdown_table(head, body)


def compute_table(cells: Sequence[dict[str, Any]], variants: Sequence[str]) -> str:
    """Markdown: per count and method, the cells' minutes (sum and per seed) and the classifier's iterations."""
    by: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for c in cells:
        by.setdefault((c["count"], c["variant"]), []).append(c)
    body = []
    for (count, v), cs in sorted(by.items(), key=lambda kv: (kv[0][0], variants.index(kv[0][1]))):
        minutes = [c["row"]["seconds"] / 60 for c in cs]
        its = [c["row"].get("iterations") for c in cs]
        batch = cs[0]["row"].get("batch_size")
        body.append([count, LABELS.get(v, v), len(cs), f"{sum(minutes):.1f}", f"{np.mean(minutes):.1f}",
                     f"{min(its)}-{max(its)} x {batch}", cs[0]["row"].get("machine", "-")])  # fmt: skip
    head = ["labelled images", "method", "seeds", "minutes (all seeds)", "minutes per seed", "iterations x batch",
            "machine"]  # fmt: skip
    return markdown_table(head, body)


def plot_curve(summary: Sequence[dict[str, Any]], variants: Sequence[str], metric: str, path: str | os.PathLike):
    """Score against labelled images (log x): per method the mean (line), the range (band) and each seed (dots);
    right: the DDPM's gain over each other method (mean and range)."""
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone

    path = Path(path)
    fig = Figure(figsize=(9, 3.4))
    ax1, ax2 = fig.subplots(1, 2)
    colours = {"ddpm": "tab:blue", "random": "tab:gray", "supervised": "tab:orange", "rgb": "tab:green"}
    counts = [r["count"] for r in summary]
    for v in variants:
        pts = [(r["count"], r["methods"][v]) for r in summary if v in r["methods"]]
        if not pts:
            continue
        xs, ms = [p[0] for p in pts], [p[1] for p in pts]
        col = colours.get(v)
        ax1.plot(xs, [m["mean"] for m in ms], "-o", ms=4, color=col, label=LABELS.get(v, v))
        ax1.fill_between(xs, [m["min"] for m in ms], [m["max"] for m in ms], color=col, alpha=0.2, lw=0)
        for x, m in pts:
            ax1.plot([x] * m["n"], m["scores"], ".", color=col, ms=3, alpha=0.7)
        if v != "ddpm":
            gs = [(r["count"], r["gains"][v]) for r in summary if v in r["gains"]]
            if gs:
                gx = [g[0] for g in gs]
                ax2.plot(gx, [g[1]["mean"] for g in gs], "-o", ms=4, color=col, label=f"DDPM - {v}")
                ax2.fill_between(gx, [g[1]["min"] for g in gs], [g[1]["max"] for g in gs], color=col, alpha=0.2, lw=0)
    ax2.axhline(0, color="k", lw=0.8)
    for ax, ylabel in ((ax1, f"test {metric} (%)"), (ax2, "DDPM's gain (points)")):
        ax.set_xscale("log")
        ax.set_xticks(counts, [str(c) for c in counts])
        ax.set_xticks([], minor=True)
        ax.set_xlabel("labelled images")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def run_label_count(cfg: LabelCountConfig) -> dict[str, Any]:
    cfg.check()
    out, parent = start_job(cfg)
    device = resolve_device(cfg.device)
    size = int(load_checkpoint(cfg.checkpoint).model_config.unet.image_size)
    test = build_dataset(dataclasses.replace(cfg.test_data, flip=False, image_size=size), "test")
    if cfg.test_limit:
        test = torch.utils.data.Subset(test, range(min(cfg.test_limit, len(test))))
    available = len(build_dataset(dataclasses.replace(cfg.train_data, flip=False, image_size=size), "train"))
    too_many = [n for n in cfg.counts if n > available]
    if too_many:
        raise ValueError(f"counts {too_many}: the training split of {cfg.train_data.root} has {available} images")
    rhash = recipe_hash(cfg)
    cells: list[dict[str, Any]] = []
    reused = computed = 0
    missing: list[str] = []
    for count in cfg.counts:
        count_dir = out / f"n{count}"
        for variant in cfg.variants:
            for seed in cell_seeds(cfg, count, variant):
                path = out / "cells" / f"n{count}" / f"s{seed}" / f"{variant}.json"
                cell = read_cell(path, rhash)
                if cell is None and not cfg.compute:
                    missing.append(f"n={count} seed={seed} {variant}")
                    continue
                if cell is None:
                    t0 = time.perf_counter()
                    ccfg = dataclasses.replace(cfg, train_limit=count, train=dataclasses.replace(cfg.train, seed=seed))
                    row = score_variant(
                        variant, ccfg, count_dir, device, test, parent, eval_dir=path.parent / variant,
                        run_name=f"{cfg.name}/n{count}/s{seed}/{variant}", log_model=False,
                    )  # fmt: skip
                    bundle = count_dir / variant / "segmenter.pt"
                    if bundle.exists():  # each seed's bundle beside its predictions
                        shutil.move(bundle, path.parent / variant / "segmenter.pt")
                    cell = {"count": count, "seed": seed, "variant": variant, "recipe_hash": rhash,
                            "score": cell_score(row, cfg.metric), "metric": cfg.metric, "row": row}  # fmt: skip
                    path.write_text(json.dumps(cell, indent=1))
                    computed += 1
                    log.info(
                        f"[label-count] n={count} seed={seed} {variant}: {cfg.metric} {100 * cell['score']:.1f} "
                        f"({(time.perf_counter() - t0) / 60:.1f} min)"
                    )
                else:
                    reused += 1
                cells.append(cell)
        summary = summarize(cells, cfg.variants)
        write_outputs(out, cfg, cells, summary, missing)  # after every count: a partial curve exists early
    for r in summary:
        parent.log_metrics({f"curve/{v}/mean": m["mean"] for v, m in r["methods"].items()}, step=r["count"])
        parent.log_metrics({f"curve/gain_over_{v}/mean": g["mean"] for v, g in r["gains"].items()}, step=r["count"])
    for name in ("curve.md", "curve.json", "curve.png", "config.yaml"):
        if (out / name).exists():
            parent.log_artifact(out / name)
    parent.log_metrics({"cells/computed": computed, "cells/reused": reused})
    parent.finish()
    log.info(f"[label-count] {computed} cells computed, {reused} reused, {len(missing)} not computed -> {out}")
    return {
        "cells": cells, "summary": summary, "computed": computed, "reused": reused, "missing": missing, "out": str(out)
    }  # fmt: skip


def write_outputs(
    out: Path, cfg: LabelCountConfig, cells: Sequence[dict[str, Any]], summary: Sequence[dict], missing: Sequence[str]
) -> None:
    """curve.md (score table, the DDPM's advantage in words, compute, the cells not computed), curve.json, curve.png."""
    text = curve_table(summary, cfg.variants, cfg.metric) + "\n"
    if "ddpm" in cfg.variants:
        text += "".join(f"\nDDPM features {advantage(summary, v)}." for v in cfg.variants if v != "ddpm") + "\n"
    text += "\nCompute (minutes: extraction of the labelled images, training and evaluation of each cell)\n\n"
    text += compute_table(cells, list(cfg.variants)) + "\n"
    if missing:
        text += f"\nNot computed (compute=false): {len(missing)} cells: " + "; ".join(missing) + "\n"
    (out / "curve.md").write_text(text)
    payload = {"metric": cfg.metric, "summary": summary, "cells": cells, "missing": list(missing)}
    (out / "curve.json").write_text(json.dumps(payload, indent=1))
    plot_curve(summary, cfg.variants, cfg.metric, out / "curve.png")
