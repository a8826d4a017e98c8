"""Reading sharded Parquet feature sets (their format, manifest and checks: `diffseg.data.shards`).

    ss = ShardSet(folder | [shard paths], allow_incomplete=False)   # refuses incomplete or damaged sets
    ss.iter_shards(), ss.iter_windows(max_rows, seed), ss.num_windows(...), ss.class_counts(K), ss.image_ids()
    ss.source_ids()            # every image the set was made from (also those without a labelled pixel)
    ss.select(image_ids)       # a view of those images' rows only (a validation fold; training on the others)

Reading. `ShardSet.iter_shards` loads ONE shard at a time (for inspection and the benches). The ensemble trains from
`ShardSet.iter_windows`: the row groups of ALL shards (`ROW_GROUP_ROWS` rows each, a few image rows of one image) are
shuffled, and consecutive ones are gathered into windows of at most `max_rows` rows, so one window mixes the pixels
of many images and memory is bounded by `max_rows`, never by the data set. When the whole labelled set fits in one
window, an epoch is one window: every pixel of every image, as the reference implementation's
`DataLoader(shuffle=True)` over all pixels (ddpm-segmentation `train_interpreter.py: train`). Plain pyarrow reads the
files too (`pq.read_table(path)`; features are a fixed-size list column). `MemoryShardSet` offers the same reading
interface over rows already in memory (an analysis at modest sizes), so the trainer has one input type.

Views. `ShardSet.select(ids)` reads the same files but keeps only the rows of the given images (each row group is
filtered on its `image_id` column as it is read), so the k folds of a sweep trial index ONE extraction of the
labelled images instead of extracting each fold again (`diffseg.experiments.trials`).
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from diffseg.core import storage
from diffseg.data.shards import (
    DamagedShard,
    FeatureMeta,
    IncompleteShardSet,
    _parquet_file,
    _read_table,
    _shard_paths,
    check_shard_set,
    open_verified,
    read_meta,
    shard_digests,
    shard_images,
)

# a verified shard whose stat changes is verified again (ctime too: a writer can reset mtime, not ctime)
_FILE_STATE = ("st_size", "st_mtime_ns", "st_ctime_ns", "st_ino")
log = logging.getLogger(__name__)


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
        self._images: frozenset[str] | None = None  # a view (`select`): only these images' rows; None = all rows
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

    def source_ids(self) -> list[str]:
        """The ids of every image the set (or this view) was made from, sorted: also those without a labelled pixel
        (their rows were all dropped), which `image_ids` does not see."""
        ids = {i for p in self.paths for i in shard_images(p)}
        return sorted(ids if self._images is None else ids & self._images)

    def select(self, image_ids: Iterable[str]) -> ShardSet:
        """A view of this set that holds only the rows of `image_ids` (e.g. the training or the validation images of
        one fold): the same shards, each row group filtered on its `image_id` column when it is read; windows,
        `num_rows`, `class_counts`, `iter_shards` and `image_ids` see only those rows. An id the set was not made
        from is an error (a fold that names other images, e.g. test images, would otherwise select nothing)."""
        keep = frozenset(str(i) for i in image_ids)
        unknown = sorted(keep - set(self.source_ids()))
        if unknown:
            raise ValueError(f"{self.source}: no images {unknown[:5]} in this feature set ({len(unknown)} unknown ids)")
        view = copy.copy(self)  # shares the integrity record: a shard verified once is verified for every view
        view._images = keep
        view.pieces, view.rows_per_shard = [], [0] * len(self.paths)
        handles: dict[int, pq.ParquetFile] = {}
        for s, g, _ in self.pieces:
            if s not in handles:
                handles = {s: self._open(s)}  # one open file at a time (checked on its first read)
            rows = int(view._keep(handles[s].read_row_group(g, columns=["image_id"])).sum())
            if rows:
                view.pieces.append((s, g, rows))
                view.rows_per_shard[s] += rows
        return view

    def _keep(self, table: pa.Table) -> np.ndarray:
        """(N,) bool: the rows of `table` that this view holds (all of them for a whole set)."""
        if self._images is None:
            return np.ones(table.num_rows, dtype=bool)
        ids = np.asarray(table.column("image_id").to_pylist(), dtype=str)
        return np.isin(ids, np.asarray(sorted(self._images), dtype=str))

    def _read(self, pf: pq.ParquetFile, columns: Sequence[str] | None, group: int | None = None) -> pa.Table:
        """A whole shard or one row group, only this view's rows (the image_id column is read to filter them)."""
        cols = list(columns) if columns else None
        if self._images is not None and cols is not None and "image_id" not in cols:
            cols.append("image_id")
        table = pf.read(columns=cols) if group is None else pf.read_row_group(group, columns=cols)
        return table if self._images is None else table.filter(pa.array(self._keep(table)))

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
            if self._images is not None and not self.rows_per_shard[i]:
                continue  # a view holds none of this shard's rows
            pf = self._open(int(i))
            shard = shard_from_table(self._read(pf, columns), self.paths[i])
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
                table = self._read(handles[s], ["features", "label"], g)
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
            labels = self._read(self._open(s), ["label"]).column("label").to_numpy()
            counts += np.bincount(labels[labels >= 0], minlength=num_classes)[:num_classes]
        return counts

    def image_ids(self) -> list[str]:
        ids: set[str] = set()
        for s in range(len(self.paths)):
            ids.update(self._read(self._open(s), ["image_id"]).column("image_id").to_pylist())
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
