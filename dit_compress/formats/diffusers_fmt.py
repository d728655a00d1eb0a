"""The diffusers layout: ``DiTTransformer2DModel`` (legacy ``Transformer2DModel`` configs
with ``norm_type == "ada_norm_zero"``), as a pipeline dir or a bare transformer dir.

Numerics: diffusers' DiT differs from the original in two places (timestep sinusoid
divides by 127 instead of 128; the pre-MLP LayerNorm uses eps 1e-5 instead of 1e-6).
Loaded models keep the ORIGINAL numerics the public weights were trained with, so
outputs match diffusers to a small tolerance, not bit for bit (see tests/test_formats.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import DiTConfig
from ..errors import FormatError, UsageError
from .ditc import read_safetensors
from .original import safe_torch_load
from .pixart_fmt import (config_from_pixart, is_pixart, pipeline_facts, pipeline_parts, pixart_config, pixart_index,
                         write_pipeline_parts)

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def transformer_dir(path: Path) -> Path:
    path = Path(path)
    if (path / "model_index.json").exists():
        sub = path / "transformer"
        if not sub.is_dir():
            raise FormatError(f"{path} has a model_index.json but no transformer/ folder")
        return sub
    if not (path / "config.json").exists() and (path / "transformer" / "config.json").exists():
        return path / "transformer"  # a transformer folder written alone (velocity models)
    return path


def config_from_diffusers(d: dict) -> DiTConfig:
    if d.get("norm_type") not in (None, "ada_norm_zero"):
        raise FormatError(f"not a DiT transformer (norm_type {d.get('norm_type')!r}, expected 'ada_norm_zero')")
    try:
        heads, hd = int(d["num_attention_heads"]), int(d["attention_head_dim"])
        in_ch = int(d["in_channels"])
        out_ch = int(d.get("out_channels") or in_ch)
        cfg = DiTConfig(
            input_size=int(d["sample_size"]), patch_size=int(d["patch_size"]), in_channels=in_ch,
            hidden_size=heads * hd, depth=int(d["num_layers"]), num_heads=heads,
            num_classes=int(d.get("num_embeds_ada_norm") or 1000), learn_sigma=out_ch == 2 * in_ch,
            latent_scale=0.18215 if in_ch == 4 else None, vae="stabilityai/sd-vae-ft-ema" if in_ch == 4 else None,
        )
    except KeyError as e:
        raise FormatError(f"diffusers transformer config lacks {e.args[0]!r}") from None
    extra = d.get("_ditc")
    if extra:  # written by ditc: restore the full config (kept layers, lineage)
        cfg = DiTConfig.from_dict(extra)
    return cfg


def _read_weights(tdir: Path) -> dict:
    for name in WEIGHT_FILES:
        f = tdir / name
        if f.exists():
            if name.endswith(".safetensors"):
                return read_safetensors(f)[0]

            obj = safe_torch_load(f)
            if not isinstance(obj, dict):
                raise FormatError(f"{f} does not hold a state dict")
            return obj
    raise FormatError(f"{tdir} holds no diffusers weights ({' or '.join(WEIGHT_FILES)})")


EMB_KEYS = {  # diffusers per-block embedder -> original layout (relative to the embedder owner)
    "norm1.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "norm1.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "norm1.emb.class_embedder.embedding_table": "y_embedder.embedding_table",
}


def _emb_params():
    for dk, ok in EMB_KEYS.items():
        for s in (("weight",) if "embedding_table" in dk else ("weight", "bias")):
            yield f"{dk}.{s}", f"{ok}.{s}"


def embedders_identical(sd: dict, depth: int) -> bool:
    """True when every block's timestep/class embedder equals block 0's (checkpoints converted
    from the original code); DiTs created or trained in diffusers hold independent ones."""
    for i in range(1, depth):
        for dk, _ in _emb_params():
            a, b = sd.get(f"transformer_blocks.0.{dk}"), sd.get(f"transformer_blocks.{i}.{dk}")
            if a is not None and b is not None and not torch.equal(a, b):
                return False
    return True


def diffusers_to_original(sd: dict, depth: int, block_embedders: bool = False) -> dict:
    """Original key layout. The final layer is conditioned through block 0's embedders, which
    become the top-level ``t_embedder``/``y_embedder``; with ``block_embedders`` every block
    also keeps its own copy (``blocks.i.t_embedder`` ...)."""
    out = {}

    def take(key):
        if key not in sd:
            raise FormatError(f"diffusers weights lack {key}")
        return sd[key]

    for s in ("weight", "bias"):
        out[f"x_embedder.proj.{s}"] = take(f"pos_embed.proj.{s}")
        out[f"final_layer.adaLN_modulation.1.{s}"] = take(f"proj_out_1.{s}")
        out[f"final_layer.linear.{s}"] = take(f"proj_out_2.{s}")
    for dk, ok in _emb_params():
        out[ok] = take(f"transformer_blocks.0.{dk}")
    for i in range(depth):
        p = f"transformer_blocks.{i}"
        for s in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{s}"] = torch.cat([take(f"{p}.attn1.to_{n}.{s}") for n in "qkv"], 0)
            out[f"blocks.{i}.attn.proj.{s}"] = take(f"{p}.attn1.to_out.0.{s}")
            out[f"blocks.{i}.mlp.fc1.{s}"] = take(f"{p}.ff.net.0.proj.{s}")
            out[f"blocks.{i}.mlp.fc2.{s}"] = take(f"{p}.ff.net.2.{s}")
            out[f"blocks.{i}.adaLN_modulation.1.{s}"] = take(f"{p}.norm1.linear.{s}")
        if block_embedders:
            for dk, ok in _emb_params():
                out[f"blocks.{i}.{ok}"] = take(f"{p}.{dk}")
    known = {k for k in sd if k.startswith("transformer_blocks.") and int(k.split(".")[1]) >= depth}
    if known:
        raise FormatError(f"diffusers weights hold more blocks than num_layers={depth} (e.g. {sorted(known)[0]})")
    return out


def original_to_diffusers(sd: dict, depth: int, block_embedders: bool = False) -> dict:
    out = {}
    for s in ("weight", "bias"):
        out[f"pos_embed.proj.{s}"] = sd[f"x_embedder.proj.{s}"]
        out[f"proj_out_1.{s}"] = sd[f"final_layer.adaLN_modulation.1.{s}"]
        out[f"proj_out_2.{s}"] = sd[f"final_layer.linear.{s}"]
    if block_embedders:
        # diffusers conditions the final layer through block 0's embedders
        for _, ok in _emb_params():
            if not torch.equal(sd[ok], sd[f"blocks.0.{ok}"]):
                raise FormatError(
                    "the diffusers layout conditions the final layer through block 0's embedders, and this model's "
                    "final-layer embedders differ from its first block's (the source's block 0 was pruned); save it as ditc")
    for i in range(depth):
        p = f"transformer_blocks.{i}"
        for s in ("weight", "bias"):
            q, k, v = sd[f"blocks.{i}.attn.qkv.{s}"].chunk(3, 0)
            out[f"{p}.attn1.to_q.{s}"], out[f"{p}.attn1.to_k.{s}"], out[f"{p}.attn1.to_v.{s}"] = q.clone(), k.clone(), v.clone()
            out[f"{p}.attn1.to_out.0.{s}"] = sd[f"blocks.{i}.attn.proj.{s}"]
            out[f"{p}.ff.net.0.proj.{s}"] = sd[f"blocks.{i}.mlp.fc1.{s}"]
            out[f"{p}.ff.net.2.{s}"] = sd[f"blocks.{i}.mlp.fc2.{s}"]
            out[f"{p}.norm1.linear.{s}"] = sd[f"blocks.{i}.adaLN_modulation.1.{s}"]
        for dk, ok in _emb_params():
            # shared embedders are copied into every block; safetensors needs separate storage
            out[f"{p}.{dk}"] = (sd[f"blocks.{i}.{ok}"] if block_embedders else sd[ok]).clone()
    return {k: v.contiguous() for k, v in out.items()}


def load_diffusers(path: Path) -> tuple[DiTConfig, dict]:
    tdir = transformer_dir(path)
    cfile = tdir / "config.json"
    if not cfile.exists():
        raise FormatError(f"{tdir} has no config.json")
    try:
        d = json.loads(cfile.read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"{cfile} is not valid JSON: {e}") from None
    if is_pixart(d):  # PixArt-α / Σ: diffusers' own key layout, weights copied as they are
        cfg = config_from_pixart(d, str(tdir))
        if "_ditc" not in d:
            cfg = pipeline_facts(cfg, path)
        if cfg.name is None:
            cfg.name = Path(path).name
        return cfg, _read_weights(tdir)
    cfg = config_from_diffusers(d)
    raw = _read_weights(tdir)
    identical = embedders_identical(raw, cfg.depth)
    if "_ditc" in d:  # written by ditc: the config states both facts
        if not cfg.block_embedders and not identical:
            raise FormatError(f"{tdir}: its ditc config says the embedders are shared but the blocks' copies differ")
    else:
        cfg.block_embedders = not identical
        if identical:
            cfg.numerics = "original"
            cfg.provenance["numerics"] = ("inferred: per-block embedders identical, i.e. converted from the original "
                                          "DiT code, trained with its numerics; --numerics diffusers overrides")
        else:
            cfg.numerics = "diffusers"
            cfg.provenance["numerics"] = ("inferred: per-block embedders differ, i.e. created or trained in diffusers, "
                                          "with its numerics; --numerics original overrides")
        cfg.provenance["embedders"] = ("one shared (identical copies in every block)" if identical
                                       else "per block (each block owns its own; the final layer uses block 0's)")
        cfg.provenance["num_heads"] = "config.json (num_attention_heads)"
        cfg.provenance["prediction"] = "diffusers DiT: eps (DiTPipeline)"
    sd = diffusers_to_original(raw, cfg.depth, cfg.block_embedders)
    vae_dir = Path(path) / "vae"
    if "_ditc" not in d and cfg.in_channels == 4:
        if (Path(path) / "model_index.json").exists() and (vae_dir / "config.json").exists():
            cfg.vae, cfg.provenance["vae"] = str(vae_dir.resolve()), "the pipeline's vae/ folder"
        else:
            cfg.provenance["vae"] = "assumed: 4-channel latents of sd-vae-ft-ema (DiT's); eval --vae overrides"
    if cfg.name is None:
        cfg.name = Path(path).name
    return cfg, sd


def diffusers_config(cfg: DiTConfig) -> dict:
    return {
        "_class_name": "DiTTransformer2DModel",
        "activation_fn": "gelu-approximate",
        "attention_bias": True,
        "attention_head_dim": cfg.head_dim,
        "dropout": 0.0,
        "in_channels": cfg.in_channels,
        "norm_elementwise_affine": False,
        "norm_eps": 1e-05,
        "norm_type": "ada_norm_zero",
        "num_attention_heads": cfg.num_heads,
        "num_embeds_ada_norm": cfg.num_classes,
        "num_layers": cfg.depth,
        "out_channels": cfg.out_channels,
        "patch_size": cfg.patch_size,
        "sample_size": cfg.input_size,
        "upcast_attention": False,
        "_ditc": cfg.to_dict(),
    }


def save_diffusers(model, out_dir: Path, dtype: torch.dtype | None = None, text_encoder=None) -> None:
    """A transformer-only diffusers layout: ``model_index.json`` + ``transformer/`` for eps
    models (loadable in ``DiTPipeline``). A velocity (SiT) model is written as the
    ``transformer/`` folder alone: diffusers' DiTPipeline would sample it as an eps model with
    its DDIM/DDPM scheduler, so no pipeline index claims it; its config's ``_ditc`` entry
    states the prediction and time input, and ditc reloads it exactly. A PixArt with
    ``text_encoder`` (a pipeline or encoder dir) is written as a whole PixArtAlphaPipeline dir
    (``write_pipeline_parts``)."""

    cfg = model.config
    if cfg.is_dynamic:
        raise UsageError("a model with dynamic routers cannot be expressed in the diffusers layout; save it as ditc")
    if text_encoder is not None and cfg.family != "pixart":
        raise UsageError("`text_encoder` makes a text-to-image pipeline; this model is class-conditional")
    parts = pipeline_parts(text_encoder, cfg) if text_encoder is not None else None  # checked before writing
    if cfg.family == "pixart":  # PixArtTransformer2DModel (diffusers' keys already), loadable in PixArtAlphaPipeline
        sd, config, index = dict(model.state_dict()), pixart_config(cfg), pixart_index()
    else:
        if cfg.mlp_ratio != 4.0:
            raise FormatError("the diffusers DiT fixes the MLP ratio at 4; this model's is " + str(cfg.mlp_ratio))
        sd = original_to_diffusers({k: v for k, v in model.state_dict().items() if k != "pos_embed"}, cfg.depth,
                                   cfg.block_embedders)
        config = diffusers_config(cfg)
        index = {"_class_name": "DiTPipeline", "_diffusers_version": "0.30.0",
                 "transformer": ["diffusers", "DiTTransformer2DModel"]} if cfg.prediction == "eps" else None
    sd = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    tdir = Path(out_dir) / "transformer"
    tdir.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(tdir / "diffusion_pytorch_model.safetensors"))
    (tdir / "config.json").write_text(json.dumps(config, indent=2))
    if parts is not None:
        write_pipeline_parts(out_dir, parts)
    elif index is not None:
        (Path(out_dir) / "model_index.json").write_text(json.dumps(index, indent=2))
