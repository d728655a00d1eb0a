"""The routed block of dynamic models (DyDiT): timestep-wise width routers over heads and
MLP channel groups, spatial token routers before the MLP, and the block's execution paths.

Routers run in one of the modes of ``routers.Routing`` (``with routing(model, mode)``):
``TRAIN`` (Gumbel-sigmoid straight-through masks, dense compute; whenever ``model.training``),
``DENSE`` (deterministic masks multiplied in: the checking reference), ``FAST`` (deterministic
masks, only active heads/channels computed on zero-copy prefix views, only routed tokens
enter the MLP) and ``FULL`` (everything on: DyDiT's stage-1 full-model loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import DiTConfig
from .compile import compiled, is_compiled
from .flops import block_share
from .layers import DiTBlock, gated, modulate
from .routers import (
    Routing,
    TokenRouter,
    WidthRouter,
    expected_prefix_mask,
    expected_topk_mask,
    gumbel_sigmoid_mask,
    prefix_from_gates,
)


@dataclass
class BlockStats:
    head_frac: torch.Tensor | None = None  # [B]
    channel_frac: torch.Tensor | None = None  # [B]
    token_frac: torch.Tensor | None = None  # [B]


class WidthRouted:
    """DyDiT's routing, for the routed block of any family: timestep-wise width (``head_router``
    and ``channel_router`` read the block's timestep embedding; the block has ``heads`` heads
    and ``channels`` MLP channels in ``heads`` groups) and spatial tokens (``token_router``
    reads each token before the MLP)."""

    def add_width_routers(self, dim: int, heads: int, config: DiTConfig) -> None:
        """The width routers (and the token router: DyDiT's spatial routing before the MLP) the
        config's specs ask for."""
        self.head_router: WidthRouter | None = None
        self.channel_router: WidthRouter | None = None
        self.static_width = False
        if config.width is not None:
            self.head_router = WidthRouter(dim, heads, config.width.init_bias)
            self.channel_router = WidthRouter(dim, heads, config.width.init_bias)
            self.static_width = config.width.static
        self.token_router: TokenRouter | None = None
        self.capacity: float | None = None  # the model sets it from config.tokens.capacity
        if config.tokens is not None:
            self.token_router = TokenRouter(dim, config.tokens.reduction, config.tokens.init_bias)

    def fast_token_mlp(self, x, stats, shift, scale, gate, norm, mlp):
        """FAST mode with a token router: the MLP (``mlp``, after ``norm`` and the modulation
        ``shift``/``scale``, gated by ``gate``; all three [B, 1, D]) on the routed tokens only.
        With a capacity, the top-k tokens of each sample by router score (a static k: no host
        sync, capturable); else the exact per-sample counts of the routers (a data-dependent
        shape read back to the host)."""
        logits = self.token_router(x)
        if self.capacity is not None:
            k = capacity_tokens(self.capacity, x.shape[1])
            if stats is not None:
                stats.token_frac = torch.full((x.shape[0],), k / x.shape[1], device=x.device)
            return mlp_on_capacity(x, logits, k, norm, shift, scale, gate, mlp)
        tm = expected_topk_mask(logits).to(x.dtype)
        if stats is not None:
            stats.token_frac = tm.mean(1)
        return mlp_on_mask(x, tm, norm, shift, scale, gate, mlp)

    def token_mask(self, x, mode: str, tau: float, full_rows: int = 0):
        """[B, N] tokens routed through the MLP (None: every token): Gumbel gates in training,
        the expected count in logit order at inference."""
        if self.token_router is None or mode == Routing.FULL:
            return None
        logits = self.token_router(x)
        if mode == Routing.TRAIN:
            return _full_tail(gumbel_sigmoid_mask(logits, tau), full_rows)
        return _full_tail(expected_topk_mask(logits).to(x.dtype), full_rows)

    def width_masks(self, t_emb, mode: str, tau: float, full_rows: int = 0):
        """Nested (prefix) masks over heads and MLP channel groups: [B, H] each, or None.
        Training: hard Gumbel gates, prefix = cumulative product; inference: the expected
        prefix length of that process (see routers.expected_prefix_mask). The last
        ``full_rows`` rows run at full width (all ones)."""
        if self.head_router is None or mode == Routing.FULL:
            return None, None
        hl, cl = self.head_router(t_emb), self.channel_router(t_emb)
        if mode == Routing.TRAIN and not self.static_width:
            hm, cm = prefix_from_gates(gumbel_sigmoid_mask(hl, tau)), prefix_from_gates(gumbel_sigmoid_mask(cl, tau))
        else:
            hm, cm = expected_prefix_mask(hl).to(t_emb.dtype), expected_prefix_mask(cl).to(t_emb.dtype)
        return _full_tail(hm, full_rows), _full_tail(cm, full_rows)

    def widths(self, t_emb) -> list[tuple[int, int]]:
        """(active heads, active MLP channels) at inference for each row of ``t_emb``."""
        hm, cm = self.width_masks(t_emb, Routing.DENSE, 0.0)
        gs = self.channels // cm.shape[1]
        return list(zip(hm.sum(1).long().tolist(), (cm.sum(1).long() * gs).tolist()))

    def sliced_stats(self, stats, x, head_share: float, channels: int) -> None:
        """The width statistics of a call run at one width (``channels`` MLP channels) for every
        row (the token share is set where the tokens are routed)."""
        if stats is not None:
            one = torch.ones(x.shape[0], device=x.device)
            stats.head_frac, stats.channel_frac = one * head_share, one * (channels / self.channels)

    def width_stats(self, stats, hm, cm, n: int) -> None:
        if stats is not None:
            stats.head_frac = hm[:n].mean(1) if hm is not None else None
            stats.channel_frac = cm[:n].mean(1) if cm is not None else None

    def split_by_width(self, hm, cm, run):
        """Run ``run(rows, heads, channels)`` on each group of rows that share one width (the
        timesteps differ inside the batch) and put the parts back in order; one call when
        every row has the same width."""
        k_heads, k_groups = hm.sum(1).long(), cm.sum(1).long()
        gs = self.channels // cm.shape[1]
        if bool((k_heads == k_heads[0]).all()) and bool((k_groups == k_groups[0]).all()):
            return run(None, int(k_heads[0]), int(k_groups[0]) * gs)
        keys = torch.stack([k_heads, k_groups], 1)
        parts = []
        for key in torch.unique(keys, dim=0):
            sel = (keys == key).all(1)
            parts.append((sel, run(sel, int(key[0]), int(key[1]) * gs)))
        out = torch.empty((len(hm), *parts[0][1].shape[1:]), dtype=parts[0][1].dtype, device=parts[0][1].device)
        for sel, part in parts:
            out[sel] = part
        return out


class RoutedBlock(WidthRouted, DiTBlock):
    """A DiT block with width routers (``head_router``, ``channel_router``) and/or a token
    router (``token_router``), as the config's width / tokens specs say."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, num_classes: int | None, config: DiTConfig):
        super().__init__(dim, heads, mlp_ratio, num_classes)
        self.add_width_routers(dim, heads, config)

    @property
    def channels(self) -> int:
        return self.mlp.fc1.out_features

    def forward(self, x, c, t_emb=None, mode: Routing = Routing.DENSE, tau: float = 5.0, stats: BlockStats | None = None,
                widths: tuple[int, int] | None = None, full_rows: int = 0):
        """``widths`` (FAST mode only): the (heads, MLP channels) this call runs, resolved
        beforehand (``DiT``'s per-run width cache); the width routers are then not run.
        ``full_rows``: the last rows run at full width (masked-dense modes); ``stats`` cover
        the other rows."""
        if is_compiled(self):  # widths arrive as plain ints: symbolic sizes, one graph for every width
            return compiled(RoutedBlock._forward, dynamic=True)(self, x, c, t_emb, mode, tau, stats, widths, full_rows)
        return self._forward(x, c, t_emb, mode, tau, stats, widths, full_rows)

    def _forward(self, x, c, t_emb=None, mode: Routing = Routing.DENSE, tau: float = 5.0,
                 stats: BlockStats | None = None, widths: tuple[int, int] | None = None, full_rows: int = 0):
        if widths is not None:
            return self.forward_sliced(x, c, widths[0], widths[1], stats)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        if full_rows and mode == Routing.FAST:
            raise ValueError("full_rows needs a masked-dense routing mode (TRAIN or DENSE)")
        hm, cm = self.width_masks(t_emb, mode, tau, full_rows)
        if mode == Routing.FAST and hm is not None:
            return self._forward_fast_width(x, hm, cm, (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp), stats)
        x = gated(x, gate_msa, self.attn(modulate(self.norm1(x), shift_msa, scale_msa), hm))
        if mode == Routing.FAST and self.token_router is not None:
            self.width_stats(stats, hm, cm, x.shape[0])
            return self.fast_token_mlp(x, stats, shift_mlp.unsqueeze(1), scale_mlp.unsqueeze(1), gate_mlp.unsqueeze(1),
                                       self.norm2, self.mlp)
        tm = self.token_mask(x, mode, tau, full_rows)
        if stats is not None:
            n = x.shape[0] - full_rows
            stats.head_frac = hm[:n].mean(1) if hm is not None else None
            stats.channel_frac = cm[:n].mean(1) if cm is not None else None
            stats.token_frac = tm[:n].mean(1) if tm is not None else None
        h = self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp), cm)
        if tm is not None:
            h = h * tm.unsqueeze(-1)
        return gated(x, gate_mlp, h)

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
        gs = self.channels // cm.shape[1]
        return self._sliced(x, int(k_heads[0]), int(k_groups[0]) * gs, mods, stats)

    def forward_sliced(self, x, c, heads: int, channels: int, stats: BlockStats | None = None):
        """The block at a given width (first ``heads`` heads, first ``channels`` MLP channels),
        token routers as in FAST mode. Plain ints in, so one compiled graph (``dynamic=True``)
        serves every width."""
        return self._sliced(x, heads, channels, self.adaLN_modulation(c).chunk(6, dim=1), stats)

    def _sliced(self, x, k: int, ch: int, mods, stats):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        x = gated(x, gate_msa, self.attn.forward_sliced(modulate(self.norm1(x), shift_msa, scale_msa), k))
        self.sliced_stats(stats, x, k / self.attn.heads, ch)
        if self.token_router is not None:
            return self.fast_token_mlp(x, stats, shift_mlp.unsqueeze(1), scale_mlp.unsqueeze(1), gate_mlp.unsqueeze(1),
                                       self.norm2, lambda h: self.mlp.forward_sliced(h, ch))
        return gated(x, gate_mlp, self.mlp.forward_sliced(modulate(self.norm2(x), shift_mlp, scale_mlp), ch))


def capacity_tokens(capacity: float, n: int) -> int:
    """Tokens a block's MLP takes per sample at a capacity share of ``n`` tokens (at least one)."""
    return max(1, min(n, math.floor(capacity * n + 0.5)))


def mlp_on_capacity(x, logits, k: int, norm, shift, scale, gate, mlp):
    """The gated MLP on the ``k`` tokens of highest router logit in each sample, added back to
    their residual (gather, MLP, scatter-add): static shapes, no host sync. ``shift``/``scale``/
    ``gate`` are [B, 1, D]."""
    B, N, D = x.shape
    ix = logits.topk(k, dim=1, sorted=False).indices.unsqueeze(-1).expand(B, k, D)
    h = gate * mlp(torch.addcmul(shift, norm(torch.gather(x, 1, ix)), 1 + scale))
    if torch.is_inference_mode_enabled():  # x is this block's own intermediate: added in place
        return x.scatter_add_(1, ix, h)
    return x.scatter_add(1, ix, h)


def mlp_on_mask(x, tm, norm, shift, scale, gate, mlp):
    """The gated MLP on the tokens of the 0/1 mask ``tm`` [B, N] only (flattened over the batch:
    per-sample counts, so the shape is read back to the host), added back to their residual."""
    b_idx, n_idx = tm.nonzero(as_tuple=True)
    sel = torch.addcmul(shift[b_idx, 0], norm(x[b_idx, n_idx]), 1 + scale[b_idx, 0])
    out = x.clone()
    out[b_idx, n_idx] += gate[b_idx, 0] * mlp(sel)
    return out


def _full_tail(mask, full_rows: int):
    """``mask`` with its last ``full_rows`` rows all ones (those rows run at full width)."""
    if mask is None or not full_rows:
        return mask
    return torch.cat([mask[:-full_rows], torch.ones_like(mask[-full_rows:])], 0)


def block_flops_ratio(config: DiTConfig, stats: list, batch: int, device) -> torch.Tensor:
    """Per-sample dynamic/static FLOPs of the blocks (DyDiT's F_dyn / F_static)."""
    one = torch.ones(batch, device=device)
    dyn = 0.0
    for st in stats:
        h = st.head_frac if st.head_frac is not None else one
        ch = st.channel_frac if st.channel_frac is not None else one
        tk = st.token_frac if st.token_frac is not None else one
        dyn = dyn + block_share(config, h, ch, tk)
    return dyn / len(stats)


class RoutedModel:
    """The model side of routing, for every family: the routing mode, the per-run width cache
    and the widths per time input. A model provides ``blocks``, ``routing``,
    ``_width_cache`` and ``width_router_inputs(t)`` (what each block's width routers read)."""

    def _cached_widths(self, t, run=None) -> list[tuple[int, int]] | None:
        """Inside ``width_cache(model)``: each block's (heads, channels) for this call's t,
        computed by the routers on the first call with that t and reused afterwards (width
        routers read t only). The t comes from ``run`` when the caller states it (no host
        sync); otherwise it is read from the tensor. None when no cache is active or t
        differs inside the batch."""
        if self._width_cache is None:
            return None
        if run is not None and run.t is not None:
            key = run.t
        elif bool((t == t[0]).all()):
            key = t[0].item()
        else:
            return None
        if key not in self._width_cache:
            self._width_cache[key] = self.widths_at(t[:1])[0]
        return self._width_cache[key]

    @torch.no_grad()
    def widths_at(self, t: torch.Tensor) -> list[list[tuple[int, int]]]:
        """[(heads, MLP channels) per block] at inference for each time input in ``t`` (one
        batched pass of the width routers; they read the timestep only)."""
        t = t.to(next(self.parameters()).device)
        per_block = [b.widths(inp) for b, inp in zip(self.blocks, self.width_router_inputs(t))]
        return [[pb[j] for pb in per_block] for j in range(len(t))]

    def graph_profile(self, t, run=None):
        """What a CUDA graph of this call depends on beyond its input shapes: the per-block
        widths (None for a model without width routers); False when the call's widths are not
        resolved on the host (no width cache, or t differs inside the batch): not capturable."""
        if self.config.width is None or self._mode() != Routing.FAST:
            return None
        widths = self._cached_widths(t, run)
        return False if widths is None else tuple(widths)

    def apply_token_capacity(self) -> None:
        """Give each block its inference capacity from ``config.tokens.capacity`` (None: exact)."""
        caps = self.config.tokens.capacity if self.config.tokens is not None else None
        for i, b in enumerate(self.blocks):
            if hasattr(b, "capacity"):
                b.capacity = caps[i] if caps is not None else None

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
