"""``create``, ``convert`` and ``info``: make, re-layout and describe checkpoints."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import torch

from .. import checks
from ..assets import embedded
from ..data.digit_captions import build_text_encoder
from ..config import FAMILIES, MAR_ARCHS, PREDICTIONS, DiTConfig
from ..errors import UsageError
from ..evaluate.describe import describe
from ..formats import FORMATS, parse_dtype, save_model, write_checkpoint
from ..formats.pixart_fmt import config_from_pixart
from ..model import DiT
from ..model.family import family_of
from .common import load_source, seed as check_seed, source_name, writes_output

DIGITS_T5 = "digits-t5"  # the text-to-image testbed's encoder (data/digit_captions.py), built from its seed
CUSTOM_NEEDS = ("input_size", "in_channels", "hidden_size", "depth", "num_heads", "patch_size")


def create(arch: str, *, output: str | Path | None = None, input_size: int | None = None,
           in_channels: int | None = None, hidden_size: int | None = None, depth: int | None = None,
           num_heads: int | None = None, patch_size: int | None = None, num_classes: int | None = None,
           learn_sigma: bool = True, pixel: bool = False, prediction: str = "eps", name: str | None = None,
           label_init_std: float = 0.02, seed: int = 0, family: str = "dit", caption_channels: int | None = None,
           caption_length: int | None = None, text_encoder: str | Path | None = None,
           buffer_size: int | None = None, head: str | None = None, force: bool = False) -> DiT:
    """A freshly initialised network (its family's reference training initialisation): a
    preset (``"DiT-S/2"``, ``"PixArt-XL/2-512"``) or ``"custom"`` with every size given
    (``family="pixart"``: a text-to-image PixArt-α, with ``caption_channels``, the text
    encoder's width, and ``caption_length``, the tokens its tokenizer pads to). Written as a
    ditc checkpoint when ``output`` is given; a PixArt with ``text_encoder`` (a pipeline or
    encoder dir to copy, or ``"digits-t5"``: the text-to-image testbed's word-level T5, built
    from its seed) is written as a whole diffusers PixArtAlphaPipeline dir. ``family="mar"``:
    a masked autoregressive model, ``depth`` blocks split evenly into encoder and decoder, with
    ``buffer_size`` buffer tokens and a diffusion ``head`` "res-blocks,width" (the MAR presets
    state both). The config is checked (types, ranges, a bound on its size) before anything is
    allocated."""
    checks.text("arch", arch)
    family = checks.choice("family", family, FAMILIES)
    learn_sigma, pixel = checks.flag("learn_sigma", learn_sigma), checks.flag("pixel", pixel)
    prediction = checks.choice("prediction", prediction, PREDICTIONS)
    name = checks.text("name", name, optional=True)
    label_init_std = checks.real("label_init_std", label_init_std, lo=0.0)
    seed = check_seed(seed)
    if text_encoder is not None:
        checks.path("text_encoder", text_encoder)
        if output is None:
            raise UsageError("`text_encoder` is written with the model: give `output` (a pipeline dir)")
        if (family if arch == "custom" else DiTConfig.preset(arch).family) != "pixart":
            raise UsageError("`text_encoder` makes a text-to-image pipeline: pick a PixArt preset, or `family` "
                             "pixart for a custom one")
    mar = _mar_fields(family if arch == "custom" else None, arch, depth, buffer_size, head)
    if output is not None:
        return _create_into(arch, output, force, text_encoder, input_size=input_size, in_channels=in_channels,
                            hidden_size=hidden_size, depth=depth, num_heads=num_heads, patch_size=patch_size,
                            num_classes=num_classes, learn_sigma=learn_sigma, pixel=pixel, prediction=prediction,
                            name=name, label_init_std=label_init_std, seed=seed, family=family,
                            caption_channels=caption_channels, caption_length=caption_length,
                            buffer_size=buffer_size, head=head)
    over = {k: v for k, v in dict(input_size=input_size, in_channels=in_channels, hidden_size=hidden_size, depth=depth,
                                   num_heads=num_heads, patch_size=patch_size, num_classes=num_classes).items()
            if v is not None}
    over.update(learn_sigma=learn_sigma, prediction=prediction)
    if pixel:
        over.update(latent_scale=None, vae=None)
    if name:
        over["name"] = name
    if mar:
        over["mar"] = mar
    captions = {k: v for k, v in dict(caption_channels=caption_channels, caption_length=caption_length).items()
                if v is not None}
    if arch == "custom":
        need = [k for k in CUSTOM_NEEDS + (("caption_channels",) if family == "pixart" else ()) if k not in over
                and k not in captions]
        if need:
            raise UsageError(f"custom architecture needs `{need[0]}`")
        cfg = _custom_pixart(over, captions) if family == "pixart" else DiTConfig(**over, **(
            {"family": "mar", "class_dropout_prob": 0.1} if family == "mar" else {}))
    else:
        cfg = DiTConfig.preset(arch, **over, **captions)
    if captions and cfg.family != "pixart":
        raise UsageError(f"`caption_channels` / `caption_length` are for a text-to-image model; {arch} is "
                         "class-conditional (pass `family` pixart)")
    if cfg.family != family and (arch == "custom" or family != "dit"):
        raise UsageError(f"{arch} is a {cfg.family} architecture, not {family}: leave out `family` or pick a "
                         f"{family} preset")
    if cfg.prediction not in family_of(cfg).predictions:
        raise UsageError(f"a {cfg.family} model predicts {' or '.join(family_of(cfg).predictions)}: "
                         f"`prediction` {cfg.prediction} is not supported on it")
    if cfg.learn_sigma not in family_of(cfg).learn_sigma_choices:
        raise UsageError(f"a {cfg.family} model's network always {'learns' if cfg.learn_sigma is False else 'fixes'} "
                         f"its variance: `learn_sigma` {cfg.learn_sigma} is not supported on it")
    cfg.lineage.append({"op": "create", "arch": arch, "seed": seed, "label_init_std": label_init_std})
    check_memory(cfg)
    torch.manual_seed(seed)
    model = family_of(cfg).module(cfg)
    family_of(cfg).initialise(model, label_init_std)
    return model


def _mar_fields(custom_family, arch: str, depth, buffer_size, head) -> dict:
    """The MAR fields ``create`` was given: for a custom MAR every one of them (nothing is
    guessed), for a MAR preset any it overrides; refused on other families."""
    mar_arch = arch in MAR_ARCHS or custom_family == "mar"
    if not mar_arch:
        if buffer_size is not None or head is not None:
            raise UsageError("`buffer_size` and `head` are a MAR's (pass `family` mar, or a MAR preset)")
        return {}
    out = {}
    if head is not None:
        parts = checks.text("head", head).split(",")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise UsageError(f"`head` is the diffusion head's res-blocks,width, e.g. 3,128; got {head!r}"[:200])
        if min(int(parts[0]), int(parts[1])) < 1:
            raise UsageError(f"`head` needs at least one res-block and a width of at least 1, got {head!r}"[:200])
        out.update(diffloss_d=int(parts[0]), diffloss_w=int(parts[1]))
    if buffer_size is not None:
        out["buffer_size"] = checks.integer("buffer_size", buffer_size, lo=1, hi=1 << 16)  # the class rides on them
    if custom_family == "mar":
        for k, opt in (("buffer_size", "buffer_size"), ("diffloss_d", "head")):
            if k not in out:
                raise UsageError(f"custom MAR needs `{opt}`")
        if depth is None or checks.integer("depth", depth, lo=2, hi=1 << 10) % 2:
            raise UsageError(f"custom MAR needs an even `depth` (encoder and decoder halves), got {depth}")
        out["stack_depths"] = [depth // 2, depth // 2]
    elif depth is not None:
        raise UsageError(f"`depth` of {arch} is its preset's (both stacks); use arch custom with family mar for another")
    return out


def _custom_pixart(over: dict, captions: dict) -> DiTConfig:
    """A custom PixArt config read the way a diffusers transformer config is read (one
    reader: the same derived facts as a model diffusers made, e.g. the position base grid)."""
    for k in CUSTOM_NEEDS:
        checks.integer(k, over[k], lo=1, hi=1 << 20)
    checks.integer("caption_channels", captions["caption_channels"], lo=1, hi=1 << 20)
    if over["hidden_size"] % over["num_heads"]:
        raise UsageError(f"`hidden_size` {over['hidden_size']} is not a multiple of `num_heads` {over['num_heads']}")
    d = {"num_attention_heads": over["num_heads"], "attention_head_dim": over["hidden_size"] // over["num_heads"],
         "in_channels": over["in_channels"], "num_layers": over["depth"], "sample_size": over["input_size"],
         "patch_size": over["patch_size"], "caption_channels": captions["caption_channels"],
         "out_channels": over["in_channels"] * (2 if over.get("learn_sigma", True) else 1),
         "use_additional_conditions": False}
    cfg = config_from_pixart(d, "custom PixArt")
    cfg.caption_length = captions.get("caption_length")
    cfg.provenance = {"caption_length": "given (`caption_length`)"} if cfg.caption_length else {}
    if "latent_scale" in over:  # pixel space
        cfg.latent_scale, cfg.vae = None, None
    if "name" in over:
        cfg.name = over["name"]
    cfg.validate()
    return cfg


def check_memory(cfg: DiTConfig, copies: float = 2.0) -> None:
    """Refuse a model whose float32 weights (``copies`` of them: the module and its
    initialisation) would not fit the memory this machine has free, before allocating."""
    import psutil  # heavy: imported on first use

    need = cfg.estimated_params() * 4 * copies
    free = psutil.virtual_memory().available
    if need > free:
        raise UsageError(f"this model needs about {need / 2**30:.1f} GiB for its weights and this machine has "
                         f"{free / 2**30:.1f} GiB free: check the sizes given (`input_size`, `hidden_size`, `depth`, "
                         "`num_classes`)")


@writes_output("text_encoder")
def _create_into(arch, output, force, text_encoder, **kw) -> DiT:
    model = create(arch, **kw)
    if text_encoder is None:
        write_checkpoint(model, output, force=force, report={"created": arch, "params": model.num_params()},
                         title="ditc create")
    else:
        with encoder_source(text_encoder, model) as enc:
            save_model(model, output, format="diffusers", force=force, text_encoder=enc)
    return model


@contextlib.contextmanager
def encoder_source(text_encoder, model):
    """The dir a pipeline's text encoder and tokenizer are copied from: ``text_encoder`` as
    given, or for ``digits-t5`` (refused when a local digits-t5 is there too) the testbed's
    encoder built from its seed into a temporary dir (a text encoder alone: pixel models only)."""
    if not embedded(text_encoder, {DIGITS_T5: DIGITS_T5}):
        yield text_encoder
        return
    if model.config.latent_scale is not None:
        raise UsageError(f"{DIGITS_T5} is a text encoder alone and this PixArt samples latents: its pipeline needs a "
                         "VAE too; give a whole pipeline dir (text_encoder/, tokenizer/, vae/), or `pixel`")
    with tempfile.TemporaryDirectory() as tmp:
        build_text_encoder(tmp)
        yield tmp


@writes_output("source", "text_encoder")
def convert(source, *, output: str | Path, to: str = "ditc", dtype: str | None = None, revision: str | None = None,
            no_ema: bool = False, num_heads: int | None = None, prediction: str | None = None,
            numerics: str | None = None, text_encoder: str | Path | None = None, force: bool = False) -> DiT:
    """Write ``source`` in another layout: ``ditc``, ``diffusers`` (DiTTransformer2DModel,
    PixArtTransformer2DModel; a PixArt with ``text_encoder``, a pipeline or encoder dir, as a
    whole PixArtAlphaPipeline dir) or ``original`` (a single .pt), optionally in fp16/bf16."""
    text_encoder = checks.path("text_encoder", text_encoder, optional=True)
    checks.choice("to", to, FORMATS)
    parse_dtype(dtype)
    model = load_source(source, revision=revision, no_ema=no_ema, num_heads=num_heads, prediction=prediction,
                        numerics=numerics)
    output = Path(output)
    if to == "original" and output.suffix not in (".pt", ".pth"):
        raise UsageError(f"`to` original writes a single .pt file; give an output ending in .pt (got {output})")
    if to == "diffusers" and model.config.family == "mar":
        raise UsageError("diffusers has no MAR model: convert a MAR `to` ditc or original (main_mar.py's layout)")
    name = source_name(source)
    model.config = model.config.with_step("convert", to=to, dtype=dtype or "fp32", source=name)
    with encoder_source(text_encoder, model) if text_encoder is not None else contextlib.nullcontext() as enc:
        save_model(model, output, format=to, dtype=dtype, force=force, text_encoder=enc,
                   report={"op": "convert", "source": name, "to": to, "dtype": dtype or "fp32"})
    return model


def info(source, *, arch: bool = False, sampler: str | None = None, steps: int | None = None,
         timestep_spacing: str | None = None, cfg_scale: float = 1.0, revision: str | None = None,
         no_ema: bool = False, num_heads: int | None = None, prediction: str | None = None,
         numerics: str | None = None) -> dict:
    """Architecture, parameters, FLOPs, compression spec, lineage and provenance; for dynamic
    models the FLOPs they run at inference over ``sampler`` (measured, next to the target).
    ``arch=True`` reads ``source`` as an architecture name (no weights needed)."""
    checks.flag("arch", arch)
    cfg_scale = checks.real("cfg_scale", cfg_scale)
    steps = checks.integer("steps", steps, lo=1, hi=checks.MAX_STEPS, optional=True)
    if arch:
        with torch.device("meta"):
            model = DiT(DiTConfig.preset(str(source)))
    else:
        model = load_source(source, revision=revision, no_ema=no_ema, num_heads=num_heads, prediction=prediction,
                            numerics=numerics)
    return describe(model, sampler, steps, timestep_spacing, cfg_scale)
