"""MLflow tracking: params from the resolved config, metrics under `split/name` keys, artifacts, the git SHA.

MLflow is imported lazily (it costs seconds to import) and every call is a no-op when tracking is disabled. The
store is `tracking.uri`, else `MLFLOW_TRACKING_URI`, else a SQLite file `mlflow.db` in the working directory (MLflow
3's own default); `resolve_paths` makes it an absolute URI in the driver (`sqlite:///mlflow.db` included), so Ray
workers, trials and submitted jobs write to the same file. Experiments on a SQLite store keep their artifacts beside
it, in `<folder of mlflow.db>/mlartifacts/<experiment>/` (MLflow would otherwise fix the artifact root from whatever
the working directory is when the experiment is first created: a Ray worker's temp folder, say).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from diffseg.config import WORKDIR_ENV, ConfigError, PathField, is_submitted_job, job_dir, workdir

log = logging.getLogger(__name__)
SQLITE = "sqlite:///"
ARTIFACTS_DIR = "mlartifacts"  # beside a SQLite store: <folder of mlflow.db>/mlartifacts/<experiment>/<run>/artifacts


def resolve_tracking_uri(uri: str | None = None, base: Path | Callable[[], Path] | None = None) -> str:
    """The absolute tracking URI: `uri`, else $MLFLOW_TRACKING_URI, else `sqlite:///<base>/mlflow.db`; a relative
    SQLite path (`sqlite:///mlflow.db`) is made absolute against `base` (default: `workdir()`)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri and not (uri.startswith(SQLITE) and not uri[len(SQLITE) :].startswith("/")):
        return uri  # a server, an absolute SQLite file, another database
    relative = uri[len(SQLITE) :] if uri else "mlflow.db"
    if relative in ("", ":memory:"):
        return uri or ""
    if is_submitted_job() and not os.environ.get(WORKDIR_ENV):
        raise ConfigError(
            f"tracking.uri: MLflow would write {relative} inside this submitted job's working directory "
            f"({Path.cwd()}), Ray's unpacked copy of --working-dir, deleted with the job. Set MLFLOW_TRACKING_URI in "
            "the runtime env (http://<mlflow server>:5000 or sqlite:////abs/path/mlflow.db), pass tracking.uri=..., "
            "submit with `python jobs/submit.py` (relative paths then resolve against the folder you submitted from), "
            "or tracking.enabled=false"
        )
    folder = base() if callable(base) else Path(base) if base is not None else workdir()
    return f"{SQLITE}{os.path.normpath(folder / relative)}"


def _resolve_uri_field(value: str | None, section: Any, key: str, base: Callable[[], Path]) -> str | None:
    """`resolve_paths`' rule for `tracking.uri`: the absolute store of an enabled tracker (None stays None when off)."""
    if not getattr(section, "enabled", True):
        return value
    return resolve_tracking_uri(value, base)


TrackingURI = Annotated[str | None, PathField("output", _resolve_uri_field)]  # resolved by resolve_paths


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = True  # log to MLflow
    experiment: str = "diffseg"  # MLflow experiment name
    uri: TrackingURI = None  # tracking URI; None = $MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite store (`<db folder>/mlartifacts/<experiment>`);
    None for a tracking server or another database (the server's own artifact root applies)."""
    if not uri.startswith(SQLITE + "/"):
        return None
    folder = Path(uri[len(SQLITE) :]).parent / ARTIFACTS_DIR
    return str(folder / (re.sub(r"[^A-Za-z0-9._-]", "_", experiment) or "experiment"))


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


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: config paths become MLflow param names, as overrides name them."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class Tracker:
    """One MLflow run (or nothing, when disabled). Resumes a run by id so a restarted job keeps one history."""

    def __init__(
        self,
        cfg: TrackingConfig,
        run_name: str,
        run_id: str | None = None,
        tracking_uri: str | None = None,
        parent_run_id: str | None = None,
    ):
        self.enabled = cfg.enabled
        self.run_id: str | None = None
        if not self.enabled:
            return
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "1")
        import mlflow

        self._mlflow = mlflow
        uri = resolve_tracking_uri(tracking_uri or cfg.uri)
        self._client = mlflow.MlflowClient(tracking_uri=uri)
        if run_id is None:
            exp_id = experiment_id(self._client, uri, cfg.experiment)
            tags = {"mlflow.runName": run_name}
            if parent_run_id:
                tags["mlflow.parentRunId"] = parent_run_id
            tags.update(git_tags())
            run_id = self._client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
        else:
            self._client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        flat = flatten(params)
        items = [Param(k, str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self._client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self.enabled:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self._client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.enabled:
            for k, v in tags.items():
                self._client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.enabled:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.enabled:
            self._client.log_text(self.run_id, text, artifact_file)

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled and self.run_id:
            self._client.set_terminated(self.run_id, status=status)


def experiment_id(client: Any, uri: str, name: str) -> str:
    """The id of experiment `name`, created with its artifacts beside a SQLite store (`artifact_location`)."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location(uri, name))
        except MlflowException:  # created by another process meanwhile
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    wanted = artifact_location(uri, name)
    if wanted and exp.artifact_location.removeprefix("file://") != wanted:
        log.warning(
            "MLflow experiment %r keeps its artifacts in %s, not beside its store (%s/): it was created elsewhere or "
            "by an older version; set tracking.experiment to another name to start one there",
            name, exp.artifact_location, str(Path(wanted).parent),
        )  # fmt: skip
    return exp.experiment_id


def _client(uri: str | None):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "1")
    import mlflow

    return mlflow.MlflowClient(tracking_uri=resolve_tracking_uri(uri))


def find_nested_run(uri: str | None, parent_run_id: str, tags: Mapping[str, str]) -> str | None:
    """The id of a run nested under `parent_run_id` whose tags have these values, or None."""
    client = _client(uri)
    exp_id = client.get_run(parent_run_id).info.experiment_id
    query = " and ".join(
        [f"tags.mlflow.parentRunId = '{parent_run_id}'", *(f"tags.`{k}` = '{v}'" for k, v in tags.items())]
    )
    runs = client.search_runs([exp_id], query, max_results=1)
    return runs[0].info.run_id if runs else None


def finish_nested_runs(uri: str | None, parent_run_id: str, status: str = "KILLED", tag: str | None = None) -> int:
    """End the runs nested under `parent_run_id` that are still RUNNING (trials a scheduler stopped early, or that
    crashed) with `status`, tagging them `tag=true` when given; returns how many."""
    client = _client(uri)
    exp_id = client.get_run(parent_run_id).info.experiment_id
    count = 0
    for run in client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=10000):
        if run.info.status == "RUNNING":
            if tag:
                client.set_tag(run.info.run_id, tag, "true")
            client.set_terminated(run.info.run_id, status=status)
            count += 1
    return count


def start_job(cfg: Any) -> tuple[Path, Tracker]:
    """A job's output folder `<output_dir>/<name>` (created, holding the resolved config.yaml) and its MLflow run,
    named after the job, with the flattened config as parameters. `cfg` has output_dir, name and tracking."""
    from diffseg.config import save_config, to_dict

    out = job_dir(cfg.output_dir, cfg.name)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    tracker = Tracker(cfg.tracking, cfg.name)
    tracker.log_params(flatten(to_dict(cfg)))
    return out, tracker
