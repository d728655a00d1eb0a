"""The one training loop of the project, on accelerate.

Determinism: every step reseeds from (seed, step, process), so a resumed run sees exactly
the batches, timesteps and noise that an uninterrupted run would have seen.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from ..errors import DitcError, TrainingError, UsageError
from ..formats.ditc import state_for_save
from ..progress import make_progress


class TrainingInterrupted(DitcError):
    exit_code = 130


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup: int = 0
    schedule: str = "constant"  # constant | cosine | linear
    grad_clip: float = 1.0
    grad_accum: int = 1
    ema: float = 0.9999  # 0 disables
    mixed_precision: str = "no"
    seed: int = 0
    ckpt_every: int = 0
    log_every: int = 10

    def to_dict(self):
        return asdict(self)


@dataclass
class TrainResult:
    model: torch.nn.Module
    ema: torch.nn.Module | None
    history: list = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    resumed_from: int = 0
    is_main: bool = True
    processes: int = 1


def _lr_lambda(cfg: TrainConfig):
    def f(step):
        if cfg.warmup and step < cfg.warmup:
            return (step + 1) / cfg.warmup
        if cfg.schedule == "cosine":
            p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, p)))
        if cfg.schedule == "linear":
            p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
            return max(0.0, 1 - p)
        return 1.0

    return f


def to_device(batch: dict, device) -> dict:
    """A batch drawn on the CPU (from CPU generators, so a seed gives the same batch on any
    device) moved to the device the model trains on."""
    return {k: (v.to(device, non_blocking=True) if hasattr(v, "to") else v) for k, v in batch.items()}


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float):
    for (n, pe), p in zip(ema.named_parameters(), model.parameters()):
        if p.requires_grad:
            pe.mul_(decay).add_(p.detach().to(pe.dtype), alpha=1 - decay)
        else:
            pe.copy_(p.detach())


@dataclass
class _Run:
    """The live objects of one training run."""

    acc: object
    model: torch.nn.Module
    ema: torch.nn.Module | None
    opt: torch.optim.Optimizer
    sched: object
    start: int = 0
    history: list = field(default_factory=list)
    last_good: int | None = None
    t0: float = field(default_factory=time.time)


class Trainer:
    """Runs ``loss_fn(model, batch, step) -> {"loss": scalar, ...}`` for ``cfg.steps`` steps.

    ``batch_fn(step, generator) -> batch`` draws the data for one step; ``work_dir`` holds
    ``train_state/`` (checkpoint for exact resume). ``param_groups`` overrides the default
    single group of trainable parameters (e.g. separate learning rates).
    """

    def __init__(self, model, loss_fn: Callable, batch_fn: Callable, cfg: TrainConfig, work_dir: Path,
                 param_groups: list | None = None, on_step: Callable | None = None,
                 desc: str = "training", status_fn: Callable | None = None, state_modules: dict | None = None,
                 frozen_modules: list | None = None, producer: dict | None = None):
        self.model = model
        self.loss_fn = loss_fn
        self.batch_fn = batch_fn
        self.cfg = cfg
        self.work_dir = Path(work_dir)
        self.param_groups = param_groups
        self.on_step = on_step
        self.desc = desc
        self.status_fn = status_fn
        self.state_modules = state_modules or {}  # extra modules saved with the train state
        self.frozen_modules = frozen_modules or []  # read by the loss (a teacher): moved to the training device
        self.producer = producer or {}  # what this run is (model, data, options): a resume must match it
        self._stop_signal = None

    # ------------------------------------------------------------------ state
    @property
    def state_dir(self) -> Path:
        return self.work_dir / "train_state"

    def _save_state(self, acc, model, ema, opt, sched, step, history):
        if not acc.is_main_process:
            acc.wait_for_everyone()
            return

        tmp = self.work_dir / ".train_state.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        unwrapped = acc.unwrap_model(model)
        save_file(state_for_save(unwrapped), str(tmp / "model.safetensors"))
        if ema is not None:
            save_file(state_for_save(ema), str(tmp / "ema.safetensors"))
        for name, mod in self.state_modules.items():
            save_file(state_for_save(mod), str(tmp / f"{name}.safetensors"))
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, tmp / "optim.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "train_config": self.cfg.to_dict(), "history": history,
                                                    "producer": self.producer, "processes": acc.num_processes},
                                                   default=str))
        shutil.rmtree(self.state_dir, ignore_errors=True)
        os.replace(tmp, self.state_dir)
        acc.wait_for_everyone()

    def _load_state(self, acc, model, ema, opt, sched):
        sd = self.state_dir
        if not (sd / "state.json").exists():
            raise DitcError(f"`resume`: no training state in {self.work_dir} (expected {sd}/state.json)")
        meta = json.loads((sd / "state.json").read_text())
        saved = meta["train_config"]
        if saved.get("steps") != self.cfg.steps and self.cfg.schedule != "constant":
            raise DitcError(f"`resume`: steps was {saved.get('steps')} in the interrupted run but is {self.cfg.steps} now, "
                            f"and the {self.cfg.schedule} learning-rate schedule follows the step count; resume with "
                            "the same steps or start over")
        for key in sorted(set(saved) | set(self.cfg.to_dict())):
            if key not in ("steps", "log_every", "ckpt_every") and saved.get(key) != getattr(self.cfg, key, None):
                hint = ""
                if key == "ema" and saved.get("steps") != self.cfg.steps:  # the default EMA follows the step count
                    hint = (f" (the default EMA is scaled to the steps: {saved.get('steps')} then, {self.cfg.steps} "
                            f"now); resume with the same steps, or give the EMA {saved.get(key)} explicitly")
                raise DitcError(
                    f"`resume`: {key} was {saved.get(key)} in the interrupted run but is {getattr(self.cfg, key, None)} "
                    f"now{hint}")
        mine = json.loads(json.dumps(self.producer, default=str))
        old = meta.get("producer", {})
        for key in sorted(set(old) | set(mine)):
            if old.get(key) != mine.get(key):
                what = {"source": "the model being trained", "teacher": "the teacher", "data": "the data"}.get(key, key)
                a, b, name = old.get(key), mine.get(key), key
                if isinstance(a, dict) and isinstance(b, dict):  # e.g. the KD weights: name the one that changed
                    sub = next(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
                    a, b, name = a.get(sub), b.get(sub), f"{key}.{sub}"
                raise DitcError(f"`resume`: {what} differs from the interrupted run's ({name}: {str(a)[:60]} "
                                f"then, {str(b)[:60]} now); resume with the same inputs or start over")
        if meta.get("processes", acc.num_processes) != acc.num_processes:
            raise DitcError(f"`resume`: the interrupted run had {meta['processes']} processes and this one has "
                            f"{acc.num_processes}; the batches would differ")
        unwrapped = acc.unwrap_model(model)
        state = load_file(str(sd / "model.safetensors"))
        mine = unwrapped.state_dict()
        if set(state) != set(mine) or any(state[k].shape != mine[k].shape for k in state):
            raise DitcError(f"`resume`: the saved training state does not fit this model/config ({sd})")
        unwrapped.load_state_dict(state)
        if ema is not None and (sd / "ema.safetensors").exists():
            ema.load_state_dict(load_file(str(sd / "ema.safetensors")))
        for name, mod in self.state_modules.items():
            mod.load_state_dict(load_file(str(sd / f"{name}.safetensors")))
        if int(meta["step"]) > self.cfg.steps:
            raise DitcError(f"`resume`: the interrupted run is already at step {meta['step']}, past `steps` {self.cfg.steps}")
        opt_state = torch.load(sd / "optim.pt", weights_only=True)
        opt.load_state_dict(opt_state["optimizer"])
        sched.load_state_dict(opt_state["scheduler"])
        return int(meta["step"]), meta.get("history", [])

    # ------------------------------------------------------------------ run
    def _install_signals(self):
        old = {}

        def handler(signum, frame):
            self._stop_signal = signum

        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                old[s] = signal.signal(s, handler)
            except ValueError:  # not the main thread
                pass
        return old

    def _setup(self, resume: bool) -> "_Run":
        from accelerate import Accelerator  # heavy: imported on first use
        from accelerate.utils import DistributedDataParallelKwargs

        cfg = self.cfg
        if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise UsageError("`mixed_precision` fp16 needs a CUDA device (its loss scaling is CUDA's); use bf16, which "
                             "autocasts on the CPU too, or no")
        acc = Accelerator(
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_steps=cfg.grad_accum,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
            cpu=not torch.cuda.is_available(),
        )
        model, ema = self.model, None
        if cfg.ema > 0:
            ema = copy.deepcopy(model).eval()
            for p in ema.parameters():
                p.requires_grad_(False)
        groups = self.param_groups or [{"params": [p for p in model.parameters() if p.requires_grad]}]
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
        model.train()
        model, opt = acc.prepare(model, opt)
        if ema is not None:
            ema.to(acc.device)
        for m in self.frozen_modules:
            m.to(acc.device)
        run = _Run(acc, model, ema, opt, sched)
        if resume:
            run.start, run.history = self._load_state(acc, model, ema, opt, sched)
            run.last_good = run.start
        self.work_dir.mkdir(parents=True, exist_ok=True)
        return run

    def _step(self, run: "_Run", step: int):
        """One optimizer step (over ``grad_accum`` micro-batches): (mean loss, loss dicts)."""
        cfg, acc, model = self.cfg, run.acc, run.model
        losses = []
        for micro in range(cfg.grad_accum):
            seed = ((cfg.seed * 1_000_003 + step) * 131 + micro) * 64 + acc.process_index
            torch.manual_seed(seed)
            g = torch.Generator().manual_seed(seed)
            batch = to_device(self.batch_fn(step, g, acc.process_index, acc.num_processes), acc.device)
            with acc.accumulate(model):
                with acc.autocast():
                    out = self.loss_fn(model, batch, step)
                acc.backward(out["loss"])
                if acc.sync_gradients and cfg.grad_clip > 0:
                    acc.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                run.opt.step()
                run.opt.zero_grad(set_to_none=True)
            losses.append(out)
        run.sched.step()
        loss_val = torch.stack([o["loss"].detach().float() for o in losses]).mean()
        loss_val = acc.reduce(loss_val.to(acc.device), reduction="mean")
        if not torch.isfinite(loss_val):
            kept = (f"the last good checkpoint (step {run.last_good}) is kept in {self.state_dir}"
                    if run.last_good is not None else "no checkpoint was written")
            raise TrainingError(f"loss is {float(loss_val)} at step {step}; stopping ({kept})")
        return loss_val, losses

    def _record(self, run: "_Run", step: int, loss_val, losses) -> str:
        """EMA, callbacks and the history after ``step`` steps; returns the progress status."""
        cfg, acc = self.cfg, run.acc
        if run.ema is not None:
            ema_update(run.ema, acc.unwrap_model(run.model), min(cfg.ema, (1 + step) / (10 + step)))
        if self.on_step is not None:
            self.on_step(step, acc.unwrap_model(run.model))
        if step % cfg.log_every == 0 or step == cfg.steps:
            rec = {"step": step, "loss": float(loss_val), "lr": run.sched.get_last_lr()[0]}
            rec.update({k: float(v.detach()) for k, v in losses[-1].items()
                        if k != "loss" and torch.is_tensor(v) and v.numel() == 1})
            run.history.append(rec)
        status = f"loss {float(loss_val):.4f}  {(step - run.start) / max(1e-9, time.time() - run.t0):.2f} it/s"
        if self.status_fn is not None:
            status += "  " + self.status_fn(acc.unwrap_model(run.model))
        return status

    def _checkpoint(self, run: "_Run", step: int) -> None:
        cfg = self.cfg
        if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < cfg.steps:
            self._save_state(run.acc, run.model, run.ema, run.opt, run.sched, step, run.history)
            run.last_good = step
        if self._stop_requested(run.acc):
            self._save_state(run.acc, run.model, run.ema, run.opt, run.sched, step, run.history)
            raise TrainingInterrupted(f"interrupted at step {step}; state saved in {self.state_dir}, continue with `resume`")

    def _stop_requested(self, acc) -> bool:
        """A stop signal on any process stops every process at the same step (one small
        all-reduce per step when there are several), so none waits in a collective alone."""
        mine = self._stop_signal is not None
        if acc.num_processes == 1:
            return mine
        flag = torch.tensor([1.0 if mine else 0.0], device=acc.device)
        return bool(acc.reduce(flag, reduction="sum").item() > 0)

    def run(self, resume: bool = False) -> TrainResult:
        run = self._setup(resume)
        old_handlers = self._install_signals()
        try:
            with make_progress(self.desc, self.cfg.steps, completed=run.start) as bar:
                for step in range(run.start, self.cfg.steps):
                    loss_val, losses = self._step(run, step)
                    bar.advance(1, status=self._record(run, step + 1, loss_val, losses))
                    self._checkpoint(run, step + 1)
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)
        acc = run.acc
        acc.wait_for_everyone()
        unwrapped = acc.unwrap_model(run.model)
        unwrapped.eval()
        return TrainResult(unwrapped, run.ema, run.history, self.cfg.steps, time.time() - run.t0, run.start,
                           acc.is_main_process, acc.num_processes)
