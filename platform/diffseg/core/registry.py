"""MLflow runs and models that other jobs look up: registered models (`resolve_model_uri` pins `models:/<name>@<alias>`
to the version the alias names now; `set_alias`), a sweep's nested runs, and runs ended by name (a Ray Train run's
attempts). The runs themselves: `diffseg.core.tracking`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from diffseg.core.tracking import FAILURE_TAG, TrackingConfig, _client


@dataclass(frozen=True)
class ModelRef:
    """What a model URI names: `pinned` is a URI whose target cannot move (a registered version, a logged model, a
    run's artifact, a path); for `models:/<name>@<alias>` the registered name, the version the alias names now and
    the alias."""

    uri: str  # as given
    pinned: str  # models:/<name>/<version> for an alias; else the URI itself
    registered_name: str | None = None
    version: str | None = None
    alias: str | None = None

    def info(self) -> dict[str, Any]:
        """What /v1/info shows of it (no paths)."""
        if not self.registered_name:
            return {}
        out = {"registered_model": self.registered_name, "model_version": self.version}
        return out | ({"alias": self.alias} if self.alias else {})


def resolve_model_uri(uri: str, tracking_uri: str | None = None) -> ModelRef:
    """Pin a model URI: `models:/<name>@<alias>` -> `models:/<name>/<version>` (the version the alias names now),
    `models:/<name>/<version>` as it is (with its name and version); anything else unchanged."""
    uri = str(uri)
    if not uri.startswith("models:/"):
        return ModelRef(uri, uri)
    body = uri[len("models:/") :].strip("/")
    if "@" in body:
        name, alias = body.rsplit("@", 1)
        version = str(_client(tracking_uri).get_model_version_by_alias(name, alias).version)
        return ModelRef(uri, f"models:/{name}/{version}", name, version, alias)
    if "/" in body:
        name, version = body.rsplit("/", 1)
        if version.isdigit():
            return ModelRef(uri, uri, name, version)
    return ModelRef(uri, uri)  # a logged model (models:/m-<id>) or a name without a version (MLflow: the latest)


def set_alias(name: str, alias: str, version: str | int, tracking_uri: str | None = None) -> None:
    """Point `models:/<name>@<alias>` at `version` (a deployment that names the alias serves it when redeployed)."""
    _client(tracking_uri).set_registered_model_alias(name, alias, str(version))


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


def end_runs_named(cfg: TrackingConfig, run_name: str, status: str, why: str, tracking_uri: str | None = None) -> int:
    """End the RUNNING top-level runs called `run_name` with `status` (a training driver whose workers died: the
    worker that owned the run cannot end it); tags why. Returns how many."""
    if not cfg.enabled:
        return 0
    client = _client(tracking_uri or cfg.uri)
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is None:
        return 0
    query = f"attributes.status = 'RUNNING' and attributes.run_name = '{run_name}'"
    count = 0
    for run in client.search_runs([exp.experiment_id], query, max_results=100):
        if "mlflow.parentRunId" in run.data.tags:
            continue
        client.set_tag(run.info.run_id, FAILURE_TAG, why)
        client.set_terminated(run.info.run_id, status=status)
        count += 1
    return count
