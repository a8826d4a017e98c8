"""Typed, frozen configs: defaults -> YAML file -> `a.b=value` command-line overrides.

Every config is a frozen dataclass whose fields carry a trailing comment (the dataclass documents itself, as in
NVlabs/edm). This module is the machinery only: it knows nothing of models or jobs. Unknown keys and values of the
wrong type are errors that name the dotted key, as nanoGPT's configurator does, but without `exec`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")
log = logging.getLogger(__name__)


class UserError(ValueError):
    """An error the user caused and can fix from its message alone (a config, input data, a checkpoint file, an
    unsupported conversion): a job ends with the message in one line, no traceback (`diffseg.experiments.launch`)."""


class ConfigError(UserError):
    """A config key is unknown or its value has the wrong type; the message names the dotted key."""


# ---------------------------------------------------------------------------------------------------- names
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=@-]*")
NAME_MAX = 128


def check_name(value: str, key: str = "name") -> str:
    """`value` if it is one safe path component, else ConfigError naming `key`.

    A name becomes a folder or file name under an output folder (`<output_dir>/<name>`), so it must not be able to
    point anywhere else: no separators, no `..`, not empty, not hidden (a leading dot), printable ASCII letters,
    digits and `._+=@-` only, at most NAME_MAX characters.
    """
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a name (a string), got {value!r}")
    if not value or len(value) > NAME_MAX or not _NAME_RE.fullmatch(value) or value in (".", ".."):
        raise ConfigError(
            f"{key}: {value!r} is not a valid name: one path component of letters, digits and ._+=@- "
            f"(not starting with . or -, no / or \\, at most {NAME_MAX} characters)"
        )
    return value


class _NameCheck:
    """Marks a str config field as a path component (see `Name`)."""

    def __call__(self, value: str, key: str) -> str:
        return check_name(value, key)


Name = Annotated[str, _NameCheck()]  # a config field that names a folder or file: checked by `check_name`


# ---------------------------------------------------------------------------------------------------- locations
# Ray Train workers and Tune trials change directory, and a submitted job runs in Ray's unpacked copy of its
# working_dir: a relative path means something else in each of them. So every location in a config is typed (the
# markers below), and `resolve_paths` makes them absolute ONCE, in the driver, against `workdir()`, before anything is
# shipped. URIs (`s3://`, `gs://`, `file://`, `runs:/`, `models:/`) are left as they are.
WORKDIR_ENV = "DIFFSEG_WORKDIR"  # relative paths resolve against this folder when set (jobs/submit.py sets it)
SUBMITTED_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor in the driver of a submitted job
_URI_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")


def is_uri(value: str) -> bool:
    """`s3://...`, `file:///...`, `runs:/...`: a location Ray and pyarrow/MLflow resolve, never relative to a folder."""
    return bool(_URI_RE.match(str(value)))


def is_submitted_job() -> bool:
    """True in the driver of a job submitted through Ray's Job API (`ray job submit`, `jobs/submit.py`)."""
    return SUBMITTED_ENV in os.environ


def workdir() -> Path:
    """The folder relative paths mean: `$DIFFSEG_WORKDIR` when set, else the current working directory."""
    env = os.environ.get(WORKDIR_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise ConfigError(
                f"{WORKDIR_ENV}={env}: no such folder on this node ({socket.gethostname()}); relative paths in the "
                "config resolve against it. On a remote cluster pass absolute paths on the nodes or URIs "
                "(output_dir=s3://bucket/runs), or submit with --workdir naming a shared folder"
            )
        return path.resolve()
    return Path.cwd().resolve()


@dataclasses.dataclass(frozen=True)
class PathField:
    """Marks a str config field as a location: `kind` says how `resolve_paths` treats a relative value.

    input: a file or folder the job reads; output: where it writes (refused when relative in a submitted job with
    no DIFFSEG_WORKDIR, since that folder is deleted with the job); config: a YAML found like --config (left to
    `find_config` when not found from the working directory). `resolver(value, section, key, base)` replaces the
    default rule (a backbone spec with a prefix, a tracking URI); `section` is the dataclass holding the field and
    `base()` returns the folder relative values mean.
    """

    kind: str = "input"
    resolver: Callable[[Any, Any, str, Callable[[], Path]], Any] | None = None
    # what the file must be, checked before the job starts and by --dry-run (`check_inputs`): `check(value, key)`
    # raises ConfigError naming the key (a checkpoint of the kind the job needs: `models.checkpoint.checkpoint_of`)
    check: Callable[[str, str], None] | None = None
    # an input's local file or folder, which must exist (`check_inputs`): `local(value)`, None where the value names
    # none (a backbone keyword); default: the value itself
    local: Callable[[str], str | None] | None = None


InputPath = Annotated[str, PathField("input")]  # a file or folder read by the job: local path or URI
OutputPath = Annotated[str, PathField("output")]  # where a job writes: local folder or URI (s3://, gs://, file://)
ConfigPath = Annotated[str, PathField("config")]  # a config YAML (relative: from here, else the repo's jobs/configs)


def _submitted_refusal(key: str, value: str, what: str = "") -> ConfigError:
    return ConfigError(
        f"{key}: {value!r} is relative{what}, and this is a submitted Ray job: its working directory ({Path.cwd()}) is "
        "Ray's unpacked copy of --working-dir, deleted with the job, so whatever is written there is lost. Pass an "
        f"absolute path or a URI ({key}=/shared/runs, {key}=s3://bucket/runs), or submit with `python "
        f"jobs/submit.py` (relative paths then resolve against the folder you submitted from), or set "
        f"{WORKDIR_ENV} in the job's runtime_env env_vars"
    )


def resolve_location(
    value: str, base: Path | Callable[[], Path] | None = None, key: str = "path", kind: str = "input"
) -> str:
    """One location made absolute against `base` (a folder, or a function returning it; default `workdir()`); see
    `resolve_paths`. URIs and "" are returned as they are."""
    if not value or is_uri(value):
        return value
    path = Path(value).expanduser()
    if path.is_absolute():
        return os.path.normpath(path)
    if kind == "output" and is_submitted_job() and not os.environ.get(WORKDIR_ENV):
        raise _submitted_refusal(key, value)
    folder = base() if callable(base) else Path(base) if base is not None else workdir()
    if kind == "config" and not (folder / path).is_file():
        return value  # a shipped config name (`factorized_tiny.yaml`): find_config looks in the repository
    return os.path.normpath(folder / path)


def resolve_paths(cfg: T, base: str | os.PathLike | None = None) -> T:
    """`cfg` with every location field (InputPath, OutputPath, ConfigPath and the other `PathField`s) absolute.

    Relative values resolve against `base` (default `workdir()`: $DIFFSEG_WORKDIR, else the current directory), so
    call this in the driver, before a config is shipped to Ray workers, trials, actors or replicas. Idempotent.
    In a submitted job without DIFFSEG_WORKDIR, a relative output location is refused with a ConfigError that says
    what to pass (its working directory is a temporary copy); inputs resolve against that copy (what was uploaded).
    """
    root = Path(base) if base is not None else None

    def base_dir() -> Path:  # looked up only when a relative value needs it (DIFFSEG_WORKDIR may name no folder)
        nonlocal root
        if root is None:
            root = workdir()
        return root

    def walk(obj: Any, prefix: str) -> Any:
        if isinstance(obj, (list, tuple)):
            items = [walk(v, f"{prefix}[{i}]") for i, v in enumerate(obj)]
            return type(obj)(items)
        if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
            return obj
        hints = get_type_hints(type(obj), include_extras=True)
        changes = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            key = f"{prefix}{f.name}"
            mark = _path_mark(hints[f.name])
            if mark is not None and mark.resolver is not None:
                new = mark.resolver(value, obj, key, base_dir)
            elif mark is not None and isinstance(value, str):
                new = resolve_location(value, base_dir, key, mark.kind)
            elif (item := _item_mark(hints[f.name])) is not None and isinstance(value, (list, tuple)):
                new = type(value)(
                    resolve_location(v, base_dir, f"{key}[{i}]", item.kind) if isinstance(v, str) else v
                    for i, v in enumerate(value)
                )  # a list of locations (tuple[InputPath, ...])
            else:
                new = walk(value, key + ".")
            if new is not value:
                changes[f.name] = new
        return dataclasses.replace(obj, **changes) if changes else obj

    return walk(cfg, "")


def check_inputs(cfg: Any) -> None:
    """Every input location of `cfg` with a local value (after `resolve_paths`) exists, and passes its field's
    `PathField.check` (what the file must be), before any work starts and in --dry-run: one ConfigError naming the
    key. URIs are left to the job (fetched there)."""

    def check(mark: PathField, value: Any, key: str) -> None:
        if mark.kind != "input" or not isinstance(value, str) or not value or is_uri(value):
            return
        local = mark.local(value) if mark.local else value
        if local and not is_uri(local) and not Path(local).exists():
            raise ConfigError(f"{key}: {local} does not exist")
        if mark.check is not None:
            mark.check(value, key)

    def walk(obj: Any, prefix: str) -> None:
        if isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{prefix.rstrip('.')}[{i}].")  # datasets[0].ddpm
            return
        if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
            return
        hints = get_type_hints(type(obj), include_extras=True)
        for f in dataclasses.fields(obj):
            value, key = getattr(obj, f.name), f"{prefix}{f.name}"
            mark, item = _path_mark(hints[f.name]), _item_mark(hints[f.name])
            if mark is not None:
                check(mark, value, key)
            elif item is not None and isinstance(value, (list, tuple)):
                for i, v in enumerate(value):
                    check(item, v, f"{key}[{i}]")
            else:
                walk(value, key + ".")

    walk(cfg, "")


def _path_mark(tp: Any) -> PathField | None:
    """The `PathField` of a field type (`OutputPath`, `InputPath | None`, ...), if it has one."""
    if get_origin(tp) is Annotated:
        return next((m for m in get_args(tp)[1:] if isinstance(m, PathField)), None)
    if get_origin(tp) in (typing.Union, types.UnionType):
        for option in get_args(tp):
            mark = _path_mark(option)
            if mark is not None:
                return mark
    return None


def _item_mark(tp: Any) -> PathField | None:
    """The `PathField` of the items of a sequence of locations (`tuple[InputPath, ...]`, `list[InputPath]`)."""
    if get_origin(tp) in (tuple, list):
        marks = [_path_mark(a) for a in get_args(tp) if a is not Ellipsis]
        return marks[0] if marks and marks[0] is not None and marks[0].resolver is None else None
    return None


def job_dir(output_dir: str | os.PathLike, name: str, key: str = "name") -> Path:
    """`<output_dir>/<name>` after checking that `name` is one path component (never `..` or `a/b`)."""
    return Path(output_dir) / check_name(name, key)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming `key`. Only lossless coercions are made."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Annotated:
        base, *marks = get_args(tp)
        value = _coerce(base, value, key)
        for mark in marks:
            if isinstance(mark, _NameCheck):
                value = mark(value, key)
        return value
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        if isinstance(value, bool) and {"on", "off"} <= set(get_args(tp)):  # YAML 1.1 reads on/off as booleans
            value = "on" if value else "off"
        if value not in get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            items = [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
        elif origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            items = [_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value))]
        else:
            inner = args[0] if args else Any
            items = [_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        kt, vt = get_args(tp) or (Any, Any)
        return {_coerce(kt, k, f"{key}.{k}"): _coerce(vt, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a nested dict; missing keys take the defaults, unknown keys are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, got {data!r}")
    hints = get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f" under '{prefix}'" if prefix else ""
        names = ", ".join(f"{prefix + '.' if prefix else ''}{k}" for k in unknown)
        close = {k: difflib.get_close_matches(k, list(fields), n=1, cutoff=0.6) for k in unknown}
        hints = [f"{prefix + '.' if prefix else ''}{m[0]}" for m in close.values() if m]
        mean = f" (did you mean {', '.join(hints)}?)" if hints else ""
        raise ConfigError(f"unknown config key(s){where}: {names}{mean}; known: {sorted(fields)}")
    kwargs = {name: _coerce(hints[name], data[name], f"{prefix + '.' if prefix else ''}{name}") for name in data}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from e


def to_dict(cfg: Any) -> Any:
    """A plain, YAML/JSON-safe nested dict of a config (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value), the value parsed as YAML (`x=[1,2]`, `y=true`, `z=1e-4`)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:  # `x=...`, `x=[1,2`: one line naming the override, not the parser's traceback
        where = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({where}); quote it or fix it") from None
    # YAML reads `1e-4` as a string; a number is what a researcher means there.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in "eE.") else value
        except ValueError:
            pass
    return key.split("."), value


def set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{'.'.join(path)}: '{part}' is not a section")
        node = nxt
    node[path[-1]] = value


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; `update` wins."""
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    # `base: other.yaml` composes configs (paper sizes on top of a job default); paths are relative to this file.
    if "base" in data:
        parent = load_yaml(path.parent / data.pop("base"))
        data = merge(parent, data)
    return data


# The project's shipped configs: a relative config path that is not found from the working directory is looked up
# from the repository root, then in jobs/configs, so `--config ablation_tiny.yaml`, `jobs/configs/x.yaml` and configs
# that name other configs work from any directory (Ray workers and submitted jobs run elsewhere).
REPO_ROOT = Path(__file__).resolve().parents[3]  # platform/diffseg/core/config.py
CONFIG_DIR = REPO_ROOT / "jobs" / "configs"


def find_config(path: str | os.PathLike) -> Path:
    """A config file: `path` itself when it exists, else `<repo>/path`, else the shipped `jobs/configs/path`."""
    path = Path(path).expanduser()
    if path.is_file() or path.is_absolute():
        return path
    for candidate in (REPO_ROOT / path, CONFIG_DIR / path):
        if candidate.is_file():
            return candidate
    return path


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Defaults of `cls`, then the YAML file at `path`, then `a.b=value` overrides."""
    data: dict[str, Any] = load_yaml(find_config(path)) if path else {}
    for text in overrides:
        keys, value = parse_override(text)
        set_path(data, keys, value)
    return from_dict(cls, data)


def replace(cfg: T, **changes: Any) -> T:
    """`dataclasses.replace` with dotted keys: replace(cfg, **{"model.channels": 32})."""
    data = to_dict(cfg)
    for key, value in changes.items():
        set_path(data, key.split("."), to_dict(value))
    return from_dict(type(cfg), data)


def dumps(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, dumps(cfg))
    return path


def config_hash(cfg: Any, length: int = 12) -> str:
    """A stable short hash of a config (or of any JSON-able value): names outputs and cache entries."""
    blob = json.dumps(to_dict(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"
_TEMP_RE = re.compile(r"^\.(?P<target>.+)\.(?P<host>[A-Za-z0-9-]+)-(?P<pid>\d+)\.[A-Za-z0-9_]+\.(tmp|tmpdir)$")
_use_anonymous_temp = True  # O_TMPFILE where the OS and file system have it (tests turn it off for the fallback)


def _temp_prefix(path: Path) -> str:
    """Temp names carry the target, the host and the writer's pid, so a later writer can tell a dead writer's file."""
    return f".{path.name}.{_HOST}-{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete temp files and folders that writers on this host left behind when they were killed (SIGKILL, OOM):
    names `.<target>.<host>-<pid>.<random>.tmp[dir]` whose pid no longer runs. Returns what was removed."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_RE.match(entry.name)
        if not m or m["host"] != _HOST or _pid_alive(int(m["pid"])):
            continue
        path = Path(entry.path)
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
            log.info("removed %s, left by a writer (pid %s) that was killed", path, m["pid"])
        except OSError:
            pass
    return removed


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (a crash right after it cannot bring the old file back)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _open_anonymous(folder: Path) -> int | None:
    """An unnamed file in `folder` (Linux O_TMPFILE): if the writer dies, the kernel frees it, so nothing is left
    behind. None where the OS or the file system has no O_TMPFILE (then a named temp file is used)."""
    flag = getattr(os, "O_TMPFILE", None)
    if not _use_anonymous_temp or flag is None or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        return os.open(folder, flag | os.O_WRONLY, 0o666)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
            return None
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Replace `path` all at once: `write(tmp)` fills a temp file BESIDE it (never in the system temp folder), the
    data is fsynced, then one rename publishes it and the folder is fsynced. A reader never sees half a file; on any
    error the temp file goes and `path` is untouched.

    On Linux the temp file is unnamed (O_TMPFILE; `tmp` is its /proc/self/fd path) and gets a name only for the
    instant of the rename, so even a writer killed with SIGKILL leaves nothing behind. Elsewhere it is a hidden
    `.<name>.<host>-<pid>.<random>.tmp`, removed on error, and removed by the next write into the folder if its
    writer was killed. Writers must not infer the format from the temp name.
    """
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(folder)
    fd = _open_anonymous(folder)
    if fd is not None:
        try:
            proc = f"/proc/self/fd/{fd}"
            write(proc)
            os.fsync(fd)
            dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                for _ in range(100):  # a name for the instant of the rename (linkat cannot replace a file)
                    name = f"{_temp_prefix(path)}{os.urandom(4).hex()}.tmp"
                    try:
                        os.link(proc, name, dst_dir_fd=dir_fd, follow_symlinks=True)
                        break
                    except FileExistsError:
                        continue
                try:
                    os.replace(name, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(name, dir_fd=dir_fd)
                    raise
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        finally:
            os.close(fd)
        return path
    tmp_fd, tmp = tempfile.mkstemp(dir=folder, prefix=_temp_prefix(path), suffix=".tmp")
    os.close(tmp_fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(folder)
    return path


@contextlib.contextmanager
def staging_dir(near: str | os.PathLike) -> Iterator[Path]:
    """A private temp folder for files that are published elsewhere afterwards (a checkpoint handed to Ray Train, a
    file copied to its final place). It sits beside `near` (a local target path), never in the system temp folder,
    so a large file never lands on another disk; it is removed on exit, and by the next `staging_dir` or
    `atomic_write` in that folder if its process was killed. A remote `near` (`s3://...`) has no local folder:
    then the system temp folder is used."""
    near_s = str(near)
    if "://" in near_s:
        with tempfile.TemporaryDirectory() as tmp:
            yield Path(tmp)
        return
    target = Path(near_s)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target.parent)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=_temp_prefix(target), suffix=".tmpdir"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))
