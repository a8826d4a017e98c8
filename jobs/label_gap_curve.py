"""The DDPM-vs-random-init gap against the DDPM's training images, from finished comparison runs.

python jobs/label_gap_curve.py [--config FILE] [--dry-run] [--help] [key.path=value ...]
python jobs/label_gap_curve.py --config jobs/configs/label_celeba_gap_curve.yaml
"""

import sys
from pathlib import Path

# The package lives under platform/ (a source root); a Ray job's working_dir has no install of it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from diffseg.experiments.label_efficient import GapCurveConfig, run_gap_curve  # noqa: E402
from diffseg.experiments.launch import run_job  # noqa: E402


def main(argv: list[str] | None = None):
    return run_job(GapCurveConfig, run_gap_curve, argv, doc=__doc__)


if __name__ == "__main__":
    main()
