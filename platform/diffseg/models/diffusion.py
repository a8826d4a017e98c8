"""The Gaussian diffusion process, independent of any network.

Follows openai/guided-diffusion's `gaussian_diffusion.py` and `respace.py` (Ho et al. 2020; Nichol & Dhariwal 2021;
Song et al. 2021 for DDIM): schedules are computed in float64 and gathered per timestep; the model is an argument,
`model(x_t, t, **kwargs) -> eps` (3 channels) or `[eps, v]` (6 channels, learned sigma as ADM's "learned range").

Randomness is always explicit: every function that draws noise takes a `torch.Generator` or a list of them, one per
sample, so that a sample depends on its own seed and not on the batch it was drawn in (as in NVlabs/edm).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

Generator = torch.Generator | Sequence[torch.Generator] | None
Model = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class DiffusionConfig:
    num_timesteps: int = 1000  # T, the number of forward-process steps the model is trained on
    schedule: Literal["linear", "cosine"] = "linear"  # beta schedule (Ho et al. linear; Nichol & Dhariwal cosine)
    # How to sample (steps, eta) is the sampler's call (jobs/sample.py, the Serve request), not the process's.


def get_named_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    """Betas (float64, shape (T,)) of a named schedule, exactly as guided-diffusion computes them.

    The linear schedule is scaled so that any T matches Ho et al.'s endpoints at T=1000 (1e-4 to 0.02). For T <= 20
    the scaled betas would reach 1 (alpha_bar = 0, and every 1/alpha_bar would be infinite), so they are clipped at
    0.999 as the cosine schedule's are; for T > 20 the values are guided-diffusion's exactly.
    """
    if name == "linear":
        scale = 1000 / num_timesteps
        return np.minimum(np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64), 0.999)
    if name == "cosine":
        return betas_for_alpha_bar(num_timesteps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise ValueError(f"unknown beta schedule {name!r}; expected 'linear' or 'cosine'")


def betas_for_alpha_bar(num_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999):
    betas = []
    for i in range(num_timesteps):
        t1, t2 = i / num_timesteps, (i + 1) / num_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: int | str | Sequence[int]) -> list[int]:
    """The original timesteps kept when sampling with fewer steps (guided-diffusion's respacing).

    `section_counts` is an int (that many evenly strided steps, e.g. 50), a string "ddimN" (DDIM's stride rule), or a
    list of counts per equal section of [0, T) (e.g. [10, 15, 20]).
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim") :])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride from T={num_timesteps}")
        section_counts = [int(x) for x in section_counts.split(",")]
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx, all_steps = 0, []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot divide a section of {size} steps into {section_count}")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx, taken = 0.0, []
        for _ in range(section_count):
            taken.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        all_steps += taken
        start_idx += size
    return sorted(set(all_steps))


def randn(shape: Sequence[int], generator: Generator, device: torch.device | str, dtype=torch.float32):
    """Standard normal noise; with a list of generators, row i is drawn from generator i alone."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        return torch.stack(
            [torch.randn(tuple(shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator]
        ).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype).to(device)


# Schedule arrays already copied to a device, keyed by the array's id. A blocking host-to-device copy on every
# lookup would stall the host on every training and sampling step on a GPU (a pageable copy synchronises the stream);
# here each array is copied once per device. The weak reference drops the entry when its array is freed, before its
# id can be reused.
_ON_DEVICE: dict[int, tuple[weakref.ref, dict[torch.device, torch.Tensor]]] = {}


def _on_device(arr: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(arr, torch.Tensor):
        return arr.to(device)
    key = id(arr)
    entry = _ON_DEVICE.get(key)
    if entry is None or entry[0]() is not arr:
        entry = (weakref.ref(arr, lambda _ref, key=key: _ON_DEVICE.pop(key, None)), {})
        _ON_DEVICE[key] = entry
    copies = entry[1]
    if device not in copies:
        copies[device] = torch.tensor(arr, device=device)  # a copy: a tensor sharing arr would keep it alive
    return copies[device]


def _extract(arr: np.ndarray | torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """arr[t] as a float32 tensor broadcastable to a batch of `ndim` dims (B, 1, 1, 1)."""
    values = _on_device(arr, t.device)[t].float()
    return values.reshape(-1, *([1] * (ndim - 1)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of x in [-1, 1] under a Gaussian discretized to 256 bins (guided-diffusion's decoder NLL)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )


class GaussianDiffusion:
    """Schedules, the forward process, the training loss and the DDPM/DDIM samplers.

    :param betas: the (T,) float64 noise schedule.
    :param timestep_map: for a respaced process, the original timestep of each of its steps; the model is always
        called with original timesteps, so a model trained at T=1000 samples in 50 steps without retraining.
    """

    def __init__(self, betas: np.ndarray, timestep_map: Sequence[int] | None = None):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D array in (0, 1]")
        self.betas = betas
        self.num_timesteps = len(betas)
        self.timestep_map = np.asarray(timestep_map if timestep_map is not None else np.arange(len(betas)))
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t=0: clip the log to the t=1 value, as guided-diffusion does (a one-step
        # process, e.g. respaced to 1 step, has no t=1 and takes beta_0).
        first = self.posterior_variance[1] if len(betas) > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> GaussianDiffusion:
        return cls(get_named_beta_schedule(cfg.schedule, cfg.num_timesteps))

    def respace(self, section_counts: int | str | Sequence[int]) -> GaussianDiffusion:
        """A process over a subset of this one's timesteps with the same alphas_cumprod at the kept steps."""
        use = space_timesteps(self.num_timesteps, section_counts)
        last, new_betas = 1.0, []
        for i, alpha_cumprod in enumerate(self.alphas_cumprod):
            if i in use:
                new_betas.append(1 - alpha_cumprod / last)
                last = alpha_cumprod
        return GaussianDiffusion(np.array(new_betas), timestep_map=self.timestep_map[use])

    # ------------------------------------------------------------------ forward process
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps. The noise is always explicit."""
        return (
            _extract(self.sqrt_alphas_cumprod, t, x_start.ndim) * x_start
            + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.ndim) * noise
        )

    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (
            _extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
            - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps
        )

    def predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, x_start: torch.Tensor) -> torch.Tensor:
        return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - x_start) / _extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        mean = (
            _extract(self.posterior_mean_coef1, t, x_t.ndim) * x_start
            + _extract(self.posterior_mean_coef2, t, x_t.ndim) * x_t
        )
        return mean, _extract(self.posterior_log_variance_clipped, t, x_t.ndim)

    # ------------------------------------------------------------------ the model's p(x_{t-1} | x_t)
    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep the model sees: the original one for a respaced process."""
        return _on_device(self.timestep_map, t.device)[t]

    def split_output(self, output: torch.Tensor, x_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(eps, v) for a learned-sigma output with 2C channels, (eps, None) for C channels."""
        channels = x_t.shape[1]
        if output.shape[1] == channels:
            return output, None
        if output.shape[1] == 2 * channels:
            return output[:, :channels], output[:, channels:]
        raise ValueError(f"model output has {output.shape[1]} channels for an input of {channels}")

    def log_variance(self, v: torch.Tensor | None, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """Fixed small variance, or ADM's learned interpolation between beta_t and the posterior variance."""
        min_log = _extract(self.posterior_log_variance_clipped, t, ndim)
        if v is None:
            return min_log
        max_log = _extract(np.log(self.betas), t, ndim)
        frac = (v + 1) / 2
        return frac * max_log + (1 - frac) * min_log

    def p_mean_variance(self, model: Model, x_t, t, clip_denoised: bool = True, model_kwargs=None):
        output = model(x_t, self.model_timesteps(t), **(model_kwargs or {}))
        eps, v = self.split_output(output, x_t)
        x_start = self.predict_xstart_from_eps(x_t, t, eps)
        if clip_denoised:
            x_start = x_start.clamp(-1, 1)
        mean, _ = self.q_posterior_mean_variance(x_start, x_t, t)
        return {
            "mean": mean,
            "log_variance": self.log_variance(v, t, x_t.ndim),
            "pred_xstart": x_start,
            "eps": eps,
        }

    # ------------------------------------------------------------------ training
    def training_losses(
        self, model: Model, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, model_kwargs=None
    ) -> dict[str, torch.Tensor]:
        """Per-sample losses: `mse` on eps, plus ADM's `vb` term when the model learns sigma (`loss` = their sum).

        The vb term sees the mean through a stop-gradient, so the mean is trained by the MSE alone (ADM's hybrid loss).
        """
        x_t = self.q_sample(x_start, t, noise)
        output = model(x_t, self.model_timesteps(t), **(model_kwargs or {}))
        eps, v = self.split_output(output, x_t)
        mse = ((noise - eps.float()) ** 2).mean(dim=tuple(range(1, x_t.ndim)))
        terms = {"mse": mse}
        if v is not None:
            frozen = lambda *_args, **_kw: torch.cat([eps.detach(), v], dim=1)  # noqa: E731
            vb = self._vb_terms(frozen, x_start, x_t, t)
            # Scaled by T/1000 as guided-diffusion does for its hybrid loss.
            terms["vb"] = vb * self.num_timesteps / 1000.0
            terms["loss"] = mse + terms["vb"]
        else:
            terms["loss"] = mse
        return terms

    def _vb_terms(self, model, x_start, x_t, t):
        true_mean, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=False)
        kl = normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])
        kl = kl.mean(dim=tuple(range(1, x_t.ndim))) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        nll = nll.mean(dim=tuple(range(1, x_t.ndim))) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def p_sample_loop_progressive(
        self,
        model: Model,
        shape: Sequence[int],
        generator: Generator = None,
        device: torch.device | str = "cpu",
        noise: torch.Tensor | None = None,
        clip_denoised: bool = True,
        model_kwargs=None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """DDPM ancestral sampling; yields {"t", "sample", "pred_xstart"} after every step (t from T-1 to 0)."""
        x = noise.to(device) if noise is not None else randn(shape, generator, device)
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            out = self.p_mean_variance(model, x, t, clip_denoised, model_kwargs)
            z = randn(shape, generator, device) if i > 0 else torch.zeros_like(x)
            x = out["mean"] + torch.exp(0.5 * out["log_variance"]) * z
            yield {"t": t, "sample": x, "pred_xstart": out["pred_xstart"]}

    @torch.no_grad()
    def ddim_sample_loop_progressive(
        self,
        model: Model,
        shape: Sequence[int],
        generator: Generator = None,
        device: torch.device | str = "cpu",
        noise: torch.Tensor | None = None,
        eta: float = 0.0,
        clip_denoised: bool = True,
        model_kwargs=None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """DDIM sampling (Song et al. 2021, eq. 12) over this process's steps; respace first for fewer steps."""
        x = noise.to(device) if noise is not None else randn(shape, generator, device)
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            out = self.p_mean_variance(model, x, t, clip_denoised, model_kwargs)
            eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
            abar = _extract(self.alphas_cumprod, t, x.ndim)
            abar_prev = _extract(self.alphas_cumprod_prev, t, x.ndim)
            sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
            mean = out["pred_xstart"] * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - sigma**2) * eps
            if i > 0 and eta > 0:
                mean = mean + sigma * randn(shape, generator, device)
            x = mean
            yield {"t": t, "sample": x, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(self, model: Model, shape: Sequence[int], **kwargs) -> torch.Tensor:
        *_, last = self.p_sample_loop_progressive(model, shape, **kwargs)
        return last["sample"]

    def ddim_sample_loop(self, model: Model, shape: Sequence[int], **kwargs) -> torch.Tensor:
        *_, last = self.ddim_sample_loop_progressive(model, shape, **kwargs)
        return last["sample"]


def build_diffusion(cfg: DiffusionConfig) -> GaussianDiffusion:
    return GaussianDiffusion.from_config(cfg)


def sample_timesteps(batch_size: int, num_timesteps: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """Uniform training timesteps, drawn from an explicit generator."""
    gen_device = generator.device if generator is not None else device
    return torch.randint(0, num_timesteps, (batch_size,), generator=generator, device=gen_device).to(device)
