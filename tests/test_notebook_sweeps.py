"""notebooks/tune_sweeps.ipynb runs end to end (nbclient, this venv's Python as the kernel) and leaves its results."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tune_sweeps_notebook_executes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    out = tmp_path / "out"
    monkeypatch.setenv("DIFFSEG_NOTEBOOK_OUT", str(out))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # its own local cluster
    monkeypatch.delenv("DIFFSEG_SAVE_DOCS", raising=False)  # never rewrite the committed figure from a test
    # A kernel spec for exactly this interpreter (found through JUPYTER_PATH), so the notebook imports what the
    # tests import.
    spec_dir = tmp_path / "jupyter" / "kernels" / "diffseg-test"
    spec_dir.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec_dir / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "diffseg", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))

    nb = nbformat.read(REPO / "notebooks" / "tune_sweeps.ipynb", as_version=4)
    # committed with its outputs, so its tables and plots read without running it; executed from scratch below
    committed = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in committed), "commit the notebook with its outputs"
    assert any("text/html" in o.get("data", {}) for o in committed), "commit the notebook with its tables"
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = nbclient.NotebookClient(
        nb,
        timeout=600,
        kernel_name="diffseg-test",
        resources={"metadata": {"path": str(REPO / "notebooks")}},
    )
    client.execute()

    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    images = [
        o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if "image/png" in o.get("data", {})
    ]
    assert images, "the results figure was not displayed"
    import numpy as np
    import pandas as pd
    from PIL import Image

    # the figure: a heatmap of 6 recipes beside 3 bars, drawn from the sweeps' values (not a blank frame)
    figure = np.asarray(Image.open(out / "sweep_result.png").convert("RGB"))
    assert figure.shape[0] > 250 and figure.shape[1] > 800
    colours = figure.reshape(-1, 3).astype(int)
    assert len(np.unique(colours[np.ptp(colours, axis=1) > 60], axis=0)) >= 4
    for name, trials in (("blocks_x_timesteps", 6), ("mlp_size", 3), ("k", 3)):
        table = pd.read_csv(out / "sweeps" / name / "results.csv")
        assert len(table) == trials and set(table["status"]) == {"DONE"}, (name, table)
        plot = np.asarray(Image.open(out / "sweeps" / name / "results.png").convert("RGB")).reshape(-1, 3).astype(int)
        assert (np.ptp(plot, axis=1) > 60).sum() > 100, name  # bars or cells were drawn
        assert (out / "sweeps" / name / "best").is_dir()  # the best trial's servable model
    # one extraction per (blocks, timesteps) pair; the MLP-size sweep and each sweep's one test scoring of its chosen
    # recipe only hit the cache (3 + 2)
    events = [json.loads(line)["event"] for line in (out / "sweeps" / "feature_cache" / "events.jsonl").open()]
    assert events.count("build") == 6 and events.count("hit") == 5
    for name in ("blocks_x_timesteps", "mlp_size"):  # trials on validation folds; the chosen recipe once on test
        summary = json.loads((out / "sweeps" / name / "best" / "summary.json").read_text())
        assert "val/miou" in summary["val"] and "test/miou" in summary["test"], name
        assert not set(summary["test_ids"]) & set(summary["labelled_ids"]), name
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.output_type == "stream")
    assert "3 nested trial runs" in text and "6 nested trial runs" in text
