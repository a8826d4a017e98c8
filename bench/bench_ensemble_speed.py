"""Ensemble training speed: E members as ONE batched module vs E separate MLPs trained one after another.

Both train on the same Parquet shards, with the same per-member batches (batch 64, Adam 1e-3, the paper's
architecture), for a fixed number of iterations, so the ratio is pure throughput. Prints measured figures.

python bench/bench_ensemble_speed.py [--members 10] [--dim 8448] [--classes 19] [--rows 20000] [--iters 200]
python bench/bench_ensemble_speed.py --device cuda        # the GPU speed-up (also stage `ensemble` of gpu_kit.py)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from diffseg.data.shard_reader import ShardSet
from diffseg.data.shards import FeatureMeta, begin_shard_set, end_shard_set, write_shard
from diffseg.methods.pixel import MLPEnsemble
from diffseg.methods.pixel_training import ensemble_train_step, make_optimizer


def batches(ss: ShardSet, members: int, batch: int, iters: int, seed: int = 0):
    """The (E, B) row batches both trainers see: per shard, each member its own permutation."""
    rng = np.random.default_rng(seed)
    done = 0
    while True:
        for shard in ss.iter_shards(shuffle=True, seed=seed + done, columns=["features", "label"]):
            feats, labels = torch.from_numpy(shard.features), torch.from_numpy(shard.labels)
            n = len(labels)
            order = torch.from_numpy(np.stack([rng.permutation(n) for _ in range(members)]))
            for s in range(0, n - batch + 1, batch):
                idx = order[:, s : s + batch]
                yield feats[idx].float(), labels[idx]
                done += 1
                if done >= iters:
                    return


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    members: int = 10,
    dim: int = 8448,
    classes: int = 19,
    rows: int = 20000,
    shards: int = 4,
    iters: int = 200,
    device: torch.device | str = "cpu",
) -> dict:
    """Seconds for `iters` iterations of the batched ensemble and of `members` separate MLPs on the same batches
    (read once from shards, then held on `device`: I/O excluded). -> {"batched_s", "separate_s", "speedup", ...}."""
    device = torch.device(device)
    e, d, k = members, dim, classes
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        meta = FeatureMeta(
            blocks=["bench"], timesteps=[0], feature_dim=d, image_size=1, num_classes=k, backbone="bench"
        )
        per = rows // shards
        begin_shard_set(tmp, ["x"])
        for s in range(shards):
            write_shard(
                Path(tmp) / f"s{s}.parquet", rng.normal(size=(per, d)).astype(np.float16), rng.integers(0, k, per),
                ["x"] * per, np.zeros(per), np.zeros(per), meta,
            )  # fmt: skip
        end_shard_set(tmp)
        ss = ShardSet(tmp)
        # identical batches for both, read once (I/O excluded)
        data = [(x.to(device), y.to(device)) for x, y in batches(ss, e, 64, iters)]
        num_rows = ss.num_rows
    torch.manual_seed(0)
    mlps = [MLPEnsemble.member_mlp(d, k).to(device) for _ in range(e)]
    ens = MLPEnsemble.from_members(mlps).to(device)

    # warm-up (allocator, kernels), then time
    opt = make_optimizer(ens.parameters(), 1e-3)
    ensemble_train_step(ens, opt, *data[0])
    sync(device)
    t0 = time.perf_counter()
    for x, y in data:
        ensemble_train_step(ens, opt, x, y)
    sync(device)
    t_ens = time.perf_counter() - t0

    t0 = time.perf_counter()
    for m_i, mlp in enumerate(mlps):
        o = make_optimizer(mlp.parameters(), 1e-3)  # the same (fused) Adam
        for x, y in data:
            loss = F.cross_entropy(mlp(x[m_i]), y[m_i])
            o.zero_grad(set_to_none=True)
            loss.backward()
            o.step()
    sync(device)
    t_sep = time.perf_counter() - t0
    return {
        "members": e, "dim": d, "classes": k, "batch": 64, "iters": len(data), "rows": num_rows, "shards": shards,
        "device": str(device), "batched_s": t_ens, "separate_s": t_sep, "speedup": t_sep / t_ens,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, default=10)
    ap.add_argument("--dim", type=int, default=8448)
    ap.add_argument("--classes", type=int, default=19)
    ap.add_argument("--rows", type=int, default=20000, help="pixels over all shards")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the batches are moved there before timing)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    r = measure(args.members, args.dim, args.classes, args.rows, args.shards, args.iters, args.device)
    e, iters = r["members"], r["iters"]
    print(
        f"E={e} D={r['dim']} K={r['classes']} batch=64 iterations={iters} threads={torch.get_num_threads()} "
        f"rows={r['rows']} in {r['shards']} shards on {r['device']}"
    )
    print(
        f"batched ensemble : {r['batched_s']:8.2f} s  ({iters / r['batched_s']:7.1f} it/s, "
        f"all {e} members per iteration)"
    )
    print(f"{e} separate MLPs : {r['separate_s']:8.2f} s  ({iters * e / r['separate_s']:7.1f} member-it/s)")
    print(f"speed-up (separate / batched) = {r['speedup']:.2f}x")


if __name__ == "__main__":
    main()
