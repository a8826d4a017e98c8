"""Stage `ensemble`: the batched MLP ensemble (E=10, D=8448) / ten MLPs trained one after another."""

from __future__ import annotations

from kit.stage import Recorder, progress


def stage_ensemble(spec: dict, rec: Recorder) -> None:
    """The batched E=10 MLP ensemble vs ten MLPs trained one after another (bench/bench_ensemble_speed.py)."""
    import bench_ensemble_speed

    # 4096 rows are enough for 200 batches of 64 per member (rows are drawn at random); 20000 rows of 8448 float16
    # features cost more Parquet writing than the whole time box on the GPU run of 2026-11-26.
    kw = dict(members=10, dim=8448, classes=19, rows=4096, shards=4, iters=200)
    progress("ensemble: writing shards and timing")
    if spec["smoke"]:
        kw.update(dim=64, rows=2000, shards=2, iters=10)
    rec.set("result", bench_ensemble_speed.measure(**kw, device=spec["device"]))
