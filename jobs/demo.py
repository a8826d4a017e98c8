"""The first command a newcomer runs (`make demo`): label-efficient segmentation end to end, on a CPU, in minutes.

A tiny DDPM learns the built-in synthetic scenes without labels; an ensemble of pixel MLPs learns from 16 labelled
scenes on its decoder features, and, as the baseline, on raw RGB pixels; both segment held-out scenes, scored
against their ground truth. Prints the scores side by side and writes runs/demo/demo.png (image | ground truth |
prediction on DDPM features | prediction on raw RGB).

    python jobs/demo.py [--dry-run] [--help] [key.path=value ...]      # e.g. ddpm_steps=1000 num_train=20
"""

import sys
from pathlib import Path

# The package lives under platform/ (a source root); a Ray job's working_dir has no install of it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from diffseg.experiments.demo import DemoConfig, run_demo  # noqa: E402
from diffseg.experiments.launch import run_job  # noqa: E402


def run(cfg: DemoConfig) -> dict:
    """Run the demo, then show the scores beside the baseline and where everything went."""
    res = run_demo(cfg)
    secs = res["seconds"]
    print(f"\nSegmentation of {res['num_test']} held-out synthetic scenes ({res['image_size']} px, 5 part classes), "
          "scored against their ground-truth masks:\n")  # fmt: skip
    print(res["table"])
    print(f"demo finished in {secs['total']:.0f} s (DDPM {secs['ddpm']:.0f} s, ensembles {secs['ensembles']:.0f} s, "
          f"evaluation {secs['evaluation']:.0f} s)")  # fmt: skip
    print(f"figure     : {res['figure']}  (image | ground truth | DDPM features | raw RGB)")
    serve = f"python jobs/serve_app.py args.segmenter=null args.pixel={res['segmenter']}"
    print(f"segmenter  : {res['segmenter']}  (serve it: {serve})")
    print(f"checkpoint : {res['checkpoint']}")
    return res


def main(argv: list[str] | None = None):
    return run_job(DemoConfig, run, argv, doc=__doc__)


if __name__ == "__main__":
    main()
