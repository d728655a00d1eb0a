"""DyDiT routers: timestep-wise width routers (TDW) and spatial token routers (SDT)."""

from __future__ import annotations

import torch
import torch.nn as nn


def gumbel_sigmoid_mask(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Hard 0/1 mask with a straight-through gradient (logistic noise, threshold 0.5)."""
    u = torch.rand_like(logits).clamp_(1e-6, 1 - 1e-6)
    noise = torch.log(u) - torch.log1p(-u)
    soft = torch.sigmoid((logits + noise) / tau)
    hard = (soft > 0.5).to(soft.dtype)
    return hard - soft.detach() + soft


class WidthRouter(nn.Module):
    """Linear(D -> groups) on the timestep embedding only; starts with every group on."""

    def __init__(self, dim: int, groups: int, init_bias: float = 5.0):
        super().__init__()
        self.linear = nn.Linear(dim, groups)
        self.init_bias = init_bias
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.zeros_(self.linear.weight)
        nn.init.constant_(self.linear.bias, self.init_bias)

    def forward(self, t_emb):
        return self.linear(t_emb)


class TokenRouter(nn.Module):
    """MLP D -> D/r -> ReLU -> 1 per token; starts with every token routed to the MLP."""

    def __init__(self, dim: int, reduction: int = 16, init_bias: float = 5.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, max(1, dim // reduction)), nn.ReLU(), nn.Linear(max(1, dim // reduction), 1))
        self.init_bias = init_bias
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.xavier_uniform_(self.net[0].weight)
        nn.init.zeros_(self.net[0].bias)
        nn.init.zeros_(self.net[2].weight)
        nn.init.constant_(self.net[2].bias, self.init_bias)

    def forward(self, x):
        return self.net(x).squeeze(-1)
