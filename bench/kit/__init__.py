"""The GPU evidence kit in pieces; `bench/gpu_kit.py` is its command line and `bench/gpu_kit_stages.py` the process
that runs one stage. The launcher's side (torch-free): `prepare`, `plan`, `runner`, `report`. The stages' side: `stage`
(what every stage shares) and one module per stage and figure: `env`, `gpu_tests`, `train_step`, `unet`, `ensemble`,
`sampling`, `memory`, `train` (a training job: the research runs and --train), `rate`.

Importing `kit` puts bench/ (harness, unet_step, bench_ensemble_speed, sampling) and platform/ (diffseg, which the GPU
box does not install) first on sys.path.
"""

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1]
REPO = BENCH.parent
DEFAULT_SPRINT = "bench/sprint.yaml"
SMOKE_SPRINT = "bench/sprint_smoke.yaml"
DEFAULT_DATA = ".kit/data"
WHEELS = ".whl"
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO / "platform"))
