"""The original DiT/SiT layout: ``.pt`` files holding a plain state dict or a training
checkpoint ``{"model", "ema", "opt", "args"}``, read without executing pickled code."""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import torch

from ..config import ARCHS, DiTConfig
from ..errors import FormatError, MissingFactError, UsageError
from ..torchfiles import safe_torch_load  # noqa: F401  (also this module's name for it)
from .ditc import state_for_save
from .mar_fmt import extract_mar_state, infer_mar_config, is_mar_state, save_mar_original

TRAINING_ONLY = ("projectors",)  # REPA: projector heads used only by its alignment loss


def extract_state(obj, use_ema: bool = True) -> tuple[dict, object]:
    """(state dict, training args or None) from whatever the .pt held."""
    if not isinstance(obj, dict):
        raise FormatError(f"expected a state dict or a training checkpoint, found {type(obj).__name__}")
    args = obj.get("args")
    if "model" in obj or "ema" in obj:
        key = "ema" if (use_ema and "ema" in obj) else "model"
        if key not in obj:
            raise FormatError("training checkpoint has no 'model' weights (try without `no_ema`)")
        state = obj[key]
    else:
        state = obj
    if any(k.startswith(("t_block.", "y_embedder.y_proj.")) or ".cross_attn." in k for k in state):
        raise FormatError("an original PixArt checkpoint (PixArt-alpha's own .pth layout): not read directly, since "
                          "its learned null caption and key/value layout do not map one to one; convert it with "
                          "diffusers' scripts/convert_pixart_alpha_to_diffusers.py and give ditc the diffusers folder")
    if "x_embedder.proj.weight" not in state:
        first = next(iter(state), "<empty>")
        raise FormatError(f"not an original-layout DiT state dict (no x_embedder.proj.weight; first key {first})")
    return {k: v for k, v in state.items() if torch.is_tensor(v)}, args


PRESET_RE = re.compile(r"^(DiT|SiT)-(S|B|L|XL)/(2|4|8)$")
HEADS_BY_HIDDEN = {a["hidden_size"]: (name, a["num_heads"]) for name, a in ARCHS.items()}


def _heads(hidden: int, args, num_heads: int | None, where: str) -> tuple[int, str]:
    """Heads from the user, the checkpoint's ``args.model`` preset, or the published size
    whose hidden width this is; otherwise a one-line error naming ``--num-heads``."""
    if num_heads is not None:
        if num_heads < 1 or hidden % num_heads:
            raise UsageError(f"`num_heads` {num_heads} does not divide the hidden size {hidden}")
        return num_heads, "given (--num-heads)"
    stated = getattr(args, "ditc_num_heads", None) if args is not None else None
    if stated is not None:
        if isinstance(stated, bool) or not isinstance(stated, int) or stated < 1 or hidden % stated:
            raise FormatError(f"{where}: args.ditc_num_heads {stated!r} does not divide the hidden size {hidden}")
        return stated, "args.ditc_num_heads (written by ditc)"
    model_name = str(getattr(args, "model", "") or "") if args is not None else ""
    m = PRESET_RE.match(model_name)
    if m:
        arch = ARCHS[m.group(2)]
        if arch["hidden_size"] != hidden:
            raise FormatError(f"{where}: args.model says {model_name} (hidden {arch['hidden_size']}) but the weights "
                              f"have hidden {hidden}; give `num_heads`")
        return arch["num_heads"], f"preset {model_name} (args.model)"
    if hidden in HEADS_BY_HIDDEN:
        name, heads = HEADS_BY_HIDDEN[hidden]
        return heads, f"inferred: published DiT-{name} width (hidden {hidden}); --num-heads overrides"
    said = f" (args.model {model_name!r} is no published preset)" if model_name else ""
    raise MissingFactError(f"{where}: cannot tell the number of attention heads (hidden {hidden} is no published DiT "
                      f"size){said}; give `num_heads`")


REPA_ARGS = ("enc_type", "encoder_depth", "proj_coeff", "projector_embed_dims")


def _prediction(args, prediction: str | None, where: str, repa_keys: bool) -> tuple[str, str, str]:
    """(prediction, time input, provenance). SiT/REPA training args state the objective
    (REPA: t = 1 is noise, SiT: t = 1 is data); a plain state dict does not."""
    path = getattr(args, "path_type", None) if args is not None else None
    repa = repa_keys or (args is not None and any(hasattr(args, k) for k in REPA_ARGS))
    stated_time = getattr(args, "ditc_time_input", None) if args is not None else None
    if stated_time is not None:
        if stated_time not in ("sit", "repa"):
            raise FormatError(f"{where}: args.ditc_time_input {stated_time!r} is neither sit nor repa")
        repa = stated_time == "repa"
    if path is not None:
        if str(path).lower() != "linear":
            raise FormatError(f"{where}: path type {path!r} is not supported (only the linear interpolant)")
        pred = str(getattr(args, "prediction", "velocity")).lower()
        if pred not in ("velocity", "v"):
            raise FormatError(f"{where}: prediction {pred!r} is not supported for flow models (only velocity)")
        if prediction not in (None, "velocity"):
            raise UsageError(f"{where}: the checkpoint's args state a velocity (SiT) model; `prediction` {prediction} contradicts it")
        who = "REPA (t = 1 is noise)" if repa else "SiT (t = 1 is data)"
        return "velocity", "repa" if repa else "sit", f"args: linear path, velocity, {who}"
    if args is not None:
        if prediction not in (None, "eps"):
            raise UsageError(f"{where}: the checkpoint's args are a DiT's (no path_type); `prediction` {prediction} contradicts it")
        return "eps", "sit", "args (DiT training args, no path_type)"
    if repa_keys:
        if prediction not in (None, "velocity"):
            raise UsageError(f"{where}: REPA projector heads mark a velocity model; `prediction` {prediction} contradicts it")
        return "velocity", "repa", "inferred: REPA projector heads (velocity, linear path, t = 1 is noise)"
    if prediction == "velocity":
        return "velocity", "sit", "given (--prediction); SiT time (t = 1 is data), linear path"
    if prediction is not None:
        return prediction, "sit", "given (--prediction)"
    return "eps", "sit", "assumed: a plain original-layout state dict is an eps DiT; --prediction velocity for SiT"


def infer_config(state: dict, args=None, num_heads: int | None = None, prediction: str | None = None,
                 where: str = "checkpoint", repa_keys: bool = False) -> DiTConfig:
    w = state["x_embedder.proj.weight"]
    hidden, in_ch, patch = w.shape[0], w.shape[1], w.shape[2]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    out = state["final_layer.linear.weight"].shape[0] // (patch * patch)
    prov = {}
    image_size = getattr(args, "image_size", None) or getattr(args, "resolution", None) if args is not None else None
    if "pos_embed" in state:
        n = state["pos_embed"].shape[1]
        prov["input_size"] = "pos_embed (tokens)"
    elif image_size and in_ch == 4:
        n = (int(image_size) // 8 // patch) ** 2
        prov["input_size"] = f"args image size {image_size} / 8 (VAE)"
    else:
        raise MissingFactError(f"{where}: cannot tell the input size (no pos_embed in the state dict and no image size in its args)")
    grid = int(round(math.sqrt(n)))
    if grid * grid != n:
        raise FormatError(f"{where}: pos_embed holds {n} tokens, not a square grid")
    heads, prov["num_heads"] = _heads(hidden, args, num_heads, where)
    pred, time_input, prov["prediction"] = _prediction(args, prediction, where, repa_keys)
    rows = state["y_embedder.embedding_table.weight"].shape[0]
    n_cls = getattr(args, "num_classes", None) if args is not None else None
    if n_cls is not None and int(n_cls) + 1 != rows:
        raise FormatError(f"{where}: args.num_classes is {n_cls} but the class table has {rows} rows "
                          "(expected num_classes + 1 with the null class)")
    prov["num_classes"] = "class table rows - 1 (last row: null class)"
    mlp_hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    latent = in_ch == 4
    vae = None
    if latent:
        kind = getattr(args, "vae", None) if args is not None else None
        if kind in ("ema", "mse"):
            vae, prov["vae"] = f"stabilityai/sd-vae-ft-{kind}", "args.vae"
        else:
            vae, prov["vae"] = "stabilityai/sd-vae-ft-ema", "assumed: 4-channel latents of sd-vae-ft-ema (DiT's); eval --vae overrides"
    prov["numerics"] = "original layout: the DiT reference numerics"
    return DiTConfig(
        input_size=grid * patch, patch_size=patch, in_channels=in_ch, hidden_size=hidden, depth=depth,
        num_heads=heads, mlp_ratio=mlp_hidden / hidden, num_classes=rows - 1, learn_sigma=out == 2 * in_ch,
        prediction=pred, time_input=time_input, latent_scale=0.18215 if latent else None, vae=vae, provenance=prov,
    )


def _is_mar(obj) -> bool:
    if not isinstance(obj, dict):
        return False
    inner = [obj.get(k) for k in ("model_ema", "model") if isinstance(obj.get(k), dict)]
    return any(is_mar_state(s) for s in [obj, *inner])


def load_original(file: Path, use_ema: bool = True, num_heads: int | None = None,
                  prediction: str | None = None) -> tuple[DiTConfig, dict]:
    obj = safe_torch_load(file)
    if _is_mar(obj):
        if prediction is not None:
            raise UsageError(f"{file}: a MAR checkpoint (its head predicts eps by construction); `prediction` does not apply")
        state, args = extract_mar_state(obj, use_ema)
        cfg = infer_mar_config(state, args, num_heads, where=str(file))
        cfg.name = cfg.name or Path(file).stem
        return cfg, state
    state, args = extract_state(obj, use_ema)
    skipped = sorted({k.split(".")[0] for k in state if k.split(".")[0] in TRAINING_ONLY})
    state = {k: v for k, v in state.items() if k.split(".")[0] not in TRAINING_ONLY}
    cfg = infer_config(state, args, num_heads, prediction, where=str(file), repa_keys=bool(skipped))
    if skipped:
        cfg.provenance["skipped"] = f"{', '.join(skipped)} (REPA projector heads: training loss only)"
    cfg.name = Path(file).stem
    return cfg, state


def plain_state_says_all(cfg: DiTConfig) -> bool:
    """Whether a plain state dict (DiT's released files) states every fact of this model: an eps
    model of a published width (heads follow from it) with SiT/DiT time."""
    published = HEADS_BY_HIDDEN.get(cfg.hidden_size, (None, None))[1] == cfg.num_heads
    return cfg.prediction == "eps" and published and cfg.time_input == "sit"


def save_original(model, file: Path, dtype: torch.dtype | None = None) -> None:
    """A plain state dict when that states every fact (a DiT of a published size); otherwise a
    training-checkpoint layout ``{"ema": weights, "args": Namespace(...)}`` as DiT/SiT's
    train.py writes (and their ``find_model`` reads), whose args state what the weights do
    not: ``model`` (a published preset name when it is one), SiT's ``path_type`` and
    ``prediction`` for velocity models, ``image_size``, ``num_classes``, and two fields of this
    toolkit, ``ditc_num_heads`` and ``ditc_time_input`` (REPA's t = 1 is noise), so the file
    reloads with no options."""
    cfg = model.config
    state = state_for_save(model, dtype)
    if cfg.family == "mar":
        save_mar_original(model, state, file)
        return
    if plain_state_says_all(cfg):
        torch.save(state, file)
        return
    name, heads = HEADS_BY_HIDDEN.get(cfg.hidden_size, (None, None))
    family = "SiT" if cfg.prediction == "velocity" else "DiT"
    preset = f"{family}-{name}/{cfg.patch_size}" if name and heads == cfg.num_heads and cfg.patch_size in (2, 4, 8) else ""
    args = argparse.Namespace(model=preset, num_classes=cfg.num_classes, ditc_num_heads=cfg.num_heads,
                              ditc_time_input=cfg.time_input)
    if cfg.latent_scale is not None:
        args.image_size = cfg.input_size * 8
    if cfg.prediction == "velocity":
        args.path_type, args.prediction = "Linear", "velocity"
    torch.save({"ema": state, "args": args}, file)

