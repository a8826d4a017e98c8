"""Generate images with their masks (factorized model) by DDPM or DDIM: grid.png, strip.png, images/, masks/.

python jobs/sample.py checkpoint=runs/unsup/unsup-face-factorized-k3/checkpoint.pt method=ddim steps=50 seed=1
python jobs/sample.py checkpoint=runs/factorized-tiny/checkpoint.pt method=ddpm steps=0 num_images=4 [--dry-run]

Image i uses the noise of seed (seed, i): POST /v1/sample {"seed": 1} returns the same first images.
"""

import sys
from pathlib import Path

# The package lives under platform/ (a source root); a Ray job's working_dir has no install of it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from diffseg.experiments.launch import run_job  # noqa: E402
from diffseg.methods.sampling import SampleJobConfig, run_sample_job  # noqa: E402


def main(argv: list[str] | None = None):
    return run_job(SampleJobConfig, run_sample_job, argv, doc=__doc__)


if __name__ == "__main__":
    main()
