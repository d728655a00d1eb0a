"""``finetune``, ``distill`` and ``learn-cache``: train a (compressed) model, or its cache
schedule, and write what it became."""

from __future__ import annotations

from pathlib import Path

from .. import checks
from ..errors import UsageError
from ..data.datasets import check_fits, load_data
from ..diffusion.sampling import check_spacing, resolve_spacing
from ..formats import write_checkpoint
from ..model.family import require
from ..train.api import train_and_save
from ..train.cache import SAMPLERS as CACHE_SAMPLERS, default_sampler as default_cache_sampler, learn_cache as learn_cache_fn
from ..train.losses import REP_MASK_FORMS, REP_PAIRS
from ..train.trainer import TrainConfig
from .common import load_source, seed as check_seed, source_name, writes_output

SCHEDULES = ("constant", "cosine", "linear")
MIXED_PRECISION = ("no", "bf16", "fp16")


PAPER_EMA = 0.9999  # DiT, TinyFusion and DyDiT fine-tuning (runs of 100K-500K steps)
PAPER_FLOPS_HOLD = 100  # DyDiT: the FLOPs target stays at 1.0 for 100 of 150K iterations


def auto_ema(steps: int) -> float:
    """The EMA decay scaled to the run: its averaging window (1 / (1 - decay)) is 5% of the
    steps, at most the papers' 0.9999 (a 10,000-step window, 5% of a 200K-step run): the
    paper's value where the run is as long as the paper's, a window that ends near the last
    weights on a short run."""
    return min(PAPER_EMA, 1.0 - 1.0 / max(1.0, 0.05 * steps))


def auto_flops_hold(steps: int) -> int:
    """DyDiT's 100 held steps of 150K, scaled to the run (0 for runs under 750 steps)."""
    return min(PAPER_FLOPS_HOLD, round(PAPER_FLOPS_HOLD * steps / 150_000))


def train_config(*, steps: int = 1000, batch_size: int = 64, lr: float = 1e-4, ema: float | None = None, seed: int = 0,
                 grad_clip: float = 1.0, grad_accum: int = 1, warmup: int = 0, schedule: str = "constant",
                 ckpt_every: int = 0, mixed_precision: str = "no", weight_decay: float = 0.0) -> TrainConfig:
    """The optimisation options of ``finetune``/``distill``, checked; ``ema=None`` scales the
    decay to the run (``auto_ema``)."""
    c, big = checks, checks.MAX_STEPS
    steps = c.integer("steps", steps, lo=1, hi=big)
    ema = auto_ema(steps) if ema is None else ema
    return TrainConfig(steps=steps,
                       batch_size=c.integer("batch_size", batch_size, lo=1, hi=c.MAX_BATCH),
                       lr=c.real("lr", lr, lo=0.0, lo_open=True), ema=c.real("ema", ema, lo=0.0, hi=1.0, hi_open=True),
                       seed=check_seed(seed), grad_clip=c.real("grad_clip", grad_clip, lo=0.0),
                       grad_accum=c.integer("grad_accum", grad_accum, lo=1, hi=10**6),
                       warmup=c.integer("warmup", warmup, lo=0, hi=big),
                       schedule=c.choice("schedule", schedule, SCHEDULES),
                       ckpt_every=c.integer("ckpt_every", ckpt_every, lo=0, hi=big),
                       mixed_precision=c.choice("mixed_precision", mixed_precision, MIXED_PRECISION),
                       weight_decay=c.real("weight_decay", weight_decay, lo=0.0))


def dynamic_options(*, flops_hold: int | None = None, flops_decay: int | None = None, full_model_loss: float = 1.0,
                    full_model_steps: int | None = None, t_strata: int = 4, steps: int = 1000) -> dict:
    """DyDiT's schedule for models with routers: its values at its run length, the hold and the
    decay (3%) scaled to shorter runs when not given."""
    c, big = checks, checks.MAX_STEPS
    flops_hold = auto_flops_hold(steps) if flops_hold is None else flops_hold
    return {"flops_hold": c.integer("flops_hold", flops_hold, lo=0, hi=big),
            "flops_decay": c.integer("flops_decay", flops_decay, lo=1, hi=big, optional=True),
            "full_loss": c.real("full_model_loss", full_model_loss, lo=0.0),
            "full_steps": c.integer("full_model_steps", full_model_steps, lo=0, hi=big, optional=True),
            "t_strata": c.integer("t_strata", t_strata, lo=0, hi=1000)}


_DYN = ("flops_hold", "flops_decay", "full_model_loss", "full_model_steps", "t_strata")
_LOAD = ("revision", "no_ema", "num_heads", "prediction", "numerics")


_TRAIN = tuple(TrainConfig.__dataclass_fields__)


def _split(args: dict) -> tuple[TrainConfig, dict, dict]:
    """A command's locals() -> (checked TrainConfig, DyDiT schedule, load facts)."""
    options = {k: args[k] for k in _TRAIN + _DYN + _LOAD if k in args}
    dyn = {k: options.pop(k) for k in _DYN if k in options}
    load = {k: options.pop(k) for k in _LOAD if k in options}
    tcfg = train_config(**options)
    return tcfg, dynamic_options(**dyn, steps=tcfg.steps), load


@writes_output("source", "data")
def finetune(source, *, output: str | Path, data: str, steps: int = 1000, batch_size: int = 64, lr: float = 1e-4, ema: float | None = None, seed: int = 0,
             grad_clip: float = 1.0, grad_accum: int = 1, warmup: int = 0, schedule: str = "constant",
             ckpt_every: int = 0, mixed_precision: str = "no", weight_decay: float = 0.0,
             flops_hold: int | None = None, flops_decay: int | None = None, full_model_loss: float = 1.0,
             full_model_steps: int | None = None, t_strata: int = 4, resume: bool = False, force: bool = False,
             revision: str | None = None, no_ema: bool = False, num_heads: int | None = None,
             prediction: str | None = None, numerics: str | None = None):
    """Fine-tune with the model's own objective (DiT: eps MSE + VLB; SiT: velocity). Dynamic
    models also train their routers toward the FLOPs target in their config (DyDiT schedule).

    Optimisation keywords as ``train_config``, DyDiT schedule keywords as ``dynamic_options``,
    load facts as ``load_model``. Returns (written model, report)."""
    tcfg, dyn, load = _split(locals())
    data = checks.text("data", data)
    checks.flag("resume", resume)
    model = load_source(source, **load)
    return train_and_save(model, data, output, tcfg, force=force, resume=resume, kd=dyn, op="finetune",
                          extra={"dynamic": dyn} if model.config.is_dynamic else None)


@writes_output("source", "teacher", "data")
def distill(source, *, output: str | Path, teacher, data: str, kd_out: float = 0.9, kd_plain: float = 0.1,
            kd_rep: float = 0.0, k_sigma: float | None = None, no_rep_mask: bool = False, rep_pairs: str = "paper",
            rep_mask_form: str | None = None, steps: int = 1000, batch_size: int = 64, lr: float = 1e-4, ema: float | None = None, seed: int = 0,
            grad_clip: float = 1.0, grad_accum: int = 1, warmup: int = 0, schedule: str = "constant",
            ckpt_every: int = 0, mixed_precision: str = "no", weight_decay: float = 0.0,
            flops_hold: int | None = None, flops_decay: int | None = None, full_model_loss: float = 1.0,
            full_model_steps: int | None = None, t_strata: int = 4,
            revision: str | None = None, no_ema: bool = False, num_heads: int | None = None,
            prediction: str | None = None, numerics: str | None = None,
            resume: bool = False, force: bool = False):
    """Distill a (compressed) student from ``teacher``: output KD, TinyFusion's masked
    representation KD (weight ``kd_rep``, decaying to 0; layer pairs ``rep_pairs``, mask form
    ``rep_mask_form``, default "paper"; the mask keeps activations within ``k_sigma`` standard
    deviations, default 2 as TinyFusion; ``no_rep_mask`` drops it, and then refuses the two mask
    options), mixed with the plain loss. Other keywords as for ``finetune``.
    Returns (written model, report)."""
    tcfg, dyn, load = _split(locals())
    data = checks.text("data", data)
    checks.flag("resume", resume)
    checks.choice("rep_pairs", rep_pairs, REP_PAIRS)
    kd_out, kd_plain = checks.real("kd_out", kd_out, lo=0.0), checks.real("kd_plain", kd_plain, lo=0.0)
    kd_rep = checks.real("kd_rep", kd_rep, lo=0.0)
    if kd_out == kd_plain == kd_rep == 0:
        raise UsageError("every loss weight is 0 (`kd_out`, `kd_plain`, `kd_rep`): nothing would train")
    no_rep_mask = checks.flag("no_rep_mask", no_rep_mask)
    shaping = [n for n, v in (("k_sigma", k_sigma), ("rep_mask_form", rep_mask_form), ("no_rep_mask", no_rep_mask)) if v]
    if kd_rep == 0 and shaping:
        raise UsageError(f"`{shaping[0]}` shapes masked RepKD, which is off (`kd_rep` 0): set `kd_rep` "
                         "(TinyFusion: 0.01) or leave it out")
    if no_rep_mask and (k_sigma is not None or rep_mask_form is not None):
        raise UsageError(f"`{'k_sigma' if k_sigma is not None else 'rep_mask_form'}` shapes the RepKD mask and "
                         "`no_rep_mask` drops it: give one or the other")
    k_sigma = checks.real("k_sigma", 2.0 if k_sigma is None else k_sigma, lo=0.0, lo_open=True)
    rep_mask_form = checks.choice("rep_mask_form", "paper" if rep_mask_form is None else rep_mask_form,
                                  REP_MASK_FORMS)
    student = load_source(source, **load)
    require(student, "distill")
    t_model = load_source(teacher, what="teacher", **load)
    kd = {"out": kd_out, "plain": kd_plain, "rep": kd_rep, "k_sigma": None if no_rep_mask else k_sigma,
          "rep_pairs": rep_pairs, "rep_mask_form": rep_mask_form, **dyn}
    return train_and_save(student, data, output, tcfg, force=force, resume=resume, teacher=t_model, kd=kd,
                          op="distill", extra={"teacher": source_name(teacher), "kd": kd})


@writes_output("source", "data")
def learn_cache(source, *, output: str | Path, data: str, sampler: str | None = None, steps: int = 50,
                timestep_spacing: str | None = None, iters: int = 300, batch_size: int = 16, lr: float = 0.1,
                sparsity: float = 0.01, threshold: float = 0.1, every_step: bool = False, seed: int = 0,
                force: bool = False,
                revision: str | None = None, no_ema: bool = False, num_heads: int | None = None,
                prediction: str | None = None, numerics: str | None = None):
    """Learning-to-Cache: with the model frozen, learn for each step of ``sampler``/``steps`` and
    each block whether the block reuses its residual of the step before (router gates trained
    toward the full model's output under a pull toward caching, ``sparsity``; gates at or below
    ``threshold`` reuse; every other step may reuse, or every step after the first with
    ``every_step``). Writes the model with the schedule in its config: every command that
    samples it with that sampler and step count follows it. ``sampler``: ddim / ddpm for eps
    models, euler / sde for flow models (default ddim, or euler for a flow model). Returns
    (written model, report)."""
    c = checks
    data = c.text("data", data)
    steps = c.integer("steps", steps, lo=2, hi=1000)
    iters = c.integer("iters", iters, lo=1, hi=c.MAX_STEPS)
    batch_size = c.integer("batch_size", batch_size, lo=1, hi=c.MAX_BATCH)
    lr = c.real("lr", lr, lo=0.0, lo_open=True)
    sparsity = c.real("sparsity", sparsity, lo=0.0)
    threshold = c.real("threshold", threshold, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    every_step = c.flag("every_step", every_step)
    seed = check_seed(seed)
    if sampler is not None:
        sampler = c.choice("sampler", sampler, CACHE_SAMPLERS)
    spacing = check_spacing(timestep_spacing)
    if sampler is not None:
        spacing = resolve_spacing(sampler, spacing)
    model = load_source(source, revision=revision, no_ema=no_ema, num_heads=num_heads, prediction=prediction,
                        numerics=numerics)
    require(model, "cache")
    if sampler is None:
        sampler = default_cache_sampler(model.config)
        spacing = resolve_spacing(sampler, spacing)
    dataset = load_data(data, cfg=model.config)
    check_fits(dataset, model.config)
    out, report = learn_cache_fn(model, dataset, sampler, steps, spacing, iters, batch_size, lr, sparsity, threshold,
                                 seed, every_step=every_step)
    report["data"] = data
    write_checkpoint(out, Path(output), force=force, report=report, title="ditc learn-cache")
    return out, report
