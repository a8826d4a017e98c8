"""Where and how code runs: the one device resolver, the one per-image seeding rule, logging, and starting Ray.

Every job, the training loop, the sweeps and the Serve replicas call these, so that a device string, a seed or a
cluster address means the same thing everywhere:

    resolve_device("auto")            cuda when this process sees a GPU, else cpu; any torch device string otherwise
    image_generators(seed, indices)   image i of a run seeded `seed` draws its noise from its own CPU generator,
                                      seeded `image_seed(seed, i)`: the same image from a job and from Serve, whatever
                                      else is in its batch and on whichever device the network runs
    init_ray(num_cpus)                `ray.init` with this checkout's code shipped to the workers (honours RAY_ADDRESS);
                                      tightens Ray's token file `~/.ray/auth_token` to 0600 (Ray writes it 0644)
    decide_gpu("auto", "train")       the one `use_gpu: auto` rule (Ray Train workers, feature actors, Serve replicas):
                                      GPUs when the cluster has them up OR its autoscaler can start a GPU node type
    setup_logging()                   what a job (or a Ray worker) shows: the library's `logging` records on stdout
    Progress(total, "img")            done/total, a smoothed rate and the ETA it gives (a bar when stdout is a terminal)
    PhaseLog("supervised", steps)     a long phase's progress lines by the clock (every 10 s) and its summary line
    local_ray_env(), serve_env()      the environment a local Ray starts in (loopback, its own temp folder) and the
                                      Serve start-up settings for a loaded machine (`SERVE_ENV_DEFAULTS`)

Ray is imported only inside `init_ray`; nothing here has a side effect at import time.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

SEED_STRIDE = 1_000_003  # a prime: (seed, index) pairs of any realistic range map to distinct generator seeds
# The process-wide opt-out of checkpoint integrity (`diffseg.models.integrity.unverified_allowed`): set by a job's
# `--allow-unverified` and by Serve's `allow_unverified: true`, handed on to Ray workers by `code_runtime_env`.
ALLOW_UNVERIFIED_ENV = "DIFFSEG_ALLOW_UNVERIFIED"


def unverified_allowed(allow_unverified: bool = False) -> bool:
    """Whether files without an integrity record may load (checkpoints, exports, feature sets): the caller's
    `allow_unverified`, or the process-wide opt-out `DIFFSEG_ALLOW_UNVERIFIED=1` (what `--allow-unverified` of every
    job and Serve's `allow_unverified: true` set; `code_runtime_env` hands it to Ray workers)."""
    return allow_unverified or os.environ.get(ALLOW_UNVERIFIED_ENV, "").strip().lower() in ("1", "true", "yes")


RAY_TOKEN_FILE = Path("~/.ray/auth_token")  # where `ray.init` writes the cluster token (token auth)


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """A config's device string as a torch device; "auto" (or None) picks CUDA when there is one."""
    if isinstance(spec, torch.device):
        return spec
    if spec in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(spec)
    except RuntimeError as e:
        raise ValueError(f"device: {spec!r} is not a torch device (use auto, cpu, cuda or cuda:N)") from e


def image_seed(seed: int, index: int) -> int:
    """The generator seed of image `index` in a run (a job, a request, a sample grid) seeded `seed`."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and image index must be >= 0, got seed={seed}, index={index}")
    return int(seed) * SEED_STRIDE + int(index)


def image_generators(seed: int, indices: Iterable[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded by `image_seed(seed, i)`: noise independent of batching and device."""
    return [torch.Generator().manual_seed(image_seed(seed, i)) for i in indices]


def code_runtime_env(extra_modules: Iterable[str | os.PathLike] = ()) -> dict[str, Any]:
    """Ship the diffseg package to every worker (`py_modules`), so a cluster needs no install of it; `extra_modules`
    are more package folders to ship (the Serve launcher's `serve/`).

    Local directories can only be shipped at the job level (`ray.init`); inside `ray job submit` Ray merges this
    with the job's own runtime env (its working_dir, env_vars). A job that opted out of checkpoint integrity
    (`ALLOW_UNVERIFIED_ENV`) hands the opt-out to its workers, and only then.
    """
    env: dict[str, Any] = {"py_modules": [str(Path(__file__).resolve().parents[1])]}  # diffseg, all its layers
    env["py_modules"] += [str(Path(m).resolve()) for m in extra_modules]
    env["worker_process_setup_hook"] = "diffseg.core.ray_worker.worker_setup"  # imports no torch
    if os.environ.get(ALLOW_UNVERIFIED_ENV):
        env["env_vars"] = {ALLOW_UNVERIFIED_ENV: os.environ[ALLOW_UNVERIFIED_ENV]}
    return env


def tighten_token_file(path: str | os.PathLike | None = None) -> bool:
    """Make Ray's token file (`~/.ray/auth_token`) owner-only (0600) when it exists and others may read or write it:
    Ray writes it with a plain `open` (0644 under the usual umask), and whoever reads it can run code on the
    cluster. True when the mode was changed."""
    token = Path(path or RAY_TOKEN_FILE).expanduser()
    try:
        st = token.stat()
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o077 or st.st_uid != os.getuid():
        return False
    os.chmod(token, 0o600)
    log.info("made %s owner-only (mode %o -> 600): it is the Ray cluster's credential", token, st.st_mode & 0o777)
    return True


# Ray Serve's start-up checks, tolerant of a loaded machine (read by Serve's controller, which inherits the
# environment of the process that starts Ray): Ray's 5 s proxy readiness check, missed three times in a row, shuts the
# controller down. On this 2-core machine beside two one-thread trainings the proxy took ~17 s to become ready.
# Set before Ray starts (`serve_env`); a value already in the environment wins.
SERVE_ENV_DEFAULTS = {
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",  # Ray: 5 (and 10, 15 on the retries)
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30",  # Ray: 10; three misses restart the proxy
}


def serve_env() -> dict[str, str]:
    """Put `SERVE_ENV_DEFAULTS` into this process's environment where unset (before Ray starts: Serve's controller
    reads them from the environment it inherits) and return the values in effect."""
    for key, value in SERVE_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in SERVE_ENV_DEFAULTS}


RAY_SCRATCH: Path | None = None  # the temp folder of the local Ray this process started (removed at exit)


@contextlib.contextmanager
def local_ray_env(local: bool = True) -> Iterator[Path | None]:
    """The environment a local Ray starts in (`init_ray` without `RAY_ADDRESS`); what its processes inherit:

    - loopback only: Ray's node address is 127.0.0.1 (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, the switch Ray reads to
      pick the node IP), so its GCS, raylets, dashboard agent, runtime-env agent and metrics ports listen on
      127.0.0.1 instead of every interface (they answered without credentials on the machine's address);
    - a private `TMPDIR`, removed when this process ends (after `ray.shutdown`): Ray's dashboard starts its modules
      through a multiprocessing forkserver, which left a `pymp-*` folder in /tmp on every start (its finaliser never
      runs: the dashboard is killed). Ray's own session folder stays where Ray puts it (`RAY_TMPDIR` pinned to it), so
      `ray status` and `serve` find the instance.

    This process's environment is put back afterwards. Nothing changes when Ray is joined (`local=False`); a caller's
    own `RAY_TMPDIR` keeps its temp folders where it says (no scratch folder then)."""
    if not local:
        yield None
        return
    import ray._private.ray_constants as ray_constants  # read by ray.init in this process to pick the node IP
    from ray._common.utils import get_default_system_temp_dir  # where this Ray puts /tmp/ray (RAY_TMPDIR, TMPDIR, /tmp)

    global RAY_SCRATCH
    keys = ("TMPDIR", "RAY_TMPDIR", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    saved = {key: os.environ.get(key) for key in keys}
    cached, cluster = tempfile.tempdir, ray_constants.ENABLE_RAY_CLUSTER
    scratch = None
    if "RAY_TMPDIR" not in os.environ:
        scratch = RAY_SCRATCH = Path(tempfile.mkdtemp(prefix="diffseg-ray-"))
        os.environ["RAY_TMPDIR"] = get_default_system_temp_dir()
        os.environ["TMPDIR"] = str(scratch)
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield scratch
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        tempfile.tempdir = cached  # this process's own temp dir never becomes the scratch folder
        ray_constants.ENABLE_RAY_CLUSTER = cluster
        if scratch is not None:
            atexit.register(_remove_scratch, scratch)  # before Ray's own exit handler: atexit runs newest first


def _remove_scratch(scratch: Path) -> None:
    try:
        import ray

        ray.shutdown()  # the local instance's processes end first (idempotent: Ray's atexit handler does it again)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def init_ray(num_cpus: int = 0, extra_modules: Iterable[str | os.PathLike] = ()) -> None:
    """Start (or join) Ray once per process: `RAY_ADDRESS` when set (a cluster, or `ray job submit`), else a local
    instance with `num_cpus` logical CPUs (0 = Ray's default). Already initialised: nothing happens.

    Ray's token file (`~/.ray/auth_token`, which `ray.init` creates for a new local cluster with a plain `open`) is
    made 0600 before and after (`tighten_token_file`). `ray.init` replaces the process's SIGTERM handler with its own
    `sys.exit(15)`, which would end a job's MLflow runs FAILED; a Python handler installed before (the job's: SIGTERM
    -> JobInterrupted -> KILLED) is put back."""
    import ray  # costs seconds: only when a job needs Ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {}
    if num_cpus and not os.environ.get("RAY_ADDRESS"):
        kwargs["num_cpus"] = num_cpus
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    tighten_token_file()
    try:
        with local_ray_env(local=not os.environ.get("RAY_ADDRESS")):
            ray.init(runtime_env=code_runtime_env(extra_modules), **kwargs)
    finally:
        tighten_token_file()
    if callable(before):  # ours (or the caller's): not SIG_DFL / SIG_IGN, which Ray's exit handler improves on
        signal.signal(signal.SIGTERM, before)


# ---------------------------------------------------------------------------------------------------- GPUs
AUTOSCALER_CONFIG_ENV = "DIFFSEG_AUTOSCALER_CONFIG"  # the autoscaler config to read (default: the launcher's)
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # where `ray up` leaves the autoscaler's config on the head node
log = logging.getLogger(__name__)


def autoscaler_config_path() -> Path:
    """The autoscaler config this process can read: $DIFFSEG_AUTOSCALER_CONFIG, else the cluster launcher's
    `~/ray_bootstrap_config.yaml` (on the head node, where job drivers run; the file Ray Tune also looks for)."""
    return Path(os.environ.get(AUTOSCALER_CONFIG_ENV) or BOOTSTRAP_CONFIG).expanduser()


def autoscaler_gpu_node_types(path: str | os.PathLike | None = None) -> dict[str, float]:
    """{node type: GPUs per node} of the worker node types the autoscaler may start (max_workers > 0) that have GPUs.

    The launcher writes each type's `resources` into its bootstrap config (filled in from the instance type when
    cluster.yaml leaves them `{}`), so `gpu_1x` of cluster.yaml reads `{"CPU": 8, "GPU": 1}` there. Empty when there
    is no config (a laptop, a `ray start` cluster) or it cannot be read."""
    path = Path(path).expanduser() if path else autoscaler_config_path()
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    if not isinstance(data, dict) or not isinstance(data.get("available_node_types"), dict):
        return {}
    cluster_max = data.get("max_workers", 1)
    found = {}
    for name, node_type in data["available_node_types"].items():
        if not isinstance(node_type, dict) or name == data.get("head_node_type"):
            continue  # the head is up already: its GPUs are in the live resources
        gpus = float((node_type.get("resources") or {}).get("GPU", 0) or 0)
        if gpus > 0 and node_type.get("max_workers", cluster_max) and cluster_max:
            found[str(name)] = gpus
    return found


@dataclass(frozen=True)
class GpuDecision:
    use_gpu: bool  # place the work on GPUs (one per Train worker, feature actor or model replica)
    reason: str  # why, in words (printed)


def decide_gpu(setting: Literal["auto", "yes", "no"] | str, what: str = "job", *, cluster: bool = True) -> GpuDecision:
    """THE `use_gpu` rule, printed: `yes`/`no` as written; `auto` = GPUs when the Ray cluster has GPUs up, or when
    its autoscaler can start a node type that has them (cluster.yaml starts GPU workers at min_workers 0, so a fresh
    cluster has none up); without a running Ray (or `cluster=False`), when this process sees a GPU."""
    if setting not in ("auto", "yes", "no"):
        raise ValueError(f"use_gpu: {setting!r} is not one of auto, yes, no")
    if setting != "auto":
        decision = GpuDecision(setting == "yes", f"use_gpu={setting}")
    else:
        ray = sys.modules.get("ray")  # only a process that already imported Ray can have it running
        if cluster and ray is not None and ray.is_initialized():
            live = float(ray.cluster_resources().get("GPU", 0))
            types = autoscaler_gpu_node_types() if not live else {}
            if live:
                decision = GpuDecision(True, f"the cluster has {live:g} GPU(s)")
            elif types:
                names = ", ".join(f"{n} ({g:g} GPU)" for n, g in types.items())
                decision = GpuDecision(True, f"no GPU node is up, but the autoscaler can start {names}")
            else:
                decision = GpuDecision(
                    False, f"the cluster has no GPUs and no autoscaler GPU node type ({autoscaler_config_path()})"
                )
        else:
            seen = torch.cuda.is_available()
            decision = GpuDecision(seen, "this process sees a GPU" if seen else "this process sees no GPU")
    log.info(f"[{what}] use_gpu={setting}: {'GPUs' if decision.use_gpu else 'CPUs only'} ({decision.reason})")
    return decision


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever `sys.stdout` is at the time of the record (a notebook's, a test's capture, a Ray log)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property always looks it up instead
        pass


# Third-party INFO records that say nothing a user acts on, once per report or step: shown from WARNING up only.
# A Ray Train worker's "Checkpoint successfully created at: ..." (storage.py, a logger named after the module) and
# "Reporting training result N: TrainingReport(...)" (context.py, a logger named after its FILE), two lines of ~300
# characters at every report; and the driver's runtime-env packaging ("Creating a file package ...", "Pushing ...",
# three lines per Ray start).
# (Ray Train's controller and workers log their own per-run INFO lines, filtered by their RunConfig's LoggingConfig:
# `training.ray_train`.)
# Ray Data's execution plan and its progress lines (20+ per extraction, beside our own `[extract]` progress) too.
QUIET_LOGGERS = ("ray.train.v2._internal.execution", "ray._private.runtime_env.packaging",
                 "ray.data._internal.progress", "ray.data._internal.execution.streaming_executor")  # fmt: skip
QUIET_FILE_LOGGERS = ("ray/train/v2/_internal/execution/context.py",)  # relative to the installed ray package


def quiet_third_party() -> None:
    """The `QUIET_LOGGERS` (and `QUIET_FILE_LOGGERS`) show warnings and errors only, in this process."""
    names = list(QUIET_LOGGERS)
    if "ray" in sys.modules:  # (never imported here for that: a job without Ray does not pay for it)
        ray_root = Path(sys.modules["ray"].__file__).parent.parent
        names += [str(ray_root / path) for path in QUIET_FILE_LOGGERS]
    for name in names:
        logging.getLogger(name).setLevel(logging.WARNING)


def setup_logging(level: int = logging.INFO, prefix: str = "") -> None:
    """Show the library's log records (`[train] step ...`) on stdout, once per process (jobs, Ray workers);
    `prefix` starts every line (the run's name, where several processes share one terminal). The `QUIET_LOGGERS`
    show warnings and errors only."""
    quiet_third_party()
    logger = logging.getLogger("diffseg")
    handler = next((h for h in logger.handlers if isinstance(h, _StdoutHandler)), None)
    if handler is None:
        handler = _StdoutHandler()
        logger.addHandler(handler)
        logger.propagate = False
    handler.setFormatter(logging.Formatter(prefix.replace("%", "%%") + "%(message)s"))
    logger.setLevel(level)


# ---------------------------------------------------------------------------------------------------- progress
def format_duration(seconds: float) -> str:
    """H:MM:SS with as many hours as it takes (a paper-size run is days)."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}"


class Progress:
    """How far a job is: done / total, a smoothed rate and the time left it gives, as one line of text.

    The rate is an exponential moving average of the rates between updates, weighted by the time each covers
    (`half_life_s`, at least three updates: a rate measured that long ago counts half), so one slow or fast interval
    on a shared machine moves the ETA a little instead of making it jump. With `bar` (default: when stdout is a
    terminal) the text ends with a bar, `|#####-----| 50%`.
    """

    def __init__(
        self,
        total: int,
        unit: str = "img",
        *,
        half_life_s: float = 30.0,
        bar: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total, self.unit, self.half_life_s, self.clock = int(total), unit, float(half_life_s), clock
        self.bar = sys.stdout.isatty() if bar is None else bar
        self.started = self._last_t = clock()
        self.done = self._last_done = 0
        self.rate: float | None = None  # smoothed units per second; None before the first measured interval
        self._intervals = 0

    def update(self, done: int) -> str:
        """Record `done` units finished so far; the progress text."""
        now = self.clock()
        dt, dn = now - self._last_t, done - self._last_done
        if dt > 0 and dn >= 0:
            rate = dn / dt
            # at least 3 updates per half-life, so long log intervals are smoothed too
            half_life = max(self.half_life_s, 3 * dt) if self.half_life_s > 0 else 0.0
            keep = math.exp(-dt * math.log(2) / half_life) if half_life > 0 else 0.0
            # The first interval holds the start-up (loading, the first step's kernels): a guess only, replaced by
            # the second rather than averaged in (a training's ETA fell from 8:22 to 2:15 over its first 100 steps).
            warm = self._intervals <= 1
            self.rate = rate if self.rate is None or warm else keep * self.rate + (1 - keep) * rate
            self._intervals += 1
            self._last_t, self._last_done = now, done
        if self.total and done >= self.total and now > self.started:  # the end: the whole run's mean rate (two
            self.rate = done / (now - self.started)  # shards arriving together read 19,124 img/s)
        self.done = done
        return self.text()

    def eta_s(self) -> float | None:
        """Seconds left at the smoothed rate (None before a rate is known)."""
        if not self.rate:
            return None
        return max(self.total - self.done, 0) / self.rate

    def text(self) -> str:
        eta = self.eta_s()
        rate = "?" if self.rate is None else f"{self.rate:.2f}" if self.rate < 1 else f"{self.rate:.1f}"
        rate = f"{rate} {self.unit}/s"
        out = f"{self.done}/{self.total} {self.unit}, {rate}, left {format_duration(eta) if eta is not None else '?'}"
        return out + (f" {bar}" if (bar := self.bar_text()) else "")

    def bar_text(self) -> str:
        """`|#####-----| 50%` when the bar is on, else ""."""
        if not (self.bar and self.total > 0):
            return ""
        frac = min(self.done / self.total, 1.0)
        filled = int(round(20 * frac))
        return f"|{'#' * filled}{'-' * (20 - filled)}| {100 * frac:.0f}%"


class PhaseLog:
    """A phase's progress in the log by the clock, not by steps: a line at most every `every_s` seconds (a phase
    that ends sooner stays quiet but for its summary), `[name] done/total unit, rate, left ETA` (`Progress`'s
    smoothed rate; `total=0`: an open-ended phase, no ETA), and one summary line at the end (`finish`):

        phase = PhaseLog("supervised", steps, "steps")
        for step in range(steps):
            ...
            phase.update(step + 1, lambda: f"loss {loss.item():.4f}")
        phase.finish()                    # [supervised] done: 1500 steps in 00:03:17 (7.6 steps/s)
    """

    def __init__(
        self,
        name: str,
        total: int = 0,
        unit: str = "steps",
        *,
        every_s: float = 10.0,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.name, self.unit, self.every_s, self.clock = name, unit, float(every_s), clock
        self.log = logger or log
        self.progress = Progress(max(int(total), 0), unit, bar=False, clock=clock)
        self.started = self._last_log = clock()
        self.done = 0

    def update(self, done: int, extra: str | Callable[[], str] = "") -> None:
        """`done` units so far; `extra` (a callable: only evaluated for a line, e.g. a loss that syncs a GPU)."""
        now = self.clock()
        self.done = done
        if now - self._last_log < self.every_s:
            return
        self._last_log = now
        extra = extra() if callable(extra) else extra
        text = self.progress.update(done)
        if not self.progress.total:  # open-ended: the count and the rate only
            text = text.split(", left", 1)[0].replace(f"{done}/0 ", f"{done} ", 1)
        self.log.info(f"[{self.name}] {text}{', ' + extra if extra else ''}")

    def finish(self, extra: str = "") -> float:
        """The summary line; returns the phase's seconds."""
        seconds = self.clock() - self.started
        rate = f" ({self.done / seconds:.1f} {self.unit}/s)" if seconds > 0 and self.done else ""
        tail = f", {extra}" if extra else ""
        self.log.info(f"[{self.name}] done: {self.done} {self.unit} in {format_duration(seconds)}{rate}{tail}")
        return seconds
