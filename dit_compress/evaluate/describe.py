"""What ``ditc info`` reports: architecture, size, FLOPs, compression spec, lineage and,
for dynamic models, the per-timestep width profile and expected FLOPs over a sampler."""

from __future__ import annotations

import numpy as np

from ..diffusion.measure import fresh_token_share, inference_flops, width_profile
from ..diffusion.sampling import eval_sampler, resolve_spacing, sampler_timesteps
from ..model.family import family_of
from ..report import plot_heatmap


def describe(model, sampler: str | None = None, steps: int | None = None, timestep_spacing: str | None = None,
             cfg_scale: float = 1.0, fresh_tokens: bool = False) -> dict:
    """``fresh_tokens``: the token routers were just added (their routed share follows from
    their bias; nothing needs sampling)."""
    cfg = model.config
    fam = family_of(cfg)
    sampler, steps = eval_sampler(cfg, sampler, steps)  # checked for every model, used by dynamic ones
    spacing = resolve_spacing(sampler, timestep_spacing)
    info = {
        "name": cfg.name,
        "architecture": cfg.describe_arch(),
        "depth": cfg.depth,
        "source_depth": cfg.source_depth,
        "kept_layers": cfg.kept_layers,
        **fam.info_fields(model),
        "params": model.num_params(),
        "params_without_routers": model.num_params(include_routers=False),
        "gflops": fam.static_macs(cfg)["total"] / 1e9,
        "dynamic_width": cfg.width.to_dict() if cfg.width else None,
        "token_routing": cfg.tokens.to_dict() if cfg.tokens else None,
        "lineage": cfg.lineage,
        "provenance": cfg.provenance,
    }
    cs = getattr(cfg, "cache_schedule", None)
    if cs is not None:  # what every sampling command follows unless told `feature_cache` none
        info["learned_cache"] = {"sampler": cs["sampler"], "steps": cs["steps"], "spacing": cs["spacing"],
                                 "blocks_reused_per_step": [sum(r) for r in cs["skip"]]}
    if cfg.is_dynamic:
        share = fresh_token_share(cfg) if fresh_tokens and cfg.tokens is not None else None
        e = inference_flops(model, sampler, steps, spacing, cfg_scale, token_share=share)
        info["inference_gflops"] = e["gflops"]
        info["inference_flops_ratio"] = e["flops_ratio"]
        info["inference_block_flops_ratio"] = e["block_flops_ratio"]
        info["target_block_flops"] = cfg.flops_target
        info["token_keep_ratio"] = e["token_keep_ratio"]
        info["inference_measured_on"] = e["measured_on"]
        if cfg.width is not None:
            prof = width_profile(model, sampler_timesteps(sampler, steps, spacing, cfg))
            info["width_profile"] = {
                "timesteps": prof["timesteps"],
                "mean_heads_per_layer": [sum(h) / len(h) for h in prof["heads"]],
                "mean_channels_per_layer": [sum(c) / len(c) for c in prof["channels"]],
            }
    return info


def plot_width_profile(model, path, sampler: str | None = None, steps: int | None = None) -> None:
    sampler, steps = eval_sampler(model.config, sampler, steps)
    ts = sampler_timesteps(sampler, steps, None, model.config)
    prof = width_profile(model, ts)
    m = np.concatenate([np.asarray(prof["heads"]), np.asarray(prof["channels"])], 0)
    plot_heatmap(path, m, "active share: heads (rows 0..L-1), MLP channels (rows L..2L-1)", "timestep", "layer", xticks=ts)
