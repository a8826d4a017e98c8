"""Unsupervised segmentation and joint generation: segmentation API, DDPM/DDIM generation with masks, the segment /
sample / evaluate jobs end to end on a tiny synthetic folder with tiny random-init models."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffseg.core.config import from_dict, load_config
from diffseg.core.runtime import image_generators
from diffseg.core.viz import colorize
from diffseg.data.datasets import DataConfig, write_synthetic_folder
from diffseg.evaluation.baselines import grabcut
from diffseg.evaluation.evaluate import EvalConfig, Scorer
from diffseg.methods.sampling import generate, sample
from diffseg.methods.segment import FactorizedSegmenter, segment_images
from diffseg.models.builder import ModelConfig
from diffseg.models.checkpoint import save_checkpoint
from diffseg.models.diffusion import DiffusionConfig, GaussianDiffusion
from diffseg.models.factorized import FactorizedConfig, FactorizedUNet
from diffseg.models.unet import UNet, UNetConfig
from diffseg.scoring.segmenter import segment_dataset

REPO = Path(__file__).resolve().parents[1]
SIZE = 16
UNET = UNetConfig(image_size=SIZE, model_channels=8, channel_mult=(1, 2), attention_resolutions=())


def tile(picture: np.ndarray, row: int, col: int, size: int, pad: int = 2) -> np.ndarray:
    """Tile (row, col) of a `viz.grid` picture of size x size tiles."""
    y, x = pad + row * (size + pad), pad + col * (size + pad)
    return picture[y : y + size, x : x + size]


def _factorized(k: int = 3, num_classes: int | None = None, seed: int = 0) -> FactorizedUNet:
    torch.manual_seed(seed)
    cfg = UNetConfig(**{**UNET.__dict__, "num_classes": num_classes})
    model = FactorizedUNet(cfg, FactorizedConfig(num_components=k)).eval()
    # Random (non-zero) output weights, so the K branches and eps are not trivially zero.
    torch.nn.init.normal_(model.out[-1].weight, std=0.05)
    return model


def _diffusion(T: int = 100) -> GaussianDiffusion:
    return GaussianDiffusion.from_config(DiffusionConfig(num_timesteps=T))


# ---------------------------------------------------------------------------------------------------- segmentation
def test_segment_shapes_sum_to_one_and_input_resolution():
    model, diffusion = _factorized(k=3), _diffusion()
    images = torch.rand(2, 3, 24, 20) * 2 - 1  # not the model's size, not square
    out = segment_images(model, diffusion, images, t=30, seed=0)
    assert out["masks"].shape == (2, 3, 24, 20)
    assert out["labels"].shape == (2, 24, 20) and out["labels"].dtype == torch.long
    torch.testing.assert_close(out["masks"].sum(1), torch.ones(2, 24, 20))
    assert (out["masks"] >= 0).all()
    assert torch.equal(out["labels"], out["masks"].argmax(1))
    # explicit output size; the same seed gives the same masks, another seed different ones
    small = segment_images(model, diffusion, images, t=30, seed=0, output_size=(SIZE, SIZE))
    assert small["masks"].shape == (2, 3, SIZE, SIZE)
    again = segment_images(model, diffusion, images, t=30, seed=0)
    torch.testing.assert_close(again["masks"], out["masks"])
    other = segment_images(model, diffusion, images, t=30, seed=1)
    assert not torch.allclose(other["masks"], out["masks"])
    with pytest.raises(ValueError, match="outside"):
        segment_images(model, diffusion, images, t=diffusion.num_timesteps)


def test_segment_per_image_generators_make_masks_batch_independent():
    model, diffusion = _factorized(k=2), _diffusion()
    images = torch.rand(4, 3, SIZE, SIZE) * 2 - 1
    whole = segment_images(model, diffusion, images, generator=image_generators(7, range(4)))["masks"]
    part = segment_images(model, diffusion, images[2:], generator=image_generators(7, [2, 3]))["masks"]
    torch.testing.assert_close(part, whole[2:])


def test_segment_class_conditional_needs_labels():
    model, diffusion = _factorized(k=2, num_classes=3), _diffusion()
    images = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    out = segment_images(model, diffusion, images, seed=0, y=torch.tensor([0, 2]))
    assert out["masks"].shape == (2, 2, SIZE, SIZE)
    with pytest.raises(ValueError, match="class-conditional"):
        segment_images(model, diffusion, images, seed=0)


def test_segment_batches_groups_sizes(tmp_path):
    root = write_synthetic_folder(tmp_path / "syn", 5, SIZE)
    from diffseg.data.datasets import PairedFolderDataset

    # image_size None keeps native sizes: make one image larger to force a size change mid-stream
    Image.open(root / "images" / "000002.png").resize((24, 24)).save(root / "images" / "000002.png")
    Image.open(root / "masks" / "000002.png").resize((24, 24), Image.NEAREST).save(root / "masks" / "000002.png")
    ds = PairedFolderDataset(root, image_size=None)
    model, diffusion = _factorized(k=3), _diffusion()
    batches = list(segment_dataset(FactorizedSegmenter(model, diffusion, t=10), ds, seed=0, batch_size=8))
    # the job over that folder: masks at each image's own size, the preview only of images of the first one's size
    from diffseg.methods.segment import SegmentJobConfig, run_segment_job

    ckpt = _save(model, tmp_path / "f.pt", "factorized")
    cfg = SegmentJobConfig(checkpoint=ckpt, data=DataConfig(name="folder", root=str(root), image_size=0),
                           output_dir=str(tmp_path / "out"), batch_size=8)  # fmt: skip
    assert run_segment_job(cfg)["images"] == 5
    assert np.asarray(Image.open(tmp_path / "out" / "segment" / "masks" / "000002.png")).shape == (24, 24)
    assert np.asarray(Image.open(tmp_path / "out" / "segment" / "masks" / "000003.png")).shape == (SIZE, SIZE)
    assert [idx for idx, _, _ in batches] == [[0, 1], [2], [3, 4]]
    assert batches[1][2].probs.shape == (1, 3, 24, 24) and batches[1][2].labels.shape == (1, 24, 24)
    # image 3 gets the same masks whether it is segmented alone or in its batch
    alone = segment_images(model, diffusion, ds[3]["image"][None], t=10, generator=image_generators(0, [3]))
    torch.testing.assert_close(alone["masks"][0], batches[2][2].probs[0])


# ---------------------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("method,steps", [("ddpm", None), ("ddpm", 10), ("ddim", 10)])
def test_generate_returns_aligned_images_and_masks(method, steps):
    model, diffusion = _factorized(k=3), _diffusion(T=50)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    res = generate(model, diffusion, 3, method=method, steps=steps, generator=gens, record_every=4)
    images, masks = res["images"], res["masks"]
    assert images.shape == (3, 3, SIZE, SIZE) and images.min() >= -1 and images.max() <= 1
    assert masks.shape == (3, 3, SIZE, SIZE)
    torch.testing.assert_close(masks.sum(1), torch.ones(3, SIZE, SIZE))
    assert torch.equal(res["labels"], masks.argmax(1))
    # the masks are those the model gives for the final image at the last step (t = 0): aligned with it
    x_t = res["trajectory"][-2]["sample"] if len(res["trajectory"]) > 1 else None
    n_steps = steps or diffusion.num_timesteps
    assert [r["step"] for r in res["trajectory"]][-1] == n_steps - 1
    assert res["trajectory"][-1]["t"] == 0 and res["trajectory"][0]["t"] > 0
    assert x_t is not None
    if method == "ddim":  # sample() agrees with generate() for the same generators
        imgs2, masks2 = sample(
            model,
            diffusion,
            3,
            method=method,
            steps=steps,
            generator=[torch.Generator().manual_seed(i) for i in range(3)],
        )
        torch.testing.assert_close(imgs2, images)
        torch.testing.assert_close(masks2, masks)


def test_generate_masks_match_a_forward_pass_on_the_last_input():
    """The returned masks are exactly the model's masks at the final denoising call (x_1 -> x_0, t = 0)."""
    model, diffusion = _factorized(k=2), _diffusion(T=100)
    res = generate(
        model, diffusion, 2, method="ddim", steps=5, generator=torch.Generator().manual_seed(0), record_every=1
    )
    x_last_input = res["trajectory"][-2]["sample"]  # the state the final step denoised
    t0 = torch.zeros(2, dtype=torch.long)
    process = diffusion.respace(5)
    _, masks, _ = model.forward_with_masks(x_last_input, process.model_timesteps(t0))
    torch.testing.assert_close(masks, res["masks"], atol=1e-5, rtol=1e-5)


def test_generate_class_conditional_and_plain_ddpm():
    model, diffusion = _factorized(k=2, num_classes=2), _diffusion(T=100)
    res = generate(model, diffusion, 2, method="ddim", steps=5, y=torch.tensor([0, 1]), generator=None)
    assert res["masks"].shape == (2, 2, SIZE, SIZE) and torch.equal(res["y"], torch.tensor([0, 1]))
    torch.manual_seed(0)
    ddpm = UNet(UNET).eval()
    res = generate(ddpm, diffusion, 2, method="ddpm", steps=None, generator=torch.Generator().manual_seed(0))
    assert res["images"].shape == (2, 3, SIZE, SIZE) and res["masks"] is None and res["labels"] is None


# ---------------------------------------------------------------------------------------------------- jobs
def _save(model, path: Path, kind: str, k: int = 3, T: int = 100) -> str:
    mcfg = ModelConfig(kind=kind, unet=model.cfg, factorized=FactorizedConfig(num_components=k))
    config = {"model": mcfg, "diffusion": DiffusionConfig(num_timesteps=T)}
    from diffseg.core.config import to_dict

    save_checkpoint(path, config=to_dict(config), model=model, ema=model, step=5)
    return str(path)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("unsup")
    root = write_synthetic_folder(tmp / "syn", 12, SIZE)
    fact = _save(_factorized(k=3), tmp / "fact.pt", "factorized")
    torch.manual_seed(1)
    ddpm = _save(UNet(UNET).eval(), tmp / "ddpm.pt", "ddpm")
    return {"tmp": tmp, "root": root, "factorized": fact, "ddpm": ddpm}


def _run_job(name: str, args: list[str]):
    sys.path.insert(0, str(REPO / "jobs"))
    try:
        mod = __import__(name)
    finally:
        sys.path.pop(0)
    return mod.main(args)


def test_segment_job_writes_masks_and_overlays(tiny_setup):
    out = tiny_setup["tmp"] / "seg"
    res = _run_job(
        "segment",
        [f"checkpoint={tiny_setup['factorized']}", f"data.root={tiny_setup['root']}", f"output_dir={out}",
         "name=run", "batch_size=5", "save_soft=true", "data.image_size=24"],
    )  # fmt: skip
    run = out / "run"
    assert res["images"] == 12 and res["K"] == 3
    masks = sorted((run / "masks").glob("*.png"))
    assert len(masks) == 12 and len(list((run / "overlays").glob("*.png"))) == 12
    m = np.asarray(Image.open(masks[0]))
    assert m.shape == (24, 24) and m.max() < 3  # at the input resolution, region indices
    soft = np.load(run / "soft" / f"{masks[0].stem}.npy")
    assert soft.shape == (3, 24, 24) and np.allclose(soft.astype(np.float32).sum(0), 1, atol=1e-2)
    assert (run / "config.yaml").is_file()
    # preview.png: per image, image | its mask (colourised) | overlay, 4 images a row, 2 px padding
    preview = np.asarray(Image.open(run / "preview.png"))
    assert preview.shape == (3 * (24 + 2) + 2, 12 * (24 + 2) + 2, 3)
    first = tile(preview, 0, 0, 24)
    ids = sorted(p.stem for p in (run / "masks").glob("*.png"))
    expected = np.asarray(Image.open(tiny_setup["root"] / "images" / f"{ids[0]}.png").resize((24, 24), Image.BICUBIC))
    assert np.abs(first.astype(int) - expected.astype(int)).max() <= 1  # the first image, as segmented
    np.testing.assert_array_equal(tile(preview, 0, 1, 24), colorize(np.asarray(Image.open(masks[0])), 3))


@pytest.mark.parametrize("method,steps", [("ddim", 5), ("ddpm", 0)])
def test_sample_job_writes_grid_strip_and_pairs(tiny_setup, method, steps):
    out = tiny_setup["tmp"] / "samples"
    res = _run_job(
        "sample",
        [f"checkpoint={tiny_setup['factorized']}", f"output_dir={out}", f"name={method}", f"method={method}",
         f"steps={steps}", "num_images=3", "batch_size=2", "record_every=0"],
    )  # fmt: skip
    run = out / method
    assert res["num_images"] == 3 and res["images"].shape == (3, 3, SIZE, SIZE)
    assert res["masks"].shape == (3, 3, SIZE, SIZE)
    assert res["steps"] == (steps or 100)
    assert len(list((run / "images").glob("*.png"))) == 3 and len(list((run / "masks").glob("*.png"))) == 3
    strip = np.asarray(Image.open(run / "strip.png"))
    columns = res["steps"] // res["record_every"]
    assert strip.shape[1] == columns * (SIZE + 2) + 2  # one column per recorded step
    assert strip.shape[0] == 2 * 3 * (SIZE + 2) + 2  # 2 images x (x_t, x_0, mask) rows
    # grid.png: a row per sample (3 samples: about square), image | argmax mask | overlay; the tiles are the very
    # images and masks written
    grid_png = np.asarray(Image.open(run / "grid.png"))
    assert grid_png.shape == (3 * (SIZE + 2) + 2, 3 * (SIZE + 2) + 2, 3)
    for i in range(3):
        np.testing.assert_array_equal(
            tile(grid_png, i, 0, SIZE), np.asarray(Image.open(run / "images" / f"{i:05d}.png"))
        )
        mask = np.asarray(Image.open(run / "masks" / f"{i:05d}.png"))
        np.testing.assert_array_equal(tile(grid_png, i, 1, SIZE), colorize(mask, 3))


def test_evaluate_job_end_to_end(tiny_setup):
    out = tiny_setup["tmp"] / "eval"
    cfg_path = tiny_setup["tmp"] / "eval.yaml"
    root = tiny_setup["root"]
    cfg_path.write_text(
        f"""
name: tiny
output_dir: {out}
methods: [all_foreground, centred_box, grabcut, kmeans_rgb, kmeans_ddpm, factorized, supervised]
datasets:
  - {{name: syn-fg, protocol: foreground, data: {{name: folder, root: {root}, image_size: {SIZE}, num_train: 8,
      num_test: 4}}, factorized: {tiny_setup["factorized"]}, ddpm: {tiny_setup["ddpm"]}}}
  - {{name: syn-mc, protocol: multiclass, data: {{name: folder, root: {root}, image_size: {SIZE}, num_train: 8,
      num_test: 4}}, factorized: {tiny_setup["factorized"]}, ddpm: {tiny_setup["ddpm"]}}}
kmeans: {{blocks: [dec.1, dec.3], timesteps: [10]}}
supervised: {{steps: 5, batch_size: 4, model_channels: 8}}
tracking: {{uri: "sqlite:///{tiny_setup["tmp"]}/mlflow.db", experiment: test}}
"""
    )
    res = _run_job("evaluate", ["--config", str(cfg_path)])
    run = out / "tiny"
    rows = list(csv.DictReader(open(run / "table.csv")))
    assert len(rows) == 14
    fg = {r["method"]: r for r in rows if r["dataset"] == "syn-fg"}
    # all-foreground under the polarity rule: per image the best of "all" and "none"; IoU is |gt| / |image|
    gt = np.stack([np.asarray(Image.open(root / "masks" / f"{i:06d}.png")) for i in range(8, 12)]) != 0
    assert float(fg["all_foreground"]["fg_iou"]) == pytest.approx(gt.reshape(4, -1).mean(1).mean(), abs=1e-5)
    for r in rows:
        key = "fg_iou" if r["dataset"] == "syn-fg" else ("miou" if r["method"] == "supervised" else "hungarian_miou")
        assert 0.0 <= float(r[key]) <= 1.0
    md = (run / "table.md").read_text()
    assert "| syn-fg | GrabCut |" in md and "mIoU" in md and "IoU (fixed fg)" in md
    assert "Image dep." in md  # the masks' image dependence (wt-15), a share in [0, 1]: priors are 0 by construction
    for r in rows:
        dep = float(r["dependence"])
        assert 0.0 <= dep <= 1.0 and (dep == 0.0 or r["method"] not in ("all_foreground", "centred_box")), r
    fig = np.asarray(Image.open(run / "figures" / "syn-fg.png"))
    assert fig.shape[1] == (2 + 7) * (SIZE + 2) + 2  # image | ground truth | 7 methods
    assert json.loads((run / "results.json").read_text())[0]["dataset"] == "syn-fg"
    import mlflow

    # one MLflow run holds the table; each (data set, method) is a nested run with the row's `test/...` metrics
    client = mlflow.MlflowClient(f"sqlite:///{tiny_setup['tmp']}/mlflow.db")
    parent = client.get_run(res["mlflow_run_id"])
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_name = {r.info.run_name: r for r in children}
    assert len(by_name) == 14
    assert by_name["syn-fg/factorized"].data.metrics["test/fg_iou"] == pytest.approx(
        float(fg["factorized"]["fg_iou"]), abs=1e-6
    )
    assert "test/hungarian_miou" in by_name["syn-mc/kmeans_rgb"].data.metrics
    # ... and the evaluation's own run shows the table's columns, one metric per (data set, method, column)
    assert parent.data.metrics["syn-fg/factorized/fg_iou"] == pytest.approx(float(fg["factorized"]["fg_iou"]), abs=1e-6)
    assert "syn-mc/supervised/miou" in parent.data.metrics and not any(k.count("/") > 2 for k in parent.data.metrics)
    assert "test/miou" in by_name["syn-mc/supervised"].data.metrics
    # issue 37.4/37.7: the evaluation's run and each method's run record the data set they scored
    assert {d.dataset.name for d in parent.inputs.dataset_inputs} == {root.name}
    assert [d.dataset.name for d in by_name["syn-fg/factorized"].inputs.dataset_inputs] == [root.name]


def test_an_interrupted_evaluation_keeps_its_scored_cells_and_the_same_config_finishes_it(tiny_setup, monkeypatch):
    """Ctrl-C during an evaluation (issue 37.3): the (data set, method) cells scored so far stay under cells/, the
    interrupt says how many and the command that goes on; the same config reuses them (scoring only the rest) and
    ends with the table a run without interruption writes; the cells go once the table is written. Another config
    does not reuse them."""
    import diffseg.evaluation.evaluate as evaluation

    out, root = tiny_setup["tmp"] / "eval-int", tiny_setup["root"]
    data = {"name": "folder", "root": str(root), "image_size": SIZE, "num_train": 8, "num_test": 4}
    spec = {"name": "syn-fg", "protocol": "foreground", "data": data}
    raw = {"name": "t", "output_dir": str(out), "methods": ["all_foreground", "centred_box", "kmeans_rgb"],
           "datasets": [spec], "tracking": {"enabled": False}, "num_figure_images": 4}  # fmt: skip
    cfg = from_dict(EvalConfig, raw)
    reference = evaluation.evaluate(from_dict(EvalConfig, {**raw, "name": "whole"}))["rows"]

    real, built = evaluation.build_segmenter, []

    def interrupted_at_the_third(method, *args):
        built.append(method)
        if len(built) == 3:
            raise KeyboardInterrupt
        return real(method, *args)

    monkeypatch.setattr(evaluation, "build_segmenter", interrupted_at_the_third)
    monkeypatch.setattr(sys, "argv", ["jobs/evaluate.py", "--config", "eval.yaml"])
    with pytest.raises(KeyboardInterrupt) as stopped:
        evaluation.evaluate(cfg)
    message = str(stopped.value)
    assert message.startswith("Ctrl-C during evaluation: 2 of 3 (data set, method) cells scored and kept in "), message
    assert message.endswith("the same command resumes it: python jobs/evaluate.py --config eval.yaml"), message
    assert not (out / "t" / "table.md").exists()

    def recorded(method, *args):
        built.append(method)
        return real(method, *args)

    def stopped_at_once(method, *args):
        built.append(method)
        raise KeyboardInterrupt

    built.clear()  # another config (another noise seed) under the same name reuses nothing
    monkeypatch.setattr(evaluation, "build_segmenter", stopped_at_once)
    with pytest.raises(KeyboardInterrupt):
        evaluation.evaluate(from_dict(EvalConfig, {**raw, "segment": {"seed": 1}}))
    assert built == ["all_foreground"]

    built.clear()  # the same config: only the third cell is scored; the table is a whole run's
    monkeypatch.setattr(evaluation, "build_segmenter", recorded)
    resumed = evaluation.evaluate(cfg)
    assert built == ["kmeans_rgb"]
    assert [r["metrics"] for r in resumed["rows"]] == [r["metrics"] for r in reference]

    def untimed(table: str) -> list[str]:  # the last column is each cell's wall time, which no two runs share
        return [line.rsplit("|", 2)[0] if line.startswith("|") else line for line in table.splitlines()]

    assert untimed((out / "t" / "table.md").read_text()) == untimed((out / "whole" / "table.md").read_text())
    assert (out / "t" / "figures" / "syn-fg.png").read_bytes() == (
        out / "whole" / "figures" / "syn-fg.png"
    ).read_bytes()
    assert not (out / "t" / "cells").exists()  # the table holds them now


def test_score_supervised_is_not_matched_and_regions_are():
    """A perfect but permuted region map scores 100 after Hungarian matching; as class labels it does not."""
    gt = np.array([[[0, 0, 1, 1], [0, 0, 2, 2]]])  # (1, 2, 4)
    perm = np.array([2, 0, 1])[gt]
    names = ["bg", "x", "y"]

    def score(kind: str) -> dict[str, float]:
        scorer = Scorer("multiclass", kind, 3, names)
        scorer.update(perm, gt)
        return scorer.compute()

    regions, classes = score("regions"), score("classes")
    assert regions["test/hungarian_miou"] == pytest.approx(1.0) and "test/miou" not in regions
    assert classes["test/miou"] == pytest.approx(0.0) and "test/hungarian_miou" not in classes
    # the foreground protocol: a class map counts any non-background class as foreground, with no polarity search
    fg = Scorer("foreground", "classes", 3, names)
    fg.update(np.zeros_like(gt), gt)  # all background: IoU 0 (a region map would flip it to "all foreground")
    assert fg.compute()["test/fg_iou"] == pytest.approx(0.0)
    reg = Scorer("foreground", "regions", 2, names)
    reg.update(np.zeros_like(gt), gt)
    assert reg.compute()["test/fg_iou"] == pytest.approx(0.5)  # polarity: the best of all / none


def test_grabcut_and_kmeans_on_ddpm_features_of_a_synthetic_image(tmp_path):
    from diffseg.data.datasets import synthetic_scene
    from diffseg.evaluation.baselines import kmeans_segment
    from diffseg.methods.features import extract, shared_noise

    image, mask = synthetic_scene(0, 0, 32)
    fg = grabcut(image, margin=0.1, iterations=3)
    assert fg.shape == (32, 32) and set(np.unique(fg)) <= {0, 1}
    torch.manual_seed(0)
    unet = UNet(UNetConfig(image_size=32, model_channels=8, channel_mult=(1, 2), attention_resolutions=())).eval()
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
    feats = extract(unet, _diffusion(), x, ["dec.1", "dec.3"], [5], shared_noise((3, 32, 32), 0))
    labels = kmeans_segment(feats[0], k=3, seed=0)
    assert labels.shape == (32, 32) and labels.max() <= 2


def test_eval_configs_resolve():
    for name in ("eval_horse.yaml", "eval_face3.yaml", "eval_flowers.yaml"):
        cfg = load_config(EvalConfig, REPO / "jobs" / "configs" / name)
        assert cfg.datasets and set(cfg.methods) >= {"grabcut", "kmeans_ddpm", "factorized"}
    face = load_config(EvalConfig, REPO / "jobs" / "configs" / "eval_face3.yaml")
    assert face.datasets[0].protocol == "multiclass" and face.datasets[0].data.class_merge == "face3"
    assert from_dict(DataConfig, {"name": "folder", "root": "x"}).root == "x"


def test_segment_job_on_an_empty_folder_exits_nonzero(tiny_setup, tmp_path):
    """`jobs/segment.py` over zero images is a failure with a message, not exit 0 and "0 images"."""
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "dataset.json").write_text(json.dumps({"classes": ["bg", "fg"], "ignore_index": 255}))
    out = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "segment.py"), f"checkpoint={tiny_setup['factorized']}",
         f"data.root={empty}", f"output_dir={tmp_path / 'out'}"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert out.returncode != 0
    assert f"{empty / 'images'} (0 images) is empty" in out.stderr, out.stderr[-2000:]
