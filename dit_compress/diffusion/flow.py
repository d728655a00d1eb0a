"""Flow matching as SiT trains and samples it: the linear interpolant, velocity prediction.

Time convention (SiT, ``transport/path.py`` ICPlan): t in [0, 1], t = 0 is pure noise and
t = 1 is data; x_t = t * x1 + (1 - t) * x0 (x1 data, x0 noise), target velocity
u_t = x1 - x0, loss mean((v(x_t, t) - u_t)^2) with t ~ U[0, 1]. The network sees t itself
(no x1000 scaling). REPA-trained SiTs flip the time (t = 1 noise): ``time_input="repa"``
feeds the network 1 - t. Samplers run in SiT's time, from 0 to 1:
- ODE dx/dt = v (Euler or Heun on t = linspace(0, 1, N + 1));
- SDE (SiT's default evaluation sampler, FID 2.06 for SiT-XL/2): Euler-Maruyama on
  t = linspace(0, 1 - h, N) with drift v + w(t) * score and diffusion w(t) = sigma_t = 1 - t
  ("sigma" form), score = (t * v - x) / (1 - t); the last step of size h = 0.04 takes the
  drift only ("Mean").
"""

from __future__ import annotations

import torch

from .gaussian import mean_flat

TIME_INPUTS = ("sit", "repa")


class FlowMatching:
    """The velocity objective with the same interface as ``GaussianDiffusion`` (training
    losses, ``q_sample``, ``model_t``, ``split_output``), so every trainer and scorer uses it."""

    def __init__(self, time_input: str = "sit"):
        if time_input not in TIME_INPUTS:
            raise ValueError(f"unknown time input {time_input!r}; choose {' or '.join(TIME_INPUTS)}")
        self.time_input = time_input
        self.learn_sigma = False  # a SiT's extra output channels carry no loss

    # ------------------------------------------------------------------ time
    @staticmethod
    def continuous_t(t: torch.Tensor, frac: torch.Tensor | None = None) -> torch.Tensor:
        """Integer steps 0..999 (batch and calibration draws) -> t in (0, 1): (t + frac) / 1000,
        frac ~ U[0, 1) per sample when given (uniform in [0, 1] overall), else the midpoint."""
        if t.is_floating_point():
            return t
        return (t.double() + (0.5 if frac is None else frac.double())).float() / 1000.0

    def batch_t(self, batch: dict) -> torch.Tensor:
        return self.continuous_t(batch["t"], batch.get("t_frac"))

    def model_t(self, t: torch.Tensor) -> torch.Tensor:
        """What the network is fed for SiT time t."""
        return t if self.time_input == "sit" else 1.0 - t

    # ------------------------------------------------------------------ objective
    def q_sample(self, x1, t, noise):
        t = self.continuous_t(t).view(-1, *([1] * (x1.dim() - 1)))
        return t * x1 + (1 - t) * noise

    @staticmethod
    def split_output(out, x):
        C = x.shape[1]
        return out[:, :C], None

    def losses_from_output(self, out, x1, xt, t, noise) -> dict:
        v = out[:, : x1.shape[1]]
        mse = mean_flat((v - (x1 - noise)) ** 2)
        return {"loss": mse, "mse": mse, "vb": torch.zeros_like(mse)}

    def training_losses(self, model, x1, t, y, noise=None, **model_kwargs) -> dict:
        if noise is None:
            noise = torch.randn_like(x1)
        t = self.continuous_t(t)
        xt = self.q_sample(x1, t, noise)
        out = model(xt, self.model_t(t), y, **model_kwargs)
        aux = None
        if isinstance(out, tuple):
            out, aux = out
        res = self.losses_from_output(out, x1, xt, t, noise)
        if aux is not None:
            res["aux"] = aux
        res["output"], res["xt"] = out, xt
        return res

    # ------------------------------------------------------------------ sampling helpers
    @staticmethod
    def score_from_velocity(v, x, t):
        """Linear path: score = (t v - x) / (1 - t); ``t`` a number or a per-sample tensor."""
        if torch.is_tensor(t):
            t = t.to(x.device, x.dtype).view(-1, *([1] * (x.dim() - 1)))
        return (t * v - x) / (1 - t)
