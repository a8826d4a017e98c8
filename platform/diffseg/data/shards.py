"""Sharded Parquet feature sets: the format (one row per labelled pixel, written batch by batch) and the manifest.

Row schema (one file = one shard, usually the pixels of one extraction batch of images):

    features   fixed_size_list<halffloat>[D]   the concatenated (blocks x timesteps) feature vector, float16
    label      int16                           class index (-1 where the images had no masks)
    image_id   string (dictionary-encoded)     which image the pixel belongs to
    y, x       int16                           pixel coordinates in the (resized) image

Pixels whose mask is the ignore index are dropped at write time, so shards only hold trainable rows.

The Parquet schema metadata (key `diffseg`) holds a JSON `FeatureMeta`: feature_dim, blocks, timesteps, image size,
class names, the backbone reference and a hash of the feature recipe. Every shard of a set must agree on the recipe
(`ShardSet` checks this), so a classifier trained on a set knows exactly which features it expects.

Completeness: a feature run records the images it must cover in `manifest.json` before writing any shard
(`begin_shard_set`) and marks the set complete only when every one of them is in a shard (`end_shard_set`; each shard
lists the images it was made from in its footer, key `diffseg_images`). `ShardSet` refuses a folder whose manifest is
missing or not complete, or whose shards differ from the manifest's, with a message naming what is missing; pass
`allow_incomplete=True` to use such a set anyway (logged). A failed extraction is never trained on silently.

Integrity: the complete manifest records every shard's size and SHA-256 (`end_shard_set`). `ShardSet` refuses a
shard whose size differs when it opens the set (a truncated copy), and checks the SHA-256 while it reads: the first
time a shard is opened the file is memory-mapped, hashed, and its row groups are then read from that same mapping, so
the disk is read once and nothing is decoded before the check. A mismatch is `DamagedShard`, naming the shard and
the set (never an Arrow error about magic bytes); `allow_incomplete` does not cover it. Sets written before shard
checksums existed still load, with a warning, unverified.

Reading a set (`ShardSet`, `MemoryShardSet`, the ensemble's windows): `diffseg.data.shard_reader`.

The feature store: `FeatureCache` keeps one shard set per feature key (`feature_key`: exactly what determines the
features, nothing the classifier varies) under `<root>/<hash>/`, built once, safely under concurrency.

Shard folders and the cache root may be local paths or URIs (`s3://`, `gs://`, `file://`): every read and write
goes through `diffseg.core.storage` (pyarrow's filesystems). On an object store a shard is one object put (atomic), a
set is complete when its manifest says so, and a cache entry is used only once its `_SUCCESS` object exists.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from diffseg.core import storage
from diffseg.core.config import UserError, atomic_write
from diffseg.core.runtime import unverified_allowed

META_KEY = b"diffseg"
IMAGES_KEY = b"diffseg_images"  # the ids of every image a shard was made from (also those with no labelled pixel)
FORMAT = "diffseg-features/1"
# Rows per Parquet row group: the unit a window is shuffled in. Small enough that a window of a few hundred MB gathers
# pieces of many images even at 256 px (4096 rows = 16 image rows of a 256 px image; 69 MB at D = 8448), large
# enough that the zstd pages stay efficient. A 32 px shard of 4 images is one row group.
ROW_GROUP_ROWS = 4096
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "diffseg-shard-set/1"
log = logging.getLogger(__name__)


class IncompleteShardSet(UserError):
    """A shard folder that is not a complete feature set; the message names the folder and what is missing (a job
    ends with it in one line)."""


class DamagedShard(UserError):
    """A shard of a set that is not what its manifest records (size, SHA-256) or not readable Parquet; the message
    names the shard and the set."""


@dataclass
class FeatureMeta:
    blocks: list[str]  # named backbone blocks, in concatenation order (within each timestep)
    timesteps: list[int]  # diffusion steps, outer concatenation order
    feature_dim: int  # D, derived from the backbone
    image_size: int  # side of the (square) images the pixels come from
    num_classes: int = 0  # classes of the labels (0 = unlabelled)
    class_names: list[str] = field(default_factory=list)
    backbone: str = ""  # backbone reference (checkpoint path, random:<ckpt>, diffusers:<dir>, rgb)
    noise_seed: int = 0  # seed of the shared noise
    recipe_hash: str = ""  # hash of everything that determines the features (see `recipe_hash`)
    extra: dict[str, Any] = field(default_factory=dict)  # free-form (ignore_index, data set, split, ...)
    format: str = FORMAT

    def __post_init__(self) -> None:
        if not self.recipe_hash:
            self.recipe_hash = recipe_hash(self.backbone, self.blocks, self.timesteps, self.noise_seed, self.image_size)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> FeatureMeta:
        data = json.loads(text)
        if data.get("format") != FORMAT:
            raise ValueError(f"not a diffseg feature shard (format {data.get('format')!r}, expected {FORMAT!r})")
        return cls(**data)


def recipe_hash(
    backbone: str, blocks: Sequence[str], timesteps: Sequence[int], noise_seed: int, image_size: int
) -> str:
    """A short hash of the feature recipe: two sets with the same hash hold comparable features."""
    text = json.dumps([backbone, list(blocks), [int(t) for t in timesteps], int(noise_seed), int(image_size)])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _schema(dim: int, meta: FeatureMeta, images: Sequence[str]) -> pa.Schema:
    return pa.schema(
        [
            ("features", pa.list_(pa.float16(), dim)),
            ("label", pa.int16()),
            ("image_id", pa.dictionary(pa.int32(), pa.string())),
            ("y", pa.int16()),
            ("x", pa.int16()),
        ],
        metadata={META_KEY: meta.to_json().encode(), IMAGES_KEY: json.dumps(list(images)).encode()},
    )


def write_shard(
    path: str | os.PathLike,
    features: np.ndarray,
    labels: np.ndarray,
    image_ids: np.ndarray | Sequence[str],
    ys: np.ndarray,
    xs: np.ndarray,
    meta: FeatureMeta,
    row_group_size: int = ROW_GROUP_ROWS,
    images: Sequence[str] | None = None,
) -> Path:
    """Write one shard atomically (temp file, then rename; one object put on a URI). features (N, D) is stored as
    float16. Returns the shard's location (a Path, or the URI).

    `images`: the ids of every image this shard was made from (default: those with rows), which is what
    `end_shard_set` counts; an image whose pixels are all ignored has no row but is still covered."""
    features = np.ascontiguousarray(features, dtype=np.float16)
    n, d = features.shape
    if d != meta.feature_dim:
        raise ValueError(f"features have {d} dims, metadata says {meta.feature_dim}")
    for name, arr in (("labels", labels), ("image_ids", image_ids), ("ys", ys), ("xs", xs)):
        if len(arr) != n:
            raise ValueError(f"{name} has {len(arr)} rows, features have {n}")
    if images is None:
        images = sorted({str(i) for i in image_ids})
    feats = pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1), type=pa.float16()), d)
    table = pa.Table.from_arrays(
        [
            feats,
            pa.array(np.asarray(labels, dtype=np.int16)),
            pa.array(np.asarray(image_ids, dtype=str)).dictionary_encode(),
            pa.array(np.asarray(ys, dtype=np.int16)),
            pa.array(np.asarray(xs, dtype=np.int16)),
        ],
        schema=_schema(d, meta, images),
    )

    def write(tmp: str) -> None:
        pq.write_table(table, tmp, row_group_size=row_group_size, compression="zstd")

    if not storage.is_remote(path):
        return atomic_write(path, write)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, storage.name(path))
        write(local)
        storage.put_file(local, path)
    return path


def read_meta(path: str | os.PathLike) -> FeatureMeta:
    """The metadata of one shard (reads only the footer)."""
    md = _footer(path)
    if META_KEY not in md:
        raise ValueError(f"{path}: no diffseg metadata (not a feature shard)")
    return FeatureMeta.from_json(md[META_KEY])


def _footer(path: str | os.PathLike) -> dict[bytes, bytes]:
    try:
        where, fs = storage.parquet_source(path)
        return pq.read_schema(where, filesystem=fs).metadata or {}
    except (OSError, pa.ArrowInvalid) as e:
        raise IncompleteShardSet(f"{path}: not a readable Parquet shard ({e})") from e


def shard_images(path: str | os.PathLike) -> list[str]:
    """The ids of the images a shard was made from (its footer; older shards: the ids of its rows)."""
    md = _footer(path)
    if IMAGES_KEY in md:
        return list(json.loads(md[IMAGES_KEY]))
    return sorted(set(_read_table(path, ["image_id"]).column("image_id").to_pylist()))


def _read_table(path: str | os.PathLike, columns: Sequence[str] | None = None) -> pa.Table:
    where, fs = storage.parquet_source(path)
    return pq.read_table(where, columns=list(columns) if columns else None, filesystem=fs)


def _parquet_file(path: str | os.PathLike) -> pq.ParquetFile:
    """One shard (a local path or URI) opened for reading its metadata and row groups."""
    where, fs = storage.parquet_source(path)
    return pq.ParquetFile(fs.open_input_file(where) if fs is not None else where)


def _num_rows(path: str | os.PathLike) -> int:
    where, fs = storage.parquet_source(path)
    return pq.read_metadata(where, filesystem=fs).num_rows


# ---------------------------------------------------------------------------------------------------- manifest
def read_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    path = storage.join(folder, MANIFEST_NAME)
    if not storage.is_file(path):
        return None
    try:
        data = json.loads(storage.read_text(path))
    except json.JSONDecodeError as e:
        raise IncompleteShardSet(f"{path}: not JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise IncompleteShardSet(f"{path}: not a shard-set manifest (format {MANIFEST_FORMAT!r})")
    return data


def begin_shard_set(folder: str | os.PathLike, expected_images: Sequence[str], info: dict[str, Any] | None = None):
    """Record, before any shard is written, which images the set must cover; the set is incomplete until
    `end_shard_set`. Re-running an interrupted extraction into the same folder keeps its shards."""
    expected = [str(i) for i in expected_images]
    if not expected:
        raise ValueError(f"{folder}: a feature set over zero images")
    if len(set(expected)) != len(expected):
        raise ValueError(f"{folder}: image ids are not unique")
    manifest = {"format": MANIFEST_FORMAT, "complete": False, "expected_images": expected, "info": info or {}}
    storage.write_text(storage.join(folder, MANIFEST_NAME), json.dumps(manifest, indent=1, default=str))
    return storage.join(folder, MANIFEST_NAME)


def _shard_paths(folder: str | os.PathLike) -> list[str]:
    return storage.list_files(folder, ".parquet")


def end_shard_set(folder: str | os.PathLike) -> dict[str, Any]:
    """Check that the shards in `folder` cover every image `begin_shard_set` recorded, then mark the set complete
    (listing each shard and its row count). Raises IncompleteShardSet naming the missing images otherwise."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise IncompleteShardSet(f"{folder}: no {MANIFEST_NAME} (begin_shard_set was not called)")
    missing = _missing_images(folder, manifest)
    if missing:
        raise IncompleteShardSet(_missing_message(folder, manifest, missing))
    manifest["shards"] = {storage.name(p): _num_rows(p) for p in _shard_paths(folder)}
    manifest["sha256"] = {storage.name(p): _file_digest(p) for p in _shard_paths(folder)}  # name -> [bytes, hex]
    manifest["complete"] = True
    storage.write_text(storage.join(folder, MANIFEST_NAME), json.dumps(manifest, indent=1, default=str))
    return manifest


def covered_images(folder: str | os.PathLike) -> set[str]:
    """The ids of the images the finished shards in `folder` were made from (a shard is written whole or not at all)."""
    covered: set[str] = set()
    for p in _shard_paths(folder):
        covered.update(shard_images(p))
    return covered


def _missing_images(folder: str | os.PathLike, manifest: dict[str, Any]) -> list[str]:
    covered = covered_images(folder)
    return [i for i in manifest["expected_images"] if i not in covered]


def _missing_message(folder: str | os.PathLike, manifest: dict[str, Any], missing: list[str]) -> str:
    n = len(manifest["expected_images"])
    return (
        f"{folder}: incomplete feature set: {len(missing)} of {n} images have no shard "
        f"(e.g. {missing[:5]}); the extraction failed or is still running. Rerun it (finished shards are kept), "
        "or pass allow_incomplete=True to train on what is there"
    )


def check_shard_set(folder: str | os.PathLike) -> list[str]:
    """The shard paths of a complete set, or IncompleteShardSet saying what is wrong (see the module docstring)."""
    manifest = read_manifest(folder)
    present = {storage.name(p): p for p in _shard_paths(folder)}
    if manifest is None:
        raise IncompleteShardSet(
            f"{folder}: no {MANIFEST_NAME}: nothing records which images this set should cover, so it may be a "
            f"partial extraction ({len(present)} shards present). Sets written by jobs/extract_features.py have one; "
            "pass allow_incomplete=True to use the shards as they are"
        )
    if not manifest.get("complete"):
        raise IncompleteShardSet(_missing_message(folder, manifest, _missing_images(folder, manifest)))
    listed = manifest.get("shards") or {}
    gone = sorted(set(listed) - set(present))
    if gone:
        raise IncompleteShardSet(f"{folder}: shard(s) {gone[:5]} of the complete set are missing")
    extra = sorted(set(present) - set(listed))
    if extra:
        raise IncompleteShardSet(f"{folder}: shard(s) {extra[:5]} are not part of the set its manifest describes")
    digests = manifest.get("sha256") or {}
    unvouched = sorted(set(listed) - set(digests))  # an entry removed, or its key changed: nothing vouches for it
    if unvouched:
        what = "has no SHA-256 table" if not digests else f"lists shard(s) {unvouched[:5]} without a SHA-256"
        if not unverified_allowed():
            raise DamagedShard(
                f"{folder}: the manifest {what}, so nothing proves the shards are the ones extracted (a set written "
                "before checksums, or a manifest edited since). Re-extract the set (jobs/extract_features.py), or "
                "pass --allow-unverified (DIFFSEG_ALLOW_UNVERIFIED=1) to read them as they are"
            )
        log.warning("%s: the manifest %s; read unverified (--allow-unverified)", folder, what)
    for name, rows in listed.items():
        if name in digests:  # the size first: a truncated shard is named as such, not as a Parquet error
            size, expected = int(digests[name][0]), int(storage.size(present[name]))
            if size != expected:
                raise DamagedShard(
                    f"{present[name]}: {expected} bytes, but the manifest of the feature set {folder} records {size}: "
                    "the shard is truncated or was replaced; re-extract the set (finished shards are kept)"
                )
        try:
            actual = _num_rows(present[name])
        except (OSError, pa.ArrowInvalid) as e:
            msg = f"{present[name]}: not a readable Parquet shard of the feature set {folder} ({e})"
            raise DamagedShard(msg) from e
        if actual != rows:
            raise IncompleteShardSet(f"{present[name]}: {actual} rows, but the set's manifest says {rows}")
    return [str(present[name]) for name in sorted(listed)]


def shard_digests(folder: str | os.PathLike) -> dict[str, tuple[int, str]]:
    """{shard file name: (bytes, SHA-256)} of a complete set's manifest (empty for sets written before checksums)."""
    manifest = read_manifest(folder) or {}
    return {name: (int(v[0]), str(v[1])) for name, v in (manifest.get("sha256") or {}).items()}


def _file_digest(path: str | os.PathLike) -> list[Any]:
    """[bytes, SHA-256] of one shard file, read in 8 MiB blocks."""
    h, size = hashlib.sha256(), 0
    with _open_raw(path) as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            h.update(block)
            size += len(block)
    return [size, h.hexdigest()]


def _open_raw(path: str | os.PathLike):
    if not storage.is_remote(path):
        return open(path, "rb")
    fs, where = storage.filesystem(str(path))
    return fs.open_input_stream(where)


def open_verified(path: str | os.PathLike, digest: tuple[int, str] | None, set_path: str) -> pq.ParquetFile:
    """One shard opened for reading, its SHA-256 checked on the way in: a local file is memory-mapped and hashed, and
    Parquet then reads from the same mapping (the disk is read once); a URI is read once into memory. `digest` None
    (a set without checksums, a lone file): opened as it is."""
    if digest is None:
        return _parquet_file(path)
    size, expected = digest
    if storage.is_remote(path):
        fs, where = storage.filesystem(str(path))
        with fs.open_input_stream(where) as f:
            source: Any = pa.BufferReader(f.read_buffer())
    else:
        source = pa.memory_map(str(path), "r")
    data = memoryview(source.read_buffer())
    h = hashlib.sha256()
    for start in range(0, len(data), 8 << 20):
        h.update(data[start : start + (8 << 20)])
    source.seek(0)
    if len(data) != size or h.hexdigest() != expected:
        what = f"{len(data)} bytes, the manifest records {size}" if len(data) != size else "its SHA-256 differs"
        raise DamagedShard(
            f"{path}: does not match the manifest of the feature set {set_path} ({what}): the shard is damaged or "
            "was changed after extraction; re-extract the set (jobs/extract_features.py)"
        )
    try:
        return pq.ParquetFile(source)
    except (OSError, pa.ArrowInvalid) as e:
        raise DamagedShard(f"{path}: not a readable Parquet shard of the feature set {set_path} ({e})") from e
