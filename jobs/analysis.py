"""Figure 2 (mIoU per decoder block x timestep, one MLP per cell) and Figure 4 (k-means per block/timestep).

python jobs/analysis.py [--config FILE] [--dry-run] [key.path=value ...]
python jobs/analysis.py --config jobs/configs/label_celeba_analysis.yaml \
    backbone=runs/label/ddpm_celeba/checkpoint.pt
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from diffseg.analysis import AnalysisConfig, run_analysis  # noqa: E402
from diffseg.config import parse_job_args  # noqa: E402

if __name__ == "__main__":
    cfg, _ = parse_job_args(AnalysisConfig, description=__doc__.splitlines()[0])
    run_analysis(cfg)
