"""``prune_depth``, ``add_dynamic_width``, ``add_token_router``: model in, smaller or routed
model out, written with its report."""

from __future__ import annotations

import shutil
from pathlib import Path

from .. import checks
from ..compress import depth as depth_mod
from ..compress import dynamic
from ..data.datasets import load_data
from ..errors import UsageError
from ..evaluate.describe import describe, plot_width_profile
from ..formats import write_checkpoint
from ..model.build import fingerprint
from ..model.family import require
from ..outputs import is_main_process, work_dir_for
from ..model import DiT
from .common import load_source, parse_ints, seed as check_seed, source_name, writes_output

INFLUENCE_INPUTS = ("clean", "noisy")
MEASURE_COST_UP_TO = 50_000_000  # parameters: the learned search times itself by default up to this size
SUMMARY_KEYS = ("method", "groups", "kept_layers", "depth_after", "params_before", "params_after", "gflops_before",
                "gflops_after", "calib_loss_chosen", "confidence", "seconds", "search_cost")


@writes_output("source", "data")
def prune_depth(source, *, output: str | Path, pattern: str | None = None, groups: str | None = None,
                method: str = "learned", keep: str | list[int] | None = None, data: str | None = None,
                steps: int = 500, batch_size: int = 64, lr: float = 1e-4, logit_lr: float = 1e-3,
                tau_start: float = 4.0, tau_end: float = 0.1, logit_scale: float = 100.0, logit_ema: float = 0.999,
                recover: str = "lora", lora_rank: int = 8, lora_alpha: int = 16, keep_recovery_weights: bool = False,
                calib_samples: int = 128, num_candidates: int = 16, influence_input: str = "clean",
                measure_cost: bool | None = None, seed: int = 0, ckpt_every: int = 0, resume: bool = False,
                force: bool = False, revision: str | None = None, no_ema: bool = False, num_heads: int | None = None,
                prediction: str | None = None, numerics: str | None = None) -> tuple[DiT, dict]:
    """Remove layers: TinyFusion's learned N:M selection (Gumbel masks + LoRA recoverability)
    or a baseline (block-influence, uniform, oracle with ``keep``, random, min-loss). Writes a
    smaller standard DiT holding the kept layers' original weights. Returns (model, report)."""
    c, big = checks, checks.MAX_STEPS
    output = Path(output)
    c.choice("method", method, depth_mod.METHODS)
    c.text("pattern", pattern, optional=True)
    c.text("groups", groups, optional=True)
    c.choice("influence_input", influence_input, INFLUENCE_INPUTS)
    c.choice("recover", recover, depth_mod.RECOVERIES)
    c.text("data", data, optional=True)
    keep_list = parse_ints(keep, "keep", lo=0)
    steps, batch_size = c.integer("steps", steps, lo=1, hi=big), c.integer("batch_size", batch_size, lo=1, hi=c.MAX_BATCH)
    lr, logit_lr = c.real("lr", lr, lo=0.0, lo_open=True), c.real("logit_lr", logit_lr, lo=0.0, lo_open=True)
    tau_start = c.real("tau_start", tau_start, lo=0.0, lo_open=True)
    tau_end = c.real("tau_end", tau_end, lo=0.0, lo_open=True)
    logit_scale = c.real("logit_scale", logit_scale, lo=0.0, lo_open=True)
    logit_ema = c.real("logit_ema", logit_ema, lo=0.0, hi=1.0, hi_open=True)
    lora_rank, lora_alpha = c.integer("lora_rank", lora_rank, lo=1, hi=2**15), c.integer("lora_alpha", lora_alpha, lo=1, hi=2**20)
    calib_samples = c.integer("calib_samples", calib_samples, lo=1, hi=c.MAX_COUNT)
    num_candidates = c.integer("num_candidates", num_candidates, lo=1, hi=c.MAX_COUNT)
    ckpt_every, seed = c.integer("ckpt_every", ckpt_every, lo=0, hi=big), check_seed(seed)
    keep_recovery_weights, resume = c.flag("keep_recovery_weights", keep_recovery_weights), c.flag("resume", resume)
    measure_cost = None if measure_cost is None else c.flag("measure_cost", measure_cost)
    model = load_source(source, revision=revision, no_ema=no_ema, num_heads=num_heads, prediction=prediction,
                        numerics=numerics)
    if measure_cost is None:  # two model copies and an extra step: seconds on a testbed, minutes and ~20 GB at XL
        measure_cost = model.num_params() <= MEASURE_COST_UP_TO
    grp = depth_mod.parse_groups(model.config.depth, pattern, groups, model.config.stack_split) if (pattern or groups) else None
    if data is not None or method not in ("uniform", "oracle", "random"):
        require(model, "training")
    ds = load_data(data, cfg=model.config) if data is not None else None
    lc = depth_mod.LearnedConfig(steps=steps, batch_size=batch_size, lr=lr, logit_lr=logit_lr, tau_start=tau_start,
                                 tau_end=tau_end, logit_scale=logit_scale, logit_ema=logit_ema, recover=recover,
                                 lora_rank=lora_rank, lora_alpha=lora_alpha, seed=seed, ckpt_every=ckpt_every)
    work = work_dir_for(output)
    if method == "learned" and not resume and (work / "train_state").exists():
        raise UsageError(f"{work} holds an interrupted search: pass `resume` to continue it, or delete it")
    producer = {"op": "prune-depth", "source": fingerprint(model), "data": data, "groups": grp, "search": lc.__dict__}
    pruned, report = depth_mod.prune_depth(model, method, grp, keep_list, ds, lc, work, resume, calib_samples,
                                           num_candidates, keep_recovery_weights, measure_cost,
                                           influence_input == "noisy", producer=producer)
    if not is_main_process():  # under accelerate launch every process searched; the first one writes
        return None, None
    report["source"] = source_name(source)
    write_checkpoint(pruned, output, force=force, report=report, title="ditc prune-depth",
                     plots=lambda d: depth_mod.plot_decisions(report, d / "decisions.png"))
    shutil.rmtree(work, ignore_errors=True)
    return pruned, report


def _write_routed(model: DiT, source, op: str, output: Path, force: bool) -> tuple[DiT, dict]:
    """A routed model with its report (describe + the width profile PNG). Token routers that
    were just added route a share their bias states: nothing is sampled to report it."""
    report = describe(model, fresh_tokens=op == "add-token-router")
    report.update(op=op, source=source_name(source))

    def plots(out_dir):
        if model.config.width is not None:
            plot_width_profile(model, out_dir / "width_profile.png")

    write_checkpoint(model, output, force=force, report=report, title=f"ditc {op}", plots=plots)
    return model, report


@writes_output("source", "data")
def add_dynamic_width(source, *, output: str | Path, target_flops: float = 0.5, sort_by: str = "magnitude",
                      data: str | None = None, tau: float = 5.0, init_bias: float = 15.0, static: bool = False,
                      seed: int = 0, force: bool = False, revision: str | None = None, no_ema: bool = False,
                      num_heads: int | None = None, prediction: str | None = None,
                      numerics: str | None = None) -> tuple[DiT, dict]:
    """DyDiT timestep-wise width routers (heads, MLP channel groups) toward ``target_flops``;
    heads/channels sorted by importance first and routers all-on, so the output reproduces the
    source until trained. ``static=True``: static width pruning at the same FLOPs (the baseline)."""
    target_flops = checks.real("target_flops", target_flops, lo=0.0, hi=1.0, lo_open=True)
    checks.choice("sort_by", sort_by, dynamic.SORTS)
    checks.text("data", data, optional=True)
    tau, init_bias = checks.real("tau", tau, lo=0.0, lo_open=True), checks.real("init_bias", init_bias)
    static, seed = checks.flag("static", static), check_seed(seed)
    model = load_source(source, revision=revision, no_ema=no_ema, num_heads=num_heads, prediction=prediction,
                        numerics=numerics)
    ds = load_data(data, cfg=model.config) if data is not None else None
    routed = dynamic.add_dynamic_width(model, target_flops, sort_by, ds, tau, init_bias, static, seed)
    return _write_routed(routed, source, "add-dynamic-width", Path(output), force)


@writes_output("source")
def add_token_router(source, *, output: str | Path, reduction: int = 16, tau: float = 5.0, init_bias: float = 35.0,
                     target_flops: float | None = None, seed: int = 0, force: bool = False, revision: str | None = None, no_ema: bool = False,
                     num_heads: int | None = None, prediction: str | None = None,
                     numerics: str | None = None) -> tuple[DiT, dict]:
    """DyDiT spatial token routers before each block's MLP (all tokens on at start).
    ``target_flops``: the block FLOPs ratio fine-tuning trains toward (DyDiT's lambda; with
    width routers it replaces theirs; without either the routers have no FLOPs target)."""
    reduction = checks.integer("reduction", reduction, lo=1, hi=2**15)
    target_flops = checks.real("target_flops", target_flops, lo=0.0, hi=1.0, lo_open=True, optional=True)
    tau, init_bias = checks.real("tau", tau, lo=0.0, lo_open=True), checks.real("init_bias", init_bias)
    seed = check_seed(seed)
    model = load_source(source, revision=revision, no_ema=no_ema, num_heads=num_heads, prediction=prediction,
                        numerics=numerics)
    routed = dynamic.add_token_router(model, tau, init_bias, reduction, seed, target_flops)
    return _write_routed(routed, source, "add-token-router", Path(output), force)
