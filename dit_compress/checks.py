"""The one validation layer for values that cross the boundary (CLI options, recipe args,
config JSON, public function keywords): typed, range-checked, finite, checked before
anything is allocated or written. Every failure is a ``UsageError`` whose message names the
parameter as `` `name` `` (the CLI shows it as the command's flag).

    steps = checks.integer("steps", steps, lo=1, hi=MAX_STEPS)
    lr = checks.real("lr", lr, lo=0, lo_open=True)
    sampler = checks.choice("sampler", sampler, SAMPLERS, optional=True)
"""

from __future__ import annotations

import math
import numbers
from typing import Iterable, Sequence

from .errors import UsageError

MAX_STEPS = 10**9  # optimizer / sampler steps: far above any real run, far below "forever"
MAX_COUNT = 10**8  # samples, calibration examples, repeats
MAX_BATCH = 2**20
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed's range


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _range(lo, hi, lo_open=False, hi_open=False) -> str:
    lo = f"{lo:g}" if isinstance(lo, float) else lo
    hi = f"{hi:g}" if isinstance(hi, float) else hi
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi}"
    return ""


def integer(name: str, value, *, lo: int | None = None, hi: int | None = None, optional: bool = False) -> int | None:
    """An int (not a bool, not a float, not text) within [lo, hi]."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise UsageError(f"`{name}` must be an integer{(' ' + _range(lo, hi)) if (lo, hi) != (None, None) else ''}, "
                         f"got {_show(value)}")
    value = int(value)
    if lo is not None and value < lo:
        raise UsageError(f"`{name}` must be at least {lo}, got {value}")
    if hi is not None and value > hi:
        raise UsageError(f"`{name}` must be at most {hi}, got {value}")
    return value


def real(name: str, value, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
         hi_open: bool = False, optional: bool = False) -> float | None:
    """A finite number (int or float, not a bool, not text) within the bounds."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UsageError(f"`{name}` must be a number, got {_show(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise UsageError(f"`{name}` must be a finite number, got {value}")
    if ((lo is not None and (value < lo or (lo_open and value == lo)))
            or (hi is not None and (value > hi or (hi_open and value == hi)))):
        raise UsageError(f"`{name}` must be {_range(lo, hi, lo_open, hi_open)}, got {value:.10g}")
    return value


def flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise UsageError(f"`{name}` must be true or false, got {_show(value)}")
    return value


def text(name: str, value, *, optional: bool = False, empty: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise UsageError(f"`{name}` must be text, got {_show(value)}")
    if not empty and not value.strip():
        raise UsageError(f"`{name}` is empty")
    return value


def choice(name: str, value, options: Iterable[str], *, optional: bool = False) -> str | None:
    options = tuple(options)
    if value is None and optional:
        return None
    if not isinstance(value, str) or value not in options:
        raise UsageError(f"unknown `{name}` {_show(value)}; choose one of {', '.join(options)}")
    return value


def source(name: str, value) -> object:
    """A model source: a name or path (text or os.PathLike), or a module already in memory."""
    if hasattr(value, "config") and hasattr(value, "forward"):
        return value
    if hasattr(value, "__fspath__"):
        value = str(value)
    if not isinstance(value, str):
        raise UsageError(f"`{name}` must be a model name, a path or a loaded model, got {_show(value)}")
    if not value.strip():
        raise UsageError(f"`{name}` is empty: give a model name or a path")
    return value


def path(name: str, value, *, optional: bool = False) -> str | None:
    """A filesystem path given as text or os.PathLike."""
    if value is None and optional:
        return None
    if hasattr(value, "__fspath__"):
        value = str(value)
    if not isinstance(value, str):
        raise UsageError(f"`{name}` must be a path, got {_show(value)}")
    if not value.strip():
        raise UsageError(f"`{name}` is empty: give a path")
    return value


def int_list(name: str, value, *, lo: int | None = None, hi: int | None = None, optional: bool = False,
             nonempty: bool = True) -> list[int] | None:
    """``"1,8"``, ``[1, 8]`` or ``8`` -> [1, 8] / [8], each an integer within [lo, hi]."""
    if value is None and optional:
        return None
    if isinstance(value, str):
        parts = [s.strip() for s in value.split(",")]
        if any(p == "" for p in parts) and value.strip():
            raise UsageError(f"`{name}` must be a comma-separated list of integers, got {_show(value)}")
        parts = [p for p in parts if p]
        try:
            items = [int(p) for p in parts]
        except ValueError:
            raise UsageError(f"`{name}` must be a comma-separated list of integers, got {_show(value)}") from None
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        items = [int(value)]
    elif isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        items = [integer(f"{name}", v) for v in value]
    else:
        raise UsageError(f"`{name}` must be a list of integers, got {_show(value)}")
    if nonempty and not items:
        raise UsageError(f"`{name}` lists nothing: give at least one integer")
    for v in items:
        integer(name, v, lo=lo, hi=hi)
    return items


def name_list(name: str, value, *, optional: bool = True) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` -> ["a", "b"] (blank items dropped)."""
    if value is None:
        if optional:
            return []
        raise UsageError(f"`{name}` lists nothing")
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        items = list(value)
    else:
        raise UsageError(f"`{name}` must be a comma-separated list, got {_show(value)}")
    out = []
    for v in items:
        if not isinstance(v, str):
            raise UsageError(f"`{name}` must list names, got {_show(v)}")
        if v.strip():
            out.append(v.strip())
    return out


def has_values(t) -> bool:
    """False for tensors whose values do not exist on the host (fake or meta tensors, as the
    device tests use): checks of tensor values (finite, labels in range) skip those."""
    return not (t.is_meta or type(t).__name__ == "FakeTensor")


# The bounds of options several commands share, by name: what `ditc run` checks in every step
# of a recipe before the first one runs (each command checks its own again when it runs).
OPTION_BOUNDS = {
    "num_samples": (int, 1, MAX_COUNT), "batch_size": (int, 1, MAX_BATCH), "shard_size": (int, 1, MAX_COUNT),
    "steps": (int, 1, MAX_STEPS), "seed": (int, 0, MAX_SEED), "calib_samples": (int, 1, MAX_COUNT),
    "num_candidates": (int, 1, MAX_COUNT), "repeats": (int, 1, 10**6), "warmup": (int, 0, 10**6),
    "ckpt_every": (int, 0, MAX_STEPS), "flops_hold": (int, 0, MAX_STEPS), "flops_decay": (int, 1, MAX_STEPS),
    "full_model_steps": (int, 0, MAX_STEPS), "grad_accum": (int, 1, 10**6), "kid_subset_size": (int, 1, MAX_COUNT),
    "lora_rank": (int, 1, 2**15), "lora_alpha": (int, 1, 2**20), "t_strata": (int, 0, 1000),
    "threads": (int, 1, 4096), "max_length": (int, 1, 4096), "image_size": (int, 8, 8192),
    "num_heads": (int, 1, 2**15), "reduction": (int, 1, 2**15), "cfg_channels": (int, 1, 4096),
    "cfg_scale": (float, 0.0, None), "ema": (float, 0.0, 1.0, "hi_open"), "logit_ema": (float, 0.0, 1.0, "hi_open"),
    "lr": (float, 0.0, None, "lo_open"), "logit_lr": (float, 0.0, None, "lo_open"), "weight_decay": (float, 0.0, None),
    "grad_clip": (float, 0.0, None), "tau": (float, 0.0, None, "lo_open"), "tau_start": (float, 0.0, None, "lo_open"),
    "tau_end": (float, 0.0, None, "lo_open"), "k_sigma": (float, 0.0, None, "lo_open"), "kd_out": (float, 0.0, None),
    "kd_plain": (float, 0.0, None), "kd_rep": (float, 0.0, None), "full_model_loss": (float, 0.0, None),
    "target_flops": (float, 0.0, 1.0, "lo_open"), "token_capacity": (float, 0.0, 1.0, "lo_open"),
}


def option(name: str, value):
    """``value`` checked against ``OPTION_BOUNDS[name]`` (None, and options not listed, pass)."""
    rule = OPTION_BOUNDS.get(name)
    if rule is None or value is None:
        return value
    kind, lo, hi, *flags = rule
    if kind is int:
        return integer(name, value, lo=lo, hi=hi)
    return real(name, value, lo=lo, hi=hi, lo_open="lo_open" in flags, hi_open="hi_open" in flags)
