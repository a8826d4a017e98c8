"""The diffusion process: golden schedules, q_sample identities, losses (learned sigma too), DDPM/DDIM, respacing,
explicit generators."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from diffseg.models.diffusion import (
    DiffusionConfig,
    GaussianDiffusion,
    build_diffusion,
    get_named_beta_schedule,
    sample_timesteps,
    space_timesteps,
)
from diffseg.models.unet import UNet, UNetConfig


def linear(T: int = 1000) -> GaussianDiffusion:
    return GaussianDiffusion(get_named_beta_schedule("linear", T))


def cosine(T: int = 1000) -> GaussianDiffusion:
    return GaussianDiffusion(get_named_beta_schedule("cosine", T))


# ---------------------------------------------------------------------------------------------------- schedules
def golden_items(reference_dir):
    """(schedule, array name, indices, values) for every array in diffusion_schedule.json.

    Keys are "[cosine ]name[i,j,k]"; a bare name ("betas") holds the first three and last three values.
    """
    data = json.loads((reference_dir / "diffusion_schedule.json").read_text())
    items = []
    for key, values in data.items():
        m = re.fullmatch(r"(?:(cosine|linear) )?(\w+)(?:\[([\d,]+)\])?", key)
        assert m, f"unexpected key {key!r} in diffusion_schedule.json"
        schedule, name, idx = m.group(1) or "linear", m.group(2), m.group(3)
        indices = [int(i) for i in idx.split(",")] if idx else [0, 1, 2, -3, -2, -1]
        assert len(indices) == len(values), key
        items.append((schedule, name, indices, values))
    return items


def test_golden_schedule_values(reference_dir):
    items = golden_items(reference_dir)
    assert {s for s, *_ in items} == {"linear", "cosine"}
    processes = {"linear": linear(1000), "cosine": cosine(1000)}
    for schedule, name, indices, values in items:
        ours = getattr(processes[schedule], name)
        assert ours.dtype == np.float64 and len(ours) == 1000
        np.testing.assert_allclose(ours[indices], values, rtol=1e-12, atol=0, err_msg=f"{schedule} {name}")


@pytest.mark.parametrize("T", [1, 10, 250, 1000, 4000])
def test_schedules_for_any_T(T):
    betas = get_named_beta_schedule("linear", T)
    # linear: scaled so that T=1000 has Ho et al.'s endpoints; the scale keeps the total noise comparable at any T
    assert betas.shape == (T,)
    # ... and clipped at 0.999 as the cosine schedule is, so that short schedules (T <= 20) stay valid
    ends = [1e-4 * 1000 / T, 0.02 * 1000 / T] if T > 1 else [0.1, 0.1]  # T=1: linspace keeps the start
    np.testing.assert_allclose(betas[[0, -1]], np.minimum(ends, 0.999))
    assert np.all(np.diff(betas) >= 0) and np.all(betas <= 0.999)
    d = linear(T)
    assert np.all(np.isfinite(d.sqrt_recipm1_alphas_cumprod)) and np.all(np.isfinite(d.posterior_log_variance_clipped))
    d = cosine(T)
    assert np.all(np.isfinite(d.sqrt_recipm1_alphas_cumprod))
    # cosine: alpha_bar(t) = f(t) / f(0), f(t) = cos^2((t/T + s) / (1 + s) * pi/2), wherever beta is not clipped
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    unclipped = np.cumsum(d.betas >= 0.999) == 0
    expected = np.array([f(t + 1) / f(0) for t in range(T)])
    np.testing.assert_allclose(d.alphas_cumprod[unclipped], expected[unclipped], rtol=1e-10)
    assert np.all(d.betas <= 0.999) and np.all(np.diff(d.alphas_cumprod) < 0) or T == 1
    with pytest.raises(ValueError, match="unknown beta schedule"):
        get_named_beta_schedule("quadratic", T)


def test_build_from_config():
    d = build_diffusion(DiffusionConfig(num_timesteps=100, schedule="cosine"))
    assert d.num_timesteps == 100 and np.array_equal(d.betas, get_named_beta_schedule("cosine", 100))
    with pytest.raises(ValueError, match="betas"):
        GaussianDiffusion(np.array([0.1, 0.0]))


# ---------------------------------------------------------------------------------------------------- forward process
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_x0_recovered_from_q_sample_and_true_noise(schedule):
    d = build_diffusion(DiffusionConfig(num_timesteps=1000, schedule=schedule))
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(8, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(8, 3, 8, 8, generator=g)
    t = torch.tensor([0, 1, 10, 100, 400, 700, 900, 999])
    x_t = d.q_sample(x0, t, noise)
    # the marginal's mean and std at each t
    abar = torch.as_tensor(d.alphas_cumprod[t.numpy()]).float().view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * noise)
    rec = d.predict_xstart_from_eps(x_t, t, noise)
    # float32 error grows like sqrt(1 / abar_t) (about 400 at cosine t=999)
    tol = 1e-6 * float(np.sqrt(1 / d.alphas_cumprod[t.numpy()]).max()) * 10
    torch.testing.assert_close(rec, x0, atol=tol, rtol=0)
    torch.testing.assert_close(d.predict_eps_from_xstart(x_t[1:], t[1:], x0[1:]), noise[1:], atol=1e-3, rtol=0)


def test_q_sample_statistics():
    """x_t of a constant image has mean sqrt(abar) x0 and variance 1 - abar."""
    d = linear(1000)
    g = torch.Generator().manual_seed(1)
    x0 = torch.full((4000, 1, 1, 1), 0.7)
    t = torch.full((4000,), 300)
    x_t = d.q_sample(x0, t, torch.randn(x0.shape, generator=g))
    abar = d.alphas_cumprod[300]
    assert abs(x_t.mean().item() - math.sqrt(abar) * 0.7) < 0.03
    assert abs(x_t.var().item() - (1 - abar)) < 0.05


def test_posterior_matches_bayes_rule():
    """q(x_{t-1} | x_t, x_0) from the coefficients equals the Gaussian product formula."""
    d = linear(100)
    for t in [1, 10, 99]:
        a, abar, abar_prev = 1 - d.betas[t], d.alphas_cumprod[t], d.alphas_cumprod[t - 1]
        # precision-weighted: 1/var = a / beta + 1 / (1 - abar_prev)
        var = 1 / (a / d.betas[t] + 1 / (1 - abar_prev))
        assert math.isclose(d.posterior_variance[t], var, rel_tol=1e-10)
        assert math.isclose(d.posterior_mean_coef1[t], var * math.sqrt(abar_prev) / (1 - abar_prev), rel_tol=1e-10)
        assert math.isclose(d.posterior_mean_coef2[t], var * math.sqrt(a) / d.betas[t], rel_tol=1e-10)
    del abar


# ---------------------------------------------------------------------------------------------------- losses
class Oracle(torch.nn.Module):
    """Knows the true noise; outputs [eps, v] with a learnable v (learned sigma) or eps alone."""

    def __init__(self, noise: torch.Tensor, learn_sigma: bool, v: float = -1.0):
        super().__init__()
        self.noise, self.learn_sigma = noise, learn_sigma
        self.eps_offset = torch.nn.Parameter(torch.zeros(()))
        self.v = torch.nn.Parameter(torch.full((), v))

    def forward(self, x, t):
        eps = self.noise + self.eps_offset
        return torch.cat([eps, self.v.expand_as(eps)], dim=1) if self.learn_sigma else eps


def test_epsilon_loss():
    d = linear(1000)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1, torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 5, 500, 999])
    losses = d.training_losses(Oracle(noise, learn_sigma=False), x0, t, noise)
    assert set(losses) == {"mse", "loss"} and losses["loss"].shape == (4,)
    torch.testing.assert_close(losses["loss"], torch.zeros(4))
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    torch.testing.assert_close(d.training_losses(zero, x0, t, noise)["mse"], (noise**2).mean(dim=(1, 2, 3)))


def test_learned_sigma_loss():
    """6 output channels: mse on eps + ADM's vb term; vb is 0 for the oracle at the true posterior variance, and
    it trains v only (the mean sees a stop-gradient)."""
    d = linear(1000)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1, torch.randn(3, 3, 8, 8, generator=g)
    t = torch.tensor([1, 300, 999])
    oracle = Oracle(noise, learn_sigma=True, v=-1.0)  # frac 0: the posterior variance, i.e. the true one
    losses = d.training_losses(oracle, x0, t, noise)
    assert set(losses) == {"mse", "vb", "loss"}
    torch.testing.assert_close(losses["vb"], torch.zeros(3), atol=1e-5, rtol=0)
    wrong = Oracle(noise, learn_sigma=True, v=0.5)
    losses = d.training_losses(wrong, x0, t, noise)
    assert (losses["vb"] > 0).all()
    losses["vb"].sum().backward()
    assert wrong.v.grad is not None and wrong.v.grad.abs() > 0
    assert wrong.eps_offset.grad is None or wrong.eps_offset.grad == 0  # stop-gradient on the mean
    # t = 0 uses the decoder NLL instead of the KL: finite and positive
    nll = d.training_losses(oracle, x0, torch.zeros(3, dtype=torch.long), noise)["vb"]
    assert torch.isfinite(nll).all() and (nll > 0).all()


def test_learned_sigma_unet_trains_and_samples():
    """An ADM-style U-Net with learn_sigma (6 output channels): loss, backward, DDPM and DDIM sampling."""
    torch.manual_seed(0)
    model = UNet(UNetConfig(image_size=8, model_channels=8, channel_mult=(1, 2), attention_resolutions=(4,),
                            learn_sigma=True))  # fmt: skip
    assert model.out[-1].out_channels == 6
    d = linear(10)
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    losses = d.training_losses(model, x0, torch.tensor([0, 9]), torch.randn_like(x0))
    losses["loss"].mean().backward()
    assert torch.isfinite(losses["loss"]).all() and model.out[-1].weight.grad.abs().sum() > 0
    g = torch.Generator().manual_seed(0)
    assert d.p_sample_loop(model, (2, 3, 8, 8), generator=g).shape == (2, 3, 8, 8)
    assert d.respace(5).ddim_sample_loop(model, (2, 3, 8, 8), generator=g).shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="channels"):
        d.split_output(torch.zeros(2, 4, 8, 8), x0)


# ---------------------------------------------------------------------------------------------------- respacing
@pytest.mark.parametrize("counts", [50, "ddim25", [10, 5, 3], "4,4", 1000])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_respacing_keeps_alphas_cumprod(counts, schedule):
    full = linear(1000) if schedule == "linear" else cosine(1000)
    kept = space_timesteps(1000, counts)
    r = full.respace(counts)
    assert list(r.timestep_map) == kept and r.num_timesteps == len(kept)
    np.testing.assert_allclose(r.alphas_cumprod, full.alphas_cumprod[kept], rtol=1e-9)
    if counts == 1000:
        np.testing.assert_allclose(r.betas, full.betas, rtol=1e-12)


def test_space_timesteps_rules():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(100, 10) == [0, 11, 22, 33, 44, 55, 66, 77, 88, 99]  # guided-diffusion's rounding
    assert space_timesteps(10, [2, 2]) == [0, 4, 5, 9]
    with pytest.raises(ValueError, match="cannot"):
        space_timesteps(10, 20)
    with pytest.raises(ValueError, match="integer stride"):
        space_timesteps(10, "ddim7")


def test_ddim_respaced_equals_ddim_on_the_full_schedule():
    """DDIM over a respaced process (eta=0) is DDIM on the full process's alphas_cumprod at the kept steps, and the
    model is called with the ORIGINAL timesteps."""
    full = cosine(1000)
    r = full.respace(10)
    seen = []

    def model(x, t):
        seen.append(t.tolist())
        return torch.tanh(x) * (t.float().view(-1, 1, 1, 1) / 1000)  # any deterministic function of (x, t)

    g = torch.Generator().manual_seed(3)
    noise = torch.randn(2, 3, 4, 4, generator=g)
    ours = r.ddim_sample_loop(model, noise.shape, noise=noise.clone(), clip_denoised=True)
    kept = space_timesteps(1000, 10)
    assert [s[0] for s in seen] == kept[::-1]

    x = noise.double()
    for i, step in reversed(list(enumerate(kept))):
        abar = full.alphas_cumprod[step]
        abar_prev = full.alphas_cumprod[kept[i - 1]] if i > 0 else 1.0
        eps = model(x.float(), torch.full((2,), step)).double()
        x0 = ((x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)).clamp(-1, 1)
        eps = (x - math.sqrt(abar) * x0) / math.sqrt(1 - abar)
        x = math.sqrt(abar_prev) * x0 + math.sqrt(1 - abar_prev) * eps
    torch.testing.assert_close(ours, x.float(), atol=1e-4, rtol=0)


def test_ddpm_posterior_of_respaced_process_matches_its_alphas():
    r = linear(1000).respace(25)
    # consecutive kept steps: beta_i = 1 - abar_i / abar_{i-1}
    np.testing.assert_allclose(1 - r.alphas_cumprod[1:] / r.alphas_cumprod[:-1], r.betas[1:], rtol=1e-10)
    assert np.all(r.posterior_variance[1:] > 0)


# ---------------------------------------------------------------------------------------------------- determinism
def _model(x, t):
    return 0.3 * x + 0.01 * t.float().view(-1, 1, 1, 1) / 1000


@pytest.mark.parametrize("sampler", ["ddpm", "ddim_eta1"])
def test_same_seed_same_samples(sampler):
    d = linear(30)

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        if sampler == "ddpm":
            return d.p_sample_loop(_model, (2, 3, 4, 4), generator=g)
        return d.respace(10).ddim_sample_loop(_model, (2, 3, 4, 4), generator=g, eta=1.0)

    a, b, c = draw(0), draw(0), draw(1)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_per_sample_generators_make_samples_independent_of_the_batch():
    d = linear(50)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    batch = d.p_sample_loop(_model, (3, 3, 4, 4), generator=gens([5, 6, 7]))
    alone = d.p_sample_loop(_model, (1, 3, 4, 4), generator=gens([6]))
    torch.testing.assert_close(batch[1:2], alone)
    with pytest.raises(ValueError, match="generators"):
        d.p_sample_loop(_model, (2, 3, 4, 4), generator=gens([1]))


def test_ddim_eta0_is_deterministic_given_the_noise():
    d = linear(100).respace(10)
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    a = d.ddim_sample_loop(_model, noise.shape, noise=noise, generator=torch.Generator().manual_seed(1))
    b = d.ddim_sample_loop(_model, noise.shape, noise=noise, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)


def test_sample_timesteps_uses_its_generator():
    a = sample_timesteps(64, 1000, torch.Generator().manual_seed(0), "cpu")
    b = sample_timesteps(64, 1000, torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(a, b) and a.min() >= 0 and a.max() < 1000
    assert not torch.equal(a, sample_timesteps(64, 1000, torch.Generator().manual_seed(1), "cpu"))


def test_one_step_processes_work():
    """T=1 (or a process respaced to one step) is valid: sampling and the loss run and are finite."""
    for d in (linear(1), cosine(1), linear(1000).respace(1)):
        g = torch.Generator().manual_seed(0)
        assert torch.isfinite(d.p_sample_loop(_model, (1, 3, 4, 4), generator=g)).all()
        assert torch.isfinite(d.ddim_sample_loop(_model, (1, 3, 4, 4), generator=g)).all()
        x0 = torch.zeros(1, 3, 4, 4)
        zero = lambda x, t: torch.zeros_like(x).repeat(1, 2, 1, 1)  # noqa: E731
        assert torch.isfinite(
            d.training_losses(zero, x0, torch.zeros(1, dtype=torch.long), torch.ones_like(x0))["loss"]
        ).all()
