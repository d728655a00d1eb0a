"""``ditc``: the command-line shell over the library. Each command parses its options,
calls the library, renders a rich table and writes reports. Bad input exits with one
line: code 2 for usage errors, 1 for runtime errors."""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import DitcError, UsageError

app = typer.Typer(
    name="ditc",
    help="Compress pretrained Diffusion Transformers: prune depth (TinyFusion), add dynamic width and "
    "token routing (DyDiT), fine-tune, distill, evaluate and benchmark.\n\n"
    "Every command reads any source (digits-dit, a hub id such as DiT-XL-2, a diffusers dir, an original "
    ".pt, a ditc checkpoint) and writes a ditc checkpoint, so commands chain.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
)
out_console = Console()
err_console = Console(stderr=True)


def handle_errors(fn):
    """One clear line and an exit code for every expected failure, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DitcError as e:
            err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code)
        except KeyboardInterrupt:
            err_console.print("[bold red]error:[/] interrupted", highlight=False)
            raise typer.Exit(130)

    return wrapper


def emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def kv_table(title: str, rows: dict) -> Table:
    t = Table(title=title, show_header=False)
    t.add_column("field", style="bold")
    t.add_column("value")
    for k, v in rows.items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        elif isinstance(v, (list, dict)):
            v = json.dumps(v, default=str)
            v = v if len(v) < 200 else v[:197] + "..."
        t.add_row(str(k), str(v))
    return t


def rows_table(title: str, rows: list[dict]) -> Table:
    t = Table(title=title)
    cols = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    for c in cols:
        t.add_column(c)
    for r in rows:
        t.add_row(*[f"{r.get(c):.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols])
    return t


def fmt_gflops(g: float) -> str:
    return f"{g:.2f}" if g < 10 else f"{g:.1f}"


def _load(source: str, facts: dict, revision: Optional[str] = None, no_ema: bool = False):
    from .formats import load_model

    return load_model(source, revision=revision, use_ema=not no_ema, **facts)


def _facts(num_heads: Optional[int], prediction: Optional[str], numerics: Optional[str]) -> dict:
    """The facts a user may supply for sources that do not state them (load_model keywords)."""
    return {k: v for k, v in dict(num_heads=num_heads, prediction=prediction, numerics=numerics).items() if v is not None}


def _write_checkpoint(model, out: Path, force: bool, report: dict, title: str, plots=None):
    """Atomic ditc checkpoint + report.json/.md (+ optional PNGs drawn by ``plots(dir)``)."""
    from .formats.atomic import atomic_dir
    from .formats.ditc import save_ditc_into
    from .report import write_report

    with atomic_dir(out, force) as tmp:
        save_ditc_into(model, tmp, report=report)
        write_report(tmp, report, title)
        if plots is not None:
            plots(tmp)


def _parse_ints(text: Optional[str], what: str) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip() != ""]
    except ValueError:
        raise UsageError(f"{what} must be a comma-separated list of integers, got {text!r}") from None


SRC_HELP = "Model source: digits-dit, a hub alias/id (DiT-XL-2, facebook/DiT-XL-2-256), a diffusers dir, an original .pt or a ditc checkpoint."
Src = typer.Argument(..., help=SRC_HELP, show_default=False)
Out = typer.Option(..., "-o", "--output", help="Output directory (refused if it exists, unless --force).", show_default=False)
Force = typer.Option(False, "--force", help="Replace an existing output.")
Revision = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit) for hub sources.")
NoEma = typer.Option(False, "--no-ema", help="Original training checkpoints: take 'model' instead of the EMA weights.")
JsonOut = typer.Option(False, "--json", help="Print the result as JSON on stdout (for pipelines).")
NumHeads = typer.Option(None, "--num-heads", help="Attention heads of an original .pt whose size is no published preset and whose args do not say (refused without it).")
Prediction = typer.Option(None, "--prediction", help="eps | velocity: what a plain original-layout state dict predicts (eps is assumed, and said, without it).")
Numerics = typer.Option(None, "--numerics", help="original | diffusers: the timestep/LayerNorm numerics the weights were trained with (inferred, and said, without it).")
Spacing = typer.Option(None, "--timestep-spacing", help="linspace | leading | trailing (default linspace: the reference DiT respacing).")


# ---------------------------------------------------------------------------- info / convert / create
@app.command()
@handle_errors
def info(source: str = Src, revision: Optional[str] = Revision, no_ema: bool = NoEma,
         num_heads: Optional[int] = NumHeads, prediction: Optional[str] = Prediction, numerics: Optional[str] = Numerics,
         sampler: Optional[str] = typer.Option(None, help="Sampler whose timesteps average the FLOPs of dynamic models (default: ddim for eps models, euler for velocity models)."),
         steps: Optional[int] = typer.Option(None, help="Sampler steps for the FLOPs average (default 50)."),
         timestep_spacing: Optional[str] = Spacing,
         cfg_scale: float = typer.Option(1.0, "--cfg-scale", help="Guidance of the sampling run that measures token-routed FLOPs."),
         arch: bool = typer.Option(False, "--arch", help="Treat SOURCE as an architecture name (DiT-XL/2 ...): FLOPs without weights."),
         json_out: bool = JsonOut):
    """Describe a model: architecture, parameters, FLOPs, compression spec and lineage.

    Examples:

        ditc info digits-dit

        ditc info --arch DiT-XL/2          # 118.6 GFLOPs, no weights needed

        ditc info tiny/ --json | jq .gflops
    """
    from .describe import describe

    if arch:
        import torch

        from .config import DiTConfig
        from .model import DiT

        with torch.device("meta"):
            model = DiT(DiTConfig.preset(source))
    else:
        model = _load(source, _facts(num_heads, prediction, numerics), revision, no_ema)
    d = describe(model, sampler, steps, timestep_spacing, cfg_scale)
    if json_out:
        emit_json(d)
        return
    d = dict(d)
    d["gflops"] = fmt_gflops(d["gflops"])
    d["params"] = f"{d['params']:,}"
    out_console.print(kv_table(f"ditc info: {source}", d))


@app.command()
@handle_errors
def convert(source: str = Src, output: Path = Out,
            to: str = typer.Option("ditc", "--to", help="ditc | diffusers | original"),
            dtype: Optional[str] = typer.Option(None, "--dtype", help="fp32 | bf16 | fp16 (default: keep float32)"),
            revision: Optional[str] = Revision, no_ema: bool = NoEma,
            num_heads: Optional[int] = NumHeads, prediction: Optional[str] = Prediction, numerics: Optional[str] = Numerics,
            force: bool = Force):
    """Convert between layouts: ditc checkpoint, diffusers (DiTTransformer2DModel), original .pt.

    Examples:

        ditc convert DiT-XL-2 -o xl-ditc/

        ditc convert tiny/ --to diffusers -o tiny-diffusers/

        ditc convert DiT-XL-2-256.pt --to ditc --dtype bf16 -o xl-bf16/

        ditc convert my-dit.pt --num-heads 4 -o my-dit/      # heads of an unpublished size, recorded once
    """
    from .formats import save_model

    model = _load(source, _facts(num_heads, prediction, numerics), revision, no_ema)
    if to == "original" and output.suffix not in (".pt", ".pth"):
        raise UsageError(f"--to original writes a single .pt file; give an output ending in .pt (got {output})")
    model.config = model.config.with_step("convert", to=to, dtype=dtype or "fp32", source=str(source))
    save_model(model, output, format=to, dtype=dtype, force=force,
               report={"op": "convert", "source": str(source), "to": to, "dtype": dtype or "fp32"})
    err_console.print(f"wrote {to} checkpoint {output}")


@app.command()
@handle_errors
def create(arch: str = typer.Argument(..., help="DiT-S/2, DiT-B/4, DiT-XL/2 ... or 'custom' with the options below."),
           output: Path = Out,
           input_size: Optional[int] = typer.Option(None, help="Latent/pixel side (default 32 for presets)."),
           in_channels: Optional[int] = typer.Option(None),
           hidden_size: Optional[int] = typer.Option(None),
           depth: Optional[int] = typer.Option(None),
           num_heads: Optional[int] = typer.Option(None),
           patch_size: Optional[int] = typer.Option(None),
           num_classes: Optional[int] = typer.Option(None),
           learn_sigma: bool = typer.Option(True, "--learn-sigma/--no-learn-sigma"),
           pixel: bool = typer.Option(False, "--pixel", help="Pixel-space model (no VAE)."),
           prediction: str = typer.Option("eps", "--prediction", help="eps (DiT, Gaussian diffusion) | velocity (SiT, flow matching on the linear path)."),
           name: Optional[str] = typer.Option(None),
           label_init_std: float = typer.Option(0.02, "--label-init-std", help="Std of the class-embedding init (reference 0.02; larger learns class conditioning faster on small budgets)."),
           seed: int = typer.Option(0),
           force: bool = Force):
    """Create a freshly initialised DiT (reference initialisation) as a ditc checkpoint.

    Examples:

        ditc create DiT-S/2 -o s2/

        ditc create custom --input-size 8 --patch-size 1 --in-channels 1 --hidden-size 128 --depth 12 --num-heads 4 --num-classes 10 --pixel -o digits-new/
    """
    import torch

    from .config import DiTConfig
    from .model import DiT

    over = {k: v for k, v in dict(input_size=input_size, in_channels=in_channels, hidden_size=hidden_size, depth=depth,
                                   num_heads=num_heads, patch_size=patch_size, num_classes=num_classes).items() if v is not None}
    over["learn_sigma"] = learn_sigma
    over["prediction"] = prediction
    if pixel:
        over.update(latent_scale=None, vae=None)
    if name:
        over["name"] = name
    if arch == "custom":
        need = [k for k in ("input_size", "in_channels", "hidden_size", "depth", "num_heads", "patch_size") if k not in over]
        if need:
            raise UsageError(f"custom architecture needs --{need[0].replace('_', '-')}")
        cfg = DiTConfig(**over)
    else:
        cfg = DiTConfig.preset(arch, **over)
    cfg.lineage.append({"op": "create", "arch": arch, "seed": seed, "label_init_std": label_init_std})
    torch.manual_seed(seed)
    model = DiT(cfg)
    torch.nn.init.normal_(model.y_embedder.embedding_table.weight, std=label_init_std)
    _write_checkpoint(model, output, force, {"created": arch, "params": model.num_params()}, "ditc create")
    err_console.print(f"wrote {output} ({model.num_params():,} parameters)")


# ---------------------------------------------------------------------------- training
def _train_options(steps, batch_size, lr, ema, seed, grad_clip, grad_accum, warmup, schedule, ckpt_every,
                   mixed_precision, weight_decay):
    from .train.trainer import TrainConfig

    if steps < 1:
        raise UsageError("--steps must be at least 1")
    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if not (0.0 <= ema < 1.0):
        raise UsageError("--ema must be in [0, 1)")
    if schedule not in ("constant", "cosine", "linear"):
        raise UsageError("--schedule must be constant, cosine or linear")
    return TrainConfig(steps=steps, batch_size=batch_size, lr=lr, ema=ema, seed=seed, grad_clip=grad_clip,
                       grad_accum=grad_accum, warmup=warmup, schedule=schedule, ckpt_every=ckpt_every,
                       mixed_precision=mixed_precision, weight_decay=weight_decay)


def _dynamic_options(hold, decay, full_loss, full_steps, strata) -> dict:
    if hold < 0 or (decay is not None and decay < 1) or full_loss < 0 or strata < 0:
        raise UsageError("--flops-hold, --full-model-loss and --t-strata must be >= 0, --flops-decay >= 1")
    return {"flops_hold": hold, "flops_decay": decay, "full_loss": full_loss, "full_steps": full_steps, "t_strata": strata}


def _parse_interval(text: Optional[str]):
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--guidance-interval takes LOW,HIGH (e.g. 0,0.7), got {text!r}") from None
    if not (0.0 <= lo <= hi <= 1.0):
        raise UsageError(f"--guidance-interval needs 0 <= LOW <= HIGH <= 1, got {text!r}")
    return lo, hi


def work_dir_for(output: Path) -> Path:
    """Where resumable training state lives while a command runs (removed on success)."""
    return output.parent / f".{output.name}.ditc-work"


def _run_training(model, data_spec, output, force, resume, tcfg, teacher=None, kd=None, op="finetune", extra=None):
    from .formats.atomic import check_output
    from .train.api import train_model
    from .train.data import load_data

    check_output(output, force)
    data = load_data(data_spec, model.config.num_classes, model.config)
    work = work_dir_for(output)
    if not resume and (work / "train_state").exists():
        raise UsageError(f"{work} holds an interrupted run: pass --resume to continue it, or delete it")
    t0 = time.time()
    res = train_model(model, data, tcfg, work, teacher=teacher, resume=resume, kd=kd, desc=op)
    if not res.is_main:  # under accelerate launch only process 0 writes
        raise typer.Exit(0)
    final = res.ema if res.ema is not None else res.model
    final.config = res.model.config.with_step(op, data=data_spec, **tcfg.to_dict(), **(extra or {}))
    report = {
        "op": op, "data": data_spec, "steps": tcfg.steps, "seconds": time.time() - t0, "resumed_from": res.resumed_from,
        "processes": res.processes,
        "weights": "ema" if res.ema is not None else "raw", "train_config": tcfg.to_dict(),
        "final_loss": res.history[-1]["loss"] if res.history else None, **(extra or {}), "history": res.history,
    }

    def plots(d):
        from .report import plot_lines

        if res.history:
            plot_lines(d / "loss.png", [h["step"] for h in res.history], {"loss": [h["loss"] for h in res.history]},
                       f"{op} loss", "step", "loss")

    if final.config.is_dynamic:  # what the written (EMA) model runs at inference, next to its target
        from .describe import inference_flops

        e = inference_flops(final)  # its eval sampler: DDIM-50 (eps) or Euler-50 (velocity)
        report["inference_block_flops_ratio"] = e["block_flops_ratio"]
        report["inference_flops_ratio"] = e["flops_ratio"]
        report["inference_measured_on"] = e["measured_on"]
        report["target_block_flops"] = final.config.width.target_flops if final.config.width else None
    _write_checkpoint(final, output, force, report, f"ditc {op}", plots)
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return final, report


Steps = typer.Option(1000, "--steps", help="Optimizer steps.")
Batch = typer.Option(64, "--batch-size", help="Per-process batch size.")
Lr = typer.Option(1e-4, "--lr", help="AdamW learning rate.")
Ema = typer.Option(0.9999, "--ema", help="EMA decay of the written weights (0: write the raw weights).")
Seed = typer.Option(0, "--seed")
Clip = typer.Option(1.0, "--grad-clip")
Accum = typer.Option(1, "--grad-accum")
Warm = typer.Option(0, "--warmup", help="LR warm-up steps.")
Sched = typer.Option("constant", "--schedule", help="constant | cosine | linear")
Ckpt = typer.Option(0, "--ckpt-every", help="Save resumable state every N steps (0: only on interrupt).")
MP = typer.Option("no", "--mixed-precision", help="no | bf16 | fp16 (GPU only)")
WD = typer.Option(0.0, "--weight-decay")
Resume = typer.Option(False, "--resume", help="Continue an interrupted run of the same command and output.")
FlopsHold = typer.Option(100, "--flops-hold", help="Dynamic models: steps the FLOPs target stays at 1.0 (DyDiT: 100).")
FlopsDecay = typer.Option(None, "--flops-decay", help="Dynamic models: steps from 1.0 down to the target (DyDiT: about 3% of training; default 3% of --steps).")
FullLoss = typer.Option(1.0, "--full-model-loss", help="Dynamic models: weight of the full-width model's diffusion loss added each step (DyDiT stage 1: 1.0; 0 turns it off).")
FullSteps = typer.Option(None, "--full-model-steps", help="Dynamic models: steps that add the full-model loss (default all, as DyDiT's lambda 0.7 run).")
TStrata = typer.Option(4, "--t-strata", help="Dynamic models: timestep ranges the batch is stratified over (DyDiT: 4; 0 = uniform).")
Data = typer.Option(..., "--data", help="digits | a latents dir (*_features/*.npy or shard-*.safetensors) | an image folder", show_default=False)


@app.command()
@handle_errors
def finetune(source: str = Src, output: Path = Out, data: str = Data, steps: int = Steps, batch_size: int = Batch,
             lr: float = Lr, ema: float = Ema, seed: int = Seed, grad_clip: float = Clip, grad_accum: int = Accum,
             warmup: int = Warm, schedule: str = Sched, ckpt_every: int = Ckpt, mixed_precision: str = MP,
             weight_decay: float = WD, resume: bool = Resume, force: bool = Force, json_out: bool = JsonOut,
             flops_hold: int = FlopsHold, flops_decay: Optional[int] = FlopsDecay, full_model_loss: float = FullLoss,
             full_model_steps: Optional[int] = FullSteps, t_strata: int = TStrata,
             num_heads: Optional[int] = NumHeads, prediction: Optional[str] = Prediction, numerics: Optional[str] = Numerics):
    """Fine-tune with the DiT hybrid loss (eps MSE + VLB). Dynamic models also train their
    routers toward the FLOPs target in their config. Runs under `accelerate launch` unchanged.

    Examples:

        ditc finetune tiny/ --data digits --steps 500 -o tiny-ft/

        accelerate launch --num_processes 2 -m dit_compress.cli finetune tiny/ --data latents/ -o tiny-ft/
    """
    tcfg = _train_options(steps, batch_size, lr, ema, seed, grad_clip, grad_accum, warmup, schedule, ckpt_every,
                          mixed_precision, weight_decay)
    model = _load(source, _facts(num_heads, prediction, numerics))
    kd = _dynamic_options(flops_hold, flops_decay, full_model_loss, full_model_steps, t_strata)
    _, report = _run_training(model, data, output, force, resume, tcfg, kd=kd, op="finetune",
                              extra={"dynamic": kd} if model.config.is_dynamic else None)
    _summary(report, json_out)


@app.command()
@handle_errors
def distill(source: str = Src, output: Path = Out, teacher: str = typer.Option(..., "--teacher", help="Teacher model source.", show_default=False),
            data: str = Data, kd_out: float = typer.Option(0.9, "--kd-out", help="Weight of output KD (eps MSE + variance KL)."),
            kd_plain: float = typer.Option(0.1, "--kd-plain", help="Weight of the plain diffusion loss."),
            kd_rep: float = typer.Option(0.0, "--kd-rep", help="Weight beta of masked representation KD (TinyFusion: 1e-2), decays to 0."),
            k_sigma: float = typer.Option(2.0, "--k-sigma", help="Mask out block activations with |h - mu| >= k sigma."),
            no_rep_mask: bool = typer.Option(False, "--no-rep-mask", help="Plain RepKD without the massive-activation mask."),
            rep_pairs: str = typer.Option("paper", "--rep-pairs", help="paper: student i <-> teacher (i+1)*T//S-1 (TinyFusion; 2i+1 for 28->14) | kept: from the kept-layer indices."),
            rep_mask_form: str = typer.Option("paper", "--rep-mask-form", help="paper: mean((m_s*h_s - m_t*h_t)^2) over all elements (TinyFusion) | joint: both masks, renormalised."),
            steps: int = Steps, batch_size: int = Batch, lr: float = Lr, ema: float = Ema, seed: int = Seed,
            grad_clip: float = Clip, grad_accum: int = Accum, warmup: int = Warm, schedule: str = Sched,
            ckpt_every: int = Ckpt, mixed_precision: str = MP, weight_decay: float = WD, resume: bool = Resume,
            force: bool = Force, json_out: bool = JsonOut,
            flops_hold: int = FlopsHold, flops_decay: Optional[int] = FlopsDecay, full_model_loss: float = FullLoss,
            full_model_steps: Optional[int] = FullSteps, t_strata: int = TStrata,
            num_heads: Optional[int] = NumHeads, prediction: Optional[str] = Prediction, numerics: Optional[str] = Numerics):
    """Distill a (compressed) student from a teacher: output KD, TinyFusion's masked
    representation KD (layer map from the kept-layer indices), mixed with the plain loss.

    Examples:

        ditc distill tiny/ --teacher digits-dit --data digits --kd-rep 0.01 --steps 500 -o tiny-kd/

        ditc distill tiny/ --teacher DiT-XL-2 --data latents/ --kd-rep 0.01 --lr 2e-4 -o tiny-kd/
    """
    tcfg = _train_options(steps, batch_size, lr, ema, seed, grad_clip, grad_accum, warmup, schedule, ckpt_every,
                          mixed_precision, weight_decay)
    facts = _facts(num_heads, prediction, numerics)
    student = _load(source, facts)
    t_model = _load(teacher, facts)
    from .train.losses import REP_MASK_FORMS, REP_PAIRS

    if rep_pairs not in REP_PAIRS or rep_mask_form not in REP_MASK_FORMS:
        raise UsageError(f"--rep-pairs takes {' or '.join(REP_PAIRS)}, --rep-mask-form {' or '.join(REP_MASK_FORMS)}")
    kd = {"out": kd_out, "plain": kd_plain, "rep": kd_rep, "k_sigma": None if no_rep_mask else k_sigma,
          "rep_pairs": rep_pairs, "rep_mask_form": rep_mask_form,
          **_dynamic_options(flops_hold, flops_decay, full_model_loss, full_model_steps, t_strata)}
    _, report = _run_training(student, data, output, force, resume, tcfg, teacher=t_model, kd=kd, op="distill",
                              extra={"teacher": teacher, "kd": kd})
    _summary(report, json_out)


# ---------------------------------------------------------------------------- prune-depth
@app.command("prune-depth")
@handle_errors
def prune_depth_cmd(
    source: str = Src, output: Path = Out,
    pattern: Optional[str] = typer.Option(None, "--pattern", help="N:M: keep N of every M consecutive layers (1:2, 2:4, 7:14)."),
    groups: Optional[str] = typer.Option(None, "--groups", help="Mixed consecutive groups, e.g. 2:4,2:4,3:4,1:2 (must cover the depth)."),
    method: str = typer.Option("learned", "--method", help="learned | block-influence | uniform | oracle | random | min-loss"),
    keep: Optional[str] = typer.Option(None, "--keep", help="oracle: the layers to keep, e.g. 0,2,4,6."),
    data: Optional[str] = typer.Option(None, "--data", help="Training/calibration data (needed by learned, block-influence, min-loss)."),
    steps: int = typer.Option(500, "--steps", help="learned: search steps."),
    batch_size: int = typer.Option(64, "--batch-size"),
    lr: float = typer.Option(1e-4, "--lr", help="learned: LoRA (or full) learning rate."),
    logit_lr: float = typer.Option(1e-3, "--logit-lr", help="learned: mask-logit learning rate."),
    tau_start: float = typer.Option(4.0, "--tau-start"), tau_end: float = typer.Option(0.1, "--tau-end"),
    logit_scale: float = typer.Option(100.0, "--logit-scale"), logit_ema: float = typer.Option(0.999, "--logit-ema"),
    recover: str = typer.Option("lora", "--recover", help="learned: lora | full | frozen recovery during the search."),
    lora_rank: int = typer.Option(8, "--lora-rank"), lora_alpha: int = typer.Option(16, "--lora-alpha"),
    keep_recovery_weights: bool = typer.Option(False, "--keep-recovery-weights", help="Merge the recovery weights instead of reloading the originals."),
    calib_samples: int = typer.Option(128, "--calib-samples", help="Calibration samples (block-influence, min-loss, reported loss)."),
    num_candidates: int = typer.Option(16, "--candidates", help="min-loss: random masks to try."),
    influence_input: str = typer.Option("clean", "--influence-input", help="block-influence: clean latents with random t (TinyFusion's scorer) | noisy x_t."),
    measure_cost: bool = typer.Option(True, "--measure-cost/--no-measure-cost", help="learned: time a search step vs a plain training step."),
    seed: int = Seed, ckpt_every: int = Ckpt, resume: bool = Resume, force: bool = Force, json_out: bool = JsonOut,
    num_heads: Optional[int] = NumHeads, prediction: Optional[str] = Prediction, numerics: Optional[str] = Numerics,
):
    """Remove layers: TinyFusion's learned N:M selection (Gumbel masks + LoRA recoverability)
    or a baseline. Writes a smaller standard DiT holding the kept layers' original weights.

    Examples:

        ditc prune-depth --pattern 1:2 digits-dit --data digits --steps 300 -o tiny/

        ditc prune-depth --pattern 1:2 DiT-XL-2 --data latents/ -o tinydit-d14/

        ditc prune-depth --method block-influence --pattern 1:2 digits-dit --data digits -o bi/

        ditc prune-depth --method oracle --keep 0,2,4,6,8,10 digits-dit -o oracle/
    """
    from .compress.depth import LearnedConfig, parse_groups, plot_decisions, prune_depth
    from .formats.atomic import check_output

    check_output(output, force)
    keep_list = _parse_ints(keep, "--keep")
    model = _load(source, _facts(num_heads, prediction, numerics))
    grp = parse_groups(model.config.depth, pattern, groups) if (pattern or groups) else None
    ds = None
    if data is not None:
        from .train.data import load_data

        ds = load_data(data, model.config.num_classes)
    lc = LearnedConfig(steps=steps, batch_size=batch_size, lr=lr, logit_lr=logit_lr, tau_start=tau_start, tau_end=tau_end,
                       logit_scale=logit_scale, logit_ema=logit_ema, recover=recover, lora_rank=lora_rank,
                       lora_alpha=lora_alpha, seed=seed, ckpt_every=ckpt_every)
    work = work_dir_for(output)
    if method == "learned" and not resume and (work / "train_state").exists():
        raise UsageError(f"{work} holds an interrupted search: pass --resume to continue it, or delete it")
    if influence_input not in ("clean", "noisy"):
        raise UsageError(f"--influence-input takes clean or noisy, got {influence_input!r}")
    pruned, report = prune_depth(model, method, grp, keep_list, ds, lc, work, resume, calib_samples, num_candidates,
                                 keep_recovery_weights, measure_cost, influence_input == "noisy")
    report["source"] = source
    _write_checkpoint(pruned, output, force, report, "ditc prune-depth", lambda d: plot_decisions(report, d / "decisions.png"))
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    short = {k: v for k, v in report.items() if k in ("method", "groups", "kept_layers", "depth_after", "params_before",
             "params_after", "gflops_before", "gflops_after", "calib_loss_chosen", "confidence", "seconds", "search_cost")}
    if json_out:
        emit_json(short)
    else:
        out_console.print(kv_table("ditc prune-depth", short))


# ---------------------------------------------------------------------------- DyDiT
def _finish_dynamic(model, source: str, op: str, output: Path, force: bool, json_out: bool) -> None:
    """Write a routed model with its report (width profile PNG) and print the summary."""
    from .describe import describe, plot_width_profile

    report = describe(model)
    report.update(op=op, source=source)

    def plots(out_dir):
        if model.config.width is not None:
            plot_width_profile(model, out_dir / "width_profile.png")

    _write_checkpoint(model, output, force, report, f"ditc {op}", plots)
    _summary({k: v for k, v in report.items() if k not in ("width_profile", "lineage", "kept_layers")}, json_out)


@app.command("add-dynamic-width")
@handle_errors
def add_dynamic_width_cmd(
    source: str = Src, output: Path = Out,
    target_flops: float = typer.Option(0.5, "--target-flops", help="FLOPs ratio lambda the routers are trained toward, in (0, 1]."),
    sort_by: str = typer.Option("magnitude", "--sort-by", help="Head/channel importance: magnitude | taylor (needs --data) | none."),
    data: Optional[str] = typer.Option(None, "--data", help="Data for --sort-by taylor."),
    tau: float = typer.Option(5.0, "--tau", help="Gumbel-sigmoid temperature during training."),
    init_bias: float = typer.Option(15.0, "--init-bias", help="Router bias at start, with xavier weights (DyDiT: 15; high: everything on)."),
    static: bool = typer.Option(False, "--static", help="Static width pruning instead (same heads/channels dropped at every t, routers frozen; the share spread over layers to meet --target-flops): the baseline DyDiT is compared with."),
    seed: int = Seed, force: bool = Force, json_out: bool = JsonOut,
    num_heads: Optional[int] = NumHeads, prediction: Optional[str] = Prediction, numerics: Optional[str] = Numerics,
):
    """Add DyDiT timestep-wise width routers (heads and MLP channel groups). Heads/channels
    are sorted by importance first (the function is unchanged) and the routers start all-on,
    so the output reproduces the source until `finetune`/`distill` trains them toward the target.

    Examples:

        ditc add-dynamic-width digits-dit --target-flops 0.5 -o dyn/ && ditc finetune dyn/ --data digits -o dyn-ft/

        ditc add-dynamic-width DiT-XL-2 --target-flops 0.7 -o dydit-xl/
    """
    from .compress.dynamic import add_dynamic_width

    from .formats.atomic import check_output

    check_output(output, force)
    model = _load(source, _facts(num_heads, prediction, numerics))
    ds = None
    if data is not None:
        from .train.data import load_data

        ds = load_data(data, model.config.num_classes)
    _finish_dynamic(add_dynamic_width(model, target_flops, sort_by, ds, tau, init_bias, static, seed), source,
                    "add-dynamic-width", output, force, json_out)


@app.command("add-token-router")
@handle_errors
def add_token_router_cmd(
    source: str = Src, output: Path = Out,
    reduction: int = typer.Option(16, "--reduction", help="Router MLP D -> D/reduction -> 1."),
    tau: float = typer.Option(5.0, "--tau", help="Gumbel-sigmoid temperature during training (DyDiT: 5)."),
    init_bias: float = typer.Option(35.0, "--init-bias", help="Bias of the router's last layer at start (DyDiT: 35; everything on)."),
    seed: int = Seed, force: bool = Force, json_out: bool = JsonOut,
    num_heads: Optional[int] = NumHeads, prediction: Optional[str] = Prediction, numerics: Optional[str] = Numerics,
):
    """Add DyDiT spatial token routers: before each block's MLP a router picks the tokens
    that enter it; skipped tokens take the residual path only (still attended to).

    Examples:

        ditc add-token-router dyn/ -o dyn-tok/ && ditc finetune dyn-tok/ --data digits -o dyn-tok-ft/

        ditc add-token-router digits-dit -o tok/
    """
    from .compress.dynamic import add_token_router
    from .formats.atomic import check_output

    check_output(output, force)
    model = _load(source, _facts(num_heads, prediction, numerics))
    _finish_dynamic(add_token_router(model, tau, init_bias, reduction, seed), source, "add-token-router",
                    output, force, json_out)


# ---------------------------------------------------------------------------- eval / bench
@app.command("eval")
@handle_errors
def eval_cmd(
    source: str = Src,
    output: Path = typer.Option(..., "-o", "--output", help="Report dir; holds samples/ shards, samples.npz, report.json/.md. Rerun to resume.", show_default=False),
    num_samples: int = typer.Option(1000, "--num-samples", "-n"),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="eps models: ddpm | ddim | dpm-solver (default ddim); velocity models: euler | heun | sde | dopri5 (default euler)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampler steps (default 50; for SiT samplers as SiT's --num-sampling-steps)."),
    guidance_interval: Optional[str] = typer.Option(None, "--guidance-interval", help="LOW,HIGH: guide only while the noise level (1 = noise) is in [LOW, HIGH] (REPA: 0,0.7)."),
    cfg_scale: float = typer.Option(1.0, "--cfg-scale", help="Classifier-free guidance scale (1: off; DiT uses 1.5 for FID)."),
    cfg_channels: Optional[int] = typer.Option(None, "--cfg-channels", help="Guide only the first N channels (3 = reference DiT code); default all latent channels (diffusers)."),
    ref: Optional[str] = typer.Option(None, "--ref", help="digits | an image folder | an ADM .npz with mu/sigma (VIRTUAL_imagenet256_labeled.npz)."),
    metrics: str = typer.Option("fid,prc", "--metrics", help="Comma list of fid, isc, kid, prc."),
    inception_weights: Optional[str] = typer.Option(None, "--inception-weights", help="Local .pth of torch-fidelity's inception-v3-compat weights."),
    extractor: Optional[str] = typer.Option(None, "--extractor", help="digits-cnn (default for the digits testbed) or inception-v3-compat."),
    vae: Optional[str] = typer.Option(None, "--vae", help="VAE for latent models (default: the config's, e.g. stabilityai/sd-vae-ft-ema)."),
    seed: int = Seed, shard_size: int = typer.Option(250, "--shard-size"), batch_size: int = typer.Option(125, "--batch-size"),
    kid_subset_size: Optional[int] = typer.Option(None, "--kid-subset-size"),
    dense_masks: bool = typer.Option(False, "--dense-masks", help="Dynamic models: masked-dense execution (checking reference) instead of sliced/gathered."),
    loss_data: Optional[str] = typer.Option(None, "--loss-data", help="Also report the diffusion loss on held-out data (default digits:test for the digits testbed; 'none' to skip)."),
    grid: bool = typer.Option(True, "--grid/--no-grid", help="Write samples.png (a grid of the first samples)."),
    timestep_spacing: Optional[str] = Spacing,
    json_out: bool = JsonOut,
    num_heads: Optional[int] = NumHeads, prediction: Optional[str] = Prediction, numerics: Optional[str] = Numerics,
):
    """Sample class-balanced images (sharded, resumable, split over `accelerate launch`
    processes) and compute FID / IS / KID / precision-recall with torch-fidelity.

    Examples:

        ditc eval digits-dit -o eval/ -n 2000 --cfg-scale 2

        accelerate launch --num_processes 2 -m dit_compress.cli eval tiny/ -o eval/ -n 2000

        ditc eval tinydit-d14/ -o eval/ -n 50000 --sampler ddpm --steps 250 --cfg-scale 1.5 --ref VIRTUAL_imagenet256_labeled.npz --inception-weights pt_inception-2015-12-05.pth --metrics fid,isc
    """
    from accelerate import PartialState

    from .evaluate.fidelity import evaluate
    from .report import write_report

    from .diffusion.sampling import eval_sampler, resolve_spacing

    interval = _parse_interval(guidance_interval)
    model = _load(source, _facts(num_heads, prediction, numerics))
    sampler, steps = eval_sampler(model.config, sampler, steps)
    resolve_spacing(sampler, timestep_spacing)  # checked before anything is written
    from .model import Routing

    model.routing = Routing.DENSE if dense_masks else Routing.FAST
    state = PartialState(cpu=not __import__("torch").cuda.is_available())
    output.mkdir(parents=True, exist_ok=True)
    if loss_data is None and model.config.latent_scale is None and model.config.input_size == 8:
        loss_data = "digits:test"
    report = evaluate(model, output, num_samples, sampler, steps, cfg_scale, cfg_channels, seed, ref,
                      [m.strip() for m in metrics.split(",") if m.strip()], inception_weights, extractor, vae,
                      shard_size, batch_size, kid_subset_size, state.process_index, state.num_processes,
                      barrier=state.wait_for_everyone, loss_data=None if loss_data == "none" else loss_data,
                      timestep_spacing=timestep_spacing, guidance_interval=interval)
    if report is None:
        return
    if grid:
        _sample_grid_png(output / "samples.png", output, model.config.num_classes)
    report["source"] = source
    write_report(output, report, f"ditc eval: {source}")
    if report.get("warning"):
        err_console.print(f"[bold yellow]warning:[/] {report['warning']}")
    if json_out:
        emit_json(report)
    else:
        out_console.print(kv_table(f"ditc eval: {source}", {**{k: v for k, v in report.items() if k != "metrics"}, **report["metrics"]}))


def _sample_grid_png(path: Path, eval_dir: Path, num_classes: int, per_class: int = 10, scale: int = 4):
    """The first samples of each class, one row per class, from the eval's samples.npz."""
    import numpy as np
    from PIL import Image

    d = np.load(eval_dir / "samples.npz")
    imgs, labels = d["arr_0"], d["labels"]
    rows = min(num_classes, 10)
    H, W = imgs.shape[1:3]
    grid = np.zeros((rows * H, per_class * W, 3), dtype=np.uint8)
    for c in range(rows):
        sel = imgs[labels == c][:per_class]
        for j, a in enumerate(sel):
            grid[c * H:(c + 1) * H, j * W:(j + 1) * W] = a
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


@app.command()
@handle_errors
def bench(
    sources: List[str] = typer.Argument(None, help="Checkpoints (any source) or shape specs; the first is the baseline unless --baseline."),
    shape: Optional[str] = typer.Option(None, "--shape", help="Benchmark an architecture with random weights, e.g. DiT-XL/2."),
    variants: Optional[str] = typer.Option(None, "--variants", help="With --shape: comma list of transforms, e.g. d14,d7,width0.5,tokens0.5,width0.5+tokens0.5."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="Baseline source (default: the first)."),
    batch_sizes: str = typer.Option("1,8", "--batch-sizes"),
    repeats: int = typer.Option(5, "--repeats"), warmup: int = typer.Option(2, "--warmup"),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="Whose timesteps the forwards use (default: ddim for eps models, euler for velocity models)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampler steps (default 50): dynamic models are timed and counted over these timesteps."),
    device: str = typer.Option("cpu", "--device", help="cpu (cuda: not measured on this build)."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 | bf16 | fp16"),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile each model's forward (compile time: first_run_s in --loop mode)."),
    loop: bool = typer.Option(False, "--loop", help="Time the whole sampling loop (--sampler, --steps, --cfg-scale; routers act as in eval): seconds_per_image, images_per_s, FLOPs per image over the loop."),
    cfg_scale: float = typer.Option(1.0, "--cfg-scale", help="--loop: classifier-free guidance scale (> 1 doubles every forward)."),
    dense_masks: bool = typer.Option(False, "--dense-masks", help="Time dynamic models on the masked-dense path."),
    threads: Optional[int] = typer.Option(None, "--threads"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Report dir (report.json/.md, speed_vs_flops.png)."),
    timestep_spacing: Optional[str] = Spacing,
    force: bool = Force, json_out: bool = JsonOut,
    num_heads: Optional[int] = NumHeads, prediction: Optional[str] = Prediction, numerics: Optional[str] = Numerics,
):
    """Measure speed side by side: analytic FLOPs, forward latency (median, IQR), images/s,
    peak memory, and speedup next to the FLOPs ratio (flagged where they diverge).

    Examples:

        ditc bench --shape DiT-XL/2 --variants d14,d7 --batch-sizes 1,8

        ditc bench --shape DiT-XL/2 --variants width0.5,tokens0.5 -o bench-xl/

        ditc bench digits-dit tiny/ tiny-kd/ --batch-sizes 1,64 --json

        ditc bench --loop --sampler ddim --steps 50 --cfg-scale 1.5 digits-dit tiny/ dyn/ --batch-sizes 1,8
    """
    from .diffusion.sampling import resolve_spacing
    from .evaluate.bench import compare, measure, parse_spec, plot_speed_vs_flops
    from .report import write_report

    if device != "cpu":
        raise UsageError("only --device cpu is measured in this build")
    specs = list(sources or [])
    if shape:
        specs = [f"shape:{shape}"] + [f"shape:{shape}+{v.strip()}" for v in (variants or "").split(",") if v.strip()] + specs
    elif variants:
        raise UsageError("--variants goes with --shape")
    if baseline:
        specs = [baseline] + [s for s in specs if s != baseline]
    if not specs:
        raise UsageError("nothing to benchmark: give sources or --shape")
    for s in specs:
        parse_spec(s)  # every spec is checked before anything runs
    bs = _parse_ints(batch_sizes, "--batch-sizes")
    if output is not None:
        from .formats.atomic import check_output

        check_output(output, force)
    if sampler is not None:
        resolve_spacing(sampler, timestep_spacing)  # checked before anything runs
    results = []
    for s in specs:
        err_console.print(f"measuring {s} ...")
        results.append(measure(s, bs, repeats, warmup, (sampler, steps, timestep_spacing), threads, dtype, compile_, dense_masks,
                               load=_facts(num_heads, prediction, numerics), loop={"cfg_scale": cfg_scale} if loop else None))
    rows = compare(results)
    report = {"mode": "sampling loop" if loop else "single forward", "cfg_scale": cfg_scale if loop else None,
              "sampler": {r["spec"]: r.get("sampler") for r in results}, "device": device, "dtype": dtype, "threads": threads or __import__("torch").get_num_threads(),
              "repeats": repeats, "warmup": warmup, "timesteps": {r["spec"]: r.get("timesteps") for r in results},
              "baseline": specs[0], "rows": rows}
    if output is not None:
        from .formats.atomic import atomic_dir

        with atomic_dir(output, force) as tmp:
            write_report(tmp, report, "ditc bench")
            plot_speed_vs_flops(rows, tmp / "speed_vs_flops.png")
    if json_out:
        emit_json(report)
    else:
        cols = ("model", "batch", "gflops", "flops_ratio", "latency_ms", "iqr_ms", "speedup", "peak_rss_mb", "diverges")
        if loop:
            cols = ("model", "batch", "gflops", "flops_ratio", "seconds_per_image", "images_per_s", "speedup", "first_run_s", "diverges")
        out_console.print(rows_table(f"ditc bench (baseline {specs[0]})", [{k: r.get(k) for k in cols} for r in rows]))


@app.command("prepare-data")
@handle_errors
def prepare_data_cmd(
    images: Path = typer.Argument(..., help="Image folder with one sub-folder per class.", show_default=False),
    output: Path = Out,
    vae: Optional[str] = typer.Option("stabilityai/sd-vae-ft-ema", "--vae", help="VAE (hub id or local dir); 'none' stores pixels."),
    image_size: int = typer.Option(256, "--image-size"),
    batch_size: int = typer.Option(32, "--batch-size"),
    shard_size: int = typer.Option(1024, "--shard-size"),
    json_out: bool = JsonOut,
):
    """Encode an image folder into latent shards (center crop, image + horizontal flip,
    scale 0.18215) for `finetune` / `distill` / `prune-depth --data`. Rerun to resume.

    Examples:

        ditc prepare-data /data/imagenet/train -o imagenet256-latents/

        ditc prepare-data my-images/ --vae ./local-vae --image-size 512 -o latents512/
    """
    from .train.images import prepare

    if output.exists() and not (output / "manifest.json").exists() and not list(output.glob("shard-*.safetensors")) and any(output.iterdir()):
        raise UsageError(f"output {output} exists and is not a latent-shard folder")
    info = prepare(images, output, None if vae in (None, "none") else vae, image_size, batch_size, shard_size)
    _summary({"op": "prepare-data", **info}, json_out)


# ---------------------------------------------------------------------------- recipes
@app.command("run")
@handle_errors
def run_cmd(
    recipe: str = typer.Argument(..., help="A recipe YAML file or a built-in name (see `ditc recipes`).", show_default=False),
    overrides: List[str] = typer.Argument(None, help="key=value (recipe variables) or step.option=value.", show_default=False),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Run directory (default runs/<recipe name>); rerun to resume."),
    json_out: bool = JsonOut,
):
    """Run a recipe: subcommand steps chained through one run directory, checked before
    anything runs, resumed at the first unfinished step.

    Examples:

        ditc run recipes/quickstart.yaml

        ditc run quickstart prune_steps=50 distill_steps=50 -o runs/qs-small

        ditc run recipes/tinydit-d14.yaml data=/data/imagenet-latents
    """
    from .pipeline import run_recipe

    summary = run_recipe(recipe, output, list(overrides or []), echo=lambda m: err_console.print(m, highlight=False, markup=False))
    if json_out:
        emit_json(summary)
        return
    if summary["quality"]:
        out_console.print(rows_table("quality", summary["quality"]))
    if summary["speed"]:
        out_console.print(rows_table("speed", summary["speed"]))


@app.command("recipes")
@handle_errors
def recipes_cmd():
    """List the built-in recipes.

    Example:

        ditc recipes
    """
    import yaml

    from .pipeline import builtin_recipes

    rows = []
    for name, path in builtin_recipes().items():
        d = yaml.safe_load(path.read_text()) or {}
        rows.append({"name": name, "steps": " -> ".join(s.get("command", "?") for s in d.get("steps", [])),
                     "description": (d.get("description", "").split(". ")[0].strip() + ".")})
    out_console.print(rows_table("built-in recipes", rows))


def _summary(report: dict, json_out: bool):
    short = {k: v for k, v in report.items() if k not in ("history",)}
    if json_out:
        emit_json(short)
    else:
        out_console.print(kv_table(f"ditc {report.get('op', '')}", short))


def main():
    app()


if __name__ == "__main__":
    main()
