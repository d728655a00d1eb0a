"""The diffusion core against straightforward re-derivations and diffusers' schedulers."""

import math

import numpy as np
import pytest
import torch
from helpers import tiny_model

import dit_compress
from dit_compress.diffusion.gaussian import GaussianDiffusion, space_timesteps


def _reference_hybrid_loss(out, x0, noise, t):
    """Per-sample hybrid loss written out from the formulas, in float64, one sample at a time."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    abar = np.cumprod(1 - betas)
    C = x0.shape[0]
    eps_hat = out[:C].double().numpy()
    v = out[C:].double().numpy()
    x0n, nz = x0.double().numpy(), noise.double().numpy()
    ab = abar[t]
    ab_prev = abar[t - 1] if t > 0 else 1.0
    xt = math.sqrt(ab) * x0n + math.sqrt(1 - ab) * nz
    mse = np.mean((nz - eps_hat) ** 2)
    post_var = betas * (1 - np.append(1.0, abar[:-1])) / (1 - abar)
    min_log = math.log(post_var[1] if t == 0 else post_var[t])
    max_log = math.log(betas[t])
    frac = (v + 1) / 2
    logvar = frac * max_log + (1 - frac) * min_log
    pred_x0 = (xt - math.sqrt(1 - ab) * eps_hat) / math.sqrt(ab)

    def post_mean(x_start):
        return (math.sqrt(ab_prev) * betas[t] / (1 - ab)) * x_start + (math.sqrt(1 - betas[t]) * (1 - ab_prev) / (1 - ab)) * xt

    mean = post_mean(pred_x0)
    if t == 0:
        def cdf(z):
            return 0.5 * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))

        inv = np.exp(-0.5 * logvar)
        c = x0n - mean
        plus, minus = cdf(inv * (c + 1 / 255)), cdf(inv * (c - 1 / 255))
        lp = np.where(x0n < -0.999, np.log(np.maximum(plus, 1e-12)),
                      np.where(x0n > 0.999, np.log(np.maximum(1 - minus, 1e-12)), np.log(np.maximum(plus - minus, 1e-12))))
        vb = -np.mean(lp) / math.log(2)
    else:
        true_mean, true_logvar = post_mean(x0n), math.log(post_var[t])
        kl = 0.5 * (-1 + logvar - true_logvar + np.exp(true_logvar - logvar) + (true_mean - mean) ** 2 * np.exp(-logvar))
        vb = np.mean(kl) / math.log(2)
    return mse + vb, mse, vb


@pytest.mark.parametrize("t", [0, 1, 10, 500, 999])
def test_training_loss_matches_rederivation(t):
    m = tiny_model()
    g = torch.Generator().manual_seed(t)
    x0 = torch.rand(3, 4, 8, 8, generator=g) * 2 - 1
    x0[0, 0, 0, :2] = torch.tensor([-1.0, 1.0])  # edge bins of the decoder likelihood
    noise = torch.randn(3, 4, 8, 8, generator=g)
    y = torch.tensor([1, 2, 10])
    tt = torch.full((3,), t)
    res = dit_compress.training_losses(m, x0, tt, y, noise=noise)
    d = GaussianDiffusion.create()
    with torch.no_grad():
        out = m(d.q_sample(x0, tt, noise), tt, y)
    for i in range(3):
        loss, mse, vb = _reference_hybrid_loss(out[i], x0[i], noise[i], t)
        assert res["mse"][i].item() == pytest.approx(mse, rel=1e-4, abs=1e-6)
        assert res["vb"][i].item() == pytest.approx(vb, rel=1e-3, abs=1e-5)
        assert res["loss"][i].item() == pytest.approx(loss, rel=1e-3, abs=1e-5)


def test_vb_term_does_not_train_eps():
    m = tiny_model()
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t, y = torch.tensor([5, 600]), torch.tensor([1, 2])
    d = GaussianDiffusion.create()
    xt = d.q_sample(x0, t, noise)
    out = m(xt, t, y).detach().requires_grad_(True)
    r = d.losses_from_output(out, x0, xt, t, noise)
    r["vb"].sum().backward()
    assert out.grad[:, :4].abs().max() == 0 and out.grad[:, 4:].abs().max() > 0


def test_space_timesteps():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    s = space_timesteps(1000, "250")
    assert len(s) == 250 and s[0] == 0 and s[-1] == 999


def test_ddim_trajectory_matches_diffusers():
    from diffusers import DDIMScheduler

    m = tiny_model()
    noise, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 4])
    ours = dit_compress.sample(m, noise, y, sampler="ddim", steps=10, timestep_spacing="leading")
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                          set_alpha_to_one=True, clip_sample=False, timestep_spacing="leading", steps_offset=0)
    sched.set_timesteps(10)
    x = noise.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            eps = m(x, t.expand(2), y)[:, :4]
            x = sched.step(eps, t, x, eta=0.0).prev_sample
    assert torch.allclose(ours, x, atol=1e-4), (ours - x).abs().max()


def test_ddpm_step_matches_diffusers_learned_range():
    from diffusers import DDPMScheduler

    m = tiny_model()
    d = GaussianDiffusion.create()
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                          variance_type="learned_range", clip_sample=False)
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    for t in (999, 400, 1):
        tt = torch.full((2,), t)
        with torch.no_grad():
            out = m(x, tt, y)
        mean, log_var, _, _ = d.p_mean_variance(out, x, tt)
        g = torch.Generator().manual_seed(t)
        ref = sched.step(out, t, x, generator=g).prev_sample
        z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(t))
        assert torch.allclose(mean + torch.exp(0.5 * log_var) * z, ref, atol=1e-3), (t, (mean + torch.exp(0.5 * log_var) * z - ref).abs().max())


def test_cfg_conventions():
    m = tiny_model()
    x = torch.randn(2, 4, 8, 8)
    xx, t, yy = torch.cat([x, x]), torch.tensor([300] * 4), torch.tensor([1, 2, 10, 10])
    with torch.no_grad():
        raw = m(xx, t, yy)
        allc = m.forward_with_cfg(xx, t, yy, 4.0)
        first3 = m.forward_with_cfg(xx, t, yy, 4.0, guide_channels=3)
    cond, unc = raw[:2], raw[2:]
    guided = unc[:, :4] + 4.0 * (cond[:, :4] - unc[:, :4])
    assert torch.allclose(allc[:2, :4], guided, atol=1e-5)
    assert torch.allclose(allc[:2, 4:], cond[:, 4:])  # variance channels are not guided
    assert torch.allclose(first3[:2, :3], guided[:, :3], atol=1e-5)
    assert torch.allclose(first3[:2, 3], cond[:, 3])  # the reference leaves channel 4 unguided


def test_samplers_run_and_are_seeded():
    m = tiny_model()
    noise, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    for s in ("ddpm", "ddim", "dpm-solver"):
        a = dit_compress.sample(m, noise, y, sampler=s, steps=5, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
        b = dit_compress.sample(m, noise, y, sampler=s, steps=5, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
        assert a.shape == noise.shape and torch.isfinite(a).all() and torch.equal(a, b)
    from dit_compress.errors import UsageError

    with pytest.raises(UsageError, match="unknown sampler"):
        dit_compress.sample(m, noise, y, sampler="rk45")
    with pytest.raises(UsageError, match="for velocity .SiT. models"):
        dit_compress.sample(m, noise, y, sampler="euler")


@pytest.mark.parametrize("spacing,steps", [("linspace", 8), ("leading", 8), ("trailing", 8), ("linspace", 2),
                                           ("leading", 1), ("trailing", 20)])
def test_dpm_solver_trajectory_matches_diffusers(spacing, steps):
    """The sampler's own DPM-Solver++(2M) (host coefficients, no scheduler calls in the loop)
    against diffusers' DPMSolverMultistepScheduler stepping the same model."""
    from diffusers import DPMSolverMultistepScheduler

    m = tiny_model()
    noise, y = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([3, 4])
    ours = dit_compress.sample(m, noise, y, sampler="dpm-solver", steps=steps, timestep_spacing=spacing)
    sched = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                                        algorithm_type="dpmsolver++", solver_order=2, timestep_spacing=spacing)
    sched.set_timesteps(steps)
    x = noise.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(m(x, t.expand(2), y)[:, :4], t, x).prev_sample
    assert torch.allclose(ours, x, atol=1e-4, rtol=1e-4), (ours - x).abs().max()
