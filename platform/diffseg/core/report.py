"""Reports: THE Markdown table writer, and the tables and plots of a sweep's results.

    markdown_table(headers, rows)              any table of cells (the evaluation tables, the comparisons, sweeps)
    frame_to_markdown(df)                      a pandas DataFrame as such a table
    sweep_table(result_grid, keys, metric)     one row per Tune trial: swept values, last metrics; best first
    plot_sweep(df, keys, metric, path)         a heatmap (two swept paths) or a bar chart (one)
    chosen_markdown(summary)                   a pixel sweep's chosen recipe: validation (per fold) beside test

pandas and matplotlib are imported where they are used (they cost seconds; most jobs write no plot).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

JSON_PREFIX = "json:"  # list/dict choices travel through Tune (and Optuna) as "json:<value>" strings


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: Sequence[str] | None = None) -> str:
    """A GitHub Markdown table; cells are written with `str` (format numbers before), `align` cells like "---:"."""
    align = list(align or ["---"] * len(headers))
    if len(align) != len(headers):
        raise ValueError(f"{len(align)} alignments for {len(headers)} columns")
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "|".join(align) + "|"]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"a row has {len(row)} cells for {len(headers)} columns: {list(row)}")
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines) + "\n"


def frame_to_markdown(df: Any, float_format: str = "{:.4f}") -> str:
    """A DataFrame as a Markdown table (finite floats formatted with `float_format`)."""

    def cell(v: Any) -> str:
        return float_format.format(v) if isinstance(v, float) and math.isfinite(v) else str(v)

    return markdown_table(list(df.columns), [[cell(row[c]) for c in df.columns] for _, row in df.iterrows()])


# ---------------------------------------------------------------------------------------------------- sweeps
def encode(value: Any) -> Any:
    """Tune (and Optuna's categorical sampler) want primitives: lists and dicts become "json:<value>" strings."""
    if isinstance(value, (list, tuple, dict)):
        return JSON_PREFIX + json.dumps(value, default=list)
    return value


def decode(value: Any) -> Any:
    """A value as Tune carried it -> the config value ("json:[...]" strings back to lists and dicts)."""
    if isinstance(value, str) and value.startswith(JSON_PREFIX):
        return json.loads(value[len(JSON_PREFIX) :])
    return value


def trial_overrides(config: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """A trial's nested Tune config -> {dotted path: decoded value} for the swept keys."""
    out = {}
    for key in keys:
        node: Any = config
        for part in key.split("."):
            node = node[part]
        out[key] = decode(node)
    return out


def _short(value: Any) -> Any:
    """Readable cell values: ["dec.4", "dec.5"] -> "dec.4,dec.5"; [50, 150] -> "50,150"."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return value


def sweep_table(result_grid: Any, keys: Sequence[str], metric: str, mode: str) -> Any:
    """One row per trial: trial id, status, the swept values (decoded), the last reported metrics; best first."""
    import pandas as pd

    rows = []
    for res in result_grid:
        m = dict(res.metrics or {})
        row: dict[str, Any] = {"trial_id": m.get("trial_id") or Path(res.path).name.split("_")[-1]}
        if res.config:  # a trial that never started (an interrupted sweep) has no config yet
            row.update({k: _short(v) for k, v in trial_overrides(res.config, keys).items()})
        row["status"] = "ERROR" if res.error else "DONE"  # run_sweep marks trials ASHA stopped early
        row["reports"] = m.get("training_iteration", 0)
        row.update({k: v for k, v in m.items() if "/" in k and k.split("/")[0] in ("train", "test", "val", "time")})
        if "feature_dim" in m:
            row["feature_dim"] = m["feature_dim"]
        rows.append(row)
    df = pd.DataFrame(rows)
    if metric in df.columns:
        df = df.sort_values(metric, ascending=mode == "min", na_position="last").reset_index(drop=True)
    return df


MAX_CELLS = 12  # a heatmap with more rows or columns than this (a sampled search's many sets) becomes a ranking
TOP_TRIALS = 20  # the trials the ranking shows


def plot_sweep(df: Any, keys: Sequence[str], metric: str, path: str | os.PathLike, title: str | None = None) -> Path:
    """Two swept paths: a heatmap of `metric` (rows = first path, columns = second); one: a bar chart. When the
    values are too many for a heatmap (a random or Optuna search over sets of blocks and timesteps), the best
    `TOP_TRIALS` trials as horizontal bars, each labelled with its swept values."""
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend (a notebook's inline) alone

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    varied = [k for k in keys if k in df.columns and df[k].astype(str).nunique() > 1] or list(keys[:1])
    data = df[df[metric].notna()] if metric in df.columns else df.iloc[:0]
    if max((data[k].astype(str).nunique() for k in varied[:2] if k in data.columns), default=0) > MAX_CELLS:
        top = data.head(TOP_TRIALS)  # the table is best first (`sweep_table`, by the sweep's mode)
        labels = [" | ".join(str(_short(row[k])) for k in varied if k in top.columns) for _, row in top.iterrows()]
        fig = Figure(figsize=(8, 1.2 + 0.28 * len(top)))
        ax = fig.add_subplot()
        ax.barh(range(len(top)), top[metric].to_numpy(), color="tab:blue")
        ax.set_yticks(range(len(top)), labels, fontsize=7)
        ax.invert_yaxis()  # the best on top
        ax.set_xlabel(metric), ax.set_ylabel(" | ".join(varied), fontsize=7)
        for i, v in enumerate(top[metric].to_numpy()):
            ax.text(v, i, f" {v:.3f}", va="center", fontsize=7)
        title = f"{title or metric} (best {len(top)} of {len(data)} trials)"
    elif len(varied) >= 2:
        a, b = varied[0], varied[1]
        pivot = data.assign(**{a: data[a].astype(str), b: data[b].astype(str)}).pivot_table(
            index=a, columns=b, values=metric, aggfunc="max"
        )
        fig = Figure(figsize=(1.6 + 1.3 * pivot.shape[1], 1.2 + 0.6 * pivot.shape[0]))
        ax = fig.add_subplot()
        im = ax.imshow(pivot.values, cmap="viridis", aspect="auto")
        ax.set_xticks(range(pivot.shape[1]), pivot.columns, rotation=30, ha="right")
        ax.set_yticks(range(pivot.shape[0]), pivot.index)
        ax.set_xlabel(b), ax.set_ylabel(a)
        for (i, j), v in np.ndenumerate(pivot.values):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.3f}", ha="center", va="center", color="w" if v < np.nanmean(pivot.values) else "k")
        fig.colorbar(im, ax=ax, label=metric)
    else:
        a = varied[0]
        grouped = data.groupby(data[a].astype(str), sort=False)[metric].max()
        fig = Figure(figsize=(max(3.5, 0.8 * len(grouped) + 1.5), 3))
        ax = fig.add_subplot()
        ax.bar(range(len(grouped)), grouped.values, color="tab:blue")
        ax.set_xticks(range(len(grouped)), grouped.index, rotation=30 if len(grouped) > 4 else 0)
        ax.set_xlabel(a), ax.set_ylabel(metric)
        for i, v in enumerate(grouped.values):
            ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_title(title or metric)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def chosen_markdown(summary: Mapping[str, Any]) -> str:
    """A pixel sweep's outcome (its `best/summary.json`): the chosen recipe, the validation figure it was chosen on
    (the mean over the folds of the labelled images, and each fold) and the one test figure of that recipe retrained
    on all the labelled images."""
    val, test, folds = summary["val"], summary["test"], summary["val_folds"]

    def pct(v: Any) -> str:
        return f"{100 * v:.1f}" if isinstance(v, (int, float)) and math.isfinite(v) else "-"

    recipe = ", ".join(f"{k}={_short(v)}" for k, v in summary["recipe"].items())
    rows = [[f"validation: mean of {len(folds)} folds", f"{summary['num_labelled']} labelled",
             pct(val.get("val/miou")), pct(val.get("val/pixel_accuracy"))]]  # fmt: skip
    for f, ids in enumerate(folds):
        rows.append([f"fold {f}", f"{len(ids)} held out", pct(val.get(f"val/fold{f}/miou")), ""])
    rows.append([f"test (scored once, {summary['test_data']})", f"{int(test['test/num_images'])} test",
                 pct(test.get("test/miou")), pct(test.get("test/pixel_accuracy"))])  # fmt: skip
    head = f"Chosen recipe (best {summary['metric']} of {summary['num_trials']} trials): {recipe}\n\n"
    return head + markdown_table(["figure", "images", "mIoU (%)", "pixel acc (%)"], rows, ["---", *["---:"] * 3])
