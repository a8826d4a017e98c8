"""Convert a public data set's download layout into the paired-folder format every job reads.

python jobs/prepare_data.py layout=weizmann-horse src=/data/weizmann_horse_db dst=/data/weizmann-horse
python jobs/prepare_data.py layout=celebamask-hq src=/data/CelebAMask-HQ dst=/data/celebamask-hq-256 size=256
python jobs/prepare_data.py layout=davis src=/data/DAVIS dst=/data/davis-val split=val frame_stride=5 --dry-run

Layouts: celebamask-hq, weizmann-horse, flowers17, flowers102, cub, davis (see diffseg/data/adapters.py for each one's
folders and options). The resolved config is saved beside the output as prepare_config.yaml.
"""

import sys
from pathlib import Path

# The package lives under platform/ (a source root); a Ray job's working_dir has no install of it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from diffseg.data.adapters import PrepareConfig, prepare  # noqa: E402
from diffseg.experiments.launch import run_job  # noqa: E402


def main(argv: list[str] | None = None):
    return run_job(PrepareConfig, prepare, argv, doc=__doc__)


if __name__ == "__main__":
    main()
