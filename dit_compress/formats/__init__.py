"""Detect, load and save every supported checkpoint layout.

Sources: the embedded ``digits-dit``, hub aliases and repo ids, diffusers pipeline or
transformer dirs, original ``.pt`` files, ditc checkpoint dirs or lone safetensors files.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from .. import checks
from ..assets import embedded
from ..config import NUMERICS, PREDICTIONS, DiTConfig
from ..errors import FormatError, UsageError
from ..model.build import build_model, expected_shapes
from ..report import write_report
from . import hub
from ..outputs import atomic_dir, atomic_file
from .diffusers_fmt import load_diffusers, save_diffusers
from .ditc import load_ditc, read_safetensors, save_ditc_into, write_weights
from .original import load_original, save_original

FORMATS = ("ditc", "diffusers", "original")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r}; choose fp32, bf16 or fp16")
    return DTYPES[name]


def own_text_encoder(source) -> Path | None:
    """The text encoder a source carries: a pipeline dir (or embedded pipeline) with
    text_encoder/ and tokenizer/; None for anything else."""
    if not isinstance(source, (str, Path)):
        return None
    where = embedded(source) or Path(source)
    return where if (where / "text_encoder").is_dir() else None


def detect(source: str) -> tuple[str, Path | str]:
    """(kind, location) where kind is ditc | diffusers | original | hub."""

    where = embedded(source)
    if where is not None:
        if (where / "model_index.json").exists() and (where / "transformer").is_dir():
            return "diffusers", where  # a pipeline dir (digits-pixart)
        if not (where / "model.safetensors").exists():
            raise FormatError(f"the embedded {source} weights are missing from the installed package")
        return "ditc", where
    p = Path(source)
    if p.exists():
        if p.is_dir():
            if (p / "model.safetensors").exists():
                return "ditc", p
            if (p / "model_index.json").exists() or (p / "transformer" / "config.json").exists():
                return "diffusers", p
            cfg = p / "config.json"
            if cfg.exists():
                try:
                    d = json.loads(cfg.read_text())
                except json.JSONDecodeError as e:
                    raise FormatError(f"{cfg} is not valid JSON: {e}") from None
                if "_class_name" in d or "num_attention_heads" in d:
                    return "diffusers", p
                return "ditc", p
            raise FormatError(f"{p} is a directory with no checkpoint in it (no model.safetensors, model_index.json or config.json)")
        if p.suffix == ".safetensors":
            return "ditc", p
        if p.suffix in (".pt", ".pth", ".bin", ".ckpt"):
            return "original", p
        raise FormatError(f"{p}: unknown checkpoint file type {p.suffix!r} (expected .safetensors, .pt or .pth)")
    alias = hub.resolve_alias(source)
    if alias:
        return "hub", alias
    if hub.is_repo_id(source) and not source.startswith((".", "/")):
        return "hub", source
    raise hub.unknown_source(source)




def _note(msg: str) -> None:
    """One line on stderr for every fact the loader inferred or assumed (never silent)."""
    if os.environ.get("DITC_QUIET_NOTES") != "1":
        print(f"note: {msg}", file=sys.stderr)


def _apply_overrides(cfg: DiTConfig, where: str, num_heads: int | None, prediction: str | None,
                     numerics: str | None) -> DiTConfig:
    """User-given facts: must agree with what the checkpoint states; numerics may be overridden."""
    if num_heads is not None and num_heads != cfg.num_heads:
        raise UsageError(f"{where} states {cfg.num_heads} attention heads; `num_heads` {num_heads} contradicts it")
    if prediction is not None and prediction != cfg.prediction:
        if not cfg.provenance.get("prediction", "").startswith("assumed"):
            raise UsageError(f"{where} states prediction {cfg.prediction!r}; `prediction` {prediction} contradicts it")
        cfg.prediction = prediction
        cfg.provenance["prediction"] = "given (--prediction)" + ("; SiT time (t = 1 is data), linear path"
                                                                 if prediction == "velocity" else "")
    if numerics is not None:
        if numerics != cfg.numerics:
            cfg.numerics = numerics
        cfg.provenance["numerics"] = "given (--numerics)"
    cfg.validate()
    return cfg


def load_state(source: str, *, revision: str | None = None, use_ema: bool = True, num_heads: int | None = None,
               prediction: str | None = None, numerics: str | None = None) -> tuple[DiTConfig, dict]:
    """(config, state dict in the original key layout) of any source. What the source does not
    state comes from a preset, the checkpoint's args or these keywords, never from a guess;
    every inferred or assumed fact is written to stderr as one ``note:`` line and recorded in
    ``config.provenance`` (shown by ``ditc info``)."""

    checks.text("source", source)
    checks.choice("prediction", prediction, PREDICTIONS, optional=True)
    checks.choice("numerics", numerics, NUMERICS, optional=True)
    checks.integer("num_heads", num_heads, lo=1, hi=2**15, optional=True)
    checks.text("revision", revision, optional=True)
    checks.flag("use_ema", use_ema)
    kind, loc = detect(str(source))
    if kind == "hub":
        cfg, state = load_diffusers(hub.download(loc, revision))
    elif kind == "ditc":
        cfg, state = load_ditc(loc, expect=expected_shapes)
    elif kind == "diffusers":
        cfg, state = load_diffusers(loc)
    else:
        cfg, state = load_original(loc, use_ema=use_ema, num_heads=num_heads, prediction=prediction)
    cfg = _apply_overrides(cfg, str(source), num_heads, prediction, numerics)
    if kind != "ditc":
        for fact, how in cfg.provenance.items():
            if how.startswith(("inferred", "assumed")):
                _note(f"{source}: {fact} = {getattr(cfg, fact, '')!s}: {how}".replace(" = : ", ": "))
    return cfg, state


def load_model(source, *, revision: str | None = None, use_ema: bool = True, dtype=None, device="cpu",
               num_heads: int | None = None, prediction: str | None = None, numerics: str | None = None):
    """Load any supported checkpoint into the ditc DiT module (eval mode, float32 by default).

    ``num_heads``, ``prediction`` (eps | velocity) and ``numerics`` (original | diffusers)
    supply facts a file does not state (``ditc --num-heads`` ...); a ditc checkpoint written
    once records them."""
    if hasattr(source, "__fspath__"):
        source = str(source)
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"`device` must be cpu, cuda or cuda:N, got {device!r}"[:120]) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("`device` is cuda but torch sees no CUDA device here")
    cfg, state = load_state(source, revision=revision, use_ema=use_ema, num_heads=num_heads,
                            prediction=prediction, numerics=numerics)
    return build_model(cfg, state, parse_dtype(dtype), source=str(source)).to(device)


def save_model(model, path, format: str = "ditc", dtype=None, force: bool = False,
               report: dict | None = None, text_encoder=None) -> Path:
    """Write ``model`` atomically as a ditc dir (or lone ``.safetensors``), a diffusers
    layout, or an original ``.pt``. A PixArt in the diffusers layout with ``text_encoder`` (a
    pipeline or encoder dir) is written as a whole pipeline (text encoder, tokenizer, DDIM
    scheduler) that diffusers' PixArtAlphaPipeline loads."""
    if text_encoder is not None and format != "diffusers":
        raise UsageError("`text_encoder` goes with the diffusers format (a pipeline dir)")

    if format not in FORMATS:
        raise UsageError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    dt = parse_dtype(dtype)
    if not (isinstance(model, torch.nn.Module) and hasattr(model, "config")):
        raise UsageError(f"`model` must be a model made or loaded by ditc, got {type(model).__name__} (load it with "
                         "dit_compress.load_model first)")
    path = Path(checks.path("path", path))
    if format in ("original", "diffusers") and getattr(model.config, "cache_schedule", None) is not None:
        raise UsageError(f"this model's learned cache schedule has no place in the {format} layout and would be lost: "
                         "save it as ditc, or convert the model it was learned from (the weights are the same)")
    if format == "original":
        if model.config.is_dynamic:
            raise UsageError("a model with dynamic routers cannot be saved in the original layout; save it as ditc")
        if model.config.block_embedders:
            raise FormatError("the original layout holds one timestep/class embedder and this model has per-block "
                              "embedders (a DiT made in diffusers); save it as ditc or diffusers")
        if model.config.numerics != "original":
            raise FormatError("the original layout implies the original DiT numerics and this model runs with "
                              f"{model.config.numerics}'s; save it as ditc or diffusers")
        with atomic_file(path, force) as tmp:
            save_original(model, tmp, dt)
    elif format == "ditc" and path.suffix == ".safetensors":
        with atomic_file(path, force) as tmp:
            write_weights(model, tmp, dt)
    elif format == "ditc":
        with atomic_dir(path, force) as tmp:
            save_ditc_into(model, tmp, dt, report=report)
    else:
        with atomic_dir(path, force) as tmp:
            save_diffusers(model, tmp, dt, text_encoder=text_encoder)
    return path


__all__ = ["load_model", "save_model", "own_text_encoder", "detect", "build_model", "load_state", "read_safetensors", "atomic_dir"]


def write_checkpoint(model, output, *, force: bool = False, report: dict, title: str, plots=None) -> None:
    """A ditc checkpoint with its report (report.json/.md, and PNGs drawn by ``plots(dir)``),
    written atomically: the output appears complete or not at all."""
    with atomic_dir(Path(output), force) as tmp:
        save_ditc_into(model, tmp, report=report)
        write_report(tmp, report, title)
        if plots is not None:
            plots(tmp)
