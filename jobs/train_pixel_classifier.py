"""Train the pixel MLP ensemble from feature shards, evaluate it on test images, save a segmenter bundle.

python jobs/train_pixel_classifier.py [--config FILE] [--dry-run] [key.path=value ...]
python jobs/train_pixel_classifier.py --config jobs/configs/label_celeba_pixel.yaml \
    train_shards=runs/label/compare/shards/ddpm
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from diffseg.config import parse_job_args  # noqa: E402
from diffseg.label_efficient import PixelJobConfig, run_pixel_job  # noqa: E402

if __name__ == "__main__":
    cfg, _ = parse_job_args(PixelJobConfig, description=__doc__.splitlines()[0])
    run_pixel_job(cfg)
