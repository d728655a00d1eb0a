"""``create``, ``convert`` and ``info``: make, re-layout and describe checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch

from .. import checks
from ..config import PREDICTIONS, DiTConfig
from ..errors import UsageError
from ..evaluate.describe import describe
from ..formats import FORMATS, parse_dtype, save_model, write_checkpoint
from ..model import DiT
from .common import load_source, seed as check_seed, source_name, writes_output

CUSTOM_NEEDS = ("input_size", "in_channels", "hidden_size", "depth", "num_heads", "patch_size")


def create(arch: str, *, output: str | Path | None = None, input_size: int | None = None,
           in_channels: int | None = None, hidden_size: int | None = None, depth: int | None = None,
           num_heads: int | None = None, patch_size: int | None = None, num_classes: int | None = None,
           learn_sigma: bool = True, pixel: bool = False, prediction: str = "eps", name: str | None = None,
           label_init_std: float = 0.02, seed: int = 0, force: bool = False) -> DiT:
    """A freshly initialised DiT (reference initialisation): a preset (``"DiT-S/2"``) or
    ``"custom"`` with every size given. Written as a ditc checkpoint when ``output`` is given.
    The config is checked (types, ranges, a bound on its size) before anything is allocated."""
    checks.text("arch", arch)
    learn_sigma, pixel = checks.flag("learn_sigma", learn_sigma), checks.flag("pixel", pixel)
    prediction = checks.choice("prediction", prediction, PREDICTIONS)
    name = checks.text("name", name, optional=True)
    label_init_std = checks.real("label_init_std", label_init_std, lo=0.0)
    seed = check_seed(seed)
    if output is not None:
        return _create_into(arch, output, force, input_size=input_size, in_channels=in_channels,
                            hidden_size=hidden_size, depth=depth, num_heads=num_heads, patch_size=patch_size,
                            num_classes=num_classes, learn_sigma=learn_sigma, pixel=pixel, prediction=prediction,
                            name=name, label_init_std=label_init_std, seed=seed)
    over = {k: v for k, v in dict(input_size=input_size, in_channels=in_channels, hidden_size=hidden_size, depth=depth,
                                   num_heads=num_heads, patch_size=patch_size, num_classes=num_classes).items()
            if v is not None}
    over.update(learn_sigma=learn_sigma, prediction=prediction)
    if pixel:
        over.update(latent_scale=None, vae=None)
    if name:
        over["name"] = name
    if arch == "custom":
        need = [k for k in CUSTOM_NEEDS if k not in over]
        if need:
            raise UsageError(f"custom architecture needs `{need[0]}`")
        cfg = DiTConfig(**over)
    else:
        cfg = DiTConfig.preset(arch, **over)
    cfg.lineage.append({"op": "create", "arch": arch, "seed": seed, "label_init_std": label_init_std})
    check_memory(cfg)
    torch.manual_seed(seed)
    model = DiT(cfg)
    torch.nn.init.normal_(model.y_embedder.embedding_table.weight, std=label_init_std)
    return model


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


@writes_output()
def _create_into(arch, output, force, **kw) -> DiT:
    model = create(arch, **kw)
    write_checkpoint(model, output, force=force, report={"created": arch, "params": model.num_params()},
                     title="ditc create")
    return model


@writes_output("source")
def convert(source, *, output: str | Path, to: str = "ditc", dtype: str | None = None, revision: str | None = None,
            no_ema: bool = False, num_heads: int | None = None, prediction: str | None = None,
            numerics: str | None = None, force: bool = False) -> DiT:
    """Write ``source`` in another layout: ``ditc``, ``diffusers`` (DiTTransformer2DModel) or
    ``original`` (a single .pt), optionally in fp16/bf16."""
    checks.choice("to", to, FORMATS)
    parse_dtype(dtype)
    model = load_source(source, revision=revision, no_ema=no_ema, num_heads=num_heads, prediction=prediction,
                        numerics=numerics)
    output = Path(output)
    if to == "original" and output.suffix not in (".pt", ".pth"):
        raise UsageError(f"`to` original writes a single .pt file; give an output ending in .pt (got {output})")
    name = source_name(source)
    model.config = model.config.with_step("convert", to=to, dtype=dtype or "fp32", source=name)
    save_model(model, output, format=to, dtype=dtype, force=force,
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
