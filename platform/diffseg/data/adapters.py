"""Public data sets in their download layouts -> the paired-folder format (`images/`, `masks/`, `dataset.json`).

    CelebAMask-HQ    CelebA-HQ-img/<n>.jpg + CelebAMask-HQ-mask-anno/<n // 2000>/<n:05d>_<part>.png (one binary
                     mask per part) -> 19 classes, background first, in the order of `../shared/data`'s dataset.json.
                     Parts are painted in the order of the official g_mask.py, so hair and hat win where parts
                     overlap; the 3-class skin/hair/background protocol stays a read-time `class_merge="face3"`.
    Weizmann Horse   rgb/<id>.* + figure_ground/<id>.* (grey) -> background, horse (>= threshold)
    Flowers 17       jpg/image_<n>.jpg + trimaps/image_<n>.png -> background, flower; only the ~848 images that
                     have a trimap; the trimap's uncertain band (mid grey) becomes ignore_index
    Flowers 102      jpg/image_<n>.jpg + segmim/segmim_<n>.jpg (the image with its background painted blue,
                     (0, 0, 254), JPEG-compressed) -> background, flower; optional split from setid.mat
    CUB-200-2011     images/<class>/<name>.jpg + segmentations/<class>/<name>.png (soft: the mean of several
                     annotators) -> background, bird (> threshold); optional split from train_test_split.txt
    DAVIS 2017       JPEGImages/480p/<seq>/<frame>.jpg + Annotations/480p/<seq>/<frame>.png (palette = object id)
                     -> background, foreground (any id > 0), or one class per object id (`per_object`)

Images whose mask is smaller (CelebA-HQ: 1024 px images, 512 px masks) are resized to the mask, never the reverse;
`size` then resizes both (shorter side, images bicubic, masks nearest). Conversion is idempotent: items already in
the output are skipped, each file is written atomically, and `dataset.json` is written last. Bad input raises
DataError naming the file.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from diffseg.core.config import InputPath, OutputPath, atomic_write, save_config
from diffseg.core.tracking import Tracker, TrackingConfig
from diffseg.data.datasets import IMAGE_EXTS, DataError

_log = logging.getLogger(__name__)

# The 19 CelebAMask-HQ classes in the face-parsing order (index = pixel value), as in ../shared/data.
CELEBAMASK_CLASSES = [
    "background", "skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear",
    "mouth", "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth",
]  # fmt: skip
# The official g_mask.py paints parts in this order; later parts overwrite earlier ones where they overlap.
CELEBAMASK_PAINT_ORDER = [
    "skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear", "r_ear", "ear_r",
    "nose", "mouth", "u_lip", "l_lip", "neck", "neck_l", "cloth", "hair", "hat",
]  # fmt: skip
FLOWERS102_BACKGROUND = (0, 0, 254)  # the colour segmim images paint the background with
IGNORE = 255

Layout = Literal["celebamask-hq", "weizmann-horse", "flowers17", "flowers102", "cub", "davis"]


@dataclass(frozen=True)
class PrepareConfig:
    layout: Layout = "weizmann-horse"  # which public layout `src` holds
    src: InputPath = ""  # the public download's root folder (the one holding e.g. rgb/ and figure_ground/)
    dst: OutputPath = ""  # the paired folder to write (created; items already there are skipped)
    name: str | None = None  # dataset.json "name" (None = the dst folder's name)
    size: int | None = None  # resize so the shorter side is this (images bicubic, masks nearest); None keeps sizes
    limit: int = 0  # convert only the first N items in sorted order (0 = all): quick subsets for development
    overwrite: bool = False  # convert again items already in dst
    split: Literal["all", "train", "val", "test"] = "all"  # CUB, Flowers 102, DAVIS: the official split to take
    threshold: float = 0.5  # Weizmann, CUB: foreground where the soft mask exceeds threshold * 255
    bg_tolerance: int = 80  # Flowers 102: max per-channel distance of a background pixel to (0, 0, 254) (JPEG)
    per_object: bool = False  # DAVIS: one class per object id (object_1, ...) instead of background/foreground
    frame_stride: int = 1  # DAVIS: take every Nth annotated frame of each sequence
    resolution: str = "480p"  # DAVIS: the resolution folder under JPEGImages/ and Annotations/
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # MLflow: the run (params, item counts)

    def check(self) -> None:
        """Cross-field checks (run by --dry-run and before the job)."""
        if not self.src or not self.dst:
            raise ValueError(f"src and dst are required (src={self.src!r}, dst={self.dst!r})")


@dataclass(frozen=True)
class Item:
    id: str  # the output file stem
    image: Path  # source image
    mask_source: Path  # the file named in errors about this item's mask
    read_mask: Callable[[], np.ndarray]  # -> (H, W) uint8 class indices (IGNORE = ignore)


@dataclass(frozen=True)
class Source:
    classes: list[str] | None  # None: background + object_1..object_N, N the largest index seen (DAVIS per_object)
    items: list[Item]
    description: str
    license: str


# ---------------------------------------------------------------------------------------------------- reading
def _open(path: Path, mode: str | None = None) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
    except Exception as e:
        raise DataError(f"{path}: unreadable image ({e})") from e
    return image.convert(mode) if mode else image


def _grey(path: Path) -> np.ndarray:
    """A grey-level mask as uint8 (H, W); RGB(A) masks are reduced to their luminance."""
    return np.asarray(_open(path, "L"))


def _find(folder: Path, stem: str) -> Path | None:
    for ext in IMAGE_EXTS:
        for candidate in (folder / f"{stem}{ext}", folder / f"{stem}{ext.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found (is `src` the data set's root?)")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)


def _first_dir(root: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise DataError(f"{root}: none of the folders {list(names)} found (is `src` the data set's root?)")


def _binary(arr: np.ndarray, threshold: float) -> np.ndarray:
    """Soft or grey mask -> 0/1; a mask already stored as 0/1 is kept as it is."""
    if arr.max(initial=0) <= 1:
        return arr.astype(np.uint8)
    return (arr > threshold * 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------- layouts
def celebamask_hq(cfg: PrepareConfig) -> Source:
    root = Path(cfg.src)
    images = _first_dir(root, ("CelebA-HQ-img",))
    anno = _first_dir(root, ("CelebAMask-HQ-mask-anno",))
    items = []
    for path in sorted(_images(images), key=lambda p: (len(p.stem), p.stem)):
        if not path.stem.isdigit():
            raise DataError(f"{path}: CelebA-HQ image names are numbers (0.jpg ... 29999.jpg)")
        n = int(path.stem)
        folder = anno / str(n // 2000)

        def read(n=n, folder=folder, image=path) -> np.ndarray:
            mask, size = None, None
            for part in CELEBAMASK_PAINT_ORDER:
                part_path = folder / f"{n:05d}_{part}.png"
                if not part_path.is_file():
                    continue  # a face without, say, a hat has no hat file
                arr = np.asarray(_open(part_path, "L"))
                if mask is None:
                    mask, size = np.zeros(arr.shape, np.uint8), arr.shape
                elif arr.shape != size:
                    raise DataError(f"{part_path}: size {arr.shape[::-1]} differs from the other parts' {size[::-1]}")
                mask[arr != 0] = CELEBAMASK_CLASSES.index(part)
            if mask is None:
                raise DataError(f"{folder / f'{n:05d}_skin.png'}: missing mask (no part files) for image {image.name}")
            return mask

        items.append(Item(str(n), path, folder / f"{n:05d}_*.png", read))
    return Source(list(CELEBAMASK_CLASSES), items, "CelebAMask-HQ (Lee et al., CVPR 2020)",
                  "CelebAMask-HQ terms: non-commercial research and education only")  # fmt: skip


def weizmann_horse(cfg: PrepareConfig) -> Source:
    root = Path(cfg.src)
    images = _first_dir(root, ("rgb", "horse"))
    masks = _first_dir(root, ("figure_ground", "mask"))
    items = []
    for path in _images(images):
        mask_path = _find(masks, path.stem)
        if mask_path is None:
            raise DataError(f"{masks / (path.stem + '.*')}: missing mask for image {path}")
        items.append(Item(path.stem, path, mask_path, lambda m=mask_path: _binary(_grey(m), cfg.threshold)))
    return Source(["background", "horse"], items, "Weizmann Horse database (Borenstein & Ullman)", "research use")


def flowers17(cfg: PrepareConfig) -> Source:
    root = Path(cfg.src)
    images = _first_dir(root, ("jpg",))
    trimaps = _first_dir(root, ("trimaps",))

    def read(path: Path) -> np.ndarray:
        grey = _grey(path)
        mask = np.full(grey.shape, IGNORE, np.uint8)  # the uncertain band between the two
        mask[grey <= 64] = 0
        mask[grey >= 192] = 1
        return mask

    items = []
    for trimap in _images(trimaps):  # only the images that have a trimap are labelled
        image = _find(images, trimap.stem)
        if image is None:
            raise DataError(f"{trimap}: trimap without an image {images / (trimap.stem + '.jpg')}")
        items.append(Item(trimap.stem, image, trimap, lambda t=trimap: read(t)))
    return Source(["background", "flower"], items, "Oxford 17 Category Flowers (Nilsback & Zisserman), trimaps",
                  "research use")  # fmt: skip


def _mat_split(root: Path, split: str) -> set[int] | None:
    if split == "all":
        return None
    path = root / "setid.mat"
    if not path.is_file():
        raise DataError(f"{path}: split={split!r} needs setid.mat")
    from scipy.io import loadmat

    key = {"train": "trnid", "val": "valid", "test": "tstid"}[split]
    return {int(i) for i in np.asarray(loadmat(path)[key]).ravel()}


def flowers102(cfg: PrepareConfig) -> Source:
    root = Path(cfg.src)
    images = _first_dir(root, ("jpg",))
    segmim = _first_dir(root, ("segmim",))
    keep = _mat_split(root, cfg.split)
    background = np.array(FLOWERS102_BACKGROUND, dtype=np.int16)

    def read(path: Path) -> np.ndarray:
        rgb = np.asarray(_open(path, "RGB"), dtype=np.int16)  # (H, W, 3)
        is_background = (np.abs(rgb - background) <= cfg.bg_tolerance).all(axis=-1)
        return (~is_background).astype(np.uint8)

    items = []
    for path in _images(images):
        n = path.stem.rsplit("_", 1)[-1]
        if keep is not None and int(n) not in keep:
            continue
        seg = _find(segmim, f"segmim_{n}")
        if seg is None:
            raise DataError(f"{segmim / f'segmim_{n}.jpg'}: missing mask for image {path}")
        items.append(Item(path.stem, path, seg, lambda s=seg: read(s)))
    return Source(["background", "flower"], items, "Oxford 102 Category Flowers (Nilsback & Zisserman), segmim",
                  "research use")  # fmt: skip


def cub(cfg: PrepareConfig) -> Source:
    root = Path(cfg.src)
    images = _first_dir(root, ("images",))
    seg_root = root / "segmentations" if (root / "segmentations").is_dir() else root.parent / "segmentations"
    if not seg_root.is_dir():
        raise DataError(f"{root / 'segmentations'}: folder not found (segmentations.tgz unpacks it beside images/)")
    keep = None
    if cfg.split != "all":
        if cfg.split == "val":
            raise DataError("split: CUB-200-2011 has only train and test")
        listing, flags = root / "images.txt", root / "train_test_split.txt"
        for path in (listing, flags):
            if not path.is_file():
                raise DataError(f"{path}: split={cfg.split!r} needs images.txt and train_test_split.txt")
        names = dict(line.split() for line in listing.read_text().splitlines() if line.strip())
        is_train = dict(line.split() for line in flags.read_text().splitlines() if line.strip())
        keep = {names[i] for i, t in is_train.items() if (t == "1") == (cfg.split == "train")}
    items = []
    for folder in sorted(p for p in images.iterdir() if p.is_dir()):
        for path in _images(folder):
            if keep is not None and f"{folder.name}/{path.name}" not in keep:
                continue
            mask_path = seg_root / folder.name / f"{path.stem}.png"
            if not mask_path.is_file():
                raise DataError(f"{mask_path}: missing mask for image {path}")
            items.append(Item(path.stem, path, mask_path, lambda m=mask_path: _binary(_grey(m), cfg.threshold)))
    return Source(["background", "bird"], items, "Caltech-UCSD Birds-200-2011 (Wah et al.), segmentations",
                  "research use")  # fmt: skip


def davis(cfg: PrepareConfig) -> Source:
    root = Path(cfg.src)
    frames_root = root / "JPEGImages" / cfg.resolution
    anno_root = root / "Annotations" / cfg.resolution
    for folder in (frames_root, anno_root):
        if not folder.is_dir():
            raise DataError(f"{folder}: folder not found (is `src` the DAVIS root?)")
    if cfg.split == "all":
        sequences = sorted(p.name for p in anno_root.iterdir() if p.is_dir())
    else:
        listing = root / "ImageSets" / "2017" / f"{cfg.split}.txt"
        if not listing.is_file():
            raise DataError(f"{listing}: no such split file")
        sequences = [s.strip() for s in listing.read_text().splitlines() if s.strip()]
    if cfg.frame_stride < 1:
        raise DataError(f"frame_stride must be >= 1, got {cfg.frame_stride}")

    def read(path: Path) -> np.ndarray:
        image = _open(path)
        if image.mode not in ("P", "L"):
            raise DataError(f"{path}: annotation mode {image.mode}, expected a palette PNG of object ids")
        ids = np.asarray(image).astype(np.uint8)
        if cfg.per_object:
            return ids  # 0 background, k object k, 255 void
        mask = (ids > 0).astype(np.uint8)
        mask[ids == IGNORE] = IGNORE
        return mask

    items = []
    for seq in sequences:
        annotations = _images(anno_root / seq)[:: cfg.frame_stride]
        for anno in annotations:
            frame = _find(frames_root / seq, anno.stem)
            if frame is None:
                raise DataError(f"{anno}: annotation without a frame in {frames_root / seq}")
            items.append(Item(f"{seq}_{anno.stem}", frame, anno, lambda a=anno: read(a)))
    classes = None if cfg.per_object else ["background", "foreground"]
    return Source(classes, items, f"DAVIS 2017 ({cfg.resolution}, {cfg.split})", "CC BY 4.0 (DAVIS terms)")


ADAPTERS: dict[str, Callable[[PrepareConfig], Source]] = {
    "celebamask-hq": celebamask_hq,
    "weizmann-horse": weizmann_horse,
    "flowers17": flowers17,
    "flowers102": flowers102,
    "cub": cub,
    "davis": davis,
}


# ---------------------------------------------------------------------------------------------------- writing
def _resize_shorter(image: Image.Image, mask: Image.Image, size: int) -> tuple[Image.Image, Image.Image]:
    w, h = image.size
    scale = size / min(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    return image.resize(new, Image.BICUBIC), mask.resize(new, Image.NEAREST)


def convert_item(item: Item, dst: Path, num_classes: int | None, size: int | None) -> tuple[str, int]:
    """Write one pair; returns (image file name, the largest class index in its mask)."""
    mask = item.read_mask()
    if mask.dtype != np.uint8 or mask.ndim != 2:
        raise DataError(f"{item.mask_source}: mask decoded to {mask.dtype} {mask.shape}, expected uint8 (H, W)")
    labelled = mask[mask != IGNORE]
    top = int(labelled.max(initial=0))
    if num_classes is not None and top >= num_classes:
        raise DataError(f"{item.mask_source}: class index {top} out of range for {num_classes} classes")
    image = _open(item.image)
    h, w = mask.shape
    copy = image.mode == "RGB" and size is None and item.image.suffix.lower() in (".jpg", ".jpeg", ".png")
    if image.size != (w, h):
        # An image larger than its mask with the same aspect ratio (CelebA-HQ) is brought to the mask's size.
        if abs(image.size[0] / image.size[1] - w / h) > 0.02 * (w / h):
            raise DataError(f"{item.mask_source}: mask size {(w, h)} does not match image {item.image} {image.size}")
        image, copy = image.convert("RGB").resize((w, h), Image.BICUBIC), False
    mask_image = Image.fromarray(mask, mode="L")
    if size is not None:
        image, mask_image = _resize_shorter(image.convert("RGB"), mask_image, size)
    ext = item.image.suffix.lower() if copy else ".png" if item.image.suffix.lower() == ".png" else ".jpg"
    if ext == ".jpeg":
        ext = ".jpg"
    image_out = dst / "images" / f"{item.id}{ext}"
    if copy:
        atomic_write(image_out, lambda tmp: shutil.copyfile(item.image, tmp))
    else:
        rgb = image.convert("RGB")
        atomic_write(image_out, lambda tmp: rgb.save(tmp, format="PNG" if ext == ".png" else "JPEG", quality=95))
    atomic_write(dst / "masks" / f"{item.id}.png", lambda tmp: mask_image.save(tmp, format="PNG"))
    return image_out.name, top


def convert(cfg: PrepareConfig, log: Callable[[str], None] | None = _log.info) -> Path:
    """Convert `cfg.src` (a public layout) into the paired folder `cfg.dst`; returns dst."""
    if cfg.layout not in ADAPTERS:
        raise DataError(f"layout: unknown layout {cfg.layout!r}; known: {sorted(ADAPTERS)}")
    if not cfg.src or not cfg.dst:
        raise DataError("src and dst are required (src=<public download> dst=<output folder>)")
    if not Path(cfg.src).is_dir():
        raise DataError(f"{cfg.src}: src folder not found")
    source = ADAPTERS[cfg.layout](cfg)
    items = sorted(source.items, key=lambda it: it.id)
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise DataError(f"{cfg.src}: duplicate item ids {dup} (output names must be unique)")
    if cfg.limit:
        items = items[: cfg.limit]
    if not items:
        raise DataError(f"{cfg.src}: no items found for layout {cfg.layout} (split={cfg.split})")
    dst = Path(cfg.dst)
    (dst / "images").mkdir(parents=True, exist_ok=True)
    (dst / "masks").mkdir(parents=True, exist_ok=True)
    num_classes = len(source.classes) if source.classes is not None else None
    top, written = 0, 0
    for i, item in enumerate(items):
        mask_out = dst / "masks" / f"{item.id}.png"
        done = mask_out.is_file() and any((dst / "images" / f"{item.id}{e}").is_file() for e in (".jpg", ".png"))
        if done and not cfg.overwrite:
            done_mask = np.asarray(_open(mask_out))
            top = max(top, int(done_mask[done_mask != IGNORE].max(initial=0)))  # per_object classes count it too
            continue
        _, item_top = convert_item(item, dst, num_classes, cfg.size)
        top, written = max(top, item_top), written + 1
        if log and (i + 1) % 500 == 0:
            log(f"[prepare] {i + 1}/{len(items)}")
    classes = source.classes or ["background"] + [f"object_{k}" for k in range(1, top + 1)]
    meta = {
        "name": cfg.name or dst.resolve().name,
        "classes": classes,
        "ignore_index": IGNORE,
        "source": source.description + (f", resized to shorter side {cfg.size}" if cfg.size else ""),
        "license": source.license,
    }
    atomic_write(dst / "dataset.json", lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1) + "\n"))
    if log:
        log(f"[prepare] {cfg.layout}: {len(items)} pairs in {dst} ({written} written, {len(items) - written} "
            f"already there), {len(classes)} classes")  # fmt: skip
    return dst


def prepare(cfg: PrepareConfig) -> Path:
    """The body of jobs/prepare_data.py: `convert`, then save the resolved config beside the output (an MLflow run,
    named prepare-<layout>)."""
    with Tracker(cfg.tracking, f"prepare-{cfg.layout}") as tracker:
        tracker.log_config(cfg)
        dst = convert(cfg)
        save_config(cfg, dst / "prepare_config.yaml")
        meta = json.loads((dst / "dataset.json").read_text())
        num = sum(1 for _ in (dst / "masks").glob("*.png"))
        tracker.log_metrics({"data/items": num, "data/classes": len(meta["classes"])})
        tracker.set_tags({"diffseg.data": str(dst.resolve())})
        tracker.log_artifact(dst / "dataset.json")
    _log.info(f"[prepare] data set : {dst.resolve()}")
    _log.info(f"[prepare] config   : {dst.resolve() / 'prepare_config.yaml'}")
    _log.info(f"[prepare] use it   : data.name=folder data.root={dst.resolve()}")
    return dst
