"""``finetune`` and ``distill``: train a (compressed) model and write what it became."""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from ..train.api import train_and_save
from ..train.losses import REP_MASK_FORMS, REP_PAIRS
from ..train.trainer import TrainConfig
from .common import load_source, source_name

SCHEDULES = ("constant", "cosine", "linear")


def train_config(*, steps: int = 1000, batch_size: int = 64, lr: float = 1e-4, ema: float = 0.9999, seed: int = 0,
                 grad_clip: float = 1.0, grad_accum: int = 1, warmup: int = 0, schedule: str = "constant",
                 ckpt_every: int = 0, mixed_precision: str = "no", weight_decay: float = 0.0) -> TrainConfig:
    """The optimisation options of ``finetune``/``distill``, checked."""
    if steps < 1:
        raise UsageError("`steps` must be at least 1")
    if batch_size < 1:
        raise UsageError("`batch_size` must be at least 1")
    if not (0.0 <= ema < 1.0):
        raise UsageError("`ema` must be in [0, 1)")
    if schedule not in SCHEDULES:
        raise UsageError("`schedule` must be constant, cosine or linear")
    return TrainConfig(steps=steps, batch_size=batch_size, lr=lr, ema=ema, seed=seed, grad_clip=grad_clip,
                       grad_accum=grad_accum, warmup=warmup, schedule=schedule, ckpt_every=ckpt_every,
                       mixed_precision=mixed_precision, weight_decay=weight_decay)


def dynamic_options(*, flops_hold: int = 100, flops_decay: int | None = None, full_model_loss: float = 1.0,
                    full_model_steps: int | None = None, t_strata: int = 4) -> dict:
    """DyDiT's schedule for models with routers (each DyDiT's value by default)."""
    if flops_hold < 0 or (flops_decay is not None and flops_decay < 1) or full_model_loss < 0 or t_strata < 0:
        raise UsageError("`flops_hold`, `full_model_loss` and `t_strata` must be >= 0, `flops_decay` >= 1")
    return {"flops_hold": flops_hold, "flops_decay": flops_decay, "full_loss": full_model_loss,
            "full_steps": full_model_steps, "t_strata": t_strata}


_DYN = ("flops_hold", "flops_decay", "full_model_loss", "full_model_steps", "t_strata")
_LOAD = ("revision", "no_ema", "num_heads", "prediction", "numerics")


_TRAIN = tuple(TrainConfig.__dataclass_fields__)


def _split(args: dict) -> tuple[TrainConfig, dict, dict]:
    """A command's locals() -> (checked TrainConfig, DyDiT schedule, load facts)."""
    options = {k: args[k] for k in _TRAIN + _DYN + _LOAD if k in args}
    dyn = {k: options.pop(k) for k in _DYN if k in options}
    load = {k: options.pop(k) for k in _LOAD if k in options}
    return train_config(**options), dynamic_options(**dyn), load


def finetune(source, *, output: str | Path, data: str, steps: int = 1000, batch_size: int = 64, lr: float = 1e-4, ema: float = 0.9999, seed: int = 0,
             grad_clip: float = 1.0, grad_accum: int = 1, warmup: int = 0, schedule: str = "constant",
             ckpt_every: int = 0, mixed_precision: str = "no", weight_decay: float = 0.0,
             flops_hold: int = 100, flops_decay: int | None = None, full_model_loss: float = 1.0,
             full_model_steps: int | None = None, t_strata: int = 4, resume: bool = False, force: bool = False,
             revision: str | None = None, no_ema: bool = False, num_heads: int | None = None,
             prediction: str | None = None, numerics: str | None = None):
    """Fine-tune with the model's own objective (DiT: eps MSE + VLB; SiT: velocity). Dynamic
    models also train their routers toward the FLOPs target in their config (DyDiT schedule).

    Optimisation keywords as ``train_config``, DyDiT schedule keywords as ``dynamic_options``,
    load facts as ``load_model``. Returns (written model, report)."""
    tcfg, dyn, load = _split(locals())
    model = load_source(source, **load)
    return train_and_save(model, data, output, tcfg, force=force, resume=resume, kd=dyn, op="finetune",
                          extra={"dynamic": dyn} if model.config.is_dynamic else None)


def distill(source, *, output: str | Path, teacher, data: str, kd_out: float = 0.9, kd_plain: float = 0.1,
            kd_rep: float = 0.0, k_sigma: float = 2.0, no_rep_mask: bool = False, rep_pairs: str = "paper",
            rep_mask_form: str = "paper", steps: int = 1000, batch_size: int = 64, lr: float = 1e-4, ema: float = 0.9999, seed: int = 0,
            grad_clip: float = 1.0, grad_accum: int = 1, warmup: int = 0, schedule: str = "constant",
            ckpt_every: int = 0, mixed_precision: str = "no", weight_decay: float = 0.0,
            flops_hold: int = 100, flops_decay: int | None = None, full_model_loss: float = 1.0,
            full_model_steps: int | None = None, t_strata: int = 4,
            revision: str | None = None, no_ema: bool = False, num_heads: int | None = None,
            prediction: str | None = None, numerics: str | None = None,
            resume: bool = False, force: bool = False):
    """Distill a (compressed) student from ``teacher``: output KD, TinyFusion's masked
    representation KD (weight ``kd_rep``, decaying to 0; layer pairs ``rep_pairs``, mask form
    ``rep_mask_form``), mixed with the plain loss. Other keywords as for ``finetune``.
    Returns (written model, report)."""
    tcfg, dyn, load = _split(locals())
    if rep_pairs not in REP_PAIRS or rep_mask_form not in REP_MASK_FORMS:
        raise UsageError(f"`rep_pairs` takes {' or '.join(REP_PAIRS)}, `rep_mask_form` {' or '.join(REP_MASK_FORMS)}")
    student = load_source(source, **load)
    t_model = load_source(teacher, **load)
    kd = {"out": kd_out, "plain": kd_plain, "rep": kd_rep, "k_sigma": None if no_rep_mask else k_sigma,
          "rep_pairs": rep_pairs, "rep_mask_form": rep_mask_form, **dyn}
    return train_and_save(student, data, output, tcfg, force=force, resume=resume, teacher=t_model, kd=kd,
                          op="distill", extra={"teacher": source_name(teacher), "kd": kd})
