"""Label-efficient comparisons: MLP ensemble on DDPM / random-init U-Net / raw RGB features vs a supervised U-Net.

python jobs/compare_label_efficient.py [--config FILE] [--dry-run] [--help] [key.path=value ...]
python jobs/compare_label_efficient.py --config jobs/configs/label_celeba_compare.yaml \
    checkpoint=runs/label/ddpm_celeba/checkpoint.pt
"""

import sys
from pathlib import Path

# The package lives under platform/ (a source root); a Ray job's working_dir has no install of it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from diffseg.experiments.label_efficient import CompareConfig, run_compare  # noqa: E402
from diffseg.experiments.launch import run_job  # noqa: E402


def main(argv: list[str] | None = None):
    return run_job(CompareConfig, run_compare, argv, doc=__doc__)


if __name__ == "__main__":
    main()
