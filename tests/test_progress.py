"""Progress: a smoothed rate and ETA (steady on a loaded machine), the bar on a terminal."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffseg.core.runtime import Progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_eta_is_exact_at_a_steady_rate_and_steady_under_jumps():
    clock = Clock()
    steady = Progress(1000, "img", clock=clock, bar=False)
    for i in range(1, 6):
        clock.now = 10.0 * i
        steady.update(100 * i)  # 10 img/s
    assert abs(steady.rate - 10.0) < 1e-9 and abs(steady.eta_s() - 50.0) < 1e-6
    assert steady.text() == "500/1000 img, 10.0 img/s, left 00:00:50"

    # A machine whose speed jumps between 4 and 16 img/s every 10 s interval (other jobs come and go): the ETA
    # from each interval's own rate swings 4x; the smoothed one moves much less.
    clock, raw_etas, etas = Clock(), [], []
    jumpy = Progress(10_000, clock=clock, half_life_s=30.0, bar=False)
    done = 0
    for i in range(1, 21):
        rate = 4.0 if i % 2 else 16.0
        done += int(rate * 10)
        clock.now = 10.0 * i
        jumpy.update(done)
        raw_etas.append((10_000 - done) / rate)
        etas.append(jumpy.eta_s())
    late, raw_late = etas[10:], raw_etas[10:]
    assert max(raw_late) / min(raw_late) > 3.5
    assert max(late) / min(late) < 1.6
    assert 6.0 < jumpy.rate < 14.0  # near the mean rate (10)


def test_bar_only_when_asked_or_on_a_terminal():
    clock = Clock()
    p = Progress(40, clock=clock, bar=True)
    clock.now = 2.0
    assert p.update(10).endswith("|#####---------------| 25%")
    assert Progress(40, clock=clock).bar_text() == ""  # pytest's captured stdout is not a terminal
    assert Progress(40, clock=clock, bar=False).text() == "0/40 img, ? img/s, left ?"


@pytest.fixture
def diffseg_log(caplog):
    """The library's records, also when a job in this process has set up its own stdout handler (no propagation)."""
    logger = logging.getLogger("diffseg")
    own = not logger.propagate  # else the records reach caplog's root handler anyway
    if own:
        logger.addHandler(caplog.handler)
    with caplog.at_level(logging.INFO, logger="diffseg"):
        yield caplog
    if own:
        logger.removeHandler(caplog.handler)


def test_extraction_says_how_far_it_is_and_warns_when_its_actors_wait(diffseg_log):
    """What the feature job prints of its own while Ray Data works: images done / total, rate, ETA; and, when no
    shard finishes for the bounded wait (actors that cannot be scheduled), a warning naming the resources asked for
    and those free. The rows are the actors' summary rows (one per shard), here from a generator."""
    from diffseg.methods.features import follow_extraction

    def rows():
        time.sleep(1.5)  # nothing is scheduled yet
        for i in range(5):
            yield {"shard": f"shard-{i}.parquet", "num_pixels": 10, "num_images": 8}

    free = lambda: {"CPU": 0.25, "memory": 1e9, "object_store_memory": 1e8}  # noqa: E731
    paths = follow_extraction(rows(), 40, {"CPU": 1.0}, free, stall_warn_s=0.5, every_s=0.0)
    assert paths == [f"shard-{i}.parquet" for i in range(5)]
    text = diffseg_log.text
    warnings = [r for r in diffseg_log.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, text  # one warning per stall, not one per check
    assert "no shard finished for" in warnings[0].message and "0/40 images done" in warnings[0].message
    assert "ask for 1 CPU in all, the cluster has 0.25 CPU free" in warnings[0].message
    lines = re.findall(r"\[extract\] (\d+)/40 img, ([\d.]+) img/s, left (\d\d:\d\d:\d\d)", text)
    assert [int(done) for done, _, _ in lines] == [8, 16, 24, 32, 40]
    assert lines[-1][2] == "00:00:00"


def test_a_steady_extraction_does_not_warn(diffseg_log):
    from diffseg.methods.features import follow_extraction

    rows = ({"shard": f"s{i}", "num_images": 2} for i in range(3))
    follow_extraction(rows, 6, {"CPU": 0.5}, dict, stall_warn_s=30.0, every_s=3600.0)
    assert not [r for r in diffseg_log.records if r.levelno >= logging.WARNING]
    assert re.findall(r"\[extract\] (\d+)/6 img", diffseg_log.text) == ["2", "6"]  # the first, then throttled, the end


def test_long_log_intervals_are_smoothed_too():
    """A log line every 5 minutes (a big model): the rate still averages over about three lines, not one."""
    clock, etas, done = Clock(), [], 0
    p = Progress(100_000, clock=clock, bar=False)
    for i in range(1, 13):
        done += int((2.0 if i % 2 else 8.0) * 300)
        clock.now = 300.0 * i
        p.update(done)
        etas.append(p.eta_s())
    assert max(etas[6:]) / min(etas[6:]) < 1.6  # the raw ETAs swing 4x


def test_ray_trains_per_report_info_lines_are_quiet_where_the_library_logs():
    """A Ray Train worker logged two ~300-character INFO lines at every report ("Checkpoint successfully created at:
    ...", "Reporting training result N: TrainingReport(...)"); a process that shows the library's log (a job, a
    worker: `setup_logging`) keeps their warnings only. The names are the loggers of the installed Ray."""
    import importlib
    import logging

    from diffseg.core.runtime import setup_logging

    storage = importlib.import_module("ray.train.v2._internal.execution.storage")
    context = importlib.import_module("ray.train.v2._internal.execution.context")
    setup_logging()
    for logger in (storage.logger, context.logger):  # the loggers those modules log with (context's: its file name)
        assert not logger.isEnabledFor(logging.INFO), logger.name
        assert logger.isEnabledFor(logging.WARNING), logger.name


def test_a_long_phase_logs_by_the_clock_and_ends_with_a_summary(diffseg_log):
    """Issue 37.5: the supervised U-Net trained 197 s and the ensemble 30 s without a line. A phase now logs at most
    every 10 s (a shorter one only its summary), with the smoothed rate and ETA, and one summary line at the end;
    an open-ended phase (early stopping) shows its count and rate, no ETA. `extra` is read only for a line."""
    from diffseg.core.runtime import PhaseLog

    now = [0.0]
    reads = []

    def extra():
        reads.append(now[0])
        return "loss 0.5"

    phase = PhaseLog("supervised", 100, "steps", clock=lambda: now[0])
    for step in range(1, 101):
        now[0] = step * 0.5  # 2 steps/s: 50 s in all
        phase.update(step, extra)
    phase.finish("8 images a step")
    lines = [r.getMessage() for r in diffseg_log.records if r.getMessage().startswith("[supervised]")]
    assert len(lines) == 6 and len(reads) == 5, lines  # at 10, 20, 30, 40, 50 s, and the summary
    assert lines[0] == "[supervised] 20/100 steps, 2.0 steps/s, left 00:00:40, loss 0.5", lines[0]
    assert lines[-1] == "[supervised] done: 100 steps in 00:00:50 (2.0 steps/s), 8 images a step", lines[-1]
    open_ended = PhaseLog("ensemble", 0, "it", clock=lambda: now[0])
    now[0] += 12
    open_ended.update(600, "3/10 members training")
    assert diffseg_log.records[-1].getMessage() == "[ensemble] 600 it, 50.0 it/s, 3/10 members training"


def test_the_supervised_trainer_and_the_ensemble_end_with_a_summary_line(diffseg_log):
    import torch

    from diffseg.evaluation.baselines import train_supervised

    net = torch.nn.Conv2d(3, 2, 1)
    train_supervised(net, torch.zeros(4, 3, 8, 8), torch.zeros(4, 8, 8, dtype=torch.long), steps=3, batch_size=2)
    last = [r.getMessage() for r in diffseg_log.records if r.getMessage().startswith("[supervised]")][-1]
    assert last.startswith("[supervised] done: 3 steps in ") and last.endswith("2 images a step"), last


def test_the_start_up_interval_does_not_linger_in_the_eta():
    """Issue 37.5: under load a training's ETA fell from 8:22 to 2:15 over its first 100 steps: the first interval
    (loading, the first step) was slow and the smoothing kept it for minutes. It is now a first guess only."""
    clock = Clock()
    progress = Progress(1000, "steps", clock=clock, bar=False)
    clock.now = 10.0
    progress.update(10)  # start-up: 1 step/s
    assert abs(progress.eta_s() - 990.0) < 1e-6
    for i in range(2, 5):
        clock.now = 10.0 * i
        progress.update(10 + 100 * (i - 1))  # then 10 steps/s
    assert abs(progress.rate - 10.0) < 1e-9  # the start-up rate is gone at once, not averaged away


def test_ray_trains_transient_warnings_keep_their_line_and_lose_their_traceback():
    """Ray workers start with `worker_setup` (code_runtime_env's hook): Ray Train's 'Failed to send resource request'
    on a busy machine (a warning with a 20-line traceback, which Ray calls safe to ignore) becomes one line naming
    the exception; an error keeps its traceback."""
    from diffseg.core.ray_worker import TRANSIENT_WARNING_LOGGERS, worker_setup
    from diffseg.core.runtime import code_runtime_env

    assert code_runtime_env()["worker_process_setup_hook"] == "diffseg.core.ray_worker.worker_setup"
    # every worker process runs it at start-up: it must not import torch (2.8 s each on this machine)
    probe = "import sys; import diffseg.core.ray_worker; print('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "platform")}
    assert subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True).stdout == "False\n"
    ray = pytest.importorskip("ray")
    logger = logging.getLogger(TRANSIENT_WARNING_LOGGERS[0])
    before = list(logger.filters)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ray, "get_runtime_context", lambda: type("Ctx", (), {"gcs_address": "127.0.0.1:1"})())
            mp.setenv("RAY_ADDRESS", "recorded")  # so that the context's end restores what was there (or nothing)
            mp.delenv("RAY_ADDRESS")
            worker_setup()
            worker_setup()  # idempotent: one filter
            assert os.environ["RAY_ADDRESS"] == "127.0.0.1:1"  # the worker's own cluster, not a guess among several
        assert len(logger.filters) == len(before) + 1
        seen: list[logging.LogRecord] = []
        handler = logging.Handler()
        handler.emit = seen.append  # Ray's loggers do not propagate to pytest's capture
        logger.addHandler(handler)
        try:
            for level in (logging.WARNING, logging.ERROR):
                try:
                    raise TimeoutError("Get timed out: some object(s) not ready.")
                except TimeoutError:
                    logger.log(level, "Failed to send resource request for %s.", "train-1", exc_info=True)
        finally:
            logger.removeHandler(handler)
        warning, error = seen
        assert warning.getMessage() == (
            "Failed to send resource request for train-1. (TimeoutError: Get timed out: some object(s) not ready.)"
        )
        assert warning.exc_info is None and error.exc_info is not None
    finally:
        logger.filters[:] = before


def test_ray_trains_own_console_lines_are_warnings_only():
    """Ray Train's controller and workers configure their own loggers from the run's LoggingConfig: a 2-worker run
    printed "Requesting resources", "Attempting to start training worker group", "Started training worker group ...",
    "Setting up process group", "Wrapping provided model" (16 lines, not 57, in the measured tiny run)."""
    from diffseg.core.config import load_config
    from diffseg.training.ray_train import TrainConfig, build_trainer

    cfg = load_config(TrainConfig, "factorized_tiny16.yaml", ["output_dir=/tmp/unused"])
    trainer = build_trainer(cfg)
    assert trainer.run_config.logging_config.log_level == "WARNING"


def test_the_last_line_gives_the_whole_runs_rate():
    """Two extraction shards that arrived together (4 images after 25 s, 4 more 0.2 ms later) printed '8/8 img,
    19124.0 img/s': the line that ends a run gives its mean rate instead."""
    t = [0.0]
    p = Progress(8, "img", clock=lambda: t[0])
    t[0] = 25.0
    p.update(4)
    t[0] = 25.0002
    assert p.update(8).startswith("8/8 img, 0.32 img/s, left 00:00:00")
