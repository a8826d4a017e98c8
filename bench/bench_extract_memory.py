"""Peak memory of extraction + ensemble training must not grow with the number of images.

The paper's recipe: the LSUN-256 ADM U-Net (552M parameters; random weights here -- no checkpoint can be downloaded
on this machine, and memory and speed do not depend on the values), decoder blocks dec.5,6,7,8,12 at t=50,150,250
-> 8448 feature dims. Images are celebamask-hq-800 (or synthetic scenes when ../shared is absent), resized to --size.

Each run is ONE process (run it once per image count and compare): it extracts features batch by batch with the
same callable class the Ray actors run (`FeatureExtractor`, here in-process so that its memory is this process's),
writes float16 Parquet shards, then trains the E-member ensemble by streaming the shards (shuffled windows of at most
--buffer-mb of features). It prints the peak RSS after each stage. The reference implementation (ddpm-segmentation)
holds every training pixel's float32 features in memory: images x size^2 x 8448 x 4 bytes (2.2 GB per 256x256 image).

python bench/bench_extract_memory.py --num-images 8 --size 256
python bench/bench_extract_memory.py --num-images 64 --size 64 --max-iters 300
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

from diffseg.data.datasets import DataConfig, build_dataset, item_ids  # noqa: E402
from diffseg.data.shard_reader import ShardSet
from diffseg.data.shards import begin_shard_set, end_shard_set
from diffseg.methods.features import FeatureConfig, FeatureExtractor, FeaturePipeline, feature_dim  # noqa: E402
from diffseg.methods.pixel_training import PixelTrainConfig, train_ensemble
from diffseg.models.diffusion import DiffusionConfig, GaussianDiffusion  # noqa: E402
from diffseg.models.unet import build_unet, count_parameters  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # ru_maxrss is KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-images", type=int, default=8)
    ap.add_argument("--size", type=int, default=256, help="image side (the architecture stays the 256 px ADM)")
    ap.add_argument("--batch-size", type=int, default=2, help="images per forward pass = per shard")
    ap.add_argument("--blocks", default="dec.5,dec.6,dec.7,dec.8,dec.12")
    ap.add_argument("--timesteps", default="50,150,250")
    ap.add_argument("--members", type=int, default=10)
    ap.add_argument("--max-iters", type=int, default=300, help="ensemble iterations (0 = the paper's stopping rule)")
    ap.add_argument("--buffer-mb", type=float, default=128.0, help="the ensemble's shuffle_buffer_mb (memory bound)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "celebamask-hq-800"))
    ap.add_argument("--out", default="", help="shard folder (default: a temporary one, deleted)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    blocks = tuple(args.blocks.split(","))
    timesteps = tuple(int(t) for t in args.timesteps.split(","))

    t0 = time.perf_counter()
    model = build_unet("adm-lsun256").eval()
    dim = feature_dim(model, blocks, timesteps)
    print(f"ADM LSUN-256: {count_parameters(model) / 1e6:.1f}M params; blocks {blocks} x t {timesteps} -> D = {dim}")
    cfg = FeatureConfig(backbone="adm-lsun256 (random init)", blocks=blocks, timesteps=timesteps, precision="fp32")
    pipe = FeaturePipeline(cfg, "cpu", model=model, diffusion=GaussianDiffusion.from_config(DiffusionConfig()))
    pipe.image_size = args.size  # a fully convolutional net: run the 256 px architecture at --size
    if Path(args.data).is_dir():
        data = DataConfig(name="folder", root=args.data, image_size=args.size)
    else:
        data = DataConfig(name="synthetic", image_size=args.size, num_images=args.num_images)
    ds = build_dataset(data, "all")
    names = list(ds.class_names)
    print(f"model built: peak RSS {peak_gb():.2f} GB ({time.perf_counter() - t0:.0f}s)")

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        fx = FeatureExtractor.from_pipeline(pipe, str(out), {"num_classes": len(names), "class_names": names})
        begin_shard_set(out, item_ids(ds)[: args.num_images])
        t1 = time.perf_counter()
        for start in range(0, args.num_images, args.batch_size):
            items = [ds[i] for i in range(start, min(start + args.batch_size, args.num_images))]
            batch = {
                "id": np.array([it["id"] for it in items]),
                "image": np.stack(
                    [((it["image"].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy() for it in items]
                ),
                "mask": np.stack([it["mask"].numpy().astype(np.uint8) for it in items]),
            }
            fx(batch)
            done = start + len(items)
            el = time.perf_counter() - t1
            print(f"  extracted {done}/{args.num_images} images ({el:.0f}s, peak RSS {peak_gb():.2f} GB)", flush=True)
        t_extract = time.perf_counter() - t1
        peak_extract = peak_gb()
        end_shard_set(out)
        ss = ShardSet(out)
        size_gb = sum(Path(p).stat().st_size for p in ss.paths) / 1024**3
        print(f"extraction: {ss.num_rows} labelled pixels x {ss.meta.feature_dim} dims in {len(ss)} shards "
              f"({size_gb:.2f} GB on disk), {t_extract:.0f}s; peak RSS {peak_extract:.2f} GB")  # fmt: skip
        del model, pipe, fx
        tcfg = PixelTrainConfig(members=args.members, max_iterations=args.max_iters, shuffle_buffer_mb=args.buffer_mb)
        t2 = time.perf_counter()
        ens, res = train_ensemble(ss, len(names), tcfg)
        t_train = time.perf_counter() - t2
    ref_gb = args.num_images * args.size**2 * dim * 4 / 1024**3
    print(
        f"ensemble: E={args.members}, {res.iterations} iterations, {t_train:.0f}s, shuffled in windows of at most "
        f"{args.buffer_mb:g} MB (largest {res.peak_rows_in_memory} rows, {res.windows_per_epoch} per epoch)"
    )
    print(
        f"RESULT images={args.num_images} size={args.size} D={dim} peak_rss_extract={peak_extract:.2f}GB "
        f"peak_rss_total={peak_gb():.2f}GB reference_features_in_memory={ref_gb:.2f}GB "
        f"extract_s={t_extract:.0f} train_s={t_train:.0f} threads={args.threads}"
    )


if __name__ == "__main__":
    main()
