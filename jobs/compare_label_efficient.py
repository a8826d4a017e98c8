"""Label-efficient comparisons: MLP ensemble on DDPM / random-init U-Net / raw RGB features vs a supervised U-Net.

python jobs/compare_label_efficient.py [--config FILE] [--dry-run] [key.path=value ...]
python jobs/compare_label_efficient.py --config jobs/configs/label_celeba_compare.yaml \
    checkpoint=runs/label/ddpm_celeba/checkpoint.pt
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from diffseg.config import parse_job_args  # noqa: E402
from diffseg.label_efficient import CompareConfig, run_compare  # noqa: E402

if __name__ == "__main__":
    cfg, _ = parse_job_args(CompareConfig, description=__doc__.splitlines()[0])
    run_compare(cfg)
