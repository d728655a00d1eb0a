"""DyDiT routers: timestep-wise width routers (TDW) and spatial token routers (SDT), and the
rules that turn their logits into masks.

Training draws hard Gumbel-sigmoid gates (on with probability sigmoid(logit), whatever tau;
straight-through gradient). Inference must run what training expects, so the deterministic
rules below reproduce the training-time *expected* amount of work instead of thresholding
each gate at 0 (which keeps every gate with a logit slightly above 0 on, although training
ran it only part of the time):
- width: the expected number of active groups of the nested (prefix) mask, rounded;
- tokens: the expected number of routed tokens per sample, taken in logit order.
"""

from __future__ import annotations

import enum
from contextlib import contextmanager

import torch
import torch.nn as nn


class Routing(str, enum.Enum):
    """How a dynamic model executes its routers."""

    TRAIN = "train"  # Gumbel-sigmoid straight-through masks, dense compute (set by model.train())
    DENSE = "dense"  # deterministic masks multiplied in, dense compute (the checking reference)
    FAST = "fast"  # deterministic masks, only active heads/channels/tokens computed
    FULL = "full"  # every head, channel and token on (DyDiT's stage-1 full-model loss)


@contextmanager
def routing(model, mode: Routing | str):
    """``with routing(model, Routing.DENSE): ...`` runs ``model`` in that mode, then restores it.
    Accepts a model wrapped by accelerate/DDP (``.module``)."""
    inner = getattr(model, "module", model)
    old = inner.routing
    inner.routing = Routing(mode)
    try:
        yield model
    finally:
        inner.routing = old


def gumbel_sigmoid_mask(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Hard 0/1 mask with a straight-through gradient (logistic noise, threshold 0.5)."""
    u = torch.rand_like(logits).clamp_(1e-6, 1 - 1e-6)
    noise = torch.log(u) - torch.log1p(-u)
    soft = torch.sigmoid((logits + noise) / tau)
    hard = (soft > 0.5).to(soft.dtype)
    return hard - soft.detach() + soft


def prefix_from_gates(gates: torch.Tensor) -> torch.Tensor:
    """Nested mask [B, H]: group 0 always on, group i on iff gates 1..i are all on."""
    return torch.cat([torch.ones_like(gates[:, :1]), gates[:, 1:]], 1).cumprod(1)


def expected_prefix_mask(logits: torch.Tensor) -> torch.Tensor:
    """Inference width mask [B, H]: the first k groups, k = the training-time expected count
    1 + sum_i prod_{j<=i} sigmoid(l_j), rounded to the nearest integer."""
    q = torch.sigmoid(logits[:, 1:].float())
    expected = 1.0 + torch.cumprod(q, 1).sum(1)
    k = torch.floor(expected + 0.5).clamp(1, logits.shape[1])
    ar = torch.arange(logits.shape[1], device=logits.device)
    return (ar[None] < k[:, None]).to(logits.dtype)


def expected_topk_mask(logits: torch.Tensor) -> torch.Tensor:
    """Inference token mask [B, N]: per sample, the round(sum sigmoid(l)) tokens of highest logit
    (training routes each token with probability sigmoid(l))."""
    k = torch.floor(torch.sigmoid(logits.float()).sum(1) + 0.5)
    rank = logits.argsort(1, descending=True).argsort(1)
    return (rank < k[:, None]).to(logits.dtype)


class WidthRouter(nn.Module):
    """Linear(D -> groups) on the timestep embedding only (group 0 is always on, its logit
    unused). DyDiT init: xavier weights, bias 15 (every group on at start)."""

    def __init__(self, dim: int, groups: int, init_bias: float = 15.0):
        super().__init__()
        self.linear = nn.Linear(dim, groups)
        self.init_bias = init_bias
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.xavier_uniform_(self.linear.weight)
        nn.init.constant_(self.linear.bias, self.init_bias)

    def forward(self, t_emb):
        return self.linear(t_emb)


class TokenRouter(nn.Module):
    """MLP D -> D/r -> ReLU -> 1 per token. Init: xavier first layer, zero last weights and
    bias 35 (DyDiT's bias): every token routed at start."""

    def __init__(self, dim: int, reduction: int = 16, init_bias: float = 35.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, max(1, dim // reduction)), nn.ReLU(), nn.Linear(max(1, dim // reduction), 1))
        self.init_bias = init_bias
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.xavier_uniform_(self.net[0].weight)
        nn.init.zeros_(self.net[0].bias)
        nn.init.zeros_(self.net[2].weight)  # every token's logit = the bias: all on at start, whatever the bias
        nn.init.constant_(self.net[2].bias, self.init_bias)

    def forward(self, x):
        return self.net(x).squeeze(-1)
