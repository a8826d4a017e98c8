"""Point a registered model's alias at a version and redeploy the Serve apps that serve it, without stopping Serve.

python jobs/promote.py name=horse-seg alias=champion version=4
python jobs/promote.py name=horse-seg alias=champion version=4 address=http://127.0.0.1:8265   # the Ray dashboard
python jobs/promote.py name=horse-seg alias=champion version=4 redeploy=false                  # the alias only

Serve builds an app once: an alias in its config (segmenter: models:/horse-seg@champion) is resolved then, and
deploying the same config again changes nothing. This job moves the alias, redeploys the config-deployed apps that
name it (a rolling update of their replicas) and waits until their /v1/info shows the version; see
diffseg.experiments.promote.
"""

import sys
from pathlib import Path

# The package lives under platform/ (a source root).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from diffseg.experiments.launch import run_job  # noqa: E402
from diffseg.experiments.promote import PromoteConfig, run_promote  # noqa: E402


def main(argv: list[str] | None = None):
    return run_job(PromoteConfig, run_promote, argv, doc=__doc__)


if __name__ == "__main__":
    main()
