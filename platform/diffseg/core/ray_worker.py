"""The start-up hook of every Ray worker our jobs start (`runtime.code_runtime_env`'s `worker_process_setup_hook`).

Kept apart from `diffseg.core.runtime`, which imports torch: every worker process runs this at start-up, and 2.8 s of
torch import in each of Ray's pre-started workers slowed every job (and the test suite by minutes) on a small machine.
"""

from __future__ import annotations

import logging
import os


def worker_setup() -> None:
    """Each Ray worker's start-up hook (`code_runtime_env`).

    - `RAY_ADDRESS` = the worker's own cluster. Ray code that runs in workers and finds its cluster through the
      state API (Ray Train's PlacementGroupCleaner asks whether the controller is alive) otherwise guesses from the
      machine's running GCS processes; with a second Ray on the machine (a sweep, Serve, a test cluster) that fails
      with 'Found multiple active Ray instances': a 30-line traceback in every 2-worker training's output, and a
      cleaner that stopped watching.
    - Ray Train's transient warnings (`TRANSIENT_WARNING_LOGGERS`: a resource request that timed out on a busy
      machine, which Ray itself calls safe to ignore) keep their line and lose their 20-line traceback.
    """
    import ray

    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    for name in TRANSIENT_WARNING_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _OneLineWarnings) for f in logger.filters):
            logger.addFilter(_OneLineWarnings())


TRANSIENT_WARNING_LOGGERS = ("ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client",)


class _OneLineWarnings(logging.Filter):
    """A warning's traceback folded into its last line (`... (GetTimeoutError: Get timed out: ...)`); errors keep
    theirs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and record.exc_info and record.exc_info[1] is not None:
            err = record.exc_info[1]
            record.msg = f"{record.getMessage()} ({type(err).__name__}: {err})"
            record.args, record.exc_info, record.exc_text = None, None, None
        return True
