"""Unsupervised segmentation evaluation: methods x data sets -> table.md / table.csv (+ MLflow) and figures.

python jobs/evaluate.py --config jobs/configs/eval_horse.yaml [--dry-run] [--help] [key.path=value ...]
python jobs/evaluate.py --config jobs/configs/eval_face3.yaml methods=[grabcut,kmeans_ddpm,factorized]
"""

import sys
from pathlib import Path

# The package lives under platform/ (a source root); a Ray job's working_dir has no install of it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from diffseg.evaluation.evaluate import EvalConfig, evaluate  # noqa: E402
from diffseg.experiments.launch import run_job  # noqa: E402


def main(argv: list[str] | None = None):
    return run_job(EvalConfig, evaluate, argv, doc=__doc__)


if __name__ == "__main__":
    main()
