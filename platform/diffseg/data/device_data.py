"""Training batches that never leave the device: the training split decoded once into a uint8 tensor there, batches
drawn by index and augmented as batched tensor ops (flip, roll, translate, crop_scale: the transforms of
`diffseg.data.augment`, the same distributions), with no host round trip and no host sync per step.

    batches = DeviceBatches.build(dataset, batch_size, device, seed=..., flip=..., roll=..., ...)
    batch = next(batches)   # {"image": (B, 3, H, W) float32 in [-1, 1]} on `device`

A small model's training step on a GPU takes a fraction of a millisecond; a DataLoader that decodes, augments and
collates items one by one in Python, then copies them over, sets the pace instead (194 images/s on an H100, issue
33). Here a step's data costs a handful of kernels. The whole split is held (6000 x 3 x 32 x 32 is 18 MB), so the
loop uses this only below `MAX_BYTES`; with several workers, every rank draws the same permutation and takes its
own slice of each global batch (as a DistributedSampler would).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MAX_BYTES = 2 * 2**30  # the most a training split may take on the device as uint8 (loop.data_on_device=auto)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) float in [-1, 1] -> uint8 (exact for images decoded from 8-bit files, as ours are)."""
    return ((images.float() + 1) * 127.5).round_().clamp_(0, 255).to(torch.uint8)


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 in [-1, 1], as `datasets.to_tensor_image` makes them."""
    return images.float().div_(127.5).sub_(1)


def dataset_images(dataset: torch.utils.data.Dataset) -> torch.Tensor:
    """Every image of a data set, un-augmented, as uint8 (N, 3, H, W) on the CPU (read once, item by item)."""
    if hasattr(dataset, "arrays"):  # the layers testbed renders all at once
        images, _ = dataset.arrays()
        return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return torch.stack([to_uint8(dataset[i]["image"][None])[0] for i in range(len(dataset))])


@dataclass(frozen=True)
class Augment:
    flip: bool = False
    roll: bool = False
    crop_scale: float = 1.0
    translate: float = 0.0

    @property
    def any(self) -> bool:
        return self.flip or self.roll or self.crop_scale < 1 or self.translate > 0


def augment_batch(x: torch.Tensor, aug: Augment, generator: torch.Generator) -> torch.Tensor:
    """Batched `diffseg.data.augment.augment` on images (B, C, H, W) (float, any device; `generator` on it), in
    its order: translate (zero-filled), crop_scale (a crop resized back, bilinear), roll, flip; each row its own draw.
    """
    b, _, h, w = x.shape
    dev = x.device

    def draw(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=generator, device=dev)

    if aug.translate > 0:  # a whole-pixel shift in [-r, r] per axis, the uncovered border 0 (mid-grey)
        r = int(aug.translate * max(h, w))
        d = (draw(b, 2) * (2 * r + 1)).floor().long() - r  # (B, 2): dy, dx
        x = _gather_shift(x, d[:, 0], d[:, 1], wrap=False)
    if aug.crop_scale < 1:  # a square of side s * H at a uniform place, resized back (bilinear)
        u = draw(b, 3)
        s = aug.crop_scale + (1 - aug.crop_scale) * u[:, 0]  # (B,)
        side = (s * min(h, w)).round().clamp(min=1)
        top = (u[:, 1] * (h - side + 1)).floor()
        left = (u[:, 2] * (w - side + 1)).floor()
        x = _crop_resize(x, top, left, side)
    if aug.roll:  # a uniform circular shift in both axes
        d = (draw(b, 2) * max(h, w)).floor().long()
        x = _gather_shift(x, d[:, 0] % h, d[:, 1] % w, wrap=True)
    if aug.flip:
        flip = draw(b) < 0.5  # (B,)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


def _gather_shift(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, wrap: bool) -> torch.Tensor:
    """x (B, C, H, W) moved by (dy, dx) per row: wrapped around (a roll), or with a zero border."""
    b, c, h, w = x.shape
    ys = torch.arange(h, device=x.device)[None, :] - dy[:, None]  # (B, H): the source row of each row
    xs = torch.arange(w, device=x.device)[None, :] - dx[:, None]  # (B, W)
    if wrap:
        ys, xs = ys % h, xs % w
        valid = None
    else:
        valid = ((ys >= 0) & (ys < h))[:, :, None] & ((xs >= 0) & (xs < w))[:, None, :]  # (B, H, W)
        ys, xs = ys.clamp(0, h - 1), xs.clamp(0, w - 1)
    idx = (ys[:, :, None] * w + xs[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)  # (B, C, H*W)
    out = x.reshape(b, c, h * w).gather(2, idx).reshape(b, c, h, w)
    return out if valid is None else out * valid[:, None].to(out.dtype)


def _crop_resize(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
    """Per row, the square [top, top + side) x [left, left + side) resized to (H, W), bilinear: `F.interpolate` of
    the crop (align_corners=False, the crop's edge pixels repeated beyond it), by one `grid_sample` for the batch."""
    b, _, h, w = x.shape

    def coords(start: torch.Tensor, n: int) -> torch.Tensor:  # (B, n) normalised source coordinates
        p = start[:, None] + (torch.arange(n, device=x.device)[None] + 0.5) * side[:, None] / n - 0.5  # pixels
        p = torch.minimum(torch.maximum(p, start[:, None]), (start + side - 1)[:, None])  # clamped to the crop
        return (2 * p + 1) / n - 1

    gy, gx = coords(top, h), coords(left, w)
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)  # (B, H, W, 2): (x, y)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=False)


class DeviceBatches(Iterator[dict[str, torch.Tensor]]):
    """An endless stream of local batches {"image": (b, 3, H, W) float32} drawn from a uint8 tensor on the device.

    Epoch e is a permutation drawn from (seed, e) alone (the same on every rank); global batch i is its rows
    [i B, (i + 1) B) (drop_last), of which rank r takes [r b, (r + 1) b). Augmentation draws from a generator on the
    device seeded by (seed, rank, start step), as the loop's timesteps are.
    """

    def __init__(
        self,
        images: torch.Tensor,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        start_step: int = 0,
        augment: Augment = Augment(),
    ):
        if batch_size % world:
            raise ValueError(f"batch size {batch_size} is not divisible by {world} workers")
        if len(images) < batch_size:
            raise ValueError(f"the training set has {len(images)} images, fewer than one batch ({batch_size})")
        self.images, self.batch_size, self.seed = images, batch_size, seed
        self.local = batch_size // world
        self.rank, self.augment = rank, augment
        self.per_epoch = len(images) // batch_size
        self.step = start_step
        self.epoch, self.perm = -1, None
        dev = images.device
        self.gen = torch.Generator(device=dev).manual_seed((seed * 1_000_003 + rank) * 1_000_003 + start_step + 7)

    @classmethod
    def build(cls, dataset: torch.utils.data.Dataset, batch_size: int, device: torch.device, **kw) -> DeviceBatches:
        return cls(dataset_images(dataset).to(device), batch_size, **kw)

    def _permutation(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator(device=self.images.device).manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.images), generator=gen, device=self.images.device)

    def __next__(self) -> dict[str, torch.Tensor]:
        epoch, i = divmod(self.step, self.per_epoch)
        if epoch != self.epoch:
            self.epoch, self.perm = epoch, self._permutation(epoch)
        start = i * self.batch_size + self.rank * self.local
        idx = self.perm[start : start + self.local]  # (b,) on the device: no host sync
        x = from_uint8(self.images[idx])  # (b, 3, H, W)
        if self.augment.any:
            x = augment_batch(x, self.augment, self.gen)
        self.step += 1
        return {"image": x}
