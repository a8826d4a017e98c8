"""Submit a job to a Ray cluster with this checkout's code, its provenance and your working directory.

    python jobs/submit.py [--address URL] [--workdir DIR | --no-workdir] [--env K=V ...] [--no-wait] -- \
        python jobs/train_factorized.py scaling.num_workers=2

What `ray job submit --working-dir .` does, plus what it cannot know (`build_runtime_env`):

- the code: the repository root as the job's `working_dir` (its `.gitignore`d paths, `.git`, `.venv`, `runs/`,
  `mlflow.db`, `mlartifacts/` stay behind);
- provenance: `DIFFSEG_GIT_SHA` (the commit) and `DIFFSEG_GIT_DIRTY` (`true` when the tree has uncommitted or
  untracked files, which the upload includes): MLflow tags every run with both (`mlflow.source.git.commit`,
  `diffseg.git_dirty`);
- where relative paths point: `DIFFSEG_WORKDIR` = the directory you submit from (`--workdir` to name another, e.g. a
  shared folder on a remote cluster; `--no-workdir` to leave it unset, and then a relative output location is
  refused by the job with a message). A job's own working directory is Ray's unpacked copy of the upload, deleted
  with the job, so without this `runs/` and `mlflow.db` would be lost there;
- `MLFLOW_TRACKING_URI` from your environment, made absolute (a relative `sqlite:///mlflow.db` means your folder).

The address is `--address`, else `$RAY_API_SERVER_ADDRESS`, else `$RAY_ADDRESS` when it is an http URL, else the
local dashboard (http://127.0.0.1:8265). A cluster with token auth on (Ray 2.60 turns it on for `ray start` when
`~/.ray/auth_token` exists, and a local `ray.init` writes that file) needs RAY_AUTH_MODE=token here, as `ray job`
does; without it the submission ends with one line saying so (`auth_hint`), not a traceback. Waits for the job and
streams its log unless `--no-wait`; exits 0 only when the job succeeded.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from diffseg.core.config import REPO_ROOT, WORKDIR_ENV, workdir
from diffseg.core.provenance import git_dirty, git_sha
from diffseg.core.tracking import resolve_tracking_uri

log = logging.getLogger(__name__)
# Never uploaded: environments, outputs, stores, caches and the VCS (Ray also honours .gitignore).
EXCLUDES = [".git", ".venv", "runs", "outputs", "mlflow.db", "mlruns", "mlartifacts", "**/__pycache__",
            "notebooks/.ipynb_checkpoints", ".pytest_cache", ".ruff_cache"]  # fmt: skip
DEFAULT_ADDRESS = "http://127.0.0.1:8265"


def job_address(address: str | None = None) -> str:
    """The Job API's address (see the module docstring)."""
    if address:
        return address
    if os.environ.get("RAY_API_SERVER_ADDRESS"):
        return os.environ["RAY_API_SERVER_ADDRESS"]
    if os.environ.get("RAY_ADDRESS", "").startswith(("http://", "https://")):
        return os.environ["RAY_ADDRESS"]
    return DEFAULT_ADDRESS


def auth_hint(address: str) -> str:
    """The one line a refused submission prints: what to set so that this client sends the cluster's token."""
    mode = os.environ.get("RAY_AUTH_MODE", "")
    have = "it is 'token', so the token itself is wrong or missing" if mode == "token" else (
        f"it is {mode!r}" if mode else "it is unset")  # fmt: skip
    return (
        f"the Ray cluster at {address} requires its auth token: export RAY_AUTH_MODE=token ({have}; the token is read "
        "from ~/.ray/auth_token, $RAY_AUTH_TOKEN_PATH or $RAY_AUTH_TOKEN, and must be the cluster's)"
    )


def build_runtime_env(
    workdir_path: str | os.PathLike | None = None, env: dict[str, str] | None = None, use_workdir: bool = True
) -> dict[str, Any]:
    """The job's runtime_env: this checkout as working_dir, the commit and dirty flag, DIFFSEG_WORKDIR, and
    MLFLOW_TRACKING_URI (absolute) when set here; `env` adds variables."""
    env_vars = {"DIFFSEG_GIT_SHA": git_sha(REPO_ROOT) or "", "PYTHONUNBUFFERED": "1"}
    dirty = git_dirty(REPO_ROOT)
    if dirty is not None:
        env_vars["DIFFSEG_GIT_DIRTY"] = str(dirty).lower()
    if not env_vars["DIFFSEG_GIT_SHA"]:
        del env_vars["DIFFSEG_GIT_SHA"]
    if use_workdir:
        env_vars[WORKDIR_ENV] = str(Path(workdir_path).expanduser().resolve() if workdir_path else workdir())
    if os.environ.get("MLFLOW_TRACKING_URI"):
        env_vars["MLFLOW_TRACKING_URI"] = resolve_tracking_uri(None, Path(env_vars.get(WORKDIR_ENV) or workdir()))
    env_vars.update(env or {})
    return {"working_dir": str(REPO_ROOT), "excludes": EXCLUDES, "env_vars": env_vars}


NO_AGENT = "No available agent to submit job"  # the Job API's 500 while a node's job agent is still starting
AGENT_PATIENCE_S = 120.0


def submit_when_ready(client: Any, patience_s: float = AGENT_PATIENCE_S, **job: Any) -> str:
    """`client.submit_job(**job)`, retried while the Job API answers that no job agent is up yet ("please try again
    later": the dashboard answers before the agents of a cluster that has just started, more so on a loaded
    machine), for up to `patience_s`; any other error, or the agent still missing then, is raised as it came."""
    deadline = time.monotonic() + patience_s
    waited = False
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as e:
            if NO_AGENT not in str(e) or time.monotonic() > deadline:
                raise
            if not waited:
                log.info(f"[submit] the cluster's job agent is not up yet; retrying for up to {patience_s:.0f} s")
                waited = True
            time.sleep(2.0)


def submit(
    entrypoint: list[str],
    address: str | None = None,
    runtime_env: dict[str, Any] | None = None,
    wait: bool = True,
    timeout_s: float = 0.0,
) -> tuple[str, str]:
    """Submit `entrypoint` (argv) through the Job API; with `wait`, stream its log until it ends. (job id, status)."""
    from ray.job_submission import JobStatus, JobSubmissionClient  # costs seconds: only when submitting

    client = JobSubmissionClient(job_address(address))
    runtime_env = runtime_env or build_runtime_env()
    job_id = submit_when_ready(client, entrypoint=shlex.join(entrypoint), runtime_env=runtime_env)
    env_vars = runtime_env.get("env_vars", {})
    log.info(
        f"[submit] job {job_id} on {job_address(address)}: commit {env_vars.get('DIFFSEG_GIT_SHA', '?')[:12]} "
        f"(dirty: {env_vars.get('DIFFSEG_GIT_DIRTY', '?')}), relative paths in {env_vars.get(WORKDIR_ENV, '(refused)')}"
    )
    if not wait:
        return job_id, client.get_job_status(job_id).value
    done = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    shown, started = 0, time.monotonic()
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        if len(logs) > shown:
            sys.stdout.write(logs[shown:])
            sys.stdout.flush()
            shown = len(logs)
        if status in done:
            break
        if timeout_s and time.monotonic() - started > timeout_s:
            client.stop_job(job_id)
            log.info(f"[submit] job {job_id} stopped after {timeout_s:.0f} s")
        time.sleep(1.0)
    log.info(f"[submit] job {job_id} {status.value}")
    return job_id, status.value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--address", help=f"the Job API (default: RAY_API_SERVER_ADDRESS, {DEFAULT_ADDRESS})")
    parser.add_argument("--workdir", help="the folder relative paths mean in the job (default: this directory)")
    parser.add_argument("--no-workdir", action="store_true", help="leave DIFFSEG_WORKDIR unset")
    parser.add_argument("--env", action="append", default=[], metavar="K=V", help="another environment variable")
    parser.add_argument("--no-wait", action="store_true", help="return once submitted")
    parser.add_argument("--timeout", type=float, default=0.0, help="stop the job after this many seconds (0: never)")
    parser.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- python jobs/<job>.py ...")
    args = parser.parse_args(argv)
    entrypoint = args.entrypoint[1:] if args.entrypoint[:1] == ["--"] else args.entrypoint
    if not entrypoint:
        parser.error("no entrypoint: give the command after --, e.g. -- python jobs/train_factorized.py")
    extra = dict(item.split("=", 1) for item in args.env)
    runtime_env = build_runtime_env(args.workdir, extra, use_workdir=not args.no_workdir)
    from ray.exceptions import AuthenticationError

    try:
        _, status = submit(entrypoint, args.address, runtime_env, wait=not args.no_wait, timeout_s=args.timeout)
    except AuthenticationError:
        sys.exit(f"error: {auth_hint(job_address(args.address))}")
    except ConnectionError as e:  # no dashboard there
        sys.exit(f"error: {e} (start one with `ray start --head --dashboard-port=8265`, or pass --address)")
    return 0 if args.no_wait or status == "SUCCEEDED" else 1
