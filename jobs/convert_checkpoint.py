"""Convert checkpoints: import guided-diffusion (ADM) checkpoints, export to safetensors + config.json or to a
guided-diffusion .pt.

python jobs/convert_checkpoint.py preset=lsun_horse src=lsun_horse.pt dst=runs/backbones/lsun_horse.pt
python jobs/convert_checkpoint.py src=model.pt flags='--image_size 64 --num_channels 128 ...' dst=runs/x/checkpoint.pt
python jobs/convert_checkpoint.py src=runs/x/checkpoint.pt to=safetensors dst=exports/x        # diffusers layout
python jobs/convert_checkpoint.py src=runs/ddpm/checkpoint.pt to=guided-diffusion dst=exports/ddpm.pt  # + ddpm.json
python jobs/convert_checkpoint.py preset=ffhq src=ffhq.pt dst=runs/backbones/ffhq.pt tracking.register_as=ffhq-ddpm
python jobs/convert_checkpoint.py src=old/checkpoint.pt dst=runs/x/checkpoint.pt allow_unverified=true  # re-seal

Presets (the published checkpoints, with the flags of the README that publishes them): lsun_bedroom, lsun_cat,
lsun_horse, lsun_horse_nodropout, ffhq (label-efficient paper), imagenet64, imagenet128, imagenet256,
imagenet256_uncond, imagenet512. Every conversion is read back and compared with its source on a fixed input.

Every loader refuses a checkpoint or pixel bundle of ours that has no integrity record (one written before checksums
existed). `allow_unverified=true` reads such a src, prints what it is (format, tensors, step, model, the file's
SHA-256) and writes dst with a fresh record: check the description, then the new file verifies everywhere.
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
