"""The per-call run context: what the caller of a model knows on the host about one call.

A sampler knows the step it is at and the time input every row of the batch shares; passing
them as ``model(x, t, y, run=RunContext(step=i, t=t_i))`` lets the model reuse per-step
decisions (the dynamic width of that timestep) without reading ``t`` back from the device,
so a sampling step holds no host sync. ``branch`` says whether the call carries the
conditional rows only or the guided pair (conditional + null), for hooks such as feature
caches. In training, ``full_rows`` > 0 marks the last rows of the batch to run at full width
(DyDiT's stage-1 full-model loss, computed in the same forward as the routed one).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

BRANCHES = ("cond", "guided", "uncond")


@dataclass(frozen=True)
class RunContext:
    step: int | None = None
    t: float | int | None = None
    branch: str = "cond"
    full_rows: int = 0

    def guided(self) -> "RunContext":
        return RunContext(self.step, self.t, "guided", self.full_rows)


def accepts_run(model) -> bool:
    """Whether ``model`` takes ``run=`` (ditc models do; a user's wrapper may not)."""
    return bool(getattr(getattr(model, "module", model), "accepts_run", False))


@dataclass
class ForwardAux:
    """What ``model(..., return_aux=True)`` returns beside the output: the block stack's input
    and each block's output and, for dynamic models, the per-sample FLOPs ratio and the
    routers' statistics."""

    features: list = field(default_factory=list)
    block_input: torch.Tensor | None = None  # the tokens entering the first block
    flops_ratio: torch.Tensor | None = None  # [B], block FLOPs dynamic / static
    stats: list = field(default_factory=list)


def block_hook(model, aux=None):
    """The hook a forward routes its blocks through (a feature cache, diffusion/caching.py):
    ``hook(i, h, compute, run, depth) -> h``, where ``compute(h)`` runs block ``i``. None when
    none is set, or when the call returns its block outputs (``return_aux``: training and
    measurements see every block)."""
    return None if aux is not None else model.__dict__.get("_block_hook")


def forward_with_cfg(model, x, t, cond, cfg_scale: float, guide_channels: int | None = None,
                     run: RunContext | None = None):
    """Classifier-free guidance for any family: ``cond`` holds the conditions of the first half
    of the batch and the nulls of the second; the first ``guide_channels`` output channels (all
    latent channels by default) are guided, the learned-variance channels never."""
    half = x[: len(x) // 2]
    combined = torch.cat([half, half], dim=0)
    out = model(combined, t, cond, run=run.guided() if run is not None else None)  # through __call__: hooks see it
    n = model.config.in_channels if guide_channels is None else guide_channels
    eps, rest = out[:, :n], out[:, n:]
    c, u = torch.split(eps, len(eps) // 2, dim=0)
    guided = u + cfg_scale * (c - u)
    return torch.cat([torch.cat([guided, guided], dim=0), rest], dim=1)
