"""The DiT network in the original key layout (``blocks.i.attn.qkv`` ...), with the
original numerics (LayerNorm eps 1e-6, sinusoid /128 cos-then-sin, GELU tanh, adaLN-Zero).

Compression lives in the same module, described by the config:
- depth pruning: the model simply has fewer blocks (``config.kept_layers`` says which);
- dynamic width (DyDiT TDW): ``blocks.i.head_router`` / ``blocks.i.channel_router``;
- dynamic tokens (DyDiT SDT): ``blocks.i.token_router``.

Routers run in one of the modes of ``routers.Routing`` (``with routing(model, mode)``):
``TRAIN`` (Gumbel-sigmoid straight-through masks, dense compute; whenever ``model.training``),
``DENSE`` (deterministic masks multiplied in: the checking reference), ``FAST`` (deterministic
masks, only active heads/channels computed on zero-copy prefix views, only routed tokens
enter the MLP) and ``FULL`` (everything on: DyDiT's stage-1 full-model loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import DiTConfig
from .routers import (Routing, TokenRouter, WidthRouter, expected_prefix_mask, expected_topk_mask,
                      gumbel_sigmoid_mask, prefix_from_gates)

FREQ_DIM = 256


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


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


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_ch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_ch, dim, kernel_size=patch, stride=patch, bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


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


@dataclass
class BlockStats:
    head_frac: torch.Tensor | None = None  # [B]
    channel_frac: torch.Tensor | None = None  # [B]
    token_frac: torch.Tensor | None = None  # [B]


class DiTBlock(nn.Module):
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
        self.head_router: WidthRouter | None = None
        self.channel_router: WidthRouter | None = None
        self.token_router: TokenRouter | None = None
        self.static_width = False

    # ------------------------------------------------------------------ masks
    def width_masks(self, t_emb, mode: str, tau: float):
        """Nested (prefix) masks over heads and MLP channel groups: [B, H] each, or None.
        Training: hard Gumbel gates, prefix = cumulative product; inference: the expected
        prefix length of that process (see routers.expected_prefix_mask)."""
        if self.head_router is None or mode == Routing.FULL:
            return None, None
        hl, cl = self.head_router(t_emb), self.channel_router(t_emb)
        if mode == Routing.TRAIN and not self.static_width:
            return prefix_from_gates(gumbel_sigmoid_mask(hl, tau)), prefix_from_gates(gumbel_sigmoid_mask(cl, tau))
        return expected_prefix_mask(hl).to(t_emb.dtype), expected_prefix_mask(cl).to(t_emb.dtype)

    def token_mask(self, x, mode: str, tau: float):
        if self.token_router is None or mode == Routing.FULL:
            return None
        logits = self.token_router(x)
        if mode == Routing.TRAIN:
            return gumbel_sigmoid_mask(logits, tau)
        return expected_topk_mask(logits).to(x.dtype)

    # ------------------------------------------------------------------ forward
    def forward(self, x, c, t_emb=None, mode: str = "dense", tau: float = 5.0, stats: BlockStats | None = None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        hm, cm = self.width_masks(t_emb, mode, tau)
        if mode == Routing.FAST and hm is not None:
            return self._forward_fast_width(x, hm, cm, (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp), stats)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), hm)
        tm = self.token_mask(x, mode, tau)
        if stats is not None:
            stats.head_frac = hm.mean(1) if hm is not None else None
            stats.channel_frac = cm.mean(1) if cm is not None else None
            stats.token_frac = tm.mean(1) if tm is not None else None
        if mode == Routing.FAST and tm is not None:
            return self._mlp_on_tokens(x, tm, shift_mlp, scale_mlp, gate_mlp, None)
        h = self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp), cm)
        if tm is not None:
            h = h * tm.unsqueeze(-1)
        return x + gate_mlp.unsqueeze(1) * h

    def _mlp_on_tokens(self, x, tm, shift, scale, gate, channels: int | None):
        """Run the MLP on routed tokens only (flattened over the batch) and scatter back."""
        b_idx, n_idx = tm.nonzero(as_tuple=True)
        sel = self.norm2(x[b_idx, n_idx])
        sel = sel * (1 + scale[b_idx]) + shift[b_idx]
        h = self.mlp.forward_sliced(sel, channels) if channels is not None else self.mlp(sel)
        out = x.clone()
        out[b_idx, n_idx] += gate[b_idx] * h
        return out

    def _forward_fast_width(self, x, hm, cm, mods, stats):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        k_heads = hm.sum(1).long()
        k_groups = cm.sum(1).long()
        if not (bool((k_heads == k_heads[0]).all()) and bool((k_groups == k_groups[0]).all())):
            # timesteps differ inside the batch: split by distinct width, each part sliced
            out = torch.empty_like(x)
            keys = torch.stack([k_heads, k_groups], 1)
            for key in torch.unique(keys, dim=0):
                sel = (keys == key).all(1)
                out[sel] = self._forward_fast_width(
                    x[sel], hm[sel], cm[sel], [m[sel] for m in mods], None
                )
            if stats is not None:
                stats.head_frac, stats.channel_frac = hm.mean(1), cm.mean(1)
            return out
        k = int(k_heads[0])
        gs = self.mlp.fc1.out_features // cm.shape[1]
        ch = int(k_groups[0]) * gs
        x = x + gate_msa.unsqueeze(1) * self.attn.forward_sliced(modulate(self.norm1(x), shift_msa, scale_msa), k)
        tm = self.token_mask(x, Routing.FAST, 0.0)
        if stats is not None:
            stats.head_frac, stats.channel_frac = hm.mean(1), cm.mean(1)
            stats.token_frac = tm.mean(1) if tm is not None else None
        if tm is not None:
            return self._mlp_on_tokens(x, tm, shift_mlp, scale_mlp, gate_mlp, ch)
        h = self.mlp.forward_sliced(modulate(self.norm2(x), shift_mlp, scale_mlp), ch)
        return x + gate_mlp.unsqueeze(1) * h


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch: int, out_ch: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * out_ch, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


@dataclass
class ForwardAux:
    features: list = field(default_factory=list)
    flops_ratio: torch.Tensor | None = None  # [B], block FLOPs dynamic / static
    stats: list = field(default_factory=list)


class DiT(nn.Module):
    """Diffusion Transformer. ``model(x, t, y)`` has the original DiT forward semantics."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(config.num_classes, D)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches, D), requires_grad=False)
        own = config.num_classes if config.block_embedders else None
        self.blocks = nn.ModuleList([DiTBlock(D, config.num_heads, config.mlp_ratio, own) for _ in range(config.depth)])
        self.final_layer = FinalLayer(D, config.patch_size, config.out_channels)
        self.routing = Routing.FAST  # set with dit_compress.model.routing(model, mode)
        if config.width is not None:
            self._add_width_routers()
        if config.tokens is not None:
            self._add_token_routers()
        self.initialize_weights()
        self._apply_numerics(config.numerics)

    # ------------------------------------------------------------------ construction
    def _add_width_routers(self):
        c = self.config
        for b in self.blocks:
            b.head_router = WidthRouter(c.hidden_size, c.num_heads, c.width.init_bias)
            b.channel_router = WidthRouter(c.hidden_size, c.num_heads, c.width.init_bias)
            b.static_width = c.width.static

    def _add_token_routers(self):
        c = self.config
        for b in self.blocks:
            b.token_router = TokenRouter(c.hidden_size, c.tokens.reduction, c.tokens.init_bias)

    def initialize_weights(self):
        """The reference initialisation: xavier linears, adaLN-Zero, fixed sin-cos positions."""

        def _basic(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(_basic)
        grid = int(self.config.num_patches ** 0.5)
        self.pos_embed.data.copy_(torch.from_numpy(sincos_2d(self.config.hidden_size, grid)).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for b in self.blocks:
            if self.config.block_embedders:
                nn.init.normal_(b.y_embedder.embedding_table.weight, std=0.02)
                nn.init.normal_(b.t_embedder.mlp[0].weight, std=0.02)
                nn.init.normal_(b.t_embedder.mlp[2].weight, std=0.02)
            nn.init.zeros_(b.adaLN_modulation[-1].weight)
            nn.init.zeros_(b.adaLN_modulation[-1].bias)
            for r in (b.head_router, b.channel_router, b.token_router):
                if r is not None:
                    r.reset_parameters()
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    # ------------------------------------------------------------------ forward
    def unpatchify(self, x):
        c = self.config.out_channels
        p = self.config.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def embed(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed
        t_emb = self.t_embedder(t)
        c = t_emb + self.y_embedder(y)
        return x, t_emb, c

    def block_conditions(self, t, y, t_emb, c) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(t_emb, c) for each block: the shared embedding, or each block's own embedders.
        The top-level embedders always condition the final layer (diffusers: block 0's)."""
        if not self.config.block_embedders:
            return [(t_emb, c)] * len(self.blocks)
        freq = timestep_sinusoid(t, freq_shift=self.t_embedder.freq_shift)
        out = []
        for b in self.blocks:
            te = b.t_embedder.embed_freq(freq)
            out.append((te, te + b.y_embedder(y)))
        return out

    def forward(self, x, t, y, gates=None, return_aux: bool = False):
        """``gates`` [B, depth] blends each block with the identity (depth search only)."""
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        h, t_emb, c = self.embed(x, t, y)
        conds = self.block_conditions(t, y, t_emb, c)
        mode = self._mode()
        tau = self._tau()
        aux = ForwardAux() if return_aux else None
        want_stats = return_aux and self.config.is_dynamic
        for i, block in enumerate(self.blocks):
            st = BlockStats() if want_stats else None
            out = block(h, conds[i][1], conds[i][0], mode, tau, st)
            if gates is not None:
                g = gates[:, i].to(out.dtype).view(-1, 1, 1)
                out = g * out + (1 - g) * h
            h = out
            if aux is not None:
                aux.features.append(h)
                if st is not None:
                    aux.stats.append(st)
        out = self.unpatchify(self.final_layer(h, c))
        if aux is None:
            return out
        if want_stats:
            aux.flops_ratio = self.block_flops_ratio(aux.stats, x.shape[0], x.device)
        return out, aux

    def _mode(self) -> Routing:
        if self.routing == Routing.FULL:
            return Routing.FULL
        if self.training and self.config.is_dynamic:
            return Routing.TRAIN
        return Routing(self.routing)

    def _tau(self) -> float:
        c = self.config
        if c.width is not None:
            return c.width.tau
        if c.tokens is not None:
            return c.tokens.tau
        return 1.0

    def block_flops_ratio(self, stats: list, batch: int, device) -> torch.Tensor:
        """Per-sample dynamic/static FLOPs of the blocks (DyDiT's F_dyn / F_static)."""
        from ..compress.flops import block_macs

        attn, mlp = block_macs(self.config)
        one = torch.ones(batch, device=device)
        dyn = 0.0
        for st in stats:
            h = st.head_frac if st.head_frac is not None else one
            ch = st.channel_frac if st.channel_frac is not None else one
            tk = st.token_frac if st.token_frac is not None else one
            dyn = dyn + attn * h + mlp * ch * tk
        return dyn / (len(stats) * (attn + mlp))

    def forward_with_cfg(self, x, t, y, cfg_scale: float, guide_channels: int | None = None):
        """Classifier-free guidance on a batch whose second half holds the null labels.

        ``guide_channels=3`` is the reference DiT code (guides the first three output
        channels "for exact reproducibility"); ``None`` guides all latent channels as
        diffusers' DiTPipeline does. The learned-variance channels are never guided.
        """
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        out = self(combined, t, y)  # through __call__: hooks (FLOPs meter, LoRA) see guided calls too
        n = self.config.in_channels if guide_channels is None else guide_channels
        eps, rest = out[:, :n], out[:, n:]
        cond, uncond = torch.split(eps, len(eps) // 2, dim=0)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided], dim=0), rest], dim=1)

    # ------------------------------------------------------------------ helpers
    def set_numerics(self, kind: str = "original") -> "DiT":
        """``"original"`` (DiT reference: sinusoid /128, every LayerNorm eps 1e-6) or
        ``"diffusers"`` (sinusoid /127, pre-MLP LayerNorm eps 1e-5): the numerics the
        weights were trained with. Recorded in the config (and so in saved checkpoints)."""
        self.config = self.config.copy(numerics=kind)
        self._apply_numerics(kind)
        return self

    def _apply_numerics(self, kind: str) -> None:
        shift = 1.0 if kind == "diffusers" else 0.0
        self.t_embedder.freq_shift = shift
        for b in self.blocks:
            b.norm2.eps = 1e-5 if kind == "diffusers" else 1e-6
            if hasattr(b, "t_embedder"):
                b.t_embedder.freq_shift = shift

    def num_params(self, include_routers: bool = True) -> int:
        n = 0
        for name, p in self.named_parameters():
            if name == "pos_embed":
                continue
            if not include_routers and "router" in name:
                continue
            n += p.numel()
        return n
