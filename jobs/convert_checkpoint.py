"""Convert checkpoints: import guided-diffusion (ADM) checkpoints, export to safetensors + config.json or to a
guided-diffusion .pt.

python jobs/convert_checkpoint.py preset=lsun_horse src=lsun_horse.pt dst=runs/backbones/lsun_horse.pt
python jobs/convert_checkpoint.py src=model.pt flags='--image_size 64 --num_channels 128 ...' dst=runs/x/checkpoint.pt
python jobs/convert_checkpoint.py src=runs/x/checkpoint.pt to=safetensors dst=exports/x        # diffusers layout
python jobs/convert_checkpoint.py src=runs/ddpm/checkpoint.pt to=guided-diffusion dst=exports/ddpm.pt  # + ddpm.json
python jobs/convert_checkpoint.py preset=ffhq src=ffhq.pt dst=runs/backbones/ffhq.pt tracking.register_as=ffhq-ddpm

Presets (the published checkpoints, with the flags of the README that publishes them): lsun_bedroom, lsun_cat,
lsun_horse, lsun_horse_nodropout, ffhq (label-efficient paper), imagenet64, imagenet128, imagenet256,
imagenet256_uncond, imagenet512. Every conversion is read back and compared with its source on a fixed input.
"""

import sys
from pathlib import Path

# The package lives under platform/ (a source root); a Ray job's working_dir has no install of it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from diffseg.experiments.launch import run_job  # noqa: E402
from diffseg.serving.convert import ConvertConfig, run_convert  # noqa: E402


def main(argv: list[str] | None = None):
    return run_job(ConvertConfig, run_convert, argv, doc=__doc__)


if __name__ == "__main__":
    main()
