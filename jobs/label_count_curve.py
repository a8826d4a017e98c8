"""The label-count curve: DDPM features vs random-init features vs a supervised U-Net at several labelled-set sizes.

python jobs/label_count_curve.py [--config FILE] [--dry-run] [--help] [key.path=value ...]
python jobs/label_count_curve.py --config jobs/configs/label_celeba_count_curve.yaml
python jobs/label_count_curve.py --config jobs/configs/label_horse_count_curve.yaml

A re-run with the same name reuses every finished (count, seed, method) cell: an interrupted curve resumes.
"""

import sys
from pathlib import Path

# The package lives under platform/ (a source root); a Ray job's working_dir has no install of it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from diffseg.experiments.label_count import LabelCountConfig, run_label_count  # noqa: E402
from diffseg.experiments.launch import run_job  # noqa: E402


def main(argv: list[str] | None = None):
    return run_job(LabelCountConfig, run_label_count, argv, doc=__doc__)


if __name__ == "__main__":
    main()
