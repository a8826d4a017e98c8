"""Sampler time, bounded: a replica admits at most `max_inflight_cost` image-steps at once (503 beyond), plus a reserve
only small requests may use, and runs its requests one DDIM step at a time, fairly by image-steps (`SampleScheduler`),
so a small request is never stuck behind a large one (nor refused because large ones took the whole budget), and a
request whose caller timed out or went away is dropped between two steps."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from diffseg.serving.requests import RequestError, SampleParams

log = logging.getLogger(__name__)


class SampleRequest:
    """One /v1/sample request inside a `SampleScheduler`: its parameters, its future, and whether it was cancelled."""

    def __init__(self, params: SampleParams, reserved: bool = False):
        self.params = params
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.cancelled = False
        self.reserved = reserved  # admitted on the small requests' reserve (its cost goes back there)


@dataclass
class _Run:
    """A batched DDIM run: requests with the same step count that arrived together."""

    members: list[SampleRequest]
    steps: Generator[int, None, list[dict[str, Any]]]
    num_images: int  # images per step
    served: int  # image-steps this run has had, on the fair-share clock
    seq: int  # arrival order (ties go to the older run)
    cost: int  # the image-steps its members reserved
    steps_done: int = 0


class SampleScheduler:
    """Runs sampling requests on one thread, one denoising step at a time, sharing the thread fairly by image-steps.

    - **Admission by cost.** `submit` refuses (RequestError 503) a request whose image-steps would take the replica
      over `max_inflight_cost` (running and waiting together), so a replica's backlog is bounded in work, not count.
      A small request (at most `small_cost` image-steps) that does not fit may still use `reserved_cost` more, kept
      for such requests alone: two maximal requests fill the main budget, and a 1-image request is still served.
    - **Batching.** Requests that arrive while the thread is busy (or within `batch_wait_s` of an idle one) and have
      the same step count share one batched run, up to `max_batch_images` images.
    - **Fair share.** Each step goes to the run that has had the fewest image-steps so far (a new run starts at the
      smallest count of those running, so it neither jumps the queue nor waits for the old ones to finish). Runs are
      not preempted within a step. For a request of W image-steps sharing the thread with one run of n images per
      step, that run gets at most W / n + 2 steps while the request is alive: a 1-image x S-step request behind a
      16 x 250 one waits for at most S/16 + 2 of its steps, not for all 250.
    - **Cancellation.** `cancel` marks a request; a run whose requests are all cancelled is closed before its next
      step, so a timed-out or abandoned request stops costing anything within one step.

    `make_steps(requests)` returns a step generator (`DiffusionSampler.sample_steps`). Counters are in `stats()`.
    """

    def __init__(
        self,
        make_steps: Callable[[list[SampleParams]], Generator[int, None, list[dict[str, Any]]]],
        *,
        max_inflight_cost: int,
        max_batch_images: int,
        reserved_cost: int = 0,
        small_cost: int = 0,
        batch_wait_s: float = 0.0,
        batching: bool = True,
        name: str = "sampler",
    ):
        self.make_steps, self.max_inflight_cost = make_steps, max_inflight_cost
        self.reserved_cost, self.small_cost = reserved_cost, small_cost
        self._reserved = 0  # image-steps in flight on the small requests' reserve
        self.max_batch_images, self.batch_wait_s, self.batching = max_batch_images, batch_wait_s, batching
        self._cond = threading.Condition()
        self._pending: list[SampleRequest] = []
        self._runs: list[_Run] = []
        self._inflight = 0
        self._seq = 0
        self._closed = False
        self.busy_since: float | None = None  # monotonic start of the step now running (a health check reads it)
        self.trace: list[tuple[int, int]] | None = None  # (run seq, images) per step, when a test turns it on
        self.counts = {"steps": 0, "image_steps": 0, "completed": 0, "cancelled": 0, "rejected": 0, "runs": 0}
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # ---- called from the event loop
    def submit(self, params: SampleParams) -> SampleRequest:
        with self._cond:
            if self._closed:
                raise RequestError(503, "the sampler is shutting down")
            reserved = False
            if self._inflight + params.cost > self.max_inflight_cost:
                small = params.cost <= self.small_cost and self._reserved + params.cost <= self.reserved_cost
                if not small:
                    self.counts["rejected"] += 1
                    raise RequestError(
                        503,
                        f"the sampler is busy: {self._inflight} image-steps in flight, this request needs "
                        f"{params.cost}, the replica's limit is {self.max_inflight_cost}"
                        + (
                            f" (requests of at most {self.small_cost} image-steps get a reserve of "
                            f"{self.reserved_cost})"
                            if self.reserved_cost
                            else ""
                        )  # fmt: skip
                        + "; retry later",
                    )
                reserved = True
                self._reserved += params.cost
            else:
                self._inflight += params.cost
            req = SampleRequest(params, reserved)
            self._pending.append(req)
            self._cond.notify()
        return req

    def cancel(self, req: SampleRequest) -> None:
        """Drop a request (its caller timed out or left). Its future may already be cancelled: `asyncio.wrap_future`
        cancels the future it wraps when the awaiting task is cancelled."""
        with self._cond:
            if req.cancelled or (req.future.done() and not req.future.cancelled()):
                return  # cancelled before, or answered already
            req.cancelled = True
            self.counts["cancelled"] += 1
            req.future.cancel()
            self._cond.notify()

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {**self.counts, "inflight_cost": self._inflight, "reserved_inflight_cost": self._reserved,
                    "active_runs": len(self._runs)}  # fmt: skip

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=10)

    # ---- the compute thread
    def _form_runs(self) -> None:
        """Pending requests -> runs (under the lock)."""
        pending = [r for r in self._pending if not r.cancelled]
        for r in self._pending:
            if r.cancelled:
                self._release(r)
        self._pending = []
        start = min((run.served for run in self._runs), default=0)
        groups: dict[int, list[list[SampleRequest]]] = {}
        for req in pending:
            batches = groups.setdefault(req.params.steps, [])
            if (
                self.batching
                and batches
                and sum(m.params.num_images for m in batches[-1]) + req.params.num_images <= self.max_batch_images
            ):
                batches[-1].append(req)
            else:
                batches.append([req])
        for batches in groups.values():
            for members in batches:
                try:
                    steps = self.make_steps([m.params for m in members])
                except Exception as e:
                    self._finish(members, error=e)
                    continue
                self._seq += 1
                self.counts["runs"] += 1
                n = sum(m.params.num_images for m in members)
                self._runs.append(_Run(members, steps, n, start, self._seq, sum(m.params.cost for m in members)))

    def _release(self, req: SampleRequest) -> None:
        """Give a request's cost back to the pool it was admitted on (under the lock)."""
        if req.reserved:
            self._reserved -= req.params.cost
        else:
            self._inflight -= req.params.cost

    def _finish(self, members: list[SampleRequest], result: list[Any] | None = None, error: Exception | None = None):
        """Deliver a run's results (under the lock) and give its cost back."""
        for i, m in enumerate(members):
            self._release(m)
            if m.future.done():
                continue
            if error is not None:
                m.future.set_exception(error)
            else:
                m.future.set_result(result[i])
                self.counts["completed"] += 1

    def _drop_cancelled(self) -> None:
        for run in list(self._runs):
            if all(m.cancelled for m in run.members):
                run.steps.close()  # the generator's finally blocks run; its tensors go
                self._runs.remove(run)
                self._finish(run.members)

    def _loop(self) -> None:
        """The compute thread: wait for work, pick the run owed a step, run that one step (outside the lock), count
        it."""
        while True:
            with self._cond:
                if not self._wait_for_work():
                    return  # closed: every request left has been answered 503
                run = self._next_run()
                if run is None:
                    continue
            finished, result, error = self._step(run)
            with self._cond:
                self._account(run, finished, result, error)

    def _wait_for_work(self) -> bool:
        """Block until there are requests or runs (under the lock); False once closed, having failed all that is
        left."""
        while not self._closed and not self._pending and not self._runs:
            self._cond.wait()
        if self._closed:
            error = RequestError(503, "the sampler shut down")
            for run in self._runs:
                self._finish(run.members, error=error)
            self._finish(self._pending, error=error)
            return False
        if self._pending and not self._runs and self.batch_wait_s > 0:
            self._cond.wait(self.batch_wait_s)  # an idle thread waits a moment for more requests to batch
        return True

    def _next_run(self) -> _Run | None:
        """Pending requests -> runs, cancelled runs dropped (under the lock); the run with the fewest image-steps served
        (the older one on a tie), or None when nothing is left to run."""
        self._form_runs()
        self._drop_cancelled()
        if not self._runs:
            return None
        run = min(self._runs, key=lambda r: (r.served, r.seq))
        self.busy_since = time.monotonic()
        return run

    def _step(self, run: _Run) -> tuple[bool, list[dict[str, Any]] | None, Exception | None]:
        """One denoising step of `run` -> (finished, result, error); the call that finishes only assembles the
        results."""
        try:
            next(run.steps)
            return False, None, None
        except StopIteration as stop:
            return True, stop.value, None
        except Exception as e:
            log.exception("sampling failed")
            return True, None, e

    def _account(self, run: _Run, finished: bool, result: list[Any] | None, error: Exception | None) -> None:
        """Count a denoising step on the fair-share clock, or deliver a finished run's results (under the lock)."""
        self.busy_since = None
        if not finished:  # a denoising step ran (the call that finishes only assembles the results)
            run.served += run.num_images
            run.steps_done += 1
            self.counts["steps"] += 1
            self.counts["image_steps"] += run.num_images
            if self.trace is not None:
                self.trace.append((run.seq, run.num_images))
        if finished:
            self._runs.remove(run)
            self._finish(run.members, result=result, error=error)
