"""Generate images with their masks (factorized model) by DDPM or DDIM: grid.png, strip.png, images/, masks/.

python jobs/sample.py checkpoint=runs/unsup-face-factorized-k3/checkpoint.pt method=ddim steps=50
python jobs/sample.py --config jobs/configs/sample_face.yaml [--dry-run] [key.path=value ...]
"""

import sys
from pathlib import Path

# The package lives under platform/ (a source root); a Ray job's working_dir has no install of it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from diffseg.config import parse_job_args  # noqa: E402
from diffseg.sampling import SampleJobConfig, run_sample_job  # noqa: E402


def main(argv=None):
    cfg, _ = parse_job_args(SampleJobConfig, argv, description=__doc__.splitlines()[0])
    return run_sample_job(cfg)


if __name__ == "__main__":
    main()
