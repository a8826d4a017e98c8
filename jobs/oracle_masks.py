"""The oracle-mask experiment: the factorized network trained with fixed masks (ground truth, a band, uniform, another
image's ground truth) against its own mask generator; held-out eps-MSE per t with paired noise and bootstrap CIs.

python jobs/oracle_masks.py --config jobs/configs/oracle_horse.yaml [--dry-run] [key.path=value ...]
"""

import logging
import sys
from pathlib import Path

# The package lives under platform/ (a source root); a Ray job's working_dir has no install of it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from diffseg.config import parse_job_args  # noqa: E402
from diffseg.oracle import OracleConfig, run  # noqa: E402


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    cfg, _ = parse_job_args(OracleConfig, argv, description=__doc__.splitlines()[0])
    result = run(cfg)
    print(result["markdown"])
    return result


if __name__ == "__main__":
    main()
