"""Ray Tune sweeps over config paths: feature recipes (blocks x timesteps), pixel-MLP sizes, K, learning rates.

    result = run_sweep(base_cfg, {"features.blocks": [["dec.3"], ["dec.4", "dec.5"]],
                                  "features.timesteps": [[50], [50, 150]]},
                       metric="test/miou", mode="max")
    result.table          # pandas DataFrame: one row per trial, the swept config paths + metrics, best first
    result.best_config    # base_cfg with the best trial's values
    result.best           # {"features.blocks": ..., ...}: the best trial's values

The search space is keyed by dotted config paths (the same paths `key.path=value` overrides use). A value is a list
(grid search over it), a Tune domain (`tune.choice`, `tune.loguniform`, ...), or a mapping `{grid: [...]}`,
`{choice: [...]}`, `{uniform: [lo, hi]}`, `{loguniform: [lo, hi]}`, `{randint: [lo, hi]}` (what YAML can say).
List-valued choices (block sets) are carried through Tune as strings, so Optuna's categorical sampler accepts them.

Two trial kinds, picked by the base config's type:

- **pixel** (`PixelTrialConfig`): label-efficient segmentation. Features of the labelled train images and the test
  images are extracted ONCE per (backbone, blocks, timesteps, noise, data) into Parquet shards, in a cache keyed by
  the hash of exactly that sub-config (`FeatureCache`), so trials that only vary the classifier reuse them; the MLP
  ensemble trains from the shards (`diffseg.pixel.train_ensemble`) and is scored by mIoU on the test shards.
  `num_reports > 1` splits the ensemble's training into that many chunks, each followed by a test evaluation.
- **factorized** (`diffseg.train.TrainConfig` with `model.kind=factorized`): a short training, split into
  `num_reports` chunks (the run resumes from its own checkpoint between chunks); after each chunk the test images are
  segmented (noise to t, one forward pass) and scored against their foreground masks (`test/fg_iou`, the IEM/ReDO
  protocol) and their part masks (`test/hungarian_miou`). `scaling.num_workers=0` trains in the trial's own process;
  `num_workers>0` makes the trial launch its own `TorchTrainer` (Ray Train V2: a Tune *function* trainable runs the
  work, a Trainer is never handed to the Tuner), whose workers reserve their own resources.

Each report is a `tune.report`, so ASHA (`scheduler="asha"`) stops weak trials after any chunk.

Tracking: the sweep is one MLflow run holding the results table (`results.csv`, `results.md`) and a plot
(`results.png`); every trial is an MLflow run nested under it (tag `mlflow.parentRunId`), with the trial's full
config as params and its metrics per report.

Trust: resuming unpickles Tune's state in the experiment folder, so it is restored only if `diffseg.trust` proves
it is this user's (owner and permissions, and an HMAC recorded under a per-user key kept outside the folder when the
driver stopped); otherwise the resume is refused before anything is read. `jobs/sweep.py --trust-state` signs a
folder whose driver was killed before it could.

Resuming: the experiment lives in `<output_dir>/<name>` (Tune's state, `sweep.json` with the parent MLflow run, and
each trial's run folder under `trials/`). If a sweep is interrupted (Ctrl-C, a crashed driver, a lost node), call
`run_sweep(..., resume=True)` with the same `name` and `output_dir` (or `python jobs/sweep.py --config S.yaml
--resume`): Tune's `Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)` keeps finished trials,
continues unfinished ones from their last report, and reruns the errored ones; the same parent MLflow run is reused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import math
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from diffseg.checkpoint import read_payload, write_payload
from diffseg.config import Name, config_hash, from_dict, job_dir, merge, replace, set_path, to_dict
from diffseg.data import DataConfig, build_dataset, item_ids
from diffseg.features import FeatureConfig
from diffseg.shards import MANIFEST_FORMAT
from diffseg.tracking import Tracker, TrackingConfig, flatten, resolve_tracking_uri
from diffseg.trust import UntrustedState, check_state, key_path, sign_state, trust_state

logger = logging.getLogger(__name__)
ENSEMBLE_FORMAT = "diffseg-ensemble-state/1"  # a trial's ensemble between reports
JSON_PREFIX = "json:"  # list/dict choices travel through Tune (and Optuna) as "json:<value>" strings


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
class PixelTrialConfig:
    """One label-efficient trial: which features, which labelled images, which ensemble."""

    features: FeatureConfig = field(default_factory=FeatureConfig)  # backbone, blocks, timesteps, noise
    # the labelled images are data's train split; the test images its test split, or test_data's when given
    data: DataConfig = field(default_factory=lambda: DataConfig(num_images=24, num_train=8, num_test=8))
    test_data: DataConfig | None = None  # e.g. a held-out range of a folder that data's split cannot express
    pixel: dict[str, Any] = field(default_factory=dict)  # diffseg.pixel.PixelTrainConfig fields (members, hidden, lr)
    eval_batch_size: int = 8  # test images per feature extraction batch


@dataclass(frozen=True)
class SweepConfig:
    name: Name = "sweep"  # the experiment folder under output_dir; the same name + resume=True resumes it
    task: Literal["auto", "pixel", "factorized"] = "auto"  # what a trial does; auto = from the base config's type
    base_config: str | None = None  # YAML of the base config (jobs/sweep.py); None = the task's defaults
    base_overrides: dict[str, Any] = field(default_factory=dict)  # applied to the base config (dotted or nested keys)
    space: dict[str, Any] = field(default_factory=dict)  # config path -> values (see the module docstring)
    search: Literal["grid", "random", "optuna"] = "grid"  # grid/random: Tune's variant generator; optuna: TPE
    num_samples: int = 1  # grid: repeats of the whole grid; random/optuna: number of trials
    metric: str = "test/miou"  # the metric key to optimise (split/name, as reported)
    mode: Literal["max", "min"] = "max"
    num_reports: int = 1  # evaluations per trial: training is split into this many chunks (ASHA's time unit)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)  # fifo or asha
    resources: TrialResources = field(default_factory=TrialResources)  # per trial
    max_concurrent_trials: int = 0  # 0 = as many as the resources allow
    max_failures: int = 0  # retries of a failed trial (from its last report)
    seed: int = 0  # seed of the random/optuna samplers
    segment_t: int = 30  # factorized: the noise level at which real images are segmented
    fg_reduction: Literal["best_single", "best_subset", "fixed"] = "best_single"  # factorized: K regions -> fg
    output_dir: str = "runs/sweeps"  # experiments live in <output_dir>/<name>
    cache_dir: str | None = None  # feature-shard cache; None = <output_dir>/feature_cache (shared across sweeps)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # MLflow (parent run + one nested run per trial)


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
    if task == "pixel":
        return PixelTrialConfig
    from diffseg.train import TrainConfig

    return TrainConfig


# ---------------------------------------------------------------------------------------------------- space
def _encode(value: Any) -> Any:
    """Tune (and Optuna's categorical sampler) want primitives: lists and dicts become "json:<value>" strings."""
    if isinstance(value, (list, tuple, dict)):
        return JSON_PREFIX + json.dumps(to_dict(value))
    return value


def decode(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(JSON_PREFIX):
        return json.loads(value[len(JSON_PREFIX) :])
    return value


def build_param_space(space: Mapping[str, Any], search: str = "grid") -> dict[str, Any]:
    """Dotted config paths -> Tune's nested param space (see the module docstring for the accepted values)."""
    from ray import tune
    from ray.tune.search.sample import Domain

    out: dict[str, Any] = {}
    for key, spec in space.items():
        if isinstance(spec, Domain) or (isinstance(spec, dict) and "grid_search" in spec):
            dom = spec  # already Tune's
        elif isinstance(spec, (list, tuple)):
            values = [_encode(v) for v in spec]
            # a bare list is a grid; samplers that cannot take a grid (optuna) draw from it instead
            dom = tune.choice(values) if search == "optuna" else tune.grid_search(values)
        elif isinstance(spec, Mapping) and len(spec) == 1:
            ((kind, arg),) = spec.items()
            if kind == "grid":
                dom = tune.grid_search([_encode(v) for v in arg])
            elif kind == "choice":
                dom = tune.choice([_encode(v) for v in arg])
            elif kind in ("uniform", "loguniform", "randint", "quniform"):
                dom = getattr(tune, kind)(*arg)
            else:
                raise ValueError(
                    f"space.{key}: unknown sampler {kind!r}; use grid, choice, uniform, loguniform, randint"
                )
        else:
            raise ValueError(
                f"space.{key}: expected a list, a Tune domain or {{grid|choice|uniform|...: ...}}, got {spec!r}"
            )
        if search == "optuna" and isinstance(dom, dict) and "grid_search" in dom:
            raise ValueError(f"space.{key}: optuna cannot search a grid; use a list or {{choice: [...]}}")
        set_path(out, key.split("."), dom)
    return out


def apply_overrides(cfg: Any, overrides: Mapping[str, Any]) -> Any:
    """`cfg` with dotted and/or nested overrides merged key by key (a section that is None takes a whole mapping)."""
    nested: dict[str, Any] = {}
    for key, value in flatten(overrides).items():
        set_path(nested, key.split("."), value)
    return from_dict(type(cfg), merge(to_dict(cfg), nested))


def trial_overrides(config: Mapping[str, Any], keys: list[str]) -> dict[str, Any]:
    """A trial's nested Tune config -> {dotted path: decoded value} for the swept keys."""
    out = {}
    for key in keys:
        node: Any = config
        for part in key.split("."):
            node = node[part]
        out[key] = decode(node)
    return out


# ---------------------------------------------------------------------------------------------------- cache
@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes on this node; the atomic rename below keeps other nodes correct too."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def backbone_fingerprint(spec: str) -> dict[str, Any]:
    """What identifies a backbone: the spec, plus size and mtime of a checkpoint file (a retrained one is new)."""
    path = spec.split(":", 1)[1] if spec.startswith(("random:", "diffusers:")) else spec
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return {"spec": spec, "path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return {"spec": spec}


def feature_key(features: FeatureConfig, data: DataConfig, test_data: DataConfig | None = None) -> dict[str, Any]:
    """Everything that determines a feature set (and nothing the classifier varies)."""
    f = to_dict(features)
    f.pop("batch_size"), f.pop("precision")  # how, not what
    f["backbone"] = backbone_fingerprint(features.backbone)
    key = {"features": f, "data": to_dict(data), "layout": MANIFEST_FORMAT}  # entries without manifests never match
    if test_data is not None:
        key["test_data"] = to_dict(test_data)
    return key


class FeatureCache:
    """Feature shards on disk, one entry per feature key: `<root>/<hash>/{train,test}/*.parquet` + `key.json`.

    `get(key, build)` returns the entry, calling `build(tmp_dir)` only when it is missing. Concurrent trials are safe:
    builders of the same key serialise on a lock file, the entry is built in a private temp folder and renamed into
    place (atomic), and an entry without its `_SUCCESS` marker is never used. Every hit and build is appended to
    `<root>/events.jsonl` (which the tests and a curious researcher can read).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, key: Mapping[str, Any]) -> Path:
        return self.root / config_hash(key, 16)

    def _event(self, kind: str, key_hash: str, seconds: float = 0.0) -> None:
        line = json.dumps({"event": kind, "key": key_hash, "pid": os.getpid(), "time": time.time(), "s": seconds})
        with _file_lock(self.root / ".events.lock"), open(self.root / "events.jsonl", "a") as f:
            f.write(line + "\n")

    def events(self) -> list[dict[str, Any]]:
        path = self.root / "events.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []

    def get(self, key: Mapping[str, Any], build: Callable[[Path], None]) -> Path:
        final = self.path(key)
        if (final / "_SUCCESS").is_file():
            self._event("hit", final.name)
            return final
        with _file_lock(self.root / f".{final.name}.lock"):
            if (final / "_SUCCESS").is_file():  # built by another trial while we waited
                self._event("hit", final.name)
                return final
            t0 = time.perf_counter()
            tmp = self.root / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                build(tmp)
                (tmp / "key.json").write_text(json.dumps(to_dict(key), indent=1, default=str))
                (tmp / "_SUCCESS").touch()
                if final.exists():  # a torn entry (no _SUCCESS) left by a killed builder
                    shutil.rmtree(final)
                os.rename(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            self._event("build", final.name, time.perf_counter() - t0)
        return final


def extract_split(cfg: PixelTrialConfig, split: Literal["train", "test"], out_dir: Path, device: torch.device) -> int:
    """Features of one split's images -> shards in `out_dir` (labelled pixels only); returns the pixel count.

    In-process (the trial holds the CPU/GPU it reserved); large extractions belong to jobs/extract_features.py's
    Ray Data actor pool, whose shards this cache layout accepts as well.
    """
    from diffseg.features import FeaturePipeline
    from diffseg.shards import FeatureMeta, begin_shard_set, end_shard_set, write_shard

    dataset = build_dataset(cfg.test_data or cfg.data if split == "test" else cfg.data, split)  # never empty
    begin_shard_set(out_dir, item_ids(dataset), {"split": split})
    pipeline = FeaturePipeline(cfg.features, device)
    ignore = getattr(dataset, "ignore_index", 255)
    class_names = list(getattr(dataset, "class_names", []))
    total = 0
    bs = cfg.features.batch_size if split == "train" else cfg.eval_batch_size
    for start in range(0, len(dataset), bs):
        items = [dataset[i] for i in range(start, min(start + bs, len(dataset)))]
        images = torch.stack([it["image"] for it in items])  # (B, 3, H, W)
        masks = torch.stack([it["mask"] for it in items])  # (B, H, W)
        feats = pipeline(images).cpu()  # (B, D, H, W)
        b, d, h, w = feats.shape
        rows = feats.permute(0, 2, 3, 1).reshape(b * h * w, d)  # (B*H*W, D)
        labels = masks.reshape(-1)
        keep = labels != ignore
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        ids = np.repeat(np.array([it["id"] for it in items]), h * w)
        meta = FeatureMeta(
            blocks=list(cfg.features.blocks),
            timesteps=list(cfg.features.timesteps),
            feature_dim=d,
            image_size=h,
            num_classes=len(class_names),
            class_names=class_names,
            backbone=cfg.features.backbone,
            noise_seed=cfg.features.noise_seed,
            extra={"ignore_index": ignore, "split": split},
        )
        write_shard(
            out_dir / f"shard-{items[0]['id']}.parquet",
            rows[keep].numpy(),
            labels[keep].numpy(),
            ids[keep.numpy()],
            ys.reshape(-1).repeat(b)[keep].numpy(),
            xs.reshape(-1).repeat(b)[keep].numpy(),
            meta,
            images=[it["id"] for it in items],
        )
        total += int(keep.sum())
    end_shard_set(out_dir)
    return total


# ---------------------------------------------------------------------------------------------------- trials
@dataclass
class TrialState:
    """What a trial carries across reports (and across a restore, inside its Tune checkpoint)."""

    report: int = 0  # reports made so far
    mlflow_run_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _device(resources: TrialResources) -> torch.device:
    return torch.device("cuda" if resources.gpu > 0 and torch.cuda.is_available() else "cpu")


def pixel_chunks(cfg: PixelTrialConfig, sweep: SweepConfig, trial_dir: Path, state: TrialState, cache_root: Path):
    """Generator of metric dicts, one per report: train the ensemble in chunks on cached shards, score on test."""
    from diffseg.metrics import ConfusionMatrix
    from diffseg.pixel import MLPEnsemble, PixelTrainConfig, predict_pixels, train_ensemble
    from diffseg.shards import ShardSet

    device = _device(sweep.resources)
    cache = FeatureCache(cache_root)

    def build(tmp: Path) -> None:
        for split in ("train", "test"):
            extract_split(cfg, split, tmp / split, device)

    t0 = time.perf_counter()
    entry = cache.get(feature_key(cfg.features, cfg.data, cfg.test_data), build)
    feature_s = time.perf_counter() - t0
    train_set, test_set = ShardSet(entry / "train"), ShardSet(entry / "test")
    num_classes = train_set.meta.num_classes
    class_names = train_set.meta.class_names
    pcfg = from_dict(PixelTrainConfig, cfg.pixel, "pixel")
    # Chunks: the ensemble's epochs (or its iteration cap) split evenly over the reports.
    ckpt = trial_dir / "ensemble.pt"
    ensemble = None
    if state.report > 0 and ckpt.is_file():
        ensemble = MLPEnsemble(train_set.meta.feature_dim, num_classes, pcfg.members, pcfg.hidden or None)
        ensemble.load_state_dict(read_payload(ckpt, ENSEMBLE_FORMAT)["state"])
    n = sweep.num_reports
    for r in range(state.report, n):
        chunk = replace(
            pcfg,
            max_epochs=max(1, math.ceil(pcfg.max_epochs / n)),
            max_iterations=max(1, math.ceil(pcfg.max_iterations / n)) if pcfg.max_iterations else 0,
            seed=pcfg.seed + r,
        )
        t1 = time.perf_counter()
        ensemble, res = train_ensemble(train_set, num_classes, chunk, device=device, ensemble=ensemble)
        train_s = time.perf_counter() - t1
        cm = ConfusionMatrix(num_classes, ignore_index=None)
        for shard in test_set.iter_shards(columns=["features", "label"]):
            pred, _, _ = predict_pixels(ensemble, torch.tensor(shard.features))
            cm.update(pred.numpy()[None], shard.labels[None])
        write_payload(ckpt, {"format": ENSEMBLE_FORMAT, "state": ensemble.state_dict()})
        finite = [x for x in res.final_loss if math.isfinite(x)]
        yield {
            **cm.as_dict("test", class_names),
            "train/loss": float(np.mean(finite)) if finite else float("nan"),
            "train/iterations": res.iterations,
            "time/features_s": feature_s,
            "time/train_s": train_s,
            "feature_dim": train_set.meta.feature_dim,
        }
        feature_s = 0.0


def factorized_chunks(cfg: Any, sweep: SweepConfig, trial_dir: Path, state: TrialState, cache_root: Path):
    """Generator of metric dicts, one per report: train a factorized model in chunks, segment the test images."""
    from diffseg.checkpoint import load_model
    from diffseg.diffusion import GaussianDiffusion
    from diffseg.metrics import foreground_scores, hungarian_miou
    from diffseg.segment import segment_images

    if cfg.model.kind != "factorized":
        raise ValueError(f"model.kind: a factorized sweep needs model.kind=factorized, got {cfg.model.kind!r}")
    test = build_dataset(cfg.data, "test")
    if len(test) == 0:
        raise ValueError("data.num_test: a factorized sweep scores segmentations of held-out images; set num_test > 0")
    total = cfg.loop.num_steps
    k = cfg.model.factorized.num_components
    n = sweep.num_reports
    for r in range(state.report, n):
        steps = max(1, round(total * (r + 1) / n))
        train_cfg = replace(
            cfg,
            name=trial_dir.name,
            output_dir=str(trial_dir.parent),
            **{"loop.num_steps": steps, "tracking.enabled": False},  # the trial's own MLflow run holds the metrics
        )
        t0 = time.perf_counter()
        if cfg.scaling.num_workers == 0:
            from diffseg.loop import LocalContext, fit

            out = fit(train_cfg, LocalContext(_device(sweep.resources)))
        else:  # distributed trial: its own TorchTrainer (workers reserve their own resources)
            from diffseg.train import run

            out = run(train_cfg).return_value
        train_s = time.perf_counter() - t0
        model, ckpt = load_model(Path(out["checkpoint"]), use_ema=True)
        device = _device(sweep.resources)
        model = model.to(device).eval()
        diffusion = GaussianDiffusion.from_config(cfg.diffusion)
        labels, fgs, parts = [], [], []
        for start in range(0, len(test), 16):
            items = [test[i] for i in range(start, min(start + 16, len(test)))]
            images = torch.stack([it["image"] for it in items])
            gens = [torch.Generator(device=device).manual_seed(int(it["id"]) if it["id"].isdigit() else i)
                    for i, it in enumerate(items)]  # fmt: skip
            seg = segment_images(model, diffusion, images, t=sweep.segment_t, generator=gens)
            labels.append(seg["labels"].cpu())
            masks = torch.stack([it["mask"] for it in items])
            parts.append(masks)
            fgs.append(torch.where(masks == 255, masks, (masks > 0).long()))
        labels_t, fg_t, parts_t = torch.cat(labels), torch.cat(fgs), torch.cat(parts)
        metrics: dict[str, float] = {}
        if k >= 2:
            metrics.update(foreground_scores(labels_t, fg_t, sweep.fg_reduction, num_regions=k).as_dict("test"))
        num_classes = len(getattr(test, "class_names", [])) or int(parts_t[parts_t != 255].max()) + 1
        metrics["test/hungarian_miou"] = float(hungarian_miou(labels_t, parts_t, k, num_classes).miou)
        history = out.get("loss_history") or [[steps, float("nan")]]
        metrics.update({"train/loss": float(history[-1][1]), "train/step": steps, "time/train_s": train_s})
        state.extra["loss_history"] = history
        del ckpt
        yield metrics


TASKS: dict[str, Callable[..., Iterator[dict[str, float]]]] = {"pixel": pixel_chunks, "factorized": factorized_chunks}


def _existing_trial_run(tracking: TrackingConfig, uri: str, parent_run_id: str | None, trial_id: str) -> str | None:
    """The MLflow run this trial started before (tag `diffseg.trial_id` under the sweep's run), if any."""
    if not tracking.enabled or parent_run_id is None:
        return None
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp_id = client.get_run(parent_run_id).info.experiment_id
    query = f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`diffseg.trial_id` = '{trial_id}'"
    runs = client.search_runs([exp_id], query, max_results=1)
    return runs[0].info.run_id if runs else None


def sweep_trial(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    """The Tune function trainable: decode the trial's values, run the task's chunks, report after each."""
    import ray.tune as tune

    torch.set_num_threads(max(1, int(ctx["threads"])))
    sweep = from_dict(SweepConfig, ctx["sweep"])
    task = ctx["task"]
    overrides = trial_overrides(config, ctx["keys"])
    cfg = replace(from_dict(base_config_class(task), ctx["base"]), **overrides)
    tctx = tune.get_context()
    trial_id, trial_name = tctx.get_trial_id(), tctx.get_trial_name()
    trial_dir = Path(ctx["experiment_dir"]) / "trials" / trial_id

    state = TrialState()
    if (checkpoint := tune.get_checkpoint()) is not None:  # a restored or retried trial continues where it was
        with checkpoint.as_directory() as d:
            state = TrialState(**json.loads((Path(d) / "trial_state.json").read_text()))

    if state.mlflow_run_id is None:  # restarted before its first report (an interrupted sweep): reuse its run
        state.mlflow_run_id = _existing_trial_run(sweep.tracking, ctx["tracking_uri"], ctx["parent_run_id"], trial_id)
    tracker = Tracker(
        sweep.tracking,
        run_name=trial_name,
        run_id=state.mlflow_run_id,
        tracking_uri=ctx["tracking_uri"],
        parent_run_id=ctx["parent_run_id"],
    )
    if not state.mlflow_run_id:
        tracker.log_params(to_dict(cfg))
        tracker.set_tags({"diffseg.sweep": sweep.name, "diffseg.trial_id": trial_id, "diffseg.task": task,
                          **{f"sweep.{k}": json.dumps(v) for k, v in overrides.items()}})  # fmt: skip
        state.mlflow_run_id = tracker.run_id

    for metrics in TASKS[task](cfg, sweep, trial_dir, state, Path(ctx["cache_dir"])):
        state.report += 1
        tracker.log_metrics(metrics, step=state.report)
        if state.report == sweep.num_reports:
            tracker.finish()  # before the last report: Tune may end the trial right after it
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "trial_state.json").write_text(json.dumps(dataclasses.asdict(state)))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


# ---------------------------------------------------------------------------------------------------- driver
class SweepInterrupted(RuntimeError):
    """The sweep was stopped (Ctrl-C) before every trial ended; its state is saved and `resume=True` continues it."""


@dataclass
class SweepResult:
    table: Any  # pandas DataFrame, one row per trial, best first
    best: dict[str, Any]  # the best trial's values of the swept paths
    best_config: Any  # the base config with them applied
    best_metrics: dict[str, float]
    path: Path  # the experiment folder
    parent_run_id: str | None  # the sweep's MLflow run
    plot: Path | None = None


def _tune_was_interrupted(previous_handler: Any) -> bool:
    """Did Ctrl-C / SIGINT stop `Tuner.fit`? Tune swaps in its own SIGINT handler for the run and puts the previous
    one back only when the signal arrives, so its handler still being installed means the run was not interrupted.
    The previous handler is restored either way (a notebook's Ctrl-C must work again after the sweep)."""
    if previous_handler is None or os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0") not in ("", "0"):
        return False
    current = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, previous_handler)
    return getattr(current, "__name__", "") != "signal_interrupt_tune_run"


def _scheduler(sweep: SweepConfig):
    if sweep.scheduler.kind == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=sweep.num_reports,
        grace_period=min(sweep.scheduler.grace_period, sweep.num_reports),
        reduction_factor=sweep.scheduler.reduction_factor,
    )


def _search_alg(sweep: SweepConfig):
    if sweep.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=sweep.seed)
    if sweep.search == "random":
        from ray.tune.search import BasicVariantGenerator

        return BasicVariantGenerator(random_state=sweep.seed)
    return None


def results_table(result_grid: Any, keys: list[str], metric: str, mode: str) -> Any:
    """One row per trial: trial id, status, the swept values (decoded), the last reported metrics; best first."""
    import pandas as pd

    rows = []
    for res in result_grid:
        m = dict(res.metrics or {})
        row: dict[str, Any] = {"trial_id": m.get("trial_id") or Path(res.path).name.split("_")[-1]}
        if res.config:  # a trial that never started (an interrupted sweep) has no config yet
            row.update({k: _short(v) for k, v in trial_overrides(res.config, keys).items()})
        row["status"] = "ERROR" if res.error else "DONE"  # run_sweep marks trials ASHA stopped early
        row["reports"] = m.get("training_iteration", 0)
        row.update({k: v for k, v in m.items() if "/" in k and k.split("/")[0] in ("train", "test", "val", "time")})
        if "feature_dim" in m:
            row["feature_dim"] = m["feature_dim"]
        rows.append(row)
    df = pd.DataFrame(rows)
    if metric in df.columns:
        df = df.sort_values(metric, ascending=mode == "min", na_position="last").reset_index(drop=True)
    return df


def _short(value: Any) -> Any:
    """Readable cell values: ["dec.4", "dec.5"] -> "dec.4,dec.5"; [50, 150] -> "50,150"."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return value


def to_markdown(df: Any, float_format: str = "{:.4f}") -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    for _, row in df.iterrows():
        cells = []
        for c in cols:
            v = row[c]
            cells.append(float_format.format(v) if isinstance(v, float) and math.isfinite(v) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_results(df: Any, keys: list[str], metric: str, path: str | os.PathLike, title: str | None = None) -> Path:
    """Two swept paths: a heatmap of `metric` (rows = first path, columns = second); one: a bar chart."""
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend (a notebook's inline) alone

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    varied = [k for k in keys if k in df.columns and df[k].astype(str).nunique() > 1] or keys[:1]
    data = df[df[metric].notna()] if metric in df.columns else df.iloc[:0]
    if len(varied) >= 2:
        a, b = varied[0], varied[1]
        pivot = data.assign(**{a: data[a].astype(str), b: data[b].astype(str)}).pivot_table(
            index=a, columns=b, values=metric, aggfunc="max"
        )
        fig = Figure(figsize=(1.6 + 1.3 * pivot.shape[1], 1.2 + 0.6 * pivot.shape[0]))
        ax = fig.add_subplot()
        im = ax.imshow(pivot.values, cmap="viridis", aspect="auto")
        ax.set_xticks(range(pivot.shape[1]), pivot.columns, rotation=30, ha="right")
        ax.set_yticks(range(pivot.shape[0]), pivot.index)
        ax.set_xlabel(b), ax.set_ylabel(a)
        for (i, j), v in np.ndenumerate(pivot.values):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.3f}", ha="center", va="center", color="w" if v < np.nanmean(pivot.values) else "k")
        fig.colorbar(im, ax=ax, label=metric)
    else:
        a = varied[0]
        grouped = data.groupby(data[a].astype(str), sort=False)[metric].max()
        fig = Figure(figsize=(max(3.5, 0.8 * len(grouped) + 1.5), 3))
        ax = fig.add_subplot()
        ax.bar(range(len(grouped)), grouped.values, color="tab:blue")
        ax.set_xticks(range(len(grouped)), grouped.index, rotation=30 if len(grouped) > 4 else 0)
        ax.set_xlabel(a), ax.set_ylabel(metric)
        for i, v in enumerate(grouped.values):
            ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_title(title or metric)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _finish_stopped_runs(tracker: Tracker, parent_run_id: str | None) -> None:
    """Trials ASHA stopped early (or that crashed) leave RUNNING MLflow runs: mark them KILLED / FAILED."""
    if not tracker.enabled or parent_run_id is None:
        return
    client = tracker._client
    exp_id = client.get_run(parent_run_id).info.experiment_id
    for run in client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=10000):
        if run.info.status == "RUNNING":
            client.set_tag(run.info.run_id, "diffseg.stopped_early", "true")
            client.set_terminated(run.info.run_id, status="KILLED")


def run_sweep(
    base: Any,
    space: Mapping[str, Any] | None = None,
    sweep: SweepConfig | None = None,
    *,
    resume: bool = False,
    **options: Any,
) -> SweepResult:
    """Run a Tune search over `space` (dotted config paths) around `base`; returns the table and the best config.

    :param base: the base config: a `PixelTrialConfig` (label-efficient trials) or a factorized `TrainConfig`.
    :param space: {config path: values}; see the module docstring. Overrides `sweep.space` when given.
    :param sweep: the sweep's settings; `**options` are `SweepConfig` fields (dotted keys allowed) applied on top,
        e.g. `metric="test/miou", num_reports=3, **{"scheduler.kind": "asha", "resources.gpu": 0.5}`.
    :param resume: continue the interrupted sweep `<output_dir>/<name>` (Tune's restore: finished trials are kept,
        unfinished ones continue from their last report, errored ones are rerun). Without it an existing experiment
        folder is an error, so a sweep is never silently mixed with an older one.

    Starts a local Ray instance when none is running (`ray.init()` honours RAY_ADDRESS, so on a cluster the trials
    spread over its nodes; `output_dir` must then be shared storage visible to every node).
    """
    import ray
    from ray import tune

    sweep = sweep or SweepConfig()
    if space is not None:
        options["space"] = dict(space)
    if options:
        sweep = replace(sweep, **options)
    if not sweep.space:
        raise ValueError("space: nothing to sweep; give {config path: values}")
    task = task_of(base, sweep.task)
    if sweep.base_overrides:  # nested sections merge key by key (`data: {image_size: 16}` keeps the other data fields)
        base = apply_overrides(base, sweep.base_overrides)
    keys = list(sweep.space)
    for key in keys:  # fail before any trial starts on a path the base config does not have
        probe = sweep.space[key]
        probe_v = probe[0] if isinstance(probe, (list, tuple)) and probe else None
        if probe_v is not None:
            replace(base, **{key: probe_v})

    out = Path(sweep.output_dir).resolve()
    exp_dir = job_dir(out, sweep.name)
    if resume and (exp_dir / "tuner.pkl").exists():  # Tune's restore unpickles the folder: only the user's own
        check_state(exp_dir)
    if not ray.is_initialized():
        from diffseg.train import code_runtime_env

        ray.init(runtime_env=code_runtime_env())
    cache_dir = Path(sweep.cache_dir).resolve() if sweep.cache_dir else out / "feature_cache"
    uri = resolve_tracking_uri(sweep.tracking.uri)
    state_file = exp_dir / "sweep.json"

    from ray.tune import Tuner

    restoring = resume and Tuner.can_restore(str(exp_dir))
    if exp_dir.exists() and not resume and (exp_dir / "sweep.json").exists():
        raise FileExistsError(
            f"{exp_dir} holds a sweep already: pass resume=True (jobs/sweep.py --resume) to continue it, "
            "or choose another name"
        )
    parent_run_id = json.loads(state_file.read_text())["parent_run_id"] if state_file.is_file() else None
    parent = Tracker(sweep.tracking, run_name=sweep.name, run_id=parent_run_id, tracking_uri=uri)
    if parent_run_id is None:
        parent.log_params({"sweep": {k: v for k, v in to_dict(sweep).items() if k != "space"}, "base": to_dict(base)})
        parent.set_tags({"diffseg.sweep": sweep.name, "diffseg.task": task,
                         "diffseg.space": json.dumps(to_dict(sweep.space))[:5000]})  # fmt: skip
    exp_dir.mkdir(parents=True, exist_ok=True)
    from diffseg.config import atomic_write_text

    atomic_write_text(state_file, json.dumps({"parent_run_id": parent.run_id, "task": task, "sweep": to_dict(sweep),
                                              "base": to_dict(base)}, indent=1, default=str))  # fmt: skip

    ctx = {
        "sweep": to_dict(sweep),
        "task": task,
        "base": to_dict(base),
        "keys": keys,
        "experiment_dir": str(exp_dir),
        "cache_dir": str(cache_dir),
        "tracking_uri": uri,
        "parent_run_id": parent.run_id,
        "threads": max(1, math.floor(sweep.resources.cpu)),
    }
    resources = {"cpu": sweep.resources.cpu, "gpu": sweep.resources.gpu}
    trainable = tune.with_resources(tune.with_parameters(sweep_trial, ctx=ctx), resources)
    if restoring:
        tuner = Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = Tuner(
            trainable,
            param_space=build_param_space(sweep.space, sweep.search),
            tune_config=tune.TuneConfig(
                metric=sweep.metric,
                mode=sweep.mode,
                search_alg=_search_alg(sweep),
                scheduler=_scheduler(sweep),
                num_samples=sweep.num_samples,
                max_concurrent_trials=sweep.max_concurrent_trials or None,
                trial_dirname_creator=lambda t: f"trial_{t.trial_id}",
                reuse_actors=True,  # trials reuse warm worker processes (imports, CUDA context): seconds per trial
            ),
            run_config=tune.RunConfig(
                name=sweep.name,
                storage_path=str(out),
                failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                verbose=1,
            ),
        )
    handler = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    try:
        grid = tuner.fit()
    finally:  # however the driver stops (but SIGKILL), sign what Tune wrote, so that resume=True may restore it
        try:
            sign_state(exp_dir)
        except (OSError, UntrustedState) as e:
            logger.warning("could not sign the sweep state in %s (a resume will be refused): %s", exp_dir, e)
    interrupted = _tune_was_interrupted(handler) or grid.num_terminated + grid.num_errors < len(grid)

    table = results_table(grid, keys, sweep.metric, sweep.mode)
    if interrupted:  # Ctrl-C / SIGINT: Tune saved its state and returned
        table.to_csv(exp_dir / "results_partial.csv", index=False)
        parent.finish("KILLED")
        raise SweepInterrupted(
            f"sweep {sweep.name!r} was interrupted with {len(grid) - grid.num_terminated - grid.num_errors} of "
            f"{len(grid)} trials unfinished; continue it with run_sweep(..., resume=True) (same name and output_dir) "
            f"or `python jobs/sweep.py --config ... --resume`. State: {exp_dir}"
        )
    if "status" in table.columns:  # a trial with fewer reports than asked was stopped early by the scheduler
        done = table["reports"] >= sweep.num_reports
        table["status"] = np.where(table["status"] == "ERROR", "ERROR", np.where(done, "DONE", "STOPPED"))
    _finish_stopped_runs(parent, parent.run_id)
    ok = table[table[sweep.metric].notna()] if sweep.metric in table.columns else table.iloc[:0]
    if ok.empty:
        parent.finish("FAILED")
        errors = [str(r.error) for r in grid if r.error][:3]
        raise RuntimeError(f"no trial of sweep {sweep.name!r} reported {sweep.metric!r}; errors: {errors}")
    best_res = grid.get_best_result(sweep.metric, sweep.mode, scope="last", filter_nan_and_inf=True)
    best = trial_overrides(best_res.config, keys)
    best_config = replace(base, **best)
    best_metrics = {k: v for k, v in (best_res.metrics or {}).items() if "/" in k and isinstance(v, (int, float))}

    table.to_csv(exp_dir / "results.csv", index=False)
    (exp_dir / "results.md").write_text(to_markdown(table))
    plot = plot_results(table, keys, sweep.metric, exp_dir / "results.png", title=f"{sweep.name}: {sweep.metric}")
    from diffseg.config import save_config

    save_config(best_config, exp_dir / "best_config.yaml")
    for name in ("results.csv", "results.md", "results.png", "best_config.yaml"):
        parent.log_artifact(exp_dir / name)
    parent.log_metrics({f"best/{k}": v for k, v in best_metrics.items() if math.isfinite(v)})
    parent.set_tags({"diffseg.best": json.dumps(to_dict(best))[:5000], "diffseg.num_trials": len(table)})
    parent.finish()
    return SweepResult(table, best, best_config, best_metrics, exp_dir, parent.run_id, plot)


def load_sweep(path: str | os.PathLike) -> tuple[SweepConfig, Any]:
    """The (sweep, base config) a finished or interrupted experiment folder was started with."""
    data = json.loads((Path(path) / "sweep.json").read_text())
    return from_dict(SweepConfig, data["sweep"]), from_dict(base_config_class(data["task"]), data["base"])


def run(cfg: SweepConfig, resume: bool = False) -> SweepResult:
    """The body of jobs/sweep.py: load the base config file, then `run_sweep`."""
    from diffseg.config import load_config

    task = cfg.task
    if task == "auto":
        if cfg.base_config is None:
            raise ValueError("task: with no base_config, say which trials to run (task=pixel or task=factorized)")
        from diffseg.config import load_yaml

        data = load_yaml(cfg.base_config)
        task = "factorized" if data.get("model", {}).get("kind") == "factorized" else "pixel"
        if task == "pixel" and "features" not in data:
            raise ValueError(f"{cfg.base_config}: neither a factorized TrainConfig nor a PixelTrialConfig")
    base = load_config(base_config_class(task), cfg.base_config)
    return run_sweep(base, sweep=replace(cfg, task=task), resume=resume)


def main(argv: list[str] | None = None) -> SweepResult | None:
    import argparse

    from diffseg.config import parse_job_args

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--resume", action="store_true")
    pre.add_argument("--trust-state", action="store_true")
    known, rest = pre.parse_known_args(argv)
    cfg, args = parse_job_args(SweepConfig, rest, description=__doc__.splitlines()[0])
    if known.trust_state:  # the user vouches for a folder whose driver could not sign it (see diffseg.trust)
        exp_dir = job_dir(Path(cfg.output_dir).resolve(), cfg.name)
        if not exp_dir.is_dir():
            raise FileNotFoundError(f"{exp_dir}: no sweep folder to sign (check name and output_dir)")
        signed = trust_state(exp_dir)
        print(f"[sweep] signed {len(signed)} state files of {exp_dir} with {key_path()}: {signed}")
        return None
    if cfg.base_config and args.config and not Path(cfg.base_config).is_absolute():
        beside = Path(args.config).parent / cfg.base_config  # a base config is named relative to the sweep's YAML
        if beside.is_file() and not Path(cfg.base_config).is_file():
            cfg = replace(cfg, base_config=str(beside))
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    result = run(cfg, resume=known.resume)
    print(to_markdown(result.table))
    print(f"[sweep] best {cfg.metric} = {result.best_metrics.get(cfg.metric)}: {result.best}")
    print(f"[sweep] results   {result.path / 'results.md'} (+ .csv, .png, best_config.yaml)")
    print(f"[sweep] MLflow    {resolve_tracking_uri(cfg.tracking.uri)} (parent run {result.parent_run_id})")
    return result
