"""What every `jobs/*.py` does: parse its config, show the library's log, call the job's `run(cfg)`.

    python jobs/<job>.py [--config FILE] [--dry-run] [--help] [--allow-unverified] [key.path=value ...]

`--help` lists every config key with its default and comment; `--dry-run` prints the resolved config and runs its
cross-field checks; a bad key, value or cross-field combination exits with status 2 and a message naming the key;
bad input data (`DataError`) exits with its message, which names the file. SIGTERM (`ray job stop`, `kill`) raises
`JobInterrupted` so the job unwinds; however the job ends, the MLflow runs it left open are ended with the status that
says how (FINISHED, FAILED, KILLED: `diffseg.core.tracking`). `--allow-unverified` lets the job (and its Ray
workers) load checkpoints and bundles that have no integrity record (`diffseg.models.checkpoint.read_payload`), with a
warning per file; without it they are refused. A job file is a launcher only:

    def main(argv=None):
        return run_job(SampleJobConfig, run_sample_job, argv, doc=__doc__)
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from diffseg.core.cli import parse_job_args
from diffseg.core.config import ConfigError
from diffseg.core.runtime import ALLOW_UNVERIFIED_ENV, setup_logging
from diffseg.core.tracking import end_live_runs, sigterm_interrupts
from diffseg.data.datasets import DataError

T = TypeVar("T")

QUIET_ENV = {  # what Ray and MLflow would otherwise print or send on every job start
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    "MLFLOW_DISABLE_TELEMETRY": "1",
}
ALLOW_UNVERIFIED_FLAG = {
    "--allow-unverified": "load checkpoints and bundles that have no integrity record (SHA-256 of their tensors), "
    "with a warning each; without it they are refused (re-seal one with jobs/convert_checkpoint.py instead)"
}
log = logging.getLogger(__name__)


def run_job(
    cls: type[T],
    run: Callable[..., Any],
    argv: list[str] | None = None,
    *,
    doc: str | None = None,
    default_config: str | None = None,
    flags: dict[str, str] | None = None,
    prepare: Callable[[T, Any], T] | None = None,
) -> Any:
    """Parse `[--config FILE] [--dry-run] [key=value ...]` into a `cls`, then return `run(cfg, **flags)`.

    :param doc: the job file's docstring (its first line describes the job in --help, the rest shows examples).
    :param flags: extra boolean options, {"--resume": "help text"}, passed to `run` as keyword arguments.
    :param prepare: `prepare(cfg, args) -> cfg` before the checks (e.g. paths relative to the --config file).
    """
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    cfg, args = parse_job_args(cls, argv, doc, default_config, {**(flags or {}), **ALLOW_UNVERIFIED_FLAG})
    if prepare is not None:
        cfg = prepare(cfg, args)
    setup_logging()
    if args.allow_unverified:  # the deliberate, named opt-out: this process and the Ray workers it starts
        os.environ[ALLOW_UNVERIFIED_ENV] = "1"
        log.warning("[job] --allow-unverified: files without an integrity record load (each with a warning)")
    names = [flag.lstrip("-").replace("-", "_") for flag in flags or {}]
    kwargs = {name: getattr(args, name) for name in names}
    try:
        with sigterm_interrupts():
            result = run(cfg, **kwargs)
    except (ConfigError, DataError) as e:
        end_live_runs(e)
        sys.exit(f"error: {e}")
    except BaseException as e:
        end_live_runs(e)
        raise
    end_live_runs(None)  # a run the job left open ends with it
    return result
