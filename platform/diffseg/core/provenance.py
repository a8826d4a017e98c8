"""A run's provenance: the commit and state of the code it runs, its job file and its user.

    git_sha(), git_dirty()      -> the commit (`$DIFFSEG_GIT_SHA`, else `git rev-parse HEAD`), uncommitted changes
    git_tags()                  -> `mlflow.source.git.commit`, `diffseg.git_dirty`
    job_source(), source_tags() -> the job file; the MLflow UI's "Created by" and "Source" (`mlflow.user`, ...)

`diffseg.core.tracking.Tracker` tags every run with them; `diffseg.core.submit` (jobs/submit.py) and the Ray Train
adapter hand the driver's values to processes that cannot work them out themselves. No MLflow import here.
"""

from __future__ import annotations

import getpass
import os
import subprocess
import sys
from pathlib import Path

from diffseg.core.config import REPO_ROOT, is_submitted_job

SOURCE_ENV, USER_ENV = "DIFFSEG_SOURCE", "DIFFSEG_USER"  # set by run_job: a run's job file and user, in any process


def git_sha(cwd: str | os.PathLike | None = None) -> str | None:
    """The commit of the code being run: `$DIFFSEG_GIT_SHA` when set (a Ray job's unpacked working_dir has no .git,
    so jobs/submit.py passes it in the runtime env), else `git rev-parse HEAD`; None outside a git checkout."""
    if sha := os.environ.get("DIFFSEG_GIT_SHA"):
        return sha
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd or Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def git_dirty(cwd: str | os.PathLike | None = None) -> bool | None:
    """Whether the code being run differs from its commit: `$DIFFSEG_GIT_DIRTY` when set (jobs/submit.py), else
    `git status --porcelain` (uncommitted or untracked files, which a job's --working-dir upload includes)."""
    if (env := os.environ.get("DIFFSEG_GIT_DIRTY")) is not None:
        return env.strip().lower() in ("1", "true", "yes")
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain"], cwd=cwd or Path(__file__).parent, capture_output=True, text=True,
            timeout=10,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def git_tags(commit: str | None = None, dirty: bool | None = None) -> dict[str, str]:
    """The provenance tags of a run: `mlflow.source.git.commit` and `diffseg.git_dirty` (when known)."""
    commit = commit or git_sha()
    dirty = git_dirty() if dirty is None else dirty
    tags = {"mlflow.source.git.commit": commit} if commit else {}
    if dirty is not None:
        tags["diffseg.git_dirty"] = str(dirty).lower()
    return tags


def job_source() -> str:
    """The job file this process runs (`jobs/train_factorized.py`, relative to the checkout when inside it): what
    `diffseg.experiments.launch.run_job` exports as $DIFFSEG_SOURCE, else `__main__`'s file."""
    if src := os.environ.get(SOURCE_ENV):
        return src
    main = getattr(sys.modules.get("__main__"), "__file__", None) or (sys.argv[0] if sys.argv else "")
    if not main:
        return "<interactive>"
    path = Path(main).resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def source_tags() -> dict[str, str]:
    """What the MLflow UI shows as "Created by" and "Source": `mlflow.user` ($DIFFSEG_USER, else the login name)
    and `mlflow.source.name` (`job_source`), `mlflow.source.type` LOCAL or JOB (a submitted Ray job)."""
    try:
        user = os.environ.get(USER_ENV) or getpass.getuser()
    except (KeyError, OSError):  # no login name (a container's uid without a passwd entry)
        user = str(os.getuid())
    return {
        "mlflow.user": user,
        "mlflow.source.name": job_source(),
        "mlflow.source.type": "JOB" if is_submitted_job() else "LOCAL",
    }
