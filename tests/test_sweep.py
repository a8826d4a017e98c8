"""Tune sweeps: search-space encoding, the feature-shard cache, and (slow) a pixel sweep that is interrupted and
resumed: DataFrame + best config, one extraction per feature recipe, nested MLflow runs, remaining trials finished,
trials scored on validation folds of the labelled images and the chosen recipe once on test (the protocol itself:
tests/test_sweep_protocol.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from diffseg.core.config import replace
from diffseg.core.report import decode, plot_sweep, trial_overrides
from diffseg.core.trust import SIGNATURE_NAME, DriverRun, UntrustedState, check_state, sign_state, trust_state
from diffseg.data.feature_cache import FeatureCache, feature_key
from diffseg.experiments.space import space_example, subsets
from diffseg.experiments.sweep import PixelTrialConfig, SweepConfig, build_param_space, expected_trials, run_sweep

REPO = Path(__file__).resolve().parents[1]


def test_param_space_round_trips_lists_and_rejects_grids_for_optuna():
    from ray import tune

    space = build_param_space(
        {"features.blocks": [["dec.1"], ["dec.2", "dec.3"]], "optim.lr": {"loguniform": [1e-4, 1e-2]}}
    )
    grid = space["features"]["blocks"]["grid_search"]
    assert all(isinstance(v, str) for v in grid)  # primitives, so any searcher accepts them
    assert [decode(v) for v in grid] == [["dec.1"], ["dec.2", "dec.3"]]
    assert isinstance(space["optim"]["lr"], tune.search.sample.Float)
    config = {"features": {"blocks": grid[1]}, "optim": {"lr": 3e-3}}
    assert trial_overrides(config, ["features.blocks", "optim.lr"]) == {
        "features.blocks": ["dec.2", "dec.3"],
        "optim.lr": 3e-3,
    }
    # optuna cannot search grids: a bare list becomes a categorical choice, an explicit grid is an error
    assert isinstance(build_param_space({"a.b": [1, 2]}, "optuna")["a"]["b"], tune.search.sample.Categorical)
    with pytest.raises(ValueError, match="optuna cannot search a grid"):
        build_param_space({"a.b": {"grid": [1, 2]}}, "optuna")
    with pytest.raises(ValueError, match="unknown sampler"):
        build_param_space({"a.b": {"normal": [0, 1]}})
    # how many trials a finished sweep has: the grid's size (2 x 3 here) times num_samples; samplers count 1
    grid = build_param_space({"a.b": [1, 2], "c": {"grid": [1, 2, 3]}, "d": {"uniform": [0, 1]}})
    assert expected_trials(grid, num_samples=2) == 12 and expected_trials(space, 1) == 2


def test_subset_spaces_enumerate_every_set_once_in_the_given_order():
    from ray import tune

    blocks = [f"dec.{i}" for i in range(6)]
    sets = subsets("features.blocks", blocks)
    assert len(sets) == 63 and len({tuple(s) for s in sets}) == 63  # every non-empty subset, once
    assert sets[:6] == [[b] for b in blocks] and sets[-1] == blocks  # the single blocks first, all six last
    assert ["dec.1", "dec.2", "dec.3", "dec.4"] in sets  # the middle blocks (the face recipe)
    assert all(s == sorted(s, key=blocks.index) for s in sets)  # in the U-Net's order: one cache key per set
    ts = subsets("features.timesteps", {"of": list(range(0, 501, 50)), "max": 3})
    assert len(ts) == 11 + 55 + 165 and max(map(len, ts)) == 3 and [0, 250, 500] in ts
    assert subsets("k", {"of": [1, 2, 3], "min": 2}) == [[1, 2], [1, 3], [2, 3], [1, 2, 3]]
    # a finite set of values like a bare list: every subset on a grid, a categorical draw for random and optuna
    grid = build_param_space({"features.blocks": {"subset": ["dec.1", "dec.2"]}}, "grid")
    assert [decode(v) for v in grid["features"]["blocks"]["grid_search"]] == [["dec.1"], ["dec.2"], ["dec.1", "dec.2"]]
    assert expected_trials(grid, 1) == 3
    spec = {"features.timesteps": {"subset": {"of": [50, 150, 250], "max": 2}}, "pixel.members": {"randint": [2, 11]},
            "pixel.hidden": {"choice": [[64, 16], [512, 256]]}}  # fmt: skip
    for search in ("random", "optuna"):
        space = build_param_space(spec, search)
        dom = space["features"]["timesteps"]
        assert isinstance(dom, tune.search.sample.Categorical) and len(dom.categories) == 6
        assert isinstance(space["pixel"]["members"], tune.search.sample.Integer)
        assert expected_trials(space, 7) == 7
    drawn = trial_overrides({"features": {"timesteps": dom.sample()}}, ["features.timesteps"])["features.timesteps"]
    assert drawn in [[50], [150], [250], [50, 150], [50, 250], [150, 250]]
    assert space_example("features.timesteps", spec["features.timesteps"]) == [50]  # what run_sweep probes
    assert space_example("pixel.members", spec["pixel.members"]) is None
    for bad, match in (
        ({"of": [1, 2], "max": 3}, "1 <= min <= max <= 2"),
        ({"of": [1, 2], "min": 0}, "1 <= min"),
        ({"of": [1, 1]}, "distinct"),
        ({"of": [1, 2], "size": 1}, "subset takes a list or"),
        ("dec.1", "subset takes a list or"),
        ({"of": list(range(40))}, "subsets \\(more than"),
    ):
        with pytest.raises(ValueError, match=match):
            build_param_space({"k": {"subset": bad}})
    with pytest.raises(ValueError, match="space.k: unknown sampler 'normal'"):
        SweepConfig(space={"k": {"normal": [0, 1]}}).check()  # --dry-run reports the space's syntax


def test_the_recipe_sweeps_search_blocks_timesteps_widths_and_members():
    """The two shipped recipe searches (issue 35.2): any block set, 1-3 timesteps of 0..500, narrower and wider
    MLPs than the paper's, 2-10 members; Optuna + ASHA on validation folds, one trial at a time on one core."""
    from diffseg.core.config import load_config
    from diffseg.experiments.sweep import apply_overrides

    for name, metric in (("sweep_celeba_recipe.yaml", "val/miou"), ("sweep_horse_recipe.yaml", "val/iou/horse")):
        cfg = load_config(SweepConfig, REPO / "jobs" / "configs" / name)
        cfg.check()
        assert cfg.task == "pixel" and cfg.metric == metric and cfg.folds == 5 and cfg.search == "optuna"
        assert cfg.scheduler.kind == "asha" and cfg.num_reports == 2 and cfg.max_concurrent_trials == 1
        assert len(subsets("b", cfg.space["features.blocks"]["subset"])) == 63
        timesteps = [t for s in subsets("t", cfg.space["features.timesteps"]["subset"]) for t in s]
        assert min(timesteps) == 0 and max(timesteps) == 500
        widths = cfg.space["pixel.hidden"]["choice"]
        assert [128, 32] in widths and [256, 128] in widths and min(widths) < [128, 32] and max(widths) > [256, 128]
        base = apply_overrides(PixelTrialConfig(), cfg.base_overrides)
        assert (REPO / base.features.backbone).is_file() and base.data.num_train == 20 and base.data.num_test == 0
        assert base.test_data.root == base.data.root and base.test_data.num_train >= 150  # test ids after the labels


def test_feature_key_ignores_classifier_and_batching_but_not_recipe(tmp_path):
    base = PixelTrialConfig()
    key = feature_key(base.features, base.data)
    assert feature_key(replace(base, **{"features.batch_size": 32}).features, base.data) == key
    assert feature_key(replace(base, **{"features.timesteps": [50]}).features, base.data) != key
    assert feature_key(base.features, replace(base, **{"data.num_train": 3}).data) != key
    ckpt = tmp_path / "ddpm.pt"
    ckpt.write_bytes(b"1")
    k1 = feature_key(replace(base, **{"features.backbone": str(ckpt)}).features, base.data)
    os.utime(ckpt, ns=(1, 1))  # a retrained checkpoint at the same path is a different backbone
    assert feature_key(replace(base, **{"features.backbone": str(ckpt)}).features, base.data) != k1


def test_feature_cache_builds_once_under_concurrency_and_ignores_torn_entries(tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    builds = []

    def build(d: Path) -> None:
        builds.append(d)
        time.sleep(0.2)  # long enough for the other threads to arrive while this one builds
        (d / "train").mkdir(parents=True)
        (d / "train" / "x.parquet").write_text("x")

    key = {"features": {"blocks": ["dec.1"]}}
    torn = cache.path(key)
    torn.mkdir(parents=True)  # a killed builder's leftovers: no _SUCCESS marker
    out = []
    threads = [threading.Thread(target=lambda: out.append(cache.get(key, build))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and len(set(out)) == 1
    assert (out[0] / "_SUCCESS").is_file() and (out[0] / "train" / "x.parquet").is_file()
    assert json.loads((out[0] / "key.json").read_text()) == key
    assert sorted(e["event"] for e in cache.events()) == ["build", "hit", "hit", "hit"]
    assert not list(cache.root.glob(".*.tmp-*"))  # no temp folders left behind


def test_plot_sweep_heatmap_and_bars(tmp_path):
    """The heatmap has one cell per (blocks, timesteps) pair, coloured by the metric; the bars follow the values."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    df = pd.DataFrame(
        {
            "features.blocks": ["dec.1", "dec.1", "dec.2", "dec.2"],
            "features.timesteps": ["50", "250", "50", "250"],
            "test/miou": [0.1, 0.2, 0.3, 0.4],
        }  # fmt: skip
    )
    keys = ["features.blocks", "features.timesteps"]
    heat = np.asarray(Image.open(plot_sweep(df, keys, "test/miou", tmp_path / "heat.png")).convert("RGB"))
    bars = np.asarray(Image.open(plot_sweep(df, keys[:1], "test/miou", tmp_path / "bars.png")).convert("RGB"))
    assert heat.shape[0] > 100 and heat.shape[1] > 150 and bars.shape[0] > 100
    # four viridis cells of four different values: at least four distinct strongly coloured pixel values
    coloured = heat.reshape(-1, 3)[np.ptp(heat.reshape(-1, 3).astype(int), axis=1) > 60]
    assert len(np.unique(coloured, axis=0)) >= 4
    # other values make another picture: the plot shows the data, not a fixed frame
    flipped = df.assign(**{"test/miou": df["test/miou"][::-1].to_numpy()})
    heat2 = np.asarray(Image.open(plot_sweep(flipped, keys, "test/miou", tmp_path / "heat2.png")).convert("RGB"))
    assert heat2.shape == heat.shape and not np.array_equal(heat2, heat)
    # a sampled search (30 block sets x 30 timestep sets): the best 20 trials ranked, not a 30 x 30 heatmap
    many = pd.DataFrame(
        {
            "features.blocks": [f"dec.{i % 6},dec.{i}" for i in range(30)],
            "features.timesteps": [str(i) for i in range(30)],
            "val/miou": np.linspace(0.5, 0.1, 30),
        }  # fmt: skip
    )
    ranked = np.asarray(Image.open(plot_sweep(many, keys, "val/miou", tmp_path / "ranked.png")).convert("RGB"))
    assert ranked.shape[1] < 1200 and ranked.shape[0] > 400  # 8 inches wide, one bar per trial shown


def test_sweep_yaml_specs_load():
    from diffseg.core.config import load_config

    for name, split in (("sweep_k_tiny.yaml", "test/"), ("sweep_blocks_tiny.yaml", "val/")):
        cfg = load_config(SweepConfig, REPO / "jobs" / "configs" / name)
        assert cfg.space and cfg.metric.startswith(split)


# ---------------------------------------------------------------------------------------------------- slow
def _tiny_backbone(path: Path) -> str:
    """A randomly initialised 16 px DDPM checkpoint: the plumbing, not the quality, is under test here."""
    from diffseg.models.builder import build_model
    from diffseg.models.checkpoint import save_checkpoint
    from diffseg.training.ray_train import TrainConfig

    tc = replace(TrainConfig(), **{"model.unet.image_size": 16, "model.unet.model_channels": 16,
                                   "model.unet.channel_mult": [1, 2], "model.unet.attention_resolutions": [],
                                   "model.unet.num_res_blocks": 1})  # fmt: skip
    model = build_model(tc.model)
    save_checkpoint(path, config=tc, model=model, ema=model, optimizer=None, step=0, extra={})
    return str(path)


def _finished_trials(exp_dir: Path) -> int:
    return sum(1 for p in exp_dir.glob("trial_*/result.json") if p.stat().st_size > 0)


@pytest.mark.slow
def test_pixel_sweep_interrupted_then_resumed(tmp_path):
    """One sweep, 2 feature recipes x 2 MLP sizes, run one trial at a time as `jobs/sweep.py`; SIGINT after the
    first trial, then `--resume`: every trial ends exactly once, shards are extracted once per recipe, and every
    trial is an MLflow run nested under the sweep's run, which holds the table and the plot. Trials report the
    validation figure of 2 folds over the 4 labelled images only; the chosen recipe is then scored once on the 2 test
    images, and the summary, results.md and the sweep's run show both figures."""
    backbone = _tiny_backbone(tmp_path / "ddpm.pt")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = {
        "name": "px",
        "task": "pixel",
        "base_overrides": {
            "features": {"backbone": backbone, "timesteps": [50]},
            "data": {"image_size": 16, "num_images": 8, "num_train": 4, "num_test": 2},
            # ~1600 iterations (2 folds x 800): a trial lasts seconds, so the interruption lands between trials
            "pixel": {"members": 2, "batch_size": 16, "max_epochs": 25},
        },
        "space": {"features.blocks": [["dec.1"], ["dec.2", "dec.3"]], "pixel.hidden": [[8], [16, 8]]},
        "metric": "val/miou",
        "folds": 2,
        "max_concurrent_trials": 1,
        "output_dir": str(tmp_path / "sweeps"),
        "tracking": {"uri": uri, "experiment": "sweep-test"},
    }
    spec_path = tmp_path / "sweep.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "PYTHONPATH": str(REPO / "platform")}
    env.pop("RAY_ADDRESS", None)  # a local cluster of its own
    cmd = [sys.executable, str(REPO / "jobs" / "sweep.py"), "--config", str(spec_path)]
    exp_dir = tmp_path / "sweeps" / "px"

    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while _finished_trials(exp_dir) < 1 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, f"the sweep ended before it could be interrupted:\n{proc.stdout.read()[-3000:]}"
    # the attack of issue 29: a state file planted while the sweep runs, whose name sorts after Tune's own
    planted, marker = exp_dir / "experiment_state-2099-01-01_00-00-00.json", tmp_path / "code-ran"
    _plant(planted, marker)
    proc.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves its state and returns
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "resume=True" in out, out[-3000:]
    assert (exp_dir / SIGNATURE_NAME).is_file()  # the interrupted driver signed Tune's state: resume may trust it
    signed = json.loads((exp_dir / SIGNATURE_NAME).read_text())["files"]
    assert planted.name not in signed and any(n.startswith("experiment_state-20") for n in signed), signed
    refused = subprocess.run(cmd + ["--resume"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and f"['{planted.name}'] are not covered by the signature" in refused.stderr, (
        refused.stdout + refused.stderr
    )[-3000:]
    assert not marker.exists()  # nothing was unpickled
    planted.unlink()  # the user removes what they did not write; the sweep's own state resumes
    interrupted_events = FeatureCache(tmp_path / "sweeps" / "feature_cache").events()
    assert 1 <= len(interrupted_events) < 4

    done = subprocess.run(cmd + ["--resume"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    check_state(exp_dir)  # the resumed run signed everything it wrote, and left the first run's state signed

    import pandas as pd

    table = pd.read_csv(exp_dir / "results.csv")
    assert len(table) == 4 and set(table["status"]) == {"DONE"} and table["val/miou"].notna().all()
    assert table["val/miou"].is_monotonic_decreasing  # best first
    assert {"features.blocks", "pixel.hidden", "train/loss", "time/features_s", "val/fold0/miou",
            "val/fold1/miou"} <= set(table.columns)  # fmt: skip
    assert not [c for c in table.columns if c.startswith("test/")]  # no trial scored a test image
    best = yaml.safe_load((exp_dir / "best_config.yaml").read_text())
    assert ",".join(best["features"]["blocks"]) == table["features.blocks"][0]
    for trial in exp_dir.glob("trials/*/folds.json"):  # each trial's folds: the labelled ids 0-3 only
        folds = json.loads(trial.read_text())
        assert sorted(i for v in folds["scored"] for i in v) == ["000000", "000001", "000002", "000003"]

    # The chosen recipe (the best on validation), trained on the 4 labelled images and scored once on the 2 test
    # images: both figures in best/summary.json, results.md and the log.
    summary = json.loads((exp_dir / "best" / "summary.json").read_text())
    assert summary["val"]["val/miou"] == pytest.approx(table["val/miou"][0])
    assert summary["recipe"]["features.blocks"] == best["features"]["blocks"]
    assert summary["labelled_ids"] == ["000000", "000001", "000002", "000003"]
    assert summary["test_ids"] == ["000004", "000005"] and summary["test"]["test/num_images"] == 2
    assert 0 <= summary["test"]["test/miou"] <= 1
    results_md = (exp_dir / "results.md").read_text()
    assert "validation: mean of 2 folds" in results_md and "test (scored once, synthetic)" in results_md
    assert "chosen recipe: val/miou" in done.stdout + done.stderr and "-> test/miou" in done.stdout + done.stderr

    # Shards: extracted once per recipe (2 builds), reused by the trials that only change the MLP and by the chosen
    # recipe's test scoring (one hit). Trials finished before the interruption were not run again: one cache access
    # per trial, plus one for the single trial that was running at the interruption (it had not reported yet, so it
    # restarts).
    events = [e["event"] for e in FeatureCache(tmp_path / "sweeps" / "feature_cache").events()]
    assert events.count("build") == 2 and len(events) in (5, 6)

    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("sweep-test")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
    assert all(r.info.status == "FINISHED" and "val/miou" in r.data.metrics for r in children)
    assert not [k for r in children for k in r.data.metrics if k.startswith("test/")]
    assert {r.data.params["features.blocks"] for r in children} == {"['dec.1']", "['dec.2', 'dec.3']"}
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best/val/miou"] == pytest.approx(summary["val"]["val/miou"])
    assert parent.data.metrics["test/miou"] == pytest.approx(summary["test"]["test/miou"])
    # issue 37.7: the data sets each run read (the UI's Dataset column): trials their training images only
    contexts = [{i.tags[0].value for i in r.inputs.dataset_inputs} for r in children]
    assert contexts == [{"training"}] * 4, contexts
    # the sweep's run: its data (the labelled and, as its test split, the test images; a test_data is logged apart)
    assert {i.tags[0].value for i in parent.inputs.dataset_inputs} == {"training"}
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.csv", "results.md", "results.png", "best_config.yaml", "best"} <= artifacts
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "best")} >= {"best/summary.json"}

    # The sweep's model is served without conversion: Serve's pixel replica loads best/segmenter.pt as it is, and
    # that very bundle (the chosen recipe's refit) scores exactly the test mIoU of the summary.
    from diffseg.data.datasets import DataConfig, build_dataset
    from diffseg.evaluation.evaluate import evaluate_segmenter
    from diffseg.methods.pixel import PixelSegmenter
    from diffseg.serving.wrappers import PixelEnsembleSegmenter

    best_model = exp_dir / "best" / "segmenter.pt"
    served = PixelEnsembleSegmenter.load(str(best_model), device="cpu")
    assert served.info()["class_names"] == PixelSegmenter.load(best_model, "cpu").class_names
    test = build_dataset(DataConfig(image_size=16, num_images=8, num_train=4, num_test=2), "test")
    scored = evaluate_segmenter(served.bundle, test).metrics["test/miou"]
    assert scored == pytest.approx(summary["test"]["test/miou"], abs=1e-9)
    x = torch.stack([test[i]["image"] for i in range(2)]).numpy()
    answers = served.segment(x, [0, 0], [0, 0])
    labels, _ = served.bundle.predict(torch.from_numpy(x))
    assert all(np.array_equal(a["labels"], labels[i]) for i, a in enumerate(answers))


@pytest.mark.slow
def test_a_recipe_search_with_optuna_and_asha_resumes_with_the_same_command(tmp_path):
    """The recipe search of issue 35.2 at toy size: block and timestep subsets, MLP widths and ensemble sizes drawn
    by Optuna, ASHA stopping trials after their first report; interrupted after the first trial and resumed with
    `--resume`: every trial ends once, values stay in the space, features are extracted once per (blocks,
    timesteps) and the chosen recipe is scored once on test."""
    backbone = _tiny_backbone(tmp_path / "ddpm.pt")
    blocks, steps = ["dec.1", "dec.2", "dec.3"], [0, 100, 250, 500]
    spec = {
        "name": "search",
        "task": "pixel",
        "base_overrides": {
            "features": {"backbone": backbone},
            "data": {"image_size": 16, "num_images": 8, "num_train": 4, "num_test": 2},
            "pixel": {"batch_size": 16, "max_epochs": 16},
        },
        "space": {
            "features.blocks": {"subset": blocks},
            "features.timesteps": {"subset": {"of": steps, "max": 2}},
            "pixel.hidden": {"choice": [[8], [16, 8]]},
            "pixel.members": {"randint": [1, 4]},
        },
        "search": "optuna",
        "num_samples": 4,
        "num_reports": 2,
        "scheduler": {"kind": "asha"},
        "metric": "val/miou",
        "folds": 2,
        "max_concurrent_trials": 1,
        "output_dir": str(tmp_path / "sweeps"),
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "search-test"},
    }
    spec_path = tmp_path / "search.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "PYTHONPATH": str(REPO / "platform")}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, str(REPO / "jobs" / "sweep.py"), "--config", str(spec_path)]
    exp_dir = tmp_path / "sweeps" / "search"
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while _finished_trials(exp_dir) < 1 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, f"the sweep ended before it could be interrupted:\n{proc.stdout.read()[-3000:]}"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "resume=True" in out, out[-3000:]
    assert any(exp_dir.glob("searcher-state-*.pkl"))  # Optuna's study is part of the state a resume restores

    done = subprocess.run(cmd + ["--resume"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    import pandas as pd

    table = pd.read_csv(
        exp_dir / "results.csv", dtype={"features.blocks": str, "features.timesteps": str, "pixel.hidden": str}
    )
    assert len(table) == 4 and set(table["status"]) <= {"DONE", "STOPPED"} and table["val/miou"].notna().all()
    assert set(table["reports"]) <= {1, 2} and (table["reports"] == 2).any()
    for _, row in table.iterrows():  # every drawn value is in the space
        chosen_blocks, chosen_steps = (
            row["features.blocks"].split(","),
            [int(t) for t in row["features.timesteps"].split(",")],
        )
        assert chosen_blocks == sorted(set(chosen_blocks), key=blocks.index) and set(chosen_blocks) <= set(blocks)
        assert (
            1 <= len(chosen_steps) <= 2
            and chosen_steps == sorted(set(chosen_steps))
            and set(chosen_steps) <= set(steps)
        )
        assert row["pixel.hidden"] in ("8", "16,8") and 1 <= row["pixel.members"] <= 3
    recipes = {(r["features.blocks"], r["features.timesteps"]) for _, r in table.iterrows()}
    events = [e["event"] for e in FeatureCache(tmp_path / "sweeps" / "feature_cache").events()]
    assert events.count("build") == len(recipes)  # one extraction per (blocks, timesteps), whatever the MLP
    summary = json.loads((exp_dir / "best" / "summary.json").read_text())
    best = yaml.safe_load((exp_dir / "best_config.yaml").read_text())
    assert summary["recipe"]["features.blocks"] == best["features"]["blocks"] and summary["num_trials"] == 4
    assert summary["val"]["val/miou"] == pytest.approx(table["val/miou"][0])
    assert best["pixel"]["members"] == summary["recipe"]["pixel.members"]
    assert summary["test_ids"] == ["000004", "000005"] and 0 <= summary["test"]["test/miou"] <= 1
    assert (exp_dir / "results.png").is_file()


def test_base_overrides_merge_and_searchers():
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from diffseg.experiments.sweep import _scheduler, _search_alg, apply_overrides

    base = PixelTrialConfig()
    cfg = apply_overrides(
        base,
        {"data": {"num_train": 3}, "pixel.members": 2, "test_data": {"name": "folder", "root": "/x", "num_test": 5}},
    )
    assert cfg.data.num_train == 3 and cfg.data.num_test == base.data.num_test  # merged key by key, not replaced
    assert cfg.pixel == {"members": 2} and cfg.test_data.root == "/x" and cfg.test_data.num_test == 5
    sweep = replace(SweepConfig(), num_reports=4, search="optuna", **{"scheduler.kind": "asha"})
    assert isinstance(_scheduler(sweep), ASHAScheduler) and _scheduler(SweepConfig()) is None
    assert isinstance(_search_alg(sweep), OptunaSearch)


# ---------------------------------------------------------------------------------------------------- trust
class _Boom:
    """Unpickling this touches a marker file: the stand-in for code an attacker plants in a sweep folder."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _planted_sweep(tmp_path):
    import pickle

    exp = tmp_path / "sweeps" / "victim"
    exp.mkdir(parents=True)
    marker = tmp_path / "code-ran"
    (exp / "tuner.pkl").write_bytes(pickle.dumps(_Boom(marker)))
    (exp / "sweep.json").write_text(json.dumps({"parent_run_id": None}))
    return exp, marker


def test_crafted_tuner_pkl_is_refused_and_nothing_runs(tmp_path):
    """A sweep folder someone else wrote (or a copy from a shared bucket) is never unpickled by `resume`."""
    import pickle

    exp, marker = _planted_sweep(tmp_path)
    base = PixelTrialConfig()
    with pytest.raises(UntrustedState, match=r"refusing to restore .* not signed"):
        run_sweep(base, {"pixel.lr": [1e-3]}, name="victim", output_dir=str(tmp_path / "sweeps"), resume=True,
                  **{"tracking.enabled": False})  # fmt: skip
    assert not marker.exists()  # nothing was unpickled
    # a signature made with another user's key is refused just the same
    sign_state(exp)
    os.environ["DIFFSEG_STATE_KEY"], own = str(tmp_path / "other.key"), os.environ["DIFFSEG_STATE_KEY"]
    try:
        sign_state(exp)  # "another user" signs with their key
    finally:
        os.environ["DIFFSEG_STATE_KEY"] = own
    with pytest.raises(UntrustedState, match="not made with your state key"):
        check_state(exp)
    assert not marker.exists()
    pickle.loads((exp / "tuner.pkl").read_bytes())  # control: the payload is live, so the test could fail
    assert marker.exists()


def test_state_signature_catches_changes_and_permissions(tmp_path):
    exp, _ = _planted_sweep(tmp_path)
    (exp / "trial_1").mkdir()
    (exp / "trial_1" / "error.pkl").write_bytes(b"x")
    sign_state(exp)
    check_state(exp)  # signed by this user, unchanged: trusted
    (exp / "trial_1" / "error.pkl").write_bytes(b"y")
    with pytest.raises(UntrustedState, match=r"\['trial_1/error.pkl'\] changed after the state was signed"):
        check_state(exp)
    sign_state(exp)
    (exp / "searcher-state-x.pkl").write_bytes(b"z")
    with pytest.raises(UntrustedState, match=r"searcher-state-x.pkl'\] are not covered by the signature"):
        check_state(exp)
    (exp / "searcher-state-x.pkl").unlink()
    check_state(exp)
    os.chmod(exp / "tuner.pkl", 0o664)
    with pytest.raises(UntrustedState, match=r"tuner.pkl: a file Tune restores from can be written by other users"):
        check_state(exp)
    os.chmod(exp / "tuner.pkl", 0o644)
    os.chmod(exp, 0o777)
    with pytest.raises(UntrustedState, match="the sweep folder can be written by other users"):
        check_state(exp)
    os.chmod(exp, 0o755)
    key = Path(os.environ["DIFFSEG_STATE_KEY"])
    os.chmod(key, 0o644)
    try:
        with pytest.raises(UntrustedState, match="state key is accessible to other users"):
            check_state(exp)
    finally:
        os.chmod(key, 0o600)
    (exp / SIGNATURE_NAME).unlink()
    assert trust_state(exp) == ["sweep.json", "trial_1/error.pkl", "tuner.pkl"]  # the explicit vouch
    check_state(exp)


def _stamp(t: float | None = None) -> str:
    """A Tune session stamp (`TuneController._session_str`: local time, to the second)."""
    from datetime import datetime

    return datetime.fromtimestamp(time.time() if t is None else t).strftime("%Y-%m-%d_%H-%M-%S")


def _tune_writes(exp: Path, trial: str = "trial_1") -> str:
    """What a Tune run writes into the experiment folder (the names of Ray 2.60), under this second's stamp."""
    import pickle

    stamp = _stamp()
    (exp / "tuner.pkl").write_bytes(pickle.dumps({"tuner": stamp}))
    (exp / f"experiment_state-{stamp}.json").write_text(json.dumps({"trial_data": [], "at": stamp}))
    (exp / f"basic-variant-state-{stamp}.json").write_text(json.dumps({"at": stamp}))
    (exp / trial).mkdir(exist_ok=True)
    (exp / trial / "params.pkl").write_bytes(pickle.dumps({"lr": 1e-3}))
    (exp / "sweep.json").write_text(json.dumps({"parent_run_id": None}))
    return stamp


def _plant(path: Path, marker: Path) -> None:
    """The attacker's state file: a cloudpickle payload, as Tune's experiment state holds (running it touches
    `marker`)."""
    import cloudpickle

    path.write_bytes(cloudpickle.dumps(_Boom(marker)))


@pytest.mark.parametrize(
    "planted", ["experiment_state-2099-01-01_00-00-00.json", "searcher-state-2099-01-01_00-00-00.pkl"]
)
def test_state_planted_before_a_sweep_is_not_signed_and_refuses_the_resume(tmp_path, planted):
    """The report's attack: a state file planted in the folder before the first run was signed with Tune's when the
    driver stopped, and `--resume` unpickled it (Tune restores the experiment state, and the searcher state, whose
    name sorts last). Now the driver signs only what its run wrote, so the resume is refused, naming the file."""
    exp = tmp_path / "sweeps" / "victim"
    exp.mkdir(parents=True)
    marker = tmp_path / "code-ran"
    _plant(exp / planted, marker)
    run = DriverRun(exp, own=("sweep.json",))  # the run starts: whatever is there is not its own
    _tune_writes(exp)
    run.sign()  # the driver stops (as it does on finish, Ctrl-C or failure)
    with pytest.raises(UntrustedState, match=rf"\['{planted}'\] are not covered by the signature"):
        check_state(exp)
    assert not marker.exists()
    # and `run_sweep` no longer starts a sweep in such a folder at all (before Ray or Tune are touched)
    fresh = tmp_path / "sweeps" / "fresh"
    fresh.mkdir()
    _plant(fresh / planted, marker)
    with pytest.raises(UntrustedState, match=rf"a new sweep does not start .*{planted}"):
        run_sweep(PixelTrialConfig(), {"pixel.lr": [1e-3]}, name="fresh", output_dir=str(tmp_path / "sweeps"),
                  **{"tracking.enabled": False})  # fmt: skip
    assert not marker.exists()


def test_state_planted_during_the_run_is_not_signed(tmp_path):
    """A file planted while the sweep runs: not Tune's session stamp (2099), or a second stamp beside Tune's own, or
    a name Tune does not write; none of them is signed, and the resume is refused."""
    exp = tmp_path / "victim"
    exp.mkdir()
    marker = tmp_path / "code-ran"
    run = DriverRun(exp, own=("sweep.json",))
    stamp = _tune_writes(exp)
    _plant(exp / "experiment_state-2099-01-01_00-00-00.json", marker)  # during the run
    files, left_out = run.written()
    assert left_out == ["experiment_state-2099-01-01_00-00-00.json"]
    assert f"experiment_state-{stamp}.json" in files and "trial_1/params.pkl" in files
    run.sign()
    with pytest.raises(UntrustedState, match=r"experiment_state-2099-01-01_00-00-00.json'\] are not covered"):
        check_state(exp)
    (exp / "experiment_state-2099-01-01_00-00-00.json").unlink()
    check_state(exp)  # what the run wrote itself is trusted
    # a planted file with a plausible stamp of this second, beside Tune's: two sessions, so neither is signed
    run = DriverRun(exp, trusted=check_state(exp), own=("sweep.json",))
    other = _stamp(time.time() - 1)  # within the run's window, but not the session Tune starts below
    _plant(exp / f"searcher-state-{other}.pkl", marker)
    time.sleep(1.1)  # the resumed run's own session (a new stamp)
    new_stamp = _tune_writes(exp, "trial_2")
    files, left_out = run.written()
    assert f"searcher-state-{other}.pkl" in left_out and f"experiment_state-{new_stamp}.json" in left_out
    # a name Tune does not write into a trial folder
    _plant(exp / "trial_2" / "evil.pkl", marker)
    (exp / "trial_2" / "deeper").mkdir()
    _plant(exp / "trial_2" / "deeper" / "params.pkl", marker)  # nor one below a trial's folder
    assert {"trial_2/evil.pkl", "trial_2/deeper/params.pkl"} <= set(run.written()[1])
    assert not marker.exists()


def test_a_resumed_run_keeps_what_the_first_run_signed(tmp_path):
    """Nothing the driver wrote is refused: a run, a resume with its own session, and a second resume."""
    exp = tmp_path / "sweep"
    exp.mkdir()
    run = DriverRun(exp, own=("sweep.json",))
    first = _tune_writes(exp)
    run.sign()
    time.sleep(1.1)
    run = DriverRun(exp, trusted=check_state(exp), own=("sweep.json",))
    second = _tune_writes(exp, "trial_2")
    run.sign()
    signed = set(check_state(exp))
    assert {f"experiment_state-{first}.json", f"experiment_state-{second}.json", "trial_1/params.pkl",
            "trial_2/params.pkl", "tuner.pkl", "sweep.json"} <= signed  # fmt: skip


def test_trust_state_from_the_command_line(tmp_path, capsys):
    """`jobs/sweep.py --trust-state` signs the named sweep folder and exits (a missing folder is a clear error, not a
    traceback); afterwards the folder passes the check a resume makes."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sweep_job", REPO / "jobs" / "sweep.py")
    sweep_job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep_job)
    args = ["--config", "sweep_k_tiny.yaml", f"output_dir={tmp_path}", "name=killed", "--trust-state"]
    with pytest.raises(SystemExit) as exit_info:
        sweep_job.main(args)
    assert exit_info.value.code == 1  # a user error: one line on stderr, no traceback
    err = capsys.readouterr().err
    assert "killed is no sweep folder to sign" in err and "Traceback" not in err
    exp = tmp_path / "killed"
    exp.mkdir(mode=0o700)
    (exp / "tuner.pkl").write_bytes(b"state a killed driver left")
    with pytest.raises(UntrustedState, match="not signed"):
        check_state(exp)
    assert sweep_job.main(args) is None and (exp / SIGNATURE_NAME).is_file()
    check_state(exp)


@pytest.mark.parametrize("resume", [True, False])
def test_a_tuner_pkl_planted_while_ray_starts_is_never_restored(tmp_path, monkeypatch, resume):
    """Issue 36.1: the file planted at the moment that matters, after the trust check and while Ray starts (5.5 s on
    this machine), in a folder that passed every check. The sweep stops before Tune reads the folder, with or without
    --resume (wrappers pass it on a first run too), and nothing is unpickled."""
    import pickle

    import diffseg.experiments.sweep as sweep_module

    out = tmp_path / "sweeps"
    exp = out / "race1"
    exp.mkdir(parents=True, mode=0o700)
    marker = tmp_path / "code-ran"

    def plant_then_start(*args, **kwargs):
        (exp / "tuner.pkl").write_bytes(pickle.dumps(_Boom(marker)))

    monkeypatch.setattr(sweep_module, "init_ray", plant_then_start)
    with pytest.raises(UntrustedState, match=r"tuner.pkl'\] appeared or changed while the sweep was starting"):
        run_sweep(PixelTrialConfig(), {"pixel.lr": [1e-3]}, name="race1", output_dir=str(out), resume=resume,
                  **{"tracking.enabled": False})  # fmt: skip
    assert not marker.exists()
    pickle.loads((exp / "tuner.pkl").read_bytes())  # control: the payload is live
    assert marker.exists()


def test_a_sweep_folder_others_can_write_is_refused_even_for_a_first_run(tmp_path, monkeypatch):
    """A fresh start in a folder others can write (where they could plant state during the run) is refused before Ray
    starts, as a resume from it is."""
    import diffseg.experiments.sweep as sweep_module

    out = tmp_path / "sweeps"
    (out / "open").mkdir(parents=True)
    os.chmod(out / "open", 0o777)
    started = []
    monkeypatch.setattr(sweep_module, "init_ray", lambda *a, **k: started.append(1))
    with pytest.raises(UntrustedState, match="can be written by other users"):
        run_sweep(PixelTrialConfig(), {"pixel.lr": [1e-3]}, name="open", output_dir=str(out), resume=True,
                  **{"tracking.enabled": False})  # fmt: skip
    assert not started


def test_tunes_stop_signal_is_seen_even_when_every_trial_ended():
    """Issue 37.3: Ctrl-C in a terminal also reaches the trials' processes, so every trial may end and the grid
    looks finished: the sweep exited 0 and published a half-trained "best". The driver now watches Tune's own stop
    warning, and an interrupted sweep is a KeyboardInterrupt (a job: one line, status 130, no best)."""
    import logging

    from diffseg.experiments.sweep import SweepInterrupted, TuneStopSignal

    with TuneStopSignal() as quiet:
        logging.getLogger("ray.tune.tune").warning("Total run time: 3.00 seconds")
    with TuneStopSignal() as stopped:
        logging.getLogger("ray.tune.tune").warning(
            "Stop signal received (e.g. via SIGINT/Ctrl+C), ending Ray Tune run. This will try to checkpoint ..."
        )
    assert not quiet.seen and stopped.seen
    assert not [h for h in logging.getLogger("ray.tune.tune").handlers if isinstance(h, TuneStopSignal)]  # removed
    assert issubclass(SweepInterrupted, KeyboardInterrupt)
