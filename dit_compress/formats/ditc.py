"""The ditc checkpoint: ``model.safetensors`` (config JSON in its metadata, so the file
alone is self-describing) + ``config.json`` + ``README.md`` card + ``report.json``."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import DiTConfig
from ..errors import FormatError
from .card import model_card

META_KEY = "ditc_config"
WEIGHTS = "model.safetensors"


def state_for_save(model, dtype: torch.dtype | None = None) -> dict:
    """Detached, contiguous copies of the weights (floating ones in ``dtype`` when given)."""
    out = {}
    for k, v in model.state_dict().items():
        v = v.detach()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v.contiguous().clone()
    return out


def write_weights(model, file: Path, dtype: torch.dtype | None = None) -> None:
    meta = {META_KEY: model.config.to_json(), "format": "pt"}
    save_file(state_for_save(model, dtype), str(file), metadata=meta)


def save_ditc_into(model, out_dir: Path, dtype: torch.dtype | None = None, report: dict | None = None,
                   card: str | None = None) -> None:
    """Write a ditc checkpoint into an existing (temporary) directory."""
    out_dir = Path(out_dir)
    write_weights(model, out_dir / WEIGHTS, dtype)
    (out_dir / "config.json").write_text(model.config.to_json())
    if report is not None:
        (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))

    (out_dir / "README.md").write_text(card or model_card(model, report))


def read_safetensors(file: Path) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file, with a clear error for bad files."""

    file = Path(file)
    try:
        tensors = {}
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
        return tensors, meta
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for bad files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FormatError(f"{file} is not a readable safetensors file (truncated or corrupt?): {msg}") from None


def load_ditc(path: Path) -> tuple[DiTConfig, dict]:
    path = Path(path)
    file = path / WEIGHTS if path.is_dir() else path
    if not file.exists():
        raise FormatError(f"{path} has no {WEIGHTS}")
    tensors, meta = read_safetensors(file)
    if META_KEY in meta:
        cfg = DiTConfig.from_json(meta[META_KEY])
    elif path.is_dir() and (path / "config.json").exists():
        cfg = DiTConfig.from_json((path / "config.json").read_text())
    else:
        raise FormatError(f"{file} carries no ditc config (neither in its metadata nor a config.json beside it)")
    return cfg, tensors
