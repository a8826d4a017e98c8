"""The command line of every job: `--help` (every config key, its default and the comment beside its field), `--dry-run`
(the resolved config, checked) and `key.path=value` overrides, parsed into a config dataclass (`parse_job_args`)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import json
import os
import shlex
import sys
import textwrap
import tokenize
from typing import Any, get_args, get_origin, get_type_hints

from diffseg.core.config import ConfigError, T, check_inputs, dumps, load_config, resolve_paths, to_dict
from diffseg.core.runtime import ALLOW_UNVERIFIED_ENV


def resume_hint() -> str:
    """How an interrupted job goes on (training, extraction): this process's own command line, which resumes it."""
    resume = "python " + " ".join(shlex.quote(a) for a in sys.argv) if sys.argv and sys.argv[0] else None
    return f"; the same command resumes it: {resume}" if resume else "; the same config and name resume it"


def field_comments(cls: type) -> dict[str, str]:
    """{field name: its trailing comment (or the comment line above it)} from a config dataclass's source."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (a dataclass built at runtime)
        return {}
    lines = source.splitlines()
    comments: dict[int, str] = {}  # 1-based line -> comment text
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        text = tok.string.lstrip("#").strip() if tok.type == tokenize.COMMENT else ""
        if text and not text.startswith(("fmt:", "noqa", "type:", "pragma")):  # tool directives are not docs
            comments[tok.start[0]] = text
    out: dict[str, str] = {}
    body = ast.parse(source).body[0]
    for node in getattr(body, "body", []):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            span = [comments[i] for i in range(node.lineno, (node.end_lineno or node.lineno) + 1) if i in comments]
            above = node.lineno - 1
            if not span and above in comments and lines[above - 1].lstrip().startswith("#"):
                span = [comments[above]]
            if span:
                out[node.target.id] = span[-1]
    return out


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _item_dataclass(tp: Any) -> type | None:
    """The dataclass of the items of a `tuple[X, ...]` / `list[X]` field type, if X is one."""
    if get_origin(tp) in (tuple, list):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        if len(args) == 1 and dataclasses.is_dataclass(args[0]):
            return args[0]
    return None


def describe(
    cls: type, defaults: Any = None, prefix: str = "", within: tuple[type, ...] = ()
) -> list[tuple[str, str, str]]:
    """(dotted key, default, comment) of every leaf field of a config dataclass, sections expanded (a section of its
    own type, such as `DataConfig.mix`, is listed once: its keys are the enclosing section's)."""
    within = (*within, cls)
    rows: list[tuple[str, str, str]] = []
    comments = field_comments(cls)
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name) if defaults is not None else _default(f)
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp) and dataclasses.is_dataclass(value):
            section = comments.get(f.name, "")
            rows.append((key, "", section))
            rows += describe(tp, value, key + ".", within)
            continue
        item = _item_dataclass(tp)
        if item is not None:  # a list of sections (e.g. EvalConfig.datasets): the value, then one item's keys
            rows.append((key, json.dumps(to_dict(value), default=str), comments.get(f.name, "")))
            if item not in within:
                rows += describe(item, None, key + "[].", within)
            continue
        shown = "(required)" if value is dataclasses.MISSING else json.dumps(to_dict(value), default=str)
        rows.append((key, shown, comments.get(f.name, "")))
    return rows


def keys_help(cls: type) -> str:
    """The config keys of `cls` for --help: `key.path = default  # comment`, sections as headings."""
    lines = [f"config keys ({cls.__name__}; set any with key.path=value):"]
    for key, default, comment in describe(cls):
        if not default:  # a section
            lines.append(f"  {key}:" + (f"  # {comment}" if comment else ""))
            continue
        text = f"  {key} = {default}"
        lines.append(f"{text:<48}  # {comment}" if comment else text)
    return "\n".join(lines)


def check_config(cfg: Any) -> None:
    """Run a config's cross-field checks: its `check()` method, when it has one (raises ConfigError naming the key)."""
    check = getattr(cfg, "check", None)
    if callable(check):
        try:
            check()
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(str(e)) from e


def parse_job_args(
    cls: type[T],
    argv: list[str] | None = None,
    description: str | None = None,
    default_config: str | None = None,
    flags: dict[str, str] | None = None,
) -> tuple[T, argparse.Namespace]:
    """The command line every job shares: `[--config FILE] [--dry-run] [key.path=value ...]`.

    `--help` lists every config key with its default and comment. `--dry-run` prints the resolved config, runs the
    config's cross-field checks (`check()`) and exits (2 when a check fails), so a researcher can see what a run
    would use. `flags` adds boolean options (`{"--resume": "help"}`). Every location in the config is made absolute
    (`resolve_paths`) before it is printed or returned.
    """
    parser = argparse.ArgumentParser(
        description=description, epilog=keys_help(cls), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=default_config, help="YAML config file (defaults are the dataclass's)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config, check it and exit")
    parser.add_argument(
        "--traceback", action="store_true", help="show the full traceback of a user error (config, data, checkpoint)"
    )
    for flag, text in (flags or {}).items():
        parser.add_argument(flag, action="store_true", help=text)
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    args = parser.parse_args(argv)
    try:
        # Locations become absolute here, in the driver, before any of it reaches a Ray worker, trial or replica.
        cfg = resolve_paths(load_config(cls, args.config, args.overrides))
    except ConfigError as e:
        parser.exit(2, f"config error: {e}\n")
    if args.dry_run:
        sys.stdout.write(dumps(cfg))
    if getattr(args, "allow_unverified", False):  # the job's named opt-out holds for the input checks too
        os.environ[ALLOW_UNVERIFIED_ENV] = "1"
    try:
        check_config(cfg)
        check_inputs(cfg)  # the checkpoints the job reads exist and are of the kind it needs
    except ConfigError as e:
        parser.exit(2, f"config error: {e}\n")
    if args.dry_run:
        parser.exit(0)
    return cfg, args
