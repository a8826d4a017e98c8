"""MLflow tracking: every job is a run (params: the config keys that differ from their defaults, and the whole resolved
config as `config.yaml`; `split/name` metrics, system metrics, images by step, artifacts, the git SHA and job file of
`diffseg.core.provenance`), and its models are MLflow models, registered on request.

MLflow is imported lazily (it costs seconds to import) and every call is a no-op when tracking is disabled. The
store is `tracking.uri`, else `MLFLOW_TRACKING_URI`, else a SQLite file `mlflow.db` in the working directory (MLflow
3's own default); `resolve_paths` makes it an absolute URI in the driver (`sqlite:///mlflow.db` included), so Ray
workers, trials and submitted jobs write to the same file. Experiments on a SQLite store keep their artifacts beside
it, in `<folder of mlflow.db>/mlartifacts/<experiment>/` (MLflow would otherwise fix the artifact root from whatever
the working directory is when the experiment is first created: a Ray worker's temp folder, say).

How a run ends: FINISHED when its job returns; FAILED when it raises; KILLED when it is interrupted (Ctrl-C, or
SIGTERM, which `ray job stop` sends: `diffseg.experiments.launch.run_job` turns it into `JobInterrupted`). A process
that dies without a word (SIGKILL, the OOM killer, a lost node) cannot end its run; every run records its host and
process (`diffseg.host`, `diffseg.pid`, `diffseg.pid_start`), and the next run started in the experiment on that host
marks the runs whose process is gone FAILED (`reap_dead_runs`).

Models: `log_pyfunc_model` logs an MLflow model (the flavor `diffseg.serving.pyfunc` writes) under the run and, with
`register_as`, registers it as a new version of that registered model. `diffseg.core.registry.resolve_model_uri` pins
`models:/<name>@<alias>` to the version the alias names now (what Serve deploys and shows in /v1/info).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np

from diffseg.core.config import (
    WORKDIR_ENV,
    ConfigError,
    PathField,
    dumps,
    is_submitted_job,
    job_dir,
    save_config,
    to_dict,
    workdir,
)
from diffseg.core.provenance import git_tags, source_tags

log = logging.getLogger(__name__)
SQLITE = "sqlite:///"
ARTIFACTS_DIR = "mlartifacts"  # beside a SQLite store: <folder of mlflow.db>/mlartifacts/<experiment>/<run>/artifacts
HOST_TAG, PID_TAG, PID_START_TAG = "diffseg.host", "diffseg.pid", "diffseg.pid_start"
FAILURE_TAG = "diffseg.failure"  # why a run was ended FAILED / KILLED by someone else than its own process
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  # the UI's model-training view, not GenAI
# The library's source folder (diffseg/): MLflow models carry a copy, so `mlflow.pyfunc.load_model` works anywhere.
CODE_DIR = Path(__file__).resolve().parents[1]  # the diffseg package (this file is diffseg/core/tracking.py)
# What a pyfunc model needs installed besides its copied code (no inference: it would call pip, which needs an index).
DISPLAY_SIZE = 768  # images logged by step are enlarged to about this many pixels (the longer side) when smaller
MODEL_REQUIREMENTS = ("torch", "numpy", "pillow", "pyyaml", "scipy", "safetensors", "mlflow")
# A run's params are the config keys that differ from their defaults (`config_params`), and these even at their default:
# what the run is, at a glance in the runs table. MLflow's image charts print every param of a run above its image;
# the whole config (about 120 keys for a training) pushed the image out of the card (issue 37).
IDENTIFYING_PARAMS = ("name", "model.kind", "data.name")
# Where a run writes and which store records it: in its config.yaml, never params (resolved, they always differ).
NOT_PARAMS = ("output_dir", "tracking")


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
    system_metrics: bool = True  # log CPU, memory, disk, network and GPU use as system/... metrics while the run lives
    system_metrics_every: float = 10.0  # seconds between two system-metric samples
    log_models: bool = True  # log the job's model(s) as MLflow models (pyfunc, with signature and input example)
    register_as: str | None = None  # also register the logged model under this name (one new version per model)


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite store (`<db folder>/mlartifacts/<experiment>`);
    None for a tracking server or another database (the server's own artifact root applies)."""
    if not uri.startswith(SQLITE + "/"):
        return None
    folder = Path(uri[len(SQLITE) :]).parent / ARTIFACTS_DIR
    return str(folder / (re.sub(r"[^A-Za-z0-9._-]", "_", experiment) or "experiment"))


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


def _under(key: str, paths: Iterable[str]) -> bool:
    """Whether config key `key` is one of `paths` or lies under one (`tracking.uri` under `tracking`)."""
    return any(key == p or key.startswith(p + ".") for p in paths)


def config_params(cfg: Any, keep: Iterable[str] = (), drop: Iterable[str] = ()) -> dict[str, Any]:
    """The params of a run started with config `cfg` (a config dataclass): the flattened keys whose value differs from
    the default of `cfg`'s class, plus `IDENTIFYING_PARAMS` and the keys under `keep` (a sweep's swept keys) at any
    value, less `NOT_PARAMS` and the keys under `drop`. The whole config goes to the run as `config.yaml`
    (`Tracker.log_config`): a key missing from the params holds its default there."""
    values = flatten(to_dict(cfg))
    try:
        defaults = flatten(to_dict(type(cfg)()))
    except TypeError:  # a class with required fields has no defaults to compare with: every key
        defaults = {}
    keep = (*IDENTIFYING_PARAMS, *keep)
    return {
        k: v
        for k, v in values.items()
        if (_under(k, keep) or k not in defaults or defaults[k] != v) and not _under(k, (*NOT_PARAMS, *drop))
    }


# ---------------------------------------------------------------------------------------------------- run status
class JobInterrupted(KeyboardInterrupt):
    """SIGTERM as an exception (`ray job stop`, `kill`, a preempted node): the job unwinds and its runs end KILLED."""


def status_for(exc: BaseException | None) -> str:
    """The MLflow status of a run whose job ended with `exc`: FINISHED, KILLED (an interrupt) or FAILED."""
    if exc is None or (isinstance(exc, SystemExit) and exc.code in (0, None)):
        return "FINISHED"
    return "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"


_LIVE: dict[str, Tracker] = {}  # the runs this process started or resumed and has not ended, in start order
_LIVE_LOCK = threading.Lock()


def end_live_runs(exc: BaseException | None) -> int:
    """End every run this process still has open with the status `exc` calls for (newest first: children before
    their parent); what `run_job` does when a job raises, so no run is left RUNNING. Returns how many."""
    with _LIVE_LOCK:
        live = list(_LIVE.values())[::-1]
    for tracker in live:
        tracker.finish(status_for(exc))
    return len(live)


def current_run_id() -> str | None:
    """The newest run this process has open, or None: a job called from inside another job's run (the extraction of
    a comparison, say) nests its own run under it."""
    with _LIVE_LOCK:
        return next(reversed(_LIVE), None) if _LIVE else None


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """While the block runs (in the main thread), SIGTERM raises `JobInterrupted` instead of ending the process on
    the spot, so `finally` blocks, atomic writes and run statuses complete. The previous handler is put back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    received: list[int] = []

    def interrupt(signum, frame):
        received.append(signum)
        raise JobInterrupted(f"terminated by signal {signal.Signals(signum).name}")

    before = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    except KeyboardInterrupt as e:
        # Ray's blocking calls (`ray.get`, so Ray Train's `fit()`) run signal handlers inside their C++ wait and turn
        # whatever the handler raised into a bare KeyboardInterrupt: a SIGTERM is still a SIGTERM (exit 143, KILLED).
        if received and not isinstance(e, JobInterrupted):
            raise JobInterrupted(f"terminated by signal {signal.Signals(received[0]).name}") from e
        raise
    finally:
        signal.signal(signal.SIGTERM, before)


@contextlib.contextmanager
def process_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking URI is `uri` while the block runs (for the fluent calls that take no URI), then
    what it was: a URI the process pinned (`mlflow.set_tracking_uri`) is pinned again, one that came from
    `$MLFLOW_TRACKING_URI` is left to the environment (a later change of the variable takes effect). `set_tracking_uri`
    alone would pin the old value for good and write it into the environment, where every later job would read it."""
    import mlflow

    before, env = mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)  # unpinned (this also clears $MLFLOW_TRACKING_URI)
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env
        if mlflow.get_tracking_uri() != before:  # the process had pinned its own
            mlflow.set_tracking_uri(before)
            if env is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = env


def _process_start(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), None when there is no such process."""
    import psutil  # an MLflow dependency (system metrics)

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def _process_tags() -> dict[str, str]:
    start = _process_start(os.getpid())
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), PID_START_TAG: f"{start or 0:.3f}"}


def reap_dead_runs(uri: str | None = None, experiment: str = "diffseg") -> list[str]:
    """Mark FAILED the RUNNING runs of `experiment` whose process, on this host, is gone (killed by SIGKILL or the
    OOM killer: it could not say so itself); returns their ids. Runs of other hosts are left alone (their process
    cannot be checked from here). Every new top-level Tracker calls this."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    return _reap(client, exp.experiment_id) if exp else []


def _reap(client: Any, experiment_id: str) -> list[str]:
    host = socket.gethostname()
    query = f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'"
    reaped = []
    for run in client.search_runs([experiment_id], query, max_results=1000):
        tags = run.data.tags
        try:
            pid, started = int(tags[PID_TAG]), float(tags.get(PID_START_TAG, 0))
        except (KeyError, ValueError):
            continue
        now = _process_start(pid)
        if now is not None and (not started or abs(now - started) < 1.0):
            continue  # alive (the same process, not a reused pid)
        why = f"process {pid} on {host} ended without ending its run (killed: SIGKILL, out of memory, ...)"
        client.set_tag(run.info.run_id, FAILURE_TAG, why)
        client.set_terminated(run.info.run_id, status="FAILED")
        log.warning("MLflow run %s (%s): %s; marked FAILED", run.info.run_id, run.info.run_name, why)
        reaped.append(run.info.run_id)
    return reaped


# ---------------------------------------------------------------------------------------------------- the run
def _lost_dataset_insert_race(e: BaseException) -> bool:
    """Whether `e` is the SQL store's unique-key failure on its `datasets` table (another run inserted the same data
    set between this run's lookup and its insert)."""
    text = str(e)
    return "UNIQUE constraint failed: datasets." in text or ("duplicate key" in text and "datasets" in text)


class Tracker:
    """One MLflow run (or nothing, when disabled). Resumes a run by id so a restarted job keeps one history.

    As a context manager it ends the run with the status of how the block ended (FINISHED, FAILED, KILLED).
    """

    def __init__(
        self,
        cfg: TrackingConfig,
        run_name: str,
        run_id: str | None = None,
        tracking_uri: str | None = None,
        parent_run_id: str | None = None,
    ):
        self.enabled = cfg.enabled
        self.cfg = cfg
        self.run_id: str | None = None
        self.uri: str | None = None
        self._monitor = None
        self._ended = False
        self._logged_until = -1  # a resumed run: the last step it had logged (not logged again)
        if not self.enabled:
            return
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "1")
        import mlflow

        self._mlflow = mlflow
        with _LIVE_LOCK:  # a nested run goes to its parent's store when the parent is open in this process
            parent = _LIVE.get(parent_run_id) if parent_run_id else None
        self.uri = parent.uri if parent is not None and parent.uri else resolve_tracking_uri(tracking_uri or cfg.uri)
        self._client = mlflow.MlflowClient(tracking_uri=self.uri)
        resumed = run_id is not None
        if resumed:
            self._resume_run(run_id)
        else:
            run_id = self._create_run(run_name, parent_run_id)
        self.run_id = run_id
        with _LIVE_LOCK:
            _LIVE[run_id] = self
        # A child run in its parent's process shares the parent's machine: one monitor is enough.
        if cfg.system_metrics and parent_run_id not in _LIVE:
            self._start_monitor(resumed)

    def _create_run(self, run_name: str, parent_run_id: str | None) -> str:
        """A new run in the experiment (a nested one in its parent's), tagged with this process and the git state; a
        top-level run first marks the experiment's runs whose process is gone FAILED (`reap_dead_runs`)."""
        if parent_run_id is None:
            exp_id = experiment_id(self._client, self.uri, self.cfg.experiment)
            _reap(self._client, exp_id)
        else:  # a nested run lives in its parent's experiment, whatever its own config names (the UI nests it there)
            from mlflow.exceptions import MlflowException

            try:
                exp_id = self._client.get_run(parent_run_id).info.experiment_id
            except MlflowException:  # the parent is in another store: the run's own experiment, tagged with it
                exp_id = experiment_id(self._client, self.uri, self.cfg.experiment)
        tags = {"mlflow.runName": run_name, **_process_tags(), **source_tags()}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        tags.update(git_tags())
        return self._client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id

    def _resume_run(self, run_id: str) -> None:
        """A run continued by id: RUNNING again, living in this process now, and without the failure tag of how it
        stopped before (a resume that finishes leaves it FINISHED, not FINISHED with a stale reason to doubt it)."""
        self._client.update_run(run_id, status="RUNNING")
        run = self._client.get_run(run_id)
        if FAILURE_TAG in run.data.tags:
            self._client.delete_tag(run_id, FAILURE_TAG)
        # The steps the run logged before it stopped: a resume from an earlier checkpoint trains them again, and their
        # points went in twice (a chart showed step 125 twice). Points at those steps are not logged again.
        steps = [m.step for key in run.data.metrics if not key.startswith("system/")
                 for m in self._client.get_metric_history(run_id, key)]  # fmt: skip
        self._logged_until = max(steps, default=-1)
        for key, value in _process_tags().items():
            self._client.set_tag(run_id, key, value)

    def _start_monitor(self, resumed: bool) -> None:
        # MLflow's own monitor (what `mlflow.start_run(log_system_metrics=True)` starts), on this run by id: our runs
        # are client runs, not the fluent API's thread-local active run.
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        try:
            self._monitor = SystemMetricsMonitor(
                self.run_id,
                sampling_interval=self.cfg.system_metrics_every,
                resume_logging=resumed,
                tracking_uri=self.uri,
            )
            self._monitor.start()
        except Exception as e:  # monitoring is a convenience: a job never fails for it
            log.warning("system metrics are not logged: %s", e)
            self._monitor = None

    def _stop_monitor(self) -> None:
        if self._monitor is None:
            return
        monitor, self._monitor = self._monitor, None
        try:
            monitor.finish()
            # One last sample, so a run shorter than the sampling interval still has its system metrics.
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()
        except Exception as e:
            log.warning("system metrics: the last sample was not logged: %s", e)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(status_for(exc))

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        flat = flatten(params)
        items = [Param(k, str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self._client.log_batch(self.run_id, params=items[i : i + 100])

    def log_config(
        self,
        cfg: Any,
        *,
        keep: Iterable[str] = (),
        drop: Iterable[str] = (),
        prefix: str = "",
        artifact_file: str = "config.yaml",
    ) -> None:
        """What the run was started with: the keys of `cfg` that differ from their defaults as params
        (`config_params(cfg, keep, drop)`, each name after `prefix`), and the whole resolved config as the artifact
        `artifact_file`, which `--config` reads back to the same config."""
        if not self.enabled:
            return
        self.log_params({prefix + k: v for k, v in config_params(cfg, keep, drop).items()})
        self.log_text(dumps(cfg), artifact_file)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        if step is not None and step <= self._logged_until:  # logged before the resume (see _resume_run)
            return
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self._client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.enabled:
            for k, v in tags.items():
                self._client.set_tag(self.run_id, k, str(v))

    def log_data_input(self, data: Any, context: str = "training") -> None:
        """The data set a run read, as an MLflow dataset input (the UI's Dataset column, with `context`): named after
        its folder (or `synthetic`), its source the folder (or the generator and seed), its profile the data config
        (sizes, splits), its digest a hash of those. `data` is a data config (`diffseg.data.datasets.DataConfig`)."""
        if not self.enabled:
            return
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.exceptions import MlflowException

        profile = to_dict(data)
        root = profile.get("root")
        name = Path(str(root)).name if root else str(profile.get("name", "data"))
        source = {"uri": str(root)} if root else {"generator": name, "seed": profile.get("seed")}
        text = json.dumps({"name": name, "source": source, "profile": profile}, sort_keys=True, default=str)
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        dataset = Dataset(name, digest, "local" if root else "code", json.dumps(source), None, json.dumps(profile))
        inputs = [DatasetInput(dataset, [InputTag("mlflow.data.context", context)])]
        # MLflow's SQL store looks a data set up, then inserts it when missing: two runs of one experiment starting
        # together on the same data (a sweep's trials, two jobs) can both miss it, and the second insert fails on the
        # (experiment, name, digest) key. The row then exists, so the retry finds it and only links this run.
        for attempt in range(3):
            try:
                self._client.log_inputs(self.run_id, inputs)
                return
            except MlflowException as e:  # only the lost insert race is retried
                if attempt == 2 or not _lost_dataset_insert_race(e):
                    raise
                time.sleep(0.05 * (attempt + 1))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.enabled:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.enabled:
            self._client.log_text(self.run_id, text, artifact_file)

    def log_image(self, image: Any, key: str, step: int) -> None:
        """An image (uint8 (H, W, 3) array or PIL image) under `key` at `step`: the run's model-metrics charts show it
        with a step slider, so sample grids and mask figures can be followed over training. MLflow's image chart opens
        at step 0 (only a key with a single step opens at that step): a key logged at several steps has one at step
        0, or the chart opens on "No image logged at this step" (the training loop logs its images at step 0)."""
        if not self.enabled or step <= self._logged_until:  # a resumed run's steps before the resume: logged then
            return
        arr = np.asarray(image)
        if 0 < max(arr.shape[:2]) < DISPLAY_SIZE:  # a grid of 32 px tiles: enlarged (nearest) so the UI shows it
            k = DISPLAY_SIZE // max(arr.shape[:2])
            arr = arr.repeat(k, axis=0).repeat(k, axis=1)
        self._client.log_image(self.run_id, arr, key=key, step=int(step))

    def log_pyfunc_model(
        self,
        name: str,
        data_path: str | os.PathLike,
        *,
        loader_module: str,
        signature: Any,
        input_example: Any,
        metadata: Mapping[str, Any] | None = None,
        step: int = 0,
        register_as: str | None = None,
    ) -> LoggedModel | None:
        """Log `data_path` as an MLflow pyfunc model of this run, loaded by `loader_module._load_pyfunc` from a copy of
        the library's code (`code/diffseg`), and register it as a new version of `register_as` when given (else of
        `tracking.register_as`). None when tracking or model logging is off.

        `signature` is a `mlflow.models.ModelSignature`; MLflow checks `input_example` by loading the model and
        predicting on it before anything is uploaded, so a model that cannot serve its own example is never logged.
        """
        if not (self.enabled and self.cfg.log_models):
            return None
        register_as = register_as or self.cfg.register_as
        with process_tracking_uri(self.uri):  # Model.log and register_model use the process-wide URI
            info = self._log_model(name, data_path, loader_module, signature, input_example, metadata, step)
            version = self._register(info.model_uri, name, register_as) if register_as else None
        ref = LoggedModel(info.model_uri, info.model_id, register_as if version else None, version)
        log.info("MLflow model %s%s", ref.model_uri, f" registered as {ref.registered_uri}" if version else "")
        return ref

    def _log_model(
        self,
        name: str,
        data_path: str | os.PathLike,
        loader_module: str,
        signature: Any,
        input_example: Any,
        metadata: Mapping[str, Any] | None,
        step: int,
    ) -> Any:
        """`Model.log` of the pyfunc flavor with a clean copy of the library's code, as a logged model of the run's
        experiment; its `ModelInfo`."""
        mlflow = self._mlflow
        from mlflow.models import Model

        # The model belongs to the run's experiment (Model.log alone would put it in the process's active one).
        run = self._client.get_run(self.run_id)
        model = self._client.create_logged_model(
            run.info.experiment_id, name=name, source_run_id=self.run_id, params=run.data.params
        )
        with tempfile.TemporaryDirectory(prefix="diffseg-code-") as tmp:
            code = stage_code(Path(tmp))
            return Model.log(
                None,  # artifact_path: deprecated, `name` replaces it
                name=name,
                model_id=model.model_id,
                flavor=mlflow.pyfunc,
                run_id=self.run_id,
                loader_module=loader_module,
                data_path=str(data_path),
                code_paths=[str(code)],
                signature=signature,
                input_example=input_example,
                pip_requirements=model_requirements(),
                metadata=dict(metadata or {}),
                step=int(step),
            )

    def _register(self, model_uri: str, name: str, register_as: str) -> str:
        """A new version of the registered model `register_as`, tagged on the run; its version."""
        mv = self._mlflow.register_model(model_uri, register_as, tags={"diffseg.run_id": self.run_id})
        version = str(mv.version)
        self.set_tags({f"diffseg.registered.{name}": f"{register_as}/{version}"})
        return version

    def finish(self, status: str = "FINISHED") -> None:
        if not (self.enabled and self.run_id) or self._ended:
            return
        self._ended = True
        self._stop_monitor()
        with _LIVE_LOCK:
            _LIVE.pop(self.run_id, None)
        self._client.set_terminated(self.run_id, status=status)


@dataclass(frozen=True)
class LoggedModel:
    """An MLflow model a run logged, and its registered version (when registered)."""

    model_uri: str  # models:/m-<id>: the logged model itself
    model_id: str
    registered_name: str | None = None
    version: str | None = None

    @property
    def registered_uri(self) -> str | None:
        """models:/<name>/<version>, or None when not registered."""
        return f"models:/{self.registered_name}/{self.version}" if self.version else None


def stage_code(folder: Path) -> Path:
    """A clean copy of the library's source (`.py` files only, no caches) as `folder/diffseg`; returns the copy."""
    dst = folder / CODE_DIR.name

    def ignore(folder: str, names: list[str]) -> list[str]:  # keep the subpackages (the layers), drop all but .py
        return [n for n in names if n == "__pycache__" or not (n.endswith(".py") or Path(folder, n).is_dir())]

    shutil.copytree(CODE_DIR, dst, ignore=ignore)
    return dst


def model_requirements() -> list[str]:
    """The pinned requirements of a pyfunc model: the versions running now."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in MODEL_REQUIREMENTS:
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            out.append(name)
    return out


# ---------------------------------------------------------------------------------------------------- registry


def experiment_id(client: Any, uri: str, name: str) -> str:
    """The id of experiment `name`, created with its artifacts beside a SQLite store (`artifact_location`)."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(
                name, artifact_location=artifact_location(uri, name), tags=dict([EXPERIMENT_KIND])
            )
        except MlflowException:  # created by another process meanwhile
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if EXPERIMENT_KIND[0] not in exp.tags:  # the UI then opens it as a model-training experiment (runs, models)
        client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
    wanted = artifact_location(uri, name)
    if wanted and exp.artifact_location.removeprefix("file://") != wanted:
        log.warning(
            "MLflow experiment %r keeps its artifacts in %s, not beside its store (%s/): it was created elsewhere or "
            "by an older version; set tracking.experiment to another name to start one there",
            name, exp.artifact_location, str(Path(wanted).parent),
        )  # fmt: skip
    return exp.experiment_id


def prepare_store(cfg: TrackingConfig, tracking_uri: str | None = None) -> None:
    """Create the tracking store and the experiment now, in this process (nothing when tracking is off). Processes
    started together on a fresh SQLite store would otherwise all migrate it at once, and Alembic's migration is not
    safe against that (`CommandError: Online migration expected to match one row`): a parallel job calls this in
    the driver before it starts its workers."""
    if cfg.enabled:
        uri = resolve_tracking_uri(tracking_uri or cfg.uri)
        experiment_id(_client(uri), uri, cfg.experiment)


def _client(uri: str | None):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "1")
    import mlflow

    return mlflow.MlflowClient(tracking_uri=resolve_tracking_uri(uri))


def start_job(cfg: Any) -> tuple[Path, Tracker]:
    """A job's output folder `<output_dir>/<name>` (created, holding the resolved config.yaml) and its MLflow run,
    named after the job, with the config (`Tracker.log_config`). `cfg` has output_dir, name and tracking.

    The run is live until the job calls `finish`, uses the tracker as a context manager, or raises out of
    `run_job` (which ends it FAILED or KILLED)."""
    out = job_dir(cfg.output_dir, cfg.name)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    tracker = Tracker(cfg.tracking, cfg.name)
    tracker.log_config(cfg)
    data = getattr(cfg, "data", None)
    if data is not None and hasattr(data, "root") and hasattr(data, "image_size"):  # a DataConfig: what it reads
        tracker.log_data_input(data, context="input")
    return out, tracker
