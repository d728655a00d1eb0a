"""Config + state dict -> module, without initialising the weights twice."""

from __future__ import annotations

import hashlib
import json

import torch

from ..config import DiTConfig
from ..errors import FormatError
from .dit import DiT, sincos_2d


def expected_shapes(cfg: DiTConfig) -> dict[str, tuple]:
    """Every key and shape a model of ``cfg`` holds (built on the meta device: nothing allocated)."""
    with torch.device("meta"):
        model = DiT(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def build_model(cfg: DiTConfig, state: dict, dtype: torch.dtype | None = None, source: str = ""):
    """Instantiate without initialising (meta device) and assign the weights, with a clear
    error naming the first missing, unexpected or mis-shaped key."""
    with torch.device("meta"):
        model = DiT(cfg)
    state = dict(state)
    if "pos_embed" not in state:
        grid = int(cfg.num_patches ** 0.5)
        state["pos_embed"] = torch.from_numpy(sincos_2d(cfg.hidden_size, grid)).float().unsqueeze(0)
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
    model.pos_embed.requires_grad_(False)
    for k, v in model.state_dict().items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise FormatError(f"key {k}{where} holds NaN or inf values")
    return model.eval()


def fingerprint(model) -> str:
    """A short identity of a model's weights and config, for records of what produced an
    artefact (eval shards, training state, recipe steps): the config's architecture and
    compression fields, and per tensor its shape, sum, absolute sum and a strided sample of
    its values. Any change of a weight changes the sums; the sample guards the rest."""
    cfg = {k: v for k, v in model.config.to_dict().items() if k not in ("lineage", "provenance", "name")}
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for k, v in sorted(model.state_dict().items()):
            flat = v.detach().reshape(-1)
            stats = torch.stack([flat.double().sum(), flat.double().abs().sum()]) if flat.numel() else torch.zeros(2)
            sample = flat[:: max(1, flat.numel() // 256)][:256].double()
            h.update(f"{k}:{tuple(v.shape)}:{v.dtype}".encode())
            h.update(torch.cat([stats.cpu(), sample.cpu()]).numpy().tobytes())
    return h.hexdigest()[:20]
