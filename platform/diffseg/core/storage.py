"""Storage locations as local paths or URIs: one small set of file operations over pyarrow's filesystems.

A location is a local path (`runs/x`, `/data/x`) or a URI that `pyarrow.fs.FileSystem.from_uri` understands:
`s3://bucket/key`, `gs://bucket/key`, `file:///abs/path` (and `hdfs://`, ...). Checkpoints, feature shards, the
feature cache and sweep outputs all go through these, so a job writes to a bucket exactly as it writes to a folder:

    put_file(local, "s3://bucket/runs/x/checkpoint.pt")     # atomic locally (temp + rename); an object put on S3/GCS
    fetch_file("s3://bucket/runs/x/checkpoint.pt", local)   # False when there is no such file
    list_files("gs://bucket/features/set", ".parquet")      # sorted full locations
    read_text / write_text / exists / is_file / size / copy_file / makedirs / join

Local paths keep their atomic-rename semantics (`diffseg.core.config.atomic_write`). Object stores have no rename, and a
put is atomic per object: writers that publish a set of files (a shard set, a cache entry) write a marker object
LAST, and readers only trust a set whose marker is there. S3 credentials and endpoints come from the usual AWS
environment (`AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT_URL` for an S3-compatible server), GCS from its own.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from diffseg.core.config import atomic_write, is_uri


def is_remote(location: str | os.PathLike) -> bool:
    """A URI (`s3://`, `gs://`, `file://`, ...) rather than a local path."""
    return is_uri(str(location))


def filesystem(location: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path within it) of a URI."""
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(str(location))


def join(location: str | os.PathLike, *parts: str) -> str:
    """`location/part/...` for a local path or a URI (URIs always join with `/`)."""
    if not is_remote(location):
        return str(Path(location).joinpath(*parts))
    return "/".join([str(location).rstrip("/"), *(p.strip("/") for p in parts)])


def name(location: str | os.PathLike) -> str:
    """The last component of a path or URI."""
    return str(location).rstrip("/").rsplit("/", 1)[-1]


def _info(location: str):
    import pyarrow.fs

    fs, path = filesystem(location)
    return fs.get_file_info(path).type, pyarrow.fs.FileType


def exists(location: str | os.PathLike) -> bool:
    if not is_remote(location):
        return Path(location).exists()
    kind, types = _info(str(location))
    return kind != types.NotFound


def is_file(location: str | os.PathLike) -> bool:
    if not is_remote(location):
        return Path(location).is_file()
    kind, types = _info(str(location))
    return kind == types.File


def is_dir(location: str | os.PathLike) -> bool:
    if not is_remote(location):
        return Path(location).is_dir()
    kind, types = _info(str(location))
    return kind == types.Directory


def size(location: str | os.PathLike) -> int:
    """The size of a file in bytes."""
    if not is_remote(location):
        return Path(location).stat().st_size
    fs, path = filesystem(str(location))
    return int(fs.get_file_info(path).size)


def makedirs(location: str | os.PathLike) -> None:
    if not is_remote(location):
        Path(location).mkdir(parents=True, exist_ok=True)
        return
    fs, path = filesystem(str(location))
    fs.create_dir(path, recursive=True)


def put_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy the local file `src` to `dst`: a local path (atomically: temp file beside it, then rename) or a URI
    (an object store's put is atomic)."""
    if not is_remote(dst):
        atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))
        return
    import pyarrow.fs

    fs, path = filesystem(str(dst))
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pyarrow.fs.copy_files(str(src), path, destination_filesystem=fs)


def fetch_file(src: str | os.PathLike, dst: str | os.PathLike) -> bool:
    """Copy `src` (a local path or URI) to the local file `dst`; False when there is no such file."""
    if not is_remote(src):
        if not Path(src).is_file():
            return False
        shutil.copyfile(src, dst)
        return True
    import pyarrow.fs

    fs, path = filesystem(str(src))
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return False
    pyarrow.fs.copy_files(path, str(dst), source_filesystem=fs)
    return True


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy a file between any two locations (local or URI)."""
    if not is_remote(src):
        put_file(src, dst)
        return
    import pyarrow.fs

    sfs, spath = filesystem(str(src))
    if is_remote(dst):
        dfs, dpath = filesystem(str(dst))
        dfs.create_dir(dpath.rsplit("/", 1)[0], recursive=True)
        pyarrow.fs.copy_files(spath, dpath, source_filesystem=sfs, destination_filesystem=dfs)
    else:
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(dst, lambda tmp: pyarrow.fs.copy_files(spath, tmp, source_filesystem=sfs))


def read_bytes(location: str | os.PathLike) -> bytes:
    if not is_remote(location):
        return Path(location).read_bytes()
    fs, path = filesystem(str(location))
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(location: str | os.PathLike) -> str:
    return read_bytes(location).decode()


def write_text(location: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (a local temp file and rename, or one object put)."""
    if not is_remote(location):
        atomic_write(location, lambda tmp: Path(tmp).write_text(text))
        return
    fs, path = filesystem(str(location))
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def list_files(location: str | os.PathLike, suffix: str = "") -> list[str]:
    """The files directly in folder `location` whose names end with `suffix`, as full locations, sorted."""
    if not is_remote(location):
        folder = Path(location)
        return (
            sorted(str(p) for p in folder.iterdir() if p.is_file() and p.name.endswith(suffix))
            if folder.is_dir()
            else []
        )
    import pyarrow.fs

    fs, path = filesystem(str(location))
    if fs.get_file_info(path).type != pyarrow.fs.FileType.Directory:
        return []
    infos = fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=False))
    base = str(location).rstrip("/")
    return sorted(
        f"{base}/{i.base_name}" for i in infos if i.type == pyarrow.fs.FileType.File and i.base_name.endswith(suffix)
    )


def delete_dir(location: str | os.PathLike) -> None:
    """Remove a folder and everything in it (nothing happens when it does not exist)."""
    if not is_remote(location):
        shutil.rmtree(location, ignore_errors=True)
        return
    fs, path = filesystem(str(location))
    if exists(location):
        fs.delete_dir(path)


def parquet_source(location: str | os.PathLike) -> tuple[Any, Any]:
    """(what pyarrow.parquet opens, its filesystem or None) for a local path or URI: `pq.read_table(*parquet_source(x))`
    style calls read a shard wherever it is."""
    if not is_remote(location):
        return str(location), None
    fs, path = filesystem(str(location))
    return path, fs
