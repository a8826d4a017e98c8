"""Checkpoints: our format (config, weights, EMA, optimizer, step), weights_only loading, atomic writes, and the
guided-diffusion importer."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from diffseg.core.config import from_dict, to_dict
from diffseg.methods.features import FeatureConfig
from diffseg.methods.pixel import MLPEnsemble, PixelSegmenter
from diffseg.models.builder import EMA, ModelConfig, build_model
from diffseg.models.checkpoint import load_checkpoint, load_diffusion_model, save_checkpoint
from diffseg.models.diffusion import DiffusionConfig, GaussianDiffusion
from diffseg.models.guided import convert_guided_diffusion, import_guided_diffusion
from diffseg.models.integrity import FORMAT, CheckpointError, atomic_torch_save
from diffseg.models.unet import UNet, UNetConfig

REPO = Path(__file__).resolve().parents[1]
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
    keys = {"format", "config", "model", "ema", "optimizer", "step", "extra", "integrity"}
    assert raw["format"] == FORMAT and set(raw) == keys
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
    with pytest.raises(ValueError, match="pickled Python objects .* would run code"):
        load_checkpoint(path)
    path2 = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, path2)
    with pytest.raises(ValueError, match="no 'format' key, not a diffseg model checkpoint"):
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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_export_loads_as_fp32_model(tmp_path, dtype):
    """The inference export (EMA weights only, fp16/bf16) is what the GPU kit ships: load_diffusion_model (jobs, Serve)
    rebuilds the fp32 network from it, and its outputs match the fp32 EMA's to the precision's rounding."""
    from diffseg.models.checkpoint import export_weights

    cfg, model, ema, opt = trained_state("factorized")
    full = save_checkpoint(tmp_path / "full.pt", config=cfg, model=model, ema=ema.model, optimizer=opt, step=2)
    small = export_weights(full, tmp_path / "small.pt", dtype=dtype, extra={"note": "test"})
    ckpt = load_checkpoint(small)
    assert ckpt.ema is None and ckpt.optimizer is None and ckpt.step == 2
    assert all(v.dtype == dtype for v in ckpt.model.values() if torch.is_floating_point(v))
    assert ckpt.extra["export"]["weights"] == "ema" and ckpt.extra["export"]["note"] == "test"
    assert small.stat().st_size < full.stat().st_size / 3
    loaded = load_diffusion_model(small, "cpu").model
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 30])
    with torch.no_grad():
        ref, got = ema.model.eval()(x, t), loaded(x, t)
    tol = 1e-2 if dtype == torch.float16 else 5e-2
    assert (got - ref).norm() / ref.norm().clamp(min=1e-6) < tol


def test_half_precision_export_refuses_overflow(tmp_path):
    from diffseg.models.checkpoint import export_weights

    state = {"w": torch.tensor([1.0, 1e6])}
    path = save_checkpoint(tmp_path / "c.pt", config={"model": {}}, model=state, step=0)
    with pytest.raises(ValueError, match="'w' overflows"):
        export_weights(path, tmp_path / "e.pt")
    assert not (tmp_path / "e.pt").exists()


# ---------------------------------------------------------------------------------------------------- integrity
def _flip_byte_in_record(path: Path, record_suffix: str, at: int = 5) -> str:
    """Flip one byte inside the stored (uncompressed) zip record whose name ends with `record_suffix`; returns its
    name. This is damage torch itself does not notice: the file still loads."""
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(record_suffix))
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    assert info.compress_type == zipfile.ZIP_STORED and info.file_size > at
    data[start + at] ^= 0x10
    path.write_bytes(bytes(data))
    return info.filename


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bit_flipped_checkpoint_is_refused_naming_the_tensor(tmp_path, dtype):
    cfg, model, ema, opt = trained_state()
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = save_checkpoint(tmp_path / "checkpoint.pt", config=cfg, model=state, ema=state, optimizer=opt, step=2)
    assert load_checkpoint(path).model["out.2.weight"].dtype == dtype  # any dtype round-trips with its checksum
    original = torch.load(path, weights_only=True)
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(path.read_bytes())
    _flip_byte_in_record(damaged, "/data/3")
    raw = torch.load(damaged, weights_only=True)  # torch alone loads the damaged file without a word
    changed = [n for n, t in _tensors(raw) if not torch.equal(t, dict(_tensors(original))[n])]
    assert len(changed) >= 1
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(damaged)
    msg = str(e.value)
    assert str(damaged) in msg and "does not match its SHA-256" in msg
    assert any(f"'{n}'" in msg for n in changed), (msg, changed)
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_diffusion_model(damaged, "cpu")  # the loader every job and Serve use


def _tensors(obj, prefix=""):
    if torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}/{k}" if prefix else str(k))


def test_altered_config_is_refused(tmp_path):
    cfg, model, _, _ = trained_state()
    path = save_checkpoint(tmp_path / "c.pt", config=cfg, model=model, step=2)
    raw = torch.load(path, weights_only=True)
    raw["step"] = 999  # an edit that keeps every tensor
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match=r"non-tensor part .* does not match"):
        load_checkpoint(path)


def test_each_damaged_file_error_names_the_file(tmp_path):
    """Every way a file can be wrong gets an error naming the real file and saying what is wrong with it."""
    cfg, model, _, _ = trained_state()
    good = save_checkpoint(tmp_path / "good.pt", config=cfg, model=model, step=1).read_bytes()
    bundle = PixelSegmenter(
        MLPEnsemble(4, 2, members=2), FeatureConfig(backbone="rgb"), ["a", "b"], 16, {}, "cpu"
    ).save(tmp_path / "bundle.pt")
    cases = {
        "empty.pt": (b"", "empty file"),
        "half.pt": (good[: len(good) // 2], "truncated or damaged"),
        "tail.pt": (good[:-30], "truncated or damaged"),
        "random.pt": (bytes(range(256)) * 4, "not a torch zip file"),
        "text.pt": (b"model weights\n", "not a torch zip file"),
    }
    for name, (data, _) in cases.items():
        (tmp_path / name).write_bytes(data)
    torch.save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "foreign.pt")
    cases["foreign.pt"] = (None, "no 'format' key, not a diffseg model checkpoint")
    torch.save({"format": FORMAT, "x": _Evil()}, tmp_path / "code.pt")
    cases["code.pt"] = (None, "would run code")
    cases["bundle.pt"] = (None, "this is a pixel-segmenter bundle")
    for name, (_, phrase) in cases.items():
        path = tmp_path / name
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(path)
        assert str(path) in str(e.value) and phrase in str(e.value), (name, str(e.value))
    with pytest.raises(CheckpointError, match=rf"{tmp_path / 'good.pt'}: this is a diffseg model checkpoint"):
        PixelSegmenter.load(tmp_path / "good.pt")
    assert PixelSegmenter.load(bundle).class_names == ["a", "b"]
    (tmp_path / "run").mkdir()
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'run'}: a folder without checkpoint.pt"):
        load_checkpoint(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'missing.pt'}: no such file"):
        load_checkpoint(tmp_path / "missing.pt")


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_resume_from_a_truncated_export_names_the_run_checkpoint(tmp_path):
    from diffseg.training.config import TrainConfig, load_run_checkpoint

    cfg = TrainConfig(name="r", output_dir=str(tmp_path))
    cfg_, model, _, _ = trained_state()
    path = save_checkpoint(tmp_path / "r" / "checkpoint.pt", config=cfg_, model=model, step=4)
    assert load_run_checkpoint(cfg).step == 4
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=rf"^{path}: truncated"):
        load_run_checkpoint(cfg)


# ---------------------------------------------------------------------------------------------------- kills
_KILLED_WRITER = r"""
import os, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import torch
import diffseg.core.config as config
from diffseg.models.checkpoint import save_checkpoint

config._use_anonymous_temp = sys.argv[3] == "anonymous"
real_save = torch.save

def slow_save(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)  # the file is fully written ...
    print("writing", flush=True)
    time.sleep(60)  # ... and the writer is killed before it can publish it

torch.save = slow_save
save_checkpoint(sys.argv[2], config={"model": {}}, model={"w": torch.randn(256, 256)}, step=2)
"""


@pytest.mark.parametrize("mode", ["anonymous", "named"])
def test_kill_during_a_save_leaves_no_temp_files(tmp_path, mode, monkeypatch):
    """SIGKILL in the middle of a checkpoint save: the old checkpoint is intact, nothing is left in the system temp
    folder, and no temp file stays in the run folder (O_TMPFILE: none is ever named; the portable fallback: the dead
    writer's named temp file is removed by the next save into the folder)."""
    import diffseg.core.config as config

    run = tmp_path / "run"
    sys_tmp = tmp_path / "systmp"
    sys_tmp.mkdir()
    cfg, model, _, _ = trained_state()
    path = save_checkpoint(run / "checkpoint.pt", config=cfg, model=model, step=1)
    before = path.read_bytes()
    env = {**os.environ, "TMPDIR": str(sys_tmp), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(REPO / "platform"), str(path), mode],
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout.readline().strip() == b"writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert path.read_bytes() == before  # the old checkpoint is whole
    assert list(sys_tmp.iterdir()) == []  # nothing in the system temp folder
    left = sorted(p.name for p in run.iterdir() if p.name != "checkpoint.pt")
    if mode == "anonymous" and config._open_anonymous(run) is not None:
        assert left == []  # an unnamed file dies with its writer
    else:
        assert len(left) == 1 and left[0].startswith(".checkpoint.pt.") and left[0].endswith(".tmp"), left
        monkeypatch.setattr(config, "_use_anonymous_temp", mode == "anonymous")
        save_checkpoint(path, config=cfg, model=model, step=3)  # the next save clears what the dead writer left
        assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt"]
    assert load_checkpoint(path).step in (1, 3)


def test_staging_dir_is_beside_the_target_and_cleaned(tmp_path):
    from diffseg.core.config import remove_stale_temps, staging_dir

    target = tmp_path / "run" / "checkpoint.pt"
    with staging_dir(target) as d:
        assert d.parent == target.parent and d.name.startswith(".checkpoint.pt.")
        (d / "x").write_text("x")
    assert list(target.parent.iterdir()) == []
    dead = target.parent / ".checkpoint.pt.someone-999999999.abcd1234.tmpdir"  # another host: left alone
    mine = target.parent / f".checkpoint.pt.{_host()}-999999999.abcd1234.tmpdir"  # this host, no such pid
    dead.mkdir()
    mine.mkdir()
    assert remove_stale_temps(target.parent) == [mine] and dead.exists() and not mine.exists()


def _host():
    from diffseg.core.config import _HOST

    return _HOST


# ---------------------------------------------------------------------------------------------------- travel
def _outputs(loaded) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 16, generator=g)
    with torch.no_grad():
        return loaded.model(x, torch.tensor([3, 500]))


@pytest.mark.parametrize("kind", ["ddpm", "factorized"])
def test_safetensors_round_trip_gives_identical_outputs(tmp_path, kind):
    """checkpoint -> safetensors + config.json -> checkpoint: the same network, bit for bit (EMA weights, process)."""
    from diffseg.models.checkpoint import SAFETENSORS_WEIGHTS, export_safetensors, save_checkpoint_as

    cfg, model, ema, opt = trained_state(kind)
    cfg["diffusion"] = {"num_timesteps": 200, "schedule": "cosine"}
    src = save_checkpoint(tmp_path / "c.pt", config=cfg, model=model, ema=ema.model, optimizer=opt, step=7)
    folder = export_safetensors(src, tmp_path / "st")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", SAFETENSORS_WEIGHTS, "scheduler_config.json"]
    config = json.loads((folder / "config.json").read_text())
    assert config["model"]["kind"] == kind and config["weights"] == "ema" and config["step"] == 7
    scheduler = json.loads((folder / "scheduler_config.json").read_text())
    assert scheduler["num_train_timesteps"] == 200 and scheduler["beta_schedule"] == "squaredcos_cap_v2"
    back = save_checkpoint_as(load_checkpoint(folder), tmp_path / "back" / "checkpoint.pt")  # re-import
    a, b, c = (load_diffusion_model(p, "cpu") for p in (src, folder, back))
    assert b.diffusion.num_timesteps == 200 and c.step == 7 and type(c.model) is type(a.model)
    assert torch.equal(_outputs(a), _outputs(b)) and torch.equal(_outputs(a), _outputs(c))
    # the SHA-256 record in the safetensors metadata catches a flipped byte in the tensor data
    data = bytearray((folder / SAFETENSORS_WEIGHTS).read_bytes())
    data[-3] ^= 0x10
    (folder / SAFETENSORS_WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its SHA-256"):
        load_checkpoint(folder)


def test_guided_diffusion_pt_round_trip_gives_identical_outputs(tmp_path, reference_dir):
    """checkpoint -> guided-diffusion .pt (bare state dict) + flags .json -> checkpoint: identical outputs, and the
    .pt is exactly what guided-diffusion's own UNetModel holds (the reference vectors' state dict and output)."""
    from diffseg.models.guided import export_guided_diffusion

    ref = torch.load(reference_dir / "adm_tiny_b.pt", map_location="cpu", weights_only=True)
    flags = json.loads((reference_dir / "adm_tiny_b.json").read_text())
    ours = convert_guided_diffusion(ref["state_dict"], flags, tmp_path / "ours.pt")
    pt, written_flags = export_guided_diffusion(ours, tmp_path / "gd" / "model.pt")
    state = torch.load(pt, weights_only=True)
    assert set(state) == set(ref["state_dict"]) and all(torch.equal(state[k], v) for k, v in ref["state_dict"].items())
    assert json.loads(pt.with_suffix(".json").read_text()) == written_flags
    back = convert_guided_diffusion(pt, written_flags, tmp_path / "back.pt")
    a, b = load_diffusion_model(ours, "cpu"), load_diffusion_model(back, "cpu")
    with torch.no_grad():
        out_a, out_b = a.model(ref["x"], ref["t"]), b.model(ref["x"], ref["t"])
    assert torch.equal(out_a, out_b)
    torch.testing.assert_close(out_b, ref["out"], atol=1e-5, rtol=0)
    # a factorized network has no guided-diffusion counterpart
    cfg, model, ema, _ = trained_state("factorized")
    fac = save_checkpoint(tmp_path / "f.pt", config=cfg, model=model, ema=ema.model, step=1)
    with pytest.raises(ValueError, match="no guided-diffusion counterpart"):
        export_guided_diffusion(fac, tmp_path / "f_gd.pt")


def test_presets_build_the_published_networks(reference_dir):
    """Every preset's flags build (on the meta device: shapes only) the network of its checkpoint: the LSUN and FFHQ
    ones exactly the reference key set, ImageNet's with 1000 classes, cosine at 64 px, half width first at 512."""
    from diffseg.models.guided import GUIDED_PRESETS, diffusion_config_from_guided_flags, guided_preset_flags
    from diffseg.models.unet import unet_config_from_guided_flags

    expected = {}
    for line in (reference_dir / "adm_lsun256_state_dict_keys.tsv").read_text().splitlines():
        if line.strip():
            key, shape = line.split("\t")
            expected[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    built = {}
    for name in GUIDED_PRESETS:
        flags = guided_preset_flags(name)
        cfg = unet_config_from_guided_flags(flags)
        with torch.device("meta"):
            built[name] = (cfg, {k: tuple(v.shape) for k, v in UNet(cfg).state_dict().items()})
        assert diffusion_config_from_guided_flags(flags)["num_timesteps"] == 1000
    for name in ("lsun_bedroom", "lsun_cat", "lsun_horse", "lsun_horse_nodropout", "ffhq"):
        assert built[name][1] == expected, name
    for name in ("imagenet64", "imagenet128", "imagenet256", "imagenet512"):
        assert built[name][0].num_classes == 1000 and built[name][1]["label_emb.weight"][0] == 1000
    assert built["imagenet256_uncond"][0].num_classes is None
    assert diffusion_config_from_guided_flags(guided_preset_flags("imagenet64"))["schedule"] == "cosine"
    assert built["imagenet64"][0].use_new_attention_order and built["imagenet128"][0].num_heads == 4
    assert (
        built["imagenet512"][0].channel_mult[0] == 0.5 and built["imagenet512"][1]["input_blocks.0.0.weight"][0] == 128
    )


def test_convert_job_imports_exports_and_checks(tmp_path, reference_dir):
    """jobs/convert_checkpoint.py's body: guided .pt -> ours -> safetensors -> guided .pt, each read back with an
    output difference of exactly 0; a preset of another network is a clear error."""
    from diffseg.core.config import ConfigError
    from diffseg.core.tracking import TrackingConfig
    from diffseg.serving.convert import ConvertConfig, run_convert

    ref = torch.load(reference_dir / "adm_tiny_a.pt", map_location="cpu", weights_only=True)
    torch.save(ref["state_dict"], tmp_path / "a.pt")
    flags = json.loads((reference_dir / "adm_tiny_a.json").read_text())
    flag_text = " ".join(f"--{k} {v}" for k, v in flags.items())
    off = TrackingConfig(enabled=False)
    steps = [
        ConvertConfig(src=str(tmp_path / "a.pt"), flags=flag_text, dst=str(tmp_path / "ours.pt"), tracking=off),
        ConvertConfig(src=str(tmp_path / "ours.pt"), to="safetensors", dst=str(tmp_path / "st"), tracking=off),
        ConvertConfig(src=str(tmp_path / "st"), to="guided-diffusion", dst=str(tmp_path / "gd.pt"), tracking=off),
    ]
    for cfg in steps:
        assert run_convert(cfg)["max_abs_diff"] == 0.0
    assert load_checkpoint(tmp_path / "ours.pt").extra["imported_from"] == "guided-diffusion"
    with torch.no_grad():
        out = import_guided_diffusion(tmp_path / "gd.pt", json.loads((tmp_path / "gd.json").read_text()))(
            ref["x"], ref["t"]
        )
    torch.testing.assert_close(out, ref["out"], atol=1e-5, rtol=0)
    bad = ConvertConfig(src=str(tmp_path / "a.pt"), preset="lsun_horse", dst=str(tmp_path / "x.pt"), tracking=off)
    with pytest.raises(ConfigError, match="preset.*do not fit"):
        run_convert(bad)
