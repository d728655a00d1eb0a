"""Training batches: examples drawn with replacement, timesteps (optionally stratified),
noise, and label dropout for classifier-free guidance. Every draw uses the generator the
trainer reseeds per step, so a resumed run sees the same batches."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..model.family import family_of
from .datasets import TensorData


def draw_examples(data, n: int, generator: torch.Generator):
    """``n`` examples (x, y) drawn with replacement from ``data`` with ``generator``."""
    idx = torch.randint(0, len(data), (n,), generator=generator)
    return data.get(idx, generator=generator)


def random_batch_fn(data, batch_size: int, t_strata: int = 0, num_timesteps: int = 1000):
    """Batches drawn with replacement; timesteps uniform, or with ``t_strata`` = k > 0 the
    batch split into k parts whose timesteps are uniform in the k equal ranges of [0, T)
    (DyDiT: 4 quarters)."""

    def fn(step, g, rank, world):
        x, y = draw_examples(data, batch_size, g)
        if t_strata > 0:
            stratum = torch.arange(batch_size) * t_strata // batch_size
            width = num_timesteps / t_strata
            t = ((stratum + torch.rand(batch_size, generator=g)) * width).long().clamp(max=num_timesteps - 1)
            t = t[torch.randperm(batch_size, generator=g)]
        else:
            t = torch.randint(0, num_timesteps, (batch_size,), generator=g)
        noise = torch.randn(x.shape, generator=g)
        return {"x": x, "y": y, "t": t, "noise": noise}

    return fn


def condition_dropout_batch_fn(data: TensorData, batch_size: int, cfg, t_strata: int = 0, p_drop: float | None = None,
                               draws=None):
    """Batches whose conditions are replaced by the null (the null class, or the data's null
    caption) with probability ``p_drop`` (default the config's ``class_dropout_prob``): the
    unconditional model classifier-free guidance needs. ``draws(x, g) -> dict``: what else
    the model's objective draws per batch (MAR: orders, mask ratio, head steps and noise),
    from the same generator."""
    base = random_batch_fn(data, batch_size, t_strata=t_strata)
    p_drop = cfg.class_dropout_prob if p_drop is None else p_drop
    family = family_of(cfg)

    def fn(step, g, rank, world):
        b = base(step, g, rank, world)
        if p_drop > 0:
            drop = torch.rand(batch_size, generator=g) < p_drop
            b["y"] = family.drop_condition(cfg, b["y"], drop, data)
        if draws is not None:
            b.update(draws(b["x"], g))
        return b

    return fn


@dataclass
class CalibSet:
    x: torch.Tensor
    y: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    extra: dict = field(default_factory=dict)  # what the objective draws besides (MAR: ``draws``)

    def batch(self, sl: slice) -> dict:
        """Rows ``sl`` as a training batch (``x``, ``y``, ``t``, ``noise`` and the extra draws)."""
        return {"x": self.x[sl], "y": self.y[sl], "t": self.t[sl], "noise": self.noise[sl],
                **{k: v[sl] for k, v in self.extra.items()}}


def calibration_set(data, n: int, seed: int = 0, draws=None) -> CalibSet:
    """``n`` fixed examples with fixed timesteps and noise (and ``draws(x, g)``, the objective's
    own): the same draw for every model scored."""
    g = torch.Generator().manual_seed(seed)
    x, y = draw_examples(data, n, g)
    t = torch.randint(0, 1000, (n,), generator=g)
    calib = CalibSet(x, y, t, torch.randn(x.shape, generator=g))
    if draws is not None:
        calib.extra = draws(x, g, per_row=True)
    return calib
