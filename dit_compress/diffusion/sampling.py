"""Samplers. eps-prediction (DiT): respaced DDPM (ancestral), DDIM (eta 0), DPM-Solver++
(diffusers' scheduler). velocity (SiT flow matching): ODE Euler / Heun / dopri5 (torchdiffeq)
and SiT's SDE (Euler-Maruyama). All with classifier-free guidance in both channel
conventions, and a guidance interval."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from .. import checks
from ..errors import DitcError, UsageError
from ..model.compile import compile_model
from ..model.dit import width_cache
from ..progress import make_progress
from .flow import FlowMatching
from .gaussian import SPACINGS, GaussianDiffusion, spaced_timesteps

EPS_SAMPLERS = ("ddpm", "ddim", "dpm-solver")
FLOW_SAMPLERS = ("sde", "euler", "heun", "dopri5")
SAMPLERS = EPS_SAMPLERS + FLOW_SAMPLERS
# The papers' evaluation samplers: DiT DDPM-250 (reference respacing), SiT SDE-250.
NATURAL = {"eps": ("ddpm", 250), "velocity": ("sde", 250)}
SDE_LAST_STEP = 0.04
DPM_MAX_STEPS = 999  # diffusers' DPM-Solver++ repeats a timestep (NaN) or runs past its table at 1000  # SiT: --last-step Mean --last-step-size 0.04
# The reference DiT code respaces every sampler with create_diffusion(str(N)): linspace.
DEFAULT_SPACING = {"ddpm": "linspace", "ddim": "linspace", "dpm-solver": "linspace"}


def check_spacing(spacing: str | None) -> str | None:
    if spacing is not None and (not isinstance(spacing, str) or spacing not in SPACINGS):
        raise UsageError(f"unknown timestep spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    return spacing


def resolve_spacing(sampler: str, spacing: str | None) -> str | None:
    if sampler in FLOW_SAMPLERS:
        if spacing is not None:
            raise UsageError(f"`timestep_spacing` applies to the eps samplers ({', '.join(EPS_SAMPLERS)}), not {sampler}")
        return None
    if spacing is None:
        return DEFAULT_SPACING.get(sampler, "linspace")
    if spacing not in SPACINGS:
        raise UsageError(f"unknown timestep spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    return spacing


def resolve_sampler(config, sampler: str | None, steps: int | None) -> tuple[str, int]:
    """The sampler for this model (its natural one when ``sampler`` is None), checked
    against its prediction type."""
    pred = getattr(config, "prediction", "eps")
    if sampler is not None and (not isinstance(sampler, str) or sampler not in SAMPLERS):
        raise UsageError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    checks.integer("steps", steps, lo=1, hi=checks.MAX_STEPS, optional=True)
    if sampler is None:
        sampler, default_steps = NATURAL[pred]
        steps = steps or default_steps
    if pred == "velocity" and sampler in EPS_SAMPLERS:
        raise UsageError(f"sampler {sampler} is for eps-prediction (DiT) models and this is a velocity (SiT) model; "
                         f"use {', '.join(FLOW_SAMPLERS)}")
    if pred == "eps" and sampler in FLOW_SAMPLERS:
        raise UsageError(f"sampler {sampler} is for velocity (SiT) models and this is an eps (DiT) model; "
                         f"use {', '.join(EPS_SAMPLERS)}")
    steps = 250 if steps is None else steps
    if steps < 1 or (sampler in FLOW_SAMPLERS and steps < 2):
        raise UsageError(f"`steps` must be at least {2 if sampler in FLOW_SAMPLERS else 1} for {sampler}")
    if sampler in EPS_SAMPLERS and steps > 1000:
        raise UsageError(f"`steps` {steps}: {sampler} respaces the 1000 training steps, so at most 1000")
    if sampler == "dpm-solver" and steps > DPM_MAX_STEPS:
        raise UsageError(f"`steps` {steps}: dpm-solver takes at most {DPM_MAX_STEPS} steps (its multistep update needs "
                         "distinct timesteps and one past the last)")
    return sampler, int(steps)


def eval_sampler(config, sampler: str | None, steps: int | None) -> tuple[str, int]:
    """``eval``/``bench``/``info`` defaults: a deterministic 50-step sampler of the model's
    family (DDIM for eps, ODE Euler for velocity) unless one is given."""
    if sampler is None:
        sampler = "euler" if getattr(config, "prediction", "eps") == "velocity" else "ddim"
    return resolve_sampler(config, sampler, 50 if steps is None else steps)


def flow_times(sampler: str, steps: int) -> list[float]:
    """SiT time grid (0 = noise, 1 = data), as SiT's ``--num-sampling-steps N`` defines it:
    ODE: linspace(0, 1, N) (N - 1 Euler/Heun steps); SDE: linspace(0, 1 - 0.04, N) (N - 1
    Euler-Maruyama steps, then the mean-only last step of 0.04)."""
    end = 1.0 - SDE_LAST_STEP if sampler == "sde" else 1.0
    return torch.linspace(0.0, end, steps, dtype=torch.float64).tolist()


def sampler_timesteps(sampler: str = "ddim", steps: int = 50, spacing: str | None = None,
                      config=None) -> list:
    """The network's time inputs, in the order ``sample`` first calls them (ascending for the
    eps samplers' original steps; SiT time for the flow samplers, fed as the config says)."""
    spacing = resolve_spacing(sampler, spacing)
    if sampler in FLOW_SAMPLERS:
        ts = flow_times(sampler, steps)
        calls = ts if sampler == "sde" else ts[:-1]
        repa = config is not None and getattr(config, "time_input", "sit") == "repa"
        return [1.0 - t if repa else t for t in calls]
    if sampler == "dpm-solver":
        return sorted(int(t) for t in _dpm_scheduler(steps, spacing).timesteps)
    try:
        return spaced_timesteps(1000, steps, spacing)
    except ValueError as e:
        raise UsageError(str(e)) from None


def loop_time_inputs(config, sampler: str, steps: int, spacing: str | None, dtype=torch.float32) -> torch.Tensor:
    """The network time inputs of one sampling loop as the sampler feeds them (long for the
    eps samplers, ``dtype`` for the flow samplers)."""
    times = sampler_timesteps(sampler, steps, spacing, config)
    return torch.tensor(times, dtype=dtype if sampler in FLOW_SAMPLERS else torch.long)


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

    return make_progress(desc, total)


@torch.no_grad()
def sample(model, noise: torch.Tensor, y: torch.Tensor, sampler: str | None = None, steps: int | None = None,
           cfg_scale: float = 1.0, cfg_channels: int | None = None, progress: bool = False,
           generator: torch.Generator | None = None, clip: bool = False,
           timestep_spacing: str | None = None, guidance_interval: tuple[float, float] | None = None,
           compile: bool = False) -> torch.Tensor:
    """Draw samples from ``noise`` for labels ``y``.

    ``sampler=None`` uses the model's natural sampler: DDPM-250 for eps (DiT), SiT's SDE-250
    for velocity models. ``cfg_channels=None`` guides all latent channels (diffusers'
    DiTPipeline convention); ``cfg_channels=3`` guides the first three (the reference DiT and
    SiT code). ``guidance_interval=(lo, hi)`` applies guidance only while the noise level
    (REPA's t: 1 = noise, 0 = data) is within [lo, hi]. ``generator`` drives the sampler noise,
    so a fixed seed gives the same images on any process split. ``timestep_spacing``
    (diffusers' names, eps samplers): ``linspace`` (default: the reference code's respacing,
    ``create_diffusion(str(steps))``), ``leading`` or ``trailing``. ``compile=True`` compiles
    the model in place first (once; see model/compile.py for how graphs are bounded).
    Dynamic models resolve their per-timestep widths once per run (``width_cache``).
    The model runs in eval mode (restored afterwards); samples that are not finite stop the
    run with an error instead of reaching a metric.
    """
    noise, y = check_inputs(model, noise, y)
    sampler, steps = resolve_sampler(model.config, sampler, steps)
    spacing = resolve_spacing(sampler, check_spacing(timestep_spacing))
    cfg_scale = checks.real("cfg_scale", cfg_scale, lo=0.0)
    checks.integer("cfg_channels", cfg_channels, lo=1, hi=model.config.in_channels, optional=True)
    progress, clip, compile = checks.flag("progress", progress), checks.flag("clip", clip), checks.flag("compile", compile)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise UsageError(f"`generator` must be a torch.Generator, got {type(generator).__name__}")
    if guidance_interval is not None:
        try:
            lo, hi = (float(v) for v in guidance_interval)
        except (TypeError, ValueError):
            raise UsageError(f"`guidance_interval` must be (low, high), got {guidance_interval!r}") from None
        if not (0.0 <= lo <= hi <= 1.0):
            raise UsageError(f"guidance interval must satisfy 0 <= low <= high <= 1, got {guidance_interval}")
        guidance_interval = (lo, hi)
    if compile:
        compile_model(model)
    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()
    try:
        x = _run_sampler(model, noise, y, sampler, steps, spacing, cfg_scale, cfg_channels, progress, generator, clip,
                         guidance_interval)
    finally:
        if was_training:
            model.train()
    if not bool(torch.isfinite(x).all()):
        raise DitcError(f"sampling produced NaN or inf values ({sampler}, {steps} steps, cfg {cfg_scale}): the model "
                        "or the sampler settings are broken; nothing was kept")
    return x


def check_inputs(model, noise, y):
    """Noise [B, C, H, W] of the model's shape and labels [B] (0..num_classes, the last the null)."""
    cfg = getattr(model, "config", None)
    if cfg is None or not callable(model):
        raise UsageError("`model` must be a loaded model (dit_compress.load_model)")
    if not torch.is_tensor(noise) or not noise.is_floating_point():
        raise UsageError(f"`noise` must be a float tensor, got {type(noise).__name__ if not torch.is_tensor(noise) else noise.dtype}")
    want = (cfg.in_channels, cfg.input_size, cfg.input_size)
    if noise.dim() != 4 or tuple(noise.shape[1:]) != want or noise.shape[0] < 1:
        raise UsageError(f"`noise` must have shape [B, {want[0]}, {want[1]}, {want[2]}], got {list(noise.shape)}")
    if not torch.is_tensor(y):
        try:
            y = torch.as_tensor(y, dtype=torch.long)
        except (TypeError, ValueError, RuntimeError):
            raise UsageError(f"`y` must be class labels (a tensor of ints), got {type(y).__name__}") from None
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise UsageError(f"`y` must hold integer class labels, got {y.dtype}")
    if y.dim() != 1 or len(y) != len(noise):
        raise UsageError(f"`y` must be one label per sample ({len(noise)}), got shape {list(y.shape)}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) > cfg.num_classes):
        raise UsageError(f"`y` holds labels outside 0..{cfg.num_classes} ({cfg.num_classes} is the null class)")
    if not bool(torch.isfinite(noise).all()):
        raise UsageError("`noise` holds NaN or inf values")
    return noise, y.long()


def _run_sampler(model, noise, y, sampler, steps, spacing, cfg_scale, cfg_channels, progress, generator, clip,
                 guidance_interval):
    dynamic = getattr(model.config, "width", None) is not None  # only width routers use the run's time inputs
    times = loop_time_inputs(model.config, sampler, steps, spacing, noise.dtype) if dynamic and sampler != "dopri5" else None
    with width_cache(model, times):
        if sampler in FLOW_SAMPLERS:
            return _flow_sample(model, noise, y, sampler, steps, cfg_scale, cfg_channels, progress, generator,
                                guidance_interval)
        return _eps_sample(model, noise, y, sampler, steps, spacing, cfg_scale, cfg_channels, progress, generator,
                           clip, guidance_interval)


def _eps_sample(model, noise, y, sampler, steps, spacing, cfg_scale, cfg_channels, progress, generator, clip,
                guidance_interval):
    plain, guided = _guided(model, 1.0, cfg_channels), _guided(model, cfg_scale, cfg_channels)
    learn_sigma = model.config.learn_sigma
    x = noise
    if sampler == "dpm-solver":
        fn = _interval_fn(plain, guided, guidance_interval, lambda t: float(t.flatten()[0]) / 999.0)
        return _dpm_solver(fn, x, y, steps, spacing, progress)
    try:
        diff = GaussianDiffusion.create(int(steps), learn_sigma=learn_sigma, spacing=spacing)
    except ValueError as e:
        raise UsageError(str(e)) from None
    fn = _interval_fn(plain, guided, guidance_interval, lambda t: float(t.flatten()[0]) / 999.0)
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


def _in_interval(interval, noise_level: float) -> bool:
    """Guidance applies while the noise level (1 = pure noise) is within ``interval``."""
    return interval is None or interval[0] <= noise_level <= interval[1]


def _interval_fn(plain, guided, interval, noise_level):
    """The guided model while the noise level of t is within ``interval``, else the plain one."""
    if interval is None:
        return guided
    return lambda x, t, y: guided(x, t, y) if _in_interval(interval, noise_level(t)) else plain(x, t, y)


def _flow_sample(model, noise, y, sampler, steps, cfg_scale, cfg_channels, progress, generator, interval):
    """SiT's samplers in SiT time (0 = noise, 1 = data); see diffusion/flow.py for the equations."""
    flow = FlowMatching(model.config.time_input)
    C = noise.shape[1]
    plain, guided = _guided(model, 1.0, cfg_channels), _guided(model, cfg_scale, cfg_channels)

    def velocity(x, s: float):
        t = torch.full((x.shape[0],), s, device=x.device, dtype=x.dtype)
        use = guided if _in_interval(interval, 1.0 - s) else plain
        return use(x, flow.model_t(t), y)[:, :C]

    if sampler == "dopri5":
        return _dopri5(velocity, noise)
    ts = flow_times(sampler, steps)
    x = noise
    with _progress(len(ts), f"{sampler} sampling", progress) as bar:
        for s0, s1 in zip(ts[:-1], ts[1:]):
            h = s1 - s0
            v = velocity(x, s0)
            if sampler == "euler":
                x = x + h * v
            elif sampler == "heun":
                xe = x + h * v
                x = x + 0.5 * h * (v + velocity(xe, s1))
            else:  # Euler-Maruyama: drift v + w * score, diffusion w = sigma_t = 1 - t
                w = 1.0 - s0
                drift = v + w * flow.score_from_velocity(v, x, torch.full((x.shape[0],), s0, dtype=x.dtype))
                z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                x = x + drift * h + (2.0 * w) ** 0.5 * h ** 0.5 * z
            if bar is not None:
                bar.advance()
        if sampler == "sde":  # SiT's last step "Mean": drift only, size 0.04, at t = 1 - 0.04
            s = ts[-1]
            v = velocity(x, s)
            drift = v + (1.0 - s) * flow.score_from_velocity(v, x, torch.full((x.shape[0],), s, dtype=x.dtype))
            x = x + drift * SDE_LAST_STEP
    return x


def _dopri5(velocity, noise, atol: float = 1e-6, rtol: float = 1e-3):
    try:
        from torchdiffeq import odeint
    except ImportError:
        raise UsageError("sampler dopri5 needs torchdiffeq (pip install torchdiffeq); euler, heun and sde need nothing") from None

    def f(t, x):
        return velocity(x, float(t))

    return odeint(f, noise, torch.tensor([0.0, 1.0], dtype=noise.dtype), method="dopri5", atol=atol, rtol=rtol)[-1]


def _dpm_scheduler(steps: int, spacing: str):
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
        algorithm_type="dpmsolver++", solver_order=2, timestep_spacing=spacing,
    )
    sched.set_timesteps(steps)
    if len(set(int(t) for t in sched.timesteps)) != steps:
        raise UsageError(f"`steps` {steps} with {spacing} spacing repeats timesteps in dpm-solver; take fewer steps")
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
