"""The factorized model's ablation (the paper's Table 6 style): variants x data sets at equal compute -> table.md.

python jobs/ablate_factorized.py --config jobs/configs/ablation_factorized.yaml [--dry-run] [key.path=value ...]
python jobs/ablate_factorized.py --config jobs/configs/ablation_factorized.yaml num_steps=500 parallel=2
"""

import logging
import sys
from pathlib import Path

# The package lives under platform/ (a source root); a Ray job's working_dir has no install of it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from diffseg.ablation import AblationConfig, run  # noqa: E402
from diffseg.config import parse_job_args  # noqa: E402


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    cfg, _ = parse_job_args(AblationConfig, argv, description=__doc__.splitlines()[0])
    result = run(cfg)
    print(result["markdown"])
    return result


if __name__ == "__main__":
    main()
