"""Data: paired folders, transforms that keep masks aligned, errors naming the file, the synthetic generator, and
the 3-class face merge on the real CelebAMask-HQ subset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffseg.data.datasets import (
    CLASS_MERGES,
    SYNTHETIC_CLASSES,
    DataConfig,
    DataError,
    PairedFolderDataset,
    SyntheticDataset,
    build_dataset,
    list_ids,
    resize_pair,
    split_ids,
    stack,
    synthetic_scene,
    write_synthetic_folder,
)

GREY_STEP = 60  # class k is drawn in grey level k * GREY_STEP, so the image says which class a pixel has


def blocky_mask(rng: np.random.Generator, h: int, w: int, num_classes: int) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    for _ in range(6):
        y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
        mask[y : y + rng.integers(4, max(5, h // 2)), x : x + rng.integers(4, max(5, w // 2))] = rng.integers(
            0, num_classes
        )
    return mask


def write_folder(root: Path, sizes: list[tuple[int, int]], classes=("background", "a", "b"), seed=0) -> Path:
    """A paired folder whose images are their masks in grey (class k -> k * GREY_STEP)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, (w, h) in enumerate(sizes):
        mask = blocky_mask(rng, h, w, len(classes))
        Image.fromarray(np.repeat(mask[..., None] * GREY_STEP, 3, axis=2)).save(root / "images" / f"im{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"im{i}.png")
    meta = {"name": root.name, "classes": list(classes), "ignore_index": 255, "source": "test", "license": "CC0"}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def assert_aligned(image: torch.Tensor, mask: torch.Tensor) -> None:
    """Where a mask pixel's 3x3 neighbourhood is one class, the image shows that class's grey level."""
    grey = ((image[0] + 1) * 127.5).numpy()  # (H, W)
    m = mask.numpy()
    pad = np.pad(m, 1, mode="edge")
    uniform = np.ones_like(m, bool)
    for dy in range(3):
        for dx in range(3):
            uniform &= pad[dy : dy + m.shape[0], dx : dx + m.shape[1]] == m
    assert uniform.sum() > m.size // 4
    np.testing.assert_allclose(grey[uniform], m[uniform] * GREY_STEP, atol=12)


# ---------------------------------------------------------------------------------------------------- folders
def test_paired_folder_reads_and_transforms_keep_masks_aligned(tmp_path):
    root = write_folder(tmp_path / "set", [(40, 24), (24, 40), (30, 30)])
    ds = PairedFolderDataset(root, image_size=16)
    assert len(ds) == 3 and ds.ids == ["im0", "im1", "im2"] and ds.num_classes == 3 and ds.ignore_index == 255
    for i in range(3):
        item = ds[i]
        assert item["image"].shape == (3, 16, 16) and item["mask"].shape == (16, 16)
        assert item["mask"].dtype == torch.long and -1 <= item["image"].min() and item["image"].max() <= 1
        raw = np.asarray(Image.open(root / "masks" / f"im{i}.png"))
        assert set(item["mask"].unique().tolist()) <= set(np.unique(raw).tolist())  # nearest: no new values
        assert_aligned(item["image"], item["mask"])
    # unresized: exactly the files
    full = PairedFolderDataset(root)[0]
    assert full["mask"].shape == (24, 40)
    assert np.array_equal(full["mask"].numpy(), np.asarray(Image.open(root / "masks" / "im0.png")))


def test_resize_pair_centre_crops_both_alike():
    mask = np.zeros((20, 60), np.uint8)
    mask[:, :10], mask[:, 50:] = 1, 2  # the left and right strips fall outside the centre crop
    mask[5:15, 25:35] = 1
    image = Image.fromarray(np.repeat(mask[..., None] * GREY_STEP, 3, 2))
    out_image, out_mask = resize_pair(image, Image.fromarray(mask), 10)
    assert out_image.size == out_mask.size == (10, 10)
    m = np.asarray(out_mask)
    assert set(np.unique(m)) == {0, 1} and m[5, 5] == 1 and m[0, 0] == 0
    assert_aligned(
        torch.from_numpy(np.array(out_image, np.float32)).permute(2, 0, 1) / 127.5 - 1, torch.from_numpy(m.copy())
    )


def test_flip_flips_image_and_mask_together(tmp_path):
    root = write_folder(tmp_path / "set", [(20, 20)] * 4)
    plain = PairedFolderDataset(root)
    flipped = PairedFolderDataset(root, flip=True, seed=1)
    n_flipped = 0
    for i in range(4):
        a, b = plain[i], flipped[i]
        assert_aligned(b["image"], b["mask"])
        n_flipped += int(not torch.equal(a["mask"], b["mask"]))
        assert torch.equal(b["mask"], a["mask"]) or torch.equal(b["mask"], a["mask"].flip(-1))
    assert n_flipped > 0


def test_splits_are_deterministic_and_disjoint(tmp_path):
    root = write_folder(tmp_path / "set", [(12, 12)] * 10)
    ids = list_ids(root)
    train, test = split_ids(ids, 6, 3)
    assert train == ids[:6] and test == ids[6:9]
    a, b = split_ids(ids, 6, 3, seed=7), split_ids(ids, 6, 3, seed=7)
    assert a == b and not set(a[0]) & set(a[1]) and a != (train, test)
    with pytest.raises(DataError, match="cannot take"):
        split_ids(ids, 8, 3)
    cfg = DataConfig(name="folder", root=str(root), image_size=8, num_train=4, num_test=2)
    assert [it["id"] for it in [build_dataset(cfg, "test")[i] for i in range(2)]] == ids[4:6]
    assert stack(build_dataset(cfg, "train"))["image"].shape == (4, 3, 8, 8)


def _broken(root: Path, what: str) -> Path:
    """A two-image folder with one defect; returns the file the error must name."""
    write_folder(root, [(16, 16), (16, 16)])
    if what == "unreadable image":
        (root / "images" / "im1.png").write_bytes(b"\x89PNG not really")
        return root / "images" / "im1.png"
    if what == "missing mask":
        (root / "masks" / "im1.png").unlink()
        return root / "masks" / "im1.png"
    if what == "size mismatch":
        Image.fromarray(np.zeros((12, 16), np.uint8)).save(root / "masks" / "im1.png")
        return root / "masks" / "im1.png"
    if what == "class out of range":
        Image.fromarray(np.full((16, 16), 7, np.uint8)).save(root / "masks" / "im1.png")
        return root / "masks" / "im1.png"
    if what == "rgb mask":
        Image.new("RGB", (16, 16)).save(root / "masks" / "im1.png")
        return root / "masks" / "im1.png"
    if what == "unreadable mask":
        (root / "masks" / "im1.png").write_bytes(b"garbage")
        return root / "masks" / "im1.png"
    raise AssertionError(what)


@pytest.mark.parametrize(
    "what", ["unreadable image", "missing mask", "size mismatch", "class out of range", "rgb mask", "unreadable mask"]
)
def test_bad_input_raises_an_error_naming_the_file(tmp_path, what):
    bad = _broken(tmp_path / "set", what)
    ds = PairedFolderDataset(tmp_path / "set", image_size=8)
    ds[0]  # the good item loads
    with pytest.raises(DataError) as err:
        ds[1]
    assert str(bad) in str(err.value)


def test_folder_level_errors_name_the_path(tmp_path):
    root = write_folder(tmp_path / "set", [(8, 8)])
    (root / "dataset.json").unlink()
    with pytest.raises(DataError, match=str(root / "dataset.json")):
        PairedFolderDataset(root)
    (root / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match="invalid JSON"):
        PairedFolderDataset(root)
    (root / "dataset.json").write_text(json.dumps({"classes": []}))
    with pytest.raises(DataError, match="classes"):
        PairedFolderDataset(root)
    (root / "dataset.json").write_text(json.dumps({"classes": ["a", "b"]}))
    with pytest.raises(DataError, match="im9"):
        PairedFolderDataset(root, ids=["im0", "im9"])
    with pytest.raises(DataError, match="class_merge"):
        PairedFolderDataset(root, class_merge="nope")
    with pytest.raises(DataError, match="no entry in merge face3"):
        PairedFolderDataset(root, class_merge="face3")  # classes a, b are not face classes
    with pytest.raises(DataError, match=str(tmp_path / "none" / "images")):
        list_ids(tmp_path / "none")


def test_ignore_index_passes_through(tmp_path):
    root = write_folder(tmp_path / "set", [(8, 8)])
    mask = np.zeros((8, 8), np.uint8)
    mask[:4] = 255
    Image.fromarray(mask).save(root / "masks" / "im0.png")
    assert set(PairedFolderDataset(root)[0]["mask"].unique().tolist()) == {0, 255}


# ---------------------------------------------------------------------------------------------------- synthetic
def test_synthetic_is_deterministic_per_seed_and_any_size():
    a_img, a_mask = synthetic_scene(seed=3, index=5, size=48)
    b_img, b_mask = synthetic_scene(seed=3, index=5, size=48)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_mask, b_mask)
    c_img, _ = synthetic_scene(seed=4, index=5, size=48)
    d_img, _ = synthetic_scene(seed=3, index=6, size=48)
    assert not np.array_equal(a_img, c_img) and not np.array_equal(a_img, d_img)
    for size in (16, 33, 64, 128):
        image, mask = synthetic_scene(0, 0, size)
        assert image.shape == (size, size, 3) and image.dtype == np.uint8 and mask.shape == (size, size)
        assert mask.max() < len(SYNTHETIC_CLASSES)
    # the data set is the same scenes, with a foreground mask, independent of access order
    ds = SyntheticDataset(num_images=4, image_size=32, seed=3)
    item = ds[2]
    assert item["image"].shape == (3, 32, 32) and item["id"] == "000002"
    assert torch.equal(item["mask"], SyntheticDataset(num_images=4, image_size=32, seed=3)[2]["mask"])
    assert torch.equal(item["foreground"], (item["mask"] > 0).long())
    with pytest.raises(IndexError):
        ds[4]


def test_synthetic_scenes_have_parts_and_need_more_than_colour():
    masks, colours = [], []
    for i in range(24):
        image, mask = synthetic_scene(0, i, 64)
        masks.append(mask)
        colours.append(image)
        present = set(np.unique(mask).tolist())
        assert {0, 1, 2} <= present  # background, body, head in every scene
    assert all(any(k in np.unique(m) for m in masks) for k in range(len(SYNTHETIC_CLASSES)))  # legs, spots too
    fg = np.mean([(m > 0).mean() for m in masks])
    assert 0.1 < fg < 0.6  # objects are neither specks nor the whole frame
    # The best colour-only classifier (majority class per quantized colour, fit on the very pixels it is scored
    # on) still cannot separate the parts: every class's colours are shared with others.
    q = np.concatenate([(c // 32).reshape(-1, 3) for c in colours]) @ np.array([64, 8, 1])
    y = np.concatenate([m.ravel() for m in masks])
    counts = np.zeros((512, len(SYNTHETIC_CLASSES)))
    np.add.at(counts, (q, y), 1)
    pred = counts.argmax(1)[q]
    ious = [((pred == k) & (y == k)).sum() / ((pred == k) | (y == k)).sum() for k in range(len(SYNTHETIC_CLASSES))]
    assert np.mean(ious) < 0.5, ious


def test_synthetic_splits_and_folder(tmp_path):
    cfg = DataConfig(name="synthetic", image_size=16, num_images=10, num_test=3)
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert len(train) == 7 and len(test) == 3
    assert {train[i]["id"] for i in range(7)}.isdisjoint(test[i]["id"] for i in range(3))
    root = write_synthetic_folder(tmp_path / "syn", num_images=3, image_size=24, seed=2)
    ds = PairedFolderDataset(root)
    assert ds.class_names == SYNTHETIC_CLASSES and len(ds) == 3
    image, mask = synthetic_scene(2, 1, 24)
    assert np.array_equal(ds[1]["mask"].numpy(), mask)
    assert np.array_equal(((ds[1]["image"].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy(), image)


# ---------------------------------------------------------------------------------------------------- real data
def test_celebamask_face3_merge_by_class_name(data_dir):
    root = data_dir / "celebamask-hq-800"
    if not root.is_dir():
        pytest.skip(f"{root} is absent")
    ids = list_ids(root)[:3]
    full = PairedFolderDataset(root, ids=ids, image_size=64)
    merged = PairedFolderDataset(root, ids=ids, image_size=64, class_merge="face3")
    assert len(full.class_names) == 19 and merged.class_names == ["background", "skin", "hair"]
    merge = CLASS_MERGES["face3"]["map"]
    for i in range(len(ids)):
        a, b = full[i]["mask"], merged[i]["mask"]
        assert torch.equal(full[i]["image"], merged[i]["image"])
        assert set(b.unique().tolist()) <= {0, 1, 2, 255}
        for k, name in enumerate(full.class_names):
            expected = merged.class_names.index(merge[name])
            assert (b[a == k] == expected).all(), name
        assert (b == 1).any() and (b == 2).any()  # every face has skin and hair


def test_empty_data_sets_are_errors(tmp_path):
    """Zero images is never a data set: a folder without images, a split asked to hold none."""
    root = write_synthetic_folder(tmp_path / "syn", num_images=3, image_size=8)
    with pytest.raises(DataError, match=r"the 'test' split of .*syn/images \(3 images\) is empty .*num_test=0"):
        build_dataset(DataConfig(name="folder", root=str(root)), "test")
    with pytest.raises(DataError, match=r"the 'test' split of the synthetic data set .* is empty"):
        build_dataset(DataConfig(name="synthetic", num_images=4), "test")
    for p in (root / "images").iterdir():
        p.unlink()
    with pytest.raises(DataError, match=r"the 'all' split of .*syn/images \(0 images\) is empty"):
        build_dataset(DataConfig(name="folder", root=str(root)), "all")
