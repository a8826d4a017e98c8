"""The diffseg Serve application: an HTTP front (FastAPI ingress) and one deployment per model.

    Ingress ──► SegmenterModel "factorized"   (FactorizedSegmenter: K regions at noise level t)
            ──► SegmenterModel "pixel"        (PixelEnsembleSegmenter: DDPM features + MLP ensemble)
            ──► SamplerModel                  (DDIM samples, with masks from a factorized model)

The ingress reads and checks every request (size, format, declared pixels, parameters) and answers 4xx JSON for bad
ones; model replicas only ever see validated fixed-size float arrays (segmenters batched with `@serve.batch`, the
sampler through its cost-bounded, step-by-step `SampleScheduler`). Uploads are decoded and rendered within the
ingress's pixel budget; a model call that times out or whose client leaves is cancelled in the replica. Everything
that is not a deployment class lives in `diffseg.serving`, which has no Ray in it: `app_config` (this app's args),
`requests` (validation, decoding), `wrappers` (the models), `scheduler` (the sampler's), `responses` (rendering) and
`ingress` (the pixel budget, an upload's flow, model timeouts).

    serve run serve/config.yaml                       # or: serve deploy serve/config.yaml
    serve.run(build_app({"segmenter": "runs/x/checkpoint.pt"}))

Deployments are named (`FactorizedSegmenter`, `PixelSegmenter`, `Sampler`, `Ingress`) so that Serve's own
`deployments:` section of a config file sets their replicas, autoscaling, queues and `ray_actor_options`; in Python,
`build_application(args, deployments=[...])` takes the same entries. Model sources are resolved where the app is built
(`resolve_paths`: relative to $DIFFSEG_WORKDIR or the working directory of `serve run`), never in a replica.
"""

import asyncio
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from ray import serve
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException as StarletteHTTPException

from diffseg.core.config import from_dict, resolve_paths, to_dict
from diffseg.core.registry import resolve_model_uri
from diffseg.core.runtime import ALLOW_UNVERIFIED_ENV
from diffseg.core.tracking import resolve_tracking_uri
from diffseg.serving.app_config import (
    DEPLOYMENT_NAMES,
    INGRESS_DEFAULTS,
    INGRESS_NAME,
    MODEL_DEFAULTS,
    BatchingConfig,
    Limits,
    ServeAppConfig,
    check_app_args,
    check_sources,
    deployment_names,
    model_num_gpus,
    verify_sources,
)
from diffseg.serving.ingress import PixelBudget, await_model, segment_upload
from diffseg.serving.requests import RequestError, SampleParams, parse_sample_request, parse_segment_params, safe_text
from diffseg.serving.responses import public_info, render_samples
from diffseg.serving.scheduler import SampleScheduler
from diffseg.serving.wrappers import DiffusionSampler, FactorizedSegmenter, PixelEnsembleSegmenter

PAGE = Path(__file__).with_name("static") / "index.html"
IMAGE_TYPES = ("image/png", "image/jpeg", "image/jpg", "application/octet-stream")


CONTENT_LENGTH = re.compile(r"[0-9]{1,15}")
HEALTH_TIMEOUT_S = 5.0  # /healthz answers 503 when a model replica has not answered within this
FAILED_STATES = ("UNHEALTHY", "DEPLOY_FAILED")  # Serve deployment states in which no replica will answer


log = logging.getLogger("diffseg.serve")


def _error(status: int, message: str, field: str | None = None) -> JSONResponse:
    return JSONResponse(RequestError(status, message, field).to_json(), status_code=status)


class _ModelReplica:
    """What both model deployments share: one compute thread (torch runs off the event loop, so health checks and
    queueing stay responsive during a forward pass), counters, and the replica's pid for /v1/info.

    A forward pass that has not returned after `STALL_S` fails the health check, so Serve replaces the replica
    instead of leaving it wedged (inputs are validated and sized, so this is a guard, not an expected path).
    """

    STALL_S = 600.0

    def _setup(self, batching: dict[str, Any], registry: dict[str, Any] | None, allow_unverified: bool) -> None:
        if allow_unverified:  # the app's named opt-out, for everything this replica loads (a bundle's backbone too)
            os.environ[ALLOW_UNVERIFIED_ENV] = "1"
        # torch threads = the CPUs this replica reserved (its ray_actor_options, from the config's deployments:)
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        torch.set_num_threads(max(1, int(cpus)))
        self.registry = dict(registry or {})  # the registered model and version this replica serves (models:/ sources)
        self.batching = from_dict(BatchingConfig, batching, prefix="batching")
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.started = time.time()
        self.counts = {"requests": 0, "batches": 0, "largest_batch": 0, "failures": 0}

    async def _compute(self, fn, *args):
        self.counts["batches"] += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, self._timed, fn, *args)
        except Exception:
            self.counts["failures"] += 1
            raise

    def _timed(self, fn, *args):
        self._busy_since = time.monotonic()  # runs on the one compute thread: the pass now executing
        try:
            return fn(*args)
        finally:
            self._busy_since = None

    def check_health(self) -> None:
        busy = getattr(self, "_busy_since", None)
        if busy is not None and time.monotonic() - busy > self.STALL_S:
            raise RuntimeError(f"a forward pass has run for more than {self.STALL_S:.0f} s")

    def _replica_info(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 1),
            "batching": to_dict(self.batching),
            "torch_threads": torch.get_num_threads(),
            **self.counts,
        }


@serve.deployment
class SegmenterModel(_ModelReplica):
    def __init__(
        self, method: str, source: str, device: str, use_ema: bool, batching: dict, registry: dict | None = None,
        allow_unverified: bool = False,
    ):  # fmt: skip
        self._setup(batching, registry, allow_unverified)
        if method == "factorized":
            self.model = FactorizedSegmenter.load(source, device, use_ema)
        elif method == "pixel":
            self.model = PixelEnsembleSegmenter.load(source, device)
        else:
            raise ValueError(f"unknown segmentation method {method!r}")
        self.segment_batched.set_max_batch_size(self.batching.max_batch_size)
        self.segment_batched.set_batch_wait_timeout_s(self.batching.batch_wait_timeout_s)

    def info(self) -> dict[str, Any]:
        return {**self.model.info(), **self.registry, **self._replica_info()}

    async def segment(self, image: np.ndarray, t: int, seed: int) -> dict[str, np.ndarray]:
        """(3, S, S) float32 in [-1, 1] -> {"probs"} or {"labels", "uncertainty"} at the model's resolution."""
        self.counts["requests"] += 1
        if self.batching.enabled:
            return await self.segment_batched(image, t, seed)
        return (await self._run([image], [t], [seed]))[0]

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def segment_batched(self, images: list[np.ndarray], ts: list[int], seeds: list[int]) -> list[dict]:
        return await self._run(images, ts, seeds)

    async def _run(self, images, ts, seeds):
        self.counts["largest_batch"] = max(self.counts["largest_batch"], len(images))
        return await self._compute(self.model.segment, np.stack(images), list(ts), list(seeds))


@serve.deployment
class SamplerModel(_ModelReplica):
    """DDIM sampling through a `SampleScheduler`: admission by image-steps (503 over the replica's budget), requests
    interleaved step by step, fairly by image-steps, and a request cancelled by the ingress (timeout, client gone)
    dropped between two steps."""

    def __init__(
        self, source: str, device: str, use_ema: bool, batching: dict, limits: dict, registry: dict | None = None,
        allow_unverified: bool = False,
    ):  # fmt: skip
        self._setup(batching, registry, allow_unverified)
        lim = from_dict(Limits, limits, prefix="limits")
        self.model = DiffusionSampler.load(source, device, use_ema)
        self.scheduler = SampleScheduler(
            self.model.sample_steps,
            max_inflight_cost=lim.max_inflight_cost,
            reserved_cost=lim.reserved_sample_cost,
            small_cost=lim.small_sample_cost,
            max_batch_images=max(self.batching.max_batch_size, lim.max_num_images),  # one request always fits
            batch_wait_s=self.batching.batch_wait_timeout_s,
            batching=self.batching.enabled,
        )

    def info(self) -> dict[str, Any]:
        return {**self.model.info(), **self.registry, **self._replica_info(), "scheduler": self.scheduler.stats()}

    def check_health(self) -> None:
        busy = self.scheduler.busy_since
        if busy is not None and time.monotonic() - busy > self.STALL_S:
            raise RuntimeError(f"a sampling step has run for more than {self.STALL_S:.0f} s")

    async def sample(self, params: SampleParams) -> dict[str, np.ndarray | None]:
        self.counts["requests"] += 1
        req = self.scheduler.submit(params)  # RequestError 503 when the replica's image-step budget is full
        try:
            return await asyncio.wrap_future(req.future)
        except asyncio.CancelledError:  # the ingress cancelled the call: stop the work, not just the wait
            self.scheduler.cancel(req)
            raise


def _failed_deployments(names: list[str], app: str | None = None) -> dict[str, str]:
    """{deployment: "<state>: <Serve's message>"} of application `app`'s deployments (default: this replica's app)
    among `names` that Serve reports UNHEALTHY or DEPLOY_FAILED (`serve.status()`, the public status API); empty when
    the status cannot be read. The ingress's /healthz and the launcher's failed deploy (`serve.launch`) both say this.
    Defined above the ingress: `serve.ingress` pickles the FastAPI app, with what its routes use, where applied."""
    try:
        app = app or serve.get_replica_context().app_name
        deployments = serve.status().applications[app].deployments
    except Exception:  # the status is a hint for the reason: the round trip below still decides
        return {}
    out = {}
    for name in names:
        dep = deployments.get(name)
        state = str(getattr(dep, "status", ""))
        state = state.rsplit(".", 1)[-1]
        if dep is not None and state in FAILED_STATES:
            # Serve's message ends with the replica's traceback: its last line is the error (the file, for a load)
            lines = [line.strip() for line in str(dep.message or "").splitlines() if line.strip()]
            out[name] = f"{state}: {safe_text(lines[-1] if lines else 'no message', 2000)}"
    return out


api = FastAPI(title="diffseg", summary="segmentation and sampling with diffusion models", docs_url="/docs")


@api.exception_handler(RequestError)
async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
    return JSONResponse(exc.to_json(), status_code=exc.status)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _error(422, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))


@api.exception_handler(Exception)
async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    # Not the client's fault (bad input never gets here): still JSON, and the message names the exception.
    return _error(500, f"internal error: {type(exc).__name__}: {safe_text(exc, 500)}")


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(self, config: dict[str, Any], factorized=None, pixel=None, sampler=None):
        torch.set_num_threads(1)  # the ingress only decodes, resizes and encodes
        self.cfg = from_dict(ServeAppConfig, config)
        self.limits: Limits = self.cfg.limits
        Image.MAX_IMAGE_PIXELS = self.limits.max_image_pixels  # PIL's own guard, behind the header check below
        self.segmenters = {name: h for name, h in (("factorized", factorized), ("pixel", pixel)) if h is not None}
        self.sampler = sampler
        self._infos: dict[str, dict[str, Any]] = {}
        self.pixels = PixelBudget(self.limits.max_inflight_pixels)  # decoded/rendered upload pixels in flight
        self.page = PAGE.read_text() if PAGE.is_file() else "<h1>diffseg</h1>"

    # ---- helpers
    async def _call(self, response):
        """Await a model call within the request timeout; overload and timeouts are 503/504, never a hang, and a
        timed-out or abandoned call is cancelled in the replica (`await_model`)."""
        try:
            return await await_model(response, self.limits.request_timeout_s)
        except BackPressureError as e:
            raise RequestError(503, f"the model is overloaded, retry later ({e})") from None

    async def _info(self, name: str) -> dict[str, Any]:
        """A model's info as clients may see it (no paths or pids unless expose_internals); static, so cached."""
        if name not in self._infos:
            handle = self.segmenters.get(name) if name != "sampler" else self.sampler
            self._infos[name] = await self._call(handle.info.remote())
        return public_info(self._infos[name], self.cfg.expose_internals)

    async def _read_body(self, request: Request, cap: int) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None:
            if not CONTENT_LENGTH.fullmatch(declared.strip()):
                raise RequestError(400, f"bad Content-Length {safe_text(declared, 40)!r}")
            if int(declared) > cap:
                raise RequestError(413, f"request body is {int(declared)} bytes; the limit is {cap}")
        body = bytearray()
        async for chunk in request.stream():  # chunked uploads have no Content-Length: count while reading
            body += chunk
            if len(body) > cap:
                raise RequestError(413, f"request body exceeds the limit of {cap} bytes")
        return bytes(body)

    async def _image_and_fields(self, request: Request) -> tuple[bytes, dict[str, str]]:
        ctype = request.headers.get("content-type", "application/octet-stream").split(";")[0].strip().lower()
        body = await self._read_body(request, self.limits.max_body_bytes)
        if ctype == "multipart/form-data":
            request._body = body  # Starlette parses the form from the body already read and capped
            form = await request.form(max_files=1, max_fields=8)
            fields, image = {}, None
            for key, value in form.multi_items():
                if key in ("image", "file"):
                    if isinstance(value, str):
                        raise RequestError(422, f"form field {key!r} must be a file upload", key)
                    image = await value.read()
                elif isinstance(value, str):
                    fields[key] = value
                else:
                    raise RequestError(422, f"unexpected file in form field {key!r}; send the image as 'image'", key)
            await form.close()
            if image is None:
                raise RequestError(422, "multipart form has no 'image' (or 'file') field", "image")
            return image, fields
        if ctype not in IMAGE_TYPES:
            raise RequestError(
                415, f"Content-Type {ctype!r} is not accepted; send multipart/form-data or one of {list(IMAGE_TYPES)}"
            )
        return body, {}

    # ---- routes
    @api.get("/", response_class=HTMLResponse)
    async def page_(self) -> HTMLResponse:
        return HTMLResponse(self.page)

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """Every model replica answers (a round trip through each deployment, not a cached reply) within
        `HEALTH_TIMEOUT_S`; else 503 with the reason. A model deployment that failed to start (its replicas' constructor
        raised: a damaged checkpoint, a missing file) is 503 at once with Serve's message for it, which holds the error.
        """
        handles = {**self.segmenters, **({"sampler": self.sampler} if self.sampler else {})}
        names = [DEPLOYMENT_NAMES[name] for name in handles]
        deadline = time.monotonic() + HEALTH_TIMEOUT_S  # the whole probe, status and round trip
        try:
            failed = await asyncio.wait_for(asyncio.to_thread(_failed_deployments, names), HEALTH_TIMEOUT_S / 2)
        except TimeoutError:  # the controller is slow to answer: the round trip below decides alone
            failed = {}
        if failed:
            return _error(503, "; ".join(f"{name} is {why}" for name, why in failed.items()))
        try:
            calls = asyncio.gather(*(h.info.remote() for h in handles.values()))
            infos = await asyncio.wait_for(calls, max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            return _error(503, f"a model replica did not answer within {HEALTH_TIMEOUT_S:g} s (starting or busy)")
        except Exception as e:  # a health probe reports, it does not raise
            return _error(503, f"a model is not ready: {type(e).__name__}: {safe_text(e, 2000)}")
        self._infos.update(zip(handles, infos))
        return JSONResponse({"status": "ok", "models": list(handles)})

    @api.get("/v1/info")
    async def info(self) -> JSONResponse:
        """Model info, fresh from each model replica (counters), the limits, and the ingress's pixel budget. Paths,
        devices and pids only with `expose_internals` (they tell an attacker where the weights are and what runs)."""
        models = {}
        for name, handle in [*self.segmenters.items(), *([("sampler", self.sampler)] if self.sampler else [])]:
            self._infos[name] = await self._call(handle.info.remote())
            models[name] = public_info(self._infos[name], self.cfg.expose_internals)
        ingress = {"pid": os.getpid(), "pixels_in_flight": self.pixels.used, "peak_pixels": self.pixels.peak,
                   "pixel_waits": self.pixels.waits}  # fmt: skip
        return JSONResponse(
            {
                "ingress": public_info(ingress, self.cfg.expose_internals),
                "models": models,
                "limits": to_dict(self.limits),
                "batching": to_dict(self.cfg.batching),
            }
        )

    @api.post("/v1/segment")
    async def segment(self, request: Request) -> Response:
        data, fields = await self._image_and_fields(request)
        query = {**fields, **dict(request.query_params)}
        if len(request.query_params.multi_items()) != len(request.query_params):
            raise RequestError(422, "a query parameter is given twice")
        infos = {name: await self._info(name) for name in self.segmenters}
        params = parse_segment_params(query, self.limits, infos)
        handle = self.segmenters[params.method]

        def call_model(x):
            return self._call(handle.segment.remote(x, params.t, params.seed))

        media, out = await segment_upload(data, params, infos[params.method], self.limits, self.pixels, call_model)
        return Response(out, media_type=media)

    @api.post("/v1/sample")
    async def sample(self, request: Request) -> Response:
        if self.sampler is None:
            raise RequestError(404, "this deployment serves no sampler")
        ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise RequestError(415, f"Content-Type {ctype!r} is not accepted; send application/json")
        body = await self._read_body(request, self.limits.max_json_bytes)
        info = await self._info("sampler")
        params = parse_sample_request(body, self.limits, info)
        result = await self._call(self.sampler.sample.remote(params))
        media, out = await asyncio.to_thread(render_samples, result, params, info)
        return JSONResponse(out) if media == "application/json" else Response(out, media_type=media)


# ---------------------------------------------------------------------------------------------------- building


def _options(name: str, defaults: dict[str, Any], num_gpus: int, overrides: dict[str, dict[str, Any]]) -> dict:
    """A deployment's options: the app's defaults (GPUs by `use_gpu`), then a Python caller's `deployments` entry
    (Serve's config-file `deployments:` section is applied by Serve itself, after this, the same way)."""
    opts = {**defaults, "name": name}
    opts["ray_actor_options"] = {**defaults["ray_actor_options"], "num_gpus": num_gpus}
    if name in overrides:
        entry = dict(overrides[name])
        if "num_replicas" in entry or "autoscaling_config" in entry:
            opts.pop("num_replicas", None)
        opts.update(entry)
    return opts


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The application for `serve run` / `serve deploy` (args from the config's `args:`) or `serve.run(...)`; Serve
    wants a builder of exactly one parameter, and applies a config file's `deployments:` section itself."""
    return build_application(args)


def build_application(
    args: dict[str, Any] | None = None, deployments: list[dict[str, Any]] | None = None
) -> serve.Application:
    """`build_app` for Python callers, with `deployments`: entries like those of a Serve config's `deployments:`
    section (`{"name": "Sampler", "num_replicas": 2, "ray_actor_options": {"num_cpus": 1}}`). Model sources are
    resolved here, where the app is built, and must exist (or be URIs).

    A `models:/<name>@<alias>` source is pinned here to the version the alias names now: every replica of the
    deployment serves that version (a replica started later by autoscaling too), and /v1/info shows it. After the
    alias moves, deploying again serves the new version."""
    args = dict(args or {})
    check_app_args(args)
    cfg = resolve_paths(from_dict(ServeAppConfig, args))
    check_sources(cfg)
    verify_sources(cfg)  # a damaged or unsealed local file fails here, once, naming it (not in every replica's log)
    if cfg.tracking_uri:  # replicas and this build resolve MLflow URIs against it (a relative SQLite file: from here)
        os.environ["MLFLOW_TRACKING_URI"] = resolve_tracking_uri(cfg.tracking_uri)
    overrides = {entry["name"]: {k: v for k, v in entry.items() if k != "name"} for entry in deployments or []}
    unknown = sorted(set(overrides) - set(deployment_names(cfg)))
    if unknown:
        raise ValueError(f"deployments: no deployment named {unknown}; this app has {deployment_names(cfg)}")
    sources = {cfg.segmenter, cfg.pixel, cfg.sampler_source} - {None}
    refs = {src: resolve_model_uri(src, os.environ.get("MLFLOW_TRACKING_URI")) for src in sources}
    for pin in filter(None, (cfg.promoted or "").split(",")):  # jobs/promote.py's record vs the registry now
        alias_uri, _, version = pin.partition("=")
        ref = refs.get(f"models:/{alias_uri}")
        if ref is not None and ref.version != version:
            log.warning(f"[serve] models:/{alias_uri} names version {ref.version} now, not {version} (promoted)")
    gpus = model_num_gpus(cfg.use_gpu)
    common = {"device": cfg.device, "use_ema": cfg.use_ema, "batching": to_dict(cfg.batching),
              "allow_unverified": cfg.allow_unverified}  # fmt: skip
    handles: dict[str, Any] = {}
    if cfg.segmenter:
        opts = _options(DEPLOYMENT_NAMES["factorized"], MODEL_DEFAULTS, gpus, overrides)
        ref = refs[cfg.segmenter]
        handles["factorized"] = SegmenterModel.options(**opts).bind(
            "factorized", ref.pinned, **common, registry=ref.info()
        )
    if cfg.pixel:
        opts = _options(DEPLOYMENT_NAMES["pixel"], MODEL_DEFAULTS, gpus, overrides)
        ref = refs[cfg.pixel]
        handles["pixel"] = SegmenterModel.options(**opts).bind("pixel", ref.pinned, **common, registry=ref.info())
    if cfg.sampler_source:
        opts = _options(DEPLOYMENT_NAMES["sampler"], MODEL_DEFAULTS, gpus, overrides)
        ref, limits = refs[cfg.sampler_source], to_dict(cfg.limits)
        handles["sampler"] = SamplerModel.options(**opts).bind(ref.pinned, **common, limits=limits, registry=ref.info())
    ingress_opts = _options(INGRESS_NAME, INGRESS_DEFAULTS, 0, overrides)
    return Ingress.options(**ingress_opts).bind(to_dict(cfg), **handles)
