"""Training a model and writing what it became: ``train_model`` runs the trainer,
``train_and_save`` adds the checkpoint with its lineage, report, loss plot and (for dynamic
models) the inference FLOPs of the written EMA weights."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from ..data.batches import condition_dropout_batch_fn
from ..data.datasets import TensorData, check_fits, load_data
from ..diffusion import objective_for
from ..diffusion.measure import inference_flops
from ..errors import UsageError
from ..formats import write_checkpoint
from ..model.build import fingerprint
from ..model.family import family_of, require
from ..outputs import check_output, work_dir_for
from ..report import plot_lines
from .losses import combined_loss, flops_schedule
from .trainer import TrainConfig, Trainer, TrainResult


def train_model(model, data: TensorData, cfg: TrainConfig, work_dir: Path, teacher=None, resume: bool = False,
                kd: dict | None = None, desc: str = "finetune", producer: dict | None = None) -> TrainResult:
    """Fine-tune (``teacher=None``) or distill ``model`` on ``data``.

    Dynamic models (routers in the config) automatically get the FLOPs loss toward
    ``config.width.target_flops`` (DyDiT's schedule: ``kd["flops_hold"]`` steps at 1.0, then
    linear over ``kd["flops_decay"]`` steps, default 3% of the run), the full-width model's
    loss added during ``kd["full_steps"]`` (default all) with weight ``kd["full_loss"]``
    (default 1.0), and batches stratified into ``kd["t_strata"]`` (default 4) timestep ranges.
    """
    require(model, "training")
    check_fits(data, model.config)
    if teacher is not None:
        require(model, "distill")
        tc = teacher.config
        mc = model.config
        def takes(c):
            return (f"{c.in_channels}x{c.input_size}x{c.input_size} with {family_of(c).condition_key(c)}"
                    f"{family_of(c).teacher_facts(c)}")

        if takes(tc) != takes(mc) or family_of(tc) is not family_of(mc):
            raise UsageError(f"teacher takes {takes(tc)} ({family_of(tc).name}), the student {takes(mc)} "
                            f"({family_of(mc).name})")
        teacher.eval().requires_grad_(False)
    if model.config.width is not None and model.config.width.static:
        for b in model.blocks:  # static width pruning: the chosen widths stay fixed
            b.head_router.requires_grad_(False)
            b.channel_router.requires_grad_(False)
    diffusion = objective_for(model.config)
    loss_fn, status_fn = combined_loss(diffusion, model, teacher, kd or {}, cfg.steps)
    batch_fn = condition_dropout_batch_fn(
        data, cfg.batch_size, model.config,
        t_strata=int((kd or {}).get("t_strata", 4)) if model.config.is_dynamic else 0,
        draws=getattr(diffusion, "draws", None),
    )
    trainer = Trainer(model, loss_fn, batch_fn, cfg, work_dir, desc=desc, status_fn=status_fn,
                      frozen_modules=[teacher] if teacher is not None else None, producer=producer)
    return trainer.run(resume=resume)


def train_and_save(model, data_spec: str, output: Path, cfg: TrainConfig, *, force: bool = False,
                   resume: bool = False, teacher=None, kd: dict | None = None, op: str = "finetune",
                   extra: dict | None = None):
    """Train ``model`` on ``data_spec`` and write the result (EMA weights when ``cfg.ema``) as a
    ditc checkpoint with lineage and report. Resumable state lives in a work dir next to
    ``output`` until success. Returns (written model, report); (None, None) on processes
    other than the main one under ``accelerate launch``."""
    output = Path(output)
    check_output(output, force)
    require(model, "training")
    data = load_data(data_spec, cfg=model.config)
    work = work_dir_for(output)
    if not resume and (work / "train_state").exists():
        raise UsageError(f"{work} holds an interrupted run: pass `resume` to continue it, or delete it")
    t0 = time.time()
    schedule = ("flops_hold", "flops_decay", "full_loss", "full_steps", "t_strata")  # DyDiT's: dynamic models only
    kd_used = {k: v for k, v in (kd or {}).items() if model.config.is_dynamic or k not in schedule}
    if model.config.is_dynamic:  # the FLOPs decay follows the run's length unless given: part of what the run is
        kd_used["flops_decay_steps"] = flops_schedule(kd or {}, cfg.steps)[1]
    producer = {"op": op, "source": fingerprint(model), "data": data_spec, "kd": kd_used,
                "teacher": fingerprint(teacher) if teacher is not None else None}
    res = train_model(model, data, cfg, work, teacher=teacher, resume=resume, kd=kd, desc=op, producer=producer)
    if not res.is_main:
        return None, None
    final = res.ema if res.ema is not None else res.model
    final.config = res.model.config.with_step(op, data=data_spec, **cfg.to_dict(), **(extra or {}))
    report = {
        "op": op, "data": data_spec, "steps": cfg.steps, "seconds": time.time() - t0, "resumed_from": res.resumed_from,
        "processes": res.processes, "weights": "ema" if res.ema is not None else "raw", "train_config": cfg.to_dict(),
        "final_loss": res.history[-1]["loss"] if res.history else None, **(extra or {}), "history": res.history,
    }
    if final.config.is_dynamic:  # what the written (EMA) model runs at inference, next to its target
        report.update(_inference_report(final))
        miss = flops_miss(report, cfg)
        if miss:
            report["warning"] = miss

    def plots(d):
        if res.history:
            plot_lines(d / "loss.png", [h["step"] for h in res.history], {"loss": [h["loss"] for h in res.history]},
                       f"{op} loss", "step", "loss")

    write_checkpoint(final, output, force=force, report=report, title=f"ditc {op}", plots=plots)
    shutil.rmtree(work, ignore_errors=True)
    return final, report


FLOPS_TOLERANCE = 0.03


def flops_miss(report: dict, cfg: TrainConfig) -> str | None:
    """One line when the written model's inference block FLOPs miss the target by more than
    0.03: the gap, the reason (training did not reach the target, or reached it while the EMA
    still averages earlier routers) and the option that closes it."""
    target, got = report.get("target_block_flops"), report.get("inference_block_flops_ratio")
    if target is None or got is None or abs(got - target) <= FLOPS_TOLERANCE:
        return None
    trained = [h["flops_ratio"] for h in report.get("history", []) if "flops_ratio" in h]
    last = trained[-1] if trained else None
    head = (f"the written model runs at {got:.3f} of the block FLOPs ({report.get('inference_measured_on')}), "
            f"{got - target:+.3f} from the target {target}")
    if last is not None and abs(last - target) <= FLOPS_TOLERANCE and cfg.ema > 0:
        return (f"{head}: training reached {last:.3f}, but the EMA weights (decay {cfg.ema:.4g}) still average routers "
                f"from before; lower `ema` or train longer (`steps`)")
    ended = f" (training ended at {last:.3f})" if last is not None else ""
    return (f"{head}: the routers did not reach it in {cfg.steps} steps{ended}; train longer (`steps`), or reach the "
            f"target sooner (`flops_decay`, `flops_hold`)")


def _inference_report(model) -> dict:
    e = inference_flops(model)  # its eval sampler: DDIM-50 (eps) or Euler-50 (velocity)
    return {"inference_block_flops_ratio": e["block_flops_ratio"], "inference_flops_ratio": e["flops_ratio"],
            "inference_measured_on": e["measured_on"],
            "target_block_flops": model.config.flops_target}
