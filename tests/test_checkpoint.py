"""Checkpoints: our format (config, weights, EMA, optimizer, step), weights_only loading, atomic writes, and the
guided-diffusion importer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffseg.checkpoint import (
    FORMAT,
    atomic_torch_save,
    convert_guided_diffusion,
    import_guided_diffusion,
    load_checkpoint,
    load_diffusion_model,
    save_checkpoint,
)
from diffseg.config import from_dict, to_dict
from diffseg.diffusion import DiffusionConfig, GaussianDiffusion
from diffseg.models import EMA, ModelConfig, build_model
from diffseg.unet import UNet, UNetConfig

TINY = UNetConfig(image_size=16, model_channels=8, channel_mult=(1, 2), attention_resolutions=(8,))


def trained_state(kind="ddpm"):
    """A model, its EMA and an Adam optimizer with state, after two steps."""
    torch.manual_seed(0)
    cfg = {"model": to_dict(ModelConfig(kind=kind, unet=TINY)), "optim": {"lr": 1e-3}, "name": "t"}
    model = build_model(from_dict(ModelConfig, cfg["model"]))
    ema = EMA(model, decay=0.9)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        loss = model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2])).square().mean() + sum(
            p.square().sum() for p in model.parameters()
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model)
    return cfg, model, ema, opt


@pytest.mark.parametrize("kind", ["ddpm", "factorized"])
def test_round_trip_carries_everything(tmp_path, kind):
    cfg, model, ema, opt = trained_state(kind)
    path = save_checkpoint(tmp_path / "run" / "checkpoint.pt", config=cfg, model=model, ema=ema.model, optimizer=opt,
                           step=2, extra={"loss": 0.5})  # fmt: skip
    raw = torch.load(path, weights_only=True)  # tensors, numbers, strings, lists and dicts only
    assert raw["format"] == FORMAT and set(raw) == {"format", "config", "model", "ema", "optimizer", "step", "extra"}
    ckpt = load_checkpoint(tmp_path / "run")  # a run folder resolves to its checkpoint.pt
    assert ckpt.step == 2 and ckpt.extra == {"loss": 0.5}
    assert ckpt.config == json.loads(json.dumps(cfg)) and ckpt.model_config == ModelConfig(kind=kind, unet=TINY)
    for name, tensor in model.state_dict().items():
        assert torch.equal(ckpt.model[name], tensor), name
    for name, tensor in ema.state_dict().items():
        assert torch.equal(ckpt.ema[name], tensor), name
    assert any(not torch.equal(ckpt.ema[n], t) for n, t in model.state_dict().items())  # EMA is not the model
    # the optimizer resumes exactly: its state loads into a fresh optimizer
    opt2 = torch.optim.Adam(build_model(ckpt.model_config).parameters(), lr=1e-3)
    opt2.load_state_dict(ckpt.optimizer)
    assert opt2.state_dict()["state"][0]["step"] == 2
    torch.testing.assert_close(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    # the one loader rebuilds the network from the config inside and uses the EMA weights by default
    loaded = load_diffusion_model(path, "cpu")
    rebuilt = loaded.model
    assert type(rebuilt) is type(model) and not rebuilt.training and loaded.weights == "ema" and loaded.step == 2
    assert not any(p.requires_grad for p in rebuilt.parameters())
    for name, tensor in ema.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], tensor)
    raw_model = load_diffusion_model(tmp_path / "run", "cpu", use_ema=False).model  # a run folder works too
    for name, tensor in model.state_dict().items():
        assert torch.equal(raw_model.state_dict()[name], tensor)
    # a random init of the same architecture, fixed, and without touching the caller's RNG
    state = torch.random.get_rng_state()
    rnd = load_diffusion_model(path, "cpu", random_init=True).model
    assert torch.equal(torch.random.get_rng_state(), state)
    again = load_diffusion_model(path, "cpu", random_init=True).model
    assert all(torch.equal(a, b) for a, b in zip(rnd.state_dict().values(), again.state_dict().values()))
    assert any(not torch.equal(rnd.state_dict()[n], t) for n, t in ema.state_dict().items() if t.dim() > 1)


def test_loader_gives_the_trained_diffusion_and_reads_retired_keys(tmp_path):
    """The diffusion process comes from the checkpoint's config; keys older checkpoints hold but nobody read
    (diffusion.sample_steps, eta, clip_denoised) are dropped rather than refused, so old runs still load."""
    cfg, model, ema, _ = trained_state()
    config = {**cfg, "diffusion": {"num_timesteps": 50, "schedule": "cosine", "sample_steps": 50, "eta": 0.0,
                                   "clip_denoised": True}}  # fmt: skip
    path = save_checkpoint(tmp_path / "old.pt", config=config, model=model, ema=ema.model, step=7)
    loaded = load_diffusion_model(str(path), "cpu")
    assert loaded.diffusion.num_timesteps == 50 and loaded.step == 7
    assert loaded.diffusion.betas[-1] == pytest.approx(GaussianDiffusion.from_config(
        DiffusionConfig(num_timesteps=50, schedule="cosine")).betas[-1])  # fmt: skip
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_diffusion_model(tmp_path / "missing.pt")


def test_weights_only_refuses_pickled_code(tmp_path):
    """A file that needs arbitrary unpickling is refused: loading never runs code from a checkpoint."""

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "config": "{}", "model": {}, "step": 0, "payload": Evil()}, path)
    with pytest.raises(ValueError, match="not a loadable checkpoint"):
        load_checkpoint(path)
    path2 = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, path2)
    with pytest.raises(ValueError, match="not a diffseg checkpoint"):
        load_checkpoint(path2)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_writes_are_atomic(tmp_path, monkeypatch):
    cfg, model, ema, opt = trained_state()
    path = save_checkpoint(tmp_path / "checkpoint.pt", config=cfg, model=model, step=1)
    before = path.read_bytes()

    def crash(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half a checkpoint")  # the writer dies after writing part of the file
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, config=cfg, model=model, step=2)
    assert path.read_bytes() == before  # the old checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # and no temp file is left behind
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"x": 1}, tmp_path / "new" / "fresh.pt")
    assert list((tmp_path / "new").iterdir()) == []  # a failed first write leaves no file at all
    monkeypatch.undo()
    assert load_checkpoint(path).step == 1


def test_guided_diffusion_importer_round_trip(reference_dir, tmp_path):
    ref = torch.load(reference_dir / "adm_tiny_a.pt", map_location="cpu", weights_only=True)
    flags = json.loads((reference_dir / "adm_tiny_a.json").read_text())
    # a guided-diffusion .pt is a bare state dict
    src = tmp_path / "adm_tiny_a_state.pt"
    torch.save(ref["state_dict"], src)
    model = import_guided_diffusion(src, flags)
    for name, tensor in ref["state_dict"].items():
        assert torch.equal(model.state_dict()[name], tensor), name
    # ... and converts to our format: the network rebuilds from the config inside and gives the reference output
    dst = convert_guided_diffusion(src, {**flags, "diffusion_steps": 1000, "noise_schedule": "linear"},
                                   tmp_path / "ours" / "checkpoint.pt")  # fmt: skip
    result = load_diffusion_model(dst, "cpu")
    loaded, ckpt = result.model, load_checkpoint(dst)
    assert isinstance(loaded, UNet) and ckpt.config["diffusion"] == {"num_timesteps": 1000, "schedule": "linear"}
    assert ckpt.extra["imported_from"] == "guided-diffusion" and loaded.cfg.learn_sigma
    assert result.diffusion.num_timesteps == 1000
    with torch.no_grad():
        torch.testing.assert_close(loaded(ref["x"], ref["t"]), ref["out"], atol=1e-5, rtol=0)
    # a saved state dict of our own UNet is the same thing: it exports back unchanged
    torch.testing.assert_close(torch.load(dst, weights_only=True)["model"], ref["state_dict"])


def test_importer_rejects_mismatched_flags(reference_dir):
    ref = torch.load(reference_dir / "adm_tiny_b.pt", map_location="cpu", weights_only=True)
    flags = json.loads((reference_dir / "adm_tiny_a.json").read_text())  # the other model's flags
    with pytest.raises((ValueError, RuntimeError), match="missing|unexpected|size mismatch"):
        import_guided_diffusion(ref["state_dict"], flags)


def test_checkpoint_is_plain_data(tmp_path):
    """Nothing but tensors and plain Python values inside (no dataclass instances, no modules)."""
    cfg, model, ema, opt = trained_state()
    path = save_checkpoint(tmp_path / "c.pt", config=ModelConfig(unet=TINY), model=model, ema=ema.model, step=3)
    raw = torch.load(path, weights_only=True)

    def plain(v):
        if isinstance(v, dict):
            return all(isinstance(k, (str, int)) and plain(x) for k, x in v.items())
        if isinstance(v, (list, tuple)):
            return all(plain(x) for x in v)
        return v is None or isinstance(v, (str, int, float, bool, torch.Tensor))

    assert plain(raw)
    assert json.loads(raw["config"])["unet"]["channel_mult"] == [1, 2]
