"""The label-count curve: seeds per cell, the summary (means, ranges, matched-seed gains), resuming, the job (slow)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from diffseg.core.tracking import TrackingConfig
from diffseg.data.datasets import DataConfig, write_synthetic_folder
from diffseg.experiments.label_count import (
    LabelCountConfig,
    advantage,
    cell_score,
    cell_seeds,
    read_cell,
    recipe_hash,
    summarize,
)
from diffseg.methods.features import FeatureConfig
from diffseg.methods.pixel_training import PixelTrainConfig
from test_extract_features import tiny_checkpoint


def _cell(count, seed, variant, score):
    return {"count": count, "seed": seed, "variant": variant, "score": score}


def test_config_checks_and_seeds_per_cell():
    cfg = LabelCountConfig(checkpoint="c.pt", seeds=(0, 1), extra_seeds=(2, 3), extra_seeds_max_count=5)
    cfg.check()
    assert cell_seeds(cfg, 5, "ddpm") == (0, 1, 2, 3)
    assert cell_seeds(cfg, 20, "ddpm") == (0, 1)  # above the cheap counts
    assert cell_seeds(cfg, 1, "supervised") == (0, 1)  # not an extra-seed method
    headline = dataclasses.replace(cfg, counts=(1, 5, 20, 50), extra_seeds_at=(20,))
    assert cell_seeds(headline, 20, "supervised") == cell_seeds(headline, 20, "ddpm") == (0, 1, 2, 3)  # every method
    assert cell_seeds(headline, 50, "ddpm") == (0, 1) and cell_seeds(headline, 5, "supervised") == (0, 1)
    assert recipe_hash(headline) == recipe_hash(cfg)  # where the seeds go changes no cell
    with pytest.raises(ValueError, match="repeat a seed"):
        LabelCountConfig(checkpoint="c.pt", seeds=(0, 1), extra_seeds=(1,)).check()
    with pytest.raises(ValueError, match="counts"):
        LabelCountConfig(checkpoint="c.pt", counts=(0, 5)).check()
    with pytest.raises(ValueError, match="metric"):
        LabelCountConfig(checkpoint="c.pt", metric="accuracy").check()
    with pytest.raises(ValueError, match="extra_seeds_variants"):
        LabelCountConfig(checkpoint="c.pt", extra_seeds_variants=("unet",)).check()
    LabelCountConfig(checkpoint="c.pt", variants=("supervised",)).check()  # extra-seed methods not run: ignored


def test_summary_means_ranges_and_matched_seed_gains():
    cells = [
        _cell(5, 0, "ddpm", 0.30), _cell(5, 1, "ddpm", 0.26), _cell(5, 2, "ddpm", 0.28),
        _cell(5, 0, "random", 0.25), _cell(5, 1, "random", 0.27),
        _cell(1, 0, "ddpm", 0.10), _cell(1, 0, "random", 0.12),
    ]  # fmt: skip
    s = summarize(cells, ["ddpm", "random"])
    assert [r["count"] for r in s] == [1, 5]
    d5 = s[1]["methods"]["ddpm"]
    assert d5["n"] == 3 and d5["mean"] == pytest.approx(28.0) and d5["min"] == pytest.approx(26.0)
    assert d5["max"] == pytest.approx(30.0) and d5["sd"] == pytest.approx(2.0)
    assert s[0]["methods"]["ddpm"]["sd"] is None  # one seed
    # gains on the seeds both methods have (0 and 1, not DDPM's seed 2): +5 and -1
    g = s[1]["gains"]["random"]
    assert g["seeds"] == [0, 1] and g["gains"] == pytest.approx([5.0, -1.0]) and g["mean"] == pytest.approx(2.0)
    assert s[0]["gains"]["random"]["mean"] == pytest.approx(-2.0)
    text = advantage(s, "random")
    assert "ahead on the mean at [5]" in text and "on every seed at no count" in text


def test_cell_score_and_recipe_guard(tmp_path):
    row = {"miou": 0.4, "miou_official": 0.35, "iou": {"background": 0.9, "horse": 0.6}}
    assert cell_score(row, "miou") == 0.4 and cell_score(row, "iou/horse") == 0.6
    with pytest.raises(KeyError, match="no class 'cat'"):
        cell_score(row, "iou/cat")
    a = LabelCountConfig(checkpoint="c.pt", train=PixelTrainConfig(seed=0))
    # counts, seeds and the ensemble seed do not change the recipe; the checkpoint and the classifier do
    assert recipe_hash(a) == recipe_hash(
        LabelCountConfig(checkpoint="c.pt", counts=(3,), train=PixelTrainConfig(seed=5))
    )
    assert recipe_hash(a) == recipe_hash(LabelCountConfig(checkpoint="c.pt", variants=("supervised",)))
    assert recipe_hash(a) == recipe_hash(LabelCountConfig(checkpoint="c.pt", compute=False))
    assert recipe_hash(a) != recipe_hash(LabelCountConfig(checkpoint="d.pt"))
    assert recipe_hash(a) != recipe_hash(LabelCountConfig(checkpoint="c.pt", test_limit=50))
    assert recipe_hash(a) != recipe_hash(LabelCountConfig(checkpoint="c.pt", train=PixelTrainConfig(members=3)))
    path = tmp_path / "cell.json"
    assert read_cell(path, "abc") is None
    path.write_text(json.dumps({"recipe_hash": "abc", "score": 0.5}))
    assert read_cell(path, "abc")["score"] == 0.5
    with pytest.raises(ValueError, match="another recipe"):
        read_cell(path, "xyz")


@pytest.mark.slow
def test_count_curve_job_table_plot_mlflow_and_resume(tmp_path, label_ray, monkeypatch):
    import mlflow

    import diffseg.experiments.label_count as lc

    root = write_synthetic_folder(tmp_path / "data", num_images=6, image_size=16)
    data = DataConfig(name="folder", root=str(root), image_size=16, num_train=3, num_test=3)
    tracking = TrackingConfig(experiment="count", uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg = LabelCountConfig(
        name="cc",
        output_dir=str(tmp_path / "out"),
        checkpoint=str(tiny_checkpoint(tmp_path / "c.pt")),
        features=FeatureConfig(blocks=("dec.1", "dec.2"), timesteps=(5, 30), batch_size=2),
        train_data=data,
        test_data=data,
        variants=("ddpm", "random", "supervised"),
        counts=(1, 3),
        seeds=(0,),
        extra_seeds=(1,),
        extra_seeds_max_count=1,
        train=PixelTrainConfig(members=2, max_epochs=2),
        supervised_steps=3,
        supervised_batch_size=2,
        device="cpu",
        tracking=tracking,
    )
    res = lc.run_label_count(cfg)
    out = tmp_path / "out" / "cc"
    # n=1: ddpm, random at seeds 0 and 1, supervised at 0; n=3: one seed each
    assert res["computed"] == 5 + 3 and res["reused"] == 0
    got = {(c["count"], c["variant"], c["seed"]) for c in res["cells"]}
    assert (1, "random", 1) in got and (1, "supervised", 1) not in got and (3, "ddpm", 1) not in got
    cells = {(c["count"], c["variant"], c["seed"]): c for c in res["cells"]}
    assert cells[(3, "ddpm", 0)]["row"]["train_pixels"] == 3 * 16 * 16  # n labelled images, all their pixels
    assert cells[(1, "ddpm", 0)]["row"]["train_pixels"] == 16 * 16
    # seeds change the ensemble (and the supervised U-Net): different seeds, different trained bundles
    for c in res["cells"]:
        assert 0.0 <= c["score"] <= 1.0 and c["score"] == pytest.approx(c["row"]["miou"])
        assert (out / "cells" / f"n{c['count']}" / f"s{c['seed']}" / c["variant"] / "metrics.json").is_file()
    assert (out / "cells" / "n1" / "s1" / "ddpm" / "segmenter.pt").is_file()
    summary = json.loads((out / "curve.json").read_text())["summary"]
    assert [r["count"] for r in summary] == [1, 3] and summary[0]["methods"]["ddpm"]["n"] == 2
    table = (out / "curve.md").read_text()
    assert "MLP ensemble on DDPM features" in table and "DDPM - supervised" in table and "minutes" in table
    assert (out / "curve.png").stat().st_size > 0
    client = mlflow.MlflowClient(tracking_uri=tracking.uri)
    runs = client.search_runs([client.get_experiment_by_name("count").experiment_id])
    names = {r.info.run_name for r in runs}
    assert "cc/n1/s1/random" in names and "cc/n3/s0/supervised" in names
    # a re-run computes nothing: every cell is reused, and the curve is the same
    monkeypatch.setattr(lc, "score_variant", lambda *a, **k: pytest.fail("a finished cell was recomputed"))
    again = lc.run_label_count(cfg)
    assert again["computed"] == 0 and again["reused"] == 8 and again["summary"] == res["summary"]
    # one more count computes only its cells
    monkeypatch.undo()
    more = lc.run_label_count(LabelCountConfig(**{**cfg.__dict__, "counts": (1, 2, 3)}))
    assert more["computed"] == 3 and more["reused"] == 8


def test_compute_false_tables_the_finished_cells_and_lists_the_rest(tmp_path):
    from diffseg.experiments.label_count import run_label_count

    root = write_synthetic_folder(tmp_path / "data", num_images=6, image_size=16)
    data = DataConfig(name="folder", root=str(root), image_size=16, num_train=3, num_test=3)
    cfg = LabelCountConfig(
        name="cc", output_dir=str(tmp_path / "out"), checkpoint=str(tiny_checkpoint(tmp_path / "c.pt")),
        train_data=data, test_data=data, variants=("ddpm", "random"), counts=(1, 2), seeds=(0,), compute=False,
        tracking=TrackingConfig(enabled=False),
    )  # fmt: skip
    cell = tmp_path / "out" / "cc" / "cells" / "n2" / "s0" / "ddpm.json"
    cell.parent.mkdir(parents=True)
    row = {"seconds": 90.0, "iterations": 40, "batch_size": 64, "machine": "cpu"}
    cell.write_text(json.dumps({"count": 2, "seed": 0, "variant": "ddpm", "recipe_hash": recipe_hash(cfg),
                                "score": 0.25, "metric": "miou", "row": row}))  # fmt: skip
    res = run_label_count(cfg)
    assert res["computed"] == 0 and res["reused"] == 1
    assert res["missing"] == ["n=1 seed=0 ddpm", "n=1 seed=0 random", "n=2 seed=0 random"]
    assert [r["count"] for r in res["summary"]] == [2] and res["summary"][0]["methods"]["ddpm"]["mean"] == 25.0
    text = (tmp_path / "out" / "cc" / "curve.md").read_text()
    assert "25.0 (1 seed)" in text and "Not computed (compute=false): 3 cells" in text and "| 1.5 |" in text
