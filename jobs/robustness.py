"""Robustness to image corruptions (the paper's Figure 6): mIoU vs severity for DDPM / random-init features and a
supervised U-Net, over Hendrycks & Dietterich's corruptions applied to the test images at their native size.

python jobs/robustness.py [--config FILE] [--dry-run] [--help] [key.path=value ...]
python jobs/robustness.py --config jobs/configs/label_celeba_robustness.yaml \
    checkpoint=runs/label/ddpm_celeba/checkpoint.pt
"""

import sys
from pathlib import Path

# The package lives under platform/ (a source root); a Ray job's working_dir has no install of it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from diffseg.experiments.launch import run_job  # noqa: E402
from diffseg.experiments.robustness import RobustnessConfig, run_robustness  # noqa: E402


def main(argv: list[str] | None = None):
    return run_job(RobustnessConfig, run_robustness, argv, doc=__doc__)


if __name__ == "__main__":
    main()
