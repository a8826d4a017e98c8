"""Storage as a URI: feature shards, the feature cache, checkpoints and sweep-style outputs on an S3-compatible
server that this test starts itself (moto's server mode, bound to 127.0.0.1: never the internet).

The round trip: shards written to `s3://`, the feature cache built there once and hit the second time, the shards
read back by the MLP ensemble, which segments the test images; the same code as with local folders.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from diffseg.core import storage
from diffseg.data.datasets import DataConfig, build_dataset
from diffseg.data.feature_cache import FeatureCache, feature_key
from diffseg.data.shard_reader import ShardSet
from diffseg.data.shards import read_manifest
from diffseg.experiments.label_efficient import train_segmenter
from diffseg.methods.features import FeatureConfig, FeaturePipeline, extract_dataset
from diffseg.methods.pixel_training import PixelTrainConfig

BUCKET = "diffseg-test"


@pytest.fixture(scope="module")
def s3_server():
    """A local S3-compatible server on a free loopback port; AWS_* variables point pyarrow (and boto3) at it."""
    pytest.importorskip("moto.server", reason="moto[server] (the test extra) is not installed")
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_EC2_METADATA_DISABLED": "true",
    }  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=BUCKET)
        yield f"s3://{BUCKET}"
    server.stop()


DATA = DataConfig(image_size=16, num_images=12, num_train=8, num_test=4)


def test_storage_operations_on_s3(s3_server, tmp_path):
    root = f"{s3_server}/ops"
    local = tmp_path / "a.txt"
    local.write_text("hello")
    storage.put_file(local, storage.join(root, "x", "a.txt"))
    storage.write_text(storage.join(root, "x", "b.json"), "{}")
    assert storage.is_file(f"{root}/x/a.txt") and storage.is_dir(f"{root}/x") and not storage.exists(f"{root}/y")
    assert storage.list_files(f"{root}/x") == [f"{root}/x/a.txt", f"{root}/x/b.json"]
    assert storage.list_files(f"{root}/x", ".json") == [f"{root}/x/b.json"]
    storage.copy_file(f"{root}/x/a.txt", f"{root}/z/c.txt")
    assert storage.read_text(f"{root}/z/c.txt") == "hello"
    assert (
        storage.fetch_file(f"{root}/z/c.txt", tmp_path / "back.txt") and (tmp_path / "back.txt").read_text() == "hello"
    )
    assert not storage.fetch_file(f"{root}/missing.txt", tmp_path / "m.txt")
    storage.delete_dir(f"{root}/z")
    assert not storage.exists(f"{root}/z/c.txt")


def test_shards_cache_and_ensemble_round_trip_through_s3(s3_server, tmp_path):
    features = FeatureConfig(backbone="rgb")
    pipeline = FeaturePipeline(features, "cpu")
    train = build_dataset(DATA, "train")

    # Shards written straight to the bucket: one object per shard, the manifest marks the set complete.
    direct = f"{s3_server}/features/direct"
    summary = extract_dataset(pipeline, train, direct, batch_size=4)
    assert summary["num_shards"] == 2 and summary["num_rows"] == 8 * 16 * 16
    assert len(storage.list_files(direct, ".parquet")) == 2 and read_manifest(direct)["complete"]
    assert ShardSet(direct).num_rows == summary["num_rows"]
    again = extract_dataset(pipeline, train, direct, batch_size=4)  # idempotent: finished shards are skipped
    assert again["num_rows"] == 0

    # The feature cache on S3: built once, then hit; the entry is complete only with its _SUCCESS object.
    cache = FeatureCache(f"{s3_server}/cache")
    key = feature_key(features, DATA)
    builds = []

    def build(folder: Path) -> None:
        builds.append(folder)
        extract_dataset(pipeline, train, folder, batch_size=4)

    entry = cache.get(key, build)
    assert entry == cache.get(key, build) and len(builds) == 1
    assert isinstance(entry, str) and entry.startswith(f"{s3_server}/cache/")
    assert [e["event"] for e in cache.events()] == ["build", "hit"]
    assert storage.is_file(f"{entry}/_SUCCESS") and storage.is_file(f"{entry}/key.json")
    assert not builds[0].exists()  # the local build folder is gone once published

    # The ensemble reads the shards back from the bucket and segments the test images.
    seg, result = train_segmenter(entry, PixelTrainConfig(members=2, max_epochs=2, hidden=(8,)), "cpu")
    assert result.iterations > 0 and seg.ensemble is not None
    test = build_dataset(DATA, "test")
    masks = seg.segment(torch.stack([test[i]["image"] for i in range(2)]), seeds=[0, 1])
    assert tuple(masks.labels.shape) == (2, 16, 16)

    # A torn entry (a killed builder uploaded shards but no _SUCCESS) is rebuilt, not used.
    torn_key = {**key, "torn": True}
    storage.write_text(storage.join(cache.path(torn_key), "shard-x.parquet"), "partial")
    rebuilt = cache.get(torn_key, build)
    assert len(builds) == 2 and not storage.exists(f"{rebuilt}/shard-x.parquet")
    assert ShardSet(rebuilt).num_rows == summary["num_rows"]


@pytest.mark.slow
def test_a_sweep_keeps_its_outputs_in_the_bucket(s3_server, tmp_path, monkeypatch):
    """A 2-trial sweep with output_dir=s3://...: Tune's state, the trials' bundles, the tables, the best model and the
    feature cache all in the bucket; the best model loads from there; a resume from the bucket is refused."""
    import ray

    from diffseg.core.config import load_config
    from diffseg.core.runtime import code_runtime_env
    from diffseg.core.trust import UntrustedState
    from diffseg.experiments.sweep import SweepConfig
    from diffseg.experiments.sweep import run as run_sweep_job
    from diffseg.methods.pixel import PixelSegmenter

    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    cfg = load_config(
        SweepConfig, "sweep_pixel_tiny.yaml", [f"output_dir={s3_server}/sweeps", "tracking.enabled=false"]
    )
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, object_store_memory=200 * 1024**2,
             runtime_env=code_runtime_env())  # fmt: skip
    try:
        result = run_sweep_job(cfg)
        exp = f"{s3_server}/sweeps/pixel-tiny"
        assert result.path == exp and result.best_model == f"{exp}/best/segmenter.pt"
        assert len(storage.read_text(f"{exp}/results.csv").splitlines()) == 3
        for name in ("results.md", "results.png", "best_config.yaml", "sweep.json", "best/segmenter.pt", "tuner.pkl",
                     "best/summary.json"):  # fmt: skip
            assert storage.is_file(f"{exp}/{name}"), name
        trials = storage.list_files(f"{exp}/trials/{result.table['trial_id'].iloc[0]}")
        assert [storage.name(t) for t in trials] == ["folds.json"]  # its validation folds (no model: best/ has it)
        assert not storage.exists(f"{exp}/trials/{result.table['trial_id'].iloc[0]}/folds")  # fold ensembles: gone
        assert "test/miou" in result.test_metrics and "val/miou" in result.best_metrics
        events = FeatureCache(f"{s3_server}/sweeps/feature_cache").events()
        assert [e["event"] for e in events] == ["build", "hit", "hit"]  # trial 1, trial 2, the chosen recipe's refit
        local = here / "best.pt"
        assert storage.fetch_file(result.best_model, local) and PixelSegmenter.load(local, "cpu").class_names
        with pytest.raises(UntrustedState, match="object storage cannot be proven yours"):
            run_sweep_job(cfg, resume=True)
        assert [p.name for p in here.iterdir()] == ["best.pt"]  # nothing written to the working directory
    finally:
        ray.shutdown()
