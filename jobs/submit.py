"""Submit a job to a Ray cluster: this checkout's code, its commit and dirty flag, and your working directory.

python jobs/submit.py [--address URL] [--workdir DIR | --no-workdir] [--env K=V] [--no-wait] -- python jobs/<job>.py ...

Relative paths in the job's config (output_dir=runs, data.root=..., mlflow.db) then mean this directory, as they
do when you run the job here; see `diffseg.core.submit` and docs/cluster.md.
"""

import sys
from pathlib import Path

# The package lives under platform/ (a source root).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from diffseg.core.runtime import setup_logging  # noqa: E402
from diffseg.core.submit import main  # noqa: E402

if __name__ == "__main__":
    setup_logging()
    sys.exit(main())
