"""The Serve application's config (`ServeAppConfig`: model sources, device, batching, `Limits`) and the deployments
it creates, by name (`DEPLOYMENT_NAMES`, `INGRESS_NAME`, their defaults); refusals of older configs' sections."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from diffseg.core.config import WORKDIR_ENV, InputPath, is_uri
from diffseg.core.runtime import decide_gpu
from diffseg.methods.pixel import PixelSegmenter
from diffseg.models.checkpoint import load_checkpoint
from diffseg.models.integrity import FORMAT, CheckpointError


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 8 * 2**20  # largest request body accepted (413 above); checked before and while reading
    max_json_bytes: int = 64 * 2**10  # largest JSON body for /v1/sample
    max_image_pixels: int = 16 * 2**20  # largest declared width x height (413 above): decompression-bomb guard
    max_image_side: int = 8192  # largest declared width or height
    formats: tuple[str, ...] = ("PNG", "JPEG")  # image formats accepted (sniffed from the bytes, not the header)
    max_t: int = 300  # largest noise level t for the factorized segmenter (also capped at T - 1)
    max_num_images: int = 16  # most images one /v1/sample request may ask for
    max_steps: int = 250  # most DDIM steps one /v1/sample request may ask for (also capped at T)
    max_seed: int = 2**31 - 1  # seeds are integers in [0, max_seed]
    max_sample_cost: int = 16 * 250  # most image-steps (num_images x steps) one /v1/sample request may ask for (422)
    max_inflight_cost: int = 2 * 16 * 250  # image-steps a sampler replica runs or queues at once (503 above)
    small_sample_cost: int = 4 * 50  # a /v1/sample request of at most this many image-steps is "small": it may use
    reserved_sample_cost: int = 8 * 4 * 50  # this reserve when the main budget is full (two maximal requests do not
    # lock everyone else out); 0 = no reserve
    max_inflight_pixels: int = 2 * 16 * 2**20  # declared pixels the ingress decodes/renders at once (others wait)
    request_timeout_s: float = 120.0  # the ingress gives up on a model call after this long (504) and cancels it


@dataclass(frozen=True)
class BatchingConfig:
    enabled: bool = True  # route requests through @serve.batch (False: each request is its own forward pass)
    max_batch_size: int = 8  # most requests in one segmenter pass; the sampler's counts images (>= max_num_images)
    batch_wait_timeout_s: float = 0.01  # how long a batch waits to fill up after its first request


# The deployments of the app, by name: Serve's own `deployments:` section of a config file (or `build_app(...,
# deployments=[...])` in Python) sets their replicas, autoscaling, queue limits and `ray_actor_options` by these names.
DEPLOYMENT_NAMES = {"factorized": "FactorizedSegmenter", "pixel": "PixelSegmenter", "sampler": "Sampler"}
INGRESS_NAME = "Ingress"
# What applies when the config says nothing (sized for a 2-core laptop; raise them in `deployments:` on real nodes).
MODEL_DEFAULTS: dict[str, Any] = {"num_replicas": 1, "max_ongoing_requests": 64, "max_queued_requests": 512,
                                  "ray_actor_options": {"num_cpus": 0.5}}  # fmt: skip
INGRESS_DEFAULTS: dict[str, Any] = {"num_replicas": 1, "max_ongoing_requests": 256, "max_queued_requests": 1024,
                                    "ray_actor_options": {"num_cpus": 0.25}}  # fmt: skip
MOVED_TO_DEPLOYMENTS = ("models", "ingress")  # args sections of older configs


def check_app_args(args: Mapping[str, Any]) -> None:
    """Refuse the `models:` / `ingress:` args of older configs with a message saying where those settings went."""
    moved = [k for k in MOVED_TO_DEPLOYMENTS if k in args]
    if moved:
        raise ValueError(
            f"args.{moved[0]}: replica, resource and autoscaling settings sit in Serve's own `deployments:` section "
            f"now (one entry per deployment, named {sorted([*DEPLOYMENT_NAMES.values(), INGRESS_NAME])}: "
            "num_replicas or autoscaling_config, max_ongoing_requests, max_queued_requests, ray_actor_options); "
            "see serve/config.yaml"
        )


def deployment_names(cfg: ServeAppConfig) -> list[str]:
    """The deployments `build_app` creates for this config: what a `deployments:` entry may name."""
    models = {"factorized": cfg.segmenter, "pixel": cfg.pixel, "sampler": cfg.sampler_source}
    return [DEPLOYMENT_NAMES[k] for k, source in models.items() if source] + [INGRESS_NAME]


def check_sources(cfg: ServeAppConfig) -> None:
    """Every model source of a resolved app config is a URI or exists here, where the app is built; else a ValueError
    naming the key, the path and how relative paths were resolved."""
    for key in ("segmenter", "pixel", "sampler"):
        value = getattr(cfg, key)
        if value and not is_uri(value) and not Path(value).exists():
            raise ValueError(
                f"{key}: {value} does not exist on {socket.gethostname()}, where this Serve application is built. "
                f"Relative paths resolve against ${WORKDIR_ENV} or the working directory of `jobs/serve_app.py` "
                f"or `serve run` ({Path.cwd()}); `serve deploy` builds the app on the cluster, so give a path that "
                "exists on its nodes, an s3:// URI or an MLflow URI (runs:/<run id>/checkpoint)"
            )


def verify_sources(cfg: ServeAppConfig) -> None:
    """Read and verify every local model file of a resolved app config here, where the app is built, before any
    replica starts: a damaged, unsealed (without `allow_unverified`) or wrong file fails the deploy once, with the
    error naming the key and the file, instead of failing every replica start in its own log. The pixel bundle's
    backbone checkpoint is checked too. URIs (models:/, runs:/, s3://) are verified by the replicas that fetch them.
    """
    allow = cfg.allow_unverified
    sampler = cfg.sampler_source if cfg.sampler_source != cfg.segmenter else None  # the same file: read once
    checks = [("segmenter", cfg.segmenter, FORMAT), ("sampler", sampler, FORMAT), ("pixel", cfg.pixel, None)]
    for key, value, kind in checks:
        if not value or is_uri(value):
            continue
        try:
            if kind == FORMAT:
                load_checkpoint(value, allow_unverified=allow)
                continue
            backbone = PixelSegmenter.load(value, "cpu", allow_unverified=allow).recipe.backbone
            spec = backbone.split(":", 1)[1] if backbone.startswith("random:") else backbone
            if spec != "rgb" and not backbone.startswith("diffusers:") and not is_uri(spec):
                load_checkpoint(spec, allow_unverified=allow)
        except (CheckpointError, FileNotFoundError) as e:
            raise CheckpointError(f"{key}: {e}") from None


def model_num_gpus(use_gpu: str) -> int:
    """GPUs per model replica: 1 or 0 by the one `use_gpu` rule (`diffseg.core.runtime.decide_gpu`, printed)."""
    return 1 if decide_gpu(use_gpu, "serve").use_gpu else 0


@dataclass(frozen=True)
class ServeAppConfig:
    segmenter: InputPath | None = None  # factorized checkpoint: a path, a run folder, or models:/name@alias
    pixel: InputPath | None = None  # pixel-ensemble bundle (diffseg.methods.pixel): a path, or models:/name@alias
    sampler: InputPath | None = None  # checkpoint to sample from (ddpm or factorized); None = the segmenter's
    use_sampler: bool = True  # serve /v1/sample (False: segmenters only, one replica fewer)
    device: str = "auto"  # torch device of the model replicas: auto (cuda when visible), cpu, cuda, cuda:1
    use_ema: bool = True  # load the EMA weights when the checkpoint has them
    allow_unverified: bool = False  # serve checkpoints/bundles without an integrity record (refused by default)
    expose_internals: bool = False  # /v1/info and answers show checkpoint paths, devices and pids (trusted clients)
    tracking_uri: str | None = None  # MLflow store of models:/ and runs:/ sources; None = $MLFLOW_TRACKING_URI
    batching: BatchingConfig = field(default_factory=BatchingConfig)  # @serve.batch on/off and sizes
    limits: Limits = field(default_factory=Limits)  # request size, pixel and parameter limits
    # A `deployments:` entry's ray_actor_options replaces the app's own (Serve's rule): give num_gpus there too.
    # Replicas, autoscaling, queues and CPUs: Serve's `deployments:` section (serve/config.yaml).
    use_gpu: Literal["auto", "yes", "no"] = "auto"  # a GPU per model replica; auto: the cluster has or can start GPUs
    promoted: str | None = None  # written by jobs/promote.py: "<name>@<alias>=<version>,...", the versions it moved
    # aliases to; a new value is a changed config, so Serve rebuilds the app (which resolves every alias again)

    def __post_init__(self):
        if not (self.segmenter or self.pixel or (self.sampler and self.use_sampler)):
            raise ValueError("nothing to serve: set at least one of segmenter, pixel, sampler")
        if self.batching.max_batch_size < 1:
            raise ValueError("batching.max_batch_size must be >= 1")
        lim = self.limits
        if lim.max_inflight_pixels < lim.max_image_pixels:
            raise ValueError("limits.max_inflight_pixels must be >= max_image_pixels (one maximum-size upload)")
        if not 1 <= lim.max_sample_cost <= lim.max_inflight_cost:
            raise ValueError("limits: need 1 <= max_sample_cost <= max_inflight_cost")
        if lim.reserved_sample_cost and not 1 <= lim.small_sample_cost <= lim.reserved_sample_cost:
            raise ValueError("limits: need 1 <= small_sample_cost <= reserved_sample_cost (or no reserve: 0)")

    @property
    def sampler_source(self) -> str | None:
        return (self.sampler or self.segmenter) if self.use_sampler else None


def config_summary(cfg: ServeAppConfig) -> dict[str, Any]:
    return asdict(cfg)
