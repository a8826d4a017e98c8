"""`python jobs/serve_app.py`: run the Serve app from a Serve config file, checked first and failing in one line.

    python jobs/serve_app.py                                   # serve/config.yaml on a local Ray: http://127.0.0.1:8000
    python jobs/serve_app.py serve_config=my_serve.yaml        # another Serve config file (Serve's own format)
    python jobs/serve_app.py http_options.port=8001            # Serve's http_options, changed
    python jobs/serve_app.py args.segmenter=null args.pixel=runs/demo/segmenter_ddpm.pt   # the app's args, changed
    python jobs/serve_app.py address=127.0.0.1:6379 block=false   # deploy on a running cluster and return

It reads the same file as `serve run serve/config.yaml` (Serve's schema: `proxy_location`, `http_options`,
`applications` with `import_path: serve.app:build_app`, `args`, `deployments`) and adds what `serve run` lacks:

- every application is built before Ray starts: its args checked and its model files verified, so a missing, damaged
  or unsealed file ends the command at once with one line naming it (`serve run` printed it four times with
  tracebacks over ~27 s, then stayed up answering 404 on /healthz);
- a deploy that fails anyway (a replica that cannot load its model) exits 1 with Serve's reason in one line, after
  removing what it deployed;
- Serve starts on a loaded machine (`diffseg.core.runtime.SERVE_ENV_DEFAULTS`: Ray's 5 s proxy readiness check,
  missed three times beside two trainings, shut the controller down), and when the start still fails the line says
  why (from the controller's log) and which setting to raise;
- the local Ray is the jobs' own (`init_ray`): token file 0600, every port on 127.0.0.1, no /tmp leftovers;
- Ctrl-C and SIGTERM remove the apps (and stop the local Ray) and exit 130 / 143.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffseg.core.config import (
    ConfigError,
    ConfigPath,
    UserError,
    find_config,
    from_dict,
    load_yaml,
    merge,
    resolve_paths,
)
from diffseg.core.runtime import init_ray, serve_env
from diffseg.serving.app_config import ServeAppConfig, check_app_args, deployment_names

SERVE_DIR = Path(__file__).resolve().parent  # this package, shipped to the replicas with diffseg
IMPORT_PATH = "serve.app:build_app"
TOP_KEYS = ("proxy_location", "http_options", "grpc_options", "logging_config", "applications")
APP_KEYS = ("name", "route_prefix", "import_path", "args", "deployments", "runtime_env", "logging_config")
log = logging.getLogger("diffseg.serve")


class ServeStartError(UserError):
    """Serve did not start or an application did not deploy: the reason in one line."""


@dataclass(frozen=True)
class ServeLaunchConfig:
    """What `jobs/serve_app.py` runs: a Serve config file, changes to its application's args, where to run it."""

    serve_config: ConfigPath = "serve/config.yaml"  # a Serve config file (relative: from here, else the checkout's)
    application: str | None = None  # the application `args` changes (needed only when the file has several)
    args: dict[str, Any] = field(default_factory=dict)  # changes to its args: args.pixel=x.pt, args.segmenter=null
    http_options: dict[str, Any] = field(default_factory=dict)  # changes to Serve's: http_options.port=8001
    address: str | None = None  # a running Ray cluster (host:port); default $RAY_ADDRESS, else a new local Ray
    num_cpus: int = 0  # CPUs of a new local Ray (0: all of this machine's)
    block: bool = True  # false: deploy, print the URL and return (a local Ray would end with this process)
    ready_timeout_s: float = 300.0  # an application not running by then ends the command (with the reason)

    def check(self) -> None:
        if not self.block and not (self.address or os.environ.get("RAY_ADDRESS")):
            raise ConfigError("block: false needs a running cluster (address=host:port): a local Ray ends with the job")


def load_serve_config(cfg: ServeLaunchConfig) -> dict[str, Any]:
    """The Serve config file with `cfg.args` merged into its application's args; refuses what this launcher cannot
    run, naming the key."""
    path = find_config(cfg.serve_config)
    config = load_yaml(path)
    unknown = sorted(set(config) - set(TOP_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; a Serve config has {list(TOP_KEYS)}")
    apps = config.get("applications")
    if not isinstance(apps, list) or not apps or not all(isinstance(a, dict) for a in apps):
        raise ConfigError(f"{path}: applications: expected a list of applications (name, route_prefix, args, ...)")
    for i, app in enumerate(apps):
        where = f"{path}: applications[{i}]"
        bad = sorted(set(app) - set(APP_KEYS))
        if bad:
            raise ConfigError(f"{where}: unknown key(s) {bad}; an application has {list(APP_KEYS)}")
        if app.get("import_path") != IMPORT_PATH:
            raise ConfigError(f"{where}.import_path: {app.get('import_path')!r}; this launcher runs {IMPORT_PATH}")
        if app.get("runtime_env"):
            raise ConfigError(f"{where}.runtime_env: not supported here (the code is shipped); use `serve deploy`")
    if cfg.http_options:
        config["http_options"] = merge(config.get("http_options") or {}, cfg.http_options)
    if cfg.args:
        names = [a.get("name", "default") for a in apps]
        if cfg.application is None and len(apps) > 1:
            raise ConfigError(f"args: {path} has {len(apps)} applications {names}; name one with application=<name>")
        if cfg.application is not None and cfg.application not in names:
            raise ConfigError(f"application: {cfg.application!r} is not in {path} (it has {names})")
        target = apps[0] if cfg.application is None else apps[names.index(cfg.application)]
        before = _app_config(target.get("args") or {})
        target["args"] = merge(target.get("args") or {}, cfg.args)
        dropped = set(deployment_names(before)) - set(deployment_names(_app_config(target["args"])))
        kept = [d for d in target.get("deployments") or [] if d.get("name") not in dropped]
        if dropped and len(kept) < len(target.get("deployments") or []):
            log.info("[serve] deployments: %s left out (the changed args create no such deployment)", sorted(dropped))
            target["deployments"] = kept
    return config


def _app_config(args: dict[str, Any]) -> ServeAppConfig:
    check_app_args(args)
    return from_dict(ServeAppConfig, args, prefix="args")


def build_all(config: dict[str, Any]) -> list[tuple[dict[str, Any], Any]]:
    """Every application built here, before Ray starts (`build_application`: args checked, paths resolved, model
    files verified); the first that fails ends the command with its one-line reason."""
    from serve.app import build_application

    built = []
    for app in config["applications"]:
        name = app.get("name", "default")
        try:
            built.append((app, build_application(app.get("args") or {}, app.get("deployments"))))
        except (ValueError, FileNotFoundError) as e:  # ConfigError and CheckpointError are ValueErrors
            raise ServeStartError(f"application {name}: {e}") from e
    return built


def cause_from_controller_log() -> str | None:
    """Why Serve's controller gave up, from its log on this machine (a local Ray): the proxy's missed readiness
    checks, else the log's last error line."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    if node is None:
        return None
    logs = sorted(Path(node.get_logs_dir_path(), "serve").glob("controller_*.log"))
    text = "\n".join(p.read_text(errors="replace") for p in logs)
    missed = re.findall(r"readiness check for proxy .*? didn't complete in ([0-9.]+)s", text)
    if missed:
        now = os.environ.get("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "5")
        return (
            f"Serve's HTTP proxy did not become ready in time ({len(missed)} readiness checks missed, the last after "
            f"{missed[-1]} s; the machine is busy?): set RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S higher than {now} "
            "and start again"
        )
    errors = [line.strip() for line in text.splitlines() if " ERROR " in line]
    return errors[-1] if errors else None


def _deploy_failure(name: str, error: Exception) -> str:
    """One line for an application that did not deploy: each failed deployment and the last line of Serve's message
    for it (the replica's error: the file, for a model that does not load)."""
    from serve.app import _failed_deployments

    try:
        from ray import serve

        names = list(serve.status().applications[name].deployments)
    except Exception:
        names = []
    failed = _failed_deployments(names, app=name) if names else {}
    if failed:
        return f"application {name} did not deploy: " + "; ".join(f"{d} is {why}" for d, why in failed.items())
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"application {name} did not deploy: {lines[-1] if lines else type(error).__name__}"


def run_serve(cfg: ServeLaunchConfig) -> dict[str, str]:
    """Build, start, deploy, then serve until interrupted (or return at once with block=false); the URLs."""
    cfg = resolve_paths(cfg)
    config = load_serve_config(cfg)
    built = build_all(config)  # before Ray: a bad file costs no Ray start
    for key, value in serve_env().items():
        log.info("[serve] %s=%s", key, value)
    if cfg.address:
        os.environ["RAY_ADDRESS"] = cfg.address
    local = not os.environ.get("RAY_ADDRESS")
    init_ray(cfg.num_cpus, extra_modules=[SERVE_DIR])
    from ray import serve

    deployed: list[str] = []
    http = {"host": "127.0.0.1", **(config.get("http_options") or {})}  # loopback unless the config says otherwise
    try:
        try:
            serve.start(http_options=http, proxy_location=config.get("proxy_location"),
                        grpc_options=config.get("grpc_options"))  # fmt: skip
        except Exception as e:
            first = f"{type(e).__name__}: {e}".strip().splitlines()[0]
            cause = (cause_from_controller_log() if local else None) or first
            raise ServeStartError(f"Serve did not start: {cause}") from e
        urls = {}
        host, port = http["host"], http.get("port", 8000)
        for app, application in built:
            name, prefix = app.get("name", "default"), app.get("route_prefix", "/")
            t0 = time.perf_counter()
            deployed.append(name)
            try:
                _run_within(cfg.ready_timeout_s, serve.run, application, name=name, route_prefix=prefix,
                            blocking=False, logging_config=app.get("logging_config"))  # fmt: skip
            except TimeoutError as e:
                cause = (cause_from_controller_log() if local else None) or "its replicas or Serve's proxy are not up"
                raise ServeStartError(
                    f"application {name} was not running after ready_timeout_s={cfg.ready_timeout_s:g} s: {cause}"
                ) from e
            except RuntimeError as e:  # Serve's "Deploying application <name> failed: <replica traceback>"
                raise ServeStartError(_deploy_failure(name, e)) from e
            except Exception as e:  # the controller itself died (ActorDiedError): its log says why
                cause = (cause_from_controller_log() if local else None) or str(e).strip().splitlines()[0]
                raise ServeStartError(f"application {name} did not deploy: {cause}") from e
            urls[name] = f"http://{host}:{port}{prefix}"
            try:  # deployed is not serving: Serve's proxy may still fail its readiness checks (a loaded machine)
                _wait_healthy(urls[name], t0 + cfg.ready_timeout_s)
            except TimeoutError as e:
                cause = (cause_from_controller_log() if local else None) or str(e)
                raise ServeStartError(
                    f"application {name} did not answer on {urls[name].rstrip('/')}/healthz within "
                    f"ready_timeout_s={cfg.ready_timeout_s:g} s: {cause}"
                ) from e
            log.info("[serve] %s deployed in %.1f s: %s (health: %s/healthz)", name, time.perf_counter() - t0,
                     urls[name], urls[name].rstrip("/"))  # fmt: skip
        print(f"serving {', '.join(f'{n} at {u}' for n, u in urls.items())}", flush=True)
        if not cfg.block:
            return urls
        while True:  # until Ctrl-C or SIGTERM (run_job: exit 130 / 143)
            time.sleep(3600)
    except BaseException:
        _take_down(deployed, local)
        raise


def _run_within(timeout_s: float, fn, *args, **kwargs):
    """`fn(*args, **kwargs)` (Serve's `serve.run`, which waits for the application without a limit: a proxy that never
    passes its readiness check kept it waiting for good) with a deadline: TimeoutError after `timeout_s`. The wait
    stays in this thread, so Ctrl-C and SIGTERM still end the command."""
    result: dict[str, Any] = {}

    def call():
        try:
            result["value"] = fn(*args, **kwargs)
        except BaseException as e:  # handed to the waiting thread
            result["error"] = e

    worker = threading.Thread(target=call, name="serve-run", daemon=True)
    worker.start()
    deadline = time.monotonic() + timeout_s
    while worker.is_alive():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not running after {timeout_s:g} s")
        worker.join(0.5)
    if "error" in result:
        raise result["error"]
    return result.get("value")


def _wait_healthy(url: str, deadline: float) -> None:
    """Until the app's /healthz answers 200 over HTTP (the proxy, the ingress and every model replica: what a client
    needs), or TimeoutError past `deadline` (time.monotonic) with the last answer: a 503's reason, or no answer."""
    import urllib.error
    import urllib.request

    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/healthz", timeout=5) as answer:
                if answer.status == 200:
                    return
        except urllib.error.HTTPError as e:  # 503 with the reason; 404 while the proxy has no route yet
            try:
                last = f"{e.code}: {json.loads(e.read())['error']['message']}"
            except Exception:
                last = f"HTTP {e.code}"
        except OSError as e:  # refused, reset, timed out: the proxy is not listening (yet)
            last = f"no answer ({getattr(e, 'reason', e)})"
        time.sleep(1)
    raise TimeoutError(f"/healthz: {last}")


def _take_down(apps: list[str], local: bool) -> None:
    """Remove what this command deployed: the whole Serve instance when it runs on the local Ray started here, else
    only this command's applications (a shared cluster's other apps stay)."""
    from ray import serve

    try:
        if local:
            serve.shutdown()
        else:
            for name in apps:
                serve.delete(name)
    except Exception as e:  # the reason the command ends comes first
        log.warning("[serve] could not remove %s: %s", apps or "Serve", e)
