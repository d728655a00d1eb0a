"""The fixed-noise calibration loss: a model's mean training loss on a fixed draw of
examples, timesteps and noise (``data.batches.calibration_set``), optionally with only some
blocks active. Depth selectors, reports and the held-out loss of ``eval`` use it."""

from __future__ import annotations

import torch

from ..model.dit import only_blocks
from . import objective_for


@torch.no_grad()
def calibration_losses(model, calib, keep: list[int] | None = None, batch: int = 64) -> dict:
    """Mean training loss (DiT: hybrid; SiT: velocity) and MSE with only ``keep`` blocks active (others skipped)."""
    diff = objective_for(model.config)
    n = len(calib.y)
    inner = getattr(model, "module", model)
    was = inner.training
    inner.eval()  # dropout off (MAR's blocks have it): a fixed set gives a fixed loss
    try:
        return _losses(model, calib, keep, batch, diff, n)
    finally:
        inner.train(was)


def _losses(model, calib, keep, batch, diff, n) -> dict:
    loss = mse = 0.0
    with only_blocks(model, keep):
        for s in range(0, n, batch):
            sl = slice(s, s + batch)
            dev = calib_device(model)
            b = {k: v.to(dev) for k, v in calib.batch(sl).items()}
            res = diff.training_losses(model, b["x"], diff.batch_t(b), b["y"], noise=b["noise"])
            loss += float(res["loss"].sum())
            mse += float(res["mse"].sum())
    return {"loss": loss / n, "mse": mse / n}


def calib_device(model) -> torch.device:
    """The device of the model's weights: the fixed calibration draw (made on the CPU) goes there."""
    inner = getattr(model, "module", model)
    return next(inner.parameters()).device
