"""MAR's own checkpoints (LTH14/mar ``main_mar.py``: ``checkpoint-last.pth`` holding ``model``,
``model_ema``, ``optimizer``, ``epoch``, ``scaler`` and the training ``args``), read without
executing pickled code, and written back in the same layout.

Every size fact comes from the weights or the training args; the heads from ``args.model``
(mar_base / mar_large / mar_huge) or from a published size the weights match; what neither
states is refused in one line naming the option or field that supplies it."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..config import MAR_ARCHS, MAR_MODEL_NAMES, DiTConfig
from ..data.ldm_vae import MAR_LATENT_SCALE
from ..errors import FormatError, MissingFactError, UsageError

# main_mar.py's defaults, used only for a plain state dict of a published size (each noted)
OFFICIAL_DEFAULTS = dict(img_size=256, vae_stride=16, patch_size=1, vae_embed_dim=16, num_sampling_steps="100",
                         diffusion_batch_mul=1, mask_ratio_min=0.7, label_drop_prob=0.1, attn_dropout=0.1,
                         proj_dropout=0.1)


def is_mar_state(state: dict) -> bool:
    return "z_proj.weight" in state and any(k.startswith("diffloss.net.") for k in state)


def _depth(state: dict, prefix: str) -> int:
    idx = set()
    for k in state:
        if k.startswith(prefix + "."):
            i = k[len(prefix) + 1:].split(".", 1)[0]
            if not i.isdigit():
                raise FormatError(f"unexpected key {k} (expected {prefix}.<index>....)")
            idx.add(int(i))
    if idx and idx != set(range(max(idx) + 1)):
        raise FormatError(f"{prefix} blocks are not numbered 0..{max(idx)} (missing {min(set(range(max(idx) + 1)) - idx)})")
    return 1 + max(idx) if idx else 0


def _arg(args, name: str, where: str, prov: dict, fact: str | None = None):
    """A training arg, or main_mar.py's default for a plain state dict of a published size."""
    if args is not None:
        if not hasattr(args, name):
            raise MissingFactError(f"{where}: the training args lack `{name}` (a MAR checkpoint-last.pth states it)")
        prov[fact or name] = f"args.{name}"
        return getattr(args, name)
    prov[fact or name] = f"assumed: main_mar.py default {name}={OFFICIAL_DEFAULTS[name]!r} (no training args)"
    return OFFICIAL_DEFAULTS[name]


def infer_mar_config(state: dict, args=None, num_heads: int | None = None, where: str = "checkpoint") -> DiTConfig:
    prov: dict = {}
    needed = ("z_proj.weight", "decoder_embed.weight", "diffusion_pos_embed_learned", "encoder_pos_embed_learned",
              "class_emb.weight", "diffloss.net.input_proj.weight")
    missing = [k for k in needed if k not in state]
    if missing:
        raise FormatError(f"{where}: a MAR state dict without {missing[0]}")
    D, tok_dim = state["z_proj.weight"].shape
    enc, dec = _depth(state, "encoder_blocks"), _depth(state, "decoder_blocks")
    Dd = state["decoder_embed.weight"].shape[0]
    L = state["diffusion_pos_embed_learned"].shape[1]
    buffer = state["encoder_pos_embed_learned"].shape[1] - L
    classes = state["class_emb.weight"].shape[0]
    hw = state["diffloss.net.input_proj.weight"].shape[0]
    hd = _depth(state, "diffloss.net.res_blocks")
    mlp = state["encoder_blocks.0.mlp.fc1.weight"].shape[0] / D if enc else \
        state["decoder_blocks.0.mlp.fc1.weight"].shape[0] / Dd
    model_name = str(getattr(args, "model", "") or "") if args is not None else ""
    preset = MAR_MODEL_NAMES.get(model_name)
    stated_depths = getattr(args, "ditc_stack_depths", None) if args is not None else None
    source_depths = list(stated_depths) if stated_depths is not None else [enc, dec]
    if args is None:
        preset = next((n for n, a in MAR_ARCHS.items() if a["hidden_size"] == D == Dd and a["depth"] == enc == dec), None)
        if preset is None:
            raise MissingFactError(f"{where}: a MAR state dict without its training args, of no published size (hidden "
                                   f"{D}, {enc} + {dec} blocks): give the checkpoint-last.pth that main_mar.py writes "
                                   "(its `args` state the sizes)")
    if num_heads is not None:
        if D % num_heads:
            raise UsageError(f"`num_heads` {num_heads} does not divide the hidden size {D}")
        heads, prov["num_heads"] = num_heads, "given (--num-heads)"
    elif getattr(args, "ditc_num_heads", None) is not None:
        heads, prov["num_heads"] = int(args.ditc_num_heads), "args.ditc_num_heads (written by ditc)"
    elif preset is not None:
        arch = MAR_ARCHS[preset]
        if arch["hidden_size"] != D:
            raise FormatError(f"{where}: args.model says {model_name} (hidden {arch['hidden_size']}) but the weights "
                              f"have hidden {D}")
        heads = arch["num_heads"]
        prov["num_heads"] = f"preset {preset} (args.model {model_name})" if model_name else \
            f"inferred: published {preset} size (hidden {D}, {enc} + {dec} blocks); --num-heads overrides"
    else:
        said = f" (args.model {model_name!r} is no published preset)" if model_name else ""
        raise MissingFactError(f"{where}: cannot tell the number of attention heads{said}; give `num_heads`")
    p = int(_arg(args, "patch_size", where, prov))
    vae_dim = int(_arg(args, "vae_embed_dim", where, prov, "in_channels"))
    if vae_dim * p * p != tok_dim:
        raise FormatError(f"{where}: vae_embed_dim {vae_dim} x patch {p}^2 is not z_proj's input width {tok_dim}")
    img = int(_arg(args, "img_size", where, prov, "img_size"))
    stride = int(_arg(args, "vae_stride", where, prov))
    side = img // stride // p
    if side * side != L:
        raise FormatError(f"{where}: img_size {img} / vae_stride {stride} / patch {p} makes {side * side} tokens; "
                          f"the position tables hold {L}")
    if args is not None and int(getattr(args, "class_num", classes)) != classes:
        raise FormatError(f"{where}: args.class_num {args.class_num} but the class table has {classes} rows")
    for fact, got in (("buffer_size", buffer), ("diffloss_d", hd), ("diffloss_w", hw)):
        said = getattr(args, fact, None) if args is not None else None
        if said is not None and int(said) != got:
            raise FormatError(f"{where}: args.{fact} {said} but the weights have {got}")
    mar = dict(stack_depths=source_depths, decoder_hidden_size=None if Dd == D else Dd,
               decoder_num_heads=getattr(args, "ditc_decoder_num_heads", None) if args is not None else None,
               buffer_size=buffer, vae_stride=stride, diffloss_d=hd, diffloss_w=hw,
               num_sampling_steps=str(_arg(args, "num_sampling_steps", where, prov)),
               diffusion_batch_mul=int(_arg(args, "diffusion_batch_mul", where, prov)),
               mask_ratio_min=float(_arg(args, "mask_ratio_min", where, prov)),
               attn_dropout=float(_arg(args, "attn_dropout", where, prov)),
               proj_dropout=float(_arg(args, "proj_dropout", where, prov)))
    drop = float(_arg(args, "label_drop_prob", where, prov, "class_dropout_prob"))
    if Dd != D and mar["decoder_num_heads"] is None:
        raise MissingFactError(f"{where}: the decoder is {Dd} wide, the encoder {D}: its heads are not stated "
                               "(args.ditc_decoder_num_heads)")
    kept = getattr(args, "ditc_kept_layers", None) if args is not None else None
    kept = list(kept) if kept is not None else list(range(enc)) + list(range(source_depths[0], source_depths[0] + dec))
    if args is not None and hasattr(args, "ditc_latent_scale"):  # written by ditc: what the tokens are, stated
        scale, vae = args.ditc_latent_scale, getattr(args, "ditc_vae", None)
        prov["latent_scale"] = "args.ditc_latent_scale (written by ditc)"
    else:  # main_mar.py's own: KL-16 latents (16 channels, stride 16) scaled by its 0.2325
        latent = vae_dim == 16 and stride == 16
        scale, vae = (MAR_LATENT_SCALE, "mar-kl16") if latent else (None, None)
    return DiTConfig(family="mar", input_size=side * p, patch_size=p, in_channels=vae_dim, hidden_size=D,
                     depth=enc + dec, num_heads=heads, mlp_ratio=mlp, num_classes=classes, learn_sigma=True,
                     class_dropout_prob=drop, latent_scale=scale, vae=vae, source_depth=sum(source_depths), kept_layers=kept,
                     mar=mar, provenance=prov, name=preset)


def extract_mar_state(obj, use_ema: bool = True) -> tuple[dict, object]:
    """(weights, args) of a MAR checkpoint: ``model_ema`` when present (the official evaluation
    uses the EMA), else ``model``; or a plain state dict."""
    args = obj.get("args")
    if "model" in obj or "model_ema" in obj:
        key = "model_ema" if (use_ema and obj.get("model_ema") is not None) else "model"
        if obj.get(key) is None:
            raise FormatError("MAR training checkpoint holds no 'model' weights")
        state = obj[key]
    else:
        state = obj
    return {k: v for k, v in state.items() if torch.is_tensor(v)}, args


def save_mar_original(model, state: dict, file: Path) -> None:
    """``{"model": weights, "model_ema": weights, "args": Namespace}`` as main_mar.py writes it;
    the args state every size (``model`` the preset name when the source is one) and, for a
    depth-pruned model, the kept blocks per stack (``encoder_depth`` / ``decoder_depth`` to build
    it with the official ``MAR(...)``)."""
    cfg = model.config
    m = cfg.mar
    enc, dec = cfg.stack_split
    preset = next((k for k, v in MAR_MODEL_NAMES.items() if cfg.describe_arch() == v), "")
    args = argparse.Namespace(
        model=preset, img_size=cfg.input_size // cfg.patch_size * cfg.patch_size * m.vae_stride,
        vae_stride=m.vae_stride, patch_size=cfg.patch_size, vae_embed_dim=cfg.in_channels, buffer_size=m.buffer_size,
        diffloss_d=m.diffloss_d, diffloss_w=m.diffloss_w, num_sampling_steps=m.num_sampling_steps,
        diffusion_batch_mul=m.diffusion_batch_mul, mask_ratio_min=m.mask_ratio_min,
        label_drop_prob=cfg.class_dropout_prob, attn_dropout=m.attn_dropout, proj_dropout=m.proj_dropout,
        class_num=cfg.num_classes, encoder_depth=enc, decoder_depth=dec, ditc_num_heads=cfg.num_heads,
        ditc_decoder_num_heads=m.decoder_num_heads, ditc_stack_depths=list(m.stack_depths),
        ditc_kept_layers=list(cfg.kept_layers), ditc_latent_scale=cfg.latent_scale, ditc_vae=cfg.vae)
    torch.save({"model": state, "model_ema": state, "args": args}, file)
