"""The evaluation's tables: one Markdown table per protocol (its columns, the cells' formats) and the CSV of every
metric; `diffseg.evaluation.evaluate` writes them."""

from __future__ import annotations

import csv
import io
import math
from typing import Any

from diffseg.core.report import markdown_table

METHOD_TITLES = {
    "all_foreground": "All foreground (prior)",
    "centred_box": "Centred box (prior)",
    "grabcut": "GrabCut",
    "iem": "IEM (inpainting error maximisation)",
    "kmeans_rgb": "k-means on RGB",
    "kmeans_ddpm": "k-means on DDPM features (DatasetDDPM-unsup)",
    "factorized": "Factorized diffusion (ours)",
    "supervised": "Supervised U-Net (upper bound)",
}


def columns(protocol: str, class_names: list[str], strict: bool = True) -> list[tuple[tuple[str, ...], str]]:
    """(metric keys, header) of the table columns for a protocol; a cell shows the first key a row has."""
    if protocol == "foreground":
        cols = [(("fg_acc",), "Acc"), (("fg_iou",), "IoU"), (("fg_dice",), "DICE")]
        cols += [(("fg_iou_strict",), "IoU (fixed fg)")] if strict else []
        return cols + SHARE_COLUMNS
    cols = [
        (("miou", "hungarian_miou"), "mIoU"),
        (("hungarian_miou_per_image", "miou"), "mIoU (per-image match)"),
    ]
    cols += [((f"iou/{n}", f"hungarian_iou/{n}"), f"IoU {n}") for n in class_names]
    return cols + SHARE_COLUMNS


# Shares in [0, 1], printed as they are: image dependence (0 = a fixed layout), band share (1 = horizontal bands),
# and the ground truth's band share on the same images (the reference for the band column).
SHARE_COLUMNS = [(("dependence",), "Image dep."), (("band",), "Band"), (("gt_band",), "Band (gt)")]
SHARE_KEYS = ("dependence", "band", "gt_band")


def _cell(metrics: dict[str, float], keys: tuple[str, ...]) -> float | None:
    return next((metrics[k] for k in keys if k in metrics), None)


def format_cell(v: Any, keys: tuple[str, ...] = ()) -> str:
    """Scores in %; the image dependence (`regions.mask_image_dependence`, a share in [0, 1]) as it is."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.2f}" if set(keys) & set(SHARE_KEYS) else f"{100 * v:.1f}"


def render_markdown(rows: list[dict[str, Any]], strict: bool = True) -> str:
    """One Markdown table per protocol (the columns differ), rows grouped by data set; numbers in %."""
    out = []
    for protocol in ("foreground", "multiclass"):
        prow = [r for r in rows if r["protocol"] == protocol]
        if not prow:
            continue
        names: list[str] = []
        for r in prow:
            names += [n for n in r.get("class_names", []) if n not in names]
        cols = columns(protocol, names, strict)
        head = ["Data set", "Method", *[h for _, h in cols], "N", "s"]
        body = []
        for r in prow:
            cells = [format_cell(_cell(r["metrics"], k), k) for k, _ in cols]
            title = METHOD_TITLES.get(r["method"], r["method"])
            body.append([r["dataset"], title, *cells, str(r["num_images"]), f"{r['seconds']:.1f}"])
        out.append(
            f"**{protocol}** protocol (scores in %; image dependence: across-image variance share, 0-1; band: share of "
            "the masks' variance in their row means, 1 = horizontal bands)\n"
        )
        out.append(markdown_table(head, body, align=["---"] * 2 + ["---:"] * (len(head) - 2)))
    return "\n".join(out)


def render_csv(rows: list[dict[str, Any]]) -> str:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r["metrics"] if k not in keys]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["dataset", "protocol", "method", *keys, "num_images", "seconds"])
    for r in rows:
        vals = [r["metrics"].get(k, "") for k in keys]
        vals = ["" if isinstance(v, float) and math.isnan(v) else (f"{v:.6f}" if isinstance(v, float) else v)
                for v in vals]  # fmt: skip
        writer.writerow([r["dataset"], r["protocol"], r["method"], *vals, r["num_images"], f"{r['seconds']:.2f}"])
    return buf.getvalue()
