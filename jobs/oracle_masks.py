"""The oracle-mask experiment: the factorized network trained with fixed masks (ground truth, a band, uniform, another
image's ground truth) against its own mask generator; held-out eps-MSE per t with paired noise and bootstrap CIs.

python jobs/oracle_masks.py --config jobs/configs/oracle_horse.yaml [--dry-run] [--help] [key.path=value ...]
python jobs/oracle_masks.py --config oracle_tiny.yaml output_dir=/tmp/oracle
"""

import sys
from pathlib import Path

# The package lives under platform/ (a source root); a Ray job's working_dir has no install of it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from diffseg.experiments.launch import run_job  # noqa: E402
from diffseg.experiments.oracle import OracleConfig, run  # noqa: E402


def main(argv: list[str] | None = None):
    return run_job(OracleConfig, run, argv, doc=__doc__)


if __name__ == "__main__":
    main()
