"""The ingress's request flow, Ray-free: an upload reserves its declared pixels (`PixelBudget`) before it is decoded
and holds them until its answer is rendered, so at most `max_inflight_pixels // max_image_pixels` maximum-size
images are in memory together (`segment_upload`); a model call is awaited for at most the request timeout and
cancelled in the replica when it runs out or the client leaves (`await_model`)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import numpy as np

from diffseg.serving.app_config import Limits
from diffseg.serving.requests import RequestError, SegmentParams, load_image, open_image, to_model_input
from diffseg.serving.responses import render_segmentation


class PixelBudget:
    """Declared pixels of the uploads being decoded and rendered at the ingress, at most `capacity` at once.

    `reserve(n)` waits (without holding anything) until n more pixels fit, then holds them until the block ends.
    Admission is first-fit: an ordinary upload is not held up behind a queue of large ones while there is room for
    it (a large one waits for room, within the request timeout). Single event loop; no locks needed.
    """

    def __init__(self, capacity: int, threads: int = 2):
        self.capacity, self.used, self.peak, self.waits = capacity, 0, 0, 0
        self._waiters: list[asyncio.Future] = []
        # The decoding/rendering threads: few, so that few malloc arenas hold the freed full-size buffers (each
        # thread of a large pool keeps its own, and RSS grows with the pool, not with the work).
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pixels")

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run CPU work on an upload (decode, resize, render) on the budget's threads."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    @contextlib.asynccontextmanager
    async def reserve(self, pixels: int) -> AsyncIterator[None]:
        if pixels > self.capacity:
            raise RequestError(413, f"an image of {pixels} pixels exceeds the decoding budget of {self.capacity}")
        if self.used + pixels > self.capacity:
            self.waits += 1
        while self.used + pixels > self.capacity:
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            finally:
                if fut in self._waiters:
                    self._waiters.remove(fut)
        self.used += pixels
        self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            self.used -= pixels
            for fut in self._waiters:  # everyone re-checks whether they fit now
                if not fut.done():
                    fut.set_result(None)


async def segment_upload(
    data: bytes,
    params: SegmentParams,
    info: Mapping[str, Any],
    limits: Limits,
    budget: PixelBudget,
    call_model: Callable[[np.ndarray], Awaitable[Mapping[str, np.ndarray]]],
) -> tuple[str, bytes]:
    """An uploaded image -> (media type, response bytes): header check, then, holding its declared pixels in
    `budget`, decode, resize to the model's input, `call_model`, render at the upload's size and serialise. The
    full-size upload is dropped before the model call unless an overlay needs it."""
    header = open_image(data, limits)  # 4xx before any pixel is decoded
    w, h = header.size
    async with budget.reserve(w * h):
        image = await budget.run(load_image, header)
        del header
        x = await budget.run(to_model_input, image, int(info["image_size"]))
        if not (params.output == "overlay" or params.overlay):
            image = None  # not needed again: its memory goes back before the model call
        result = await call_model(x)
        media, out = await budget.run(render_segmentation, image, result, params, info, (w, h))
        if media == "application/json":
            out = await budget.run(lambda body: json.dumps(body).encode(), out)
        return media, out


async def await_model(response: Awaitable[Any], timeout_s: float, what: str = "the model") -> Any:
    """Await a model call (a Serve DeploymentResponse) for at most `timeout_s`. On timeout (504), or when this request
    is itself cancelled (the client went away), the model call is cancelled too (`response.cancel()`), so the replica
    stops its work instead of finishing it for nobody. A RequestError raised in the replica comes back as itself."""

    def cancel() -> None:
        if callable(getattr(response, "cancel", None)):
            response.cancel()

    try:
        return await asyncio.wait_for(response, timeout=timeout_s)
    except TimeoutError:
        cancel()
        raise RequestError(504, f"{what} did not answer within {timeout_s} s; the request was cancelled") from None
    except asyncio.CancelledError:
        cancel()
        raise
    except Exception as e:
        err = RequestError.of(e)
        if err is not None:
            raise err from None
        raise
