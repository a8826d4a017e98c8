"""What every `jobs/*.py` does: parse its config, show the library's log, call the job's `run(cfg)`.

    python jobs/<job>.py [--config FILE] [--dry-run] [--help] [--allow-unverified] [key.path=value ...]

`--help` lists every config key with its default and comment; `--dry-run` prints the resolved config and runs its
cross-field checks; a bad key, value or cross-field combination exits with status 2 and a message naming the key.
The errors a user causes (`USER_ERRORS`: a config, bad input data naming the file, a missing, damaged or unverified
checkpoint, an unsupported conversion) end the job with one line, `error: <message>` (status 1); SIGTERM (`ray job
stop`, `kill`) raises `JobInterrupted` so the job unwinds, and ends it with `interrupted: terminated by signal SIGTERM`
(status 143; Ctrl-C: 130). `--traceback` (or `DIFFSEG_TRACEBACK=1`) shows their full traceback instead; anything else
(a bug) always shows it. However the job ends, the MLflow runs it left open are ended with the status that says how
(FINISHED, FAILED, KILLED: `diffseg.core.tracking`). `--allow-unverified` lets the job (and its Ray workers) load
checkpoints and bundles that have no integrity record (`diffseg.models.integrity.read_payload`), with a warning per
file; without it they are refused. A job file is a launcher only:

    def main(argv=None):
        return run_job(SampleJobConfig, run_sample_job, argv, doc=__doc__)
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

from diffseg.core.cli import parse_job_args
from diffseg.core.config import UserError
from diffseg.core.provenance import SOURCE_ENV, USER_ENV, source_tags
from diffseg.core.runtime import ALLOW_UNVERIFIED_ENV, setup_logging
from diffseg.core.tracking import JobInterrupted, end_live_runs, sigterm_interrupts

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
TRACEBACK_ENV = "DIFFSEG_TRACEBACK"  # =1: user errors and interrupts show their traceback (as --traceback does)
# What a user causes and can fix from the message alone: one line, no traceback (unless asked for).
USER_ERRORS = (UserError, FileNotFoundError)  # UserError: ConfigError, DataError, CheckpointError


def user_error_exit(e: BaseException, show_traceback: bool = False) -> SystemExit:
    """The exit of a job that ended with `e`, a user error or an interrupt: one line on stderr (after the full
    traceback when `show_traceback`), status 1 for an error, 128 + the signal for an interrupt (143: SIGTERM)."""
    if show_traceback:
        traceback.print_exception(e)
    if isinstance(e, KeyboardInterrupt):
        signum = signal.SIGTERM if isinstance(e, JobInterrupted) else signal.SIGINT
        sys.stderr.write(f"interrupted: {str(e) or 'Ctrl-C'}\n")  # (an exception is truthy: its text decides)
        return SystemExit(128 + signum)
    sys.stderr.write(f"error: {e}\n")
    return SystemExit(1)


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
    show_traceback = bool(getattr(args, "traceback", False)) or os.environ.get(TRACEBACK_ENV, "") not in ("", "0")
    # The job file and user every MLflow run of the job records, also in the Ray workers this process starts.
    tags = source_tags()
    exported = {k: v for k, v in ((SOURCE_ENV, tags["mlflow.source.name"]), (USER_ENV, tags["mlflow.user"]))
                if k not in os.environ}  # fmt: skip
    os.environ.update(exported)
    try:
        with sigterm_interrupts():
            result = run(cfg, **kwargs)
    except (*USER_ERRORS, KeyboardInterrupt) as e:
        end_live_runs(e)  # KILLED for an interrupt, FAILED for an error
        raise user_error_exit(e, show_traceback) from None
    except BaseException as e:
        end_live_runs(e)
        raise
    finally:
        for key in exported:
            os.environ.pop(key, None)
    end_live_runs(None)  # a run the job left open ends with it
    return result
