"""Samplers. eps-prediction (DiT): respaced DDPM (ancestral), DDIM (eta 0), DPM-Solver++
(diffusers' scheduler). velocity (SiT flow matching): ODE Euler / Heun / dopri5 (torchdiffeq)
and SiT's SDE (Euler-Maruyama). All with classifier-free guidance in both channel
conventions, and a guidance interval."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from .. import checks
from ..errors import DitcError, UsageError
from ..model.compile import compile_model
from ..model.graphs import check_mode as check_graphs
from ..model.graphs import cuda_graphs as graphed
from ..model.dit import width_cache
from ..model.family import family_of
from ..model.run import RunContext, accepts_run
from .processes import process_of
from ..progress import make_progress
from .caching import feature_cache as caching
from .caching import run_policy
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
    proc = process_of(config)
    if proc is not None:  # a family with its own generation process (MAR's masked-AR loop)
        return proc[1].resolve(config, sampler, steps)
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
    if process_of(config) is not None:
        return resolve_sampler(config, sampler, steps)
    if sampler is None:
        sampler = "euler" if getattr(config, "prediction", "eps") == "velocity" else "ddim"
    return resolve_sampler(config, sampler, 50 if steps is None else steps)


def flow_times(sampler: str, steps: int) -> list[float]:
    """SiT time grid (0 = noise, 1 = data), as SiT's ``--num-sampling-steps N`` defines it:
    ODE: linspace(0, 1, N) (N - 1 Euler/Heun steps); SDE: linspace(0, 1 - 0.04, N) (N - 1
    Euler-Maruyama steps, then the mean-only last step of 0.04)."""
    end = 1.0 - SDE_LAST_STEP if sampler == "sde" else 1.0
    return np.linspace(0.0, end, steps).tolist()


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
        return sorted(dpm_schedule(steps, spacing)[0])
    try:
        return spaced_timesteps(1000, steps, spacing)
    except ValueError as e:
        raise UsageError(str(e)) from None


def loop_time_inputs(config, sampler: str, steps: int, spacing: str | None) -> list:
    """The network time inputs of one sampling loop as host numbers, exactly the values the
    sampler passes as ``RunContext.t`` (ints for the eps samplers, floats for the flow ones)."""
    return list(sampler_timesteps(sampler, steps, spacing, config))


def _guided(model, cfg_scale: float, cfg_channels: int | None, negative=None):
    """Wrap the model so it takes the un-doubled batch (and the step's run context) and
    returns the guided output; the null condition is the family's (the null class, or the
    ``negative`` caption)."""
    with_run = accepts_run(model)

    def call(fn, *args, run):
        return fn(*args, run=run) if with_run else fn(*args)

    if cfg_scale == 1.0:
        return lambda x, t, y, run: call(model, x, t, y, run=run)
    family = family_of(model)
    nulls = {}

    def fn(x, t, y, run):
        xx = torch.cat([x, x], 0)
        tt = torch.cat([t, t], 0)
        if nulls.get("y") is not y:  # the same condition every step: its null made once per run
            nulls["y"], nulls["yy"] = y, family.cat(y, family.null_condition(model, y, negative))
        yy = nulls["yy"]
        if with_run:
            out = model.forward_with_cfg(xx, tt, yy, cfg_scale, guide_channels=cfg_channels, run=run)
        else:
            out = model.forward_with_cfg(xx, tt, yy, cfg_scale, guide_channels=cfg_channels)
        return out[: len(x)]

    return fn


def _randn(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Noise of ``like``'s shape on its device, drawn from ``generator`` where it lives (a
    CPU generator gives the same noise whatever device the model runs on)."""
    if generator is None:
        return torch.randn(like.shape, device=like.device, dtype=like.dtype)
    z = torch.randn(like.shape, generator=generator, device=generator.device, dtype=like.dtype)
    if z.device == like.device:
        return z
    if z.device.type == "cpu" and like.device.type == "cuda" and torch.cuda.is_available():
        return z.pin_memory().to(like.device, non_blocking=True)  # no stream sync for the copy
    return z.to(like.device)


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return contextlib.nullcontext(None)

    return make_progress(desc, total)


@torch.no_grad()
def sample(model, noise: torch.Tensor, y: torch.Tensor, sampler: str | None = None, steps: int | None = None,
           cfg_scale: float = 1.0, cfg_channels: int | None = None, progress: bool = False,
           generator: torch.Generator | None = None, clip: bool = False,
           timestep_spacing: str | None = None, guidance_interval: tuple[float, float] | None = None,
           compile: bool = False, negative=None, cuda_graphs="auto", feature_cache=None) -> torch.Tensor:
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
    ``cuda_graphs`` (``auto``, ``on``, ``off``): on a CUDA device each distinct call (shape,
    width profile) is captured once as a CUDA graph and replayed (model/graphs.py); ``auto``
    does so where the model can be captured, ``on`` refuses where it cannot. ``feature_cache``:
    a caching policy for this run (``fora:N``, ``fbcache:T``, ``taylorseer:N,O``, or a policy
    object from ``diffusion.caching.parse_policy``, whose ``stats()`` count what it skipped); a
    model with a learned schedule (``ditc learn-cache``) follows it when this is None, for the
    sampler and steps it was learned for only, and runs uncached with ``feature_cache="none"``.
    ``y`` is the model family's condition: class labels, or ``Captions`` for a text-to-image
    model, whose guidance null is ``negative`` (the encoder's empty-prompt captions).
    The model runs in eval mode (restored afterwards); samples that are not finite stop the
    run with an error instead of reaching a metric.
    """
    if process_of(model) is not None:
        raise UsageError("this model samples by its own loop, not a diffusion sampler: use dit_compress.sample_mar")
    noise, y = check_inputs(model, noise, y)
    if negative is not None:  # checked whether guidance uses it or not (a class-conditional model refuses it)
        family_of(model).null_condition(model, y, negative)
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
    graphs = check_graphs(cuda_graphs)
    policy = run_policy(model.config, feature_cache, sampler, steps, spacing)
    if compile:
        compile_model(model)
    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()
    try:
        with caching(model, policy), graphed(model, graphs):
            x = _run_sampler(model, noise, y, sampler, steps, spacing, cfg_scale, cfg_channels, progress, generator,
                             clip, guidance_interval, negative)
    finally:
        if was_training:
            model.train()
    if checks.has_values(x) and not bool(torch.isfinite(x).all()):  # once per run
        raise DitcError(f"sampling produced NaN or inf values ({sampler}, {steps} steps, cfg {cfg_scale}): the model "
                        "or the sampler settings are broken; nothing was kept")
    return x


def check_inputs(model, noise, y):
    """Noise [B, C, H, W] of the model's shape and its condition (class labels, with the null
    class last; or captions), both on the model's device."""
    cfg = getattr(model, "config", None)
    if cfg is None or not callable(model):
        raise UsageError("`model` must be a loaded model (dit_compress.load_model)")
    if not torch.is_tensor(noise) or not noise.is_floating_point():
        raise UsageError(f"`noise` must be a float tensor, got {type(noise).__name__ if not torch.is_tensor(noise) else noise.dtype}")
    want = (cfg.in_channels, cfg.input_size, cfg.input_size)
    if noise.dim() != 4 or tuple(noise.shape[1:]) != want or noise.shape[0] < 1:
        raise UsageError(f"`noise` must have shape [B, {want[0]}, {want[1]}, {want[2]}], got {list(noise.shape)}")
    if checks.has_values(noise) and not bool(torch.isfinite(noise).all()):
        raise UsageError("`noise` holds NaN or inf values")
    inner = getattr(model, "module", model)
    dtype = noise.dtype
    if isinstance(inner, torch.nn.Module):
        dtypes = {p.dtype for p in inner.parameters() if p.is_floating_point()}
        if len(dtypes) > 1:
            raise UsageError(f"the model's weights mix {', '.join(sorted(map(str, dtypes)))}: give it one dtype "
                             "(model.float(), model.to(torch.bfloat16))")
        if dtypes:
            dtype = dtypes.pop()  # the sampler runs in the model's dtype, as bench --dtype does
    y = family_of(model).check_condition(model, y, len(noise))
    return noise.to(_device_of(model, noise), dtype), y


def _device_of(model, fallback: torch.Tensor) -> torch.device:
    """The device the model's weights are on (inputs follow it), else the inputs' own."""
    inner = getattr(model, "module", model)
    if isinstance(inner, torch.nn.Module):
        for p in inner.parameters():
            return p.device
    return fallback.device


def _run_sampler(model, noise, y, sampler, steps, spacing, cfg_scale, cfg_channels, progress, generator, clip,
                 guidance_interval, negative=None):
    dynamic = getattr(model.config, "width", None) is not None  # only width routers use the run's time inputs
    times = loop_time_inputs(model.config, sampler, steps, spacing) if dynamic and sampler != "dopri5" else None
    with width_cache(model, times):
        if sampler in FLOW_SAMPLERS:
            return _flow_sample(model, noise, y, sampler, steps, cfg_scale, cfg_channels, progress, generator,
                                guidance_interval, negative)
        return _eps_sample(model, noise, y, sampler, steps, spacing, cfg_scale, cfg_channels, progress, generator,
                           clip, guidance_interval, negative)


def _eps_sample(model, noise, y, sampler, steps, spacing, cfg_scale, cfg_channels, progress, generator, clip,
                guidance_interval, negative=None):
    """Respaced DDPM (ancestral) / DDIM (eta 0) / DPM-Solver++(2M). Every per-step quantity
    (model time input, schedule coefficients, whether to guide) is a host number computed once
    per run, so a step launches device work only: no table lookups, no host syncs."""
    plain, guided = _guided(model, 1.0, cfg_channels), _guided(model, cfg_scale, cfg_channels, negative)
    if sampler == "dpm-solver":
        return _dpm_solver(plain, guided, guidance_interval, noise, y, steps, spacing, progress)
    try:
        diff = GaussianDiffusion.create(int(steps), learn_sigma=model.config.learn_sigma, spacing=spacing)
    except ValueError as e:
        raise UsageError(str(e)) from None
    x = noise
    B = x.shape[0]
    with _progress(diff.num_timesteps, f"{sampler} sampling", progress) as bar:
        for n, i in enumerate(reversed(range(diff.num_timesteps))):
            k = diff.step_coefficients(i)
            t_in = diff.timestep_map[i]
            fn = guided if _in_interval(guidance_interval, t_in / 999.0) else plain
            out = fn(x, torch.full((B,), t_in, device=x.device, dtype=torch.long), y, RunContext(step=n, t=t_in))
            mean, log_var, x0, eps = diff.p_mean_variance_step(out, x, k, clip=clip)
            if sampler == "ddpm":
                x = mean + torch.exp(0.5 * log_var) * _randn(x, generator) if i > 0 else mean
            else:
                eps = (k["sqrt_recip_acp"] * x - x0) / k["sqrt_recipm1_acp"]
                x = x0 * k["acp_prev"] ** 0.5 + (1 - k["acp_prev"]) ** 0.5 * eps
            if bar is not None:
                bar.advance()
    return x


def _in_interval(interval, noise_level: float) -> bool:
    """Guidance applies while the noise level (1 = pure noise) is within ``interval``."""
    return interval is None or interval[0] <= noise_level <= interval[1]


def _flow_sample(model, noise, y, sampler, steps, cfg_scale, cfg_channels, progress, generator, interval,
                 negative=None):
    """SiT's samplers in SiT time (0 = noise, 1 = data); see diffusion/flow.py for the equations."""
    flow = FlowMatching(model.config.time_input)
    C = noise.shape[1]
    plain, guided = _guided(model, 1.0, cfg_channels), _guided(model, cfg_scale, cfg_channels, negative)

    calls = [0]

    def velocity(x, s: float):
        t_in = s if flow.time_input == "sit" else 1.0 - s  # the network's time input, on the host
        use = guided if _in_interval(interval, 1.0 - s) else plain
        run = RunContext(step=calls[0], t=t_in)
        calls[0] += 1
        return use(x, torch.full((x.shape[0],), t_in, device=x.device, dtype=x.dtype), y, run)[:, :C]

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
                drift = v + w * flow.score_from_velocity(v, x, s0)
                x = x + drift * h + (2.0 * w) ** 0.5 * h ** 0.5 * _randn(x, generator)
            if bar is not None:
                bar.advance()
        if sampler == "sde":  # SiT's last step "Mean": drift only, size 0.04, at t = 1 - 0.04
            s = ts[-1]
            v = velocity(x, s)
            drift = v + (1.0 - s) * flow.score_from_velocity(v, x, s)
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


def dpm_schedule(steps: int, spacing: str) -> tuple[list[int], list[float]]:
    """(timesteps, sigmas) of DPM-Solver++ over the linear-beta 1000-step process, as diffusers'
    DPMSolverMultistepScheduler.set_timesteps makes them (its float32 schedule, its three
    spacings, a final sigma of 0), without building the scheduler."""
    T = 1000
    betas = np.linspace(1e-4, 0.02, T, dtype=np.float32)
    acp = np.cumprod(1.0 - betas, dtype=np.float32)
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    elif spacing == "leading":
        ts = (np.arange(0, steps + 1) * (T // (steps + 1))).round()[::-1][:-1].astype(np.int64)
    else:
        ts = np.arange(T, 0, -T / steps).round().astype(np.int64) - 1
    sig = np.interp(ts, np.arange(T), ((1 - acp) / acp) ** 0.5)
    sig = np.concatenate([sig, [0.0]]).astype(np.float32)
    if len(set(ts.tolist())) != steps:
        raise UsageError(f"`steps` {steps} with {spacing} spacing repeats timesteps in dpm-solver; take fewer steps")
    return [int(t) for t in ts], [float(v) for v in sig]


def _dpm_solver(plain, guided, interval, x, y, steps, spacing, progress):
    """DPM-Solver++(2M) (multistep, data prediction) as diffusers' DPMSolverMultistepScheduler
    runs it with ``algorithm_type="dpmsolver++"``, ``solver_order=2`` and a final sigma of 0:
    first-order on the first and the last step, second-order (midpoint) between. The
    coefficients of every step are host numbers from ``dpm_schedule``, computed once
    (tests/test_diffusion.py checks the trajectory against the scheduler itself)."""
    ts, sig = dpm_schedule(steps, spacing)  # len(sig) = len(ts) + 1, the last 0
    alpha = [1.0 / math.sqrt(s * s + 1.0) for s in sig]
    sigma = [s * a for s, a in zip(sig, alpha)]
    lam = [math.log(a) - math.log(s) if s > 0 else math.inf for a, s in zip(alpha, sigma)]
    B, prev_x0 = x.shape[0], None
    with _progress(len(ts), "dpm-solver sampling", progress) as bar:
        for i, t_in in enumerate(ts):
            fn = guided if _in_interval(interval, t_in / 999.0) else plain
            eps = fn(x, torch.full((B,), t_in, device=x.device, dtype=torch.long), y, RunContext(step=i, t=t_in))
            x0 = (x - sigma[i] * eps[:, : x.shape[1]]) / alpha[i]  # eps only: the solver ignores learned variance
            if sigma[i + 1] == 0.0:  # the final step to sigma 0 lands on the data prediction
                x = x0
            else:
                h = lam[i + 1] - lam[i]
                ratio, phi = sigma[i + 1] / sigma[i], alpha[i + 1] * (math.exp(-h) - 1.0)
                if prev_x0 is None:
                    x = ratio * x - phi * x0
                else:
                    r = (lam[i] - lam[i - 1]) / h
                    x = ratio * x - phi * x0 - 0.5 * phi * (x0 - prev_x0) / r
            prev_x0 = x0
            if bar is not None:
                bar.advance()
    return x


def class_balanced_labels(n: int, num_classes: int) -> np.ndarray:
    """Labels 0,1,...,K-1,0,1,... so that every class gets n/K samples (DiT evaluation)."""
    return np.arange(n) % num_classes
