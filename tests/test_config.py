"""Config machinery: frozen typed dataclasses, YAML + `a.b=value` overrides, errors naming the key, --dry-run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from diffseg.core.cli import parse_job_args
from diffseg.core.config import (
    ConfigError,
    config_hash,
    dumps,
    from_dict,
    job_dir,
    load_config,
    replace,
    resolve_paths,
    save_config,
    to_dict,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "jobs" / "configs"


@dataclass(frozen=True)
class Inner:
    width: int = 8  # an int
    mults: tuple[int, ...] = (1, 2)  # a variable-length tuple
    mode: Literal["a", "b"] = "a"  # a string mode
    rate: float = 0.5  # a float
    heads: int | None = None  # an optional int


@dataclass(frozen=True)
class Outer:
    name: str = "x"  # a string
    flag: bool = False  # a bool
    inner: Inner = field(default_factory=Inner)  # a nested section


def test_defaults_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: from-yaml\ninner: {width: 16, mults: [1, 2, 4]}\n")
    cfg = load_config(Outer, path, ["inner.width=32", "inner.rate=1e-4", "flag=true", "inner.heads=4"])
    assert cfg == Outer(name="from-yaml", flag=True, inner=Inner(width=32, mults=(1, 2, 4), rate=1e-4, heads=4))
    assert isinstance(cfg.inner.mults, tuple) and isinstance(cfg.inner.rate, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.name = "y"  # type: ignore[misc]
    # null clears an optional; an int is accepted where a float is expected
    assert load_config(Outer, path, ["inner.heads=null", "inner.rate=2"]).inner.heads is None
    assert load_config(Outer, path, ["inner.rate=2"]).inner.rate == 2.0


def test_base_composition(tmp_path):
    (tmp_path / "base.yaml").write_text("name: base\ninner: {width: 16, mode: b}\n")
    (tmp_path / "top.yaml").write_text("base: base.yaml\ninner: {width: 64}\n")
    cfg = load_config(Outer, tmp_path / "top.yaml")
    assert cfg.name == "base" and cfg.inner.width == 64 and cfg.inner.mode == "b"


@pytest.mark.parametrize(
    "override, key",
    [
        ("inner.widht=3", "inner.widht"),  # unknown key in a section
        ("nmae=3", "nmae"),  # unknown top-level key
        ("inner.width=abc", "inner.width"),  # wrong type
        ("inner.width=1.5", "inner.width"),  # a lossy float -> int
        ("inner.width=true", "inner.width"),  # a bool is not an int
        ("flag=1", "flag"),  # an int is not a bool
        ("inner.mode=c", "inner.mode"),  # not one of the Literal's values
        ("inner.mults=3", "inner.mults"),  # not a list
        ("inner.mults=[1,x]", "inner.mults[1]"),  # a bad item names its index
        ("inner=5", "inner"),  # a section given a scalar
        ("name.sub=1", "name"),  # a scalar used as a section
        ("inner.heads=2.5", "inner.heads"),  # matches no member of the Optional
    ],
)
def test_bad_overrides_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(Outer, None, [override])
    assert key in str(err.value)


def test_bad_yaml_keys_name_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("inner: {width: 8, depth: 3}\n")
    with pytest.raises(ConfigError, match=r"inner\.depth"):
        load_config(Outer, path)
    path.write_text("inner: {mults: one}\n")
    with pytest.raises(ConfigError, match=r"inner\.mults"):
        load_config(Outer, path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(Outer, None, ["inner.width"])


def test_round_trip_save_load(tmp_path):
    cfg = Outer(name="rt", flag=True, inner=Inner(width=3, mults=(1, 1, 2), mode="b", rate=3e-5, heads=2))
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(Outer, path) == cfg
    assert from_dict(Outer, yaml.safe_load(dumps(cfg))) == cfg
    assert config_hash(load_config(Outer, path)) == config_hash(cfg)
    assert config_hash(replace(cfg, **{"inner.width": 4})) != config_hash(cfg)
    assert not [p for p in path.parent.iterdir() if p.name != "config.yaml"]  # no temp file left behind


# Which job's config class reads a shipped YAML, by file-name prefix (the first match wins; the rest are training).
CONFIG_CLASSES = [
    ("eval_", "diffseg.evaluation.evaluate:EvalConfig"),
    ("ablation_", "diffseg.experiments.ablation:AblationConfig"),
    ("oracle_", "diffseg.experiments.oracle:OracleConfig"),
    ("segment", "diffseg.methods.segment:SegmentJobConfig"),
    ("sweep_", "diffseg.experiments.sweep:SweepConfig"),
    ("label_celeba_analysis", "diffseg.experiments.analysis:AnalysisConfig"),
    ("label_celeba_compare", "diffseg.experiments.label_efficient:CompareConfig"),
    ("label_celeba_dataset_ddpm", "diffseg.experiments.dataset_ddpm:DatasetDDPMConfig"),
    ("label_celeba_pixel", "diffseg.experiments.label_efficient:PixelJobConfig"),
    ("label_celeba_extract", "diffseg.methods.features:ExtractJobConfig"),
    ("label_celeba_robustness", "diffseg.experiments.robustness:RobustnessConfig"),
    ("label_celeba_gap_curve", "diffseg.experiments.label_efficient:GapCurveConfig"),
    ("label_celeba_count_curve", "diffseg.experiments.label_count:LabelCountConfig"),
    ("label_horse_count_curve", "diffseg.experiments.label_count:LabelCountConfig"),
    ("", "diffseg.training.ray_train:TrainConfig"),
]


def _config_class(name: str):
    import importlib

    target = next(t for prefix, t in CONFIG_CLASSES if name.startswith(prefix))
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_shipped_config_resolves_and_round_trips(name, tmp_path):
    cls = _config_class(name)
    cfg = load_config(cls, CONFIGS / name)
    assert load_config(cls, save_config(cfg, tmp_path / "c.yaml")) == cfg
    assert from_dict(cls, to_dict(cfg)) == cfg


def test_replace_with_dotted_keys_validates():
    cfg = replace(Outer(), **{"inner.width": 64, "name": "r"})
    assert cfg.inner.width == 64 and cfg.name == "r"
    with pytest.raises(ConfigError, match=r"inner\.nope"):
        replace(cfg, **{"inner.nope": 1})


def test_parse_job_args_errors_exit_with_the_key(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_job_args(Outer, ["inner.width=abc"])
    assert exit_.value.code == 2
    assert "inner.width" in capsys.readouterr().err


def _job(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "jobs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_prints_the_resolved_config_of_a_job(capsys):
    from diffseg.training.ray_train import TrainConfig

    with pytest.raises(SystemExit) as exit_:
        _job("train_ddpm").main(["--dry-run", "loop.num_steps=7", "optim.lr=3e-4"])
    assert exit_.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    cfg = from_dict(TrainConfig, printed)
    assert cfg.loop.num_steps == 7 and cfg.optim.lr == 3e-4
    expected = load_config(TrainConfig, CONFIGS / "ddpm_tiny.yaml", ["loop.num_steps=7", "optim.lr=3e-4"])
    assert cfg == resolve_paths(expected)  # locations printed as they will be used: absolute
    assert cfg.output_dir == str(Path.cwd() / expected.output_dir) and cfg.tracking.uri.startswith("sqlite:////")


@dataclass(frozen=True)
class Documented:
    plain: int = 1  # a trailing comment
    # a comment on the line above
    above: str = "a"
    # fmt: off
    inner: Inner = field(
        default_factory=lambda: Inner(width=3)
    )  # a section whose definition spans lines
    # fmt: on
    bare: float = 0.5


def test_field_comments_and_describe():
    from diffseg.core.cli import describe, field_comments

    assert field_comments(Documented) == {
        "plain": "a trailing comment",
        "above": "a comment on the line above",
        "inner": "a section whose definition spans lines",
    }
    rows = {key: (default, comment) for key, default, comment in describe(Documented)}
    assert rows["plain"] == ("1", "a trailing comment") and rows["bare"] == ("0.5", "")
    assert rows["inner"] == ("", "a section whose definition spans lines")  # a section heading
    assert rows["inner.width"] == ("3", "an int") and rows["inner.mults"] == ("[1, 2]", "a variable-length tuple")


def _job_config_class(module):
    """The config dataclass a job file parses (the one it imports)."""
    (cls,) = [v for k, v in vars(module).items() if k.endswith("Config") and dataclasses.is_dataclass(v)]
    return cls


# Every job but jobs/submit.py, which takes a job's command line rather than a config (tests/test_locations.py).
CONFIG_JOBS = sorted(p.stem for p in (REPO / "jobs").glob("*.py") if p.stem != "submit")


@pytest.mark.parametrize("name", CONFIG_JOBS)
def test_every_job_help_lists_every_key_with_default_and_comment(name, capsys):
    """`--help` of every job names each config key (dotted), its default and its comment."""
    from diffseg.core.cli import describe

    job = _job(name)
    with pytest.raises(SystemExit) as exit_:
        job.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    rows = describe(_job_config_class(job))
    assert len(rows) >= 5
    for key, default, comment in rows:
        line = next((ln for ln in out.splitlines() if ln.strip().startswith(key + (" =" if default else ":"))), None)
        assert line is not None, f"{name} --help does not list {key}"
        if default:
            assert default in line, (key, line)
        if comment:
            assert comment in line, (key, line)


def test_configs_share_blocks_through_base():
    """The 32 px U-Net block is written once (jobs/configs/base/tiny32.yaml); the tiny runs take it by `base:`."""
    from diffseg.training.ray_train import TrainConfig

    block = "channel_mult: [1, 2, 2]"
    holders = sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml") if block in p.read_text())
    assert holders == ["base/tiny32.yaml"]
    base = load_config(TrainConfig, CONFIGS / "base" / "tiny32.yaml")
    for name in ("ddpm_tiny.yaml", "factorized_tiny.yaml", "unsup_face_factorized.yaml", "label_celeba_ddpm.yaml"):
        cfg = load_config(TrainConfig, CONFIGS / name)
        assert cfg.model.unet.channel_mult == base.model.unet.channel_mult == (1, 2, 2)
        assert cfg.diffusion == base.diffusion and cfg.data.image_size == 32
    face = load_config(TrainConfig, CONFIGS / "unsup_face_factorized.yaml")  # two levels of base:
    assert (face.model.kind, face.model.unet.model_channels, face.model.factorized.num_components) == (
        "factorized",
        16,
        3,
    )
    assert face.data.class_merge == "face3" and face.data.root.endswith("celebamask-hq-800") and face.optim.lr == 3e-4


BAD_NAMES = ["../x", "../..", "..", ".", "a/b", "/abs", "a\\b", "", ".hidden", "-flag", "x" * 200, "a b", "é"]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_names_are_one_path_component(bad):
    """Run names become folders under output_dir: a name that could point elsewhere is refused, naming the key."""
    from diffseg.evaluation.evaluate import EvalConfig
    from diffseg.experiments.sweep import SweepConfig
    from diffseg.training.ray_train import TrainConfig

    with pytest.raises(ConfigError, match=r"^name: .* is not a valid name"):
        from_dict(TrainConfig, {"name": bad})
    with pytest.raises(ConfigError, match=r"^name: "):
        load_config(SweepConfig, None, [f"name={bad}"] if bad else ["name="])
    with pytest.raises(ConfigError, match=r"datasets\[0\]\.name: "):
        from_dict(EvalConfig, {"datasets": [{"name": bad}]})
    with pytest.raises(ConfigError):
        job_dir("runs", bad)


def test_good_names_and_direct_construction(tmp_path):
    from diffseg.training.config import run_dir, run_uri
    from diffseg.training.ray_train import TrainConfig

    for good in ("ddpm-tiny", "unsup-face-factorized-k3", "a_b.c", "k=3", "trial_0a1b2_00003", "x" * 128):
        assert from_dict(TrainConfig, {"name": good}).name == good
    assert job_dir(tmp_path, "r") == tmp_path / "r"
    bad = TrainConfig(name="../escape", output_dir=str(tmp_path / "runs"))  # built directly, not from YAML
    with pytest.raises(ConfigError, match="not a valid name"):
        run_dir(bad)
    with pytest.raises(ConfigError, match="not a valid name"):
        run_uri(dataclasses.replace(bad, output_dir="s3://bucket/runs"), "checkpoint.pt")


def test_job_command_line_refuses_a_path_as_name(tmp_path, capsys):
    """`name=../x` on a job's command line exits 2 before anything is written."""
    from diffseg.methods.segment import SegmentJobConfig

    with pytest.raises(SystemExit) as exit_:
        parse_job_args(SegmentJobConfig, [f"output_dir={tmp_path}", "name=../x", "checkpoint=c.pt"])
    assert exit_.value.code == 2
    assert "name: '../x' is not a valid name" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_key_says_which_one_was_meant(capsys):
    """Issue 37.2: "did you mean" for config keys, in the one line a job exits with."""
    from diffseg.training.ray_train import TrainConfig

    with pytest.raises(SystemExit) as exit_:
        parse_job_args(TrainConfig, ["loop.num_step=5"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "loop.num_step (did you mean loop.num_steps?)" in err, err
    with pytest.raises(SystemExit):
        parse_job_args(TrainConfig, ["optim.zzz=1"])
    assert "did you mean" not in capsys.readouterr().err  # nothing close: no guess
