"""Trust, round 2 (issue 29): each attack of the report, reproduced, and the refusal it now meets.

- a checkpoint or bundle without its integrity record (renamed `integritx`, or removed, with edited weights) is
  refused by every loader: jobs, Serve's build, pyfunc models, `init_from`, feature backbones; only a named opt-out
  loads it, and `jobs/convert_checkpoint.py ... allow_unverified=true` re-seals it once;
- feature shards carry their SHA-256 in the manifest: flipped bytes or a truncated shard are refused naming the shard
  and the set;
- `init_ray`'s token file is made 0600;
- no temp folder outlives a trial's bundle or a fetched source.

The sweep-state attacks (planted `experiment_state-*.json` / `searcher-state-*.pkl`) are in tests/test_sweep.py.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffseg.core.config import to_dict
from diffseg.core.runtime import ALLOW_UNVERIFIED_ENV
from diffseg.data.datasets import write_synthetic_folder
from diffseg.methods.features import FeatureConfig, load_backbone
from diffseg.methods.pixel import MLPEnsemble, PixelSegmenter
from diffseg.methods.segment import FactorizedSegmenter
from diffseg.models.builder import ModelConfig
from diffseg.models.checkpoint import load_checkpoint, load_diffusion_model, resolve_source, save_checkpoint
from diffseg.models.diffusion import DiffusionConfig
from diffseg.models.factorized import FactorizedConfig, FactorizedUNet
from diffseg.models.integrity import FORMAT, INTEGRITY_KEY, CheckpointError, read_payload
from diffseg.models.unet import UNetConfig

REPO = Path(__file__).resolve().parents[1]
UNET = UNetConfig(image_size=16, model_channels=8, channel_mult=(1, 2), attention_resolutions=())


@pytest.fixture(autouse=True)
def no_opt_out(monkeypatch):
    """Every test starts without the process-wide opt-out, and whatever a job sets is undone afterwards."""
    monkeypatch.delenv(ALLOW_UNVERIFIED_ENV, raising=False)
    yield
    os.environ.pop(ALLOW_UNVERIFIED_ENV, None)


def _factorized_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    model = FactorizedUNet(UNET, FactorizedConfig(num_components=2)).eval()
    mcfg = ModelConfig(kind="factorized", unet=UNET, factorized=FactorizedConfig(num_components=2))
    config = to_dict({"model": mcfg, "diffusion": DiffusionConfig(num_timesteps=100)})
    return save_checkpoint(path, config=config, model=model, ema=model, step=3)


def _unseal(path: Path, how: str) -> Path:
    """The attack of the report: the record's key renamed (`integritx`, one flipped bit) or the record removed, and
    one weight edited; torch itself loads the result without a word."""
    raw = torch.load(path, weights_only=True)
    record = raw.pop(INTEGRITY_KEY)
    if how == "renamed":
        raw["integritx"] = record
    name = next(k for k, v in raw["model"].items() if v.is_floating_point() and v.numel() > 4)
    raw["model"][name] = raw["model"][name].clone()
    raw["model"][name].view(-1)[0] += 1.0
    if raw.get("ema") is not None:
        raw["ema"] = raw["model"]
    torch.save(raw, path)
    return path


@pytest.mark.parametrize("how", ["renamed", "removed"])
def test_checkpoint_without_its_record_is_refused_by_every_loader(tmp_path, how):
    path = _unseal(_factorized_checkpoint(tmp_path / "checkpoint.pt"), how)
    assert torch.load(path, weights_only=True)["format"] == FORMAT  # the edited file is a well-formed payload
    loaders = {
        "load_checkpoint": lambda: load_checkpoint(path),
        "load_diffusion_model": lambda: load_diffusion_model(path, "cpu"),
        "FactorizedSegmenter": lambda: FactorizedSegmenter.load(str(path), "cpu"),
        "backbone": lambda: load_backbone(str(path), "cpu"),
        "random backbone": lambda: load_backbone(f"random:{path}", "cpu"),
        "run folder": lambda: load_checkpoint(tmp_path),
    }
    for what, load in loaders.items():
        with pytest.raises(CheckpointError, match="has no integrity record") as e:
            load()
        assert str(path) in str(e.value) and "allow_unverified=true" in str(e.value), (what, str(e.value))
    # the named opt-outs: the argument, or the process-wide switch every job's --allow-unverified sets
    assert load_checkpoint(path, allow_unverified=True).step == 3
    os.environ[ALLOW_UNVERIFIED_ENV] = "1"
    assert load_diffusion_model(path, "cpu").step == 3


def test_shipped_models_verify():
    """Nothing that loaded and verified before is refused: every model in models/ carries a matching record."""
    shipped = sorted((REPO / "models").glob("*.pt"))
    assert shipped
    for path in shipped:
        payload = read_payload(path, FORMAT)
        assert INTEGRITY_KEY in payload, path


def test_bundle_without_its_record_is_refused(tmp_path):
    seg = PixelSegmenter(MLPEnsemble(4, 2, members=2), FeatureConfig(backbone="rgb"), ["a", "b"], 16, {}, "cpu")
    path = seg.save(tmp_path / "segmenter.pt")
    assert PixelSegmenter.load(path).class_names == ["a", "b"]  # sealed: loads
    raw = torch.load(path, weights_only=True)
    del raw[INTEGRITY_KEY]
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match=rf"{path}: has no integrity record"):
        PixelSegmenter.load(path)
    assert PixelSegmenter.load(path, allow_unverified=True).class_names == ["a", "b"]


def test_segment_job_refuses_an_unsealed_checkpoint(tmp_path, capsys):
    """The report's case: `jobs/segment.py` on the edited file exited 0 and wrote masks; now it stops with one line
    naming the file (before the job starts, with the config's checks: status 2, no traceback), and writes nothing,
    unless the user says `--allow-unverified`."""
    path = _unseal(_factorized_checkpoint(tmp_path / "checkpoint.pt"), "renamed")
    root = write_synthetic_folder(tmp_path / "syn", 2, 16)
    sys.path.insert(0, str(REPO / "jobs"))
    try:
        import segment as segment_job
    finally:
        sys.path.pop(0)
    args = [f"checkpoint={path}", f"data.root={root}", f"output_dir={tmp_path / 'out'}", "name=run"]
    with pytest.raises(SystemExit) as stopped:
        segment_job.main(args)
    assert stopped.value.code == 2
    assert f"config error: checkpoint: {path}: has no integrity record" in capsys.readouterr().err
    assert not list((tmp_path / "out").rglob("*.png"))
    assert segment_job.main([*args, "--allow-unverified"])["images"] == 2


def test_init_from_an_unsealed_checkpoint_is_refused(tmp_path):
    from diffseg.core.config import replace
    from diffseg.training.config import TrainConfig
    from diffseg.training.loop import LocalContext, fit

    path = _unseal(_factorized_checkpoint(tmp_path / "init.pt"), "removed")
    cfg = replace(
        TrainConfig(), name="t", output_dir=str(tmp_path / "runs"), init_from=str(path),
        **{"model.kind": "factorized", "model.unet": UNET, "model.factorized.num_components": 2,
           "data.image_size": 16, "data.num_images": 4, "loop.num_steps": 1, "optim.batch_size": 2,
           "tracking.enabled": False},
    )  # fmt: skip
    with pytest.raises(CheckpointError, match=rf"{path}: has no integrity record"):
        fit(cfg, LocalContext(torch.device("cpu")))


def test_pyfunc_model_with_an_unsealed_checkpoint_is_refused(tmp_path):
    from diffseg.serving.pyfunc import PYFUNC_FORMAT, _load_pyfunc

    data = tmp_path / "data"
    data.mkdir()
    _unseal(_factorized_checkpoint(data / "checkpoint.pt"), "renamed")
    spec = {"format": PYFUNC_FORMAT, "kind": "factorized", "checkpoint": "checkpoint.pt", "t": 30}
    (data / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match="has no integrity record"):
        _load_pyfunc(str(data))


def test_serve_build_refuses_an_unsealed_or_damaged_file_once_naming_it(tmp_path):
    """Serve's build verifies every local model file before a replica starts, so a bad file fails the deploy with
    one message naming the key and the file (the replicas' retries used to bury it in their logs)."""
    from diffseg.serving.app_config import ServeAppConfig, verify_sources

    good = _factorized_checkpoint(tmp_path / "good.pt")
    verify_sources(ServeAppConfig(segmenter=str(good)))
    bad = _unseal(_factorized_checkpoint(tmp_path / "bad.pt"), "renamed")
    with pytest.raises(CheckpointError, match=rf"segmenter: {bad}: has no integrity record"):
        verify_sources(ServeAppConfig(segmenter=str(bad)))
    verify_sources(ServeAppConfig(segmenter=str(bad), allow_unverified=True))
    # a pixel bundle's backbone is checked as well
    seg = PixelSegmenter(MLPEnsemble(4, 2, members=2), FeatureConfig(backbone=str(bad)), ["a", "b"], 16, {}, "cpu")
    bundle = seg.save(tmp_path / "segmenter.pt")
    with pytest.raises(CheckpointError, match=rf"pixel: {bad}: has no integrity record"):
        verify_sources(ServeAppConfig(pixel=str(bundle), use_sampler=False))


def test_convert_reseals_an_old_file_once_after_saying_what_it_is(tmp_path, capsys):
    path = _factorized_checkpoint(tmp_path / "old.pt")
    raw = torch.load(path, weights_only=True)
    del raw[INTEGRITY_KEY]  # a file written before checksums existed
    torch.save(raw, path)
    sys.path.insert(0, str(REPO / "jobs"))
    try:
        import convert_checkpoint
    finally:
        sys.path.pop(0)
    common = ["tracking.enabled=false"]
    with pytest.raises(SystemExit):  # a user error: one line naming the file and the fix
        convert_checkpoint.main([f"src={path}", f"dst={tmp_path / 'new.pt'}", *common])
    assert "allow_unverified=true" in capsys.readouterr().err
    out = convert_checkpoint.main([f"src={path}", f"dst={tmp_path / 'new.pt'}", "allow_unverified=true", *common])
    printed = capsys.readouterr().out
    assert "has no integrity record" in printed and "step 3" in printed and "file SHA-256" in printed, printed
    assert out["max_abs_diff"] == 0.0
    sealed = load_checkpoint(tmp_path / "new.pt")  # verified, without any opt-out
    assert torch.equal(sealed.model[next(iter(sealed.model))], raw["model"][next(iter(raw["model"]))])
    # a pixel bundle is re-sealed the same way
    seg = PixelSegmenter(MLPEnsemble(4, 2, members=2), FeatureConfig(backbone="rgb"), ["a", "b"], 16, {}, "cpu")
    bundle = seg.save(tmp_path / "segmenter.pt")
    raw = torch.load(bundle, weights_only=True)
    del raw[INTEGRITY_KEY]
    torch.save(raw, bundle)
    with pytest.raises(SystemExit):
        convert_checkpoint.main([f"src={bundle}", f"dst={tmp_path / 'b2.pt'}", *common])
    assert "has no integrity record" in capsys.readouterr().err
    convert_checkpoint.main([f"src={bundle}", f"dst={tmp_path / 'b2.pt'}", "allow_unverified=true", *common])
    assert "pixel-segmenter bundle" in capsys.readouterr().out
    assert PixelSegmenter.load(tmp_path / "b2.pt").class_names == ["a", "b"]


# ---------------------------------------------------------------------------------------------------- temp files
def test_a_fetched_source_lands_in_the_callers_folder_or_is_removed(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    good = _factorized_checkpoint(tmp_path / "model.pt")
    uri = f"file://{good}"
    assert load_diffusion_model(uri, "cpu").step == 3
    assert not list((tmp_path / "tmp").glob("diffseg-*"))  # the fetched copy went with the load
    cache = tmp_path / "cache"
    local = resolve_source(uri, cache)
    assert local.parent == cache and local.is_file()
    np.testing.assert_equal(local.read_bytes() == good.read_bytes(), True)


# ---------------------------------------------------------------------------------------------------- Ray's token
def test_init_ray_makes_the_token_file_owner_only(tmp_path, monkeypatch):
    """`ray.init` writes ~/.ray/auth_token with a plain `open` (0644 under the usual umask): the token that lets its
    holder run code on the cluster was readable by every user of the machine. `init_ray` makes it 0600, whether it
    was there before or Ray has just written it."""
    import ray

    from diffseg.core import runtime

    monkeypatch.setenv("HOME", str(tmp_path))
    token = tmp_path / ".ray" / "auth_token"

    seen = []

    def fake_init(**kwargs):  # what Ray 2.60 does on a new local cluster (authentication_token_setup.py)
        if token.exists():
            seen.append(token.stat().st_mode & 0o777)
            return
        token.parent.mkdir(exist_ok=True)
        with open(token, "w") as f:
            f.write("secret")
        os.chmod(token, 0o644)  # whatever the umask of the test run: the mode of the report

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    runtime.init_ray()
    assert token.stat().st_mode & 0o777 == 0o600
    os.chmod(token, 0o640)  # there before, and wider: tightened before Ray reads it
    runtime.init_ray()
    assert seen == [0o600] and token.stat().st_mode & 0o777 == 0o600
    assert runtime.tighten_token_file() is False  # already owner-only: left alone
    token.unlink()
    assert runtime.tighten_token_file() is False  # no token: nothing to do


@pytest.mark.parametrize("where", ["folder", "uri"])
def test_a_trial_leaves_no_temp_folder(tmp_path, monkeypatch, where):
    """`trials.py` saved each pixel trial's bundle into a `mkdtemp` folder it never removed (43 of them after a
    sweep). Now a local trial saves into its own folder, and a trial on a bucket stages in a temp folder that goes
    with it, also when the scheduler stops the trial after its first report."""
    import tempfile

    from diffseg.data.datasets import DataConfig
    from diffseg.experiments.trials import PixelTrialConfig, TrialState, pixel_chunks

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    cfg = PixelTrialConfig(
        features=FeatureConfig(backbone="rgb"),
        data=DataConfig(image_size=16, num_images=6, num_train=3, num_test=2),
        pixel={"members": 2, "max_epochs": 1, "batch_size": 64},
    )
    trial = tmp_path / "trials" / "t1"
    trial_dir = str(trial) if where == "folder" else f"file://{trial}"
    common = {"device": torch.device("cpu"), "cache_root": str(tmp_path / "cache")}
    # (a trial validates on folds of the labelled images; its fold ensembles are kept between reports, then removed)
    reports = list(pixel_chunks(cfg, TrialState(), trial_dir, num_reports=2, folds=3, **common))
    assert len(reports) == 2 and (trial / "folds.json").is_file() and not (trial / "folds").exists()
    assert not list(scratch.glob("diffseg-*"))  # (torch keeps its own caches here)
    stopped = pixel_chunks(cfg, TrialState(), trial_dir + "-b", num_reports=3, folds=3, **common)
    next(stopped)
    stopped.close()  # what Tune does to a trial ASHA stops
    kept = tmp_path / "trials" / "t1-b" / "folds" / "fold-0.pt"
    assert not list(scratch.glob("diffseg-*")) and kept.is_file()


class _RunsCode:
    def __reduce__(self):
        return (print, ("code ran",))


@pytest.mark.parametrize("kind", ["empty", "truncated", "code", "not ours"])
def test_convert_refuses_a_bad_source_in_one_line(tmp_path, capsys, kind):
    """Issue 36.8: jobs/convert_checkpoint.py read its source with a bare torch.load before the checked reader: a
    truncated, empty or pickled file ended in a traceback with torch's advice to set weights_only=False."""
    import importlib.util

    src = tmp_path / "src.pt"
    if kind == "empty":
        src.write_bytes(b"")
    elif kind == "truncated":
        src.write_bytes((Path(__file__).resolve().parents[1] / "models" / "ddpm-horse32.pt").read_bytes()[:1000])
    elif kind == "code":
        torch.save({"x": _RunsCode()}, src)
    else:
        torch.save({"some": torch.zeros(2)}, src)
    spec = importlib.util.spec_from_file_location("convert_job", Path(__file__).resolve().parents[1] / "jobs" /
                                                  "convert_checkpoint.py")  # fmt: skip
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    with pytest.raises(SystemExit) as e:
        job.main([f"src={src}", f"dst={tmp_path / 'dst.pt'}", "tracking.enabled=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code in (1, 2) and len(err) == 1 and str(src) in err[0], err
    assert "Traceback" not in err[0] and "weights_only=False" not in err[0] and "code ran" not in err[0]
    assert not (tmp_path / "dst.pt").exists()


def test_a_safetensors_export_whose_config_changed_is_refused(tmp_path):
    """Issue 36.3: config.json of a safetensors export was covered by no hash: a schedule changed to cosine and the
    step to 999999 loaded silently. The weights file now records the SHA-256 of both config files."""
    import json

    from diffseg.models.checkpoint import CheckpointError, export_safetensors, load_checkpoint

    src = Path(__file__).resolve().parents[1] / "models" / "ddpm-horse32.pt"
    out = export_safetensors(src, tmp_path / "st")
    assert load_checkpoint(out).step == load_checkpoint(src).step  # as written: loads
    config = json.loads((out / "config.json").read_text())
    config["diffusion"]["schedule"], config["step"] = "cosine", 999999
    (out / "config.json").write_text(json.dumps(config, indent=1))
    with pytest.raises(CheckpointError, match="config.json: does not match the SHA-256"):
        load_checkpoint(out)
