"""What ``ditc info`` reports: architecture, size, FLOPs, compression spec, lineage and,
for dynamic models, the per-timestep width profile and expected FLOPs over a sampler."""

from __future__ import annotations

import numpy as np

from ..diffusion.measure import fresh_token_share, inference_flops, width_profile
from ..diffusion.sampling import eval_sampler, resolve_spacing, sampler_timesteps
from ..model.flops import static_macs
from ..model.family import family_of
from ..report import plot_heatmap


def describe(model, sampler: str | None = None, steps: int | None = None, timestep_spacing: str | None = None,
             cfg_scale: float = 1.0, fresh_tokens: bool = False) -> dict:
    """``fresh_tokens``: the token routers were just added (their routed share follows from
    their bias; nothing needs sampling)."""
    cfg = model.config
    s = static_macs(cfg)
    sampler, steps = eval_sampler(cfg, sampler, steps)
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
        "num_classes": cfg.num_classes if family_of(cfg).condition == "labels" else None,
        "condition": family_of(cfg).condition_key(cfg),
        "learn_sigma": cfg.learn_sigma,
        "prediction": cfg.prediction if cfg.prediction == "eps" else
        f"velocity ({cfg.path_type} path; network time: {'t, 1 = data (SiT)' if cfg.time_input == 'sit' else '1 - t, 1 = noise (REPA)'})",
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
