"""Config + state dict -> module, without initialising the weights twice."""

from __future__ import annotations

import torch

from ..config import DiTConfig
from ..errors import FormatError
from .family import family_of
from .identity import fingerprint, weights_state  # noqa: F401 - re-exported: the identity of a built model


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
