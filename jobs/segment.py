"""Segment a data set with a trained factorized model: masks/<id>.png (region per pixel) and overlays/<id>.png.

python jobs/segment.py checkpoint=runs/x/checkpoint.pt data.root=../shared/data/weizmann-horse-200
python jobs/segment.py --config jobs/configs/segment_horse.yaml [--dry-run] [key.path=value ...]
"""

import sys
from pathlib import Path

# The package lives under platform/ (a source root); a Ray job's working_dir has no install of it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from diffseg.config import parse_job_args  # noqa: E402
from diffseg.segment import SegmentJobConfig, run_segment_job  # noqa: E402


def main(argv=None):
    default = str(Path(__file__).parent / "configs" / "segment.yaml")
    cfg, _ = parse_job_args(SegmentJobConfig, argv, description=__doc__.splitlines()[0], default_config=default)
    return run_segment_job(cfg)


if __name__ == "__main__":
    main()
