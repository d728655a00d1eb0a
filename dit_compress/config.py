"""DiTConfig: architecture + compression spec + lineage, with a lossless JSON round trip."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any

from . import checks
from .errors import FormatError, UsageError

FORMAT_VERSION = 1
NUMERICS = ("original", "diffusers")
PREDICTIONS = ("eps", "velocity")
SORTS = ("magnitude", "taylor", "none")
FAMILIES = ("dit", "pixart", "mar")  # model/family.py holds what each one is
# Sizes a config may state, checked before anything is allocated: far above any published
# DiT (XL/2 at 1024 px: 4,096 tokens, hidden 1152, 28 layers, 675M parameters), far below
# what would exhaust a machine by a typo or a tampered file.
MAX_TOKENS = 2**16
MAX_HIDDEN = 2**15
MAX_DEPTH = 1024
MAX_CHANNELS = 4096
MAX_CLASSES = 10**7
MAX_PARAMS = 10**11

# Published architectures (DiT paper, Table 1).
ARCHS = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}


def _pixart(sample: int, additional: bool) -> dict:
    return dict(family="pixart", depth=28, hidden_size=1152, num_heads=16, patch_size=2, input_size=sample,
                in_channels=4, num_classes=1, learn_sigma=True, caption_channels=4096, caption_length=120,
                additional_conditions=additional, interpolation_scale=float(max(sample // 64, 1)),
                pos_base_size=sample // 2, class_dropout_prob=0.1)


# diffusers' transformer/config.json of PixArt-alpha/PixArt-XL-2-{256x256,512x512,1024-MS}
PIXART_PRESETS = {"PixArt-XL/2-256": _pixart(32, False), "PixArt-XL/2-512": _pixart(64, False),
                  "PixArt-XL/2-1024": _pixart(128, True)}


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

    def validate(self) -> None:
        checks.real("target_flops", self.target_flops, lo=0.0, hi=1.0, lo_open=True)
        checks.choice("sort_by", self.sort_by, SORTS)
        checks.real("tau", self.tau, lo=0.0, lo_open=True)
        checks.real("init_bias", self.init_bias)
        checks.flag("static", self.static)


@dataclass
class TokenSpec:
    """Spatial dynamic tokens (DyDiT SDT): a router per block before the MLP."""

    tau: float = 5.0
    init_bias: float = 35.0  # DyDiT: bias 35 on the router's last layer
    reduction: int = 16
    target_flops: float | None = None  # token routers alone: the FLOPs target (with width routers: the width's)
    # inference capacity per block: the share of tokens each block's MLP takes (top-k by router
    # score, k = round(share * tokens)), static shapes and no host sync; None: the exact per-sample
    # counts (the routers' expected count, a data-dependent shape read back to the host)
    capacity: list[float] | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        checks.real("tau", self.tau, lo=0.0, lo_open=True)
        checks.real("init_bias", self.init_bias)
        checks.integer("reduction", self.reduction, lo=1, hi=MAX_HIDDEN)
        checks.real("target_flops", self.target_flops, lo=0.0, hi=1.0, lo_open=True, optional=True)
        if self.capacity is not None:
            if not isinstance(self.capacity, (list, tuple)) or not self.capacity:
                raise UsageError(f"token `capacity` must be a list of shares in (0, 1], one per block, got {self.capacity!r}"[:200])
            self.capacity = [checks.real("capacity", c, lo=0.0, hi=1.0, lo_open=True) for c in self.capacity]


# MAR (LTH14/mar models/mar.py): mar_base / mar_large / mar_huge, encoder and decoder alike
MAR_ARCHS = {"MAR-B": dict(hidden_size=768, depth=12, num_heads=12), "MAR-L": dict(hidden_size=1024, depth=16, num_heads=16),
             "MAR-H": dict(hidden_size=1280, depth=20, num_heads=16)}
MAR_MODEL_NAMES = {"mar_base": "MAR-B", "mar_large": "MAR-L", "mar_huge": "MAR-H"}
# the head (DiffLoss MLP) each size is evaluated with in the MAR paper (README: depth / width)
MAR_HEADS = {"MAR-B": (6, 1024), "MAR-L": (8, 1280), "MAR-H": (12, 1536)}


@dataclass
class MARSpec:
    """What a MAR (masked autoregressive model with a per-token diffusion head) adds to the
    shared fields: ``hidden_size`` / ``num_heads`` are the encoder's, ``depth`` counts both
    stacks, ``kept_layers`` index the source's encoder blocks (0..E-1) then its decoder blocks
    (E..E+D-1); ``stack_depths`` = [E, D] of the source."""

    stack_depths: list[int] = field(default_factory=lambda: [16, 16])
    decoder_hidden_size: int | None = None  # None: the encoder's
    decoder_num_heads: int | None = None
    buffer_size: int = 64
    vae_stride: int = 16
    diffloss_d: int = 3
    diffloss_w: int = 1024
    num_sampling_steps: str = "100"
    diffusion_batch_mul: int = 4
    mask_ratio_min: float = 0.7
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self, hidden: int) -> None:
        sd = self.stack_depths
        if not isinstance(sd, list) or len(sd) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in sd):
            raise UsageError(f"`mar.stack_depths` must be [encoder depth, decoder depth], got {sd!r}"[:200])
        for name, v in zip(("encoder", "decoder"), sd):
            checks.integer(f"mar.stack_depths ({name})", v, lo=0, hi=MAX_DEPTH)
        dh = checks.integer("mar.decoder_hidden_size", self.decoder_hidden_size, lo=1, hi=MAX_HIDDEN, optional=True)
        dn = checks.integer("mar.decoder_num_heads", self.decoder_num_heads, lo=1, hi=MAX_HIDDEN, optional=True)
        if (dh or hidden) % (dn or 1):
            raise UsageError(f"decoder hidden size {dh or hidden} is not divisible by decoder_num_heads {dn}")
        checks.integer("mar.buffer_size", self.buffer_size, lo=1, hi=MAX_TOKENS)  # the class embedding rides on them
        checks.integer("mar.vae_stride", self.vae_stride, lo=1, hi=1024)
        checks.integer("mar.diffloss_d", self.diffloss_d, lo=1, hi=MAX_DEPTH)
        checks.integer("mar.diffloss_w", self.diffloss_w, lo=1, hi=MAX_HIDDEN)
        self.num_sampling_steps = str(checks.text("mar.num_sampling_steps", str(self.num_sampling_steps)))
        if not self.num_sampling_steps.isdigit() or not 1 <= int(self.num_sampling_steps) <= 1000:
            raise UsageError(f"`mar.num_sampling_steps` must be a step count in 1..1000 (the head's respacing), "
                             f"got {self.num_sampling_steps!r}"[:200])
        checks.integer("mar.diffusion_batch_mul", self.diffusion_batch_mul, lo=1, hi=1024)
        checks.real("mar.mask_ratio_min", self.mask_ratio_min, lo=0.0, hi=1.0, hi_open=True)
        checks.real("mar.attn_dropout", self.attn_dropout, lo=0.0, hi=1.0, hi_open=True)
        checks.real("mar.proj_dropout", self.proj_dropout, lo=0.0, hi=1.0, hi_open=True)


def _spec(kind, value, what: str):
    """A width/token spec from its JSON form, unknown fields refused."""
    if value is None or isinstance(value, kind):
        return value
    if not isinstance(value, dict):
        raise UsageError(f"`{what}` must be an object, got {value!r}"[:200])
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise UsageError(f"`{what}` has unknown field(s): {', '.join(map(str, unknown))}")
    return kind(**value)


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
    # the network family; "pixart" (text-to-image, adaLN-single + cross-attention) adds:
    family: str = "dit"
    caption_channels: int | None = None  # the text encoder's feature width (T5-XXL: 4096)
    caption_length: int | None = None  # tokens the pipeline's tokenizer pads to (PixArt-α 120, Σ 300), when stated
    additional_conditions: bool = False  # resolution + aspect-ratio conditions (the 1024 px models)
    interpolation_scale: float | None = None  # positions / interpolation_scale (diffusers: sample_size // 64)
    pos_base_size: int | None = None  # the grid the positions are scaled to (diffusers: sample_size // patch)
    # a learned feature-cache schedule (Learning-to-Cache, ditc learn-cache): the sampler it was
    # learned for ({"sampler", "steps", "spacing"}) and "skip" [steps][depth]: whether block i reuses
    # its residual of the step before at step n
    cache_schedule: dict | None = None
    mar: MARSpec | None = None  # family "mar": the encoder/decoder split and the diffusion head

    def __post_init__(self):
        if self.source_depth is None:  # the least depth the kept layers can have come from
            kept = self.kept_layers if isinstance(self.kept_layers, list) and self.kept_layers else None
            ints = kept is not None and all(isinstance(k, int) and not isinstance(k, bool) for k in kept)
            self.source_depth = max(self.depth, max(kept) + 1) if ints and isinstance(self.depth, int) else self.depth
        if self.kept_layers is None and isinstance(self.depth, int) and not isinstance(self.depth, bool) \
                and 0 < self.depth <= MAX_DEPTH:
            self.kept_layers = list(range(self.depth))
        self.width = _spec(WidthSpec, self.width, "width")
        self.tokens = _spec(TokenSpec, self.tokens, "tokens")
        self.mar = _spec(MARSpec, self.mar, "mar")
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

    @property
    def flops_target(self) -> float | None:
        """The block FLOPs ratio the routers train toward: the token routers' own target when
        given, else the width routers'; None for static models (and token routers without one)."""
        if self.tokens is not None and self.tokens.target_flops is not None:
            return self.tokens.target_flops
        return self.width.target_flops if self.width is not None else None

    def validate(self) -> None:
        """Every field typed and in range, sizes bounded, before any module is built from it."""
        c = checks
        c.integer("input_size", self.input_size, lo=1, hi=MAX_TOKENS)
        c.integer("patch_size", self.patch_size, lo=1, hi=self.input_size)
        c.integer("in_channels", self.in_channels, lo=1, hi=MAX_CHANNELS)
        c.integer("hidden_size", self.hidden_size, lo=1, hi=MAX_HIDDEN)
        c.integer("depth", self.depth, lo=1, hi=MAX_DEPTH)
        c.integer("num_heads", self.num_heads, lo=1, hi=self.hidden_size)
        c.real("mlp_ratio", self.mlp_ratio, lo=0.0, hi=64.0, lo_open=True)
        c.integer("num_classes", self.num_classes, lo=1, hi=MAX_CLASSES)
        c.flag("learn_sigma", self.learn_sigma)
        c.real("class_dropout_prob", self.class_dropout_prob, lo=0.0, hi=1.0, hi_open=True)
        c.choice("prediction", self.prediction, PREDICTIONS)
        c.choice("numerics", self.numerics, NUMERICS)
        c.choice("time_input", self.time_input, ("sit", "repa"))
        if self.path_type != "linear":
            raise UsageError(f"unsupported path type {self.path_type!r}; only SiT's linear interpolant is supported")
        c.flag("block_embedders", self.block_embedders)
        c.real("latent_scale", self.latent_scale, lo=0.0, lo_open=True, optional=True)
        c.text("vae", self.vae, optional=True)
        c.text("name", self.name, optional=True, empty=True)
        c.integer("source_depth", self.source_depth, lo=self.depth, hi=MAX_DEPTH)
        if self.hidden_size % self.num_heads:
            raise UsageError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.input_size % self.patch_size:
            raise UsageError(
                f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}"
            )
        if self.num_patches > MAX_TOKENS:
            raise UsageError(f"input_size {self.input_size} with patch_size {self.patch_size} makes {self.num_patches:,} "
                             f"tokens, more than the {MAX_TOKENS:,} this toolkit accepts")
        if self.mlp_hidden < 1:
            raise UsageError(f"mlp_ratio {self.mlp_ratio} leaves no MLP hidden channel at hidden size {self.hidden_size}")
        if self.estimated_params() > MAX_PARAMS:
            raise UsageError(f"this config describes about {self.estimated_params():.3g} parameters, more than the "
                             f"{MAX_PARAMS:.0e} this toolkit accepts")
        kept = self.kept_layers
        if not isinstance(kept, list) or any(isinstance(k, bool) or not isinstance(k, int) for k in kept):
            raise UsageError(f"`kept_layers` must be a list of layer indices, got {kept!r}"[:200])
        if len(kept) != self.depth:
            raise FormatError(
                f"config lists {len(kept)} kept layers for a depth of {self.depth}"
            )
        if any(k < 0 or k >= self.source_depth for k in kept) or any(a >= b for a, b in zip(kept, kept[1:])):
            raise UsageError(f"`kept_layers` must be increasing indices in 0..{self.source_depth - 1} "
                             f"(the source's layers), got {kept}"[:200])
        if self.width is not None:
            self.width.validate()
        if self.cache_schedule is not None:
            self._check_cache_schedule()
        if self.tokens is not None:
            self.tokens.validate()
            if self.tokens.capacity is not None and len(self.tokens.capacity) != self.depth:
                raise UsageError(f"token `capacity` lists {len(self.tokens.capacity)} shares for {self.depth} blocks")
        if self.width is not None and self.mlp_hidden % self.num_heads:
            raise UsageError(
                f"MLP hidden size {self.mlp_hidden} cannot be split into {self.num_heads} groups"
            )
        c.choice("family", self.family, FAMILIES)
        if self.family == "pixart":
            c.integer("caption_channels", self.caption_channels, lo=1, hi=MAX_HIDDEN)
            c.integer("caption_length", self.caption_length, lo=1, hi=MAX_TOKENS, optional=True)
            c.flag("additional_conditions", self.additional_conditions)
            c.real("interpolation_scale", self.interpolation_scale, lo=0.0, lo_open=True, optional=True)
            c.integer("pos_base_size", self.pos_base_size, lo=1, hi=MAX_TOKENS, optional=True)
            if self.additional_conditions and self.hidden_size % 3:
                raise UsageError(f"resolution/aspect-ratio conditions need a hidden size divisible by 3, got {self.hidden_size}")
        elif (self.caption_channels, self.caption_length, self.interpolation_scale, self.pos_base_size) != (None,) * 4 \
                or self.additional_conditions:
            raise UsageError("caption and PixArt fields are set on a class-conditional DiT config")
        if self.family == "mar":
            if self.mar is None:
                raise UsageError("a MAR config needs its `mar` fields (stack depths, buffer, diffusion head)")
            self.mar.validate(self.hidden_size)
            if sum(self.mar.stack_depths) != self.source_depth:
                raise UsageError(f"MAR stack depths {self.mar.stack_depths} do not add up to the source depth "
                                 f"{self.source_depth}")
            if self.width is not None or self.tokens is not None or self.cache_schedule is not None:
                raise UsageError("dynamic width, token routing and cache schedules are not defined for MAR models")
            if self.prediction != "eps":
                raise UsageError(f"a MAR's diffusion head predicts eps, not {self.prediction!r}")
        elif self.mar is not None:
            raise UsageError("MAR fields are set on a config of family " + str(self.family))
        if not isinstance(self.lineage, list) or not all(isinstance(s, dict) for s in self.lineage):
            raise UsageError("`lineage` must be a list of objects")
        if not isinstance(self.provenance, dict):
            raise UsageError("`provenance` must be an object")

    @property
    def stack_split(self) -> list[int]:
        """Blocks of this model in each stack (MAR: [encoder, decoder]; other families: [depth])."""
        if self.family != "mar":
            return [self.depth]
        enc = self.mar.stack_depths[0]
        n_enc = sum(1 for k in self.kept_layers if k < enc)
        return [n_enc, self.depth - n_enc]

    @property
    def stack_widths(self) -> list[int]:
        """The width of each stack's block outputs (MAR: [encoder, decoder]; others: [hidden_size])."""
        if self.family != "mar":
            return [self.hidden_size]
        return [self.hidden_size, self.mar.decoder_hidden_size or self.hidden_size]

    def estimated_params(self) -> float:
        """Parameters this config describes (analytic, nothing allocated)."""
        D, L = float(self.hidden_size), float(self.depth)
        if self.family == "mar":
            m = self.mar
            Dd = float(m.decoder_hidden_size or self.hidden_size)
            e, d = self.stack_split if isinstance(self.kept_layers, list) and len(self.kept_layers) == self.depth \
                else m.stack_depths
            tok = (self.input_size // self.patch_size) ** 2 + m.buffer_size
            blocks = e * (4 * D * D + 2 * D * self.mlp_hidden) + d * (4 + 2 * self.mlp_ratio) * Dd * Dd
            head = m.diffloss_d * 5 * m.diffloss_w ** 2 + (Dd + 256) * m.diffloss_w
            return blocks + head + tok * (D + 2 * Dd) + (self.num_classes + 1) * D
        if self.family == "pixart":
            block = 8 * D * D + 2 * D * self.mlp_hidden + 6 * D
            return L * block + (self.caption_channels or 0) * D + 8 * D * D + self.in_channels * self.patch_size ** 2 * D
        block = 4 * D * D + 2 * D * self.mlp_hidden + 6 * D * D
        emb = (self.num_classes + 1) * D * (L + 1 if self.block_embedders else 1)
        return L * block + emb + self.num_patches * D + self.in_channels * self.patch_size ** 2 * D

    def describe_arch(self) -> str:
        if self.family == "mar":
            for name, arch in MAR_ARCHS.items():
                if (arch["hidden_size"], arch["num_heads"], [arch["depth"]] * 2) == \
                        (self.hidden_size, self.num_heads, self.stack_split):
                    return name
            return f"MAR(D={self.hidden_size},H={self.num_heads},depth={'+'.join(map(str, self.stack_split))})"
        family = "PixArt" if self.family == "pixart" else "DiT"
        for name, arch in ARCHS.items():
            if (
                arch["hidden_size"] == self.hidden_size
                and arch["num_heads"] == self.num_heads
                and arch["depth"] == self.source_depth
            ):
                return f"{family}-{name}/{self.patch_size}"
        return f"{family}(D={self.hidden_size},H={self.num_heads},depth={self.source_depth})/{self.patch_size}"

    def _check_cache_schedule(self) -> None:
        cs = self.cache_schedule
        if not isinstance(cs, dict) or set(cs) != {"sampler", "steps", "spacing", "skip"}:
            raise UsageError("`cache_schedule` must be {sampler, steps, spacing, skip}")
        checks.text("cache_schedule.sampler", cs["sampler"])
        steps = checks.integer("cache_schedule.steps", cs["steps"], lo=1, hi=checks.MAX_STEPS)
        checks.text("cache_schedule.spacing", cs["spacing"], optional=True)
        skip = cs["skip"]
        if (not isinstance(skip, list) or len(skip) != steps
                or any(not isinstance(r, list) or len(r) != self.depth or any(not isinstance(v, bool) for v in r)
                       for r in skip)):
            raise UsageError(f"`cache_schedule.skip` must be {steps} rows of {self.depth} true/false values (one per block)")
        if any(skip[0]):
            raise UsageError("`cache_schedule.skip`: the first step has nothing to reuse")

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
        version = d.pop("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION or isinstance(version, bool):
            raise FormatError(f"config format_version {version!r}: this ditc reads version {FORMAT_VERSION} (a newer "
                              "ditc wrote it, or the file was edited)")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known, key=str)
        if unknown:
            raise FormatError(f"unknown config field(s): {', '.join(map(str, unknown))}")
        try:
            return cls(**d)
        except UsageError as e:  # a stated fact out of type or range: the file is wrong, not the user
            raise FormatError(f"config: {str(e).replace('`', '')}") from None

    @classmethod
    def from_json(cls, text: str) -> "DiTConfig":
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise FormatError(f"config is not valid JSON: {str(e)[:200]}") from None
        if not isinstance(d, dict):
            raise FormatError(f"config is not a JSON object (found {type(d).__name__})")
        return cls.from_dict(d)

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
        """``DiT-XL/2``, ``DiT-S/4``, ... with 256 px latents unless overridden; ``PixArt-XL/2-512``
        (and -256, -1024) with PixArt-α's published transformer config (T5-XXL captions of 120
        tokens; the 1024 px model with resolution/aspect-ratio conditions)."""
        if isinstance(name, str) and name in MAR_ARCHS:
            return cls(**mar_preset(name, **overrides))
        if isinstance(name, str) and name in PIXART_PRESETS:
            arch = dict(PIXART_PRESETS[name])
            arch.update(overrides)
            arch.setdefault("name", name)
            return cls(**arch)

        m = re.fullmatch(r"(?:DiT-)?(S|B|L|XL)[/-](2|4|8)", name) if isinstance(name, str) else None
        if not m:
            raise UsageError(
                f"unknown architecture {name!r}; expected e.g. DiT-XL/2, DiT-B/4, DiT-S/8, PixArt-XL/2-512, MAR-L"
            )
        arch = dict(ARCHS[m.group(1)])
        arch.update(patch_size=int(m.group(2)))
        arch.update(overrides)
        arch.setdefault("name", f"DiT-{m.group(1)}/{m.group(2)}")
        return cls(**arch)


def mar_preset(name: str, **overrides) -> dict:
    """The fields of a published MAR (256 px ImageNet, KL-16 latents: 16 x 16 tokens of 16
    channels, 64 buffer tokens, the head the paper evaluates that size with), overrides on top
    (a ``mar`` dict merges into the MAR fields)."""
    arch = MAR_ARCHS[name]
    hd, hw = MAR_HEADS[name]
    mar = dict(stack_depths=[arch["depth"]] * 2, diffloss_d=hd, diffloss_w=hw)
    mar.update(overrides.pop("mar", None) or {})
    d = dict(family="mar", input_size=16, patch_size=1, in_channels=16, hidden_size=arch["hidden_size"],
             depth=sum(mar["stack_depths"]), num_heads=arch["num_heads"], mlp_ratio=4.0, num_classes=1000,
             learn_sigma=True, class_dropout_prob=0.1, latent_scale=0.2325, vae="mar-kl16", name=name, mar=mar)
    d.update(overrides)
    return d
