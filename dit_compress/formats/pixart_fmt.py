"""The diffusers layout of PixArt-α / PixArt-Σ: ``PixArtTransformer2DModel`` dirs (bare, or the
``transformer/`` of a pipeline dir). ditc's PixArt module holds diffusers' own key names, so
the weights are copied as they are; the config is read field by field, and every field this
toolkit does not model must hold the value the module implements, else the variant is
refused in one line."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

from .. import checks
from ..data.text import pipeline_dir, text_encoder_dirs
from ..config import DiTConfig
from ..errors import FormatError, UsageError

# fields of PixArtTransformer2DModel's config that the module implements only at these values
FIXED = {"dropout": 0.0, "attention_bias": True, "activation_fn": "gelu-approximate", "upcast_attention": False,
         "norm_type": "ada_norm_single", "norm_elementwise_affine": False, "norm_eps": 1e-6,
         "attention_type": "default", "num_embeds_ada_norm": 1000, "norm_num_groups": 32}
# fields of Transformer2DModel that the hub's PixArt-α configs (written by that class) state
LEGACY_FIXED = {"double_self_attention": False, "only_cross_attention": False, "num_vector_embeds": None}
READ = {"num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "num_layers", "cross_attention_dim",
        "sample_size", "patch_size", "interpolation_scale", "use_additional_conditions", "caption_channels"}
IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "_ditc", "use_linear_projection",
           "_use_default_values"}  # use_linear_projection: unused on patched inputs


def _unsupported(message: str) -> FormatError:
    """A well-formed PixArt config of a variant this toolkit does not implement: a usage error
    (exit 2), as the file is fine and the request is what cannot be served."""
    return FormatError(message, exit_code=2)


MAX_FIELD = 1 << 20


def _same(value, implemented) -> bool:
    """``value`` is the implemented value, of its type (``false`` is not 0.0, ``1`` not true)."""
    if implemented is None or isinstance(implemented, bool):
        return value is implemented
    if isinstance(value, bool):
        return False
    if isinstance(implemented, float):
        return isinstance(value, (int, float)) and abs(value - implemented) < 1e-12
    return type(value) is type(implemented) and value == implemented


def _ditc_record(d: dict, where: str, stated: dict) -> DiTConfig:
    record = d["_ditc"]
    if not isinstance(record, dict):
        raise FormatError(f"{where}: its _ditc record must be a JSON object")
    cfg = DiTConfig.from_dict(record)
    for key, value in stated.items():
        mine = getattr(cfg, key)
        if mine != value:
            raise FormatError(f"{where}: config.json says {key} {value} but its ditc record (_ditc) says {mine}: the "
                              "file was edited; remove _ditc to read the diffusers fields alone")
    return cfg


def is_pixart(d: dict) -> bool:
    return d.get("_class_name") == "PixArtTransformer2DModel" or d.get("norm_type") == "ada_norm_single"


def config_from_pixart(d: dict, where: str) -> DiTConfig:
    """A ditc config from a diffusers PixArt transformer config; refuses what the module does
    not implement (naming the field), never guesses what the file leaves out."""
    if not isinstance(d, dict):
        raise FormatError(f"{where}: config.json must hold a JSON object")
    unknown = sorted(set(d) - set(FIXED) - set(LEGACY_FIXED) - READ - IGNORED)
    if unknown:
        raise _unsupported(f"{where}: unsupported PixArt variant (config field {unknown[0]!r}, e.g. PixArt-Σ's key/value "
                          "token compression, is not implemented)")
    for k, v in {**FIXED, **LEGACY_FIXED}.items():
        if k in d and not _same(d[k], v):
            raise _unsupported(f"{where}: unsupported PixArt variant ({k} = {d[k]!r}; only {v!r} is implemented)")

    def num(key, kind=int, optional=False, lo=1):
        if key not in d and not optional:
            raise FormatError(f"{where}: the PixArt transformer config lacks {key!r}")
        try:
            if kind is int:
                return checks.integer(key, d.get(key), lo=lo, hi=MAX_FIELD, optional=optional)
            return checks.real(key, d.get(key), lo=0.0, lo_open=True, hi=1e6, optional=optional)
        except UsageError as e:  # a config field, not an option: named as the file names it
            raise FormatError(f"{where}: config field {str(e).replace('`', '')}") from None

    heads, hd = num("num_attention_heads"), num("attention_head_dim")
    in_ch, sample, patch = num("in_channels"), num("sample_size"), num("patch_size")
    out = num("out_channels", optional=True) or in_ch
    layers = num("num_layers")
    caption = num("caption_channels", optional=True)
    if caption is None:
        raise FormatError(f"{where}: caption_channels is missing or null (a PixArt without caption projection is not "
                          "supported)")
    if patch > sample:
        raise FormatError(f"{where}: patch_size {patch} is larger than sample_size {sample}")
    inner = heads * hd
    cross = num("cross_attention_dim", optional=True)
    if cross is not None and cross != inner:
        raise _unsupported(f"{where}: unsupported PixArt variant (cross_attention_dim {cross} differs from the inner "
                          f"width {inner}; the captions are projected to the inner width)")
    if out not in (in_ch, 2 * in_ch):
        raise FormatError(f"{where}: out_channels {out} is neither in_channels nor twice it")
    add = d.get("use_additional_conditions")
    if add is not None and not isinstance(add, bool):
        raise FormatError(f"{where}: use_additional_conditions must be true, false or null, got {add!r}")
    interp = num("interpolation_scale", float, optional=True)
    if "_ditc" in d:  # written by ditc: the full config (kept layers, lineage), checked against the diffusers fields
        return _ditc_record(d, where, {"depth": layers, "num_heads": heads, "head_dim": hd, "in_channels": in_ch,
                                       "out_channels": out, "input_size": sample, "patch_size": patch,
                                       "caption_channels": caption})
    prov = {"num_heads": "config.json (num_attention_heads)", "prediction": "diffusers PixArt: eps (PixArtAlphaPipeline)",
            "numerics": "diffusers' PixArt code (the module reproduces it)"}
    add = d.get("use_additional_conditions")
    if add is None:
        add = sample == 128
        prov["additional_conditions"] = "diffusers' rule for an unset use_additional_conditions: sample_size == 128"
    interp = d.get("interpolation_scale")
    if interp is None:
        interp = float(max(sample // 64, 1))
        prov["interpolation_scale"] = "diffusers' rule for an unset interpolation_scale: max(sample_size // 64, 1)"
    return DiTConfig(
        family="pixart", input_size=sample, patch_size=patch, in_channels=in_ch, hidden_size=inner, depth=layers,
        num_heads=heads, mlp_ratio=4.0, num_classes=1, learn_sigma=out == 2 * in_ch, caption_channels=int(caption),
        additional_conditions=bool(add), interpolation_scale=float(interp), pos_base_size=sample // patch,
        latent_scale=0.18215 if in_ch == 4 else None, vae="stabilityai/sd-vae-ft-ema" if in_ch == 4 else None,
        numerics="diffusers", provenance=prov,
    )


PIPELINE_CAPTION_LENGTH = {"PixArtAlphaPipeline": 120, "PixArtSigmaPipeline": 300}  # max_sequence_length


def pipeline_facts(cfg: DiTConfig, root) -> DiTConfig:
    """What a PixArt pipeline dir states beyond its transformer: the VAE (its folder and
    ``scaling_factor``: α's sd-vae-ft-ema 0.18215, Σ's SDXL VAE 0.13025) and the caption length
    of the pipeline class (α 120, Σ 300). Outside a pipeline the VAE is α's, said as assumed."""
    root = Path(root)
    index = root / "model_index.json"
    if index.exists():
        idx = read_config(index)
        cls = idx.get("_class_name") if isinstance(idx, dict) else None
        if cls in PIPELINE_CAPTION_LENGTH and cfg.caption_length is None:
            cfg.caption_length = PIPELINE_CAPTION_LENGTH[cls]
            cfg.provenance["caption_length"] = f"{cls}'s max_sequence_length"
        vcfg = root / "vae" / "config.json"
        if vcfg.exists() and cfg.in_channels == 4:
            vd = read_config(vcfg)
            scale = vd.get("scaling_factor", 0.18215) if isinstance(vd, dict) else None
            if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not 0 < scale < 100:
                raise FormatError(f"{vcfg}: scaling_factor {scale!r} is not a positive number")
            cfg.vae, cfg.latent_scale = str((root / "vae").resolve()), float(scale)
            cfg.provenance["vae"] = f"the pipeline's vae/ folder (scaling_factor {scale})"
            return cfg
    if cfg.in_channels == 4:
        cfg.provenance["vae"] = ("not stated (no pipeline vae/): PixArt-α's sd-vae-ft-ema, scale 0.18215, taken for "
                                 "decoding only; load a PixArt-Σ (SDXL VAE, 0.13025) from its pipeline dir")
    return cfg


def pixart_config(cfg: DiTConfig) -> dict:
    """PixArtTransformer2DModel's config.json for ``cfg`` (the implemented values of every other
    field), with the ditc config under ``_ditc``."""
    return {"_class_name": "PixArtTransformer2DModel", "num_attention_heads": cfg.num_heads,
            "attention_head_dim": cfg.head_dim, "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
            "num_layers": cfg.depth, "cross_attention_dim": cfg.hidden_size, "sample_size": cfg.input_size,
            "patch_size": cfg.patch_size, "interpolation_scale": cfg.interpolation_scale,
            "use_additional_conditions": cfg.additional_conditions, "caption_channels": cfg.caption_channels,
            **FIXED, "_ditc": cfg.to_dict()}


def pixart_index() -> dict:
    return {"_class_name": "PixArtAlphaPipeline", "_diffusers_version": "0.30.0",
            "transformer": ["diffusers", "PixArtTransformer2DModel"]}


# DDIM on DiT's linear schedule, as `ditc sample --sampler ddim --timestep-spacing leading` runs it
DDIM_SCHEDULER = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.30.0", "num_train_timesteps": 1000,
                  "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear", "trained_betas": None,
                  "clip_sample": False, "set_alpha_to_one": True, "steps_offset": 0, "prediction_type": "epsilon",
                  "thresholding": False, "timestep_spacing": "leading", "rescale_betas_zero_snr": False}


@dataclass
class PipelineParts:
    """What makes a transformer dir a whole PixArtAlphaPipeline dir, checked: the files to
    copy (source, path in the pipeline) and the pipeline index."""

    copies: list
    index: dict


def pipeline_parts(text_encoder, cfg) -> PipelineParts:
    """The parts of a PixArtAlphaPipeline dir for a model of config ``cfg``: the text encoder
    and tokenizer from ``text_encoder`` (a pipeline or encoder dir), a DDIM scheduler on the
    training schedule, and the VAE: for a latent model the source pipeline's vae/ (an encoder
    dir has none and is refused), for a pixel-space one none (``vae: [null, null]``: it samples
    with ``output_type="latent"``). Everything is checked here, before anything is written: the
    encoder's config, safetensors weights and feature width (= ``caption_channels``), a
    tokenizer, the VAE's config, weights, latent channels and scale."""
    enc, tok = text_encoder_dirs(text_encoder)
    root = pipeline_dir(text_encoder)
    latent = cfg.latent_scale is not None
    vae_cls = check_vae(root, text_encoder, cfg) if latent else None
    if not (enc / "config.json").is_file():
        raise UsageError(f"{enc} has no config.json (the encoder's transformers config)")
    weights = encoder_weights(enc)
    tok_cls = tokenizer_class(root, tok)
    enc_cfg = read_config(enc / "config.json")
    enc_cfg = enc_cfg if isinstance(enc_cfg, dict) else {}
    width = enc_cfg.get("d_model", enc_cfg.get("hidden_size"))
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        raise UsageError(f"{enc / 'config.json'} does not state the encoder's width (d_model): not a T5 encoder config")
    if cfg.caption_channels is not None and width != cfg.caption_channels:
        raise UsageError(f"the text encoder {enc} gives features {width} wide; the model takes {cfg.caption_channels} "
                         "(its caption_channels)")
    encoder_files = ("config.json", "generation_config.json", *weights)
    copies = [(enc / f, f"text_encoder/{f}") for f in encoder_files if (enc / f).is_file()]
    copies += [(f, f"tokenizer/{f.name}") for f in sorted(tok.iterdir())  # an encoder dir may hold both
               if f.is_file() and f.name not in encoder_files and f.suffix != ".safetensors"]
    if latent:
        copies += [(f, f"vae/{f.relative_to(root / 'vae')}") for f in sorted((root / "vae").rglob("*")) if f.is_file()]
    enc_cls = (enc_cfg.get("architectures") or ["T5EncoderModel"])[0]
    index = {**pixart_index(), "text_encoder": ["transformers", enc_cls],
             "tokenizer": ["transformers", tok_cls], "scheduler": ["diffusers", "DDIMScheduler"],
             "vae": ["diffusers", vae_cls] if latent else [None, None]}
    return PipelineParts(copies, index)


def write_pipeline_parts(out_dir, parts: PipelineParts) -> None:
    """Copy the checked ``parts`` into ``out_dir`` (holding transformer/) and write the
    scheduler and the pipeline index."""
    out = Path(out_dir)
    for src, rel in parts.copies:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, out / rel)
    (out / "scheduler").mkdir()
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(DDIM_SCHEDULER, indent=2))
    (out / "model_index.json").write_text(json.dumps(parts.index, indent=2))


def check_vae(root: Path | None, text_encoder, cfg) -> str:
    """The class of the source pipeline's VAE for a latent model, after checking it decodes
    this model's latents: a config, weights, ``latent_channels`` = the model's channels and
    the scale the model was trained with."""
    vae = root / "vae" if root is not None else None
    if vae is None or not (vae / "config.json").is_file():
        raise UsageError(f"this PixArt samples latents and {text_encoder} has no vae/ (with its config.json) to "
                         "decode them: give a whole pipeline dir (text_encoder/, tokenizer/, vae/)")
    vcfg = read_config(vae / "config.json")
    vcfg = vcfg if isinstance(vcfg, dict) else {}
    if not any((vae / w).is_file() for w in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")):
        raise UsageError(f"{vae} has no weights (diffusion_pytorch_model.safetensors)")
    if vcfg.get("latent_channels", cfg.in_channels) != cfg.in_channels:
        raise UsageError(f"the VAE in {vae} makes {vcfg.get('latent_channels')}-channel latents; this model takes "
                         f"{cfg.in_channels}")
    scale = vcfg.get("scaling_factor")
    if isinstance(scale, (int, float)) and abs(scale - cfg.latent_scale) > 1e-6:
        raise UsageError(f"the VAE in {vae} scales latents by {scale}; this model was trained on latents scaled by "
                         f"{cfg.latent_scale}")
    return vcfg.get("_class_name") or "AutoencoderKL"


def encoder_weights(enc: Path) -> list[str]:
    """The encoder's safetensors weight files: model.safetensors, or the shards its
    model.safetensors.index.json lists (a large encoder such as PixArt-alpha's T5-XXL) with the index."""
    if (enc / "model.safetensors").is_file():
        return check_weights(enc, ["model.safetensors"])
    index = enc / "model.safetensors.index.json"
    if not index.is_file():
        raise UsageError(f"{enc} has no model.safetensors or model.safetensors.index.json (the encoder's weights, in "
                         "safetensors)")
    listed = read_config(index)
    shards = listed.get("weight_map") if isinstance(listed, dict) else None
    names = sorted(set(shards.values())) if isinstance(shards, dict) and shards else []
    if not names or not all(isinstance(n, str) and n for n in names):
        raise UsageError(f"{index} lists no weight files (its weight_map)")
    outside = [n for n in names if Path(n).name != n]
    if outside:
        raise UsageError(f"{index} lists a weight file outside its folder: {outside[0]}")
    missing = [n for n in names if not (enc / n).is_file()]
    if missing:
        raise UsageError(f"{enc} lacks {missing[0]}, a weight shard its model.safetensors.index.json lists")
    return [index.name, *check_weights(enc, names)]


def check_weights(folder: Path, names: list[str]) -> list[str]:
    """``names``, after reading each file's safetensors header (a truncated or foreign file is
    refused here, not when the written pipeline is first loaded)."""
    for n in names:
        try:
            with safe_open(str(folder / n), "pt") as f:
                f.keys()
        except (SafetensorError, OSError) as e:
            raise UsageError(f"{folder / n} is not a readable safetensors file: {str(e)[:120]}") from None
    return names


def tokenizer_class(root: Path | None, tok: Path) -> str:
    """The transformers class that reads ``tok``: what the source pipeline (``root``) names in
    its index, else a fast tokenizer (tokenizer.json), else a SentencePiece T5 tokenizer
    (spiece.model)."""
    index = root / "model_index.json" if root is not None else None
    pipeline = read_config(index) if index is not None and index.is_file() else None
    named = pipeline.get("tokenizer") if isinstance(pipeline, dict) else None
    if isinstance(named, list) and len(named) == 2 and isinstance(named[1], str) and named[1]:
        return named[1]
    if (tok / "tokenizer.json").is_file():
        return "PreTrainedTokenizerFast"
    if (tok / "spiece.model").is_file():
        return "T5Tokenizer"
    raise UsageError(f"{tok} holds no tokenizer (tokenizer.json, or spiece.model for a SentencePiece T5 tokenizer)")


def read_config(cfile) -> dict:
    try:
        return json.loads(cfile.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise FormatError(f"cannot read {cfile}: {str(e)[:160]}") from None
    except json.JSONDecodeError as e:
        raise FormatError(f"{cfile} is not valid JSON: {e}") from None
