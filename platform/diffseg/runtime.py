"""Where and how code runs: the one device resolver, the one per-image seeding rule, logging, and starting Ray.

Every job, the training loop, the sweeps and the Serve replicas call these, so that a device string, a seed or a
cluster address means the same thing everywhere:

    resolve_device("auto")            cuda when this process sees a GPU, else cpu; any torch device string otherwise
    image_generators(seed, indices)   image i of a run seeded `seed` draws its noise from its own CPU generator,
                                      seeded `image_seed(seed, i)`: the same image from a job and from Serve, whatever
                                      else is in its batch and on whichever device the network runs
    init_ray(num_cpus)                `ray.init` with this checkout's code shipped to the workers (honours RAY_ADDRESS)
    setup_logging()                   what a job (or a Ray worker) shows: the library's `logging` records on stdout

Ray is imported only inside `init_ray`; nothing here has a side effect at import time.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

SEED_STRIDE = 1_000_003  # a prime: (seed, index) pairs of any realistic range map to distinct generator seeds


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


def code_runtime_env() -> dict[str, Any]:
    """Ship the diffseg package to every worker (`py_modules`), so a cluster needs no install of it.

    Local directories can only be shipped at the job level (`ray.init`); inside `ray job submit` Ray merges this
    with the job's own runtime env (its working_dir, env_vars).
    """
    return {"py_modules": [str(Path(__file__).resolve().parent)]}


def init_ray(num_cpus: int = 0) -> None:
    """Start (or join) Ray once per process: `RAY_ADDRESS` when set (a cluster, or `ray job submit`), else a local
    instance with `num_cpus` logical CPUs (0 = Ray's default). Already initialised: nothing happens."""
    import ray  # costs seconds: only when a job needs Ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {}
    if num_cpus and not os.environ.get("RAY_ADDRESS"):
        kwargs["num_cpus"] = num_cpus
    ray.init(runtime_env=code_runtime_env(), **kwargs)


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever `sys.stdout` is at the time of the record (a notebook's, a test's capture, a Ray log)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property always looks it up instead
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """Show the library's log records (`[train] step ...`) on stdout, once per process (jobs, Ray workers)."""
    logger = logging.getLogger("diffseg")
    if not any(isinstance(h, _StdoutHandler) for h in logger.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)
