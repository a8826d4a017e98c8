"""The cache of feature sets: a feature set is extracted once per (backbone, recipe, data) and found again by its key
(`feature_key`: the backbone's fingerprint, the recipe hash, the images), under a file lock so concurrent jobs and
trials do not extract it twice. The shard format itself: `diffseg.data.shards`."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from diffseg.core import storage
from diffseg.core.config import config_hash, to_dict
from diffseg.data.shards import MANIFEST_FORMAT


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes on this node; the atomic rename below keeps other nodes correct too."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def backbone_fingerprint(spec: str) -> dict[str, Any]:
    """What identifies a backbone: the spec, plus size and mtime of a checkpoint file (a retrained one is new)."""
    path = spec.split(":", 1)[1] if spec.startswith(("random:", "diffusers:")) else spec
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return {"spec": spec, "path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return {"spec": spec}


def feature_key(features: Any, data: Any) -> dict[str, Any]:
    """Everything that determines a feature set (a `FeatureConfig` applied to a `DataConfig`'s images), and nothing
    the classifier varies: batch size and precision are how, not what."""
    f = to_dict(features)
    f.pop("batch_size"), f.pop("precision")
    f["backbone"] = backbone_fingerprint(features.backbone)
    return {"features": f, "data": to_dict(data), "layout": MANIFEST_FORMAT}  # entries without manifests never match


class FeatureCache:
    """Feature shards, one entry per feature key: `<root>/<hash>/*.parquet` (or sub-folders) + `key.json`; `root` is
    a local folder or a URI (`s3://bucket/cache`, `gs://...`, `file://...`).

    `get(key, build)` returns the entry's location, calling `build(tmp_dir)` only when it is missing. Concurrent
    builders are safe: builders of the same key serialise on a lock file (on this node), the entry is built in a
    private temp folder and published (a local rename; on an object store, every file uploaded and the `_SUCCESS`
    object put last), and an entry without its `_SUCCESS` marker is never used. Builders on two nodes sharing a bucket
    may both build a missing entry; their files are the same, so the last upload wins harmlessly. Every hit and
    build is logged: `<root>/events.jsonl` locally, one `<root>/events/<time>-<pid>-<id>.json` object per event on an
    object store (appends do not exist there); `events()` reads either.
    """

    def __init__(self, root: str | os.PathLike):
        self.remote = storage.is_remote(root)
        self.root = str(root).rstrip("/") if self.remote else Path(root)

    def path(self, key: Mapping[str, Any]) -> str | Path:
        return storage.join(self.root, config_hash(key, 16)) if self.remote else self.root / config_hash(key, 16)

    def _lock_path(self, name: str) -> Path:
        if not self.remote:
            return self.root / name
        # an object store has no locks: builders on this node serialise on a local file named after the root, in the
        # user's cache folder (not /tmp, where the folders outlived every run and anyone could plant one first)
        tag = hashlib.sha256(self.root.encode()).hexdigest()[:16]
        cache = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser()
        return cache / "diffseg" / "locks" / tag / name

    def _event(self, kind: str, key_hash: str, seconds: float = 0.0) -> None:
        event = {"event": kind, "key": key_hash, "pid": os.getpid(), "time": time.time(), "s": seconds}
        if self.remote:
            stamp = f"{time.time():.6f}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            storage.write_text(storage.join(self.root, "events", f"{stamp}.json"), json.dumps(event))
            return
        with _file_lock(self.root / ".events.lock"), open(self.root / "events.jsonl", "a") as f:
            f.write(json.dumps(event) + "\n")

    def events(self) -> list[dict[str, Any]]:
        if self.remote:
            found = [json.loads(storage.read_text(p)) for p in storage.list_files(storage.join(self.root, "events"))]
            return sorted(found, key=lambda e: e["time"])
        path = self.root / "events.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []

    def get(self, key: Mapping[str, Any], build: Callable[[Path], None]) -> str | Path:
        final = self.path(key)
        entry = storage.name(final)
        if storage.is_file(storage.join(final, "_SUCCESS")):
            self._event("hit", entry)
            return final
        with _file_lock(self._lock_path(f".{entry}.lock")):
            if storage.is_file(storage.join(final, "_SUCCESS")):  # built by another process while we waited
                self._event("hit", entry)
                return final
            t0 = time.perf_counter()
            folder = Path(tempfile.gettempdir()) if self.remote else self.root
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{entry}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                build(tmp)
                (tmp / "key.json").write_text(json.dumps(to_dict(key), indent=1, default=str))
                if self.remote:
                    self._upload(tmp, final)
                else:
                    (tmp / "_SUCCESS").touch()
                    if final.exists():  # a torn entry (no _SUCCESS) left by a killed builder
                        shutil.rmtree(final)
                    os.rename(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            self._event("build", entry, time.perf_counter() - t0)
        return final

    @staticmethod
    def _upload(tmp: Path, final: str) -> None:
        """Publish a built entry on an object store: clear a torn one, upload every file, then `_SUCCESS` last."""
        storage.delete_dir(final)
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            storage.put_file(path, storage.join(final, *path.relative_to(tmp).parts))
        storage.write_text(storage.join(final, "_SUCCESS"), "")
