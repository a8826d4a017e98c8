"""Train the pixel MLP ensemble from feature shards, evaluate it on test images, save a segmenter bundle.

python jobs/train_pixel_classifier.py [--config FILE] [--dry-run] [--help] [key.path=value ...]
python jobs/train_pixel_classifier.py --config jobs/configs/label_celeba_pixel.yaml train_shards=runs/features/celeba-20
"""

import sys
from pathlib import Path

# The package lives under platform/ (a source root); a Ray job's working_dir has no install of it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from diffseg.experiments.label_efficient import PixelJobConfig, run_pixel_job  # noqa: E402
from diffseg.experiments.launch import run_job  # noqa: E402


def main(argv: list[str] | None = None):
    return run_job(PixelJobConfig, run_pixel_job, argv, doc=__doc__)


if __name__ == "__main__":
    main()
