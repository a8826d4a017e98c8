"""The models behind the Serve deployments, Ray-free: the factorized segmenter, the pixel-ensemble bundle and the
diffusion sampler, each loaded through the one loader and called with validated, fixed-size float arrays. The
segmenters themselves are the jobs' `Segmenter`s; these wrappers add what serving needs (per-request t and seeds,
`info()` for /v1/info, a step generator for the sample scheduler)."""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from diffseg.core import viz
from diffseg.core.runtime import image_generators, image_seed, resolve_device
from diffseg.methods import segment
from diffseg.methods.pixel import PixelSegmenter
from diffseg.methods.sampling import sample_progressive
from diffseg.models.checkpoint import LoadedModel, fetched_source, load_diffusion_model
from diffseg.serving.requests import SampleParams


class ServedModel(Protocol):
    """What a Serve model replica needs from a segmenter: validated (B, 3, S, S) arrays in, arrays out, and info.

    The segmenters themselves are `diffseg.scoring.segmenter.Segmenter`s (the ones the jobs and `evaluate` use); these
    adapters only convert arrays and describe the model for /v1/info.
    """

    method: str

    def info(self) -> dict[str, Any]: ...

    def segment(self, images: np.ndarray, ts: Sequence[int], seeds: Sequence[int]) -> list[dict[str, np.ndarray]]:
        """(B, 3, S, S) float32 in [-1, 1] -> per image {"probs": (C, S, S)} or {"labels", "uncertainty"}."""
        ...


class FactorizedSegmenter:
    """Serves `diffseg.methods.segment.FactorizedSegmenter`: K soft masks from one forward pass at noise level t.

    A request's `seed` is the seed of a run of one image: its noise is `image_seed(seed, 0)`, the noise
    `jobs/segment.py seed=<seed>` gives the first image of its data set.
    """

    method = "factorized"

    def __init__(self, segmenter: segment.FactorizedSegmenter):
        self.segmenter = segmenter
        self.device = next(segmenter.model.parameters()).device

    @classmethod
    def load(cls, source: str, device: str = "auto", use_ema: bool = True) -> FactorizedSegmenter:
        return cls(segment.FactorizedSegmenter.load(source, device, use_ema))

    def info(self) -> dict[str, Any]:
        seg = self.segmenter
        return {
            "method": self.method,
            "kind": "factorized",
            "source": seg.source,
            "step": seg.step,
            "image_size": seg.image_size,
            "num_components": len(seg.class_names),
            "class_names": list(seg.class_names),
            "num_timesteps": seg.diffusion.num_timesteps,
            "default_t": seg.t,
            "num_classes": seg.model.cfg.num_classes,
            "device": str(self.device),
            "num_parameters": sum(p.numel() for p in seg.model.parameters()),
        }

    @torch.no_grad()
    def segment(self, images: np.ndarray, ts: Sequence[int], seeds: Sequence[int]) -> list[dict[str, np.ndarray]]:
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))  # (B, 3, S, S)
        out: list[dict[str, np.ndarray] | None] = [None] * len(x)
        for t in sorted(set(ts)):  # one forward pass per distinct t in the batch
            idx = [i for i, ti in enumerate(ts) if ti == t]
            res = self.segmenter.segment(x[idx], [image_seed(int(seeds[i]), 0) for i in idx], t=int(t))
            for j, i in enumerate(idx):
                out[i] = {"probs": res.probs[j].numpy()}  # (K, S, S)
        return out


class PixelEnsembleSegmenter:
    """Adapter for a pixel-segmenter bundle (`diffseg.methods.pixel.PixelSegmenter`): DDPM features + MLP ensemble +
    class names. Labels are the ensemble's majority vote; the uncertainty is its per-pixel disagreement (entropy of the
    mean softmax minus the mean entropy), as the bundle computes it.

    The adapter needs of the bundle only `class_names`, `image_size` and `predict(images (B, 3, S, S) in [-1, 1])
    -> (labels (B, S, S), uncertainty (B, S, S))` (arrays or tensors).
    """

    method = "pixel"

    def __init__(self, bundle, *, source: str, device: torch.device):
        self.bundle, self.source, self.device = bundle, source, device

    @classmethod
    def load(cls, source: str, device: str = "auto") -> PixelEnsembleSegmenter:
        dev = resolve_device(device)
        with fetched_source(source) as local:  # a downloaded model is removed once read
            bundle = PixelSegmenter.load(local, device=dev)
            bundle.pipeline  # noqa: B018 -- the backbone now, while a packaged one is still on disk
        return cls(bundle, source=source, device=dev)

    def info(self) -> dict[str, Any]:
        names = list(self.bundle.class_names)
        extra = getattr(self.bundle, "extra", {}) or {}
        return {
            "method": self.method,
            "kind": "pixel-ensemble",
            "source": self.source,
            "step": extra.get("step"),
            "image_size": int(self.bundle.image_size),
            "class_names": names,
            "num_classes": len(names),
            "device": str(self.device),
            "extra": {k: v for k, v in extra.items() if isinstance(v, (str, int, float, bool))},
        }

    @torch.no_grad()
    def segment(self, images: np.ndarray, ts: Sequence[int], seeds: Sequence[int]) -> list[dict[str, np.ndarray]]:
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))  # (B, 3, S, S); t, seed unused
        labels, uncertainty = self.bundle.predict(x)
        labels = labels.cpu().numpy() if torch.is_tensor(labels) else np.asarray(labels)
        unc = uncertainty.float().cpu().numpy() if torch.is_tensor(uncertainty) else np.asarray(uncertainty)
        return [{"labels": labels[i].astype(np.int32), "uncertainty": unc[i].astype(np.float32)} for i in range(len(x))]


class DiffusionSampler:
    """DDIM sampling from a DDPM or factorized checkpoint; the factorized one also gives each image its masks.

    Image j of a request seeded `seed` uses `image_generators(seed, [j])`: the images `jobs/sample.py seed=<seed>`
    writes first, bit for bit on the same device.
    """

    def __init__(self, loaded: LoadedModel):
        self.model, self.diffusion = loaded.model, loaded.diffusion
        self.source, self.step, self.device = loaded.source, loaded.step, loaded.device

    @classmethod
    def load(cls, source: str, device: str = "auto", use_ema: bool = True) -> DiffusionSampler:
        return cls(load_diffusion_model(source, device, use_ema))

    def info(self) -> dict[str, Any]:
        cfg = self.model.cfg
        k = getattr(self.model, "num_components", None)
        return {
            "kind": "factorized" if k else "ddpm",
            "source": self.source,
            "step": self.step,
            "image_size": cfg.image_size,
            "num_components": k,
            "num_classes": cfg.num_classes,
            "num_timesteps": self.diffusion.num_timesteps,
            "device": str(self.device),
            "num_parameters": sum(p.numel() for p in self.model.parameters()),
        }

    def sample(self, requests: Sequence[SampleParams]) -> list[dict[str, np.ndarray | None]]:
        """Run to the end: one batched DDIM run per distinct step count -> per request {"images" (N, H, W, 3) uint8,
        "labels"}."""
        out: list[dict[str, np.ndarray | None] | None] = [None] * len(requests)
        for steps in sorted({r.steps for r in requests}):
            idx = [i for i, r in enumerate(requests) if r.steps == steps]
            for i, result in zip(idx, run_steps(self.sample_steps([requests[i] for i in idx]))):
                out[i] = result
        return out

    @torch.no_grad()
    def sample_steps(
        self, requests: Sequence[SampleParams]
    ) -> Generator[int, None, list[dict[str, np.ndarray | None]]]:
        """One batched DDIM run for requests with the same step count, as a generator: it yields the number of images
        after every step (so a scheduler can interleave runs and drop a cancelled one between two steps) and returns
        the per-request results. Image j of a request uses `image_generators(seed, [j])` (the one seeding rule), so an
        answer does not depend on what else shares its batch and equals what `jobs/sample.py` writes."""
        steps = {r.steps for r in requests}
        if len(steps) != 1:
            raise ValueError(f"one step count per batched run, got {sorted(steps)}")
        gens = [g for r in requests for g in image_generators(r.seed, range(r.num_images))]
        y = None
        if self.model.cfg.num_classes:
            y = torch.tensor([r.label for r in requests for _ in range(r.num_images)]).to(self.device)
        last = None
        for out in sample_progressive(
            self.model, self.diffusion, len(gens), steps=steps.pop(), generator=gens, device=self.device, y=y
        ):
            last = out
            yield len(gens)
        images_u8 = viz.to_uint8(last["sample"].clamp(-1, 1))  # (N, H, W, 3)
        masks = last.get("masks")
        labels = masks.argmax(dim=1).to(torch.uint8).cpu().numpy() if masks is not None else None
        results, start = [], 0
        for r in requests:
            n = r.num_images
            part = labels[start : start + n] if labels is not None else None
            results.append({"images": images_u8[start : start + n], "labels": part})
            start += n
        return results


def run_steps(gen: Generator[Any, None, Any]) -> Any:
    """Drive a step generator to its end; its return value."""
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value
