"""The ditc checkpoint: ``model.safetensors`` (config JSON in its metadata, so the file
alone is self-describing) + ``config.json`` + ``README.md`` card + ``report.json``."""

from __future__ import annotations

import json
import struct
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
        v = v.detach().to("cpu")
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


def _bad_file(file: Path, e: Exception) -> FormatError:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return FormatError(f"{file} is not a readable safetensors file (truncated or corrupt?): {msg[:200]}")


def read_safetensors(file: Path, expect=None) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file, with a clear error for bad files.
    ``expect(metadata) -> {key: shape}`` (optional) states the keys and shapes the file must
    hold; they are checked against the header before any tensor is read, so a file that
    declares other (e.g. huge) tensors is refused without mapping them."""

    file = Path(file)
    if expect is not None:
        shapes, meta = read_header(file)
        wanted = expect(meta)
        if wanted is not None:
            _check_header(file, shapes, wanted)
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return tensors, meta
    except FormatError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for bad files
        raise _bad_file(file, e) from None


MAX_HEADER = 100 * 2**20


def read_header(file: Path) -> tuple[dict, dict]:
    """({key: shape}, metadata) from a safetensors header, read without mapping the file; the
    declared tensors must fit the file's size."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than a safetensors header")
            n = struct.unpack("<Q", raw)[0]
            if n > min(MAX_HEADER, size - 8):
                raise ValueError(f"header length {n} does not fit the file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
        meta = header.pop("__metadata__", None) or {}
        shapes, end = {}, 0
        for k, v in header.items():
            shapes[k] = tuple(int(d) for d in v["shape"])
            end = max(end, int(v["data_offsets"][1]))
        if 8 + n + end != size:
            raise ValueError(f"its tensors need {8 + n + end} bytes and the file holds {size}")
        if not isinstance(meta, dict) or not all(isinstance(x, str) for x in meta.values()):
            raise ValueError("metadata is not a string mapping")
        return shapes, meta
    except (OSError, ValueError, KeyError, TypeError, IndexError, RecursionError) as e:
        raise _bad_file(file, e) from None


def _check_header(file: Path, shapes: dict, expected: dict) -> None:
    for k, shape in shapes.items():
        if k in expected and shape != tuple(expected[k]):
            raise FormatError(f"key {k} in {file} has shape {shape}, the config expects {tuple(expected[k])}")
    extra = [k for k in shapes if k not in expected]
    if extra:
        raise FormatError(f"unexpected key {extra[0]} in {file} (does the config match the weights?)")
    missing = [k for k in expected if k not in shapes and k != "pos_embed"]
    if missing:
        raise FormatError(f"missing key {missing[0]} in {file}")


def _config_of(file: Path, meta: dict, beside: Path | None) -> DiTConfig:
    """The config a ditc checkpoint states: its safetensors metadata, which must agree with
    the config.json beside it when both are there (a disagreement is refused, naming a field)."""
    if META_KEY not in meta:
        if beside is not None and beside.exists():
            return DiTConfig.from_json(beside.read_text())
        raise FormatError(f"{file} carries no ditc config (neither in its metadata nor a config.json beside it)")
    cfg = DiTConfig.from_json(meta[META_KEY])
    if beside is not None and beside.exists():
        try:
            side = json.loads(beside.read_text())
        except ValueError as e:
            raise FormatError(f"{beside} is not valid JSON: {str(e)[:200]}") from None
        mine = json.loads(meta[META_KEY])
        if not isinstance(side, dict):
            raise FormatError(f"{beside} is not a JSON object")
        diff = next((k for k in sorted(set(mine) | set(side), key=str) if mine.get(k) != side.get(k)), None)
        if diff is not None:
            raise FormatError(f"{beside} disagrees with the config in {file.name}'s metadata on {diff!r} "
                              f"({side.get(diff)!r} vs {mine.get(diff)!r}): the metadata is what ditc reads; restore "
                              f"config.json or write a new checkpoint with ditc convert")
    return cfg


def load_ditc(path: Path, expect=None) -> tuple[DiTConfig, dict]:
    """(config, state) of a ditc dir or lone file. ``expect(config) -> {key: shape}`` checks
    the file's header against the config before its tensors are read."""
    path = Path(path)
    file = path / WEIGHTS if path.is_dir() else path
    if not file.exists():
        raise FormatError(f"{path} has no {WEIGHTS}")
    beside = path / "config.json" if path.is_dir() else None
    holder = {}

    def shapes(meta):
        holder["cfg"] = _config_of(file, meta, beside)
        return expect(holder["cfg"]) if expect is not None else None

    tensors, meta = read_safetensors(file, expect=shapes)
    return holder["cfg"], tensors
