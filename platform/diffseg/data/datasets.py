"""Data: paired image/mask folders, the built-in synthetic sets (`diffseg.data.synthetic`), the resize policy, and a
Ray Data reader.

Paired-folder format (the format of `../shared/data`):

    <root>/dataset.json      {"name", "classes": [...], "ignore_index": 255, "source", "license"}
    <root>/images/<id>.jpg   RGB (jpg, jpeg, png, bmp, webp)
    <root>/masks/<id>.png    8-bit, pixel value = class index, ignore_index = ignore

Items are dicts {"image": (3, H, W) float in [-1, 1], "mask": (H, W) long, "id": str}. Bad input raises DataError
naming the file.
"""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from diffseg.core.config import InputPath, UserError, is_uri
from diffseg.data.augment import augment
from diffseg.data.synthetic import (  # noqa: F401  (re-exported: the data sets' one entry point is this module)
    LAYERS_CLASSES,
    SYNTHETIC_CLASSES,
    LayersConfig,
    LayersDataset,
    SyntheticDataset,
    layers_scene,
    synthetic_scene,
    write_layers_folder,
    write_synthetic_folder,
)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
CACHE_AUTO_BYTES = 2**30  # data.cache=auto keeps a paired folder's decoded images in memory up to this size

# Class merges by NAME, so they survive a different class order. face3: the 3-class skin/hair/background protocol.
CLASS_MERGES: dict[str, dict[str, Any]] = {
    "face3": {
        "classes": ["background", "skin", "hair"],
        # everything on the face (and the ears, neck) is skin; hair and hat are hair; cloth and the rest background
        "map": {
            "background": "background",
            "skin": "skin",
            "nose": "skin",
            "eye_g": "skin",
            "l_eye": "skin",
            "r_eye": "skin",
            "l_brow": "skin",
            "r_brow": "skin",
            "l_ear": "skin",
            "r_ear": "skin",
            "mouth": "skin",
            "u_lip": "skin",
            "l_lip": "skin",
            "hair": "hair",
            "hat": "hair",
            "ear_r": "skin",
            "neck_l": "skin",
            "neck": "skin",
            "cloth": "background",
        },  # fmt: skip
    },
}


class DataError(UserError):
    """Bad input data; the message names the file."""


@dataclass(frozen=True)
class DataConfig:
    name: Literal["synthetic", "layers", "folder"] = "synthetic"  # the built-in synthetic scenes, the built-in
    # independent-layers testbed of unsupervised segmentation (`data.layers`), or a paired folder at root
    root: InputPath | None = None  # paired-folder root (name=folder)
    image_size: int = 32  # images are resized (shorter side) and centre-cropped to this size
    num_images: int = 512  # synthetic, layers: how many scenes
    seed: int = 0  # synthetic, layers: scene seed (scene i depends only on (seed, i))
    layers: LayersConfig = LayersConfig()  # layers: object size, shape, textures, colour contrast, objects per image
    num_train: int = 0  # labelled training images taken first from the sorted ids (0 = all but num_test)
    num_test: int = 0  # test images taken after the training ones (0 = none held out)
    split_seed: int | None = None  # shuffle ids with this seed before splitting (None = sorted order)
    class_merge: str | None = None  # merge classes by name, e.g. "face3" (skin/hair/background)
    flip: bool = False  # random horizontal flips for training
    roll: bool = False  # random circular shifts for training (with unet.padding_mode=circular: no position cue)
    crop_scale: float = 1.0  # random crops of [crop_scale, 1] of each side, resized back, for training (1 = off)
    cache: Literal["auto", "on", "off"] = "auto"  # keep decoded, resized images in memory; auto = when <= 1 GiB
    translate: float = 0.0  # random shifts of up to this fraction of the side in each axis, zero-filled, for training
    # (keeps the "objects are near the centre" prior that circular rolls remove, while moving the object; 0 = off)
    mix: tuple[DataConfig, ...] = ()  # more training sources: their training splits join this one's (the test split
    # stays this one's); each takes this config's image_size and augmentation; a source may have no masks (then the
    # mixed training items carry images only). E.g. the 6000 CIFAR horses beside the 150 Weizmann training images.


# ---------------------------------------------------------------------------------------------------- transforms
def resize_pair(image: Image.Image, mask: Image.Image | None, size: int) -> tuple[Image.Image, Image.Image | None]:
    """Resize the shorter side to `size` and centre-crop to size x size; the mask is nearest-neighbour."""
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), Image.BICUBIC)
    if mask is not None:
        mask = mask.resize((nw, nh), Image.NEAREST)
    left, top = (nw - size) // 2, (nh - size) // 2
    box = (left, top, left + size, top + size)
    return image.crop(box), mask.crop(box) if mask is not None else None


def to_tensor_image(image: Image.Image) -> torch.Tensor:
    """An RGB image -> (3, H, W) float32 in [-1, 1]; one float copy (4 bytes per value): Serve bounds its memory."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    arr = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy())  # (H, W, 3) uint8
    return arr.permute(2, 0, 1).float().div_(127.5).sub_(1)  # (3, H, W) in [-1, 1]


# The ONE resize policy for an image given to a network of a fixed square size (a segmenter, a feature backbone), used
# by the jobs and by Serve alike: the whole image is resized to the network's square (bilinear, antialiased when
# shrinking; the aspect ratio is not kept, so every input pixel gets a prediction), and what comes back is resized to
# the input's size: soft masks / probabilities bilinearly (renormalised, then argmax), hard labels by nearest
# neighbour. (Data sets are a different matter: `data.image_size` crops, see `resize_pair`.)
def _size(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def resize_images(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Images (B, C, H, W) -> (B, C, *size) float32 by the one policy (unchanged when already that size)."""
    size = _size(size)
    x = images.float()
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def resize_probs(probs: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Soft masks (B, K, h, w) summing to 1 over K -> (B, K, *size), bilinear and renormalised (also at the same
    size, so that every path to a label map, Serve's banded one included, takes the argmax of the same numbers)."""
    size = _size(size)
    p = probs.float()
    if tuple(p.shape[-2:]) != size:
        p = F.interpolate(p, size=size, mode="bilinear", align_corners=False)
    return p / p.sum(dim=1, keepdim=True).clamp(min=1e-8)


def resize_labels(labels: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Hard label maps (B, h, w) -> (B, *size) long, nearest neighbour."""
    size = _size(size)
    if tuple(labels.shape[-2:]) == size:
        return labels.long()
    return F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()


def resize_maps(maps: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Per-pixel values (B, h, w) (an uncertainty) or features (B, D, h, w) -> (..., *size), bilinear."""
    size = _size(size)
    x = maps.float()
    if tuple(x.shape[-2:]) == size:
        return x
    squeeze = x.dim() == 3
    x = F.interpolate(x[:, None] if squeeze else x, size=size, mode="bilinear", align_corners=False)
    return x[:, 0] if squeeze else x


# ---------------------------------------------------------------------------------------------------- folders
def read_dataset_json(root: Path) -> dict[str, Any]:
    path = root / "dataset.json"
    if not path.is_file():
        raise DataError(f"{path}: missing dataset.json (a paired folder needs classes and ignore_index)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(meta.get("classes"), list) or not meta["classes"]:
        raise DataError(f"{path}: 'classes' must be a non-empty list of class names")
    return meta


def check_labelled(data: DataConfig, key: str = "data") -> None:
    """A config's check that `data` has the masks the job needs (a `check()` calls it: before the job starts and in
    --dry-run). A local paired folder must exist and hold masks (a masks/ folder, and dataset.json not saying
    `masks: false`); the synthetic generators always have them. A URI is checked where the job reads it."""
    if data.name != "folder" or not data.root or is_uri(data.root):
        return
    root = Path(data.root)
    if not root.is_dir():
        raise ValueError(f"{key}.root: {root} is not a folder")
    why = _no_masks(root, read_dataset_json(root))
    if why is not None:
        raise ValueError(f"{key}.root: {root} has no masks ({why}), and this job needs labelled images")


def _no_masks(root: Path, meta: dict[str, Any]) -> str | None:
    """Why a paired folder has no masks (its dataset.json says `masks: false`, or no masks/ folder), or None."""
    if meta.get("masks", True) is False:
        return "its dataset.json says masks: false"
    return None if (root / "masks").is_dir() else "it has no masks/ folder"


def list_ids(root: str | os.PathLike) -> list[str]:
    images = Path(root) / "images"
    if not images.is_dir():
        raise DataError(f"{images}: no images folder")
    return sorted(p.stem for p in images.iterdir() if p.suffix.lower() in IMAGE_EXTS)


def split_ids(
    ids: Sequence[str], num_train: int, num_test: int, seed: int | None = None
) -> tuple[list[str], list[str]]:
    """Deterministic split: (optionally shuffled by seed) the first num_train ids train, the next num_test test."""
    ids = list(ids)
    if seed is not None:
        ids = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    if num_train + num_test > len(ids):
        raise DataError(f"cannot take {num_train} train + {num_test} test images from {len(ids)}")
    train = ids[:num_train] if num_train else ids[: len(ids) - num_test]
    return train, ids[len(train) : len(train) + num_test]


class PairedFolderDataset(torch.utils.data.Dataset):
    """Images (and masks, when the folder has them) of a paired folder, resized to `image_size`."""

    def __init__(
        self,
        root: str | os.PathLike,
        ids: Sequence[str] | None = None,
        image_size: int | None = None,
        class_merge: str | None = None,
        flip: bool = False,
        require_masks: bool = False,
        seed: int = 0,
        roll: bool = False,
        crop_scale: float = 1.0,
        cache: Literal["auto", "on", "off"] = "auto",
        translate: float = 0.0,
    ):
        self.root = Path(root)
        meta = read_dataset_json(self.root)
        self.ignore_index = int(meta.get("ignore_index", 255))
        self.source_classes = list(meta["classes"])
        self.ids = list(ids) if ids is not None else list_ids(self.root)
        self.image_size, self.flip, self.roll, self.crop_scale = image_size, flip, roll, crop_scale
        self.translate = translate
        # dataset.json may say `"masks": false` (an image-only set, whatever folders lie beside it)
        if not isinstance(meta.get("masks", True), bool):
            raise DataError(f"{self.root / 'dataset.json'}: 'masks' must be true or false, got {meta['masks']!r}")
        why = _no_masks(self.root, meta)
        self.has_masks = why is None
        if require_masks and not self.has_masks:
            raise DataError(f"{self.root}: this job needs masks, and the folder has none ({why})")
        self.lut = None
        self.class_names = self.source_classes
        if class_merge is not None:
            if class_merge not in CLASS_MERGES:
                raise DataError(f"unknown class_merge {class_merge!r}; known: {sorted(CLASS_MERGES)}")
            merge = CLASS_MERGES[class_merge]
            self.class_names = list(merge["classes"])
            lut = np.full(256, self.ignore_index, dtype=np.uint8)
            for i, name in enumerate(self.source_classes):
                if name not in merge["map"]:
                    raise DataError(f"{self.root / 'dataset.json'}: class {name!r} has no entry in merge {class_merge}")
                lut[i] = self.class_names.index(merge["map"][name])
            self.lut = lut
        self._gen = torch.Generator().manual_seed(seed)
        self._files = {p.stem: p for p in (self.root / "images").iterdir() if p.suffix.lower() in IMAGE_EXTS}
        missing = [i for i in self.ids if i not in self._files]
        if missing:
            raise DataError(f"{self.root / 'images'}: no image for id(s) {missing[:5]}")
        # Decoding and resizing a JPEG costs more than a small model's step: a small set is decoded once. (Each
        # DataLoader worker keeps its own copy; augmentation still runs per item.)
        side = image_size or 256
        self._cache: dict[int, dict[str, Any]] | None = None
        if cache == "on" or (cache == "auto" and len(self.ids) * 3 * side * side * 4 <= CACHE_AUTO_BYTES):
            self._cache = {}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, idx: int) -> tuple[Image.Image, Image.Image | None, str]:
        """The raw image and mask of item idx (checked, not resized)."""
        id_ = self.ids[idx]
        path = self._files[id_]
        try:
            image = Image.open(path)
            image.load()
            image = image.convert("RGB")
        except Exception as e:
            raise DataError(f"{path}: unreadable image ({e})") from e
        mask = None
        if self.has_masks:
            mpath = self.root / "masks" / f"{id_}.png"
            if not mpath.is_file():
                raise DataError(f"{mpath}: missing mask for image {path.name}")
            try:
                mask = Image.open(mpath)
                mask.load()
            except Exception as e:
                raise DataError(f"{mpath}: unreadable mask ({e})") from e
            if mask.mode not in ("L", "P"):
                raise DataError(f"{mpath}: mask mode {mask.mode}, expected 8-bit class indices (L or P)")
            if mask.size != image.size:
                raise DataError(f"{mpath}: mask size {mask.size} differs from image {path.name} size {image.size}")
            arr = np.asarray(mask)
            bad = (arr >= len(self.source_classes)) & (arr != self.ignore_index)
            if bad.any():
                raise DataError(
                    f"{mpath}: class index {int(arr[bad].max())} out of range for {len(self.source_classes)} classes"
                )
            if self.lut is not None:
                mask = Image.fromarray(self.lut[arr])
            else:
                mask = Image.fromarray(arr)
        return image, mask, id_

    def prepared(self, idx: int) -> dict[str, Any]:
        """Item idx decoded and resized, before augmentation (from the cache when it is on)."""
        if self._cache is not None and idx in self._cache:
            return self._cache[idx]
        image, mask, id_ = self.load(idx)
        if self.image_size:
            image, mask = resize_pair(image, mask, self.image_size)
        item: dict[str, Any] = {"image": to_tensor_image(image), "id": id_}
        if mask is not None:
            item["mask"] = torch.from_numpy(np.asarray(mask, dtype=np.int64).copy())
        if self._cache is not None:
            self._cache[idx] = item
        return item

    def __getitem__(self, idx: int) -> dict[str, Any]:
        return augment(
            self.prepared(idx), self._gen, self.flip, self.roll, self.crop_scale, self.translate, self.ignore_index
        )


# ---------------------------------------------------------------------------------------------------- build
def build_dataset(cfg: DataConfig, split: Literal["train", "test", "all"] = "train") -> torch.utils.data.Dataset:
    """The data set a config names; `split` follows num_train/num_test (see split_ids). An empty split is a DataError:
    a job over zero images would otherwise "succeed" with nothing done, or report a metric over nothing."""
    if cfg.name == "synthetic":
        n_test = cfg.num_test
        n_train = cfg.num_train or cfg.num_images - n_test
        if split == "all":
            ds = SyntheticDataset(cfg.num_images, cfg.image_size, cfg.seed)
        elif split == "train":
            ds = SyntheticDataset(n_train, cfg.image_size, cfg.seed, flip=cfg.flip, roll=cfg.roll,
                                  crop_scale=cfg.crop_scale, translate=cfg.translate)  # fmt: skip
        else:
            ds = SyntheticDataset(n_test, cfg.image_size, cfg.seed, offset=n_train)
        where = f"the synthetic data set (num_images={cfg.num_images})"
    elif cfg.name == "layers":
        n_test = cfg.num_test
        n_train = cfg.num_train or cfg.num_images - n_test
        if n_train + n_test > cfg.num_images:
            raise DataError(
                f"data: cannot take {n_train} train + {n_test} test images from num_images={cfg.num_images}"
            )
        if split == "train":
            ds = LayersDataset(n_train, cfg.image_size, cfg.seed, cfg=cfg.layers, flip=cfg.flip, roll=cfg.roll,
                               crop_scale=cfg.crop_scale, translate=cfg.translate)  # fmt: skip
        else:
            n, offset = (cfg.num_images, 0) if split == "all" else (n_test, n_train)
            ds = LayersDataset(n, cfg.image_size, cfg.seed, offset=offset, cfg=cfg.layers)
        where = f"the layers data set (num_images={cfg.num_images})"
    else:
        if cfg.root is None:
            raise DataError("data.root: a folder data set needs a root")
        all_ids = ids = list_ids(cfg.root)
        if split != "all":
            train, test = split_ids(all_ids, cfg.num_train, cfg.num_test, cfg.split_seed)
            ids = train if split == "train" else test
        train = split == "train"
        ds = PairedFolderDataset(
            cfg.root,
            ids,
            cfg.image_size,
            cfg.class_merge,
            flip=cfg.flip and train,
            seed=cfg.split_seed or 0,
            roll=cfg.roll and train,
            crop_scale=cfg.crop_scale if train else 1.0,
            cache=cfg.cache,
            translate=cfg.translate if train else 0.0,
        )
        where = f"{Path(cfg.root) / 'images'} ({len(all_ids)} images)"
    if len(ds) == 0:
        raise DataError(
            f"data: the {split!r} split of {where} is empty (data.num_train={cfg.num_train}, "
            f"data.num_test={cfg.num_test}); a job over zero images has nothing to do"
        )
    if cfg.mix and split == "train":
        return MixedDataset([ds, *(build_dataset(source_config(cfg, i), "train") for i in range(len(cfg.mix)))])
    return ds


def source_config(cfg: DataConfig, i: int) -> DataConfig:
    """`cfg.mix[i]` with the primary's image size and training augmentation (every source is seen alike)."""
    src = cfg.mix[i]
    if src.mix:
        raise DataError(f"data.mix[{i}].mix: a mixed source cannot mix again")
    return replace(src, image_size=cfg.image_size, flip=cfg.flip, roll=cfg.roll, crop_scale=cfg.crop_scale,
                   translate=cfg.translate)  # fmt: skip


class MixedDataset(torch.utils.data.ConcatDataset):
    """The training splits of several sources as one data set (`DataConfig.mix`). Ids are `<source index>:<id>`
    (two sources may both have an image 0001). When any source has no masks, items carry images only (a batch of
    mixed items must have the same keys), so a job that needs masks refuses a mixed set (see `require_masks`)."""

    def __init__(self, sources: list[torch.utils.data.Dataset]):
        super().__init__(sources)
        self.has_masks = all(getattr(s, "has_masks", True) for s in sources)
        self.class_names = getattr(sources[0], "class_names", None)
        self.ignore_index = getattr(sources[0], "ignore_index", 255)

    @property
    def ids(self) -> list[str]:
        return [f"{i}:{id_}" for i, s in enumerate(self.datasets) for id_ in item_ids(s)]

    def __getitem__(self, idx: int) -> dict[str, Any]:
        if idx < 0:
            idx += len(self)
        src = bisect.bisect_right(self.cumulative_sizes, idx)
        item = dict(super().__getitem__(idx))
        item["id"] = f"{src}:{item['id']}"
        if not self.has_masks:
            item.pop("mask", None)
            item.pop("foreground", None)
        return item


def item_ids(dataset: torch.utils.data.Dataset) -> list[str]:
    """The ids of a data set's items without loading any image (paired folders, synthetic scenes, Subsets of them)."""
    if isinstance(dataset, torch.utils.data.Subset):
        parent = item_ids(dataset.dataset)
        return [parent[i] for i in dataset.indices]
    ids = getattr(dataset, "ids", None)
    if ids is None:
        return [str(dataset[i]["id"]) for i in range(len(dataset))]
    return list(ids)


def stack(dataset: torch.utils.data.Dataset, limit: int | None = None) -> dict[str, Any]:
    """A small data set as tensors: {"image": (N, 3, H, W), "mask": (N, H, W), "id": [...]}."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    items = [dataset[i] for i in range(n)]
    out: dict[str, Any] = {"image": torch.stack([it["image"] for it in items]), "id": [it["id"] for it in items]}
    if items and "mask" in items[0]:
        out["mask"] = torch.stack([it["mask"] for it in items])
    return out


def read_images_ray(cfg: DataConfig, split: Literal["train", "test", "all"] = "all", batch_size: int = 16):
    """A Ray Dataset of rows {"id", "image" (H, W, 3) uint8, "mask" (H, W) uint8 when labelled}, read lazily."""
    import ray

    n = len(build_dataset(cfg, split))

    def read(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ds = build_dataset(cfg, split)
        items = [ds[int(i)] for i in batch["index"]]
        out = {
            "id": np.array([it["id"] for it in items]),
            "image": np.stack([((it["image"].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy() for it in items]),
        }
        if "mask" in items[0]:
            out["mask"] = np.stack([it["mask"].numpy().astype(np.uint8) for it in items])
        return out

    return ray.data.from_items([{"index": i} for i in range(n)]).map_batches(read, batch_size=batch_size)
