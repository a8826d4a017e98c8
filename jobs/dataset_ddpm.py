"""DatasetDDPM: sample from the DDPM, label with the ensemble (drop the 10% most uncertain), train DeepLabV3 on it.

python jobs/dataset_ddpm.py [--config FILE] [--dry-run] [key.path=value ...]
python jobs/dataset_ddpm.py --config jobs/configs/label_celeba_dataset_ddpm.yaml \
    segmenter=runs/label/compare/ddpm/segmenter.pt
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from diffseg.config import parse_job_args  # noqa: E402
from diffseg.dataset_ddpm import DatasetDDPMConfig, run_dataset_ddpm  # noqa: E402

if __name__ == "__main__":
    cfg, _ = parse_job_args(DatasetDDPMConfig, description=__doc__.splitlines()[0])
    run_dataset_ddpm(cfg)
