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
    load_model,
    save_checkpoint,
)
from diffseg.config import from_dict, to_dict
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
    # load_model rebuilds the network from the config inside and uses the EMA weights by default
    rebuilt, _ = load_model(path)
    assert type(rebuilt) is type(model) and not rebuilt.training
    for name, tensor in ema.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], tensor)
    raw_model, _ = load_model(path, use_ema=False)
    for name, tensor in model.state_dict().items():
        assert torch.equal(raw_model.state_dict()[name], tensor)


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
    loaded, ckpt = load_model(dst)
    assert isinstance(loaded, UNet) and ckpt.config["diffusion"] == {"num_timesteps": 1000, "schedule": "linear"}
    assert ckpt.extra["imported_from"] == "guided-diffusion" and loaded.cfg.learn_sigma
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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_export_loads_as_fp32_model(tmp_path, dtype):
    """The inference export (EMA weights only, fp16/bf16) is what the GPU kit ships: load_model (jobs, Serve)
    rebuilds the fp32 network from it, and its outputs match the fp32 EMA's to the precision's rounding."""
    from diffseg.checkpoint import export_weights

    cfg, model, ema, opt = trained_state("factorized")
    full = save_checkpoint(tmp_path / "full.pt", config=cfg, model=model, ema=ema.model, optimizer=opt, step=2)
    small = export_weights(full, tmp_path / "small.pt", dtype=dtype, extra={"note": "test"})
    ckpt = load_checkpoint(small)
    assert ckpt.ema is None and ckpt.optimizer is None and ckpt.step == 2
    assert all(v.dtype == dtype for v in ckpt.model.values() if torch.is_floating_point(v))
    assert ckpt.extra["export"]["weights"] == "ema" and ckpt.extra["export"]["note"] == "test"
    assert small.stat().st_size < full.stat().st_size / 3
    loaded, _ = load_model(small)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 30])
    with torch.no_grad():
        ref, got = ema.model.eval()(x, t), loaded(x, t)
    tol = 1e-2 if dtype == torch.float16 else 5e-2
    assert (got - ref).norm() / ref.norm().clamp(min=1e-6) < tol


def test_half_precision_export_refuses_overflow(tmp_path):
    from diffseg.checkpoint import export_weights

    state = {"w": torch.tensor([1.0, 1e6])}
    path = save_checkpoint(tmp_path / "c.pt", config={"model": {}}, model=state, step=0)
    with pytest.raises(ValueError, match="'w' overflows"):
        export_weights(path, tmp_path / "e.pt")
    assert not (tmp_path / "e.pt").exists()
