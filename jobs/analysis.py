"""Figure 2 (mIoU per decoder block x timestep, one MLP per cell) and Figure 4 (k-means per block/timestep).

python jobs/analysis.py [--config FILE] [--dry-run] [--help] [key.path=value ...]
python jobs/analysis.py --config jobs/configs/label_celeba_analysis.yaml backbone=runs/label/ddpm_celeba/checkpoint.pt
"""

import sys
from pathlib import Path

# The package lives under platform/ (a source root); a Ray job's working_dir has no install of it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from diffseg.experiments.analysis import AnalysisConfig, run_analysis  # noqa: E402
from diffseg.experiments.launch import run_job  # noqa: E402


def main(argv: list[str] | None = None):
    return run_job(AnalysisConfig, run_analysis, argv, doc=__doc__)


if __name__ == "__main__":
    main()
