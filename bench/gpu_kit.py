"""The GPU sprint: one command that a GPU window runs first, research first and measurements last, within its time.

    python bench/gpu_kit.py --prepare                        # here, once: data -> .kit/data (32 px), diffusers -> .whl
    python3 bench/gpu_kit.py --out DIR                       # on the GPU box: 8.5 min; no Ray, MLflow or network
    python bench/gpu_kit.py --out DIR --smoke                # every stage on the CPU at toy sizes (make test, < 1 min)

Stages, in order (`--stages a,b` picks some; each runs in its own process with a time box, so a stage that
overruns is cut and reported and a crash is recorded, while the next stage runs):

    env         versions, the GPU, the TFLOP/s of a large bf16 matmul
    rate        every research run's bare train step: images/s, GFLOP per image, % of peak; eager vs torch.compile
                (with its compile time) on one run, which decides whether the research runs compile
    research    one stage per group of the sprint file (--sprint, bench/sprint.yaml): the group's runs
                train AT ONCE on the GPU through diffseg.training.loop (data on the device, bf16, channels_last) for
                the group's time box; each exports its fp16 EMA weights, logs its mask diagnostics against images
                seen, and is scored against the baselines on its held-out split. The plan (in the report, from
                `rate`) states the images each run gets
    train_step  factorized paper-64 K=3 bf16 train step: images/s, FLOPs, TFLOP/s, % of peak; eager and compiled
    unet        our U-Net train step / diffusers UNet2DModel at matched size (skipped without diffusers)
    ensemble    the batched MLP ensemble (E=10, D=8448) / ten MLPs trained one after another
    sampling    DDIM-50, factorized paper-64: eager / torch.compile "reduce-overhead" (CUDA graphs)
    memory      256 px features, LSUN-256 ADM (random weights, D=8448) on 8 and 64 images: GPU peak, RSS, s/image
    tests       the `gpu`-marked pytest tests: pass/fail/skip counts and the output's tail
    train       each `--train CONFIG[=MINUTES]`: one training job alone (the kit's first version)

Time boxes: a stage with MINUTES gets them; the others share what is left by weight (`plan.WEIGHTS`, the research
groups by their `share`), recomputed at each start, so time a stage leaves unused goes to the later ones.
`--box STAGE=SECONDS` fixes one. Everything lands in --out, at most 8 files, each under 16 MiB: report.md,
figures.json (every number the report shows), kit.log, and models.tar.NN (the fp16 checkpoints and figures, as
many as fit, the most useful first; `cat models.tar.* | tar x` unpacks them); rewritten after every stage, so a run
killed from outside still leaves its report.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from kit import DEFAULT_DATA, DEFAULT_SPRINT, REPO, SMOKE_SPRINT
from kit.plan import ORDER
from kit.prepare import SETS, prepare
from kit.report import PEAK_TFLOPS
from kit.runner import Kit


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="output folder (at most 8 files)")
    p.add_argument("--budget-min", type=float, default=8.5, help="wall-clock minutes for the whole sprint")
    p.add_argument("--smoke", action="store_true", help="every stage on the CPU at toy sizes")
    p.add_argument("--stages", default=",".join(ORDER), help=f"comma-separated subset of {','.join(ORDER)}")
    p.add_argument(
        "--train",
        action="append",
        default=[],
        metavar="CONFIG[=MINUTES]",
        help="a TrainConfig YAML to train alone after the measurements (repeatable)",
    )
    p.add_argument(
        "--train-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override applied to every training job (e.g. optim.lr=3e-4)",
    )
    p.add_argument("--sprint", default=None, help=f"the research groups and runs, a YAML file (default {DEFAULT_SPRINT}"
                   f"; with --smoke, {SMOKE_SPRINT})")  # fmt: skip
    p.add_argument("--box", action="append", default=[], metavar="STAGE=SECONDS", help="fix a stage's time box")
    p.add_argument(
        "--data", default=None, help=f"the kit's data folder (default <repo>/{DEFAULT_DATA}, from --prepare)"
    )
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed at the end)")
    p.add_argument("--device", default=None, help="default: cuda when present (cpu with --smoke)")
    p.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS, help="bf16 peak that %% of peak refers to")
    p.add_argument("--step-batch", type=int, default=32, help="batch of the paper-64 train-step throughput")
    g = p.add_argument_group("--prepare (here, before a GPU window)")
    g.add_argument("--prepare", action="store_true", help="copy the dev data and fetch the diffusers wheel")
    g.add_argument("--shared", default=os.environ.get("DIFFSEG_SHARED", str(REPO.parent / "shared")))
    g.add_argument("--sets", default=",".join(SETS), help="data sets to copy from <shared>/data")
    g.add_argument("--size", type=int, default=32, help="side the copies are resized and centre-cropped to (0 = as is)")
    g.add_argument("--no-wheels", action="store_true", help="skip fetching the diffusers wheel")
    p.add_argument("--run-stage", help=argparse.SUPPRESS)  # internal: the child process of one stage
    args = p.parse_args(argv)
    if not args.prepare and not args.run_stage and not args.out:
        p.error("--out is required")
    # Paths given on the command line are the caller's (relative to the working directory); defaults are the repo's.
    args.data = Path(args.data).resolve() if args.data else REPO / DEFAULT_DATA
    args.sprint = args.sprint or (SMOKE_SPRINT if args.smoke else DEFAULT_SPRINT)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.run_stage:
        from gpu_kit_stages import run_stage

        return run_stage(args.run_stage)
    if args.prepare:
        return prepare(args)
    return Kit(args).run()


if __name__ == "__main__":
    sys.exit(main())
