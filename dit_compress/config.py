"""DiTConfig: architecture + compression spec + lineage, with a lossless JSON round trip."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import FormatError, UsageError

FORMAT_VERSION = 1
NUMERICS = ("original", "diffusers")
PREDICTIONS = ("eps", "velocity")

# Published architectures (DiT paper, Table 1).
ARCHS = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}


@dataclass
class WidthSpec:
    """Timestep-wise dynamic width (DyDiT TDW). Routers live in the weights."""

    target_flops: float = 0.5
    sort_by: str = "magnitude"
    tau: float = 5.0
    init_bias: float = 15.0  # DyDiT: bias 15, xavier weights
    static: bool = False  # constant masks for every t (static width pruning); routers are not trained

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TokenSpec:
    """Spatial dynamic tokens (DyDiT SDT): a router per block before the MLP."""

    tau: float = 5.0
    init_bias: float = 35.0  # DyDiT: bias 35 on the router's last layer
    reduction: int = 16

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class DiTConfig:
    """Everything needed to rebuild a model from its weights.

    ``kept_layers`` lists, for each block of this model, the index of the block of the
    original (uncompressed) model it came from; ``source_depth`` is that model's depth.
    """

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    learn_sigma: bool = True
    class_dropout_prob: float = 0.1
    prediction: str = "eps"  # "eps" (DiT) or "velocity" (SiT flow matching)
    path_type: str = "linear"  # velocity models: SiT's linear interpolant (the only one supported)
    time_input: str = "sit"  # velocity models: network fed t (SiT: t=1 data) or 1 - t (REPA: t=1 noise)
    numerics: str = "original"  # "original" (DiT code: sinusoid /128, LN eps 1e-6) or "diffusers" (/127, pre-MLP eps 1e-5)
    block_embedders: bool = False  # each block owns its timestep/class embedders (DiTs made in diffusers)
    latent_scale: float | None = 0.18215  # None for pixel-space models
    vae: str | None = "stabilityai/sd-vae-ft-ema"
    name: str | None = None
    source_depth: int | None = None
    kept_layers: list[int] | None = None
    width: WidthSpec | None = None
    tokens: TokenSpec | None = None
    lineage: list[dict[str, Any]] = field(default_factory=list)
    provenance: dict[str, str] = field(default_factory=dict)  # where each fact came from, as the loader read it

    def __post_init__(self):
        if self.source_depth is None:
            self.source_depth = self.depth
        if self.kept_layers is None:
            self.kept_layers = list(range(self.depth))
        if isinstance(self.width, dict):
            self.width = WidthSpec(**self.width)
        if isinstance(self.tokens, dict):
            self.tokens = TokenSpec(**self.tokens)
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_patches(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def is_dynamic(self) -> bool:
        return self.width is not None or self.tokens is not None

    def validate(self) -> None:
        if self.num_heads < 1 or self.hidden_size % self.num_heads:
            raise UsageError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.input_size % self.patch_size:
            raise UsageError(
                f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}"
            )
        if len(self.kept_layers) != self.depth:
            raise FormatError(
                f"config lists {len(self.kept_layers)} kept layers for a depth of {self.depth}"
            )
        if self.numerics not in NUMERICS:
            raise UsageError(f"unknown numerics {self.numerics!r}; choose {' or '.join(NUMERICS)}")
        if self.time_input not in ("sit", "repa"):
            raise UsageError(f"unknown time input {self.time_input!r}; choose sit or repa")
        if self.path_type != "linear":
            raise UsageError(f"unsupported path type {self.path_type!r}; only SiT's linear interpolant is supported")
        if self.prediction not in PREDICTIONS:
            raise UsageError(f"unknown prediction type {self.prediction!r}; choose {' or '.join(PREDICTIONS)}")
        if self.width is not None and self.mlp_hidden % self.num_heads:
            raise UsageError(
                f"MLP hidden size {self.mlp_hidden} cannot be split into {self.num_heads} groups"
            )

    def describe_arch(self) -> str:
        for name, arch in ARCHS.items():
            if (
                arch["hidden_size"] == self.hidden_size
                and arch["num_heads"] == self.num_heads
                and arch["depth"] == self.source_depth
            ):
                return f"DiT-{name}/{self.patch_size}"
        return f"DiT(D={self.hidden_size},H={self.num_heads},depth={self.source_depth})/{self.patch_size}"

    # ------------------------------------------------------------------ json
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["format_version"] = FORMAT_VERSION
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "DiTConfig":
        d = dict(d)
        d.pop("format_version", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise FormatError(f"unknown config field(s): {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "DiTConfig":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise FormatError(f"config is not valid JSON: {e}") from None

    def copy(self, **changes) -> "DiTConfig":
        c = copy.deepcopy(self)
        for k, v in changes.items():
            setattr(c, k, v)
        c.validate()
        return c

    def with_step(self, op: str, **params) -> "DiTConfig":
        """A copy with one more entry in the lineage."""
        c = copy.deepcopy(self)
        c.lineage.append({"op": op, **params})
        return c

    @classmethod
    def preset(cls, name: str, **overrides) -> "DiTConfig":
        """``DiT-XL/2``, ``DiT-S/4``, ... with 256 px latents unless overridden."""

        m = re.fullmatch(r"(?:DiT-)?(S|B|L|XL)[/-](2|4|8)", name)
        if not m:
            raise UsageError(
                f"unknown architecture {name!r}; expected e.g. DiT-XL/2, DiT-B/4, DiT-S/8"
            )
        arch = dict(ARCHS[m.group(1)])
        arch.update(patch_size=int(m.group(2)))
        arch.update(overrides)
        arch.setdefault("name", f"DiT-{m.group(1)}/{m.group(2)}")
        return cls(**arch)
