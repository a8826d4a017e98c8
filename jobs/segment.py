"""Segment a data set with a trained factorized model: masks/<id>.png (region per pixel) and overlays/<id>.png.

python jobs/segment.py checkpoint=runs/x/checkpoint.pt data.root=../shared/data/weizmann-horse-200
python jobs/segment.py --config jobs/configs/segment.yaml checkpoint=... data.root=... [--dry-run] [key=value ...]

The first image of a run seeded `seed` gets the masks POST /v1/segment?seed=<seed> returns for it.
"""

import sys
from pathlib import Path

# The package lives under platform/ (a source root); a Ray job's working_dir has no install of it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from diffseg.experiments.launch import run_job  # noqa: E402
from diffseg.methods.segment import SegmentJobConfig, run_segment_job  # noqa: E402


def main(argv: list[str] | None = None):
    return run_job(
        SegmentJobConfig,
        run_segment_job,
        argv,
        doc=__doc__,
        default_config=str(Path(__file__).parent / "configs" / "segment.yaml"),
    )


if __name__ == "__main__":
    main()
