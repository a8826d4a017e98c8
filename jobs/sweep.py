"""Run a Ray Tune sweep over config paths (feature recipes, pixel-MLP sizes, K, learning rates).

python jobs/sweep.py --config jobs/configs/sweep_k_tiny.yaml [--dry-run] [--resume | --trust-state] [key.path=value ...]
ray job submit --working-dir . -- python jobs/sweep.py --config jobs/configs/sweep_blocks_tiny.yaml

The YAML is a `diffseg.sweep.SweepConfig`: `base_config` (a factorized TrainConfig or a PixelTrialConfig YAML),
`base_overrides` (dotted or nested overrides of it), `space` (config path -> values), metric/mode, search,
num_samples, scheduler, resources. `--resume` continues an interrupted sweep of the same name (Tune's restore),
only if its folder is provably this user's (diffseg.trust: permissions and an HMAC under a per-user key recorded when
the driver stopped). `--trust-state` signs a folder whose driver was killed before it could, and exits.
"""

import sys
from pathlib import Path

# The package lives under platform/ (a source root); a Ray job's working_dir has no install of it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from diffseg.sweep import main  # noqa: E402

if __name__ == "__main__":
    main()
