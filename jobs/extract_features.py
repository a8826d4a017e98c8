"""Extract diffusion pixel features into sharded Parquet (Ray Data reader + an actor pool running the U-Net).

python jobs/extract_features.py [--config FILE] [--dry-run] [--help] [key.path=value ...]
python jobs/extract_features.py --config jobs/configs/label_celeba_extract.yaml \
    features.backbone=runs/label/ddpm_celeba/checkpoint.pt
python jobs/submit.py -- python jobs/extract_features.py --config ... gpus_per_actor=1 num_actors=4
"""

import sys
from pathlib import Path

# The package lives under platform/ (a source root); a Ray job's working_dir has no install of it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from diffseg.experiments.launch import run_job  # noqa: E402
from diffseg.methods.features import ExtractJobConfig, run_extract_job  # noqa: E402


def main(argv: list[str] | None = None):
    return run_job(ExtractJobConfig, run_extract_job, argv, doc=__doc__)


if __name__ == "__main__":
    main()
