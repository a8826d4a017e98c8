"""Stage `memory`: 256 px features of the LSUN-256 ADM (random weights, D=8448) on 8 and 64 images: GPU peak, RSS,
s/image."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from diffseg.data.datasets import SyntheticDataset
from diffseg.methods.features import FeatureConfig, FeatureExtractor, FeaturePipeline, feature_dim
from diffseg.models.diffusion import GaussianDiffusion
from diffseg.models.unet import build_unet, count_parameters
from kit.stage import SMOKE_ADM, Recorder, gpu_peak_gib, peak_rss_gib, sync


class TimedPipeline:
    """A FeaturePipeline that also adds up the time of its calls (synchronised), so a stage can tell the network's
    share of extraction from the host's (moving, reshaping and writing the features)."""

    def __init__(self, pipeline: FeaturePipeline):
        self.pipeline, self.cfg, self.model, self.seconds = pipeline, pipeline.cfg, pipeline.model, 0.0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self.pipeline(images)
        sync(out.device)
        self.seconds += time.perf_counter() - t0
        return out


def stage_memory(spec: dict, rec: Recorder) -> None:
    """256 px feature extraction, LSUN-256 ADM architecture (random weights), the paper's blocks and timesteps
    (D=8448), through the Ray Data job's callable (`FeatureExtractor`) called directly: GPU peak memory, host peak
    RSS and s/image after every call up to 8 and 64 images (one process; the peaks are running maxima), the
    network's share of the time apart. Shards are written as the job writes them, then deleted (64 images at 256 px
    are ~70 GB of float16 features)."""
    device = torch.device(spec["device"])
    counts = [2, 4] if spec["smoke"] else [8, 64]
    fcfg = FeatureConfig(backbone="adm-lsun256 (random init)")
    with torch.device(device):  # initialise on the device: 552M parameters
        model = build_unet(SMOKE_ADM if spec["smoke"] else "adm-lsun256").eval()
    size = model.cfg.image_size
    dim = feature_dim(model, fcfg.blocks, fcfg.timesteps)
    pipe = FeaturePipeline(fcfg, device, model=model, diffusion=GaussianDiffusion.from_config(fcfg.diffusion))
    timed_pipe = TimedPipeline(pipe)
    batch_size = 2 if spec["smoke"] else fcfg.batch_size
    rec.set(
        "setup",
        {
            "architecture": "toy 6-level ADM (smoke)" if spec["smoke"] else "adm-lsun256",
            "params_m": count_parameters(model) / 1e6,
            "image_size": size,
            "blocks": list(fcfg.blocks),
            "timesteps": list(fcfg.timesteps),
            "feature_dim": dim,
            "batch_size": batch_size,
            "precision": str(pipe.autocast or "fp32").removeprefix("torch."),
            "images": "synthetic scenes, every pixel labelled",
            "targets": counts,
        },
    )
    data = SyntheticDataset(max(counts), size, seed=0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    points, shard_bytes, done = [], 0, 0
    with tempfile.TemporaryDirectory(dir=spec["work"]) as tmp:
        fx = FeatureExtractor.from_pipeline(timed_pipe, tmp, {"num_classes": 5, "class_names": data.class_names})
        t0 = time.perf_counter()
        while done < max(counts):
            # One image first, so that even a box too short for a full batch at 256 px gives a row, then up to
            # batch_size images per call (the job's batch), landing on each target count.
            n = 1 if done == 0 else min(batch_size, *(c - done for c in counts if c > done))
            items = [data[i] for i in range(done, done + n)]
            batch = {
                "id": np.array([it["id"] for it in items]),
                "image": np.stack(
                    [((it["image"].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy() for it in items]
                ),
                "mask": np.stack([it["mask"].numpy().astype(np.uint8) for it in items]),
            }  # the rows the Ray Data reader gives the callable
            shard = Path(str(fx(batch)["shard"][0]))
            shard_bytes += shard.stat().st_size
            shard.unlink()
            done += len(items)
            sync(device)
            elapsed = time.perf_counter() - t0
            points.append(
                {
                    "images": done,
                    "batch": n,
                    "seconds": elapsed,
                    "s_per_image": elapsed / done,
                    "network_s_per_image": timed_pipe.seconds / done,
                    "gpu_peak_gib": gpu_peak_gib(device),
                    "rss_peak_gib": peak_rss_gib(),
                    "shard_gb_per_image": shard_bytes / done / 1e9,
                }
            )
            rec.set("points", points)
