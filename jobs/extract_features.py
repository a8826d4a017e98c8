"""Extract diffusion pixel features into sharded Parquet (Ray Data reader + an actor pool running the U-Net).

python jobs/extract_features.py [--config FILE] [--dry-run] [key.path=value ...]
python jobs/extract_features.py --config jobs/configs/label_celeba_extract.yaml \
    features.backbone=runs/label/ddpm_celeba/checkpoint.pt split=train limit=20 name=celeba-train
ray job submit --working-dir . -- python jobs/extract_features.py --config ... gpus_per_actor=1 num_actors=4
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from diffseg.config import parse_job_args  # noqa: E402
from diffseg.features import ExtractJobConfig, run_extract_job  # noqa: E402

if __name__ == "__main__":
    cfg, _ = parse_job_args(ExtractJobConfig, description=__doc__.splitlines()[0])
    run_extract_job(cfg)
