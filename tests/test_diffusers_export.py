"""`jobs/convert_checkpoint.py to=diffusers`: a diffusers UNet2DModel folder that diffusers itself loads and samples
from, with the output of our network on a fixed input; networks that do not map are refused by name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffseg.core.config import to_dict
from diffseg.core.tracking import TrackingConfig
from diffseg.models.builder import ModelConfig, build_model
from diffseg.models.checkpoint import load_checkpoint, save_checkpoint
from diffseg.models.diffusion import DiffusionConfig, GaussianDiffusion
from diffseg.models.unet import UNetConfig
from diffseg.serving.convert import ConversionError, ConvertConfig, diffusers_unet_config, fixed_input, run_convert

diffusers = pytest.importorskip("diffusers")
REPO = Path(__file__).resolve().parents[1]
SHIPPED_DDPM = REPO / "models" / "ddpm-celeba32-145k.pt"  # a DDPM trained here (models/README.md)
OFF = TrackingConfig(enabled=False)
BASE = dict(image_size=16, model_channels=32, channel_mult=(1, 2), attention_resolutions=(8,))


def random_checkpoint(path: Path, unet: UNetConfig, kind: str = "ddpm") -> Path:
    """A checkpoint whose every weight is random (ADM's zero init would make every output 0 and the check void)."""
    torch.manual_seed(0)
    cfg = ModelConfig(kind=kind, unet=unet)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    run = {"model": to_dict(cfg), "diffusion": to_dict(DiffusionConfig()), "name": "x"}
    return save_checkpoint(path, config=run, model=model.state_dict(), step=7)


@pytest.mark.parametrize(
    "changes",
    [
        {},  # one head, additive timestep conditioning (the shipped DDPMs: scale-shift; below)
        {"use_scale_shift_norm": True, "num_head_channels": 16, "use_new_attention_order": True},
        {"use_scale_shift_norm": True, "num_head_channels": 8, "resblock_updown": True, "learn_sigma": True},
        {"num_res_blocks": 2, "num_classes": 5, "use_scale_shift_norm": False, "num_heads": 2},
    ],
    ids=["plain", "heads-new-order", "resblock-updown-learn-sigma", "class-cond-legacy-heads"],
)
def test_export_loads_in_diffusers_with_our_outputs(tmp_path, changes):
    """The folder holds what `save_pretrained` writes; `UNet2DModel.from_pretrained` rebuilds the network with no
    weight left at its initialisation (strict load), and its output on the fixed input is ours."""
    unet = UNetConfig(**{**BASE, "use_scale_shift_norm": False, **changes})
    src = random_checkpoint(tmp_path / "src.pt", unet)
    out = run_convert(ConvertConfig(src=str(src), to="diffusers", dst=str(tmp_path / "d"), tracking=OFF))
    assert out["max_abs_diff"] < 1e-4
    folder = tmp_path / "d"
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert files == ["diffseg_integrity.json", "model_index.json", "scheduler/scheduler_config.json",
                     "unet/config.json", "unet/diffusion_pytorch_model.safetensors"]  # fmt: skip
    assert json.loads((folder / "unet" / "config.json").read_text())["_class_name"] == "UNet2DModel"
    theirs, info = diffusers.UNet2DModel.from_pretrained(
        str(folder), subfolder="unet", output_loading_info=True, low_cpu_mem_usage=False
    )
    assert not any(info.values()), info  # missing / unexpected / mismatched keys: none
    ours = build_model(load_checkpoint(src).model_config).eval()
    ours.load_state_dict(load_checkpoint(src).model)
    x, t, *y = fixed_input(16, unet.num_classes)
    with torch.no_grad():
        expected = ours(x, t, *y)
        got = theirs.eval()(x, t, class_labels=y[0] if y else None).sample
    assert expected.abs().max() > 0.1  # a non-trivial output
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_shipped_ddpm_runs_in_ddpm_pipeline(tmp_path):
    """The DDPM trained here (models/) exported once: diffusers' DDPMScheduler, read from the folder, has our
    process (the same alphas_cumprod) and DDPMPipeline samples images from it (a few steps: CPU)."""
    run_convert(ConvertConfig(src=str(SHIPPED_DDPM), to="diffusers", dst=str(tmp_path / "d"), tracking=OFF))
    pipe = diffusers.DDPMPipeline.from_pretrained(str(tmp_path / "d"))  # issue 37.6: model_index.json is there
    scheduler = pipe.scheduler
    ours = GaussianDiffusion.from_config(load_checkpoint(SHIPPED_DDPM).diffusion_config)
    np.testing.assert_allclose(scheduler.alphas_cumprod.double().numpy(), ours.alphas_cumprod, rtol=1e-5)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=8, generator=torch.Generator().manual_seed(0), output_type="np")
    images = images.images
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()
    assert 0.0 <= images.min() and images.max() <= 1.0 and images.std() > 0.01


@pytest.mark.parametrize(
    "kind, changes, named",
    [
        ("factorized", {}, "model.kind='factorized'"),
        ("ddpm", {"model_channels": 16}, "GroupNorm group counts [16, 32]"),
        ("ddpm", {"padding_mode": "circular"}, "padding_mode='circular'"),
        ("ddpm", {"channel_mult": (2, 2)}, "channel_mult[0]=2"),
        ("ddpm", {"conv_resample": False}, "conv_resample=False"),
    ],
)
def test_networks_that_do_not_map_are_refused_by_name(kind, changes, named):
    with pytest.raises(ConversionError, match=r"UNet2DModel.*" + named.replace("[", r"\[").replace("(", r"\(")):
        diffusers_unet_config(UNetConfig(**{**BASE, **changes}), kind)


def test_refused_conversions_are_one_line_errors(tmp_path):
    """What a user sees from the job: `error: <why>` on one line, no traceback (--traceback shows it), exit 1, for an
    export diffusers or guided-diffusion cannot take."""
    src = random_checkpoint(tmp_path / "f.pt", UNetConfig(**BASE), kind="factorized")
    job = [sys.executable, str(REPO / "jobs" / "convert_checkpoint.py"), f"src={src}", "tracking.enabled=false"]
    for to, why in (("diffusers", "model.kind='factorized'"), ("guided-diffusion", "no guided-diffusion counterpart")):
        res = subprocess.run([*job, f"to={to}", f"dst={tmp_path / to}"], capture_output=True, text=True, timeout=300)
        assert res.returncode == 1, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: to={to}: ") and why in lines[0], res.stderr
    res = subprocess.run([*job, "to=diffusers", f"dst={tmp_path / 'x'}", "--traceback"], capture_output=True, text=True)
    assert res.returncode == 1 and "Traceback (most recent call last)" in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: to=diffusers")


def test_the_exported_pipeline_is_sealed_and_a_changed_file_is_refused(tmp_path):
    """Issue 36.3: the diffusers export wrote no digest and `diffusers:<dir>` backbones were never checked. Now every
    file of the folder (weights and configs) is sealed; a changed scheduler or config is refused by name, and a folder
    without a seal loads only when unverified loading is asked for."""
    from diffseg.methods.features import load_backbone
    from diffseg.models.checkpoint import FOLDER_SEAL, CheckpointError

    run_convert(ConvertConfig(src=str(SHIPPED_DDPM), to="diffusers", dst=str(tmp_path / "d"), tracking=OFF))
    folder = tmp_path / "d"
    model, _ = load_backbone(f"diffusers:{folder}", "cpu")
    assert model is not None
    sched = folder / "scheduler" / "scheduler_config.json"
    sched.write_text(sched.read_text().replace('"linear"', '"squaredcos_cap_v2"'))
    with pytest.raises(CheckpointError, match="scheduler/scheduler_config.json: does not match"):
        load_backbone(f"diffusers:{folder}", "cpu")
    (folder / FOLDER_SEAL).unlink()
    with pytest.raises(CheckpointError, match="--allow-unverified"):
        load_backbone(f"diffusers:{folder}", "cpu")


def test_our_ddim_is_diffusers_ddim_with_clipped_model_output(tmp_path):
    """Issue 37.6: DDIMPipeline from the same noise differed from our DDIM by up to 1.74. With
    `use_clipped_model_output=True` (eps recomputed from the clipped x0, as guided-diffusion's DDIM does) it is our
    DDIM on the uniform-stride respacing ("ddim10": 0, 100, ..., 900, what diffusers' step assumes), as docs/mlflow.md
    says; without it, it is not."""
    from diffseg.models.checkpoint import load_diffusion_model

    run_convert(ConvertConfig(src=str(SHIPPED_DDPM), to="diffusers", dst=str(tmp_path / "d"), tracking=OFF))
    pipe = diffusers.DDIMPipeline.from_pretrained(str(tmp_path / "d"))
    pipe.set_progress_bar_config(disable=True)
    loaded = load_diffusion_model(SHIPPED_DDPM, "cpu")
    process = loaded.diffusion.respace("ddim10")
    with torch.no_grad():
        ours = process.ddim_sample_loop(loaded.model, (2, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    ours = ((ours.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()

    def theirs(clipped: bool) -> np.ndarray:
        return pipe(batch_size=2, num_inference_steps=10, eta=0.0, use_clipped_model_output=clipped,
                    output_type="np", generator=torch.Generator().manual_seed(0)).images  # fmt: skip

    assert np.abs(theirs(True) - ours).max() < 1e-3, np.abs(theirs(True) - ours).max()
    assert np.abs(theirs(False) - ours).max() > 1e-2  # the setting matters, so the test could fail
