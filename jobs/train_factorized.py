"""Train the factorized-diffusion U-Net (K regions, one shared decoder) on Ray Train.

python jobs/train_factorized.py [--config FILE] [--dry-run] [--help] [key.path=value ...]
python jobs/submit.py -- python jobs/train_factorized.py --config jobs/configs/factorized_tiny.yaml
"""

import sys
from pathlib import Path

# The package lives under platform/ (a source root); a Ray job's working_dir has no install of it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from diffseg.experiments.launch import run_job  # noqa: E402
from diffseg.training.ray_train import TrainConfig, run  # noqa: E402

CONFIGS = Path(__file__).parent / "configs"


def main(argv: list[str] | None = None):
    return run_job(
        TrainConfig,
        run,
        argv,
        doc=__doc__,
        default_config=str(Path(__file__).parent / "configs" / "factorized_tiny.yaml"),
    )


if __name__ == "__main__":
    main()
