"""What ``ditc info`` reports: architecture, size, FLOPs, compression spec, lineage and,
for dynamic models, the per-timestep width profile and expected FLOPs over a sampler."""

from __future__ import annotations

import torch

from .compress.flops import dynamic_macs, static_macs
from .diffusion.sampling import resolve_spacing, sampler_timesteps


@torch.no_grad()
def width_profile(model, timesteps: list[int]) -> dict:
    """Active share of heads / MLP channels per layer for each timestep (masks depend on t only)."""
    cfg = model.config
    t = torch.tensor(timesteps, dtype=torch.long)
    y = torch.zeros_like(t)  # width routers read the timestep embedding only
    t_emb = model.t_embedder(t)
    conds = model.block_conditions(t, y, t_emb, t_emb)
    heads, chans = [], []
    for b, (bt, _) in zip(model.blocks, conds):
        hm, cm = b.width_masks(bt, "dense", 0.0)
        heads.append(hm.mean(1).tolist() if hm is not None else [1.0] * len(timesteps))
        chans.append(cm.mean(1).tolist() if cm is not None else [1.0] * len(timesteps))
    return {"timesteps": timesteps, "heads": heads, "channels": chans, "depth": cfg.depth}


@torch.no_grad()
def token_keep_ratio(model, timesteps: list[int], batch: int = 8, seed: int = 0) -> list[list[float]]:
    """Share of tokens routed to the MLP per layer, measured on noise inputs at each t."""
    cfg = model.config
    if cfg.tokens is None:
        return [[1.0] * len(timesteps) for _ in range(cfg.depth)]
    g = torch.Generator().manual_seed(seed)
    out = [[0.0] * len(timesteps) for _ in range(cfg.depth)]
    old = model.routing
    model.routing = "dense"
    try:
        for j, tt in enumerate(timesteps):
            x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
            y = torch.randint(0, cfg.num_classes, (batch,), generator=g)
            _, aux = model(x, torch.full((batch,), tt), y, return_aux=True)
            for i, st in enumerate(aux.stats):
                out[i][j] = float(st.token_frac.mean()) if st.token_frac is not None else 1.0
    finally:
        model.routing = old
    return out


def expected_macs(model, timesteps: list[int], token_ratios=None, token_batch: int = 8, token_points: int = 10) -> dict:
    """Dynamic MACs per timestep and their mean over the given schedule. Width masks are
    exact per timestep (they depend on t only); token keep ratios depend on the input and are
    measured on noise inputs at up to ``token_points`` timesteps of the schedule (nearest used)."""
    cfg = model.config
    prof = width_profile(model, timesteps)
    toks = token_ratios
    if toks is None:
        if cfg.tokens is None:
            toks = [[1.0] * len(timesteps) for _ in range(cfg.depth)]
        else:
            stride = max(1, len(timesteps) // token_points)
            probe_idx = list(range(0, len(timesteps), stride))
            probe = token_keep_ratio(model, [timesteps[i] for i in probe_idx], batch=token_batch)
            nearest = [min(range(len(probe_idx)), key=lambda k: abs(probe_idx[k] - j)) for j in range(len(timesteps))]
            toks = [[row[nearest[j]] for j in range(len(timesteps))] for row in probe]
    per_t = []
    for j in range(len(timesteps)):
        per_t.append(dynamic_macs(cfg, [h[j] for h in prof["heads"]], [c[j] for c in prof["channels"]], [k[j] for k in toks]))
    return {"per_t": per_t, "mean": sum(per_t) / len(per_t), "profile": prof, "tokens": toks}


def describe(model, sampler: str = "ddim", steps: int = 50, timestep_spacing: str | None = None) -> dict:
    cfg = model.config
    s = static_macs(cfg)
    spacing = resolve_spacing(sampler, timestep_spacing)
    info = {
        "name": cfg.name,
        "architecture": cfg.describe_arch(),
        "depth": cfg.depth,
        "source_depth": cfg.source_depth,
        "kept_layers": cfg.kept_layers,
        "hidden_size": cfg.hidden_size,
        "num_heads": cfg.num_heads,
        "patch_size": cfg.patch_size,
        "input": f"{cfg.in_channels}x{cfg.input_size}x{cfg.input_size}",
        "tokens": cfg.num_patches,
        "num_classes": cfg.num_classes,
        "learn_sigma": cfg.learn_sigma,
        "prediction": cfg.prediction,
        "numerics": cfg.numerics,
        "embedders": "per block (final layer: the source's block 0)" if cfg.block_embedders else "shared",
        "latent": f"x{cfg.latent_scale} of {cfg.vae}" if cfg.latent_scale is not None else "pixels",
        "params": model.num_params(),
        "params_without_routers": model.num_params(include_routers=False),
        "gflops": s["total"] / 1e9,
        "dynamic_width": cfg.width.to_dict() if cfg.width else None,
        "token_routing": cfg.tokens.to_dict() if cfg.tokens else None,
        "lineage": cfg.lineage,
        "provenance": cfg.provenance,
    }
    if cfg.is_dynamic:
        ts = sampler_timesteps(sampler, steps, spacing)
        e = expected_macs(model, ts)
        info["expected_gflops"] = e["mean"] / 1e9
        info["expected_flops_ratio"] = e["mean"] / s["total"]
        info["expected_over"] = f"{sampler} {steps} steps ({spacing} spacing)"
        mean_tok = [sum(r) / len(r) for r in e["tokens"]]
        info["token_keep_ratio"] = sum(mean_tok) / len(mean_tok)
        info["width_profile"] = {
            "timesteps": ts,
            "mean_heads_per_layer": [sum(h) / len(h) for h in e["profile"]["heads"]],
            "mean_channels_per_layer": [sum(c) / len(c) for c in e["profile"]["channels"]],
        }
    return info


def plot_width_profile(model, path, sampler: str = "ddim", steps: int = 50) -> None:
    from .report import plot_heatmap

    ts = sampler_timesteps(sampler, steps)
    prof = width_profile(model, ts)
    import numpy as np

    m = np.concatenate([np.asarray(prof["heads"]), np.asarray(prof["channels"])], 0)
    plot_heatmap(path, m, "active share: heads (rows 0..L-1), MLP channels (rows L..2L-1)", "timestep", "layer", xticks=ts)
