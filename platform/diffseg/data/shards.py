"""Sharded Parquet feature sets: one row per labelled pixel, written batch by batch, read one shard at a time.

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

Reading. `ShardSet.iter_shards` loads ONE shard at a time (for inspection and the benches). The ensemble trains from
`ShardSet.iter_windows`: the row groups of ALL shards (`ROW_GROUP_ROWS` rows each, a few image rows of one image) are
shuffled, and consecutive ones are gathered into windows of at most `max_rows` rows, so one window mixes the pixels
of many images and memory is bounded by `max_rows`, never by the data set. When the whole labelled set fits in one
window, an epoch is one window: every pixel of every image, as the reference implementation's
`DataLoader(shuffle=True)` over all pixels (ddpm-segmentation `train_interpreter.py: train`). Plain pyarrow reads the
files too (`pq.read_table(path)`; features are a fixed-size list column). `MemoryShardSet` offers the same reading
interface over rows already in memory (an analysis at modest sizes), so the trainer has one input type.

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
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from diffseg.core import storage
from diffseg.core.config import atomic_write

META_KEY = b"diffseg"
IMAGES_KEY = b"diffseg_images"  # the ids of every image a shard was made from (also those with no labelled pixel)
FORMAT = "diffseg-features/1"
# Rows per Parquet row group: the unit a window is shuffled in. Small enough that a window of a few hundred MB gathers
# pieces of many images even at 256 px (4096 rows = 16 image rows of a 256 px image; 69 MB at D = 8448), large
# enough that the zstd pages stay efficient. A 32 px shard of 4 images is one row group.
ROW_GROUP_ROWS = 4096
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "diffseg-shard-set/1"
# a verified shard whose stat changes is verified again (ctime too: a writer can reset mtime, not ctime)
_FILE_STATE = ("st_size", "st_mtime_ns", "st_ctime_ns", "st_ino")
log = logging.getLogger(__name__)


class IncompleteShardSet(ValueError):
    """A shard folder that is not a complete feature set; the message names the folder and what is missing."""


class DamagedShard(ValueError):
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


def _missing_images(folder: str | os.PathLike, manifest: dict[str, Any]) -> list[str]:
    covered: set[str] = set()
    for p in _shard_paths(folder):
        covered.update(shard_images(p))
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
    if listed and not digests:
        log.warning("%s: written before shard checksums existed; its shards are read unverified (re-extract)", folder)
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


@dataclass
class Shard:
    features: np.ndarray  # (N, D) float16
    labels: np.ndarray  # (N,) int64
    image_ids: np.ndarray  # (N,) str
    ys: np.ndarray  # (N,) int64
    xs: np.ndarray  # (N,) int64
    path: str = ""

    def __len__(self) -> int:
        return len(self.labels)


def _features(table: pa.Table) -> np.ndarray:
    """The fixed-size list column as (N, D) float16 (one copy out of Arrow)."""
    fl = table.column("features").combine_chunks()
    return fl.values.to_numpy(zero_copy_only=False).reshape(table.num_rows, fl.type.list_size)


def read_shard(path: str | os.PathLike, columns: Sequence[str] | None = None) -> Shard:
    """Load one whole shard (a local path or URI) into memory (float16 features, no copy to float32)."""
    return shard_from_table(_read_table(path, columns), path)


def shard_from_table(table: pa.Table, path: str | os.PathLike = "") -> Shard:
    n = table.num_rows
    names = table.column_names

    def col(name: str, dtype) -> np.ndarray:
        if name not in names:
            return np.zeros(0, dtype)
        return table.column(name).to_numpy().astype(dtype, copy=False)

    feats = _features(table) if "features" in names else np.zeros((n, 0), np.float16)
    ids = table.column("image_id").to_pylist() if "image_id" in names else []
    return Shard(
        feats, col("label", np.int64), np.asarray(ids, dtype=str), col("y", np.int64), col("x", np.int64), str(path)
    )


@dataclass
class Window:
    """Rows of several shards held together for shuffling (see `ShardSet.iter_windows`)."""

    features: np.ndarray  # (N, D) float16
    labels: np.ndarray  # (N,) int64
    shard_index: np.ndarray  # (N,) int32: the position in the set's `paths` of each row's shard

    def __len__(self) -> int:
        return len(self.labels)


def window_groups(piece_rows: Sequence[int], max_rows: int, rng: np.random.Generator) -> list[list[int]]:
    """Pieces (row groups) in a random order, cut into consecutive groups of at most `max_rows` rows (a piece larger
    than `max_rows` is a group on its own). Every piece is in exactly one group."""
    groups: list[list[int]] = []
    current: list[int] = []
    rows = 0
    for i in rng.permutation(len(piece_rows)).tolist():
        if current and rows + piece_rows[i] > max_rows:
            groups.append(current)
            current, rows = [], 0
        current.append(i)
        rows += piece_rows[i]
    if current:
        groups.append(current)
    return groups


class ShardSet:
    """The shards of one feature set, checked to share a recipe: a folder (which must be a complete set, see the
    module docstring, unless `allow_incomplete`), one shard file, or an explicit list of shard files."""

    def __init__(self, source: str | os.PathLike | Sequence[str | os.PathLike], *, allow_incomplete: bool = False):
        if isinstance(source, (str, os.PathLike)):
            root = str(source)
            if storage.is_dir(root):
                try:
                    paths = check_shard_set(root)
                except IncompleteShardSet as e:
                    if not allow_incomplete:
                        raise
                    log.warning("using an incomplete feature set (allow_incomplete): %s", e)
                    paths = _shard_paths(root)
            elif storage.is_file(root):
                paths = [root]
            else:
                raise FileNotFoundError(f"{root}: no such shard folder or file")
        else:
            paths = [str(p) for p in source]
        if not paths:
            raise FileNotFoundError(f"no .parquet shards in {source}")
        self.paths = [str(p) for p in paths]
        self.source = str(source) if isinstance(source, (str, os.PathLike)) else self.paths[0].rsplit("/", 1)[0]
        digests = shard_digests(self.source) if storage.is_dir(self.source) else {}
        # (bytes, SHA-256) per shard from the manifest; checked when a shard is first read (`_open`)
        self.digests = [digests.get(storage.name(p)) for p in self.paths]
        self._verified: dict[int, Any] = {}  # shard index -> the file state it was verified in
        try:
            metas = [read_meta(p) for p in self.paths]
        except IncompleteShardSet as e:
            raise DamagedShard(f"{e} (a shard of the feature set {self.source})") from e
        self.meta = metas[0]
        rule = self.meta.extra.get("min_class_pixels", 0)
        for p, m in zip(self.paths, metas):
            if m.recipe_hash != self.meta.recipe_hash or m.feature_dim != self.meta.feature_dim:
                raise ValueError(
                    f"{p}: feature recipe {m.recipe_hash} (dim {m.feature_dim}) differs from {self.paths[0]} "
                    f"({self.meta.recipe_hash}, dim {self.meta.feature_dim}); do not mix feature sets"
                )
            if m.extra.get("min_class_pixels", 0) != rule:
                raise ValueError(
                    f"{p}: labels written with min_class_pixels={m.extra.get('min_class_pixels', 0)}, "
                    f"{self.paths[0]} with {rule}; do not mix label rules in one set"
                )
        files = [self._metadata(p) for p in self.paths]
        self.rows_per_shard = [f.num_rows for f in files]
        # (shard, row group, rows) of every row group: the units `iter_windows` shuffles
        self.pieces = [(s, g, f.row_group(g).num_rows) for s, f in enumerate(files) for g in range(f.num_row_groups)]

    def _metadata(self, path: str) -> pq.FileMetaData:
        try:
            return _parquet_file(path).metadata
        except (OSError, pa.ArrowInvalid) as e:
            raise DamagedShard(f"{path}: not a readable Parquet shard of the feature set {self.source} ({e})") from e

    def _open(self, s: int) -> pq.ParquetFile:
        """Shard `s` for reading; its SHA-256 is checked the first time, and again if the file changed since."""
        path = self.paths[s]
        state = None if storage.is_remote(path) else tuple(getattr(os.stat(path), k) for k in _FILE_STATE)
        if self.digests[s] is None or (s in self._verified and self._verified[s] == state):
            return _parquet_file(path)
        pf = open_verified(path, self.digests[s], self.source)
        self._verified[s] = state
        return pf

    @property
    def num_rows(self) -> int:
        return sum(self.rows_per_shard)

    @property
    def max_shard_rows(self) -> int:
        return max(self.rows_per_shard)

    def __len__(self) -> int:
        return len(self.paths)

    def iter_shards(
        self, shuffle: bool = False, seed: int = 0, columns: Sequence[str] | None = None
    ) -> Iterator[Shard]:
        """Yield shards one at a time (the previous one is released when the caller drops it).

        shuffle: shard order is permuted with `seed`, and rows within each shard are permuted too.
        """
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(self.paths)) if shuffle else np.arange(len(self.paths))
        for i in order:
            pf = self._open(int(i))
            shard = shard_from_table(pf.read(columns=list(columns) if columns else None), self.paths[i])
            del pf
            if shuffle:
                perm = rng.permutation(len(shard))
                shard = Shard(
                    shard.features[perm],
                    shard.labels[perm],
                    shard.image_ids[perm] if len(shard.image_ids) else shard.image_ids,
                    shard.ys[perm] if len(shard.ys) else shard.ys,
                    shard.xs[perm] if len(shard.xs) else shard.xs,
                    shard.path,
                )
            yield shard
            del shard

    def num_windows(self, max_rows: int, seed: int = 0) -> int:
        """How many windows `iter_windows(max_rows, seed)` yields (1 = the whole set at once)."""
        return len(window_groups([rows for _, _, rows in self.pieces], max_rows, np.random.default_rng(seed)))

    def iter_windows(self, max_rows: int, seed: int = 0) -> Iterator[Window]:
        """Windows of at most `max_rows` rows (features and labels): the row groups of all shards in a seeded random
        order, gathered consecutively (a row group larger than `max_rows` is a window of its own). Each row of the
        set is in exactly one window; when everything fits, the only window is the whole set. The previous window is
        released when the caller drops it (peak memory: one window plus the row group being read)."""
        rng = np.random.default_rng(seed)
        dim = self.meta.feature_dim
        handles: dict[int, pq.ParquetFile] = {}
        for group in window_groups([rows for _, _, rows in self.pieces], max_rows, rng):
            n = sum(self.pieces[i][2] for i in group)
            feats = np.empty((n, dim), np.float16)
            labels = np.empty(n, np.int64)
            source = np.empty(n, np.int32)
            pos = 0
            for i in sorted(group):  # file order: sequential reads (the trainer permutes the rows anyway)
                s, g, rows = self.pieces[i]
                if s not in handles:
                    handles = {s: self._open(s)}  # one open file at a time (checked on its first read)
                table = handles[s].read_row_group(g, columns=["features", "label"])
                feats[pos : pos + rows] = _features(table)
                labels[pos : pos + rows] = table.column("label").to_numpy()
                source[pos : pos + rows] = s
                pos += rows
                del table
            pa.default_memory_pool().release_unused()  # hand Arrow's decoding buffers back before the next window
            yield Window(feats, labels, source)
            del feats, labels, source

    def class_counts(self, num_classes: int) -> np.ndarray:
        counts = np.zeros(num_classes, np.int64)
        for s in range(len(self.paths)):
            labels = self._open(s).read(columns=["label"]).column("label").to_numpy()
            counts += np.bincount(labels[labels >= 0], minlength=num_classes)[:num_classes]
        return counts

    def image_ids(self) -> list[str]:
        ids: set[str] = set()
        for s in range(len(self.paths)):
            ids.update(self._open(s).read(columns=["image_id"]).column("image_id").to_pylist())
        return sorted(ids)


class MemoryShardSet:
    """Rows already in memory (features (N, D), labels (N,)) read like a `ShardSet` of `parts` shards, for the
    trainer's streaming interface (`diffseg.methods.pixel_training.train_ensemble`)."""

    def __init__(self, features: np.ndarray, labels: np.ndarray, parts: int = 4, meta: FeatureMeta | None = None):
        if len(features) != len(labels):
            raise ValueError(f"{len(features)} feature rows but {len(labels)} labels")
        self.features, self.labels, self.parts = features, labels, max(1, parts)
        self.meta = meta or FeatureMeta(blocks=[], timesteps=[], feature_dim=features.shape[1], image_size=0)

    @property
    def num_rows(self) -> int:
        return len(self.labels)

    def __len__(self) -> int:
        return self.parts

    def iter_shards(
        self, shuffle: bool = False, seed: int = 0, columns: Sequence[str] | None = None
    ) -> Iterator[Shard]:
        rng = np.random.default_rng(seed)
        idx = rng.permutation(len(self.labels)) if shuffle else np.arange(len(self.labels))
        empty = np.zeros(0)
        for part in np.array_split(idx, self.parts):
            yield Shard(self.features[part], self.labels[part], empty, empty, empty)

    def num_windows(self, max_rows: int, seed: int = 0) -> int:
        return 1 if len(self.labels) <= max_rows else -(-len(self.labels) // max(1, max_rows))

    def iter_windows(self, max_rows: int, seed: int = 0) -> Iterator[Window]:
        """As `ShardSet.iter_windows`; the "shards" are `parts` contiguous blocks of the rows (their `shard_index`)."""
        n = len(self.labels)
        source = (np.arange(n) * self.parts // max(n, 1)).astype(np.int32)  # the contiguous block of each row
        if n <= max_rows:  # already in memory: the whole set, no copy
            yield Window(self.features, self.labels, source)
            return
        idx = np.random.default_rng(seed).permutation(n)
        for start in range(0, n, max(1, max_rows)):
            part = idx[start : start + max_rows]
            yield Window(self.features[part], self.labels[part], source[part])
