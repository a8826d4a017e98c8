"""Parquet feature shards: round trip, metadata, recipe checks, one-shard-at-a-time reading."""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from diffseg.data.shard_reader import ShardSet, read_shard
from diffseg.data.shards import (
    MANIFEST_NAME,
    DamagedShard,
    FeatureMeta,
    IncompleteShardSet,
    begin_shard_set,
    end_shard_set,
    read_meta,
    recipe_hash,
    shard_images,
    write_shard,
)


def _meta(d=5, backbone="ckpt.pt"):
    return FeatureMeta(
        blocks=["dec.5", "dec.6"], timesteps=[50, 150], feature_dim=d, image_size=4, num_classes=3,
        class_names=["bg", "a", "b"], backbone=backbone, extra={"ignore_index": 255},
    )  # fmt: skip


def test_roundtrip_and_metadata(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 5)).astype(np.float32)
    y = np.array([0, 1, 2, 1, 0, 2, 2])
    path = write_shard(tmp_path / "a.parquet", x, y, ["i0"] * 4 + ["i1"] * 3, np.arange(7), np.arange(7) % 3, _meta())
    s = read_shard(path)
    assert s.features.dtype == np.float16 and s.features.shape == (7, 5)
    np.testing.assert_array_equal(s.features, x.astype(np.float16))
    np.testing.assert_array_equal(s.labels, y)
    assert list(s.image_ids) == ["i0"] * 4 + ["i1"] * 3
    np.testing.assert_array_equal(s.xs, np.arange(7) % 3)
    m = read_meta(path)
    assert m.feature_dim == 5 and m.blocks == ["dec.5", "dec.6"] and m.timesteps == [50, 150]
    assert m.class_names == ["bg", "a", "b"] and m.extra["ignore_index"] == 255
    assert m.recipe_hash == recipe_hash("ckpt.pt", ["dec.5", "dec.6"], [50, 150], 0, 4)
    # plain pyarrow sees a fixed-size list of float16
    t = pq.read_table(path)
    ftype = t.schema.field("features").type
    assert ftype.list_size == 5 and str(ftype.value_type) == "halffloat"


def test_shardset_rejects_mixed_recipes_and_dims(tmp_path):
    x = np.zeros((2, 5))
    write_shard(tmp_path / "a.parquet", x, [0, 1], ["i", "i"], [0, 0], [0, 1], _meta())
    write_shard(tmp_path / "b.parquet", x, [0, 1], ["j", "j"], [0, 0], [0, 1], _meta(backbone="other.pt"))
    with pytest.raises(ValueError, match="recipe"):
        ShardSet([tmp_path / "a.parquet", tmp_path / "b.parquet"])
    with pytest.raises(ValueError, match="dims"):
        write_shard(tmp_path / "c.parquet", np.zeros((2, 4)), [0, 1], ["k", "k"], [0, 0], [0, 1], _meta())


def test_iter_shards_shuffles_and_covers_all_rows(tmp_path):
    begin_shard_set(tmp_path, ["i0", "i1", "i2"])
    for s in range(3):
        n = 10 + s
        write_shard(tmp_path / f"s{s}.parquet", np.full((n, 5), s), np.full(n, s), [f"i{s}"] * n, np.arange(n),
                    np.arange(n), _meta())  # fmt: skip
    end_shard_set(tmp_path)
    ss = ShardSet(tmp_path)
    assert ss.num_rows == 33 and ss.max_shard_rows == 12 and len(ss) == 3
    orders = []
    for seed in range(4):
        got = [(int(sh.labels[0]), sh.ys.tolist()) for sh in ss.iter_shards(shuffle=True, seed=seed)]
        assert sorted(g[0] for g in got) == [0, 1, 2]
        for label, ys in got:
            assert sorted(ys) == list(range(10 + label))  # each shard whole, rows permuted
            # features stay aligned with their rows
        orders.append(tuple(g[0] for g in got))
    assert len(set(orders)) > 1  # shard order changes with the seed
    assert ss.class_counts(3).tolist() == [10, 11, 12]
    assert ss.image_ids() == ["i0", "i1", "i2"]


def test_iter_windows_cover_every_row_once_within_the_bound(tmp_path):
    # 3 shards of 10 rows written in row groups of 4 rows: 9 pieces the windows are shuffled in
    begin_shard_set(tmp_path, ["i0", "i1", "i2"])
    for s in range(3):
        write_shard(tmp_path / f"s{s}.parquet", np.full((10, 5), s), np.arange(10) + 10 * s, [f"i{s}"] * 10,
                    np.arange(10), np.arange(10), _meta(), row_group_size=4)  # fmt: skip
    end_shard_set(tmp_path)
    ss = ShardSet(tmp_path)
    assert [rows for _, _, rows in ss.pieces] == [4, 4, 2] * 3
    for seed in range(3):
        windows = list(ss.iter_windows(max_rows=12, seed=seed))
        assert all(len(w) <= 12 for w in windows)
        labels = np.concatenate([w.labels for w in windows])
        assert sorted(labels.tolist()) == list(range(30))  # every row exactly once
        for w in windows:  # features and shard index stay aligned with their rows
            np.testing.assert_array_equal(w.features[:, 0], w.labels // 10)
            np.testing.assert_array_equal(w.shard_index, w.labels // 10)
        assert any(len(np.unique(w.shard_index)) > 1 for w in windows)  # row groups of several shards mix
    whole = list(ss.iter_windows(max_rows=10**6))
    assert len(whole) == 1 and len(whole[0]) == 30  # the whole set fits: one window
    assert len(list(ss.iter_windows(max_rows=1))) == 9  # a row group larger than the bound is a window of its own


def _shard(folder, name, ids, rows=3, images=None):
    x = np.zeros((rows, 5))
    owners = [ids[i % len(ids)] for i in range(rows)] if ids else []
    return write_shard(folder / name, x, [0] * rows, owners, [0] * rows, [0] * rows, _meta(), images=images)


def test_incomplete_sets_are_refused_naming_what_is_missing(tmp_path):
    """A feature run records the images it must cover; a set that lacks any of them, has no manifest, or changed
    after it was completed is refused with a message that says what is wrong, unless asked for explicitly."""
    folder = tmp_path / "feats"
    begin_shard_set(folder, ["a", "b", "c", "d"])
    _shard(folder, "shard-a.parquet", ["a", "b"])
    with pytest.raises(IncompleteShardSet, match=r"feats: incomplete feature set: 2 of 4 images have no shard"):
        ShardSet(folder)  # the extraction stopped half way: never used silently
    with pytest.raises(IncompleteShardSet, match=r"\['c', 'd'\]"):
        end_shard_set(folder)  # nor marked complete
    assert len(ShardSet(folder, allow_incomplete=True)) == 1  # unless the caller says so
    # an image whose pixels are all ignored has no row but is covered by the shard made from it
    _shard(folder, "shard-c.parquet", ["c"], images=["c", "d"])
    assert shard_images(folder / "shard-c.parquet") == ["c", "d"]
    manifest = end_shard_set(folder)
    assert manifest["complete"] and manifest["shards"] == {"shard-a.parquet": 3, "shard-c.parquet": 3}
    assert ShardSet(folder).image_ids() == ["a", "b", "c"]
    # changed after completion: an extra shard, a missing shard
    extra = _shard(folder, "shard-z.parquet", ["z"])
    with pytest.raises(IncompleteShardSet, match=r"\['shard-z.parquet'\] are not part of the set"):
        ShardSet(folder)
    extra.unlink()
    (folder / "shard-c.parquet").unlink()
    with pytest.raises(IncompleteShardSet, match=r"\['shard-c.parquet'\] of the complete set are missing"):
        ShardSet(folder)
    # no manifest at all: nothing says what the set should hold
    bare = tmp_path / "bare"
    _shard(bare, "s.parquet", ["a"])
    with pytest.raises(IncompleteShardSet, match=rf"{bare}: no {MANIFEST_NAME}"):
        ShardSet(bare)
    with pytest.raises(ValueError, match="zero images"):
        begin_shard_set(tmp_path / "empty", [])


def _complete_set(folder, num_shards=2, rows=600):
    """A complete set of float16 features with varied values (so that flipped bytes change what is trained on)."""
    rng = np.random.default_rng(0)
    ids = [f"im{i}" for i in range(num_shards)]
    begin_shard_set(folder, ids)
    for i, image in enumerate(ids):
        x = rng.normal(size=(rows, 5))
        write_shard(folder / f"shard-{i}.parquet", x, rng.integers(0, 3, rows), [image] * rows, [0] * rows,
                    [0] * rows, _meta(), row_group_size=200)  # fmt: skip
    end_shard_set(folder)
    return folder


def test_damaged_shard_is_refused_naming_it_and_its_set(tmp_path):
    """The report's attack: 20 flipped bytes in one shard of a complete set were trained on without a word. The
    manifest now holds every shard's SHA-256, checked as the shard is read."""
    folder = _complete_set(tmp_path / "feats")
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    shard = folder / "shard-1.parquet"
    digest = hashlib.sha256(shard.read_bytes()).hexdigest()
    assert manifest["sha256"]["shard-1.parquet"] == [shard.stat().st_size, digest]
    clean = ShardSet(folder)
    assert sum(len(w) for w in clean.iter_windows(max_rows=10**6)) == 1200  # intact: reads as before
    before = pq.read_table(shard).column("features").to_pylist()
    data = bytearray(shard.read_bytes())
    for i in range(20):  # 20 bytes in the middle of the file: inside the feature pages, not the footer
        data[len(data) // 3 + 7 * i] ^= 0xFF
    shard.write_bytes(bytes(data))
    try:  # control: the change is there (plain pyarrow reads other values, or cannot read it at all)
        assert pq.read_table(shard).column("features").to_pylist() != before
    except OSError:
        pass
    ss = ShardSet(folder)  # opening reads only footers: the set looks fine
    for read in (lambda: list(ss.iter_windows(max_rows=10**6)), lambda: list(ss.iter_shards()),
                 lambda: ss.class_counts(3), lambda: ss.image_ids()):  # fmt: skip
        with pytest.raises(DamagedShard) as e:
            read()
        assert str(shard) in str(e.value) and f"feature set {folder}" in str(e.value), str(e.value)
    # a shard changed AFTER it was verified (mid-training) is checked again
    fresh = _complete_set(tmp_path / "feats2")
    ss = ShardSet(fresh)
    assert ss.class_counts(3).sum() == 1200
    target = fresh / "shard-0.parquet"
    good = target.read_bytes()
    damaged = bytearray(good)
    damaged[len(good) // 2] ^= 0x01
    time.sleep(0.05)  # past the file system's timestamp granularity: the rewrite is a new ctime
    target.write_bytes(bytes(damaged))
    with pytest.raises(DamagedShard, match="does not match the manifest"):
        ss.class_counts(3)
    target.write_bytes(good)
    assert ss.class_counts(3).sum() == 1200


def test_truncated_shard_is_refused_naming_it_and_its_set(tmp_path):
    """A truncated shard failed as `ArrowInvalid: Parquet magic bytes not found in footer`, naming nothing."""
    folder = _complete_set(tmp_path / "feats")
    shard = folder / "shard-0.parquet"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(DamagedShard) as e:
        ShardSet(folder)
    msg = str(e.value)
    assert str(shard) in msg and f"feature set {folder}" in msg and "truncated" in msg, msg
    with pytest.raises(DamagedShard):
        ShardSet(folder, allow_incomplete=True)  # damage is not incompleteness


@pytest.mark.parametrize("edit", ["no table", "entry removed", "key flipped"])
def test_a_shard_no_digest_vouches_for_is_refused_unless_allowed(tmp_path, caplog, monkeypatch, edit):
    """Issue 36.2: a manifest whose digest table lacks a shard (a set written before checksums, an entry removed, or
    a bit of its key flipped) vouches for nothing: with that shard damaged, training on it was silent. Now the set is
    refused naming the shard, unless unverified reading is asked for by name."""
    folder = _complete_set(tmp_path / "feats")
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    if edit == "no table":
        del manifest["sha256"]
    elif edit == "entry removed":
        del manifest["sha256"]["shard-1.parquet"]
    else:
        manifest["sha256"]["shard-1.parquet".replace("1", "3")] = manifest["sha256"].pop("shard-1.parquet")
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    shard = folder / "shard-1.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # damage inside the shard (its size unchanged)
    shard.write_bytes(bytes(data))
    with pytest.raises(DamagedShard) as e:
        ShardSet(folder)
    msg = str(e.value)
    assert str(folder) in msg and "--allow-unverified" in msg, msg
    if edit != "no table":
        assert "shard-1.parquet" in msg, msg
    monkeypatch.setenv("DIFFSEG_ALLOW_UNVERIFIED", "1")
    with caplog.at_level("WARNING"):
        ShardSet(folder)  # the named opt-out: read as they are, with a warning
    assert "read unverified" in caplog.text
