"""The Ray-free half of serving: image decoding and limits, parameter checks, model wrappers, rendering."""

import asyncio
import importlib
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffseg.core.config import ConfigError, from_dict, to_dict
from diffseg.core.tracking import experiment_id, process_tracking_uri
from diffseg.models.builder import ModelConfig, build_model
from diffseg.models.checkpoint import resolve_source, save_checkpoint
from diffseg.models.factorized import FactorizedConfig
from diffseg.models.unet import UNetConfig
from diffseg.serving.app_config import Limits, ServeAppConfig
from diffseg.serving.ingress import PixelBudget, await_model
from diffseg.serving.requests import (
    RequestError,
    SampleParams,
    SegmentParams,
    decode_image,
    parse_sample_request,
    parse_segment_params,
    to_model_input,
)
from diffseg.serving.responses import (
    public_info,
    render_samples,
    render_segmentation,
    segment_labels,
    segmentation_stats,
    upsample_result,
)
from diffseg.serving.scheduler import SampleScheduler
from diffseg.serving.wrappers import DiffusionSampler, FactorizedSegmenter, PixelEnsembleSegmenter

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------- fixtures
def tiny_checkpoint(path, kind="factorized", num_classes=None, image_size=16, num_timesteps=100, seed=0):
    """A random-init model as a real checkpoint file (what training writes), small enough to serve in tests."""
    torch.manual_seed(seed)
    unet = UNetConfig(
        image_size=image_size,
        model_channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(),
        num_classes=num_classes,
    )
    cfg = ModelConfig(kind=kind, unet=unet, factorized=FactorizedConfig(num_components=3))
    model = build_model(cfg)
    config = {"model": to_dict(cfg), "diffusion": {"num_timesteps": num_timesteps}}
    return save_checkpoint(path, config=config, model=model, ema=model, step=5)


def tiny_pixel_bundle(folder, class_names=("background", "horse")):
    """A pixel-segmenter bundle (diffseg.methods.pixel) on a tiny random-init DDPM backbone: real DDPM features, an
    untrained 3-member ensemble. Returns its path."""
    from diffseg.methods.features import FeatureConfig, FeaturePipeline
    from diffseg.methods.pixel import MLPEnsemble, PixelSegmenter

    backbone = tiny_checkpoint(Path(folder) / "ddpm.pt", kind="ddpm")
    recipe = FeatureConfig(backbone=str(backbone), blocks=("dec.1", "dec.3"), timesteps=(5, 20), precision="fp32")
    dim = FeaturePipeline(recipe, "cpu").dim
    torch.manual_seed(0)
    ensemble = MLPEnsemble(dim, len(class_names), members=3)
    seg = PixelSegmenter(ensemble, recipe, list(class_names), image_size=16, extra={"step": 3}, device="cpu")
    return seg.save(Path(folder) / "pixel.pt")


def png_bytes(w=20, h=12, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    shape = (h, w, len(mode)) if mode in ("RGB", "RGBA") else (h, w)
    im = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(w=20, h=12):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def png_with_declared_size(w, h):
    """A PNG whose header declares w x h (valid CRC) but carries one tiny IDAT: a decompression bomb's header."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("serving") / "checkpoint.pt")


LIMITS = Limits(max_body_bytes=100_000, max_image_pixels=100 * 100, max_image_side=200)


# ---------------------------------------------------------------------------------------------------- decoding
def test_decode_png_jpeg_and_modes():
    assert decode_image(png_bytes(20, 12), LIMITS).size == (20, 12)
    assert decode_image(jpeg_bytes(20, 12), LIMITS).mode == "RGB"
    for mode in ("L", "RGBA", "P"):
        buf = io.BytesIO()
        Image.new(mode, (5, 7)).save(buf, format="PNG")
        im = decode_image(buf.getvalue(), LIMITS)
        assert im.mode == "RGB" and im.size == (5, 7)
    buf = io.BytesIO()  # 16-bit greyscale is rescaled, not clipped to white
    Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)).save(buf, format="PNG")
    assert 120 <= np.asarray(decode_image(buf.getvalue(), LIMITS))[0, 0, 0] <= 135


def _status(data, limits=LIMITS):
    with pytest.raises(RequestError) as e:
        decode_image(data, limits)
    assert e.value.field == "image" and e.value.message
    return e.value.status


def test_decode_rejects_bad_bytes():
    good = png_bytes(20, 12)
    assert _status(b"") == 400
    assert _status(b"not an image at all") == 415
    assert _status(b"GIF89a" + b"\0" * 20) == 415
    assert _status(good[: len(good) // 2]) == 400  # truncated
    assert _status(good[:8] + b"\0" * 40) == 400  # PNG magic, garbage header
    assert _status(jpeg_bytes()[:200]) == 400
    assert _status(png_with_declared_size(100_000, 100_000)) == 413  # refused from the header
    assert _status(png_with_declared_size(101, 100)) == 413  # just over the pixel cap
    assert _status(png_with_declared_size(300, 1)) == 413  # over the side cap
    assert _status(png_with_declared_size(50, 50)) == 400  # allowed size, but the data is short
    assert _status(good, Limits(formats=("JPEG",))) == 415
    assert _status(b"\x89PNG\r\n\x1a\n" + b"x" * 200_000) == 413  # over the byte cap


def test_pil_bomb_guard_is_behind_ours(monkeypatch):
    """Even with PIL's own limit lowered below ours, the answer is a 413, not an exception."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    assert _status(png_with_declared_size(90, 90), Limits()) == 413


def test_to_model_input():
    x = to_model_input(decode_image(png_bytes(40, 10), LIMITS), 16)
    assert x.shape == (3, 16, 16) and x.dtype == np.float32 and -1 <= x.min() and x.max() <= 1


# ---------------------------------------------------------------------------------------------------- parameters
INFO = {"factorized": {"num_timesteps": 100, "default_t": 30}}


def test_segment_params_defaults_and_ranges():
    p = parse_segment_params({}, LIMITS, INFO)
    assert p == SegmentParams("factorized", 30, 0, "json", False, 0.5)
    p = parse_segment_params({"t": "99", "seed": "7", "output": "overlay", "overlay": "true"}, LIMITS, INFO)
    assert (p.t, p.seed, p.output, p.overlay) == (99, 7, "overlay", True)
    bad = [
        {"t": "100"},  # >= T
        {"t": "-1"},
        {"t": "1.5"},
        {"t": "abc"},
        {"seed": "-3"},
        {"seed": str(2**40)},
        {"method": "pixel"},  # not served
        {"output": "gif"},
        {"overlay": "maybe"},
        {"alpha": "2"},
        {"alpha": "nan"},
        {"bogus": "1"},
    ]
    for query in bad:
        with pytest.raises(RequestError) as e:
            parse_segment_params(query, LIMITS, INFO)
        assert e.value.status == 422 and e.value.field, query
    with pytest.raises(RequestError, match="t=301"):  # capped by limits.max_t even when T is larger
        parse_segment_params({"t": "301"}, Limits(), {"factorized": {"num_timesteps": 1000}})


def test_sample_request_parsing():
    info = {"num_timesteps": 100, "num_classes": None}
    p = parse_sample_request(b'{"num_images": 3, "steps": 10, "seed": 4, "output": "grid"}', LIMITS, info)
    assert p == SampleParams(3, 10, 4, None, "grid")
    assert parse_sample_request(b"", LIMITS, info).num_images == 4
    bad = {
        b"[1, 2]": 422,
        b"{not json": 400,
        b"\xff\xfe": 400,
        b'{"num_images": 0}': 422,
        b'{"num_images": 17}': 422,
        b'{"num_images": "2"}': 422,
        b'{"num_images": 2.5}': 422,
        b'{"num_images": true}': 422,
        b'{"steps": 101}': 422,
        b'{"seed": -1}': 422,
        b'{"label": 1}': 422,  # unconditional model
        b'{"output": "bmp"}': 422,
        b'{"extra": 1}': 422,
        b"[" * 50_000 + b"]" * 50_000: 413,
        b"[" * 30_000 + b"]" * 30_000: 400,  # under the byte cap, over the parser's depth
    }
    for body, status in bad.items():
        with pytest.raises(RequestError) as e:
            parse_sample_request(body, LIMITS, info)
        assert e.value.status == status, body[:30]
    cond = {"num_timesteps": 100, "num_classes": 5}
    assert parse_sample_request(b'{"label": 4}', LIMITS, cond).label == 4
    assert (
        parse_sample_request(b'{"seed": 3}', LIMITS, cond).label
        == parse_sample_request(b'{"seed": 3}', LIMITS, cond).label
    )
    with pytest.raises(RequestError, match="label=5"):
        parse_sample_request(b'{"label": 5}', LIMITS, cond)


def test_app_config_from_yaml_args():
    cfg = from_dict(ServeAppConfig, {"segmenter": "x.pt", "batching": {"enabled": False}})
    assert cfg.sampler_source == "x.pt" and not cfg.batching.enabled
    with pytest.raises(ConfigError, match="nothing to serve"):
        from_dict(ServeAppConfig, {})
    with pytest.raises(ConfigError, match="unknown config key"):
        from_dict(ServeAppConfig, {"segmenter": "x.pt", "limits": {"max_bytes": 1}})


def test_serve_config_yaml_parses():
    """serve/config.yaml's args are a valid ServeAppConfig, and it binds to loopback."""
    import yaml

    doc = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    assert doc["http_options"]["host"] == "127.0.0.1"
    (app,) = doc["applications"]
    assert app["import_path"] == "serve.app:build_app"
    cfg = from_dict(ServeAppConfig, app["args"])
    assert cfg.batching.enabled and cfg.limits.formats == ("PNG", "JPEG")


# ---------------------------------------------------------------------------------------------------- models
def test_factorized_segmenter_batch_independent(ckpt):
    seg = FactorizedSegmenter.load(str(ckpt), device="cpu")
    info = seg.info()
    assert info["num_components"] == 3 and info["step"] == 5 and info["num_timesteps"] == 100
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (3, 3, 16, 16)).astype(np.float32)
    batch = seg.segment(x, [30, 30, 10], [1, 2, 3])  # two distinct t in one batch
    alone = seg.segment(x[1:2], [30], [2])
    p = batch[1]["probs"]
    assert p.shape == (3, 16, 16) and np.allclose(p.sum(0), 1, atol=1e-5)
    np.testing.assert_allclose(p, alone[0]["probs"], atol=1e-5)  # an answer does not depend on its batch
    assert not np.allclose(seg.segment(x[1:2], [30], [9])[0]["probs"], p)  # the seed matters


def test_factorized_segmenter_refuses_ddpm(tmp_path):
    from diffseg.core.config import UserError

    with pytest.raises(UserError, match="cannot segment: segmenting needs a factorized model"):  # one line in a job
        FactorizedSegmenter.load(str(tiny_checkpoint(tmp_path / "d.pt", kind="ddpm")), device="cpu")


def test_sampler_batch_independent_and_conditional(ckpt, tmp_path):
    sampler = DiffusionSampler.load(str(ckpt), device="cpu")
    reqs = [
        SampleParams(2, 4, 7, None, "json"),
        SampleParams(1, 3, 8, None, "json"),
        SampleParams(1, 4, 9, None, "json"),
    ]
    out = sampler.sample(reqs)
    assert out[0]["images"].shape == (2, 16, 16, 3) and out[0]["images"].dtype == np.uint8
    assert out[0]["labels"].shape == (2, 16, 16) and out[0]["labels"].max() < 3
    again = sampler.sample([reqs[0]])[0]
    np.testing.assert_array_equal(out[0]["images"], again["images"])
    ddpm = DiffusionSampler.load(str(tiny_checkpoint(tmp_path / "c.pt", kind="ddpm", num_classes=4)), device="cpu")
    assert ddpm.info()["num_classes"] == 4
    res = ddpm.sample([SampleParams(2, 3, 0, 1, "json"), SampleParams(1, 3, 0, 2, "json")])
    assert res[0]["labels"] is None and res[1]["images"].shape == (1, 16, 16, 3)


class FakeBundle:
    """Stands in for diffseg.methods.pixel.PixelSegmenter: the adapter needs only these three members."""

    class_names = ["background", "horse"]
    image_size = 16

    def predict(self, images):
        labels = (images[:, 0] > 0).long()  # (B, S, S)
        return labels, torch.full(labels.shape, 0.25)


def test_pixel_bundle_segments(tmp_path):
    seg = PixelEnsembleSegmenter.load(str(tiny_pixel_bundle(tmp_path)), device="cpu")
    info = seg.info()
    assert info["class_names"] == ["background", "horse"] and info["image_size"] == 16 and info["step"] == 3
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    out = seg.segment(x, [0, 0], [0, 0])
    assert out[0]["labels"].shape == (16, 16) and out[0]["labels"].max() < 2
    assert out[0]["uncertainty"].shape == (16, 16) and (out[0]["uncertainty"] >= -1e-6).all()
    np.testing.assert_array_equal(seg.segment(x[1:], [0], [0])[0]["labels"], out[1]["labels"])


def test_pixel_adapter_and_rendering():
    seg = PixelEnsembleSegmenter(FakeBundle(), source="fake", device=torch.device("cpu"))
    x = np.zeros((1, 3, 16, 16), np.float32)
    x[0, :, :, :8] = 1  # left half is "horse"
    (res,) = seg.segment(x, [0], [0])
    assert res["labels"].shape == (16, 16) and res["labels"][:, :8].all()
    info = seg.info()
    assert info["class_names"] == ["background", "horse"] and info["num_classes"] == 2
    image = Image.new("RGB", (32, 20))
    params = SegmentParams("pixel", 0, 0, "json", True, 0.5)
    media, body = render_segmentation(image, res, params, info)
    assert media == "application/json" and body["width"] == 32 and body["height"] == 20
    areas = {c["name"]: c["area_frac"] for c in body["classes"]}
    assert areas == {"background": 0.5, "horse": 0.5}
    assert body["uncertainty"]["mean"] == pytest.approx(0.25)
    mask = np.asarray(Image.open(io.BytesIO(__import__("base64").b64decode(body["mask_png"]))))
    assert mask.shape == (20, 32) and set(np.unique(mask)) == {0, 1}
    assert "overlay_png" in body
    for output in ("mask", "color", "overlay"):
        media, png = render_segmentation(image, res, SegmentParams("pixel", 0, 0, output, False, 0.5), info)
        assert media == "image/png" and Image.open(io.BytesIO(png)).size == (32, 20)
    json.dumps(body)  # JSON-serialisable as is


def test_upsample_soft_masks_and_stats():
    probs = np.zeros((3, 4, 4), np.float32)
    probs[0, :, :2], probs[2, :, 2:] = 1, 1
    labels, unc = upsample_result({"probs": probs}, (8, 8))
    assert labels.shape == (8, 8) and set(np.unique(labels)) == {0, 2}
    assert unc[:, :3].max() < 1e-3 and unc[:, 5:].max() < 1e-3  # one-hot masks: certain away from the border
    assert unc[:, 3:5].min() > 0.1  # bilinear upsampling mixes the two regions at the border
    _, unc_uniform = upsample_result({"probs": np.full((3, 2, 2), 1 / 3, np.float32)}, (2, 2))
    np.testing.assert_allclose(unc_uniform, 1, atol=1e-5)
    stats = segmentation_stats(labels, unc, ["a", "b", "c"])
    assert [c["area_px"] for c in stats["classes"]] == [32, 0, 32] and stats["present"] == [0, 2]
    assert stats["classes"][1]["mean_uncertainty"] is None


def test_render_samples_grid_and_json():
    res = {"images": np.zeros((2, 16, 16, 3), np.uint8), "labels": np.zeros((2, 16, 16), np.uint8)}
    info = {"num_components": 3, "kind": "factorized"}
    media, png = render_samples(res, SampleParams(2, 3, 0, None, "grid"), info)
    assert media == "image/png" and Image.open(io.BytesIO(png)).size[0] > 16 * 6
    media, body = render_samples(res, SampleParams(2, 3, 0, None, "json"), info)
    assert len(body["samples"]) == 2 and {"image_png", "mask_png", "color_png"} <= set(body["samples"][0])


def test_resolve_source_paths_and_mlflow_uri(ckpt, tmp_path):
    assert resolve_source(str(ckpt)) == ckpt
    with pytest.raises(FileNotFoundError, match="no such file"):
        resolve_source(str(tmp_path / "missing.pt"))
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with process_tracking_uri(uri):  # not mlflow.set_tracking_uri: it would pin this store for every later test
        exp = experiment_id(mlflow.MlflowClient(uri), uri, "serving")  # artifacts beside the store, not in ./mlruns
        with mlflow.start_run(experiment_id=exp) as run:
            mlflow.log_artifact(str(ckpt), "checkpoint")  # what training logs
        seg = FactorizedSegmenter.load(f"runs:/{run.info.run_id}/checkpoint", device="cpu")
    assert seg.info()["num_components"] == 3 and seg.info()["source"].startswith("runs:/")


# ---------------------------------------------------------------------------------------------------- job == Serve
def test_sample_job_and_serve_sampler_give_identical_images(ckpt, tmp_path):
    """The one seeding rule: the sampler Serve's replica runs returns, for a request seeded 7, bit for bit the images
    (and masks) `jobs/sample.py seed=7` writes first, in batches of another size."""
    from diffseg.methods.sampling import SampleJobConfig, run_sample_job

    cfg = SampleJobConfig(checkpoint=str(ckpt), output_dir=str(tmp_path), name="s", seed=7, steps=4, num_images=3,
                          batch_size=3, device="cpu")  # fmt: skip
    run_sample_job(cfg)
    sampler = DiffusionSampler.load(str(ckpt), device="cpu")
    other = SampleParams(1, 4, 8, None, "json")  # another request in the same batch
    served = sampler.sample([other, SampleParams(2, 4, 7, None, "json")])[1]
    for i in range(2):
        job_image = np.asarray(Image.open(tmp_path / "s" / "images" / f"{i:05d}.png"))
        np.testing.assert_array_equal(served["images"][i], job_image)
        np.testing.assert_array_equal(
            served["labels"][i], np.asarray(Image.open(tmp_path / "s" / "masks" / f"{i:05d}.png"))
        )
    assert not np.array_equal(sampler.sample([other])[0]["images"][0], served["images"][0])  # the seed matters


def test_segment_job_and_serve_segmenter_give_identical_masks(ckpt, tmp_path):
    """The one resize policy and seeding rule: an upload to /v1/segment?t=20&seed=3 gets, pixel for pixel, the mask
    `jobs/segment.py t=20 seed=3` writes for the first image of a folder (non-square, not the model's size)."""
    from diffseg.data.datasets import DataConfig
    from diffseg.methods.segment import SegmentJobConfig, run_segment_job

    folder = tmp_path / "upload"
    (folder / "images").mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps({"name": "upload", "classes": ["region"], "ignore_index": 255}))
    uploads = {"a": png_bytes(40, 24, seed=5), "b": png_bytes(40, 24, seed=6)}  # one size: one batch in the job
    for name, data in uploads.items():
        (folder / "images" / f"{name}.png").write_bytes(data)
    data = DataConfig(name="folder", root=str(folder), image_size=0)  # native size: the job resizes like Serve
    run_segment_job(SegmentJobConfig(checkpoint=str(ckpt), data=data, output_dir=str(tmp_path), name="g", t=20, seed=3,
                                     device="cpu"))  # fmt: skip
    job_mask = np.asarray(Image.open(tmp_path / "g" / "masks" / "a.png"))

    # Serve's path, as the ingress and the model replica run it
    seg = FactorizedSegmenter.load(str(ckpt), device="cpu")
    info = seg.info()
    image = decode_image(uploads["a"], LIMITS)
    params = parse_segment_params({"t": "20", "seed": "3", "output": "mask"}, LIMITS, {"factorized": info})
    (result,) = seg.segment(to_model_input(image, int(info["image_size"]))[None], [params.t], [params.seed])
    media, png = render_segmentation(image, result, params, info)
    served_mask = np.asarray(Image.open(io.BytesIO(png)))
    assert media == "image/png" and served_mask.shape == job_mask.shape == (24, 40)
    np.testing.assert_array_equal(served_mask, job_mask)
    assert len(np.unique(job_mask)) > 1  # a real segmentation, not a constant map that would match trivially


# ---------------------------------------------------------------------------------------------------- hostile input
def test_giant_integers_and_lone_surrogates_get_4xx():
    """Numbers and strings are checked before any conversion that could raise: 4xx with a JSON-safe message."""
    info = {"num_timesteps": 100, "num_classes": None}
    cases = {
        b'{"num_images": 1' + b"0" * 5000 + b"}": 422,  # over Python's int-string limit: int() would raise
        b'{"seed": -' + b"9" * 30 + b"}": 422,
        b'{"steps": 1e999999}': 422,  # inf
        b'{"seed": NaN}': 422,
        b'{"\\ud800": 1}': 400,  # a key that is a lone surrogate
        b'{"output": "\\udfff"}': 400,
        b'{"output": "\\ud83d\\ude00"}': 422,  # a valid surrogate pair (an emoji) is just a wrong value
    }
    for body, status in cases.items():
        with pytest.raises(RequestError) as e:
            parse_sample_request(body, LIMITS, info)
        assert e.value.status == status, body[:40]
        encoded = json.dumps(e.value.to_json(), ensure_ascii=False).encode("utf-8")  # what Starlette sends
        assert len(encoded) < 2000
    for raw in ("1" * 5000, "9" * 19, "-" + "1" * 300):
        with pytest.raises(RequestError, match="must be an integer") as e:
            parse_segment_params({"t": raw}, LIMITS, INFO)
        assert e.value.status == 422 and len(e.value.message) < 300
    with pytest.raises(RequestError) as e:
        parse_segment_params({"\udcff": "1"}, LIMITS, INFO)
    json.dumps(e.value.to_json(), ensure_ascii=False).encode("utf-8")  # the unknown key is quoted safely
    err = RequestError(422, "bad \ud800 value", "\udfff")
    assert json.dumps(err.to_json(), ensure_ascii=False).encode("utf-8")
    assert pickle.loads(pickle.dumps(err)).to_json() == err.to_json()  # crosses Ray's process boundary intact


def test_sample_cost_is_bounded_per_request():
    info = {"num_timesteps": 1000, "num_classes": None}
    limits = Limits(max_num_images=16, max_steps=250, max_sample_cost=1000, max_inflight_cost=2000)
    assert parse_sample_request(b'{"num_images": 4, "steps": 250}', limits, info).cost == 1000
    with pytest.raises(RequestError, match=r"16 x 250 = 4000 image-steps; the limit per request is 1000") as e:
        parse_sample_request(b'{"num_images": 16, "steps": 250}', limits, info)
    assert e.value.status == 422
    with pytest.raises(ConfigError, match="max_sample_cost <= max_inflight_cost"):
        from_dict(ServeAppConfig, {"segmenter": "x.pt", "limits": {"max_sample_cost": 10, "max_inflight_cost": 5}})
    with pytest.raises(ConfigError, match="max_inflight_pixels must be >= max_image_pixels"):
        from_dict(ServeAppConfig, {"segmenter": "x.pt", "limits": {"max_inflight_pixels": 10}})


def test_info_hides_paths_and_pids_unless_exposed():
    info = {"kind": "factorized", "source": "/runs/x/checkpoint.pt", "pid": 42, "device": "cuda:0", "step": 3,
            "image_size": 16, "class_names": ["a"], "extra": {"train_shards": "/data/shards"}}  # fmt: skip
    public = public_info(info, expose=False)
    assert set(public) == {"kind", "step", "image_size", "class_names"}
    assert public_info(info, expose=True) == info
    res = {"probs": np.ones((1, 4, 4), np.float32)}
    _, body = render_segmentation(Image.new("RGB", (4, 4)), res, SegmentParams("factorized", 3, 0, "json", 0, 0.5),
                                  public)  # fmt: skip
    assert body["model"] == {"kind": "factorized", "step": 3, "image_size": 16}
    assert not ServeAppConfig(segmenter="x.pt").expose_internals  # closed by default


def test_banded_rendering_equals_full_size_upsampling(monkeypatch):
    """The band-wise path (bounded memory) gives exactly the labels and stats of upsampling whole."""
    import diffseg.serving.responses as responses

    rng = np.random.default_rng(0)
    for c, s, h, w, band in [(3, 16, 37, 301, 500), (2, 32, 300, 7, 64), (5, 16, 16, 16, 50), (3, 8, 200, 90, 1)]:
        monkeypatch.setattr(responses, "BAND_PIXELS", band)
        names = [str(i) for i in range(c)]
        probs = rng.random((c, s, s)).astype(np.float32) ** 3
        ref_labels, ref_unc = upsample_result({"probs": probs}, (h, w))
        labels, stats = segment_labels({"probs": probs}, (h, w), names)
        np.testing.assert_array_equal(labels, ref_labels)
        ref_stats = segmentation_stats(ref_labels, ref_unc, names)
        assert [x["area_px"] for x in stats["classes"]] == [x["area_px"] for x in ref_stats["classes"]]
        assert stats["uncertainty"]["mean"] == pytest.approx(ref_stats["uncertainty"]["mean"], abs=2e-6)
        hard = {"labels": rng.integers(0, c, (s, s)), "uncertainty": rng.random((s, s)).astype(np.float32)}
        ref_labels, _ = upsample_result(hard, (h, w))
        np.testing.assert_array_equal(segment_labels(hard, (h, w), names)[0], ref_labels)


def test_concurrent_max_size_decodes_stay_under_the_memory_bound():
    """Six concurrent uploads of a few-KB PNG that declares the maximum size (2048 x 2048 here), each decoded,
    segmented and rendered as JSON + overlay at full size: the ingress never holds more than its pixel budget (two
    maximum-size images), and its peak RSS grows by at most 24 bytes per pixel per budget slot + 96 MB (measured in a
    fresh process by bench/serve_bounds.py; the issue saw 0.9 GB per 16 Mpx upload and 5.5 GB for six)."""
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "serve_bounds.py"), "memory", "--side", "2048", "--n", "6",
         "--slots", "2"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["file_bytes"] < 20_000 and m["max_images_at_once"] == 2 and m["peak_pixels"] == 2 * 2048 * 2048
    assert m["peak_rss_growth"] <= m["bound"], m


# ---------------------------------------------------------------------------------------------------- budgets
class StubSteps:
    """A sampler whose every denoising step sleeps `delay` seconds per image: the scheduler's timing is then known
    exactly (t(n) = n * delay), whatever the machine. Records which runs were closed early."""

    def __init__(self, delay: float):
        self.delay, self.closed = delay, []

    def __call__(self, params: list[SampleParams]):
        n = sum(p.num_images for p in params)

        def steps():
            done = 0
            try:
                for _ in range(params[0].steps):
                    time.sleep(self.delay * n)
                    done += 1
                    yield n
            finally:
                if done < params[0].steps:
                    self.closed.append((n, done))
            return [{"images": p.num_images, "seed": p.seed} for p in params]

        return steps()


def _wait_until(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def test_small_sample_request_is_not_stuck_behind_a_large_one_and_cancel_stops_work():
    """A 1-image x 20-step request submitted while a 16 x 250 one runs: the large run gets at most ceil(20/16) + 2
    of its steps before the small one is answered (the stated bound: latency <= S*t(1) + (S/16 + 2)*t(16)), instead
    of all its remaining ~247 steps. Cancelling the large request stops its steps within the one in progress."""
    delay, s = 0.002, 20
    stub = StubSteps(delay)
    sched = SampleScheduler(stub, max_inflight_cost=8000, max_batch_images=16)
    sched.trace = []
    try:
        big = sched.submit(SampleParams(16, 250, 0, None, "json"))
        _wait_until(lambda: sched.counts["steps"] >= 3)
        mark = len(sched.trace)
        t0 = time.perf_counter()
        small = sched.submit(SampleParams(1, s, 1, None, "json"))
        assert small.future.result(timeout=60) == {"images": 1, "seed": 1}
        latency = time.perf_counter() - t0
        big_steps = sum(1 for seq, _ in sched.trace[mark:] if seq == 1)
        assert big_steps <= -(-s // 16) + 2, sched.trace[mark:]
        assert sum(1 for seq, _ in sched.trace[mark:] if seq == 2) == s
        bound = s * delay + (-(-s // 16) + 2) * 16 * delay  # 0.168 s with this stub
        assert latency < 4 * bound + 1.0  # loose: a loaded CI box stretches sleeps; FIFO would be ~7.9 s
        assert not big.future.done()  # the large request is still running: the small one did not wait for it

        before = sched.counts["steps"]
        sched.cancel(big)
        assert big.future.cancelled()
        _wait_until(lambda: stub.closed)  # the run's generator was closed ...
        time.sleep(10 * 16 * delay)
        assert sched.counts["steps"] - before <= 1  # ... after at most the step that was in progress
        assert stub.closed[0][0] == 16 and stub.closed[0][1] < 250
        stats = sched.stats()
        assert stats["inflight_cost"] == 0 and stats["cancelled"] == 1 and stats["active_runs"] == 0
    finally:
        sched.close()


def test_two_maximal_sample_requests_leave_room_for_small_ones():
    """Issue 36.7: two allowed 16 x 250 requests filled the replica's budget and 13 of 13 small requests got 503 for
    the seconds they ran. The small requests' reserve serves them (fairly, between the large runs' steps); a third
    large request, and small ones beyond the reserve, are still refused; the reserve's cost comes back."""
    from diffseg.serving.app_config import Limits

    lim = Limits()
    sched = SampleScheduler(StubSteps(0.0005), max_inflight_cost=lim.max_inflight_cost, max_batch_images=16,
                            reserved_cost=lim.reserved_sample_cost, small_cost=lim.small_sample_cost)  # fmt: skip
    try:
        bigs = [sched.submit(SampleParams(16, 250, i, None, "json")) for i in range(2)]
        with pytest.raises(RequestError) as e:
            sched.submit(SampleParams(16, 250, 9, None, "json"))
        assert e.value.status == 503 and "reserve" in str(e.value)
        smalls = [sched.submit(SampleParams(1, 1, 100 + i, None, "json")) for i in range(13)]
        assert [r.future.result(timeout=60)["seed"] for r in smalls] == list(range(100, 113))
        assert not all(b.future.done() for b in bigs)  # served while the large runs were still running
        with pytest.raises(RequestError):  # a request over `small_cost` may not use the reserve
            sched.submit(SampleParams(2, 250, 7, None, "json"))
        for b in bigs:
            sched.cancel(b)
        _wait_until(lambda: sched.stats()["inflight_cost"] == 0 and sched.stats()["reserved_inflight_cost"] == 0)
    finally:
        sched.close()


def test_sampler_admission_by_cost():
    sched = SampleScheduler(StubSteps(0.001), max_inflight_cost=4000, max_batch_images=16)
    try:
        big = sched.submit(SampleParams(16, 250, 0, None, "json"))
        with pytest.raises(RequestError, match=r"busy: 4000 image-steps in flight, this request needs 2") as e:
            sched.submit(SampleParams(1, 2, 0, None, "json"))
        assert e.value.status == 503 and sched.stats()["rejected"] == 1
        sched.cancel(big)
        _wait_until(lambda: sched.stats()["inflight_cost"] == 0)
        assert sched.submit(SampleParams(1, 2, 0, None, "json")).future.result(timeout=30)["images"] == 1
    finally:
        sched.close()


def test_scheduler_batches_requests_that_arrive_together(ckpt):
    """Requests with the same step count that arrive together share a run, and each answer equals the same request
    sampled alone (per-image generators)."""
    sampler = DiffusionSampler.load(str(ckpt), device="cpu")
    reqs = [
        SampleParams(2, 4, 7, None, "json"),
        SampleParams(1, 4, 9, None, "json"),
        SampleParams(1, 3, 8, None, "json"),
    ]
    sched = SampleScheduler(sampler.sample_steps, max_inflight_cost=100, max_batch_images=16, batch_wait_s=0.3)
    try:
        pending = [sched.submit(p) for p in reqs]
        got = [p.future.result(timeout=120) for p in pending]
        assert sched.counts["runs"] == 2 and sched.counts["steps"] == 4 + 3
    finally:
        sched.close()
    for g, alone in zip(got, (sampler.sample([r])[0] for r in reqs)):
        np.testing.assert_array_equal(g["images"], alone["images"])
        np.testing.assert_array_equal(g["labels"], alone["labels"])


class FakeResponse:
    """Stands in for a Serve DeploymentResponse: awaitable, and records cancel()."""

    def __init__(self, seconds: float = 10.0):
        self.seconds, self.cancelled = seconds, False

    def __await__(self):
        return asyncio.sleep(self.seconds, result="late").__await__()

    def cancel(self):
        self.cancelled = True


def test_await_model_cancels_the_model_call_on_timeout_and_disconnect():
    async def main():
        r = FakeResponse()
        with pytest.raises(RequestError, match="did not answer within 0.05 s; the request was cancelled") as e:
            await await_model(r, 0.05)
        assert e.value.status == 504 and r.cancelled
        r = FakeResponse()  # the client goes away: Serve cancels the ingress's handler
        task = asyncio.ensure_future(await_model(r, 10))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert r.cancelled

        class RayWrapped(Exception):  # how Ray hands back a replica's exception: the original is `cause`
            cause = RequestError(503, "the sampler is busy")

        async def failing():
            raise RayWrapped()

        with pytest.raises(RequestError, match="busy") as e:
            await await_model(failing(), 1)
        assert e.value.status == 503
        assert await await_model(FakeResponse(0.01), 1) == "late"

    asyncio.run(main())


def test_replica_cancels_the_scheduled_work_when_its_call_is_cancelled():
    """The sampler deployment's own `sample` (serve/app.py, called as a plain coroutine): the ingress's timeout
    cancels the call, and the replica drops the request from its scheduler, which stops the run."""
    sys.path.insert(0, str(REPO))
    try:
        app = importlib.import_module("serve.app")
    finally:
        sys.path.remove(str(REPO))
    replica = app.SamplerModel.func_or_class.__new__(app.SamplerModel.func_or_class)
    stub = StubSteps(0.002)
    replica.counts = {"requests": 0}
    replica.scheduler = SampleScheduler(stub, max_inflight_cost=8000, max_batch_images=16)

    async def main():
        call = asyncio.ensure_future(replica.sample(SampleParams(16, 250, 0, None, "json")))
        with pytest.raises(RequestError) as e:
            await await_model(call, 0.3)  # Task.cancel() plays DeploymentResponse.cancel()
        assert e.value.status == 504
        await asyncio.sleep(0.05)

    try:
        asyncio.run(main())
        _wait_until(lambda: stub.closed)
        assert replica.scheduler.stats()["cancelled"] == 1 and replica.scheduler.stats()["inflight_cost"] == 0
        assert stub.closed[0][1] < 250
    finally:
        replica.scheduler.close()


def test_pixel_budget_bounds_and_first_fit():
    async def main():
        budget = PixelBudget(10)
        log = []

        async def upload(name, pixels, hold):
            async with budget.reserve(pixels):
                log.append((name, budget.used))
                await asyncio.sleep(hold)

        await asyncio.gather(upload("a", 6, 0.2), upload("b", 6, 0.05), upload("c", 4, 0.05))
        assert budget.peak <= 10 and budget.used == 0
        assert [n for n, _ in log] == ["a", "c", "b"]  # c fits beside a at once; b waits for room
        with pytest.raises(RequestError) as e:
            async with budget.reserve(11):
                pass
        assert e.value.status == 413

    asyncio.run(main())
