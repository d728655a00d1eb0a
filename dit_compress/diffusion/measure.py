"""What a dynamic model computes at inference, measured on the run itself: the width
profile per timestep, a FLOPs meter on the routers' outputs, and the FLOPs averaged over a
sampler's timesteps (with token routers: over a really sampled probe batch)."""

from __future__ import annotations

import math

import torch

from ..model.family import family_of
from ..model.flops import block_share, dynamic_macs, static_macs
from ..model.dynamic import capacity_tokens
from ..model.routers import Routing, expected_prefix_mask, expected_topk_mask
from .sampling import (
    eval_sampler,
    resolve_spacing,
    sample,
    sampler_timesteps,
)


@torch.no_grad()
def width_profile(model, timesteps: list[int]) -> dict:
    """Active share of heads / MLP channels per layer for each timestep (masks depend on t only)."""
    cfg = model.config
    n = len(timesteps)
    if cfg.width is None:
        return {"timesteps": timesteps, "heads": [[1.0] * n] * cfg.depth, "channels": [[1.0] * n] * cfg.depth,
                "depth": cfg.depth}
    widths = model.widths_at(torch.tensor(timesteps))  # network time inputs (ints for DiT, floats for SiT)
    heads = [[widths[j][i][0] / cfg.num_heads for j in range(n)] for i in range(cfg.depth)]
    chans = [[widths[j][i][1] / b.channels for j in range(n)] for i, b in enumerate(model.blocks)]
    return {"timesteps": timesteps, "heads": heads, "channels": chans, "depth": cfg.depth}


class FlopsMeter:
    """Records what a dynamic model actually computes, call by call: ``with FlopsMeter(model)
    as m: <sample / forward>``, then ``m.result()``. Router outputs are read through hooks and
    turned into masks with the same inference rules the blocks use, so the figure is the one
    of the run itself (the sampler's real x_t, CFG batch included), not an estimate."""

    def __init__(self, model):
        self.model, self.calls, self._hooks = model, [], []

    def __enter__(self):
        m = self.model
        self._hooks.append(m.register_forward_pre_hook(
            lambda mod, args, kwargs: self.calls.append(self._new_call(args, kwargs)), with_kwargs=True))
        self._hooks.append(m.register_forward_hook(lambda mod, args, out: self._from_width_cache()))
        for i, b in enumerate(m.blocks):
            for name in ("head_router", "channel_router", "token_router"):
                r = getattr(b, name, None)
                if r is not None:
                    self._hooks.append(r.register_forward_hook(lambda mod, a, out, i=i, n=name: self._record(i, n, out)))
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _new_call(self, args, kwargs):
        """The call's time input: from its run context when the caller states it (no host
        sync), else read from the tensor."""
        run = kwargs.get("run")
        if run is not None and run.t is not None:
            return {"t": run.t, "layers": {}}
        t = args[1] if len(args) > 1 else kwargs.get("t")
        return {"t": t.flatten()[0].item() if torch.is_tensor(t) and t.numel() else None, "layers": {}}

    def _from_width_cache(self):
        """Widths of a call that ran from the model's per-run width cache (routers not run), and
        the blocks a feature cache let run (the others cost nothing)."""
        cache = getattr(self.model, "_width_cache", None)
        call = self.calls[-1] if self.calls else None
        hook = self.model.__dict__.get("_block_hook")
        if hook is not None and call is not None:
            call["ran"] = set(hook.ran_last)
        if not cache or call is None or call["t"] not in cache or self.model.routing == Routing.FULL:
            return
        H = self.model.config.num_heads
        for i, (heads, channels) in enumerate(cache[call["t"]]):
            layer = call["layers"].setdefault(i, {})
            layer.setdefault("head_router", [heads, H])
            layer.setdefault("channel_router", [channels, self.model.blocks[i].channels])

    def _record(self, i, name, logits):
        if not self.calls or self.model.routing == Routing.FULL:
            return
        with torch.no_grad():  # kept counts stay on the device until result() reads them
            mask = expected_topk_mask(logits.detach()) if name == "token_router" else expected_prefix_mask(logits.detach())
            kept, total = mask.sum(), float(mask.numel())
        layer = self.calls[-1]["layers"].setdefault(i, {})
        cap = getattr(self.model.blocks[i], "capacity", None) if name == "token_router" else None
        if cap is not None and self.model._mode() == Routing.FAST:  # the capacity ran, not the routers' own count
            wanted = kept
            B, N = logits.shape
            kept = float(capacity_tokens(cap, N) * B)
            over = layer.setdefault("capacity", [0.0, 0.0, 0.0])  # tokens wanted, dropped, taken beyond
            per = mask.sum(1)
            over[0] = over[0] + wanted
            over[1] = over[1] + (per - kept / B).clamp(min=0).sum()
            over[2] = over[2] + (kept / B - per).clamp(min=0).sum()
        acc = layer.setdefault(name, [0.0, 0.0])
        acc[0] = acc[0] + kept
        acc[1] += total

    def _shares(self, call, name):
        out = []
        for i in range(self.model.config.depth):
            kt = call["layers"].get(i, {}).get(name)
            out.append(float(kt[0]) / kt[1] if kt and kt[1] else 1.0)
        return out

    def result(self) -> dict:
        """Mean over the recorded calls: whole-model MACs and ratio, and DyDiT's block ratio
        (attention + MLP FLOPs dynamic / static, the quantity the FLOPs loss trains toward)."""
        cfg = self.model.config
        total, blocks, per_t, toks = [], [], {}, []
        for c in self.calls:
            h, ch, tk = (self._shares(c, n) for n in ("head_router", "channel_router", "token_router"))
            skipped = [i not in c["ran"] for i in range(cfg.depth)] if "ran" in c else [False] * cfg.depth
            toks.append(sum(tk) / len(tk))
            total.append(dynamic_macs(cfg, h, ch, tk, skipped))
            blocks.append(sum(0.0 if s else block_share(cfg, a, b, k)
                              for a, b, k, s in zip(h, ch, tk, skipped)) / cfg.depth)
            per_t.setdefault(c["t"], []).append(blocks[-1])
        if not total:
            return {"calls": 0}
        static = static_macs(cfg)["total"]
        mean = sum(total) / len(total)
        out = {"calls": len(total), "macs": mean, "gflops": mean / 1e9, "flops_ratio": mean / static,
               "block_flops_ratio": sum(blocks) / len(blocks), "token_keep_ratio": sum(toks) / len(toks),
               "block_ratio_per_t": {t: sum(v) / len(v) for t, v in sorted(per_t.items(), key=lambda kv: -1 if kv[0] is None else kv[0])}}
        caps = [layer["capacity"] for c in self.calls for layer in c["layers"].values() if "capacity" in layer]
        if caps:  # what the token capacity did to the routers' own choice, over every routed token
            wanted = sum(float(w) for w, _, _ in caps)
            out["token_capacity"] = {"wanted": wanted, "dropped_share": sum(float(d) for _, d, _ in caps) / max(wanted, 1.0),
                                     "extra_share": sum(float(e) for _, _, e in caps) / max(wanted, 1.0)}
        return out


@torch.no_grad()
def inference_flops(model, sampler: str | None = None, steps: int | None = None, timestep_spacing: str | None = None,
                    cfg_scale: float = 1.0, probe: int = 10, seed: int = 0, token_share: float | None = None) -> dict:
    """FLOPs of ``model`` as it runs at inference over a sampler's timesteps. Width masks
    depend on t only (exact from the routers); with token routers a class-balanced probe
    batch is really sampled and every call measured on its actual x_t, unless ``token_share``
    states the routed share (freshly added routers: every token's logit is their bias)."""
    cfg = model.config
    sampler, steps = eval_sampler(cfg, sampler, steps)
    ts = sampler_timesteps(sampler, steps, timestep_spacing, cfg)
    if cfg.tokens is None or token_share is not None:
        tk = 1.0 if token_share is None else token_share
        prof = width_profile(model, ts)
        per_t = [dynamic_macs(cfg, [h[j] for h in prof["heads"]], [c[j] for c in prof["channels"]], [tk] * cfg.depth)
                 for j in range(len(ts))]
        blocks = [sum(block_share(cfg, h[j], c[j], tk) for h, c in zip(prof["heads"], prof["channels"])) / cfg.depth
                  for j in range(len(ts))]
        mean = sum(per_t) / len(per_t)
        how = "router masks per timestep" + ("" if token_share is None else f", tokens routed as initialised ({tk:.3f})")
        return {"calls": len(ts), "macs": mean, "gflops": mean / 1e9, "flops_ratio": mean / static_macs(cfg)["total"],
                "block_flops_ratio": sum(blocks) / len(blocks), "token_keep_ratio": tk,
                "block_ratio_per_t": dict(zip(ts, blocks)),
                "measured_on": f"{sampler} {steps} steps ({resolve_spacing(sampler, timestep_spacing)}): {how}"}
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(probe, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    y, negative = family_of(cfg).example_condition(cfg, probe, g)  # class-balanced labels, or random captions
    with FlopsMeter(model) as meter:
        sample(model, noise, y, sampler=sampler, steps=steps, cfg_scale=cfg_scale, generator=g,
               timestep_spacing=timestep_spacing, **({"negative": negative} if negative is not None else {}))
    res = meter.result()
    res["measured_on"] = (f"{sampler} {steps} steps ({resolve_spacing(sampler, timestep_spacing)}), cfg {cfg_scale}: "
                          f"{probe} sampled images")
    return res


def fresh_token_share(config) -> float:
    """The routed share of freshly added token routers (zero last-layer weights: every token's
    logit is the bias b, so inference routes round(N * sigmoid(b)) of the N tokens)."""
    n = config.num_patches
    return math.floor(n / (1.0 + math.exp(-config.tokens.init_bias)) + 0.5) / n
