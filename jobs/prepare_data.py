"""Convert a public data set's download layout into the paired-folder format every job reads.

python jobs/prepare_data.py layout=weizmann-horse src=/data/weizmann_horse_db dst=/data/weizmann-horse
python jobs/prepare_data.py layout=celebamask-hq src=/data/CelebAMask-HQ dst=/data/celebamask-hq-256 size=256
python jobs/prepare_data.py layout=davis src=/data/DAVIS dst=/data/davis-val split=val frame_stride=5 --dry-run

Layouts: celebamask-hq, weizmann-horse, flowers17, flowers102, cub, davis (see diffseg/adapters.py for each one's
folders and options). The resolved config is saved beside the output as prepare_config.yaml.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from diffseg.adapters import PrepareConfig, convert  # noqa: E402
from diffseg.config import parse_job_args, save_config  # noqa: E402
from diffseg.data import DataError  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    cfg, _ = parse_job_args(PrepareConfig, argv, description=__doc__.splitlines()[0])
    try:
        dst = convert(cfg)
    except DataError as e:
        sys.exit(f"error: {e}")
    save_config(cfg, dst / "prepare_config.yaml")
    print(f"[prepare] data set : {dst.resolve()}")
    print(f"[prepare] config   : {dst.resolve() / 'prepare_config.yaml'}")
    print(f"[prepare] use it   : data.name=folder data.root={dst.resolve()}")
    return dst


if __name__ == "__main__":
    main()
