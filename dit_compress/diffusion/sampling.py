"""Samplers: respaced DDPM (ancestral), DDIM (eta 0) and DPM-Solver++ (diffusers'
scheduler), each with classifier-free guidance in both conventions."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from ..errors import UsageError
from .gaussian import SPACINGS, GaussianDiffusion, spaced_timesteps

SAMPLERS = ("ddpm", "ddim", "dpm-solver")
# The reference DiT code respaces every sampler with create_diffusion(str(N)): linspace.
DEFAULT_SPACING = {"ddpm": "linspace", "ddim": "linspace", "dpm-solver": "linspace"}


def resolve_spacing(sampler: str, spacing: str | None) -> str:
    if spacing is None:
        return DEFAULT_SPACING.get(sampler, "linspace")
    if spacing not in SPACINGS:
        raise UsageError(f"unknown timestep spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    return spacing


def sampler_timesteps(sampler: str = "ddim", steps: int = 50, spacing: str | None = None) -> list[int]:
    """The original timesteps (ascending) at which ``sample`` calls the model."""
    spacing = resolve_spacing(sampler, spacing)
    if sampler == "dpm-solver":
        return sorted(int(t) for t in _dpm_scheduler(steps, spacing).timesteps)
    try:
        return spaced_timesteps(1000, steps, spacing)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _guided(model, cfg_scale: float, cfg_channels: int | None):
    """Wrap the model so it takes the un-doubled batch and returns the guided output."""
    if cfg_scale == 1.0:
        return lambda x, t, y: model(x, t, y)
    null = model.config.num_classes

    def fn(x, t, y):
        xx = torch.cat([x, x], 0)
        tt = torch.cat([t, t], 0)
        yy = torch.cat([y, torch.full_like(y, null)], 0)
        out = model.forward_with_cfg(xx, tt, yy, cfg_scale, guide_channels=cfg_channels)
        return out[: len(x)]

    return fn


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return contextlib.nullcontext(None)
    from ..progress import make_progress

    return make_progress(desc, total)


@torch.no_grad()
def sample(model, noise: torch.Tensor, y: torch.Tensor, sampler: str = "ddpm", steps: int = 250,
           cfg_scale: float = 1.0, cfg_channels: int | None = None, progress: bool = False,
           generator: torch.Generator | None = None, clip: bool = False,
           timestep_spacing: str | None = None) -> torch.Tensor:
    """Draw samples from ``noise`` (x_T) for labels ``y``.

    ``cfg_channels=None`` guides all latent channels (diffusers' DiTPipeline convention);
    ``cfg_channels=3`` guides the first three (the reference DiT code). ``generator`` drives
    the DDPM noise, so a fixed seed gives the same images on any process split.
    ``timestep_spacing`` (diffusers' names): ``linspace`` (default: the reference code's
    respacing, ``create_diffusion(str(steps))``), ``leading`` or ``trailing``.
    """
    if sampler not in SAMPLERS:
        raise UsageError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if steps < 1:
        raise UsageError("steps must be at least 1")
    if getattr(model.config, "prediction", "eps") != "eps":
        raise UsageError("sampling is implemented for eps-prediction (DiT) models; this is a velocity (SiT) model")
    spacing = resolve_spacing(sampler, timestep_spacing)
    fn = _guided(model, cfg_scale, cfg_channels)
    learn_sigma = model.config.learn_sigma
    x = noise
    if sampler == "dpm-solver":
        return _dpm_solver(fn, x, y, steps, spacing, progress)
    try:
        diff = GaussianDiffusion.create(int(steps), learn_sigma=learn_sigma, spacing=spacing)
    except ValueError as e:
        raise UsageError(str(e)) from None
    with _progress(diff.num_timesteps, f"{sampler} sampling", progress) as bar:
        for i in reversed(range(diff.num_timesteps)):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            out = fn(x, diff.model_t(t), y)
            mean, log_var, x0, eps = diff.p_mean_variance(out, x, t, clip=clip)
            if sampler == "ddpm":
                if i > 0:
                    z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                    x = mean + torch.exp(0.5 * log_var) * z
                else:
                    x = mean
            else:
                abar_prev = diff._take(diff.alphas_cumprod_prev, t, x.shape)
                eps = (diff._take(diff.sqrt_recip_alphas_cumprod, t, x.shape) * x - x0) / diff._take(
                    diff.sqrt_recipm1_alphas_cumprod, t, x.shape
                )
                x = x0 * abar_prev.sqrt() + (1 - abar_prev).sqrt() * eps
            if bar is not None:
                bar.advance()
    return x


def _dpm_scheduler(steps: int, spacing: str):
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
        algorithm_type="dpmsolver++", solver_order=2, timestep_spacing=spacing,
    )
    sched.set_timesteps(steps)
    return sched


def _dpm_solver(fn, x, y, steps, spacing, progress):
    sched = _dpm_scheduler(steps, spacing)
    with _progress(len(sched.timesteps), "dpm-solver sampling", progress) as bar:
        for t in sched.timesteps:
            tt = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
            out = fn(x, tt, y)[:, : x.shape[1]]  # eps only: the solver ignores learned variance
            x = sched.step(out, t, x).prev_sample
            if bar is not None:
                bar.advance()
    return x


def class_balanced_labels(n: int, num_classes: int) -> np.ndarray:
    """Labels 0,1,...,K-1,0,1,... so that every class gets n/K samples (DiT evaluation)."""
    return np.arange(n) % num_classes
