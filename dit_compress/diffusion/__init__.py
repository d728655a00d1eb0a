import torch

from ..errors import UsageError
from .flow import FlowMatching
from .gaussian import GaussianDiffusion
from .mar import sample_mar
from .processes import generation_loop, process_of
from .sampling import check_inputs, sample


def objective_for(config):
    """The training objective a model's config states: DiT's Gaussian diffusion (eps), SiT's
    flow matching (velocity on the linear path), or its family's own process (MAR's token
    loss)."""
    proc = process_of(config)
    if proc is not None:
        return proc[0](config)
    if config.prediction == "velocity":
        return FlowMatching(config.time_input)
    return GaussianDiffusion.create(learn_sigma=config.learn_sigma)


def training_losses(model, x0, t, y, noise=None, **model_kwargs) -> dict:
    """Per-sample ``loss``, ``mse`` and ``vb`` of the model's own objective: DiT's hybrid loss
    (eps MSE + VLB, 1000 steps; ``t`` integer steps 0..999) for eps models, SiT's velocity
    loss (``t`` in [0, 1], 1 = data; ``vb`` is 0) for velocity models."""
    x0, y = check_inputs(model, x0, y)
    if noise is not None:
        check_inputs(model, noise, y)
        if noise.shape != x0.shape:
            raise UsageError(f"`noise` has shape {list(noise.shape)}, `x0` {list(x0.shape)}")
    obj = objective_for(model.config)
    if not torch.is_tensor(t):
        t = torch.as_tensor(t)
    if t.dim() == 0:
        t = t.expand(len(x0))
    if t.shape != (len(x0),):
        raise UsageError(f"`t` must hold one time per sample ({len(x0)}), got shape {list(t.shape)}")
    if isinstance(obj, GaussianDiffusion):
        if t.is_floating_point() or t.dtype == torch.bool:
            raise UsageError("`t` of an eps (DiT) model is integer diffusion steps 0..999")
        if int(t.min()) < 0 or int(t.max()) >= obj.num_timesteps:
            raise UsageError(f"`t` holds steps outside 0..{obj.num_timesteps - 1}")
        t = t.long()
    else:
        if not t.is_floating_point():
            raise UsageError("`t` of a velocity (SiT) model is a float time in [0, 1] (1 = data)")
        if not bool(torch.isfinite(t).all()) or float(t.min()) < 0 or float(t.max()) > 1:
            raise UsageError("`t` of a velocity model must lie in [0, 1]")
    res = obj.training_losses(model, x0, t, y, noise=noise, **model_kwargs)
    return {k: res[k] for k in ("loss", "mse", "vb")}


__all__ = ["FlowMatching", "GaussianDiffusion", "objective_for", "training_losses", "sample", "sample_mar", "generation_loop"]
