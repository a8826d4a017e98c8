"""A sweep's search space: YAML-sayable specs keyed by dotted config paths -> Tune's nested param space.

    build_param_space({"features.blocks": {"subset": ["dec.0", "dec.1", "dec.2"]},          # any non-empty subset
                       "features.timesteps": {"subset": {"of": [0, 50, 100, 250, 500], "max": 3}},
                       "pixel.hidden": {"choice": [[64, 16], [128, 32], [256, 128]]},
                       "pixel.members": {"randint": [2, 11]}}, search="optuna")

A value is a list (a grid; a categorical draw under optuna, which cannot search grids), a Tune domain,
`{grid|choice: [...]}`, `{uniform|loguniform|quniform|randint|qrandint|lograndint: [args]}` (Tune's samplers, by
name) or `{subset: [...]}` / `{subset: {of: [...], min: m, max: n}}`. A subset space is enumerated: every subset of
`of` with m..n elements (default 1..all), each in the order of `of`, is one value, like the entries of a bare list
(a grid under `search: grid`, a categorical draw under random and optuna). Enumerating keeps one value = one feature
recipe = one entry of the feature cache, and works with every searcher and with Tune's restore; the price is that
Optuna's TPE sees a set as one categorical value, not as its elements. Lists and dicts travel through Tune as
"json:" strings (`diffseg.core.report.encode`) and come back as lists in the trial (`trial_overrides`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any

from ray import tune
from ray.tune.search.sample import Domain

from diffseg.core.config import set_path
from diffseg.core.report import encode

SAMPLERS = ("uniform", "loguniform", "quniform", "randint", "qrandint", "lograndint")  # Tune's, by name
MAX_SUBSETS = 10_000  # a subset space larger than this is refused (it is enumerated)


def subsets(key: str, arg: Any) -> list[list[Any]]:
    """`{subset: [a, b, c]}` or `{subset: {of: [...], min: 1, max: 2}}` -> every subset of `of` with min..max
    elements (default 1..all), each in the order of `of`, smallest first: [[a], [b], [c], [a, b], ...]. A decoder
    block set or a timestep set is such a subset; each subset is one value of the space (one feature recipe, one
    entry of the feature cache)."""
    spec = {"of": arg} if isinstance(arg, (list, tuple)) else dict(arg) if isinstance(arg, Mapping) else None
    if spec is None or set(spec) - {"of", "min", "max"} or not isinstance(spec.get("of"), (list, tuple)):
        raise ValueError(f"space.{key}: subset takes a list or {{of: [...], min: n, max: m}}, got {arg!r}")
    of = list(spec["of"])
    lo, hi = int(spec.get("min", 1)), int(spec.get("max", len(of)))
    if not of or len({encode(v) for v in of}) != len(of):
        raise ValueError(f"space.{key}: subset.of must list distinct values, got {of!r}")
    if not 1 <= lo <= hi <= len(of):
        raise ValueError(f"space.{key}: subset needs 1 <= min <= max <= {len(of)} (len(of)), got min={lo} max={hi}")
    count = sum(math.comb(len(of), k) for k in range(lo, hi + 1))
    if count > MAX_SUBSETS:
        raise ValueError(f"space.{key}: {count} subsets (more than {MAX_SUBSETS}); lower subset.max or shorten of")
    return [list(c) for k in range(lo, hi + 1) for c in itertools.combinations(of, k)]


def build_param_space(space: Mapping[str, Any], search: str = "grid") -> dict[str, Any]:
    """Dotted config paths -> Tune's nested param space (see the module docstring for the accepted values)."""
    out: dict[str, Any] = {}
    for key, spec in space.items():
        if isinstance(spec, Domain) or (isinstance(spec, dict) and "grid_search" in spec):
            dom = spec  # already Tune's
        elif isinstance(spec, (list, tuple)):
            values = [encode(v) for v in spec]
            # a bare list is a grid; samplers that cannot take a grid (optuna) draw from it instead
            dom = tune.choice(values) if search == "optuna" else tune.grid_search(values)
        elif isinstance(spec, Mapping) and len(spec) == 1:
            ((kind, arg),) = spec.items()
            if kind in ("grid", "choice"):
                dom = (tune.grid_search if kind == "grid" else tune.choice)([encode(v) for v in arg])
            elif kind == "subset":  # a finite set of values, as a bare list: every subset on a grid, else a draw
                values = [encode(v) for v in subsets(key, arg)]
                dom = tune.grid_search(values) if search == "grid" else tune.choice(values)
            elif kind in SAMPLERS:
                dom = getattr(tune, kind)(*arg)
            else:
                raise ValueError(
                    f"space.{key}: unknown sampler {kind!r}; use grid, choice, subset, {', '.join(SAMPLERS)}"
                )
        else:
            raise ValueError(
                f"space.{key}: expected a list, a Tune domain or {{grid|choice|subset|uniform|...: ...}}, got {spec!r}"
            )
        if search == "optuna" and isinstance(dom, dict) and "grid_search" in dom:
            raise ValueError(f"space.{key}: optuna cannot search a grid; use a list or {{choice: [...]}}")
        set_path(out, key.split("."), dom)
    return out


def space_example(key: str, spec: Any) -> Any:
    """One value of a space entry, to check its config path before any trial starts (None for a Tune domain or
    a sampler of numbers, which need no check beyond the path itself)."""
    if isinstance(spec, (list, tuple)):
        return spec[0] if spec else None
    if isinstance(spec, Mapping) and len(spec) == 1:
        ((kind, arg),) = spec.items()
        if kind in ("grid", "choice") and arg:
            return arg[0]
        if kind == "subset":
            return subsets(key, arg)[0]
    return None


def expected_trials(param_space: Mapping[str, Any], num_samples: int) -> int:
    """How many trials a finished sweep has: num_samples x the product of the grid sizes."""

    def grid_size(node: Any) -> int:
        if isinstance(node, Mapping) and "grid_search" in node:
            return len(node["grid_search"])
        return math.prod(grid_size(v) for v in node.values()) if isinstance(node, Mapping) else 1

    return num_samples * grid_size(param_space)
