"""Ray Tune sweeps over config paths: feature recipes (blocks x timesteps), pixel-MLP sizes, K, learning rates.

    result = run_sweep(base_cfg, {"features.blocks": [["dec.3"], ["dec.4", "dec.5"]],
                                  "features.timesteps": [[50], [50, 150]]}, metric="val/miou", mode="max")
    result.table, result.best_config   # one row per trial (swept paths + metrics, best first); the best config
    result.best_model                  # the best trial's servable model (best/segmenter.pt or best/checkpoint.pt)

The space is keyed by dotted config paths (those of `key.path=value` overrides). A value is a list (a grid), a Tune
domain, `{grid|choice: [...]}`, `{uniform|loguniform|randint|...: [lo, hi]}` or `{subset: {of: [...], max: 3}}` (any
set of decoder blocks or timesteps; `diffseg.experiments.space`: what YAML can say). A sweep
only sweeps: each trial runs a task of `diffseg.experiments.trials` (label-efficient "pixel" trials for a
`PixelTrialConfig`, "factorized" trials for a factorized `TrainConfig`), which reports `split/name` metrics of the one
evaluation path after each of `num_reports` chunks of its training (ASHA's time unit) and leaves a servable model.

The sweep is one MLflow run (results table, plot, best config, the best model); every trial a nested run. A sweep
interrupted by Ctrl-C or a lost driver continues with `run_sweep(..., resume=True)` (Tune's restore, same parent
run). Tables and plots: `diffseg.core.report`; the command line: `jobs/sweep.py`.

Trust: resuming unpickles Tune's state in the experiment folder, so it is restored only if `diffseg.core.trust` proves
it is this user's (owner and permissions, and an HMAC recorded under a per-user key kept outside the folder when the
driver stopped, over only the files that run wrote); otherwise the resume is refused before anything is read. A new
sweep does not start in a folder that already holds state files Tune would restore. `jobs/sweep.py --trust-state`
signs a folder whose driver was killed before it could.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import ray
import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator

from diffseg.core import storage
from diffseg.core.config import (
    ConfigError,
    ConfigPath,
    Name,
    OutputPath,
    check_name,
    find_config,
    from_dict,
    job_dir,
    load_config,
    load_yaml,
    merge,
    replace,
    resolve_paths,
    save_config,
    set_path,
    to_dict,
    workdir,
)
from diffseg.core.registry import find_nested_run, finish_nested_runs
from diffseg.core.report import chosen_markdown, frame_to_markdown, plot_sweep, sweep_table, trial_overrides
from diffseg.core.runtime import init_ray, resolve_device, setup_logging
from diffseg.core.tracking import Tracker, TrackingConfig, flatten, resolve_tracking_uri, status_for
from diffseg.core.trust import (
    DriverRun,
    UntrustedState,
    check_fresh,
    check_permissions,
    check_state,
    key_path,
    recheck_state,
)
from diffseg.core.trust import trust_state as vouch_for_state
from diffseg.experiments.space import build_param_space, expected_trials, space_example
from diffseg.experiments.trials import (
    BEST_MODEL,
    PixelTrialConfig,
    TrialState,
    check_pixel_protocol,
    check_pixel_sweep,
    factorized_chunks,
    fold_split,
    pixel_chunks,
    pixel_final,
)
from diffseg.serving.pyfunc import log_bundle_model, log_checkpoint_model, model_name
from diffseg.training.config import TrainConfig

log = logging.getLogger(__name__)
SUMMARY = "summary.json"  # a pixel sweep's chosen recipe: validation and test figures (in <exp>/best/)


# ---------------------------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class SchedulerConfig:
    kind: Literal["fifo", "asha"] = "fifo"  # fifo: every trial runs to the end; asha: stop weak trials early
    grace_period: int = 1  # ASHA: reports a trial makes before it may be stopped
    reduction_factor: float = 2.0  # ASHA: 1 / reduction_factor of the trials go on at each rung


@dataclass(frozen=True)
class TrialResources:
    cpu: float = 1.0  # CPUs reserved per trial (a trial launching a TorchTrainer needs few: its workers reserve theirs)
    gpu: float = 0.0  # GPUs per trial (fractions pack several small trials on one GPU)


@dataclass(frozen=True)
class SweepConfig:
    name: Name = "sweep"  # the experiment folder under output_dir; the same name + resume=True resumes it
    task: Literal["auto", "pixel", "factorized"] = "auto"  # what a trial does; auto = from the base config's type
    base_config: ConfigPath | None = None  # YAML of the base config (relative: to the sweep's YAML); None = defaults
    base_overrides: dict[str, Any] = field(default_factory=dict)  # applied to the base config (dotted or nested keys)
    space: dict[str, Any] = field(default_factory=dict)  # config path -> values (see the module docstring)
    search: Literal["grid", "random", "optuna"] = "grid"  # grid/random: Tune's variant generator; optuna: TPE
    num_samples: int = 1  # grid: repeats of the whole grid; random/optuna: number of trials
    metric: str = "val/miou"  # the metric key to optimise (split/name, as reported); pixel: a val/ key, never test/
    folds: int = 5  # pixel: k-fold validation over the labelled images (k >= 2; each trial trains k ensembles)
    mode: Literal["max", "min"] = "max"  # whether the best trial has the largest or the smallest metric
    num_reports: int = 1  # evaluations per trial: training is split into this many chunks (ASHA's time unit)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)  # fifo or asha
    resources: TrialResources = field(default_factory=TrialResources)  # per trial
    max_concurrent_trials: int = 0  # 0 = as many as the resources allow
    max_failures: int = 0  # retries of a failed trial (from its last report)
    seed: int = 0  # seed of the random/optuna samplers
    segment_t: int = 30  # factorized: the noise level at which real images are segmented
    fg_reduction: Literal["best_single", "best_subset", "fixed"] = "best_single"  # factorized: K regions -> fg
    output_dir: OutputPath = "runs/sweeps"  # experiments live in <output_dir>/<name>
    cache_dir: OutputPath | None = None  # feature-shard cache; None = <output_dir>/feature_cache (shared across sweeps)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # MLflow (parent run + one nested run per trial)

    def __post_init__(self):
        if self.num_reports < 1:
            raise ValueError(f"num_reports must be >= 1, got {self.num_reports}")

    def check(self) -> None:
        """Cross-field checks (run by --dry-run and before the job)."""
        if not self.space:
            raise ValueError("space: nothing to sweep; give {config path: values}")
        build_param_space(self.space, self.search)  # the space's syntax (a subset's min/max, a sampler's name)
        if self.task == "pixel":
            check_pixel_sweep(self.metric, self.folds, self.space)


def task_of(base: Any, task: str = "auto") -> str:
    if task != "auto":
        return task
    if isinstance(base, PixelTrialConfig):
        return "pixel"
    if getattr(getattr(base, "model", None), "kind", None) == "factorized":
        return "factorized"
    raise ValueError(
        f"cannot tell the trial kind from a {type(base).__name__}: pass a PixelTrialConfig, a factorized TrainConfig, "
        "or task='pixel'/'factorized'"
    )


def base_config_class(task: str) -> type:
    return PixelTrialConfig if task == "pixel" else TrainConfig


# ---------------------------------------------------------------------------------------------------- base
def apply_overrides(cfg: Any, overrides: Mapping[str, Any]) -> Any:
    """`cfg` with dotted and/or nested overrides merged key by key (a section that is None takes a whole mapping)."""
    nested: dict[str, Any] = {}
    for key, value in flatten(overrides).items():
        set_path(nested, key.split("."), value)
    return from_dict(type(cfg), merge(to_dict(cfg), nested))


# ---------------------------------------------------------------------------------------------------- trials
def sweep_trial(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    """The Tune function trainable: decode the trial's values, run the task's chunks, report after each."""
    setup_logging()
    torch.set_num_threads(max(1, int(ctx["threads"])))
    sweep, task = from_dict(SweepConfig, ctx["sweep"]), ctx["task"]
    overrides = trial_overrides(config, ctx["keys"])
    # A swept value may be a location (a backbone): relative ones mean what they mean in the driver's directory.
    cfg = resolve_paths(replace(from_dict(base_config_class(task), ctx["base"]), **overrides), ctx["workdir"])
    tctx = tune.get_context()
    trial_id, trial_name = tctx.get_trial_id(), tctx.get_trial_name()
    trial_dir = storage.join(ctx["experiment_dir"], "trials", trial_id)  # a folder or a URI
    storage.makedirs(trial_dir)
    state = TrialState()
    if (checkpoint := tune.get_checkpoint()) is not None:  # a restored or retried trial continues where it was
        with checkpoint.as_directory() as d:
            state = TrialState(**json.loads((Path(d) / "trial_state.json").read_text()))
    if state.mlflow_run_id is None and sweep.tracking.enabled:  # restarted before its first report: reuse its run
        tags = {"diffseg.trial_id": trial_id}
        state.mlflow_run_id = find_nested_run(ctx["tracking_uri"], ctx["parent_run_id"], tags)
    tracker = Tracker(sweep.tracking, run_name=trial_name, run_id=state.mlflow_run_id,
                      tracking_uri=ctx["tracking_uri"], parent_run_id=ctx["parent_run_id"])  # fmt: skip
    if not state.mlflow_run_id:
        tracker.log_config(cfg, keep=overrides)  # the swept keys, also at their default
        tracker.set_tags({"diffseg.sweep": sweep.name, "diffseg.trial_id": trial_id, "diffseg.task": task,
                          **{f"sweep.{k}": json.dumps(v) for k, v in overrides.items()}})  # fmt: skip
        tracker.log_data_input(cfg.data, "training")  # a trial reads its training data only (pixel: folds of it)
        state.mlflow_run_id = tracker.run_id
    device = resolve_device("auto" if sweep.resources.gpu > 0 else "cpu")
    if task == "pixel":
        chunks = pixel_chunks(cfg, state, trial_dir, num_reports=sweep.num_reports, device=device,
                              cache_root=ctx["cache_dir"], folds=sweep.folds)  # fmt: skip
    else:
        chunks = factorized_chunks(cfg, state, trial_dir, num_reports=sweep.num_reports, device=device,
                                   segment_t=sweep.segment_t, fg_reduction=sweep.fg_reduction)  # fmt: skip
    try:
        for metrics in chunks:
            state.report += 1
            tracker.log_metrics(metrics, step=state.report)
            if state.report == sweep.num_reports:
                tracker.finish()  # before the last report: Tune may end the trial right after it
            with tempfile.TemporaryDirectory() as d:
                (Path(d) / "trial_state.json").write_text(json.dumps(dataclasses.asdict(state)))
                tune.report({**metrics, "trial_id": trial_id}, checkpoint=tune.Checkpoint.from_directory(d))
    except Exception as e:  # a crashed trial's run is FAILED (one the scheduler stops is ended KILLED by the driver)
        tracker.finish(status_for(e))
        raise


# ---------------------------------------------------------------------------------------------------- driver
class SweepInterrupted(KeyboardInterrupt):
    """The sweep was stopped (Ctrl-C, SIGTERM) before every trial ended; its state is saved, no "best" is published,
    and `resume=True` (`jobs/sweep.py --resume`) continues it. A KeyboardInterrupt: a job ends with its message in one
    line and status 130, its MLflow run KILLED."""


class TuneStopSignal(logging.Handler):
    """Whether Tune received a stop signal during `Tuner.fit` (Ctrl-C in a terminal reaches the trials' processes
    too, so they may all end, and the grid alone then looks finished). Tune keeps that flag in a local of its own
    loop; the one public trace of it is the warning it logs, which this handler watches for (Ray 2.60's text)."""

    TEXT = "Stop signal received"

    def __init__(self):
        super().__init__(logging.WARNING)
        self.seen = False

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.getMessage()).startswith(self.TEXT):
            self.seen = True

    def __enter__(self) -> TuneStopSignal:
        logging.getLogger("ray.tune.tune").addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("ray.tune.tune").removeHandler(self)


@dataclass
class SweepResult:
    table: Any  # pandas DataFrame, one row per trial, best first
    best: dict[str, Any]  # the best trial's values of the swept paths
    best_config: Any  # the base config with them applied
    best_metrics: dict[str, float]  # the best trial's last report (pixel: validation only, val/*)
    path: Path | str  # the experiment folder (a URI when output_dir is one)
    parent_run_id: str | None  # the sweep's MLflow run
    plot: Path | None = None  # results.png
    best_model: Path | str | None = None  # best/segmenter.pt or best/checkpoint.pt: Serve loads it as it is
    test_metrics: dict[str, float] = field(default_factory=dict)  # pixel: the chosen recipe's one test scoring


def _scheduler(sweep: SweepConfig) -> ASHAScheduler | None:
    if sweep.scheduler.kind == "fifo":
        return None
    return ASHAScheduler(time_attr="training_iteration", max_t=sweep.num_reports,
                         grace_period=min(sweep.scheduler.grace_period, sweep.num_reports),
                         reduction_factor=sweep.scheduler.reduction_factor)  # fmt: skip


def _search_alg(sweep: SweepConfig):
    if sweep.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch  # lazily: optuna loads only for the sweeps that use it

        return OptunaSearch(seed=sweep.seed)
    return BasicVariantGenerator(random_state=sweep.seed) if sweep.search == "random" else None


def run_sweep(
    base: Any, space: Mapping[str, Any] | None = None, sweep: SweepConfig | None = None, *, resume: bool = False,
    **options: Any,
) -> SweepResult:  # fmt: skip
    """Run a Tune search over `space` (dotted config paths) around `base`; returns the table and the best config.

    :param base: the base config: a `PixelTrialConfig` (label-efficient trials) or a factorized `TrainConfig`.
    :param space: {config path: values}; see the module docstring. Overrides `sweep.space` when given.
    :param sweep: the sweep's settings; `**options` are `SweepConfig` fields (dotted keys allowed) applied on top,
        e.g. `metric="test/miou", num_reports=3, **{"scheduler.kind": "asha", "resources.gpu": 0.5}`.
    :param resume: continue the interrupted sweep `<output_dir>/<name>` (Tune's restore: finished trials are kept,
        unfinished ones continue from their last report, errored ones are rerun). Without it an existing experiment
        folder is an error, so a sweep is never silently mixed with an older one.

    Starts Ray when it is not running (`init_ray`: RAY_ADDRESS when set, so on a cluster the trials spread over its
    nodes; `output_dir` must then be shared storage visible to every node, e.g. `s3://bucket/sweeps`). Locations of
    the sweep and of the base config are resolved here, in the driver (trials run in other directories).
    """
    sweep = replace(sweep or SweepConfig(), **({"space": dict(space)} if space is not None else {}), **options)
    base_dir = workdir()
    sweep = resolve_paths(sweep, base_dir)
    if not sweep.space:
        raise ValueError("space: nothing to sweep; give {config path: values}")
    task = task_of(base, sweep.task)
    if sweep.base_overrides:  # nested sections merge key by key (`data: {image_size: 16}` keeps the other data fields)
        base = apply_overrides(base, sweep.base_overrides)
    base = resolve_paths(base, base_dir)
    keys = list(sweep.space)
    for key in keys:  # fail before any trial starts on a path the base config does not have (or a bad value)
        if (probe := space_example(key, sweep.space[key])) is not None:
            replace(base, **{key: probe})
    if task == "pixel":  # before Ray or any trial: test images never choose the recipe
        check_pixel_sweep(sweep.metric, sweep.folds, sweep.space)
        check_pixel_protocol(base, sweep.folds)
    out, remote = sweep.output_dir, storage.is_remote(sweep.output_dir)
    exp_dir = storage.join(out, check_name(sweep.name)) if remote else job_dir(out, sweep.name)
    state_file = storage.join(exp_dir, "sweep.json")
    if not resume and storage.exists(state_file):
        raise FileExistsError(f"{exp_dir} holds a sweep already: pass resume=True (jobs/sweep.py --resume) to "
                              "continue it, or choose another name")  # fmt: skip
    trusted: dict[str, str] = {}  # the state files the resume check verified
    # Whether Tune restores is decided HERE, by the same look that the trust check makes, never again later: a
    # `tuner.pkl` that appears while Ray starts (another user's, in a folder they can write) is not restored.
    restoring = resume and storage.exists(storage.join(exp_dir, "tuner.pkl"))
    if restoring:  # Tune's restore unpickles the folder
        if remote:
            raise UntrustedState(
                f"{exp_dir}: resuming a sweep unpickles Tune's state, and one on object storage cannot be proven "
                "yours (anyone who can write the bucket could have written it). Copy it to a local folder only you "
                "can write, sign it there (jobs/sweep.py --trust-state) and resume from that output_dir, or start a "
                "new sweep"
            )
        trusted = check_state(exp_dir)  # only the user's own
    elif not remote:
        if Path(exp_dir).is_dir():  # a folder others can write could be given state while this sweep runs
            check_permissions(exp_dir)
        check_fresh(exp_dir, keep=("sweep.json",))  # a new Tune run: nothing it would restore may be there already
    # what is there now is not this run's to sign; sweep.json is the driver's own (rewritten below)
    driver = None if remote else DriverRun(exp_dir, trusted, own=("sweep.json",))
    init_ray()
    cache_dir = sweep.cache_dir or storage.join(out, "feature_cache")
    uri = resolve_tracking_uri(sweep.tracking.uri)
    parent_run_id = json.loads(storage.read_text(state_file))["parent_run_id"] if storage.is_file(state_file) else None
    parent = Tracker(sweep.tracking, run_name=sweep.name, run_id=parent_run_id, tracking_uri=uri)
    if parent_run_id is None:
        parent.log_config(sweep, drop=("space",), prefix="sweep.")  # (the space: a tag)
        parent.log_config(base, prefix="base.", artifact_file="base_config.yaml")
        parent.set_tags({"diffseg.sweep": sweep.name, "diffseg.task": task,
                         "diffseg.space": json.dumps(to_dict(sweep.space))[:5000]})  # fmt: skip
        parent.log_data_input(base.data, "training")  # (its test split: the images the chosen recipe is scored on)
        if getattr(base, "test_data", None) is not None:  # test images from elsewhere
            parent.log_data_input(base.test_data, "test")
    storage.makedirs(exp_dir)
    storage.write_text(state_file, json.dumps({"parent_run_id": parent.run_id, "task": task, "sweep": to_dict(sweep),
                                               "base": to_dict(base)}, indent=1, default=str))  # fmt: skip
    ctx = {"sweep": to_dict(sweep), "task": task, "base": to_dict(base), "keys": keys, "experiment_dir": str(exp_dir),
           "cache_dir": str(cache_dir), "tracking_uri": uri, "parent_run_id": parent.run_id,
           "threads": max(1, math.floor(sweep.resources.cpu)), "workdir": str(base_dir)}  # fmt: skip
    resources = {"cpu": sweep.resources.cpu, "gpu": sweep.resources.gpu}
    trainable = tune.with_resources(tune.with_parameters(sweep_trial, ctx=ctx), resources)
    param_space = build_param_space(sweep.space, sweep.search)
    if not remote:  # the folder again, at the moment Tune reads it: unchanged since the check
        recheck_state(exp_dir, restoring, trusted, own=("sweep.json",))
    if restoring:
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=sweep.metric, mode=sweep.mode, search_alg=_search_alg(sweep), scheduler=_scheduler(sweep),
                num_samples=sweep.num_samples, max_concurrent_trials=sweep.max_concurrent_trials or None,
                trial_dirname_creator=lambda t: f"trial_{t.trial_id}",
                reuse_actors=True,  # trials reuse warm worker processes (imports, CUDA context): seconds per trial
            ),
            run_config=tune.RunConfig(
                name=sweep.name, storage_path=str(out), verbose=1,
                failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            ),
        )  # fmt: skip
    # Tune installs its own SIGINT handler for the run and leaves it in place unless a signal arrives; put the
    # caller's back either way, so a notebook's Ctrl-C works again after the sweep.
    on_main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if on_main else None
    try:
        with TuneStopSignal() as stop_signal:
            grid = tuner.fit()
    finally:
        if handler is not None:
            signal.signal(signal.SIGINT, handler)
        try:  # however the driver stops (but SIGKILL), sign what this run wrote, so that resume=True may restore it
            if driver is not None:
                driver.sign()
        except (OSError, UntrustedState) as e:
            log.warning("could not sign the sweep state in %s (a resume will be refused): %s", exp_dir, e)
    unfinished = len(grid) - grid.num_terminated - grid.num_errors
    table = sweep_table(grid, keys, sweep.metric, sweep.mode)
    missing = len(grid) < expected_trials(param_space, sweep.num_samples)  # trials never started
    if unfinished or missing or stop_signal.seen:  # Ctrl-C: Tune saved its state; no trial's model is the "best"
        storage.write_text(storage.join(exp_dir, "results_partial.csv"), table.to_csv(index=False))
        parent.finish("KILLED")
        raise SweepInterrupted(
            f"sweep {sweep.name!r} was interrupted with {len(grid)} of "
            f"{expected_trials(param_space, sweep.num_samples)} trials started and {unfinished} unfinished; continue "
            f"it with run_sweep(..., resume=True) (same name and output_dir) or `python jobs/sweep.py --config ... "
            f"--resume`. State: {exp_dir}"
        )
    if "status" in table.columns:  # a trial with fewer reports than asked was stopped early by the scheduler
        done = table["reports"] >= sweep.num_reports
        table["status"] = np.where(table["status"] == "ERROR", "ERROR", np.where(done, "DONE", "STOPPED"))
    if sweep.tracking.enabled:
        finish_nested_runs(uri, parent.run_id, "KILLED", tag="diffseg.stopped_early")
    if sweep.metric not in table.columns or table[sweep.metric].isna().all():
        parent.finish("FAILED")
        errors = [str(r.error) for r in grid if r.error][:3]
        raise RuntimeError(f"no trial of sweep {sweep.name!r} reported {sweep.metric!r}; errors: {errors}")
    best_res = grid.get_best_result(sweep.metric, sweep.mode, scope="last", filter_nan_and_inf=True)
    best = trial_overrides(best_res.config, keys)
    best_config = replace(base, **best)
    best_metrics = {k: v for k, v in (best_res.metrics or {}).items() if "/" in k and isinstance(v, (int, float))}
    best_trial = str(best_res.metrics.get("trial_id"))
    summary = None
    if task == "pixel":  # the chosen recipe, retrained on all the labelled images and scored once on test
        summary = score_chosen(sweep, best_config, best, best_trial, best_metrics, len(table), exp_dir, ctx)
        source = storage.join(exp_dir, "best", BEST_MODEL[task])
    else:
        source = storage.join(exp_dir, "trials", best_trial, BEST_MODEL[task])
    best_model = None
    with tempfile.TemporaryDirectory() as tmp:  # written here, then published to the experiment folder (or bucket)
        local = Path(tmp)
        if storage.fetch_file(source, local / BEST_MODEL[task]):  # the servable model, beside the table
            best_model = storage.join(exp_dir, "best", BEST_MODEL[task])
            if best_model != source:
                storage.put_file(local / BEST_MODEL[task], best_model)
            best_model = best_model if remote else Path(best_model)
            parent.log_artifact(local / BEST_MODEL[task], "best")
            if task == "pixel":  # and as an MLflow model (registered as tracking.register_as when set)
                log_bundle_model(parent, local / BEST_MODEL[task], name=model_name(sweep.name, "best"))
            else:
                log_checkpoint_model(
                    parent, local / BEST_MODEL[task], name=model_name(sweep.name, "best"), t=sweep.segment_t
                )
        table.to_csv(local / "results.csv", index=False)
        head = chosen_markdown(summary) + "\nTrials (validation only):\n\n" if summary else ""
        (local / "results.md").write_text(head + frame_to_markdown(table))
        plot = plot_sweep(table, keys, sweep.metric, local / "results.png", title=f"{sweep.name}: {sweep.metric}")
        save_config(best_config, local / "best_config.yaml")
        for name in ("results.csv", "results.md", "results.png", "best_config.yaml"):
            if (local / name).is_file():
                storage.put_file(local / name, storage.join(exp_dir, name))
                parent.log_artifact(local / name)
        if summary:  # beside the chosen model (a top-level .json would be sweep state that a resume checks)
            (local / SUMMARY).write_text(json.dumps(summary, indent=1))
            storage.put_file(local / SUMMARY, storage.join(exp_dir, "best", SUMMARY))
            parent.log_artifact(local / SUMMARY, "best")
        plot = storage.join(exp_dir, "results.png") if plot is not None else None
        plot = Path(plot) if plot is not None and not remote else plot
    parent.log_metrics({f"best/{k}": v for k, v in best_metrics.items() if math.isfinite(v)})
    test_metrics = dict(summary["test"]) if summary else {}
    parent.log_metrics({k: v for k, v in test_metrics.items() if math.isfinite(v)})  # the one test/ scoring
    parent.set_tags({"diffseg.best": json.dumps(to_dict(best))[:5000], "diffseg.num_trials": len(table),
                     **({"diffseg.protocol": summary["protocol"]} if summary else {})})  # fmt: skip
    parent.finish()
    return SweepResult(table, best, best_config, best_metrics, exp_dir, parent.run_id, plot, best_model, test_metrics)


def chosen_task(config: dict[str, Any], ctx: dict[str, Any], bundle: str) -> dict[str, Any]:
    """The Ray task that scores a pixel sweep's chosen recipe (`trials.pixel_final`), on a trial's resources: the
    driver may be a laptop without the trials' GPU."""
    setup_logging()
    torch.set_num_threads(max(1, int(ctx["threads"])))
    sweep = from_dict(SweepConfig, ctx["sweep"])
    device = resolve_device("auto" if sweep.resources.gpu > 0 else "cpu")
    cfg = from_dict(PixelTrialConfig, config)
    return pixel_final(cfg, bundle, num_reports=sweep.num_reports, device=device, cache_root=ctx["cache_dir"])


def score_chosen(
    sweep: SweepConfig, chosen: PixelTrialConfig, best: dict[str, Any], trial_id: str, val: dict[str, float],
    num_trials: int, exp_dir: str | Path, ctx: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """A pixel sweep's last step: the recipe of the best trial on validation, trained on all the labelled images and
    scored ONCE on the test images (`chosen_task`); its bundle is `<exp>/best/segmenter.pt`. Returns the summary
    (`best/summary.json`): the recipe, its validation figures (mean and per fold) beside its test figures. A resumed
    sweep whose summary already scored this trial's recipe reuses it (the test set is not scored again)."""
    bundle = storage.join(exp_dir, "best", BEST_MODEL["pixel"])
    summary_file = storage.join(exp_dir, "best", SUMMARY)
    if storage.is_file(summary_file) and storage.is_file(bundle):
        done = json.loads(storage.read_text(summary_file))
        if done.get("trial_id") == trial_id and done.get("recipe") == to_dict(best):
            return done
    cfg = resolve_paths(chosen, ctx["workdir"])  # swept locations mean what they mean in the driver's directory
    task = ray.remote(chosen_task).options(num_cpus=sweep.resources.cpu, num_gpus=sweep.resources.gpu)
    final = ray.get(task.remote(to_dict(cfg), ctx, str(bundle)))
    labelled, tested = final["labelled_ids"], final["test_ids"]
    test_data = cfg.test_data or cfg.data
    where = storage.name(test_data.root) if test_data.root else test_data.name
    return {
        "protocol": f"{sweep.folds}-fold validation over the labelled images; the chosen recipe scored once on test",
        "metric": sweep.metric,
        "mode": sweep.mode,
        "num_trials": num_trials,
        "trial_id": trial_id,
        "recipe": to_dict(best),
        "val": {k: v for k, v in val.items() if k.startswith("val/")},
        "test": final["metrics"],
        "num_labelled": len(labelled),
        "val_folds": fold_split(labelled, sweep.folds),
        "labelled_ids": labelled,
        "test_ids": tested,
        "test_data": where,
    }


def load_sweep(path: str | Path) -> tuple[SweepConfig, Any]:
    """The (sweep, base config) a finished or interrupted experiment folder was started with."""
    data = json.loads(storage.read_text(storage.join(path, "sweep.json")))
    return from_dict(SweepConfig, data["sweep"]), from_dict(base_config_class(data["task"]), data["base"])


def run(cfg: SweepConfig, resume: bool = False, trust_state: bool = False) -> SweepResult | None:
    """The body of jobs/sweep.py: load the base config file (its task from its contents), then `run_sweep`.

    `trust_state=True` only signs the experiment folder `<output_dir>/<name>` (the user vouches for a folder whose
    driver was killed before it could sign it, see `diffseg.core.trust`) and returns None.
    """
    if trust_state:
        if storage.is_remote(cfg.output_dir):
            raise ConfigError(
                f"output_dir: {cfg.output_dir} is object storage; only a local sweep folder can be signed"
            )
        exp_dir = job_dir(Path(cfg.output_dir).resolve(), cfg.name)
        if not exp_dir.is_dir():
            raise ConfigError(f"name, output_dir: {exp_dir} is no sweep folder to sign (check name and output_dir)")
        signed = vouch_for_state(exp_dir)
        log.info(f"[sweep] signed {len(signed)} state files of {exp_dir} with {key_path()}: {signed}")
        return None
    task = cfg.task
    if task == "auto":
        if cfg.base_config is None:
            raise ValueError("task: with no base_config, say which trials to run (task=pixel or task=factorized)")
        data = load_yaml(find_config(cfg.base_config))
        task = "factorized" if data.get("model", {}).get("kind") == "factorized" else "pixel"
        if task == "pixel" and "features" not in data:
            raise ValueError(f"{cfg.base_config}: neither a factorized TrainConfig nor a PixelTrialConfig")
    base = load_config(base_config_class(task), cfg.base_config)
    result = run_sweep(base, sweep=replace(cfg, task=task), resume=resume)
    log.info(frame_to_markdown(result.table))
    log.info(f"[sweep] best {cfg.metric} = {result.best_metrics.get(cfg.metric)}: {result.best}")
    if result.test_metrics:  # pixel: validation chose it; test scored it once
        folds = [result.best_metrics.get(f"val/fold{f}/miou", float("nan")) for f in range(cfg.folds)]
        val, test, nan, name = result.best_metrics, result.test_metrics, float("nan"), cfg.metric.removeprefix("val/")
        chosen_by = ""  # the metric it was chosen on comes first, when it is not the mIoU
        if name != "miou":
            chosen_by = (
                f"{cfg.metric} {val.get(cfg.metric, nan):.4f} -> test/{name} {test.get(f'test/{name}', nan):.4f}; "
            )
        log.info(
            f"[sweep] chosen recipe: {chosen_by}val/miou {val.get('val/miou', nan):.4f} (mean of {cfg.folds} folds: "
            f"{', '.join(f'{v:.4f}' for v in folds)}) -> test/miou {test.get('test/miou', nan):.4f} (scored once, "
            f"{int(test.get('test/num_images', 0))} test images)"
        )
    log.info(f"[sweep] results   {storage.join(result.path, 'results.md')} (+ .csv, .png, best_config.yaml"
             f"{', best/summary.json' if result.test_metrics else ''})")  # fmt: skip
    log.info(f"[sweep] best model {result.best_model} (serve it: serve/config.yaml args)")
    log.info(f"[sweep] MLflow    {resolve_tracking_uri(cfg.tracking.uri)} (parent run {result.parent_run_id})")
    return result
