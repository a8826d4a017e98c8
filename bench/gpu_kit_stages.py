"""The process that runs one stage of the GPU evidence kit (`bench/gpu_kit.py --run-stage SPEC`): the stages
themselves are `bench/kit/<stage>.py`, one per figure, sharing `kit/stage.py` (the `Recorder`, `Skip`, timing).

Every stage is `stage_<name>(spec, rec)`: `spec` is the JSON the launcher wrote (device, deadline, sizes, paths),
`rec` records results as they come (a stage cut at its deadline still reports what it finished). Nothing here
imports Ray, MLflow or diffusers at module level; diffusers is optional (stage `unet` is skipped without it).
Stages reuse the library and the other benches: `diffseg.training.loop` (build_train_state, train_step), `features`
(FeatureExtractor, the Ray Data job's callable, called directly), `evaluate`, `checkpoint.export_weights`,
`bench/unet_step.py` (matched sizes), `bench/bench_ensemble_speed.py`, `bench/sampling.py` (the compiled sampler).
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import torch
from kit.ensemble import stage_ensemble
from kit.env import stage_env
from kit.gpu_tests import stage_tests
from kit.memory import stage_memory
from kit.rate import stage_rate
from kit.sampling import stage_sampling
from kit.stage import Recorder, Skip
from kit.train import stage_train
from kit.train_step import stage_train_step
from kit.unet import stage_unet

STAGES = {
    "env": stage_env,
    "tests": stage_tests,
    "train_step": stage_train_step,
    "unet": stage_unet,
    "ensemble": stage_ensemble,
    "sampling": stage_sampling,
    "memory": stage_memory,
    "train": stage_train,
    "rate": stage_rate,
}


def run_stage(spec_path: str) -> int:
    """The child process: run one stage from its spec file, recording results, a skip, or the error."""
    spec = json.loads(Path(spec_path).read_text())
    rec = Recorder(spec["result"])
    if spec["smoke"]:
        torch.set_num_threads(1)
    if spec["device"].startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    try:
        if spec["device"].startswith("cuda") and not torch.cuda.is_available():
            raise Skip("CUDA is not available")
        STAGES[spec["kind"]](spec, rec)
    except Skip as e:
        rec.finish("skipped", reason=str(e))
        return 0
    except BaseException as e:  # recorded for the report, then the process fails
        rec.finish("crashed", reason=f"{type(e).__name__}: {str(e)[:500]}", error=traceback.format_exc()[-4000:])
        traceback.print_exc()
        return 1
    if rec.data["status"] == "running":
        rec.finish("ok")
    return 0
