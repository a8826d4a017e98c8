"""DatasetDDPM: sample from the DDPM, label with the ensemble (drop the 10% most uncertain), train DeepLabV3 on it.

python jobs/dataset_ddpm.py [--config FILE] [--dry-run] [--help] [key.path=value ...]
python jobs/dataset_ddpm.py --config jobs/configs/label_celeba_dataset_ddpm.yaml \
    segmenter=runs/label/compare/ddpm/segmenter.pt
"""

import sys
from pathlib import Path

# The package lives under platform/ (a source root); a Ray job's working_dir has no install of it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from diffseg.experiments.dataset_ddpm import DatasetDDPMConfig, run_dataset_ddpm  # noqa: E402
from diffseg.experiments.launch import run_job  # noqa: E402


def main(argv: list[str] | None = None):
    return run_job(DatasetDDPMConfig, run_dataset_ddpm, argv, doc=__doc__)


if __name__ == "__main__":
    main()
