"""An independent re-implementation of the original DiT network (the reference ``models.py``
semantics: timm-style attention, adaLN-Zero blocks, sinusoid cos-then-sin over 256 dims with
frequencies exp(-ln(10000) i / 128)), written for the tests without any dit_compress code.

Checkpoints saved from it with plain ``torch.save`` are what other people's original-layout
files look like, at any size (including head counts that are not hidden/64)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn


def _sincos_1d(dim, pos):
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.outer(pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def _pos_table(dim, grid):
    w, h = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    return np.concatenate([_sincos_1d(dim // 2, w), _sincos_1d(dim // 2, h)], axis=1)


class RefAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        a = ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((a @ v).transpose(1, 2).reshape(B, N, C))


class RefMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class RefTimestep(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
        args = t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], -1))


class RefLabel(nn.Module):
    def __init__(self, n, dim):
        super().__init__()
        self.embedding_table = nn.Embedding(n + 1, dim)

    def forward(self, y):
        return self.embedding_table(y)


class RefPatch(nn.Module):
    def __init__(self, p, c, dim):
        super().__init__()
        self.proj = nn.Conv2d(c, dim, p, p)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


def _mod(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class RefBlock(nn.Module):
    def __init__(self, dim, heads, ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = RefAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = RefMlp(dim, int(dim * ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        s1, sc1, g1, s2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g1[:, None] * self.attn(_mod(self.norm1(x), s1, sc1))
        return x + g2[:, None] * self.mlp(_mod(self.norm2(x), s2, sc2))


class RefFinal(nn.Module):
    def __init__(self, dim, p, out):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, p * p * out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(_mod(self.norm_final(x), shift, scale))


class RefDiT(nn.Module):
    def __init__(self, input_size=8, patch=2, in_ch=4, hidden=64, depth=2, heads=4, classes=10, learn_sigma=True):
        super().__init__()
        self.p, self.out = patch, in_ch * 2 if learn_sigma else in_ch
        self.x_embedder = RefPatch(patch, in_ch, hidden)
        self.t_embedder = RefTimestep(hidden)
        self.y_embedder = RefLabel(classes, hidden)
        grid = input_size // patch
        self.pos_embed = nn.Parameter(torch.from_numpy(_pos_table(hidden, grid)).float()[None], requires_grad=False)
        self.blocks = nn.ModuleList([RefBlock(hidden, heads) for _ in range(depth)])
        self.final_layer = RefFinal(hidden, patch, self.out)

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for b in self.blocks:
            x = b(x, c)
        x = self.final_layer(x, c)
        n, hw = x.shape[0], int(x.shape[1] ** 0.5)
        x = x.reshape(n, hw, hw, self.p, self.p, self.out)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(n, self.out, hw * self.p, hw * self.p)


def reference_dit(seed=0, **kw) -> RefDiT:
    """A randomly perturbed reference DiT (so adaLN-Zero and the final layer are not zero)."""
    torch.manual_seed(seed)
    m = RefDiT(**kw)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n != "pos_embed":
                p.add_(torch.randn_like(p) * 0.05)
    return m.eval()
