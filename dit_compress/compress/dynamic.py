"""DyDiT transforms: timestep-wise dynamic width (TDW) and spatial dynamic tokens (SDT).

``add_dynamic_width`` first sorts heads and MLP channels by importance (a permutation of
the weights that leaves the function unchanged), so that the nested masks the routers
produce keep the most important heads/channels, and inference can run on zero-copy
prefix slices of the weights.
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from .. import checks
from ..config import TokenSpec, WidthSpec
from ..data.batches import draw_examples
from ..diffusion import objective_for
from ..errors import DitcError, UsageError
from ..model.build import build_model
from ..model.family import family_of, require
from ..model.routers import Routing, TokenRouter, WidthRouter, routing
from ..model.flops import block_share

SORTS = ("magnitude", "taylor", "none")


def _head_perm_rows(order: torch.Tensor, hd: int) -> torch.Tensor:
    return (order[:, None] * hd + torch.arange(hd)[None]).reshape(-1)


def _linear(block, path: str):
    return block.get_submodule(path)


@torch.no_grad()
def importance(model, kind: str, data=None, batches: int = 4, batch_size: int = 32, seed: int = 0):
    """Per-block (head scores [H], channel scores [MLP hidden]) — larger is more important.

    ``magnitude``: norms of each head's value/output weights and each channel's in/out weights.
    ``taylor``: first-order Taylor importance |sum over a group's weights of w * dL/dw|, taken
    per batch and summed over ``batches`` batches (DynaBERT's accumulation, which DyDiT follows:
    the absolute value of each batch's estimate, so batches whose signs differ do not cancel).
    Where the heads and channels sit comes from the family's ``width_layout``."""
    cfg = model.config
    H, hd = cfg.num_heads, cfg.head_dim
    lay = family_of(model).width_layout(cfg)
    if kind == "taylor":
        if data is None:
            raise UsageError("`sort_by` taylor needs `data` to measure first-order importance")
        return _taylor_scores(model, data, batches, batch_size, seed)
    out = []
    for b in model.blocks:
        (vpath, voff) = lay.value
        vw = _linear(b, vpath).weight
        v = vw[voff:voff + H * hd].reshape(H, hd, -1).norm(dim=(1, 2))
        ow = _linear(b, lay.head_cols).weight
        o = ow.reshape(ow.shape[0], H, hd).permute(1, 0, 2).norm(dim=(1, 2))
        fc1, fc2 = _linear(b, lay.chan_rows).weight, _linear(b, lay.chan_cols).weight
        out.append((v * o, fc1.norm(dim=1) * fc2.norm(dim=0)))
    return out


def taylor_terms(block, H: int, layout, hd: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch's first-order estimates |sum w * g| per head and per MLP channel of a block
    whose weights hold the batch's gradients."""
    def wg(path):
        lin = _linear(block, path)
        g = lin.weight.grad
        return lin.weight * g if g is not None else torch.zeros_like(lin.weight)

    heads = sum(wg(path)[off:off + H * hd].reshape(H, hd, -1).sum(dim=(1, 2)) for path, off in layout.head_rows).abs()
    ow = wg(layout.head_cols)
    heads = heads + ow.reshape(ow.shape[0], H, hd).sum(dim=(0, 2)).abs()
    chans = wg(layout.chan_rows).sum(1).abs() + wg(layout.chan_cols).sum(0).abs()
    return heads, chans


def _taylor_scores(model, data, batches, batch_size, seed):
    m = copy.deepcopy(model).train()
    diff = objective_for(m.config)
    lay = family_of(m).width_layout(m.config)
    g = torch.Generator().manual_seed(seed)
    dev = next(m.parameters()).device
    total = None
    for _ in range(batches):
        x, y = draw_examples(data, batch_size, g)
        t = torch.randint(0, 1000, (batch_size,), generator=g)
        noise = torch.randn(x.shape, generator=g)  # every draw from the seeded generator: a reproducible order
        m.zero_grad(set_to_none=True)
        with torch.enable_grad():
            diff.training_losses(m, x.to(dev), diff.continuous_t(t).to(dev), y.to(dev),
                                 noise=noise.to(dev))["loss"].mean().backward()
        terms = [taylor_terms(b, m.config.num_heads, lay, m.config.head_dim) for b in m.blocks]
        total = terms if total is None else [(a + c, b + d) for (a, b), (c, d) in zip(total, terms)]
    return total


@torch.no_grad()
def sorted_state(model, scores) -> dict:
    """State dict with heads and MLP channels of every block in descending importance."""
    cfg = model.config
    H, hd = cfg.num_heads, cfg.head_dim
    lay = family_of(model).width_layout(cfg)
    stack = family_of(model).stack_key
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for i, (hs, cs) in enumerate(scores):
        p = f"{stack}.{i}."
        rows = _head_perm_rows(torch.argsort(hs, descending=True, stable=True), hd)
        for path in dict.fromkeys(path for path, _ in lay.head_rows):
            w = state[f"{p}{path}.weight"]
            perm = torch.arange(w.shape[0])
            for path2, off2 in lay.head_rows:  # a fused projection holds several row blocks
                if path2 == path:
                    perm[off2:off2 + H * hd] = rows + off2
            state[f"{p}{path}.weight"] = w[perm]
            state[f"{p}{path}.bias"] = state[f"{p}{path}.bias"][perm]
        state[f"{p}{lay.head_cols}.weight"] = state[f"{p}{lay.head_cols}.weight"][:, rows]
        ch = torch.argsort(cs, descending=True, stable=True)
        state[f"{p}{lay.chan_rows}.weight"] = state[f"{p}{lay.chan_rows}.weight"][ch]
        state[f"{p}{lay.chan_rows}.bias"] = state[f"{p}{lay.chan_rows}.bias"][ch]
        state[f"{p}{lay.chan_cols}.weight"] = state[f"{p}{lay.chan_cols}.weight"][:, ch]
    return state


def add_dynamic_width(model, target_flops: float = 0.5, sort_by: str = "magnitude", data=None,
                      tau: float = 5.0, init_bias: float = 15.0, static: bool = False, seed: int = 0):
    """A copy of ``model`` with sorted heads/channels and all-on timestep routers.

    ``static=True`` is plain width pruning for comparison: the same share of heads and
    channels (the least important, after sorting) is dropped at every timestep, sized so
    the blocks reach ``target_flops``; the routers are frozen at that choice."""

    require(model, "width")
    cfg = model.config
    if not (0.0 < target_flops <= 1.0):
        raise UsageError(f"`target_flops` must be in (0, 1], got {target_flops}")
    if sort_by not in SORTS:
        raise UsageError(f"`sort_by` must be one of {', '.join(SORTS)}")
    if cfg.width is not None:
        raise DitcError("this model already has dynamic-width routers (add-dynamic-width was applied before)")
    if cfg.mlp_hidden % cfg.num_heads:
        raise UsageError(f"MLP hidden size {cfg.mlp_hidden} cannot be split into {cfg.num_heads} channel groups (one per head)")
    share = routed_share(cfg, target_flops) if static else None  # checked before the sorting pass
    fixed = fixed_share(cfg)
    if not static and target_flops <= fixed + 1e-9:
        raise UsageError(f"`target_flops` {target_flops} is not above the {fixed:.3f} of each block no "
                         "width router scales (the cross-attention to the caption): width routing cannot reach it")
    if sort_by == "none":
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    else:
        state = sorted_state(model, importance(model, sort_by, data))
    spec = WidthSpec(target_flops=target_flops, sort_by=sort_by, tau=tau, init_bias=init_bias, static=static)
    new_cfg = cfg.copy(width=spec).with_step("add-dynamic-width", target_flops=target_flops, sort_by=sort_by, static=static)
    torch.manual_seed(seed)
    dev = next(model.parameters()).device  # new routers join the weights where they are
    for i in range(cfg.depth):
        for name in ("head_router", "channel_router"):
            r = WidthRouter(cfg.hidden_size, cfg.num_heads, init_bias)
            for k, v in r.state_dict().items():
                state[f"{family_of(model).stack_key}.{i}.{name}.{k}"] = v.to(dev)
    new = build_model(new_cfg, state, dtype=next(model.parameters()).dtype)
    if static:
        set_static_width(new, share, share)
    return new


def fixed_share(cfg) -> float:
    """The fraction of a block's FLOPs no width router scales (0 on DiT): the block at no heads,
    channels or tokens."""
    return block_share(cfg, 0.0, 0.0, 0.0)


def routed_share(cfg, target_flops: float) -> float:
    """The share of heads and MLP channels whose block FLOPs are ``target_flops`` of the full
    block: the part no router scales (PixArt's cross-attention; none on DiT) counts whole, so
    share = (target - fixed) / (1 - fixed), fixed the block's unscaled fraction."""
    fixed = fixed_share(cfg)
    least = fixed + (1 - fixed) / cfg.num_heads  # one head and one channel group per block
    if target_flops < least - 1e-9:
        raise UsageError(f"`target_flops` {target_flops} is below what static width can reach on this model "
                         f"({least:.3f}: one head and one channel group per block, and the {fixed:.0%} of each "
                         "block no router scales)")
    return (target_flops - fixed) / (1 - fixed)


def add_token_router(model, tau: float = 5.0, init_bias: float = 35.0, reduction: int = 16, seed: int = 0,
                     target_flops: float | None = None):
    """A copy of ``model`` with an all-on token router before every block's MLP. ``target_flops``:
    the block FLOPs ratio the routers (with any width routers) train toward; without it a
    model with width routers keeps theirs, and token routers alone have no FLOPs target."""

    require(model, "tokens")
    cfg = model.config
    if cfg.tokens is not None:
        raise DitcError("this model already has token routers (add-token-router was applied before)")
    if reduction < 1 or cfg.hidden_size // reduction < 1:
        raise UsageError(f"`reduction` {reduction} leaves no router hidden units for hidden size {cfg.hidden_size}")
    spec = TokenSpec(tau=tau, init_bias=init_bias, reduction=reduction, target_flops=target_flops)
    new_cfg = cfg.copy(tokens=spec).with_step("add-token-router", reduction=reduction, target_flops=target_flops)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.manual_seed(seed)
    dev = next(model.parameters()).device
    for i in range(cfg.depth):
        r = TokenRouter(cfg.hidden_size, reduction, init_bias)
        for k, v in r.state_dict().items():
            state[f"{family_of(model).stack_key}.{i}.token_router.{k}"] = v.to(dev)
    return build_model(new_cfg, state, dtype=next(model.parameters()).dtype)


def spread_widths(groups: int, share: float, layers: int) -> list[int]:
    """Per-layer active group counts whose mean is the closest to ``share * groups`` that
    whole groups allow (``round(share * groups * layers)`` groups over the model, the extra
    ones evenly spread), each layer keeping at least one group."""
    total = max(layers, min(groups * layers, round(share * groups * layers)))
    base, extra = divmod(total, layers)
    up = {int(i * layers / extra) for i in range(extra)} if extra else set()
    return [base + (1 if i in up else 0) for i in range(layers)]


@torch.no_grad()
def set_static_width(model, head_share: float, channel_share: float):
    """Point every width router at a fixed share: constant (saturated) masks for all t, the
    shares spread over the layers so the model's mean width is as close to them as whole
    heads/groups allow (static width pruning, and the benchmarks' fixed routers)."""
    H, L = model.config.num_heads, model.config.depth
    for b, kh, kc in zip(model.blocks, spread_widths(H, head_share, L), spread_widths(H, channel_share, L)):
        for r, k in ((b.head_router, kh), (b.channel_router, kc)):
            r.linear.weight.zero_()
            r.linear.bias.copy_(torch.tensor([30.0] * k + [-30.0] * (H - k)))  # saturated: exact prefix k
    return model


def band_shares(share: float, n: int, bands: int = 3) -> list[float]:
    """Width share of each of ``n`` loop calls, noisiest first: three bands (narrow, ``share``,
    wide) at ``share`` -/+ half the room to 0 or 1, the outer two of equal length, so the loop
    averages ``share`` exactly."""
    d = min(share, 1.0 - share) / 2
    outer = round(n / bands)
    return [share - d] * outer + [share] * (n - 2 * outer) + [share + d] * outer


@torch.no_grad()
def set_banded_width(model, share: float, times: list) -> list[float]:
    """Width routers fixed per timestep band: over the network time inputs ``times`` of one
    sampling loop, the noisiest third runs narrow, the cleanest third wide, the loop
    averaging ``share`` (each band's share spread over the layers as whole heads / groups
    allow). The routers are fitted (least squares on each block's timestep embedding) so
    that their own logits, saturated at +-30, give these widths at ``times``; the fit is
    checked. Returns the share per entry of ``times``. (Benchmarks: a dynamic model whose
    width really changes with t.)"""
    cfg = model.config
    H, L = cfg.num_heads, cfg.depth
    noisy_first = sorted(range(len(times)), key=lambda i: -times[i] if cfg.prediction == "eps" or cfg.time_input == "repa" else times[i])
    shares = [0.0] * len(times)
    for i, sh in zip(noisy_first, band_shares(share, len(times))):
        shares[i] = sh
    per_layer = {sh: spread_widths(H, sh, L) for sh in set(shares)}
    dev = next(model.parameters()).device
    t = torch.tensor(times, device=dev)
    for layer, (b, te) in enumerate(zip(model.blocks, model.width_router_inputs(t))):
        ks = torch.tensor([per_layer[sh][layer] for sh in shares], device=dev)
        target = torch.where(torch.arange(H, device=dev)[None] < ks[:, None], 30.0, -30.0).double()
        feats = torch.cat([te.double(), torch.ones(len(times), 1, dtype=torch.float64, device=dev)], 1)
        sol = torch.linalg.pinv(feats) @ target  # [D + 1, H]: the minimum-norm exact fit
        for r in (b.head_router, b.channel_router):
            r.linear.weight.copy_(sol[:-1].T.float())
            r.linear.bias.copy_(sol[-1].float())
        got = [k for k, _ in b.widths(te)]
        if got != ks.tolist():
            raise DitcError(f"banded width routers could not be fitted at layer {layer} (got {got}, want {ks.tolist()})")
    return shares


@torch.no_grad()
def set_token_keep(model, share: float, batch: int = 2, seed: int = 0, passes: int = 2):
    """Token routers that keep about ``share`` of the tokens (for benchmarks): a random
    projection whose bias is set, per block, to a quantile of its logits on real hidden
    states (noise inputs at a mid timestep), refined over ``passes`` forward passes."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    D = cfg.hidden_size
    dev = next(model.parameters()).device
    for b in model.blocks:
        net = b.token_router.net
        net[0].weight.copy_(torch.randn(net[0].weight.shape, generator=g) / D ** 0.5)
        net[0].bias.zero_()
        # large logits: sigmoid saturates, so the expected keep count equals the count of positive logits
        net[2].weight.copy_(torch.randn(net[2].weight.shape, generator=g) * 1e3)
        net[2].bias.zero_()
    dtype = next(model.parameters()).dtype
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g).to(dev, dtype)
    t = torch.full((batch,), 500, device=dev)
    y = family_of(cfg).example_condition(cfg, batch, g)[0].to(dev)
    logits = {}
    hooks = [b.token_router.register_forward_hook(lambda m, i, o, k=k: logits.__setitem__(k, o.detach().flatten()))
             for k, b in enumerate(model.blocks)]
    try:
        with routing(model, Routing.DENSE):
            for _ in range(passes):
                model(x, t, y)
                for k, b in enumerate(model.blocks):
                    b.token_router.net[2].bias.sub_(torch.quantile(logits[k].float(), 1 - share))
    finally:
        for h in hooks:
            h.remove()
    return model


def set_token_capacity(model, capacity):
    """Set the inference capacity of a token-routed model in place (and in its config, so a
    saved model keeps it): each block's MLP then takes the top-k tokens of each sample by
    router score, k = round(share * tokens), a static shape with no host sync (capturable in a
    CUDA graph). ``capacity``: one share in (0, 1] for every block, a list of one per block, or
    None for the exact per-sample counts (a data-dependent shape, read back to the host)."""
    cfg = model.config
    if cfg.tokens is None:
        raise UsageError("a token capacity is for models with token routers (add-token-router)")
    if capacity is not None:
        caps = list(capacity) if isinstance(capacity, (list, tuple)) else [capacity] * cfg.depth
        if len(caps) != cfg.depth:
            raise UsageError(f"token `capacity` lists {len(caps)} shares for {cfg.depth} blocks")
        capacity = [checks.real("capacity", c, lo=0.0, hi=1.0, lo_open=True) for c in caps]
    model.config = cfg.copy(tokens=dataclasses.replace(cfg.tokens, capacity=capacity))
    model.apply_token_capacity()
    return model
