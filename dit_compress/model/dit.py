"""The DiT network in the original key layout (``blocks.i.attn.qkv`` ...), with the
original numerics. Compression is data in the config: a depth-pruned model simply has
fewer blocks (``config.kept_layers`` says which); dynamic models (DyDiT) have routed blocks
(model/dynamic.py) whose routers run in the mode ``model.routing`` says."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from ..config import DiTConfig
from .dynamic import BlockStats, RoutedBlock, RoutedModel, block_flops_ratio
from .layers import (
    DiTBlock,
    FinalLayer,
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    sincos_2d,
    timestep_sinusoid,
    xavier_linear,
)
from .compile import compiled, is_compiled
from .graphs import active_graphs
from .routers import Routing
from .run import ForwardAux, RunContext, block_hook, forward_with_cfg


class DiT(RoutedModel, nn.Module):
    """Diffusion Transformer. ``model(x, t, y)`` has the original DiT forward semantics;
    ``run=RunContext(...)`` (model/run.py) passes what the caller knows about the call."""

    accepts_run = True

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(config.num_classes, D)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches, D), requires_grad=False)
        own = config.num_classes if config.block_embedders else None
        if config.is_dynamic:
            blocks = [RoutedBlock(D, config.num_heads, config.mlp_ratio, own, config) for _ in range(config.depth)]
        else:
            blocks = [DiTBlock(D, config.num_heads, config.mlp_ratio, own) for _ in range(config.depth)]
        self.blocks = nn.ModuleList(blocks)
        self.final_layer = FinalLayer(D, config.patch_size, config.out_channels)
        self.routing = Routing.FAST  # set with dit_compress.model.routing(model, mode)
        self._width_cache: dict | None = None  # set with width_cache(model): widths per t, one sampling run
        self.initialize_weights()
        self._apply_numerics(config.numerics)
        self.apply_token_capacity()

    # ------------------------------------------------------------------ construction
    def initialize_weights(self):
        """The reference initialisation: xavier linears, adaLN-Zero, fixed sin-cos positions."""

        self.apply(xavier_linear)
        if not self.pos_embed.is_meta:  # a model built on the meta device gets its table with its weights
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
            for r in (getattr(b, n, None) for n in ("head_router", "channel_router", "token_router")):
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

    def forward(self, x, t, y, return_aux: bool = False, run: RunContext | None = None):
        """The DiT forward; ``return_aux`` also returns each block's output (and, for
        dynamic models, the per-sample FLOPs ratio the routers chose, over the routed rows).
        Inside ``cuda_graphs(model)`` a plain call replays the graph of its signature."""
        graphs = None if return_aux else active_graphs(self)
        if graphs is not None:
            return graphs(self, lambda x, t, y: self._dispatch(x, t, y, False, run), x, t, y, run)
        return self._dispatch(x, t, y, return_aux, run)

    def _dispatch(self, x, t, y, return_aux: bool, run: RunContext | None):
        if not self.config.is_dynamic and is_compiled(self) and block_hook(self) is None:  # reads nothing of ``run``
            return compiled(DiT._forward)(self, x, t, y, return_aux)
        return self._forward(x, t, y, return_aux, run)

    def _forward(self, x, t, y, return_aux: bool = False, run: RunContext | None = None):
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        h, t_emb, c = self.embed(x, t, y)
        conds = self.block_conditions(t, y, t_emb, c)
        mode = self._mode()
        tau = self._tau()
        aux = ForwardAux(block_input=h) if return_aux else None
        want_stats = return_aux and self.config.is_dynamic
        full_rows = run.full_rows if run is not None else 0
        widths = self._cached_widths(t, run) if mode == Routing.FAST else None
        hook = block_hook(self, aux)
        for i, block in enumerate(self.blocks):
            st = BlockStats() if want_stats else None
            if widths is not None:
                kw = {"widths": widths[i]}
            elif full_rows:
                kw = {"full_rows": full_rows}
            else:
                kw = {}

            def compute(h, block=block, i=i, st=st, kw=kw):
                return block(h, conds[i][1], conds[i][0], mode, tau, st, **kw)

            h = compute(h) if hook is None else hook(i, h, compute, run, len(self.blocks))
            if aux is not None:
                aux.features.append(h)
                if st is not None:
                    aux.stats.append(st)
        out = self.unpatchify(self.final_layer(h, c))
        if aux is None:
            return out
        if want_stats:
            aux.flops_ratio = block_flops_ratio(self.config, aux.stats, x.shape[0] - full_rows, x.device)
        return out, aux

    @torch.no_grad()
    def width_router_inputs(self, t: torch.Tensor) -> list[torch.Tensor]:
        """What each block's width routers read at time input ``t``: its timestep embedding."""
        y = torch.zeros(len(t), dtype=torch.long, device=t.device)
        t_emb = self.t_embedder(t)
        return [te for te, _ in self.block_conditions(t, y, t_emb, t_emb)]

    def forward_with_cfg(self, x, t, y, cfg_scale: float, guide_channels: int | None = None,
                         run: RunContext | None = None):
        """Classifier-free guidance on a batch whose second half holds the null labels.

        ``guide_channels=3`` is the reference DiT code (guides the first three output
        channels "for exact reproducibility"); ``None`` guides all latent channels as
        diffusers' DiTPipeline does. The learned-variance channels are never guided.
        """
        return forward_with_cfg(self, x, t, y, cfg_scale, guide_channels, run)

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


@contextlib.contextmanager
def only_blocks(model, keep: list[int] | None):
    """``model`` running only the blocks ``keep`` (the others skipped), restored afterwards."""
    if keep is None:
        yield model
        return
    full = model.blocks
    model.blocks = nn.ModuleList([full[i] for i in keep])
    try:
        yield model
    finally:
        model.blocks = full


@contextlib.contextmanager
def width_cache(model, times: list | None = None):
    """``with width_cache(model, times): <sampling run>``: a dynamic model's per-block widths
    are resolved once for the run (FAST mode): for the time inputs ``times`` (host numbers:
    ints for DiT, floats for SiT, the values a sampler passes as ``RunContext.t``) up front,
    in one router pass, and for any other t on its first call; the routers no longer run per
    call. A no-op for models without width routers or not in FAST mode; nested uses share the
    outer cache."""
    inner = getattr(model, "module", model)
    if getattr(inner.config, "width", None) is None or inner._width_cache is not None or inner.routing != Routing.FAST:
        yield model
        return
    times = list(times.tolist() if torch.is_tensor(times) else times or [])
    if times:
        as_tensor = torch.tensor(times, dtype=torch.long if all(isinstance(t, int) for t in times) else torch.float32)
        inner._width_cache = dict(zip(times, inner.widths_at(as_tensor)))
    else:
        inner._width_cache = {}
    try:
        yield model
    finally:
        inner._width_cache = None
