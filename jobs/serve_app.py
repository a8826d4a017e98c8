"""Serve the app of a Serve config file: every model file checked before Ray starts, a failed start or deploy in one
line (exit 1), Serve tolerant of a loaded machine, the jobs' own local Ray (token 0600, loopback only).

python jobs/serve_app.py                                              # serve/config.yaml: http://127.0.0.1:8000
python jobs/serve_app.py args.segmenter=null args.pixel=runs/demo/segmenter_ddpm.pt   # the demo's pixel bundle only
python jobs/serve_app.py serve_config=my_serve.yaml address=127.0.0.1:6379 block=false   # on a running cluster

The config file is Serve's own (what `serve run serve/config.yaml` reads). Ctrl-C / SIGTERM take the app down.
"""

import sys
from pathlib import Path

# The package lives under platform/ (a source root), the Serve deployments in serve/ at the repository root.
REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "platform"), str(REPO)]

from serve.launch import ServeLaunchConfig, run_serve  # noqa: E402

from diffseg.experiments.launch import run_job  # noqa: E402


def main(argv: list[str] | None = None):
    return run_job(ServeLaunchConfig, run_serve, argv, doc=__doc__)


if __name__ == "__main__":
    main()
