"""The layers of the DiT network in the original key layout and numerics (LayerNorm eps
1e-6, sinusoid /128 cos-then-sin, GELU tanh, adaLN-Zero). Attention and MLP also run on a
prefix of their heads / hidden channels through zero-copy weight views (dynamic width)."""

from __future__ import annotations

import math
import weakref

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

FREQ_DIM = 256


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift per sample (shift, scale [B, D]), as one fused kernel."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


def gated(x: torch.Tensor, gate: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The gated residual x + gate * h (gate [B, D] per sample, or already [B, 1, D]), as one
    fused kernel; the result takes ``x``'s memory layout."""
    return torch.addcmul(x, gate.unsqueeze(1) if gate.dim() == 2 else gate, h)


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid_size: int) -> np.ndarray:
    """Fixed 2D sin-cos table [grid*grid, dim]; first half encodes the column, second the row."""
    col, row = np.meshgrid(np.arange(grid_size), np.arange(grid_size))
    return np.concatenate([sincos_1d(dim // 2, col), sincos_1d(dim // 2, row)], axis=1)


def timestep_sinusoid(t: torch.Tensor, dim: int = FREQ_DIM, max_period: float = 10000.0,
                      freq_shift: float = 0.0) -> torch.Tensor:
    """cos-then-sin sinusoid; ``freq_shift=0`` is the original DiT (/128), 1 is diffusers' (/127)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    )
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def xavier_linear(m: nn.Module) -> None:
    """DiT's and PixArt-α's basic initialisation of one module (for ``module.apply``):
    xavier-uniform linear weights, zero biases."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


FUSE_PROJECTIONS: bool | None = None  # None: on CUDA devices (one GEMM); True/False forces it (tests)


def fuse_projections(x: torch.Tensor) -> bool:
    """Whether attention runs q, k and v as one GEMM: on a GPU one larger GEMM (and fewer
    launches) wins; the CPU attention kernel is faster on three contiguous outputs."""
    return x.is_cuda if FUSE_PROJECTIONS is None else FUSE_PROJECTIONS


_PREFIX_ROWS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # module -> {spans: rows}, off the module
PREFIX_WIDTHS = 4  # gathered widths kept per module (the most recently used)


def prefix_rows(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor, spans) -> tuple | None:
    """(weight, bias) of the rows ``spans`` ((start, stop), ...) of a projection, concatenated
    contiguously, made once per span set and kept for ``module`` (outside it: a copy or pickle
    carries none) while the weight is the same tensor at the same version, for the
    ``PREFIX_WIDTHS`` most recent widths (inference only: with gradients enabled None, the
    caller takes views)."""
    if torch.is_grad_enabled():
        return None
    key = (tuple(spans), weight.data_ptr(), weight._version, bias.data_ptr(), bias._version)
    cache = _PREFIX_ROWS.setdefault(module, {})
    if key in cache:
        cache[key] = cache.pop(key)  # most recently used last
        return cache[key]
    if any(k[1:] != key[1:] for k in cache):  # the weights changed: drop every width
        cache.clear()
    while len(cache) >= PREFIX_WIDTHS:
        cache.pop(next(iter(cache)))
    cache[key] = (torch.cat([weight[a:z] for a, z in spans]), torch.cat([bias[a:z] for a, z in spans]))
    return cache[key]


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_ch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_ch, dim, kernel_size=patch, stride=patch, bias=True)

    def forward(self, x):
        # contiguous tokens: a transposed view would carry its layout through every residual
        # add of the network (strided, unvectorised elementwise kernels: 17% of a GPU forward)
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_DIM, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.freq_shift = 0.0

    def forward(self, t):
        return self.embed_freq(timestep_sinusoid(t, freq_shift=self.freq_shift))

    def embed_freq(self, freq: torch.Tensor) -> torch.Tensor:
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class table with a last null row (index ``num_classes``) for classifier-free guidance."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y):
        return self.embedding_table(y)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x, head_mask=None):
        B, N, D = x.shape
        H, hd = self.heads, D // self.heads
        W, b = self.qkv.weight, self.qkv.bias
        if fuse_projections(x):  # one GEMM; the fused attention kernels take the strided q, k, v as they are
            q, k, v = F.linear(x, W, b).view(B, N, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            # three projections on views of the fused weight: each output is contiguous per head
            # layout, which the CPU attention kernel handles faster than slices of one fused output
            q = F.linear(x, W[:D], b[:D]).view(B, N, H, hd).transpose(1, 2)
            k = F.linear(x, W[D:2 * D], b[D:2 * D]).view(B, N, H, hd).transpose(1, 2)
            v = F.linear(x, W[2 * D:], b[2 * D:]).view(B, N, H, hd).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v)  # B H N hd
        if head_mask is not None:
            o = o * head_mask[:, :, None, None].to(o.dtype)
        return self.proj(o.transpose(1, 2).reshape(B, N, D))

    def forward_sliced(self, x, k: int):
        """Only the first ``k`` heads, through zero-copy views of the weights."""
        if k == self.heads:
            return self.forward(x)
        B, N, D = x.shape
        hd = D // self.heads
        n = k * hd
        W, b = self.qkv.weight, self.qkv.bias
        fused = prefix_rows(self, W, b, ((0, n), (D, D + n), (2 * D, 2 * D + n))) if fuse_projections(x) else None
        if fused is not None:  # one GEMM over the kept rows of q, k and v, gathered once per width
            q, kk, v = F.linear(x, *fused).view(B, N, 3, k, hd).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q = F.linear(x, W[:n], b[:n]).view(B, N, k, hd).transpose(1, 2)
            kk = F.linear(x, W[D:D + n], b[D:D + n]).view(B, N, k, hd).transpose(1, 2)
            v = F.linear(x, W[2 * D:2 * D + n], b[2 * D:2 * D + n]).view(B, N, k, hd).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, kk, v).transpose(1, 2).reshape(B, N, n)
        return F.linear(o, self.proj.weight[:, :n], self.proj.bias)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x, channel_mask=None):
        h = self.act(self.fc1(x))
        if channel_mask is not None:
            groups = channel_mask.shape[-1]
            B = h.shape[0]
            h = (h.view(*h.shape[:-1], groups, -1) * channel_mask.view(B, *([1] * (h.dim() - 2)), groups, 1)).view_as(h)
        return self.fc2(h)

    def forward_sliced(self, x, c: int):
        """Only the first ``c`` hidden channels (zero-copy views)."""
        if c == self.fc1.out_features:
            return self.forward(x)
        h = self.act(F.linear(x, self.fc1.weight[:c], self.fc1.bias[:c]))
        return F.linear(h, self.fc2.weight[:, :c], self.fc2.bias)


class DiTBlock(nn.Module):
    """adaLN-Zero block: attention and MLP, each modulated and gated by the conditioning."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, num_classes: int | None = None):
        """``num_classes`` given: the block owns timestep/class embedders (``t_embedder``,
        ``y_embedder``), as every block of a DiT created or trained in diffusers does."""
        super().__init__()
        if num_classes is not None:
            self.t_embedder = TimestepEmbedder(dim)
            self.y_embedder = LabelEmbedder(num_classes, dim)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim, bias=True))
        self.heads = heads

    def forward(self, x, c, t_emb=None, mode=None, tau: float = 1.0, stats=None):
        """``t_emb``/``mode``/``tau``/``stats`` are read by routed blocks only (model/dynamic.py)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = gated(x, gate_msa, self.attn(modulate(self.norm1(x), shift_msa, scale_msa)))
        return gated(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch: int, out_ch: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * out_ch, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))
