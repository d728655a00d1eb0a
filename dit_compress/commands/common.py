"""What every command shares: reading a source (a name, path or an already loaded DiT),
the value forms options accept (lists as "1,8" or [1, 8]), and the loaded-fact keywords."""

from __future__ import annotations

from typing import Sequence

from ..errors import UsageError
from ..formats import load_model
from ..model import DiT


def load_source(source, *, revision: str | None = None, no_ema: bool = False, num_heads: int | None = None,
                prediction: str | None = None, numerics: str | None = None) -> DiT:
    """``source`` as a model: a DiT is used as it is, anything else goes through ``load_model``
    with the facts the user supplied for sources that do not state them."""
    if isinstance(source, DiT):
        return source
    return load_model(str(source), revision=revision, use_ema=not no_ema, num_heads=num_heads, prediction=prediction,
                      numerics=numerics)


def source_name(source) -> str:
    return source.config.name if isinstance(source, DiT) else str(source)


def parse_ints(value: str | Sequence[int] | int | None, what: str) -> list[int] | None:
    """``"1,8"``, ``[1, 8]`` or ``8`` -> [1, 8] / [8]; ``what`` names the option in errors."""
    if value is None:
        return None
    if isinstance(value, int):
        return [value]
    if not isinstance(value, str):
        return [int(v) for v in value]
    try:
        return [int(s) for s in value.split(",") if s.strip() != ""]
    except ValueError:
        raise UsageError(f"{what} must be a comma-separated list of integers, got {value!r}") from None


def parse_names(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [s.strip() for s in items if str(s).strip()]


def parse_interval(value) -> tuple[float, float] | None:
    """Guidance interval: ``"0,0.7"`` or ``(0, 0.7)``, 0 <= LOW <= HIGH <= 1."""
    if value is None:
        return None
    try:
        lo, hi = (float(v) for v in (value.split(",") if isinstance(value, str) else value))
    except (TypeError, ValueError):
        raise UsageError(f"`guidance_interval` takes LOW,HIGH (e.g. 0,0.7), got {value!r}") from None
    if not (0.0 <= lo <= hi <= 1.0):
        raise UsageError(f"`guidance_interval` needs 0 <= LOW <= HIGH <= 1, got {value!r}")
    return lo, hi
