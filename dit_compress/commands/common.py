"""What every command shares: reading a source (a name, path or an already loaded DiT),
the checked value forms options accept (lists as "1,8" or [1, 8]), the loaded-fact
keywords, and the output guard every writing command runs under."""

from __future__ import annotations

import functools
import inspect
from typing import Sequence

import torch

from .. import checks
from ..assets import EMBEDDED
from ..config import NUMERICS, PREDICTIONS
from ..errors import UsageError
from ..formats import load_model
from ..outputs import claim_output
from ..model import DiT

MAX_SEED = checks.MAX_SEED


def load_facts(*, revision=None, no_ema=False, num_heads=None, prediction=None, numerics=None) -> dict:
    """The facts a user may state for a source, checked."""
    return dict(revision=checks.text("revision", revision, optional=True), no_ema=checks.flag("no_ema", no_ema),
                num_heads=checks.integer("num_heads", num_heads, lo=1, hi=2**15, optional=True),
                prediction=checks.choice("prediction", prediction, PREDICTIONS, optional=True),
                numerics=checks.choice("numerics", numerics, NUMERICS, optional=True))


def load_source(source, *, revision: str | None = None, no_ema: bool = False, num_heads: int | None = None,
                prediction: str | None = None, numerics: str | None = None, what: str = "source") -> DiT:
    """``source`` as a model: a DiT is used as it is, anything else goes through ``load_model``
    with the facts the user supplied for sources that do not state them."""
    source = checks.source(what, source)
    facts = load_facts(revision=revision, no_ema=no_ema, num_heads=num_heads, prediction=prediction, numerics=numerics)
    if isinstance(source, torch.nn.Module) and hasattr(source, "config"):  # a model of any family, loaded or made
        return source
    if not isinstance(source, str):
        raise UsageError(f"`{what}` must be a model name, a path or a loaded model, got a {type(source).__name__}")
    return load_model(source, revision=facts["revision"], use_ema=not facts["no_ema"], num_heads=facts["num_heads"],
                      prediction=facts["prediction"], numerics=facts["numerics"])


def source_name(source) -> str:
    return source.config.name if isinstance(source, torch.nn.Module) else str(source)


def seed(value) -> int:
    return checks.integer("seed", value, lo=0, hi=MAX_SEED)


def parse_ints(value: str | Sequence[int] | int | None, what: str, lo: int | None = None,
               hi: int | None = None) -> list[int] | None:
    """``"1,8"``, ``[1, 8]`` or ``8`` -> [1, 8] / [8]; ``what`` names the option (`` `name` ``)."""
    return checks.int_list(what.strip("`"), value, lo=lo, hi=hi, optional=True)


def parse_names(value: str | Sequence[str] | None, what: str = "names") -> list[str]:
    return checks.name_list(what, value)


def parse_interval(value) -> tuple[float, float] | None:
    """Guidance interval: ``"0,0.7"`` or ``(0, 0.7)``, 0 <= LOW <= HIGH <= 1."""
    if value is None:
        return None
    try:
        parts = value.split(",") if isinstance(value, str) else list(value)
        lo, hi = (float(v) for v in parts)
    except (TypeError, ValueError):
        raise UsageError(f"`guidance_interval` takes LOW,HIGH (e.g. 0,0.7), got {value!r}") from None
    if not (0.0 <= lo <= hi <= 1.0):
        raise UsageError(f"`guidance_interval` needs 0 <= LOW <= HIGH <= 1, got {value!r}")
    return lo, hi


def _paths(value) -> list:
    """The filesystem paths a source argument reads: paths given as text or os.PathLike, and
    the embedded models' own folders when named (so no output replaces them)."""
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in _paths(v)]
    if hasattr(value, "__fspath__"):
        value = str(value)
    if not isinstance(value, str):
        return []
    return [str(EMBEDDED[value]), value] if value in EMBEDDED else [value]


def writes_output(*read_params: str, required: bool = True):
    """Decorate a command whose ``output`` keyword it writes: the output is checked (never
    ``""``, ``.``, the current directory, a source the command reads or a directory holding
    one, a symlink) and claimed (an exclusive lock) for the whole call, before any work."""

    def deco(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                bound = sig.bind(*args, **kwargs)
            except TypeError as e:
                raise UsageError(f"{fn.__name__}: {e}") from None
            out = bound.arguments.get("output")
            if out is None and not required:
                return fn(*args, **kwargs)
            force = checks.flag("force", bound.arguments.get("force", False))
            reads = [p for name in read_params for p in _paths(bound.arguments.get(name))]
            with claim_output(out, force, sources=reads):
                return fn(*args, **kwargs)

        wrapper.reads = read_params  # the options naming what the command reads (recipe steps identify them)
        return wrapper

    return deco
