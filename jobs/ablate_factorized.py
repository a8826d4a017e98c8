"""The factorized model's ablation (the paper's Table 6 style): variants x data sets at equal compute -> table.md.

python jobs/ablate_factorized.py --config jobs/configs/ablation_factorized.yaml [--dry-run] [--help] [key=value ...]
python jobs/ablate_factorized.py --config ablation_factorized.yaml num_steps=500 parallel=2
"""

import sys
from pathlib import Path

# The package lives under platform/ (a source root); a Ray job's working_dir has no install of it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from diffseg.experiments.ablation import AblationConfig, run  # noqa: E402
from diffseg.experiments.launch import run_job  # noqa: E402


def main(argv: list[str] | None = None):
    return run_job(AblationConfig, run, argv, doc=__doc__)


if __name__ == "__main__":
    main()
