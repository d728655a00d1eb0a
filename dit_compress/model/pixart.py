"""PixArt-α / PixArt-Σ, the text-to-image DiT, in diffusers' key layout
(``PixArtTransformer2DModel``: ``transformer_blocks.i.attn1.to_q`` ...), with diffusers'
numerics, so a diffusers checkpoint loads as a plain state-dict copy.

The network (PixArt-α, section 2.3; diffusers' ``pixart_transformer_2d.py`` and
``BasicTransformerBlock`` with ``norm_type="ada_norm_single"``):
- patches + a fixed 2D sin-cos table (positions scaled by ``interpolation_scale`` and the
  base grid);
- adaLN-single: the timestep (and, for the 1024 px models, the resolution and aspect ratio)
  -> one embedding e -> ``linear(silu(e))``, a 6D vector shared by every block, to which each
  block adds its own ``scale_shift_table`` [6, D];
- the caption (T5 features) projected to D by ``caption_projection``;
- each block: x += gate_msa * self_attn(modulate(norm1(x))); x += cross_attn(x, caption, mask)
  (no norm, no gate); x += gate_mlp * ff(modulate(norm2(x)));
- output: norm, modulated by the output ``scale_shift_table`` [2, D] + e, linear, unpatchify.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .dynamic import BlockStats, RoutedModel, WidthRouted, block_flops_ratio
from .layers import PatchEmbed, gated, timestep_sinusoid, xavier_linear
from .routers import Routing
from .graphs import active_graphs
from .run import ForwardAux, RunContext, block_hook, forward_with_cfg


@dataclass
class Captions:
    """The text condition of a batch: caption embeddings [B, L, C] (the text encoder's
    features), their attention mask [B, L] (1 = a real token), and for the 1024 px models the
    resolution [B, 2] and aspect ratio [B, 1]."""

    emb: torch.Tensor
    mask: torch.Tensor
    resolution: torch.Tensor | None = None
    aspect_ratio: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.emb)

    def _map(self, fn) -> "Captions":
        extra = [None if v is None else fn(v) for v in (self.resolution, self.aspect_ratio)]
        return Captions(fn(self.emb), fn(self.mask), *extra)

    def __getitem__(self, idx) -> "Captions":
        return self._map(lambda v: v[idx])

    def to(self, device, **kw) -> "Captions":
        return self._map(lambda v: v.to(device, **kw))

    @property
    def device(self):
        return self.emb.device

    def cat(self, other: "Captions") -> "Captions":
        def both(a, b):
            if a is None or b is None:
                return None
            return torch.cat([a, b], 0)

        emb, mask = self.emb, self.mask
        o_emb, o_mask = other.emb, other.mask
        if emb.shape[1] != o_emb.shape[1]:  # pad the shorter caption (masked out)
            n = max(emb.shape[1], o_emb.shape[1])
            emb, mask = _pad(emb, mask, n)
            o_emb, o_mask = _pad(o_emb, o_mask, n)
        return Captions(torch.cat([emb, o_emb]), torch.cat([mask, o_mask]), both(self.resolution, other.resolution),
                        both(self.aspect_ratio, other.aspect_ratio))


def _pad(emb, mask, n):
    extra = n - emb.shape[1]
    if extra == 0:
        return emb, mask
    return (torch.cat([emb, emb.new_zeros(emb.shape[0], extra, emb.shape[2])], 1),
            torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], 1))


def pixart_pos_table(dim: int, grid: int, base_size: int, interpolation_scale: float) -> np.ndarray:
    """The fixed table [grid*grid, dim] of diffusers' PatchEmbed: positions arange(grid) /
    (grid / base_size) / interpolation_scale; first half the column, second half the row."""
    pos = np.arange(grid, dtype=np.float64) / (grid / base_size) / interpolation_scale
    col, row = np.meshgrid(pos, pos)

    def one(d, p):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", p.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one(dim // 2, col), one(dim // 2, row)], axis=1)


class TimestepEmbedding(nn.Module):
    """diffusers' TimestepEmbedding: linear_1 -> SiLU -> linear_2."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class CombinedEmbedding(nn.Module):
    """PixArt's timestep (+ resolution and aspect ratio) embedding (keys of diffusers'
    PixArtAlphaCombinedTimestepSizeEmbeddings). Sinusoids cos-then-sin over 128 frequencies."""

    def __init__(self, dim: int, additional: bool):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(256, dim)
        self.additional = additional
        if additional:
            self.resolution_embedder = TimestepEmbedding(256, dim // 3)
            self.aspect_ratio_embedder = TimestepEmbedding(256, dim // 3)

    def timestep(self, t):
        """The timestep's own embedding (before the size conditions are added): what the
        width routers of a dynamic PixArt read."""
        return self.timestep_embedder(timestep_sinusoid(t).to(self.timestep_embedder.linear_1.weight.dtype))

    def forward(self, t, resolution=None, aspect_ratio=None):
        dtype = self.timestep_embedder.linear_1.weight.dtype
        emb = self.timestep(t)
        if self.additional:
            B = len(t)
            res = self.resolution_embedder(timestep_sinusoid(resolution.flatten()).to(dtype)).reshape(B, -1)
            ar = self.aspect_ratio_embedder(timestep_sinusoid(aspect_ratio.flatten()).to(dtype)).reshape(B, -1)
            emb = emb + torch.cat([res, ar], dim=1)
        return emb


class AdaLNSingle(nn.Module):
    def __init__(self, dim: int, additional: bool):
        super().__init__()
        self.emb = CombinedEmbedding(dim, additional)
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, t, resolution=None, aspect_ratio=None):
        e = self.emb(t, resolution, aspect_ratio)
        return self.linear(self.silu(e)), e


class Attention(nn.Module):
    """diffusers' Attention with its default processor: to_q/to_k/to_v, to_out.0; an
    additive mask bias (0 keep, -10000 drop) over the keys."""

    def __init__(self, dim: int, heads: int, head_dim: int, kv_dim: int | None = None):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(kv_dim or dim, inner)
        self.to_v = nn.Linear(kv_dim or dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])

    def forward(self, x, context=None, bias=None, head_mask=None):
        B, N, _ = x.shape
        ctx = x if context is None else context
        H, hd = self.heads, self.head_dim
        q = self.to_q(x).view(B, N, H, hd).transpose(1, 2)
        k = self.to_k(ctx).view(B, ctx.shape[1], H, hd).transpose(1, 2)
        v = self.to_v(ctx).view(B, ctx.shape[1], H, hd).transpose(1, 2)
        mask = None if bias is None else bias[:, None, :, :].to(q.dtype)  # [B, 1, 1, L]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if head_mask is not None:
            o = o * head_mask[:, :, None, None].to(o.dtype)
        return self.to_out[0](o.transpose(1, 2).reshape(B, N, H * hd))

    def forward_sliced(self, x, k: int):
        """Self-attention with only the first ``k`` heads, through zero-copy weight views."""
        if k == self.heads:
            return self.forward(x)
        B, N, _ = x.shape
        hd, n = self.head_dim, k * self.head_dim

        def proj(lin):
            return F.linear(x, lin.weight[:n], lin.bias[:n]).view(B, N, k, hd).transpose(1, 2)

        o = F.scaled_dot_product_attention(proj(self.to_q), proj(self.to_k), proj(self.to_v))
        return F.linear(o.transpose(1, 2).reshape(B, N, n), self.to_out[0].weight[:, :n], self.to_out[0].bias)


class GELUProj(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x):
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.net = nn.ModuleList([GELUProj(dim, inner), nn.Dropout(0.0), nn.Linear(inner, dim)])

    def forward(self, x, channel_mask=None):
        h = self.net[0](x)
        if channel_mask is not None:
            groups = channel_mask.shape[-1]
            h = (h.view(*h.shape[:-1], groups, -1) * channel_mask.view(h.shape[0], 1, groups, 1).to(h.dtype)).view_as(h)
        return self.net[2](h)

    def forward_sliced(self, x, c: int):
        """Only the first ``c`` hidden channels (zero-copy views)."""
        lin1, lin2 = self.net[0].proj, self.net[2]
        if c == lin1.out_features:
            return self.forward(x)
        h = F.gelu(F.linear(x, lin1.weight[:c], lin1.bias[:c]), approximate="tanh")
        return F.linear(h, lin2.weight[:, :c], lin2.bias)


class PixArtBlock(nn.Module):
    """BasicTransformerBlock with adaLN-single, self-attention, cross-attention, feed-forward."""

    def __init__(self, dim: int, heads: int, head_dim: int, cross_dim: int, mlp_hidden: int, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.attn1 = Attention(dim, heads, head_dim)
        self.attn2 = Attention(dim, heads, head_dim, kv_dim=cross_dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.ff = FeedForward(dim, mlp_hidden)
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim ** 0.5)

    @property
    def channels(self) -> int:
        return self.ff.net[0].proj.out_features

    def modulations(self, t6):
        return (self.scale_shift_table[None] + t6.reshape(t6.shape[0], 6, -1)).chunk(6, dim=1)

    def forward(self, x, t6, caption, bias):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulations(t6)
        x = gated(x, gate_msa, self.attn1(torch.addcmul(shift_msa, self.norm1(x), 1 + scale_msa)))
        x = x + self.attn2(x, caption, bias)
        return gated(x, gate_mlp, self.ff(torch.addcmul(shift_mlp, self.norm2(x), 1 + scale_mlp)))


class RoutedPixArtBlock(WidthRouted, PixArtBlock):
    """A PixArt block with DyDiT's routers: timestep-wise width over its self-attention heads
    and feed-forward channel groups, and spatial token routing before the feed-forward (the
    router reads each token after both attentions). Cross-attention keeps every head: the
    width routers read the timestep alone, and the caption path is the one way the prompt
    reaches the image, so no timestep decides to drop it; its FLOPs count as the block's fixed
    part."""

    def __init__(self, dim: int, heads: int, head_dim: int, cross_dim: int, mlp_hidden: int, config):
        super().__init__(dim, heads, head_dim, cross_dim, mlp_hidden)
        self.add_width_routers(dim, heads, config)

    def forward(self, x, t6, caption, bias, t_emb=None, mode: Routing = Routing.DENSE, tau: float = 5.0,
                stats=None, widths: tuple[int, int] | None = None, full_rows: int = 0):
        mods = self.modulations(t6)
        if widths is not None:
            return self._sliced(x, mods, caption, bias, widths[0], widths[1], stats)
        if full_rows and mode == Routing.FAST:
            raise ValueError("full_rows needs a masked-dense routing mode (TRAIN or DENSE)")
        hm, cm = self.width_masks(t_emb, mode, tau, full_rows)
        if mode == Routing.FAST and hm is not None:
            def run(rows, heads, channels):
                if rows is None:
                    return self._sliced(x, mods, caption, bias, heads, channels, None)
                return self._sliced(x[rows], [m[rows] for m in mods], caption[rows], bias[rows], heads, channels, None)

            out = self.split_by_width(hm, cm, run)
            self.width_stats(stats, hm, cm, len(x))
            return out
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        x = gated(x, gate_msa, self.attn1(torch.addcmul(shift_msa, self.norm1(x), 1 + scale_msa), head_mask=hm))
        x = x + self.attn2(x, caption, bias)
        self.width_stats(stats, hm, cm, x.shape[0] - full_rows)
        if mode == Routing.FAST and self.token_router is not None:
            return self.fast_token_mlp(x, stats, shift_mlp, scale_mlp, gate_mlp, self.norm2, self.ff)
        tm = self.token_mask(x, mode, tau, full_rows)
        if stats is not None:
            stats.token_frac = tm[:x.shape[0] - full_rows].mean(1) if tm is not None else None
        h = self.ff(torch.addcmul(shift_mlp, self.norm2(x), 1 + scale_mlp), channel_mask=cm)
        if tm is not None:
            h = h * tm.unsqueeze(-1)
        return gated(x, gate_mlp, h)

    def _sliced(self, x, mods, caption, bias, heads: int, channels: int, stats):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        x = gated(x, gate_msa, self.attn1.forward_sliced(torch.addcmul(shift_msa, self.norm1(x), 1 + scale_msa), heads))
        x = x + self.attn2(x, caption, bias)
        self.sliced_stats(stats, x, heads / self.attn1.heads, channels)
        if self.token_router is not None:
            return self.fast_token_mlp(x, stats, shift_mlp, scale_mlp, gate_mlp, self.norm2,
                                       lambda h: self.ff.forward_sliced(h, channels))
        return gated(x, gate_mlp, self.ff.forward_sliced(torch.addcmul(shift_mlp, self.norm2(x), 1 + scale_mlp), channels))


class PixArt(RoutedModel, nn.Module):
    """PixArt transformer. ``model(x, t, captions)`` has diffusers' PixArtTransformer2DModel
    forward semantics (t: diffusion steps 0..999; ``captions``: a ``Captions``)."""

    accepts_run = True
    family = "pixart"

    def __init__(self, config):
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.pos_embed = PatchEmbed(config.patch_size, config.in_channels, D)
        if config.is_dynamic:
            blocks = [RoutedPixArtBlock(D, config.num_heads, config.head_dim, D, config.mlp_hidden, config)
                      for _ in range(config.depth)]
        else:
            blocks = [PixArtBlock(D, config.num_heads, config.head_dim, D, config.mlp_hidden) for _ in range(config.depth)]
        self.transformer_blocks = nn.ModuleList(blocks)
        self.routing = Routing.FAST  # set with dit_compress.model.routing(model, mode)
        self._width_cache: dict | None = None
        self.norm_out = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.scale_shift_table = nn.Parameter(torch.randn(2, D) / D ** 0.5)
        self.proj_out = nn.Linear(D, config.patch_size ** 2 * config.out_channels)
        self.adaln_single = AdaLNSingle(D, config.additional_conditions)
        self.caption_projection = CaptionProjection(config.caption_channels, D)
        self.register_buffer("pos_table", torch.zeros(1, config.num_patches, D), persistent=False)
        if not self.pos_table.is_meta:
            self.reset_pos_table()
        self.apply_token_capacity()

    def initialize_weights(self) -> None:
        """PixArt-α's training initialisation (its ``initialize_weights``): xavier-uniform
        linears with zero biases, the patch embedding as a linear, N(0, 0.02) timestep MLP,
        adaLN-single linear and caption projection, and zero cross-attention output
        projections and final linear (so a fresh model predicts 0). Called by ``create``, not
        by the constructor: a loaded model gets its weights from the file."""

        self.apply(xavier_linear)
        w = self.pos_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.pos_embed.proj.bias)
        emb = self.adaln_single.emb.timestep_embedder
        for lin in (emb.linear_1, emb.linear_2, self.adaln_single.linear,
                    self.caption_projection.linear_1, self.caption_projection.linear_2):
            nn.init.normal_(lin.weight, std=0.02)
        for block in self.transformer_blocks:
            nn.init.zeros_(block.attn2.to_out[0].weight)
            nn.init.zeros_(block.attn2.to_out[0].bias)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def reset_pos_table(self) -> None:
        c = self.config
        grid = c.input_size // c.patch_size
        table = pixart_pos_table(c.hidden_size, grid, c.pos_base_size or grid, c.interpolation_scale or 1.0)
        self.pos_table = torch.from_numpy(table).float().unsqueeze(0).to(self.proj_out.weight.device)

    @property
    def blocks(self) -> nn.ModuleList:
        """The stack depth pruning cuts (the family's only one)."""
        return self.transformer_blocks

    def __setattr__(self, name, value):
        # ``model.blocks = ...`` replaces the stack, as on every family (nn.Module's own
        # __setattr__ would register a second stack named "blocks" and leave the real one)
        super().__setattr__("transformer_blocks" if name == "blocks" else name, value)

    def unpatchify(self, x):
        c, p = self.config.out_channels, self.config.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, captions: Captions, return_aux: bool = False, run: RunContext | None = None):
        """Inside ``cuda_graphs(model)`` a plain call replays the graph of its signature."""
        graphs = None if return_aux else active_graphs(self)
        if graphs is not None:
            return graphs(self, lambda x, t, c: self._forward(x, t, c, False, run), x, t, captions, run)
        return self._forward(x, t, captions, return_aux, run)

    def _forward(self, x, t, captions: Captions, return_aux: bool = False, run: RunContext | None = None):
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        h = self.pos_embed(x) + self.pos_table.to(x.dtype)
        t6, e = self.adaln_single(t, captions.resolution, captions.aspect_ratio)
        caption = self.caption_projection(captions.emb.to(h.dtype))
        bias = ((1 - captions.mask.to(h.dtype)) * -10000.0).unsqueeze(1)  # [B, 1, L], diffusers' convention
        aux = ForwardAux(block_input=h) if return_aux else None
        if not self.config.is_dynamic:
            hook, depth = block_hook(self, aux), len(self.transformer_blocks)
            for i, block in enumerate(self.transformer_blocks):
                def compute(h, block=block):
                    return block(h, t6, caption, bias)

                h = compute(h) if hook is None else hook(i, h, compute, run, depth)
                if aux is not None:
                    aux.features.append(h)
        else:
            h = self._routed_blocks(h, t, t6, caption, bias, aux, run)
        shift, scale = (self.scale_shift_table[None] + e[:, None]).chunk(2, dim=1)
        out = self.unpatchify(self.proj_out(self.norm_out(h) * (1 + scale) + shift))
        if aux is None:
            return out
        if aux.stats:
            full_rows = run.full_rows if run is not None else 0
            aux.flops_ratio = block_flops_ratio(self.config, aux.stats, x.shape[0] - full_rows, x.device)
        return out, aux

    def _routed_blocks(self, h, t, t6, caption, bias, aux, run):
        mode, tau = self._mode(), self._tau()
        full_rows = run.full_rows if run is not None else 0
        widths = self._cached_widths(t, run) if mode == Routing.FAST else None
        t_emb = self.adaln_single.emb.timestep(t) if widths is None and self.config.width is not None else None
        hook, depth = block_hook(self, aux), len(self.transformer_blocks)
        for i, block in enumerate(self.transformer_blocks):
            st = BlockStats() if aux is not None else None

            def compute(h, block=block, i=i, st=st):
                return block(h, t6, caption, bias, t_emb, mode, tau, st, widths=None if widths is None else widths[i],
                             full_rows=full_rows)

            h = compute(h) if hook is None else hook(i, h, compute, run, depth)
            if aux is not None:
                aux.features.append(h)
                aux.stats.append(st)
        return h

    @torch.no_grad()
    def width_router_inputs(self, t: torch.Tensor) -> list[torch.Tensor]:
        """What each block's width routers read at time input ``t``: the timestep embedding."""
        return [self.adaln_single.emb.timestep(t)] * len(self.transformer_blocks)

    def forward_with_cfg(self, x, t, captions, cfg_scale: float, guide_channels: int | None = None,
                         run: RunContext | None = None):
        """Guidance on a batch whose second half holds the null (negative) captions; the eps
        channels are guided, the learned variance comes from the conditional half."""
        return forward_with_cfg(self, x, t, captions, cfg_scale, guide_channels, run)

    def num_params(self, include_routers: bool = True) -> int:
        return sum(p.numel() for n, p in self.named_parameters() if include_routers or "router" not in n)


class CaptionProjection(nn.Module):
    """diffusers' PixArtAlphaTextProjection: linear_1 -> GELU(tanh) -> linear_2."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.act_1 = nn.GELU(approximate="tanh")
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(self.act_1(self.linear_1(x)))
