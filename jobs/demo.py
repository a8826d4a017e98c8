"""The first command a newcomer runs (`make demo`): everything end to end on the synthetic data, on a CPU.

1. trains a tiny DDPM for a few hundred steps (Ray Train local mode), saves a checkpoint and a grid of samples;
2. prints where everything went (checkpoint, samples, resolved config, MLflow store).

    python jobs/demo.py [--steps N] [--out DIR]
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from diffseg.config import load_config, replace  # noqa: E402
from diffseg.train import TrainConfig, run  # noqa: E402

CONFIGS = Path(__file__).parent / "configs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="DDPM training steps")
    parser.add_argument("--out", default="runs/demo", help="output folder")
    args = parser.parse_args()
    t0 = time.perf_counter()
    cfg = load_config(TrainConfig, CONFIGS / "ddpm_tiny.yaml")
    cfg = replace(cfg, **{"name": "ddpm", "output_dir": args.out, "loop.num_steps": args.steps})
    print(f"== 1/1 training a tiny DDPM ({args.steps} steps) ==", flush=True)
    result = run(cfg)
    out = result.return_value
    run_dir = Path(args.out).resolve() / "ddpm"
    print("\n== demo finished in %.0f s ==" % (time.perf_counter() - t0))
    print(f"checkpoint : {out['checkpoint']} (step {out['step']})")
    print(f"samples    : {sorted((run_dir / 'samples').glob('*.png'))[-1]}")
    print(f"config     : {run_dir / 'config.yaml'}")
    print(f"loss       : {out['loss_history'][0][1]:.4f} -> {out['loss_history'][-1][1]:.4f}")
    print("MLflow     : `mlflow ui --backend-store-uri sqlite:///mlflow.db` and open http://127.0.0.1:5000")


if __name__ == "__main__":
    main()
