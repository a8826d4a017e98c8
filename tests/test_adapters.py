"""Public-layout adapters: tiny fake downloads of every layout -> paired folders that PairedFolderDataset reads."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from diffseg.core.config import load_config, resolve_paths
from diffseg.data.adapters import CELEBAMASK_CLASSES, PrepareConfig, convert
from diffseg.data.datasets import DataError, PairedFolderDataset

REPO = Path(__file__).resolve().parents[1]


def rect_mask(h: int, w: int, box: tuple[int, int, int, int], value: int = 1) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    y0, x0, y1, x1 = box
    mask[y0:y1, x0:x1] = value
    return mask


def photo(h: int, w: int, seed: int) -> np.ndarray:
    """A noisy image whose colours stay far from pure blue (Flowers 102's background colour)."""
    rng = np.random.default_rng(seed)
    return rng.integers(80, 230, (h, w, 3), dtype=np.uint8)


def save(arr: np.ndarray, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kwargs)
    return path


def load_all(root: Path, **kwargs) -> tuple[PairedFolderDataset, dict[str, np.ndarray]]:
    """Every item through the paired-folder reader (which checks sizes, class range and readability)."""
    ds = PairedFolderDataset(root, require_masks=True, **kwargs)
    masks = {}
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape[1:] == item["mask"].shape
        masks[item["id"]] = item["mask"].numpy()
    return ds, masks


def run_convert(layout: str, src: Path, dst: Path, **kwargs) -> Path:
    return convert(PrepareConfig(layout=layout, src=str(src), dst=str(dst), **kwargs), log=None)


# ---------------------------------------------------------------------------------------------------- CelebAMask-HQ
def celebamask_layout(root: Path) -> dict[int, np.ndarray]:
    """Images at 32 px, part masks at 16 px (as the real 1024 / 512); returns the expected class masks."""
    parts = {
        0: {"skin": (2, 2, 14, 14), "nose": (6, 6, 9, 9), "hair": (0, 0, 5, 16)},  # hair overlaps skin: hair wins
        1: {"skin": (4, 4, 12, 12), "l_eye": (5, 5, 7, 7), "cloth": (13, 0, 16, 16)},
        2001: {"skin": (3, 3, 13, 13), "hat": (0, 0, 4, 16)},  # in annotation folder 1
    }
    expected = {}
    for n, regions in parts.items():
        save(photo(32, 32, n), root / "CelebA-HQ-img" / f"{n}.jpg", quality=95)
        mask = np.zeros((16, 16), np.uint8)
        for part in ["skin", "l_eye", "nose", "cloth", "hair", "hat"]:  # the order g_mask.py paints in
            if part in regions:
                part_mask = rect_mask(16, 16, regions[part], 255)
                # the real files are 3-channel PNGs for some parts: both must work
                arr = np.repeat(part_mask[..., None], 3, 2) if part == "skin" else part_mask
                save(arr, root / "CelebAMask-HQ-mask-anno" / str(n // 2000) / f"{n:05d}_{part}.png")
                mask[part_mask > 0] = CELEBAMASK_CLASSES.index(part)
        expected[n] = mask
    return expected


def test_celebamask_hq(tmp_path):
    expected = celebamask_layout(tmp_path / "src")
    dst = run_convert("celebamask-hq", tmp_path / "src", tmp_path / "out")
    meta = json.loads((dst / "dataset.json").read_text())
    assert meta["classes"] == CELEBAMASK_CLASSES and meta["ignore_index"] == 255
    ds, masks = load_all(dst)
    assert ds.ids == ["0", "1", "2001"]
    for n, mask in expected.items():
        assert np.array_equal(masks[str(n)], mask), n
    assert Image.open(dst / "images" / "0.jpg").size == (16, 16)  # the image is brought to the mask's size
    assert (masks["0"][0:5] == CELEBAMASK_CLASSES.index("hair")).all()
    # the 3-class protocol is a read-time merge by class name
    _, face3 = load_all(dst, class_merge="face3")
    assert set(np.unique(face3["0"])) == {0, 1, 2} and (face3["2001"][0:3] == 2).all()  # the hat counts as hair
    assert (face3["1"][13:] == 0).all()  # cloth is background


def test_celebamask_classes_match_the_shared_data(data_dir):
    path = data_dir / "celebamask-hq-800" / "dataset.json"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    assert json.loads(path.read_text())["classes"] == CELEBAMASK_CLASSES


def test_celebamask_missing_parts_name_the_file(tmp_path):
    celebamask_layout(tmp_path / "src")
    save(photo(32, 32, 5), tmp_path / "src" / "CelebA-HQ-img" / "5.jpg")
    with pytest.raises(DataError, match=r"CelebAMask-HQ-mask-anno/0/00005_skin\.png.*5\.jpg"):
        run_convert("celebamask-hq", tmp_path / "src", tmp_path / "out")


# ---------------------------------------------------------------------------------------------------- Weizmann
def weizmann_layout(root: Path) -> dict[str, np.ndarray]:
    expected = {}
    for i, box in enumerate([(2, 3, 10, 15), (5, 0, 12, 8)], start=1):
        soft = rect_mask(12, 20, box, 1).astype(np.float32) * 230 + 10  # grey, not binary: 10 / 240
        save(photo(12, 20, i), root / "rgb" / f"horse{i:03d}.jpg")
        save(soft.astype(np.uint8), root / "figure_ground" / f"horse{i:03d}.png")
        expected[f"horse{i:03d}"] = rect_mask(12, 20, box, 1)
    return expected


def test_weizmann_horse(tmp_path):
    expected = weizmann_layout(tmp_path / "src")
    dst = run_convert("weizmann-horse", tmp_path / "src", tmp_path / "out", name="horses")
    meta = json.loads((dst / "dataset.json").read_text())
    assert meta["name"] == "horses" and meta["classes"] == ["background", "horse"]
    _, masks = load_all(dst)
    assert masks.keys() == expected.keys()
    for k in expected:
        assert np.array_equal(masks[k], expected[k])
    # the image is copied byte for byte when nothing needs resizing
    assert (dst / "images" / "horse001.jpg").read_bytes() == (tmp_path / "src" / "rgb" / "horse001.jpg").read_bytes()


def test_weizmann_errors_name_the_file(tmp_path):
    weizmann_layout(tmp_path / "src")
    save(photo(12, 20, 9), tmp_path / "src" / "rgb" / "horse009.jpg")
    with pytest.raises(DataError, match=r"figure_ground/horse009.*missing mask"):
        run_convert("weizmann-horse", tmp_path / "src", tmp_path / "out")
    save(np.zeros((20, 12), np.uint8), tmp_path / "src" / "figure_ground" / "horse009.png")  # transposed size
    with pytest.raises(DataError, match=r"figure_ground/horse009\.png.*does not match"):
        run_convert("weizmann-horse", tmp_path / "src", tmp_path / "out")
    (tmp_path / "src" / "figure_ground" / "horse009.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"horse009\.png: unreadable"):
        run_convert("weizmann-horse", tmp_path / "src", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty.*\['rgb', 'horse'\]"):
        run_convert("weizmann-horse", tmp_path / "empty", tmp_path / "out2")


# ---------------------------------------------------------------------------------------------------- Flowers
def test_flowers17_trimaps(tmp_path):
    src = tmp_path / "src"
    for i in (1, 2, 3):
        save(photo(16, 24, i), src / "jpg" / f"image_{i:04d}.jpg")
    trimap = rect_mask(16, 24, (2, 2, 14, 22), 128) + rect_mask(16, 24, (4, 4, 12, 20), 127)  # band 128, fg 255
    save(trimap, src / "trimaps" / "image_0001.png")
    save(trimap, src / "trimaps" / "image_0003.png")
    dst = run_convert("flowers17", src, tmp_path / "out")
    ds, masks = load_all(dst)
    assert ds.ids == ["image_0001", "image_0003"]  # only the images that have a trimap
    m = masks["image_0001"]
    assert m[8, 10] == 1 and m[0, 0] == 0 and m[3, 3] == 255  # the uncertain band is ignore_index


def test_flowers102_segmim_and_split(tmp_path):
    from scipy.io import savemat

    src = tmp_path / "src"
    expected = {}
    yy, xx = np.mgrid[0:48, 0:64]
    for i in (1, 2, 3):
        image = np.stack([120 + 60 * np.sin(xx / (5 + i)), 150 + 50 * np.cos(yy / 5), 100 + 40 * np.sin((xx + yy) / 9)])
        image = image.transpose(1, 2, 0).astype(np.uint8)  # a smooth photo, as flowers are
        mask = rect_mask(48, 64, (6 + i, 10, 40, 50), 1)
        seg = image.copy()
        seg[mask == 0] = (0, 0, 254)  # segmim: the image with its background painted blue, saved as JPEG
        save(image, src / "jpg" / f"image_{i:05d}.jpg")
        save(seg, src / "segmim" / f"segmim_{i:05d}.jpg", quality=75)
        expected[f"image_{i:05d}"] = mask
    savemat(src / "setid.mat", {"trnid": np.array([[1, 3]]), "valid": np.array([[2]]), "tstid": np.array([[]])})
    _, masks = load_all(run_convert("flowers102", src, tmp_path / "all"))
    assert masks.keys() == expected.keys()
    for k, mask in expected.items():
        assert (masks[k] == mask).mean() > 0.98, k  # JPEG blurs the edges only
    _, train = load_all(run_convert("flowers102", src, tmp_path / "train", split="train"))
    assert sorted(train) == ["image_00001", "image_00003"]
    with pytest.raises(DataError, match="no items"):
        run_convert("flowers102", src, tmp_path / "test", split="test")


# ---------------------------------------------------------------------------------------------------- CUB
def test_cub_soft_masks_threshold_and_split(tmp_path):
    src = tmp_path / "CUB_200_2011"
    names = []
    for c, cls in enumerate(["001.Black_footed_Albatross", "002.Laysan_Albatross"]):
        for j in range(2):
            stem = f"{cls.split('.')[1]}_{j:04d}_{c}{j}"
            image = photo(10, 14, c * 2 + j)
            if c == 1 and j == 1:
                image = image[..., 0]  # CUB has a few greyscale images
            save(image, src / "images" / cls / f"{stem}.jpg")
            soft = np.zeros((10, 14), np.uint8)
            soft[2:8, 2:12] = 102  # 2 of 5 annotators: background
            soft[3:7, 4:10] = 153  # 3 of 5: bird
            save(soft, src / "segmentations" / cls / f"{stem}.png")
            names.append(f"{cls}/{stem}.jpg")
    (src / "images.txt").write_text("".join(f"{i + 1} {n}\n" for i, n in enumerate(names)))
    (src / "train_test_split.txt").write_text("1 1\n2 0\n3 1\n4 0\n")
    ds, masks = load_all(run_convert("cub", src, tmp_path / "all"))
    assert len(ds) == 4 and ds.class_names == ["background", "bird"]
    for m in masks.values():
        assert m.sum() == 4 * 6 and (m[3:7, 4:10] == 1).all()
    grey = next(p for p in (tmp_path / "all" / "images").iterdir() if "Laysan_Albatross_0001" in p.name)
    assert Image.open(grey).mode == "RGB"
    _, test = load_all(run_convert("cub", src, tmp_path / "test", split="test"))
    assert sorted(test) == sorted(Path(n).stem for n in names[1::2])
    (src / "segmentations" / "002.Laysan_Albatross" / "Laysan_Albatross_0000_10.png").unlink()
    with pytest.raises(DataError, match=r"Laysan_Albatross_0000_10\.png: missing mask"):
        run_convert("cub", src, tmp_path / "again")


# ---------------------------------------------------------------------------------------------------- DAVIS
def davis_layout(root: Path) -> dict[str, np.ndarray]:
    palette = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [0] * (256 - 4) * 3
    expected = {}
    for seq, ids in {"bear": (1, 2), "car": (1, 3)}.items():
        for f in range(3):
            ann = rect_mask(12, 16, (1, 1 + f, 6, 8 + f), ids[0]) + rect_mask(12, 16, (7, 2, 11, 14), ids[1])
            save(photo(12, 16, f), root / "JPEGImages" / "480p" / seq / f"{f:05d}.jpg")
            p = Image.fromarray(ann, mode="P")
            p.putpalette(palette)
            (root / "Annotations" / "480p" / seq).mkdir(parents=True, exist_ok=True)
            p.save(root / "Annotations" / "480p" / seq / f"{f:05d}.png")
            expected[f"{seq}_{f:05d}"] = ann
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("car\n")
    return expected


def test_davis_foreground_per_object_split_and_stride(tmp_path):
    expected = davis_layout(tmp_path / "DAVIS")
    ds, masks = load_all(run_convert("davis", tmp_path / "DAVIS", tmp_path / "fg"))
    assert ds.class_names == ["background", "foreground"] and len(ds) == 6
    for k, ann in expected.items():
        assert np.array_equal(masks[k], (ann > 0).astype(np.uint8))
    ds, masks = load_all(run_convert("davis", tmp_path / "DAVIS", tmp_path / "obj", per_object=True))
    assert ds.class_names == ["background", "object_1", "object_2", "object_3"]
    for k, ann in expected.items():
        assert np.array_equal(masks[k], ann)
    ds, _ = load_all(run_convert("davis", tmp_path / "DAVIS", tmp_path / "val", split="val", frame_stride=2))
    assert ds.ids == ["car_00000", "car_00002"]
    rgb = tmp_path / "DAVIS" / "Annotations" / "480p" / "bear" / "00001.png"
    Image.new("RGB", (16, 12)).save(rgb)
    with pytest.raises(DataError, match=r"bear/00001\.png: annotation mode RGB"):
        run_convert("davis", tmp_path / "DAVIS", tmp_path / "bad")


# ---------------------------------------------------------------------------------------------------- writing
def test_resize_idempotence_and_atomic_outputs(tmp_path):
    weizmann_layout(tmp_path / "src")
    dst = run_convert("weizmann-horse", tmp_path / "src", tmp_path / "out", size=8)
    ds, masks = load_all(dst)
    assert all(m.shape == (8, 13) for m in masks.values())  # shorter side 8, aspect kept
    assert all(set(np.unique(m)) <= {0, 1} for m in masks.values())  # nearest: no blended classes
    files = {p: p.stat().st_mtime_ns for p in dst.rglob("*.png")}
    logs = []
    convert(PrepareConfig(layout="weizmann-horse", src=str(tmp_path / "src"), dst=str(dst), size=8), log=logs.append)
    assert "0 written, 2 already there" in logs[-1]
    assert {p: p.stat().st_mtime_ns for p in dst.rglob("*.png")} == files
    assert not [p for p in dst.rglob("*") if p.name.startswith(".")]  # no temp files left
    cfg = PrepareConfig(layout="weizmann-horse", src=str(tmp_path / "src"), dst=str(dst), size=8, overwrite=True)
    convert(cfg, log=logs.append)
    assert "2 written" in logs[-1]
    with pytest.raises(DataError, match="src"):
        convert(PrepareConfig(layout="cub", src="", dst=str(dst)), log=None)


def test_prepare_data_job(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("prepare_data", REPO / "jobs" / "prepare_data.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    weizmann_layout(tmp_path / "src")
    args = ["layout=weizmann-horse", f"src={tmp_path / 'src'}", f"dst={tmp_path / 'out'}", "limit=1"]
    with pytest.raises(SystemExit) as exit_:
        job.main([*args, "--dry-run"])
    assert exit_.value.code == 0 and yaml.safe_load(capsys.readouterr().out)["limit"] == 1
    assert not (tmp_path / "out").exists()
    dst = job.main(args)
    assert len(PairedFolderDataset(dst)) == 1
    # the resolved config is saved with the output, and loads back to the very config the job ran with
    saved = load_config(PrepareConfig, dst / "prepare_config.yaml")
    assert saved == resolve_paths(load_config(PrepareConfig, None, args)) and saved.limit == 1
    assert "data.root=" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        job.main(["layout=pascal", "src=x", "dst=y"])
    assert exit_.value.code == 2 and "layout" in capsys.readouterr().err
    save(photo(12, 20, 9), tmp_path / "src" / "rgb" / "horse009.jpg")
    with pytest.raises(SystemExit) as exit_:  # bad input data: one line naming the file, status 1
        job.main(args)
    assert exit_.value.code == 1 and "missing mask" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- real data
def test_real_weizmann_round_trip(data_dir, tmp_path):
    """The shared Weizmann pairs, put back into the public layout (grey figure-ground), convert to themselves."""
    root = data_dir / "weizmann-horse-200"
    if not root.is_dir():
        pytest.skip(f"{root} is absent")
    ids = sorted(p.stem for p in (root / "images").iterdir())[:4]
    for i in ids:
        (tmp_path / "src" / "rgb").mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / "rgb" / f"{i}.jpg").write_bytes((root / "images" / f"{i}.jpg").read_bytes())
        save(np.asarray(Image.open(root / "masks" / f"{i}.png")) * 255, tmp_path / "src" / "figure_ground" / f"{i}.png")
    _, masks = load_all(run_convert("weizmann-horse", tmp_path / "src", tmp_path / "out"))
    for i in ids:
        assert np.array_equal(masks[i], np.asarray(Image.open(root / "masks" / f"{i}.png")))
        assert (tmp_path / "out" / "images" / f"{i}.jpg").read_bytes() == (root / "images" / f"{i}.jpg").read_bytes()


def test_real_celebamask_round_trip(data_dir, tmp_path):
    """Shared CelebAMask-HQ pairs split into one file per part (images at twice the mask size, as the real 1024 px
    images are to their 512 px parts) convert back to the same 19-class masks."""
    root = data_dir / "celebamask-hq-800"
    if not root.is_dir():
        pytest.skip(f"{root} is absent")
    ids = sorted(p.stem for p in (root / "images").iterdir())[:3]
    for n, i in enumerate(ids):
        image = Image.open(root / "images" / f"{i}.jpg")
        save(
            np.asarray(image.resize((image.width * 2, image.height * 2))),
            tmp_path / "src" / "CelebA-HQ-img" / f"{n}.jpg",
        )
        mask = np.asarray(Image.open(root / "masks" / f"{i}.png"))
        for k in np.unique(mask):
            if 0 < k < len(CELEBAMASK_CLASSES):
                part = (mask == k).astype(np.uint8) * 255
                save(part, tmp_path / "src" / "CelebAMask-HQ-mask-anno" / "0" / f"{n:05d}_{CELEBAMASK_CLASSES[k]}.png")
    _, masks = load_all(run_convert("celebamask-hq", tmp_path / "src", tmp_path / "out"))
    for n, i in enumerate(ids):
        original = np.asarray(Image.open(root / "masks" / f"{i}.png"))
        assert np.array_equal(masks[str(n)], np.where(original == 255, 0, original))
