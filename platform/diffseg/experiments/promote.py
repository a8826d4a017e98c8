"""Move a registered model's alias and redeploy the Serve apps that serve it: the body of `jobs/promote.py`.

    python jobs/promote.py name=horse-seg alias=champion version=4      # models:/horse-seg@champion -> version 4

An alias is resolved when a Serve app is built (`serve.app.build_application`), so moving it changes nothing live by
itself, and deploying the same config again does not rebuild the app either: Serve compares the config it is given
with the one it runs, and `models:/horse-seg@champion` reads the same before and after. This job (1) points the alias
at the version, (2) finds, through the Ray dashboard's Serve API, every running app whose `segmenter`, `pixel` or
`sampler` is `models:/<name>@<alias>`, (3) redeploys the running config with `promoted: <name>@<alias>=<version>`
added to those apps' args (a changed config: Serve rebuilds them, which resolves the alias again and replaces their
replicas, a rolling update without stopping Serve) and (4) waits until each app's /v1/info shows the new version.
"""

from __future__ import annotations

import copy
import json
import logging
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

from diffseg.core.config import ConfigError, UserError
from diffseg.core.registry import resolve_model_uri, set_alias
from diffseg.core.submit import auth_hint, job_address

log = logging.getLogger(__name__)
MODEL_ARGS = ("segmenter", "pixel", "sampler")  # the app args that name a model source


@dataclass(frozen=True)
class PromoteConfig:
    name: str = ""  # the registered model (what tracking.register_as registered)
    alias: str = "champion"  # the alias to move
    version: int = 0  # the version the alias names from now on
    address: str | None = None  # the Ray dashboard (http://127.0.0.1:8265); None = $RAY_API_SERVER_ADDRESS, else
    # $RAY_ADDRESS when it is an http URL, else http://127.0.0.1:8265
    redeploy: bool = True  # also redeploy the running Serve apps that serve models:/<name>@<alias>
    wait_s: float = 600.0  # wait this long for each redeployed app's /v1/info to show the version (0 = do not wait)
    tracking_uri: str | None = None  # the MLflow registry; None = $MLFLOW_TRACKING_URI, else mlflow.db here

    def check(self) -> None:
        if not self.name or self.version < 1:
            raise ValueError(f"name and version (>= 1) are required (name={self.name!r}, version={self.version})")

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@{self.alias}"


def apps_serving(details: dict[str, Any], uri: str) -> tuple[list[str], list[str]]:
    """(config-deployed apps whose model args name `uri`, apps deployed from Python, which cannot be redeployed
    from here) of the dashboard's Serve details."""
    found, imperative = [], []
    for name, app in (details.get("applications") or {}).items():
        config = app.get("deployed_app_config")
        if config is None:
            imperative.append(name)
        elif any((config.get("args") or {}).get(key) == uri for key in MODEL_ARGS):
            found.append(name)
    return found, imperative


def promoted_config(details: dict[str, Any], apps: list[str], pin: str) -> dict[str, Any]:
    """The running Serve config (every app: a PUT replaces them all) with `promoted: <pin>` in the args of `apps`."""
    config: dict[str, Any] = {"applications": []}
    for key in ("proxy_location", "http_options", "grpc_options"):
        if details.get(key) is not None:
            config[key] = details[key]
    for name, app in details["applications"].items():
        app_config = copy.deepcopy(app["deployed_app_config"])
        if name in apps:
            args = app_config.setdefault("args", {})
            key = pin.split("=", 1)[0]
            kept = [p for p in str(args.get("promoted") or "").split(",") if p and p.split("=", 1)[0] != key]
            args["promoted"] = ",".join([*kept, pin])
        config["applications"].append(app_config)
    return config


def app_info_url(details: dict[str, Any], app: str) -> str:
    http = details.get("http_options") or {}
    host = http.get("host") or "127.0.0.1"
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    prefix = (details["applications"][app].get("route_prefix") or "/").rstrip("/")
    return f"http://{host}:{http.get('port', 8000)}{prefix}/v1/info"


def served_versions(url: str, name: str) -> set[str]:
    """The versions of registered model `name` that /v1/info at `url` says it serves (empty when unreachable)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 - a URL built from Serve's own options
            models = json.loads(r.read()).get("models", {})
    except (OSError, ValueError):
        return set()
    return {str(m.get("model_version")) for m in models.values() if m.get("registered_model") == name}


def run_promote(cfg: PromoteConfig) -> dict[str, Any]:
    """Move the alias, redeploy the apps that serve it and wait until they serve the version; a summary."""
    cfg.check()
    version = str(cfg.version)
    try:
        before = resolve_model_uri(cfg.uri, cfg.tracking_uri).version
    except Exception:  # a new alias (or none yet): nothing named it before
        before = None
    try:
        set_alias(cfg.name, cfg.alias, version, cfg.tracking_uri)
    except Exception as e:  # no such model or version: MLflow's message names it
        raise ConfigError(f"name, version: {cfg.uri} -> {version}: {e}") from e
    log.info(f"[promote] {cfg.uri}: version {before or '(none)'} -> {version}")
    summary: dict[str, Any] = {"uri": cfg.uri, "before": before, "version": version, "redeployed": []}
    if not cfg.redeploy:
        return summary
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient  # costs seconds: only when redeploying
    from ray.exceptions import AuthenticationError

    address = job_address(cfg.address)
    try:
        client = ServeSubmissionClient(address)
        details = client.get_serve_details()
    except AuthenticationError:
        raise UserError(auth_hint(address)) from None
    except ConnectionError as e:
        raise UserError(f"address: no Ray dashboard at {address} ({e}); pass address=http://<head>:8265") from None
    apps, imperative = apps_serving(details, cfg.uri)
    if imperative:
        log.warning(
            f"[promote] Serve app(s) {imperative} were deployed from Python (serve.run), not from a config: "
            "redeploy them there (serve.run(build_app(args)) resolves the alias again)"
        )
    if not apps:
        log.info(f"[promote] no running Serve app (config-deployed) serves {cfg.uri}: nothing to redeploy")
        return summary
    if imperative:
        raise UserError(
            f"Serve runs apps from a config ({apps}) and from Python ({imperative}): a config deploy would remove "
            "the Python ones; redeploy by hand"
        )
    pin = f"{cfg.name}@{cfg.alias}={version}"
    try:
        client.deploy_applications(promoted_config(details, apps, pin))
    except AuthenticationError:
        raise UserError(auth_hint(address)) from None
    log.info(f"[promote] redeploying {apps} (args.promoted: {pin}); Serve replaces their replicas one by one")
    summary["redeployed"] = apps
    deadline = time.monotonic() + cfg.wait_s
    for app in apps if cfg.wait_s > 0 else []:
        url = app_info_url(details, app)
        while (seen := served_versions(url, cfg.name)) != {version}:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{app}: {url} still serves version(s) {sorted(seen)} after {cfg.wait_s:.0f} s")
            time.sleep(2.0)
        log.info(f"[promote] {app}: {url} serves {cfg.name} version {version}")
    return summary
