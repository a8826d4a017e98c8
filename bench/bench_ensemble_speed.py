"""Ensemble training speed: E members as ONE batched module vs E separate MLPs trained one after another.

Both train on the same Parquet shards, with the same per-member batches (batch 64, Adam 1e-3, the paper's
architecture), for a fixed number of iterations, so the ratio is pure throughput. Prints measured figures.

python bench/bench_ensemble_speed.py [--members 10] [--dim 8448] [--classes 19] [--rows 20000] [--iters 200]
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

from diffseg.pixel import MLPEnsemble, ensemble_train_step, make_optimizer  # noqa: E402
from diffseg.shards import FeatureMeta, ShardSet, begin_shard_set, end_shard_set, write_shard  # noqa: E402


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, default=10)
    ap.add_argument("--dim", type=int, default=8448)
    ap.add_argument("--classes", type=int, default=19)
    ap.add_argument("--rows", type=int, default=20000, help="pixels over all shards")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    e, d, k = args.members, args.dim, args.classes
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        meta = FeatureMeta(
            blocks=["bench"], timesteps=[0], feature_dim=d, image_size=1, num_classes=k, backbone="bench"
        )
        per = args.rows // args.shards
        begin_shard_set(tmp, ["x"])
        for s in range(args.shards):
            write_shard(
                Path(tmp) / f"s{s}.parquet", rng.normal(size=(per, d)).astype(np.float16), rng.integers(0, k, per),
                ["x"] * per, np.zeros(per), np.zeros(per), meta,
            )  # fmt: skip
        end_shard_set(tmp)
        ss = ShardSet(tmp)
        data = list(batches(ss, e, 64, args.iters))  # identical batches for both, read once (I/O excluded)
        torch.manual_seed(0)
        mlps = [MLPEnsemble.member_mlp(d, k) for _ in range(e)]
        ens = MLPEnsemble.from_members(mlps)

        # warm-up (allocator, kernels) on copies, then time
        opt = make_optimizer(ens.parameters(), 1e-3)
        ensemble_train_step(ens, opt, *data[0])
        t0 = time.perf_counter()
        for x, y in data:
            ensemble_train_step(ens, opt, x, y)
        t_ens = time.perf_counter() - t0

        t0 = time.perf_counter()
        for m_i, mlp in enumerate(mlps):
            o = make_optimizer(mlp.parameters(), 1e-3)  # the same (fused) Adam
            for x, y in data:
                loss = F.cross_entropy(mlp(x[m_i]), y[m_i])
                o.zero_grad(set_to_none=True)
                loss.backward()
                o.step()
        t_sep = time.perf_counter() - t0
    print(
        f"E={e} D={d} K={k} batch=64 iterations={args.iters} threads={torch.get_num_threads()} "
        f"rows={ss.num_rows} in {args.shards} shards"
    )
    print(f"batched ensemble : {t_ens:8.2f} s  ({args.iters / t_ens:7.1f} it/s, all {e} members per iteration)")
    print(f"{e} separate MLPs : {t_sep:8.2f} s  ({args.iters * e / t_sep:7.1f} member-it/s)")
    print(f"speed-up (separate / batched) = {t_sep / t_ens:.2f}x")


if __name__ == "__main__":
    main()
