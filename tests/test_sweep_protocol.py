"""Validation without test images (issue 35): a pixel sweep's trials score k folds of the labelled images, from one
extraction of them, and never a test image; only the chosen recipe is scored, once, on test. A config that would let
test images choose the recipe is refused, naming the key. CPU, no Ray (the sweep end to end: tests/test_sweep.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import diffseg.experiments.sweep as sweep_module
import diffseg.experiments.trials as trials
from diffseg.core.config import ConfigError, load_config, replace
from diffseg.data.datasets import DataConfig, build_dataset, item_ids, write_synthetic_folder
from diffseg.evaluation.evaluate import evaluate_pixel_rows, evaluate_segmenter
from diffseg.experiments.sweep import SweepConfig, run_sweep
from diffseg.experiments.trials import (
    PixelTrialConfig,
    TrialState,
    check_pixel_protocol,
    fold_split,
    labelled_shards,
    pixel_chunks,
)

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def _tiny(**changes) -> PixelTrialConfig:
    """Raw-RGB features of 16 px synthetic scenes: 8 labelled (ids 0-7), 8 test (ids 8-15); a 2-member ensemble."""
    base = {"features.backbone": "rgb", "data.image_size": 16, "data.num_images": 24, "data.num_train": 8,
            "data.num_test": 8, "pixel": {"members": 2, "max_epochs": 2, "max_iterations": 40}}  # fmt: skip
    return replace(PixelTrialConfig(), **{**base, **changes})


def _sweep_job():
    spec = importlib.util.spec_from_file_location("sweep_job", REPO / "jobs" / "sweep.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


@pytest.fixture
def no_ray(monkeypatch):
    """Refusals happen before Ray starts: starting it fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(sweep_module, "init_ray", refuse)


# ---------------------------------------------------------------------------------------------------- (a) refusals
def test_a_pixel_sweep_config_whose_metric_names_test_images_is_refused(capsys):
    """The old celeba config scored its trials on test/miou: from the command line that is a one-line config error
    (status 2) naming the key, and the shipped configs now pass."""
    job = _sweep_job()
    for name in ("sweep_celeba_blocks.yaml", "sweep_pixel_tiny.yaml", "sweep_blocks_tiny.yaml"):
        with pytest.raises(SystemExit) as exit_info:
            job.main(["--config", name, "metric=test/miou", "--dry-run"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.strip().splitlines() == [
            "config error: metric: 'test/miou' scores the test images; a pixel sweep chooses its recipe on "
            "validation folds of the labelled images: use val/miou (the chosen recipe is scored once on test after "
            "the sweep)"
        ], err
        cfg = load_config(SweepConfig, name)
        cfg.check()  # as shipped: a validation metric
        assert cfg.task == "pixel" and cfg.metric == "val/miou" and cfg.folds >= 2
    celeba = load_config(SweepConfig, "sweep_celeba_blocks.yaml")
    assert celeba.folds == 5 and celeba.base_overrides["data"]["num_train"] == 20
    # a factorized sweep is not a pixel sweep: its test/fg_iou is left as it is (issue 35 is the pixel task)
    load_config(SweepConfig, "sweep_k_tiny.yaml").check()


def test_run_sweep_refuses_a_test_metric_before_ray_starts(tmp_path, no_ray):
    with pytest.raises(ConfigError, match=r"^metric: 'test/pixel_accuracy' scores the test images; .* use "
                                          r"val/pixel_accuracy"):  # fmt: skip
        run_sweep(_tiny(), {"pixel.lr": [1e-3]}, name="m", output_dir=str(tmp_path), metric="test/pixel_accuracy",
                  **{"tracking.enabled": False})  # fmt: skip
    assert not (tmp_path / "m").exists()


def test_a_test_set_that_shares_images_with_the_labelled_ones_is_refused(tmp_path, no_ray):
    """test_data whose ids overlap the labelled ids (same images: the same folder, or the same synthetic scenes)."""
    overlapping = _tiny(test_data=DataConfig(image_size=16, num_images=24, num_train=4, num_test=8))  # ids 4..11
    with pytest.raises(ConfigError, match=r"^test_data: 4 of its test images are labelled images of data \(ids "
                                          r"\['000004', '000005', '000006', '000007'\]"):  # fmt: skip
        run_sweep(overlapping, {"pixel.lr": [1e-3]}, name="o", output_dir=str(tmp_path), **{"tracking.enabled": False})
    root = write_synthetic_folder(tmp_path / "faces", 14, 16)
    folder = {"name": "folder", "root": str(root), "image_size": 16}
    labelled = DataConfig(**folder, num_train=8)  # ids 0..7
    with pytest.raises(ConfigError, match=r"^test_data: 2 of its test images"):
        check_pixel_protocol(_tiny(data=labelled, test_data=DataConfig(**folder, num_train=6, num_test=6)), 5)
    # held out (the celeba layout: the labelled ids first, the test ids after them) or another source: accepted
    ids = check_pixel_protocol(_tiny(data=labelled, test_data=DataConfig(**folder, num_train=8, num_test=6)), 5)
    assert ids == [f"{i:06d}" for i in range(8)]
    check_pixel_protocol(_tiny(data=labelled, test_data=DataConfig(image_size=16, num_test=4)), 5)


def test_a_swept_test_set_and_impossible_folds_are_refused(tmp_path, no_ray):
    with pytest.raises(ConfigError, match=r"^space.test_data.num_test: a pixel sweep does not vary its test images"):
        run_sweep(_tiny(test_data=DataConfig(image_size=16, num_test=4)), {"test_data.num_test": [2, 4]}, name="s",
                  output_dir=str(tmp_path), **{"tracking.enabled": False})  # fmt: skip
    with pytest.raises(ConfigError, match=r"^folds: 9 validation folds need at least 9 labelled images; data's "
                                          r"train split has 8 \(data.num_train\)"):  # fmt: skip
        run_sweep(_tiny(), {"pixel.lr": [1e-3]}, name="f", output_dir=str(tmp_path), folds=9,
                  **{"tracking.enabled": False})  # fmt: skip
    with pytest.raises(ConfigError, match=r"^folds: k-fold validation needs at least 2 folds, got 1"):
        replace(SweepConfig(), task="pixel", folds=1, space={"pixel.lr": [1e-3]}).check()


# ---------------------------------------------------------------------------------------------------- (b) folds
def test_fold_split_is_a_partition_and_the_same_in_every_trial():
    ids = [f"{i:04d}" for i in range(20)]
    folds = fold_split(ids, 5)
    assert [len(f) for f in folds] == [4] * 5  # 20 labelled: train on 16, validate on 4
    assert sorted(i for f in folds for i in f) == ids  # disjoint, and every labelled image validated once
    assert fold_split(list(reversed(ids)), 5) == folds  # a fixed rule of the ids, not of their order
    assert folds != [ids[i : i + 4] for i in range(0, 20, 4)]  # shuffled: not the sorted runs
    assert [len(f) for f in fold_split(ids[:8], 5)] == [2, 2, 2, 1, 1]
    with pytest.raises(ValueError, match="folds"):
        fold_split(ids[:3], 4)


def test_a_view_selects_the_rows_of_its_images(tmp_path):
    ss = labelled_shards(replace(_tiny(), **{"features.batch_size": 3}), CPU, str(tmp_path / "cache"))
    assert len(ss) == 3 and ss.source_ids() == [f"{i:06d}" for i in range(8)]  # shards of 3, 3, 2 images
    view = ss.select(["000001", "000004", "000007"])
    assert view.image_ids() == view.source_ids() == ["000001", "000004", "000007"]
    assert view.num_rows == 3 * 16 * 16 and ss.num_rows == 8 * 16 * 16
    rows = {(i, y, x): f for s in ss.iter_shards() for i, y, x, f in zip(s.image_ids, s.ys, s.xs, s.features)}
    seen = 0
    for shard in view.iter_shards():
        assert set(shard.image_ids) <= {"000001", "000004", "000007"}
        for i, y, x, f in zip(shard.image_ids, shard.ys, shard.xs, shard.features):
            assert np.array_equal(rows[(i, y, x)], f)  # the same features, not another image's
            seen += 1
    windows = list(view.iter_windows(max_rows=300, seed=0))
    assert seen == sum(len(w) for w in windows) == view.num_rows  # every row of the view, once
    assert len(windows) == view.num_windows(300, seed=0) > 1
    k = len(ss.meta.class_names)
    counts = sum(np.bincount(w.labels, minlength=k) for w in windows)
    assert np.array_equal(counts, view.class_counts(k)) and counts.sum() == view.num_rows
    assert ss.num_rows == 8 * 16 * 16 and len(list(ss.iter_windows(10**6))[0]) == ss.num_rows  # the set is unchanged
    with pytest.raises(ValueError, match=r"no images \['000012'\] in this feature set"):
        ss.select(["000001", "000012"])  # a test image is not in the labelled set's features


def test_a_trial_validates_on_folds_of_the_labelled_images_and_never_reads_a_test_image(tmp_path, monkeypatch):
    """On the trial's code path: which images each fold trained on (the rows the trainer was given) and scored (the
    rows the scorer read), which data splits it built, and that the one evaluation of test images never ran."""
    cfg = _tiny()
    labelled = item_ids(build_dataset(cfg.data, "train"))
    test = item_ids(build_dataset(cfg.data, "test"))
    built, trained, scored = [], [], []
    real_build, real_train, real_score = trials.build_dataset, trials.train_segmenter, trials.evaluate_pixel_rows

    def build(data, split="train"):
        built.append(split)
        return real_build(data, split)

    def train(shards, *args, **kwargs):
        trained.append(shards.image_ids())
        return real_train(shards, *args, **kwargs)

    def score(ensemble, shards, *args, **kwargs):
        metrics, ids = real_score(ensemble, shards, *args, **kwargs)
        scored.append(ids)
        return metrics, ids

    def no_test_scoring(*args, **kwargs):
        raise AssertionError("a trial scored images with evaluate_segmenter")

    monkeypatch.setattr(trials, "build_dataset", build)
    monkeypatch.setattr(trials, "train_segmenter", train)
    monkeypatch.setattr(trials, "evaluate_pixel_rows", score)
    monkeypatch.setattr(trials, "evaluate_segmenter", no_test_scoring)
    trial = tmp_path / "trial"
    reports = list(pixel_chunks(cfg, TrialState(), str(trial), num_reports=2, device=CPU,
                                cache_root=str(tmp_path / "cache"), folds=4))  # fmt: skip
    assert built == ["train"]  # the labelled images' features, extracted once; no test split
    assert len(trained) == len(scored) == 2 * 4  # 4 folds x 2 reports
    record = json.loads((trial / "folds.json").read_text())
    for f in range(4):
        train_ids, val_ids = record["train"][f], record["val"][f]
        assert not set(train_ids) & set(val_ids) and sorted(train_ids + val_ids) == labelled
        for r in range(2):
            assert trained[4 * r + f] == train_ids and scored[4 * r + f] == val_ids == record["scored"][f]
    assert sorted(i for v in record["val"] for i in v) == labelled  # the folds cover the labelled images once
    touched = {i for ids in trained + scored for i in ids}
    assert touched == set(labelled) and not touched & set(test)
    for m in reports:
        folds = [m[f"val/fold{f}/miou"] for f in range(4)]
        assert m["val/miou"] == pytest.approx(np.mean(folds)) and all(0 <= v <= 1 for v in folds)
        assert not [k for k in m if k.startswith("test/")]
    assert [p.name for p in trial.iterdir()] == ["folds.json"]  # the fold ensembles went with the last chunk
    # one extraction for the whole trial (all folds index it), and a second trial of the recipe only hits the cache
    list(pixel_chunks(replace(cfg, **{"pixel.lr": 1e-2}), TrialState(), str(tmp_path / "t2"), num_reports=1,
                      device=CPU, cache_root=str(tmp_path / "cache"), folds=4))  # fmt: skip
    events = [json.loads(line)["event"] for line in (tmp_path / "cache" / "events.jsonl").read_text().splitlines()]
    assert events == ["build", "hit"]


def test_a_restored_trial_continues_its_fold_ensembles(tmp_path):
    """Between chunks the fold ensembles are saved; a trial restored after its first report continues them."""
    cfg, cache = _tiny(), str(tmp_path / "cache")
    run = pixel_chunks(cfg, TrialState(), str(tmp_path / "a"), num_reports=2, device=CPU, cache_root=cache, folds=2)
    next(run)
    assert sorted(p.name for p in (tmp_path / "a" / "folds").iterdir()) == ["fold-0.pt", "fold-1.pt"]
    restored = next(pixel_chunks(cfg, TrialState(report=1), str(tmp_path / "a"), num_reports=2, device=CPU,
                                 cache_root=cache, folds=2))  # fmt: skip
    second = next(run)  # the same trial, never interrupted
    assert restored["val/miou"] == pytest.approx(second["val/miou"], abs=1e-6)
    assert restored["train/loss"] == pytest.approx(second["train/loss"], abs=1e-6)
    assert not (tmp_path / "a" / "folds").exists()


def test_validation_on_cached_rows_scores_what_the_evaluation_path_scores(tmp_path):
    """`evaluate_pixel_rows` on a fold's cached features = `evaluate_segmenter` of the same ensemble on those images."""
    cfg = _tiny()
    ss = labelled_shards(cfg, CPU, str(tmp_path / "cache"))
    val = ["000002", "000005", "000006"]
    seg, _ = trials.train_segmenter(ss.select(sorted(set(ss.source_ids()) - set(val))),
                                    trials.PixelTrainConfig(members=2, max_epochs=3), CPU)  # fmt: skip
    metrics, ids = evaluate_pixel_rows(seg.ensemble, ss.select(val), seg.class_names, split="val")
    images = torch.utils.data.Subset(build_dataset(cfg.data, "train"), [2, 5, 6])
    full = evaluate_segmenter(seg, images, class_names=seg.class_names, split="val").metrics
    assert ids == val and metrics["val/miou"] == pytest.approx(full["val/miou"], abs=1e-3)
    assert metrics["val/pixel_accuracy"] == pytest.approx(full["val/pixel_accuracy"], abs=1e-3)


# ---------------------------------------------------------------------------------------------------- the test figure
def test_the_chosen_recipe_is_trained_on_all_labels_and_scored_once_on_test(tmp_path):
    cfg = _tiny()
    bundle = tmp_path / "best" / "segmenter.pt"
    final = trials.pixel_final(cfg, str(bundle), num_reports=2, device=CPU, cache_root=str(tmp_path / "cache"))
    assert final["labelled_ids"] == item_ids(build_dataset(cfg.data, "train"))
    assert final["test_ids"] == item_ids(build_dataset(cfg.data, "test"))
    assert not set(final["labelled_ids"]) & set(final["test_ids"])
    m = final["metrics"]
    assert m["test/num_images"] == 8 and 0 <= m["test/miou"] <= 1 and not [k for k in m if k.startswith("val/")]
    seg = trials.PixelSegmenter.load(bundle, CPU)  # the servable model is the refit that was scored
    assert seg.extra["train_rows"] == 8 * 16 * 16
    again = evaluate_segmenter(seg, build_dataset(cfg.data, "test"), class_names=seg.class_names).metrics
    assert again["test/miou"] == pytest.approx(m["test/miou"], abs=1e-9)


def test_the_summary_puts_validation_beside_test():
    from diffseg.core.report import chosen_markdown

    summary = {"metric": "val/miou", "num_trials": 4, "recipe": {"features.blocks": ["dec.1", "dec.2"]},
               "val": {"val/miou": 0.41, "val/pixel_accuracy": 0.8, "val/fold0/miou": 0.4, "val/fold1/miou": 0.42},
               "test": {"test/miou": 0.39, "test/pixel_accuracy": 0.79, "test/num_images": 200},
               "val_folds": [["a", "b"], ["c", "d"]], "num_labelled": 4, "test_data": "celebamask-hq-800"}  # fmt: skip
    text = chosen_markdown(summary)
    assert text.startswith("Chosen recipe (best val/miou of 4 trials): features.blocks=dec.1,dec.2")
    assert "| validation: mean of 2 folds | 4 labelled | 41.0 | 80.0 |" in text
    assert "| fold 1 | 2 held out | 42.0 |  |" in text
    assert "| test (scored once, celebamask-hq-800) | 200 test | 39.0 | 79.0 |" in text
