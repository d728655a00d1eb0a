"""Python twins of ``ditc finetune`` and ``ditc distill``."""

from __future__ import annotations

from pathlib import Path

import torch

from ..diffusion.gaussian import GaussianDiffusion
from .data import TensorData, check_fits
from .losses import combined_loss
from .trainer import Trainer, TrainConfig, TrainResult, random_batch_fn


def label_dropout_batch_fn(data: TensorData, batch_size: int, num_classes: int, p_drop: float, stratified_t: bool):
    base = random_batch_fn(data, batch_size, stratified_t=stratified_t)

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
    ``config.width.target_flops`` and timestep-stratified batches.
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
    diffusion = GaussianDiffusion.create(learn_sigma=model.config.learn_sigma)
    loss_fn, status_fn = combined_loss(diffusion, model, teacher, kd or {}, cfg.steps)
    batch_fn = label_dropout_batch_fn(
        data, cfg.batch_size, model.config.num_classes, model.config.class_dropout_prob,
        stratified_t=model.config.is_dynamic,
    )
    trainer = Trainer(model, loss_fn, batch_fn, cfg, work_dir, desc=desc, status_fn=status_fn)
    return trainer.run(resume=resume)
