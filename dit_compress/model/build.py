"""Config + state dict -> module, without initialising the weights twice."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import torch

from ..config import DiTConfig
from ..errors import FormatError
from .family import family_of


def expected_shapes(cfg: DiTConfig) -> dict[str, tuple]:
    """Every key and shape a model of ``cfg`` holds (built on the meta device: nothing allocated)."""
    with torch.device("meta"):
        model = family_of(cfg).module(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def build_model(cfg: DiTConfig, state: dict, dtype: torch.dtype | None = None, source: str = ""):
    """Instantiate without initialising (meta device) and assign the weights, with a clear
    error naming the first missing, unexpected or mis-shaped key."""
    family = family_of(cfg)
    with torch.device("meta"):
        model = family.module(cfg)
    state = family.complete_state(cfg, dict(state))
    expected = model.state_dict()
    where = f" in {source}" if source else ""
    for k, v in expected.items():
        if k not in state:
            raise FormatError(f"missing key {k}{where}")
        if tuple(state[k].shape) != tuple(v.shape):
            raise FormatError(f"key {k}{where} has shape {tuple(state[k].shape)}, the config expects {tuple(v.shape)}")
    extra = [k for k in state if k not in expected]
    if extra:
        raise FormatError(f"unexpected key {extra[0]}{where} (does the config match the weights?)")
    target = dtype or torch.float32
    state = {k: (v.to(target) if v.is_floating_point() else v) for k, v in state.items()}
    model.load_state_dict(state, assign=True, strict=True)
    family.after_load(model)
    for k, v in model.state_dict().items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise FormatError(f"key {k}{where} holds NaN or inf values")
    return model.eval()


def fingerprint(model) -> str:
    """A short identity of a model's weights and config, for records of what produced an
    artefact (eval shards, training state, recipe steps): the config's architecture and
    compression fields, and per tensor its shape, sum, absolute sum and a strided sample of
    its values. Any change of a weight changes the sums; the sample guards the rest."""
    defaults = {f.name: f.default for f in dataclasses.fields(type(model.config))}
    cfg = {k: v for k, v in model.config.to_dict().items()  # fields at their default are left out, so a field
           if k not in ("lineage", "provenance", "name") and v != defaults.get(k, object())}  # added later keeps ids
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for k, v in sorted(model.state_dict().items()):
            flat = v.detach().reshape(-1)
            stats = torch.stack([flat.double().sum(), flat.double().abs().sum()]) if flat.numel() else torch.zeros(2)
            sample = flat[:: max(1, flat.numel() // 256)][:256].double()
            h.update(f"{k}:{tuple(v.shape)}:{v.dtype}".encode())
            h.update(torch.cat([stats.cpu(), sample.cpu()]).numpy().tobytes())
    return h.hexdigest()[:20]
