"""Typed, frozen configs: defaults -> YAML file -> `a.b=value` command-line overrides.

Every config is a frozen dataclass whose fields carry a trailing comment (the dataclass documents itself, as in
NVlabs/edm). This module is the machinery only: it knows nothing of models or jobs. Unknown keys and values of the
wrong type are errors that name the dotted key, as nanoGPT's configurator does, but without `exec`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key is unknown or its value has the wrong type; the message names the dotted key."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming `key`. Only lossless coercions are made."""
    origin = get_origin(tp)
    if tp is Any:
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
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f" under '{prefix}'" if prefix else ""
        names = ", ".join(f"{prefix + '.' if prefix else ''}{k}" for k in unknown)
        raise ConfigError(f"unknown config key(s){where}: {names}; known: {sorted(fields)}")
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
    value = yaml.safe_load(raw) if raw.strip() else ""
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
REPO_ROOT = Path(__file__).resolve().parents[2]
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


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Replace `path` all at once: `write(tmp)` fills a hidden temp file beside it (ending in .tmp, so no glob for
    the real extension ever picks it up; writers must not infer the format from the name), then one rename. On any
    error the temp file goes and `path` is untouched, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def parse_job_args(
    cls: type[T],
    argv: list[str] | None = None,
    description: str | None = None,
    default_config: str | None = None,
) -> tuple[T, argparse.Namespace]:
    """The command line every job shares: `[--config FILE] [--dry-run] [key.path=value ...]`.

    `--dry-run` prints the resolved config and exits, so a researcher can see what a run would use.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=default_config, help="YAML config file (defaults are the dataclass's)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(cls, args.config, args.overrides)
    except ConfigError as e:
        parser.exit(2, f"config error: {e}\n")
    if args.dry_run:
        sys.stdout.write(dumps(cfg))
        parser.exit(0)
    return cfg, args
