"""Peak memory of the ensemble's shuffled pixel stream must not grow with the number of labelled images.

The shards hold N images' labelled pixels at the paper's feature width (D = 8448, float16; the values are seeded
random numbers: memory and mixing do not depend on them, and no feature extractor has to run) and the images' real
masks (celebamask-hq-800 at --size, or synthetic scenes without ../shared), written as the extraction writes them (one
shard per batch of --batch-size images, row groups of `diffseg.data.shards.ROW_GROUP_ROWS`). The 10-member ensemble then
trains for --max-iters iterations from `train_ensemble`'s stream: windows of at most --buffer-mb of features gathered
from randomly chosen row groups of all shards, each member its own order. ONE process per run (run it once per image
count and compare): it prints the peak RSS after writing and after training, the window sizes, and how many shards
(images) each member's batches mix.

python bench/bench_stream_memory.py --num-images 8
python bench/bench_stream_memory.py --num-images 64
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from diffseg.data.datasets import DataConfig, build_dataset  # noqa: E402
from diffseg.data.shard_reader import ShardSet
from diffseg.data.shards import FeatureMeta, begin_shard_set, end_shard_set, write_shard
from diffseg.methods import pixel_training  # noqa: E402
from diffseg.methods.pixel_training import PixelTrainConfig, buffer_rows, train_ensemble

REPO = Path(__file__).resolve().parents[1]


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # ru_maxrss is KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-images", type=int, default=8)
    ap.add_argument("--size", type=int, default=32, help="image side")
    ap.add_argument("--dim", type=int, default=8448, help="feature width (the paper's 5 blocks x 3 timesteps)")
    ap.add_argument("--batch-size", type=int, default=2, help="images per shard (one extraction batch)")
    ap.add_argument("--buffer-mb", type=float, default=128.0, help="shuffle_buffer_mb of the ensemble (below 8 images)")
    ap.add_argument("--members", type=int, default=10)
    ap.add_argument("--max-iters", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "celebamask-hq-800"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if Path(args.data).is_dir():
        data = DataConfig(name="folder", root=args.data, image_size=args.size)
    else:
        data = DataConfig(name="synthetic", image_size=args.size, num_images=args.num_images)
    ds = build_dataset(data, "all")
    names = list(ds.class_names)
    rng = np.random.default_rng(0)
    base = peak_gb()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        meta = FeatureMeta(blocks=["bench"], timesteps=[0], feature_dim=args.dim, image_size=args.size,
                           num_classes=len(names), class_names=names, backbone="bench (random features)")  # fmt: skip
        begin_shard_set(tmp, [str(ds[i]["id"]) for i in range(args.num_images)])
        for start in range(0, args.num_images, args.batch_size):
            idx = range(start, min(start + args.batch_size, args.num_images))
            labels = np.concatenate([ds[i]["mask"].numpy().reshape(-1) for i in idx])
            ids = np.repeat([str(ds[i]["id"]) for i in idx], args.size**2)
            feats = rng.standard_normal((len(labels), args.dim), dtype=np.float32).astype(np.float16)
            yx = np.indices((args.size, args.size)).reshape(2, -1)
            ys, xs = np.tile(yx[0], len(idx)), np.tile(yx[1], len(idx))
            write_shard(Path(tmp) / f"shard-{start:05d}.parquet", feats, labels, ids, ys, xs, meta)
            del feats
        end_shard_set(tmp)
        ss = ShardSet(tmp)
        disk = sum(Path(p).stat().st_size for p in ss.paths) / 1024**3
        t_write = time.perf_counter() - t0
        print(
            f"{args.num_images} images: {ss.num_rows} pixels x {args.dim} dims in {len(ss)} shards, "
            f"{len(ss.pieces)} row groups ({disk:.2f} GB on disk), {t_write:.0f}s; peak RSS {peak_gb():.2f} GB"
        )

        mixing: list[int] = []  # distinct shards per member batch, recorded from the stream the trainer consumes
        real = pixel_training.pixel_batches

        def recording(*a, **kw):
            for batch in real(*a, **kw):
                mixing.extend(len(np.unique(row)) for row in batch.shard)
                yield batch

        pixel_training.pixel_batches = recording
        cfg = PixelTrainConfig(members=args.members, max_iterations=args.max_iters, shuffle_buffer_mb=args.buffer_mb)
        t1 = time.perf_counter()
        _, res = train_ensemble(ss, len(names), cfg)
        t_train = time.perf_counter() - t1
    set_gb = args.num_images * args.size**2 * args.dim * 2 / 1024**3
    print(
        f"ensemble: E={args.members}, {res.iterations} iterations in {t_train:.0f}s; windows of at most "
        f"{buffer_rows(cfg, args.dim)} rows ({args.buffer_mb:g} MB), largest {res.peak_rows_in_memory}, "
        f"{res.windows_per_epoch} per epoch; BatchNorm statistics: {res.bn_stats}; shards per member batch: "
        f"median {np.median(mixing):.0f}, min {min(mixing)}"
    )
    print(
        f"RESULT images={args.num_images} size={args.size} D={args.dim} buffer_mb={args.buffer_mb:g} "
        f"peak_rss={peak_gb():.2f}GB (python+torch at start {base:.2f}GB) labelled_set_float16={set_gb:.2f}GB "
        f"windows_per_epoch={res.windows_per_epoch} median_shards_per_batch={np.median(mixing):.0f} "
        f"train_s={t_train:.0f} threads={args.threads}"
    )


if __name__ == "__main__":
    main()
