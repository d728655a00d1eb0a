"""Python twins of ``ditc finetune`` and ``ditc distill``."""

from __future__ import annotations

from pathlib import Path

import torch

from ..diffusion import objective_for
from .data import TensorData, check_fits
from .losses import combined_loss
from .trainer import Trainer, TrainConfig, TrainResult, random_batch_fn


def label_dropout_batch_fn(data: TensorData, batch_size: int, num_classes: int, p_drop: float, t_strata: int = 0):
    base = random_batch_fn(data, batch_size, t_strata=t_strata)

    def fn(step, g, rank, world):
        b = base(step, g, rank, world)
        if p_drop > 0:
            drop = torch.rand(batch_size, generator=g) < p_drop
            b["y"] = torch.where(drop, torch.full_like(b["y"], num_classes), b["y"])
        return b

    return fn


def train_model(model, data: TensorData, cfg: TrainConfig, work_dir: Path, teacher=None, resume: bool = False,
                kd: dict | None = None, desc: str = "finetune") -> TrainResult:
    """Fine-tune (``teacher=None``) or distill ``model`` on ``data``.

    Dynamic models (routers in the config) automatically get the FLOPs loss toward
    ``config.width.target_flops`` (DyDiT's schedule: ``kd["flops_hold"]`` steps at 1.0, then
    linear over ``kd["flops_decay"]`` steps, default 3% of the run), the full-width model's
    loss added during ``kd["full_steps"]`` (default all) with weight ``kd["full_loss"]``
    (default 1.0), and batches stratified into ``kd["t_strata"]`` (default 4) timestep ranges.
    """
    check_fits(data, model.config)
    if teacher is not None:
        from ..errors import DitcError

        tc = teacher.config
        mc = model.config
        if (tc.in_channels, tc.input_size, tc.num_classes) != (mc.in_channels, mc.input_size, mc.num_classes):
            raise DitcError(
                f"teacher takes {tc.in_channels}x{tc.input_size}x{tc.input_size} with {tc.num_classes} classes, "
                f"the student {mc.in_channels}x{mc.input_size}x{mc.input_size} with {mc.num_classes}"
            )
        teacher.eval().requires_grad_(False)
    if model.config.width is not None and model.config.width.static:
        for b in model.blocks:  # static width pruning: the chosen widths stay fixed
            b.head_router.requires_grad_(False)
            b.channel_router.requires_grad_(False)
    diffusion = objective_for(model.config)
    loss_fn, status_fn = combined_loss(diffusion, model, teacher, kd or {}, cfg.steps)
    batch_fn = label_dropout_batch_fn(
        data, cfg.batch_size, model.config.num_classes, model.config.class_dropout_prob,
        t_strata=int((kd or {}).get("t_strata", 4)) if model.config.is_dynamic else 0,
    )
    trainer = Trainer(model, loss_fn, batch_fn, cfg, work_dir, desc=desc, status_fn=status_fn)
    return trainer.run(resume=resume)
