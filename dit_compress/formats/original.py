"""The original DiT/SiT layout: ``.pt`` files holding a plain state dict or a training
checkpoint ``{"model", "ema", "opt", "args"}``, read without executing pickled code."""

from __future__ import annotations

import argparse
import math
import pickle
from pathlib import Path

import torch

from ..config import ARCHS, DiTConfig
from ..errors import FormatError

DEFAULT_HEADS = {a["hidden_size"]: a["num_heads"] for a in ARCHS.values()}


def safe_torch_load(file: Path):
    """``torch.load(weights_only=True)`` allowing only argparse.Namespace besides tensors."""
    file = Path(file)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        detail = next((line for line in first if "GLOBAL" in line or "Unsupported" in line), first[0] if first else "")
        raise FormatError(f"{file}: refused to unpickle a non-tensor object, nothing was executed ({detail.strip()})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FormatError(f"{file} is not a readable PyTorch checkpoint (truncated or corrupt?): {msg}") from None


def extract_state(obj, use_ema: bool = True) -> tuple[dict, object]:
    """(state dict, training args or None) from whatever the .pt held."""
    if not isinstance(obj, dict):
        raise FormatError(f"expected a state dict or a training checkpoint, found {type(obj).__name__}")
    args = obj.get("args")
    if "model" in obj or "ema" in obj:
        key = "ema" if (use_ema and "ema" in obj) else "model"
        if key not in obj:
            raise FormatError("training checkpoint has no 'model' weights (try without --no-ema)")
        state = obj[key]
    else:
        state = obj
    if "x_embedder.proj.weight" not in state:
        first = next(iter(state), "<empty>")
        raise FormatError(f"not an original-layout DiT state dict (no x_embedder.proj.weight; first key {first})")
    return {k: v for k, v in state.items() if torch.is_tensor(v)}, args


def infer_config(state: dict, args=None, num_heads: int | None = None) -> DiTConfig:
    w = state["x_embedder.proj.weight"]
    hidden, in_ch, patch = w.shape[0], w.shape[1], w.shape[2]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    out = state["final_layer.linear.weight"].shape[0] // (patch * patch)
    if "pos_embed" in state:
        n = state["pos_embed"].shape[1]
    elif args is not None and getattr(args, "image_size", None):
        n = (args.image_size // 8 // patch) ** 2
    else:
        raise FormatError("cannot tell the input size: no pos_embed in the state dict")
    grid = int(round(math.sqrt(n)))
    if num_heads is None:
        model_name = getattr(args, "model", "") if args is not None else ""
        for name, arch in ARCHS.items():
            if str(model_name).startswith(f"DiT-{name}/") or str(model_name).startswith(f"SiT-{name}/"):
                num_heads = arch["num_heads"]
        num_heads = num_heads or DEFAULT_HEADS.get(hidden, max(1, hidden // 64))
    rows = state["y_embedder.embedding_table.weight"].shape[0]
    prediction = "velocity" if args is not None and hasattr(args, "path_type") else "eps"
    mlp_hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    latent = in_ch == 4
    return DiTConfig(
        input_size=grid * patch, patch_size=patch, in_channels=in_ch, hidden_size=hidden, depth=depth,
        num_heads=num_heads, mlp_ratio=mlp_hidden / hidden, num_classes=rows - 1, learn_sigma=out == 2 * in_ch,
        prediction=prediction, latent_scale=0.18215 if latent else None,
        vae="stabilityai/sd-vae-ft-ema" if latent else None,
    )


def load_original(file: Path, use_ema: bool = True, num_heads: int | None = None) -> tuple[DiTConfig, dict]:
    state, args = extract_state(safe_torch_load(file), use_ema)
    cfg = infer_config(state, args, num_heads)
    cfg.name = Path(file).stem
    return cfg, state


def save_original(model, file: Path, dtype: torch.dtype | None = None) -> None:
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().clone()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        state[k] = v
    torch.save(state, file)
