"""Run a Ray Tune sweep over config paths (feature recipes, pixel-MLP sizes, K, learning rates).

python jobs/sweep.py --config jobs/configs/sweep_k_tiny.yaml [--dry-run] [--resume | --trust-state] [key.path=value ...]
python jobs/submit.py -- python jobs/sweep.py --config jobs/configs/sweep_blocks_tiny.yaml

The YAML is a `diffseg.experiments.sweep.SweepConfig`: `base_config` (a factorized TrainConfig or a PixelTrialConfig
YAML, relative to the sweep's YAML), `base_overrides` (dotted or nested overrides of it), `space` (config path ->
values), metric/mode, search, num_samples, scheduler, resources. `--resume` continues an interrupted sweep of the same
name (Tune's restore), only if its folder is provably this user's (diffseg.core.trust: permissions and an HMAC under a
per-user key recorded when the driver stopped, over only the state files that run wrote; a file planted in the folder
makes the resume fail, naming it). A new sweep does not start in a folder that already holds Tune state files.
`--trust-state` signs a folder whose driver was killed before it could, and exits. The best servable model is
written to <output_dir>/<name>/best/. A pixel sweep (`task: pixel`) scores its trials on `folds` validation folds of
the labelled images (`metric: val/miou`; a test/ metric is refused) and scores the chosen recipe, retrained on all of
them, once on the test images: best/summary.json and results.md show both figures.
"""

import sys
from pathlib import Path

# The package lives under platform/ (a source root); a Ray job's working_dir has no install of it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from diffseg.core.config import find_config, replace  # noqa: E402
from diffseg.experiments.launch import run_job  # noqa: E402
from diffseg.experiments.sweep import SweepConfig, run  # noqa: E402


def base_beside_config(cfg: SweepConfig, args) -> SweepConfig:
    """A relative `base_config` names a file beside the sweep's YAML (unless it exists from here)."""
    if cfg.base_config and args.config and not Path(cfg.base_config).is_absolute():
        beside = find_config(args.config).parent / cfg.base_config  # --config may name a shipped config
        if beside.is_file() and not Path(cfg.base_config).is_file():
            return replace(cfg, base_config=str(beside))
    return cfg


def main(argv: list[str] | None = None):
    flags = {
        "--resume": "continue the interrupted sweep of this name (Tune's restore; only a folder this user signed)",
        "--trust-state": "sign the sweep folder of this name as this user's (its driver was killed), and exit",
    }
    return run_job(SweepConfig, run, argv, doc=__doc__, flags=flags, prepare=base_beside_config)


if __name__ == "__main__":
    main()
