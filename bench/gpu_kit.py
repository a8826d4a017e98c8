"""The GPU evidence kit: one command that proves the GPU path and trains a real model in one short GPU window.

    python bench/gpu_kit.py --prepare                        # here, once: data -> .kit/data, diffusers -> .whl
    python bench/gpu_kit.py --out DIR --budget-min 8         # on the GPU box: no Ray, MLflow, diffusers or network
    python bench/gpu_kit.py --out DIR --smoke                # every stage on the CPU at toy sizes (CI, < 60 s)

Stages, in order (`--stages a,b` picks some; each runs in its own process with a time box, so a stage that
overruns is cut and reported and a crash is recorded, while the next stage runs):

    env         versions, the GPU, the TFLOP/s of a large bf16 matmul
    tests       the `gpu`-marked pytest tests: pass/fail/skip counts and the output's tail
    train_step  factorized paper-64 K=3 bf16 train step: images/s, FLOPs, TFLOP/s, % of peak; eager and compiled
    unet        our U-Net train step / diffusers UNet2DModel at matched size (skipped without diffusers)
    ensemble    the batched MLP ensemble (E=10, D=8448) / ten MLPs trained one after another
    sampling    DDIM-50, factorized paper-64: eager / torch.compile "reduce-overhead" (CUDA graphs)
    memory      256 px features, LSUN-256 ADM (random weights, D=8448) on 8 and 64 images: GPU peak, RSS, s/image
    train       each `--train CONFIG[=MINUTES]` (default jobs/configs/gpu_kit_factorized64.yaml, the time left):
                trained for its time through diffseg.training.loop, its fp16 EMA exported, evaluated against the
                baselines

Time boxes: a stage with MINUTES gets them; the others share what is left by weight (`WEIGHTS`), recomputed at
each start, so time a stage leaves unused goes to the later ones (the last training job gets the rest).
`--box STAGE=SECONDS` fixes one. Everything lands in --out, at most 8 files, each under 16 MiB: report.md,
figures.json (every number the report shows), kit.log, PNG figures, the fp16 checkpoint(s); rewritten after every
stage, so a run killed from outside still leaves its report.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from kit import DEFAULT_DATA, DEFAULT_TRAIN, REPO
from kit.plan import ORDER
from kit.prepare import SETS, prepare
from kit.report import PEAK_TFLOPS
from kit.runner import Kit


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="output folder (at most 8 files)")
    p.add_argument("--budget-min", type=float, default=8.0, help="wall-clock minutes for the whole kit")
    p.add_argument("--smoke", action="store_true", help="every stage on the CPU at toy sizes")
    p.add_argument("--stages", default=",".join(ORDER), help=f"comma-separated subset of {','.join(ORDER)}")
    p.add_argument(
        "--train",
        action="append",
        default=[],
        metavar="CONFIG[=MINUTES]",
        help=f"a TrainConfig YAML to train (repeatable; default {DEFAULT_TRAIN} with the time left)",
    )
    p.add_argument(
        "--train-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override applied to every training job (e.g. optim.lr=3e-4)",
    )
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
    g.add_argument("--size", type=int, default=64, help="side the copies are resized and centre-cropped to (0 = as is)")
    g.add_argument("--no-wheels", action="store_true", help="skip fetching the diffusers wheel")
    p.add_argument("--run-stage", help=argparse.SUPPRESS)  # internal: the child process of one stage
    args = p.parse_args(argv)
    if not args.prepare and not args.run_stage and not args.out:
        p.error("--out is required")
    # Paths given on the command line are the caller's (relative to the working directory); defaults are the repo's.
    args.data = Path(args.data).resolve() if args.data else REPO / DEFAULT_DATA
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
