"""Unsupervised segmentation evaluation: methods x data sets -> table.md / table.csv (+ MLflow) and figures.

python jobs/evaluate.py --config jobs/configs/eval_horse.yaml [--dry-run] [key.path=value ...]
python jobs/evaluate.py --config jobs/configs/eval_face3.yaml methods=[grabcut,kmeans_ddpm,factorized]
"""

import sys
from pathlib import Path

# The package lives under platform/ (a source root); a Ray job's working_dir has no install of it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from diffseg.config import parse_job_args  # noqa: E402
from diffseg.evaluate import EvalConfig, evaluate  # noqa: E402


def main(argv=None):
    cfg, _ = parse_job_args(EvalConfig, argv, description=__doc__.splitlines()[0])
    return evaluate(cfg)


if __name__ == "__main__":
    main()
