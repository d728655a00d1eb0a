"""``ditc``: the command-line shell over the library. Each command parses its options,
calls the library, renders a rich table and writes reports. Bad input exits with one
line: code 2 for usage errors, 1 for runtime errors."""

from __future__ import annotations

import functools
import inspect
import json
import re
import sys
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import commands
from .commands.compression import SUMMARY_KEYS
from .errors import DitcError
from .pipeline import recipe_table, run_recipe
from .report import columns

# click's exception classes, wherever this typer takes click from (its own copy since 0.16)
_CLICK = sys.modules[typer.BadParameter.__module__]
_NO_ARGS = getattr(_CLICK, "NoArgsIsHelpError", ())


class OneLineErrors(typer.core.TyperGroup):
    """Usage errors found while parsing (a missing argument, a value of the wrong type) are
    one line on stderr and exit code 2, like every error the library raises."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except _NO_ARGS as e:
            typer.echo(e.ctx.get_help() if e.ctx is not None else e.format_message())
            sys.exit(0)
        except _CLICK.ClickException as e:
            ctx = getattr(e, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            message = " ".join(e.format_message().split())
            err_console.print(f"[bold red]error:[/] {escape(message)}{escape(hint)}", highlight=False, soft_wrap=True)
            sys.exit(e.exit_code)
        except typer.Abort:
            err_console.print("[bold red]error:[/] interrupted", highlight=False)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    name="ditc",
    cls=OneLineErrors,
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

    flags = flag_names(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DitcError as e:
            err_console.print(f"[bold red]error:[/] {escape(as_flags(str(e), flags))}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code)
        except KeyboardInterrupt:
            err_console.print("[bold red]error:[/] interrupted", highlight=False)
            raise typer.Exit(130)
        except OSError as e:  # the machine, not the input: a full disk, a vanished file
            where = f": {e.filename}" if getattr(e, "filename", None) else ""
            err_console.print(f"[bold red]error:[/] {escape(e.strerror or str(e))}{escape(where)}", highlight=False,
                              soft_wrap=True)
            raise typer.Exit(1)

    return wrapper


PARAM_RE = re.compile(r"`([a-z][a-z0-9_]*)`")


def flag_names(fn) -> dict[str, str]:
    """A command's parameters spelled differently on the command line (num_candidates -> --candidates)."""
    out = {}
    for name, p in inspect.signature(fn).parameters.items():
        decls = [d for d in getattr(p.default, "param_decls", None) or () if d.startswith("--")]
        if decls:
            out[name] = decls[0].split("/")[0]
    return out


def as_flags(message: str, flags: dict[str, str] | None = None) -> str:
    """Library messages name parameters as `name`; on the command line they are flags."""
    flags = flags or {}
    return PARAM_RE.sub(lambda m: flags.get(m.group(1), "--" + m.group(1).replace("_", "-")), message)


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
    cols = columns(rows)
    for c in cols:
        t.add_column(c)
    for r in rows:
        t.add_row(*[f"{r.get(c):.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols])
    return t


def fmt_gflops(g: float) -> str:
    return f"{g:.2f}" if g < 10 else f"{g:.1f}"


def _options(local: dict) -> dict:
    """A command's parsed options as the keywords of its library function."""
    opts = {k: v for k, v in local.items() if k not in ("source", "sources", "json_out")}
    if "compile_" in opts:  # `compile` would shadow the builtin in the command's signature
        opts["compile"] = opts.pop("compile_")
    return opts


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
    d = commands.info(source, arch=arch, sampler=sampler, steps=steps, timestep_spacing=timestep_spacing,
                      cfg_scale=cfg_scale, revision=revision, no_ema=no_ema, num_heads=num_heads, prediction=prediction, numerics=numerics)
    if json_out:
        emit_json(d)
        return
    d = dict(d)
    d["gflops"] = fmt_gflops(d["gflops"])
    d["params"] = f"{d['params']:,}"
    out_console.print(kv_table(f"ditc info: {source}", d))


@app.command()
@handle_errors
def convert(source: str = Src, output: str = Out,
            to: str = typer.Option("ditc", "--to", help="ditc | diffusers | original"),
            dtype: Optional[str] = typer.Option(None, "--dtype", help="fp32 | bf16 | fp16 (default: keep float32)"),
            revision: Optional[str] = Revision, no_ema: bool = NoEma,
            num_heads: Optional[int] = NumHeads, prediction: Optional[str] = Prediction, numerics: Optional[str] = Numerics,
            text_encoder: Optional[str] = typer.Option(None, "--text-encoder", help="PixArt with --to diffusers: a pipeline (or encoder) dir whose text encoder and tokenizer the written pipeline carries (with a DDIM scheduler; a latent model also its vae/, so a whole pipeline dir), so diffusers' PixArtAlphaPipeline loads it whole."),
            force: bool = Force):
    """Convert between layouts: ditc checkpoint, diffusers (DiTTransformer2DModel, PixArtTransformer2DModel), original .pt.

    Examples:

        ditc convert DiT-XL-2 -o xl-ditc/

        ditc convert tiny/ --to diffusers -o tiny-diffusers/

        ditc convert DiT-XL-2-256.pt --to ditc --dtype bf16 -o xl-bf16/

        ditc convert my-dit.pt --num-heads 4 -o my-dit/      # heads of an unpublished size, recorded once

        ditc convert t2i-tuned/ --to diffusers --text-encoder digits-pixart --dtype fp16 -o t2i-pipe/
    """
    commands.convert(source, output=output, to=to, dtype=dtype, revision=revision, no_ema=no_ema, force=force,
                     num_heads=num_heads, prediction=prediction, numerics=numerics, text_encoder=text_encoder)
    err_console.print(f"wrote {to} checkpoint {output}")


@app.command()
@handle_errors
def create(arch: str = typer.Argument(..., help="DiT-S/2, DiT-B/4, DiT-XL/2 ... or 'custom' with the options below."),
           output: str = Out,
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
           family: str = typer.Option("dit", "--family", help="dit (class-conditional DiT / SiT) | pixart (text-to-image PixArt-alpha: give --caption-channels) | mar (masked autoregressive: --depth counts both stacks, give --buffer-size and --head)."),
           buffer_size: Optional[int] = typer.Option(None, "--buffer-size", help="MAR: the buffer tokens holding the class embedding (MAR's 64)."),
           head: Optional[str] = typer.Option(None, "--head", help="MAR: the diffusion head's res-blocks,width (MAR-L 8,1280)."),
           caption_channels: Optional[int] = typer.Option(None, "--caption-channels", help="PixArt: the text encoder's feature width (T5-XXL 4096)."),
           caption_length: Optional[int] = typer.Option(None, "--caption-length", help="PixArt: the tokens its tokenizer pads captions to (PixArt-alpha 120)."),
           text_encoder: Optional[str] = typer.Option(None, "--text-encoder", help="PixArt: write a whole diffusers pipeline dir with this text encoder: a pipeline or encoder dir (copied; a latent model also takes the pipeline's vae/), or digits-t5 (the testbed's word-level T5, built; pixel models)."),
           force: bool = Force):
    """Create a freshly initialised network (its family's reference initialisation) as a ditc checkpoint.

    Examples:

        ditc create DiT-S/2 -o s2/

        ditc create custom --input-size 8 --patch-size 1 --in-channels 1 --hidden-size 128 --depth 12 --num-heads 4 --num-classes 10 --pixel -o digits-new/

        ditc create custom --family mar --input-size 8 --patch-size 2 --in-channels 1 --hidden-size 128 --depth 8 --num-heads 4 --num-classes 10 --buffer-size 4 --head 3,128 --pixel -o mar-new/

        ditc create custom --family pixart --caption-channels 64 --caption-length 16 --input-size 8 --patch-size 1 --in-channels 1 --hidden-size 128 --depth 8 --num-heads 4 --pixel --text-encoder digits-t5 -o t2i-new/
    """
    model = commands.create(arch, output=output, input_size=input_size, in_channels=in_channels,
                            hidden_size=hidden_size, depth=depth, num_heads=num_heads, patch_size=patch_size,
                            num_classes=num_classes, learn_sigma=learn_sigma, pixel=pixel, prediction=prediction,
                            name=name, label_init_std=label_init_std, seed=seed, family=family,
                            caption_channels=caption_channels, caption_length=caption_length,
                            text_encoder=text_encoder, buffer_size=buffer_size, head=head, force=force)
    err_console.print(f"wrote {output} ({model.num_params():,} parameters)")


# ---------------------------------------------------------------------------- training
Steps = typer.Option(1000, "--steps", help="Optimizer steps.")
Batch = typer.Option(64, "--batch-size", help="Per-process batch size.")
Lr = typer.Option(1e-4, "--lr", help="AdamW learning rate.")
Ema = typer.Option(None, "--ema", help="EMA decay of the written weights (0: the raw weights). Default: scaled to the run, a window of 5% of the steps, at most the papers' 0.9999 (reached at 200K steps); 0.933 at 300 steps.", show_default=False)
Seed = typer.Option(0, "--seed")
Clip = typer.Option(1.0, "--grad-clip")
Accum = typer.Option(1, "--grad-accum")
Warm = typer.Option(0, "--warmup", help="LR warm-up steps.")
Sched = typer.Option("constant", "--schedule", help="constant | cosine | linear")
Ckpt = typer.Option(0, "--ckpt-every", help="Save resumable state every N steps (0: only on interrupt).")
MP = typer.Option("no", "--mixed-precision", help="no | bf16 | fp16 (GPU only)")
WD = typer.Option(0.0, "--weight-decay")
Resume = typer.Option(False, "--resume", help="Continue an interrupted run of the same command and output.")
FlopsHold = typer.Option(None, "--flops-hold", help="Dynamic models: steps the FLOPs target stays at 1.0. Default: DyDiT's 100 of 150K steps, scaled to the run (0 under 750 steps).", show_default=False)
FlopsDecay = typer.Option(None, "--flops-decay", help="Dynamic models: steps from 1.0 down to the target (DyDiT: about 3% of training; default 3% of --steps).")
FullLoss = typer.Option(1.0, "--full-model-loss", help="Dynamic models: weight of the full-width model's diffusion loss added each step (DyDiT stage 1: 1.0; 0 turns it off).")
FullSteps = typer.Option(None, "--full-model-steps", help="Dynamic models: steps that add the full-model loss (default all, as DyDiT's lambda 0.7 run).")
TStrata = typer.Option(4, "--t-strata", help="Dynamic models: timestep ranges the batch is stratified over (DyDiT: 4; 0 = uniform).")
Data = typer.Option(..., "--data", help="digits | a latents dir (*_features/*.npy or shard-*.safetensors) | an image folder", show_default=False)


@app.command()
@handle_errors
def finetune(source: str = Src, output: str = Out, data: str = Data, steps: int = Steps, batch_size: int = Batch,
             lr: float = Lr, ema: Optional[float] = Ema, seed: int = Seed, grad_clip: float = Clip, grad_accum: int = Accum,
             warmup: int = Warm, schedule: str = Sched, ckpt_every: int = Ckpt, mixed_precision: str = MP,
             weight_decay: float = WD, resume: bool = Resume, force: bool = Force, json_out: bool = JsonOut,
             flops_hold: Optional[int] = FlopsHold, flops_decay: Optional[int] = FlopsDecay, full_model_loss: float = FullLoss,
             full_model_steps: Optional[int] = FullSteps, t_strata: int = TStrata,
             num_heads: Optional[int] = NumHeads, prediction: Optional[str] = Prediction, numerics: Optional[str] = Numerics):
    """Fine-tune with the DiT hybrid loss (eps MSE + VLB). Dynamic models also train their
    routers toward the FLOPs target in their config. Runs under `accelerate launch` unchanged.

    Examples:

        ditc finetune tiny/ --data digits --steps 500 -o tiny-ft/

        accelerate launch --num_processes 2 -m dit_compress.cli finetune tiny/ --data latents/ -o tiny-ft/
    """
    _, report = commands.finetune(source, **_options(locals()))
    _summary(report, json_out)


@app.command()
@handle_errors
def distill(source: str = Src, output: str = Out, teacher: str = typer.Option(..., "--teacher", help="Teacher model source.", show_default=False),
            data: str = Data, kd_out: float = typer.Option(0.9, "--kd-out", help="Weight of output KD (eps MSE + variance KL)."),
            kd_plain: float = typer.Option(0.1, "--kd-plain", help="Weight of the plain diffusion loss."),
            kd_rep: float = typer.Option(0.0, "--kd-rep", help="Weight beta of masked representation KD (TinyFusion: 1e-2), decays to 0."),
            k_sigma: Optional[float] = typer.Option(None, "--k-sigma", help="Mask out block activations with |h - mu| >= k sigma. [default: 2.0, TinyFusion's]", show_default=False),
            no_rep_mask: bool = typer.Option(False, "--no-rep-mask", help="Plain RepKD without the massive-activation mask."),
            rep_pairs: str = typer.Option("paper", "--rep-pairs", help="paper: student i <-> teacher (i+1)*T//S-1 (TinyFusion; 2i+1 for 28->14) | kept: from the kept-layer indices."),
            rep_mask_form: Optional[str] = typer.Option(None, "--rep-mask-form", help="paper: mean((m_s*h_s - m_t*h_t)^2) over all elements (TinyFusion) | joint: both masks, renormalised. [default: paper]", show_default=False),
            steps: int = Steps, batch_size: int = Batch, lr: float = Lr, ema: Optional[float] = Ema, seed: int = Seed,
            grad_clip: float = Clip, grad_accum: int = Accum, warmup: int = Warm, schedule: str = Sched,
            ckpt_every: int = Ckpt, mixed_precision: str = MP, weight_decay: float = WD, resume: bool = Resume,
            force: bool = Force, json_out: bool = JsonOut,
            flops_hold: Optional[int] = FlopsHold, flops_decay: Optional[int] = FlopsDecay, full_model_loss: float = FullLoss,
            full_model_steps: Optional[int] = FullSteps, t_strata: int = TStrata,
            num_heads: Optional[int] = NumHeads, prediction: Optional[str] = Prediction, numerics: Optional[str] = Numerics):
    """Distill a (compressed) student from a teacher: output KD, TinyFusion's masked
    representation KD (layer map from the kept-layer indices), mixed with the plain loss.
    On a MAR the output KD compares the heads on the masked tokens and RepKD pairs blocks
    within each stack.

    Examples:

        ditc distill tiny/ --teacher digits-dit --data digits --kd-rep 0.01 --steps 500 -o tiny-kd/

        ditc distill tiny/ --teacher DiT-XL-2 --data latents/ --kd-rep 0.01 --lr 2e-4 -o tiny-kd/

        ditc distill tinymar/ --teacher digits-mar --data digits --kd-rep 0.01 --steps 300 -o tinymar-kd/
    """
    _, report = commands.distill(source, **_options(locals()))
    _summary(report, json_out)


# ---------------------------------------------------------------------------- prune-depth
@app.command("prune-depth")
@handle_errors
def prune_depth_cmd(
    source: str = Src, output: str = Out,
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
    measure_cost: Optional[bool] = typer.Option(None, "--measure-cost/--no-measure-cost", help="learned: time a search step vs a plain training step (two copies of the model and an extra forward+backward). Default: on for models up to 50M parameters (the testbeds), off above (minutes and ~20 GB at DiT-XL).", show_default=False),
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
    _, report = commands.prune_depth(source, **_options(locals()))
    if report is not None:  # None on processes other than the main one
        _summary({k: v for k, v in report.items() if k in SUMMARY_KEYS} | {"op": "prune-depth"}, json_out)


# ---------------------------------------------------------------------------- DyDiT
@app.command("add-dynamic-width")
@handle_errors
def add_dynamic_width_cmd(
    source: str = Src, output: str = Out,
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
    _, report = commands.add_dynamic_width(source, **_options(locals()))
    _summary({k: v for k, v in report.items() if k not in ("width_profile", "lineage", "kept_layers")}, json_out)


@app.command("add-token-router")
@handle_errors
def add_token_router_cmd(
    source: str = Src, output: str = Out,
    reduction: int = typer.Option(16, "--reduction", help="Router MLP D -> D/reduction -> 1."),
    tau: float = typer.Option(5.0, "--tau", help="Gumbel-sigmoid temperature during training (DyDiT: 5)."),
    init_bias: float = typer.Option(35.0, "--init-bias", help="Bias of the router's last layer at start (DyDiT: 35; everything on)."),
    target_flops: Optional[float] = typer.Option(None, "--target-flops", help="Block FLOPs ratio fine-tuning trains toward (DyDiT's lambda). Default: the width routers' target when the model has them; token routers alone then have none (they train toward 1.0)."),
    seed: int = Seed, force: bool = Force, json_out: bool = JsonOut,
    num_heads: Optional[int] = NumHeads, prediction: Optional[str] = Prediction, numerics: Optional[str] = Numerics,
):
    """Add DyDiT spatial token routers: before each block's MLP a router picks the tokens
    that enter it; skipped tokens take the residual path only (still attended to).

    Examples:

        ditc add-token-router dyn/ -o dyn-tok/ && ditc finetune dyn-tok/ --data digits -o dyn-tok-ft/

        ditc add-token-router digits-dit -o tok/
    """
    _, report = commands.add_token_router(source, **_options(locals()))
    _summary({k: v for k, v in report.items() if k not in ("width_profile", "lineage", "kept_layers")}, json_out)


# ---------------------------------------------------------------------------- eval / bench
@app.command("eval")
@handle_errors
def eval_cmd(
    source: str = Src,
    output: str = typer.Option(..., "-o", "--output", help="Report dir; holds samples/ shards, samples.npz, report.json/.md. Rerun to resume.", show_default=False),
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
    vae: Optional[str] = typer.Option(None, "--vae", help="VAE for latent models (default: the config's, e.g. stabilityai/sd-vae-ft-ema; a MAR: its kl16.ckpt)."),
    seed: int = Seed, shard_size: int = typer.Option(250, "--shard-size"), batch_size: int = typer.Option(125, "--batch-size"),
    kid_subset_size: Optional[int] = typer.Option(None, "--kid-subset-size"),
    dense_masks: bool = typer.Option(False, "--dense-masks", help="Dynamic models: masked-dense execution (checking reference) instead of sliced/gathered."),
    loss_data: Optional[str] = typer.Option(None, "--loss-data", help="Also report the diffusion loss on held-out data (default: digits:test for models whose lineage trained on digits, none otherwise; 'none' to skip)."),
    grid: bool = typer.Option(True, "--grid/--no-grid", help="Write samples.png (a grid of the first samples)."),
    timestep_spacing: Optional[str] = Spacing,
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the model (first_batch_seconds holds the compile; steady_seconds_per_image the rest)."),
    device: str = typer.Option("auto", "--device", help="auto (the process's GPU under accelerate launch, CUDA when present, else the CPU) | cpu | cuda | cuda:N."),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="Reuse a finished eval whose every input is the same (model weights, settings, metrics, reference contents): the base-model evals shipped for the quickstart, and, when DITC_CACHE_DIR names a folder, every eval stored there before. The report names where it came from."),
    prompts: Optional[str] = typer.Option(None, "--prompts", help="Text-to-image models: a text file (one prompt per line) or caption shards (prepare-data --text-encoder); sampled in turn."),
    text_encoder: Optional[str] = typer.Option(None, "--text-encoder", help="Encodes a prompt file (a local pipeline dir with text_encoder/ and tokenizer/); default: the source's, when it is a pipeline dir."),
    clip: Optional[str] = typer.Option(None, "--clip", help="A local CLIP model dir (CLIPModel + tokenizer + image processor): adds the CLIP score of each image with its prompt."),
    feature_cache: Optional[str] = typer.Option(None, "--feature-cache", help="A feature caching policy over every sampling run: fora:N, fbcache:T, taylorseer:N,O (skip rate and FLOPs of what ran reported)."),
    fidelity_ref: Optional[str] = typer.Option(None, "--fidelity-ref", help="An earlier eval output from the same noise (same seed, -n, shard and batch sizes), e.g. of the uncompressed model: adds the per-pixel MSE and PSNR against its samples."),
    force: bool = Force,
    json_out: bool = JsonOut,
    num_heads: Optional[int] = NumHeads, prediction: Optional[str] = Prediction, numerics: Optional[str] = Numerics,
):
    """Sample class-balanced images (text-to-image models: the prompts in turn; sharded,
    resumable, split over `accelerate launch` processes) and compute FID / IS / KID /
    precision-recall with torch-fidelity, and the CLIP score with a local CLIP model.

    Examples:

        ditc eval digits-dit -o eval/ -n 2000 --cfg-scale 2

        ditc eval dyn/ -o eval-c/ -n 2000 --cfg-scale 2 --compile

        accelerate launch --num_processes 2 -m dit_compress.cli eval tiny/ -o eval/ -n 2000

        ditc eval tinydit-d14/ -o eval/ -n 50000 --sampler ddpm --steps 250 --cfg-scale 1.5 --ref VIRTUAL_imagenet256_labeled.npz --inception-weights pt_inception-2015-12-05.pth --metrics fid,isc

        ditc eval pixart-pipeline/ --prompts prompts.txt --cfg-scale 4.5 --ref coco-val/ --inception-weights pt_inception.pth --clip ./clip-vit-b32 -n 1000 -o eval-t2i/

        ditc eval digits-dit -o eval-fora2/ -n 500 --cfg-scale 2 --feature-cache fora:2 --fidelity-ref eval-base/
    """
    report = commands.evaluate_model(source, **_options(locals()))
    if report is None:  # not the main process
        return
    if report.get("warning"):
        err_console.print(f"[bold yellow]warning:[/] {report['warning']}")
    if json_out:
        emit_json(report)
    else:
        out_console.print(kv_table(f"ditc eval: {source}", {**{k: v for k, v in report.items() if k != "metrics"}, **report["metrics"]}))


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
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present, else the CPU) | cpu | cuda | cuda:N."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 | bf16 | fp16"),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile each model (--loop: compile time in warmup_s; graphs compiled: graphs)."),
    loop: bool = typer.Option(False, "--loop", help="Time the whole sampling loop (--sampler, --steps, --cfg-scale; routers act as in eval): seconds_per_image, images_per_s, FLOPs per image over the loop."),
    cfg_scale: float = typer.Option(1.0, "--cfg-scale", help="--loop: classifier-free guidance scale (> 1 doubles every forward)."),
    dense_masks: bool = typer.Option(False, "--dense-masks", help="Time dynamic models on the masked-dense path."),
    threads: Optional[int] = typer.Option(None, "--threads"),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="Report dir (report.json/.md, speed_vs_flops.png)."),
    timestep_spacing: Optional[str] = Spacing,
    force: bool = Force, json_out: bool = JsonOut,
    num_heads: Optional[int] = NumHeads, prediction: Optional[str] = Prediction, numerics: Optional[str] = Numerics,
    cuda_graphs: str = typer.Option("auto", "--cuda-graphs", help="auto (on a CUDA device, each model that can be captured runs as CUDA graphs, one per shape and width profile) | on (refused where not) | off."),
    token_capacity: Optional[float] = typer.Option(None, "--token-capacity", help="Token-routed models: the share of tokens each block's MLP takes (top-k by router score; static shapes, no host sync), in (0, 1]."),
    feature_cache: Optional[str] = typer.Option(None, "--feature-cache", help="--loop: a feature caching policy over the sampling run: fora:N, fbcache:T, taylorseer:N,O (skip rate and FLOPs of what ran reported)."),
):
    """Measure speed side by side: analytic FLOPs, forward latency (median, IQR), images/s,
    peak memory (CUDA: the allocator's peak of the timed runs), and speedup next to the FLOPs
    ratio (flagged where they diverge). Each model is built in its own process on the measuring
    device (shapes: random weights drawn there).

    Examples:

        ditc bench --shape DiT-XL/2 --variants d14,d7 --batch-sizes 1,8

        ditc bench --shape DiT-XL/2 --variants width0.5,tokens0.5 -o bench-xl/

        ditc bench digits-dit tiny/ tiny-kd/ --batch-sizes 1,64 --json

        ditc bench --loop --sampler ddim --steps 50 --cfg-scale 1.5 digits-dit tiny/ dyn/ --batch-sizes 1,8

        ditc bench --shape DiT-XL/2 --variants d14,width0.5,dynwidth0.5,tokens0.5 --device cuda --dtype bf16 --batch-sizes 1,64

        ditc bench --loop --shape DiT-XL/2 --variants d14 --feature-cache fora:2 --sampler ddim --steps 50 --cfg-scale 1.5 --batch-sizes 8
    """
    opts = _options(locals())
    report = commands.bench(sources, echo=lambda m: err_console.print(m), **opts)
    if json_out:
        emit_json(report)
    else:
        _bench_table(report, loop, compile_)
    if report["failed"]:  # the others were measured and reported; the run still failed
        raise DitcError(f"{len(report['failed'])} of the models could not be measured: "
                        + "; ".join(f"{k}: {v}" for k, v in report["failed"].items()))


def _bench_table(report: dict, loop: bool, compile_: bool) -> None:
    cols = ("model", "batch", "gflops", "flops_ratio", "latency_ms", "iqr_ms", "speedup", "peak_mb", "diverges")
    if loop:
        cols = ("model", "batch", "gflops", "flops_ratio", "seconds_per_image", "images_per_s", "speedup", "warmup_s", "diverges")
    if compile_:
        cols = cols + ("graphs",)
    out_console.print(rows_table(f"ditc bench (baseline {report['baseline']})", [{k: r.get(k) for k in cols} for r in report["rows"]]))


@app.command("learn-cache")
@handle_errors
def learn_cache_cmd(
    source: str = Src, output: str = Out,
    data: str = typer.Option(..., "--data", help="digits | a latents dir | an image folder: the batches the schedule is learned on.", show_default=False),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="The sampler the schedule is for: ddim | ddpm (eps models), euler | sde (flow models). [default: ddim, or euler for a flow model]", show_default=False),
    steps: int = typer.Option(50, "--steps", help="Its steps: the schedule holds one row per step."),
    timestep_spacing: Optional[str] = Spacing,
    iters: int = typer.Option(300, "--iters", help="Training draws (a batch and a step each)."),
    batch_size: int = typer.Option(16, "--batch-size"),
    lr: float = typer.Option(0.1, "--lr", help="Learning rate of the router logits (Adam)."),
    sparsity: float = typer.Option(0.01, "--sparsity", help="Weight of the gates' mean in the loss: more caches more."),
    threshold: float = typer.Option(0.1, "--threshold", help="Gates at or below it reuse their block's residual at that step (Learning-to-Cache's 0.1)."),
    every_step: bool = typer.Option(False, "--every-step", help="Let every step after the first reuse (default: every other step, counting back from the last, as Learning-to-Cache; a reused residual is then never more than one step old)."),
    seed: int = Seed, force: bool = Force, json_out: bool = JsonOut,
    revision: Optional[str] = Revision, no_ema: bool = NoEma,
    num_heads: Optional[int] = NumHeads, prediction: Optional[str] = Prediction, numerics: Optional[str] = Numerics,
):
    """Learning-to-Cache: with the model frozen, learn for each step of a sampler and each block
    whether the block may reuse its residual of the step before. The written model keeps the
    schedule in its config; eval, bench and sample follow it for that sampler and step count
    (another one is refused; --feature-cache none runs uncached).

    Examples:

        ditc learn-cache digits-dit --data digits --sampler ddim --steps 50 -o digits-l2c/

        ditc learn-cache digits-sit --data digits --sampler euler --steps 50 -o sit-l2c/

        ditc eval digits-l2c/ -o eval-l2c/ -n 500 --sampler ddim --steps 50 --cfg-scale 2 --fidelity-ref eval-base/
    """
    opts = _options(locals())
    _, report = commands.learn_cache(source, **opts)
    _summary({k: v for k, v in report.items() if k != "history"}, json_out)


@app.command("frontier")
@handle_errors
def frontier_cmd(
    run_dirs: List[str] = typer.Argument(..., help="Recipe run dirs or eval outputs; the same eval name in several dirs (seeds) is one point with its mean and sd.", show_default=False),
    output: str = Out,
    base: Optional[str] = typer.Option(None, "--base", help="The source whose uncached evals at fewer sampler steps are the baseline (default: the one source with evals at several step counts)."),
    seconds_from: Optional[List[str]] = typer.Option(None, "--seconds-from", help="A run dir whose evals alone give the seconds per image (timed on a quiet machine); the quality still averages every run dir. Repeatable.", show_default=False),
    force: bool = Force, json_out: bool = JsonOut,
):
    """Every eval on one speed-quality frontier: measured seconds per image against FID, fidelity
    to the base from the same noise (PSNR) and held-out loss; Pareto-optimal points marked, and
    the base model at fewer sampler steps always drawn (the cheapest competitor of every method).
    Writes report.json/.md, frontier.md and frontier_fid/psnr/loss.png.

    Examples:

        ditc frontier runs/frontier-s0 runs/frontier-s1 runs/frontier-s2 -o frontier/

        ditc frontier eval-base-10/ eval-base-50/ eval-fora2/ --base digits-dit -o frontier/

        ditc frontier runs/frontier-s0 runs/frontier-s1 --seconds-from runs/frontier-s0 -o frontier/
    """
    report = commands.frontier(run_dirs, output=output, base=base, seconds_from=seconds_from, force=force)
    if json_out:
        emit_json(report)
        return
    cols = ("point", "steps", "feature_cache", "seconds_per_image", "frechet_inception_distance", "fidelity_psnr",
            "heldout_loss", "pareto_frechet_inception_distance", "beats_fewer_steps_frechet_inception_distance")
    out_console.print(rows_table(f"ditc frontier (baseline: {report['base']} at fewer steps)",
                                 [{k: r.get(k) for k in cols} for r in report["points"]]))


@app.command("prepare-data")
@handle_errors
def prepare_data_cmd(
    images: str = typer.Argument(..., help="Image folder: one sub-folder per class, or images with captions "
                                 "(a .txt beside each, or a metadata.jsonl) with --text-encoder.", show_default=False),
    output: str = Out,
    vae: Optional[str] = typer.Option("stabilityai/sd-vae-ft-ema", "--vae", help="VAE (hub id, local diffusers dir, or MAR's "
                                      "kl16.ckpt); 'none' stores pixels."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Center-crop side of an image folder's images (default 256).", show_default=False),
    text_encoder: Optional[str] = typer.Option(None, "--text-encoder", help="Captioned images: the pipeline's text "
                                               "encoder (a local pipeline dir with text_encoder/ and tokenizer/)."),
    max_length: int = typer.Option(120, "--max-length", help="Caption tokens (the pipeline's max_sequence_length: "
                                   "PixArt-α 120, Σ 300); longer captions are truncated with a note."),
    batch_size: int = typer.Option(32, "--batch-size"),
    shard_size: int = typer.Option(1024, "--shard-size"),
    force: bool = typer.Option(False, "--force", help="Replace an existing output, or start over when the work dir holds shards made from other inputs."),
    json_out: bool = JsonOut,
):
    """Encode an image folder into latent shards (center crop; latents times the VAE's own
    scaling factor: 0.18215 for SD's, 0.2325 for MAR's KL-16) for `finetune` /
    `distill` / `prune-depth --data`: class folders with image + horizontal flip; captioned
    images with their caption features (text-to-image models). Rerun to resume.

    Examples:

        ditc prepare-data /data/imagenet/train -o imagenet256-latents/

        ditc prepare-data my-images/ --vae ./local-vae --image-size 512 -o latents512/

        ditc prepare-data captioned/ --text-encoder ./PixArt-XL-2-512x512 --image-size 512 -o t2i-latents/

        ditc prepare-data /data/imagenet/train --vae pretrained_models/vae/kl16.ckpt -o mar-latents/
    """
    _summary(commands.prepare_data(images, output=output, vae=vae, image_size=image_size, batch_size=batch_size,
                                   shard_size=shard_size, force=force, text_encoder=text_encoder,
                                   max_length=max_length), json_out)


# ---------------------------------------------------------------------------- recipes
@app.command("run")
@handle_errors
def run_cmd(
    recipe: str = typer.Argument(..., help="A recipe YAML file or a built-in name (see `ditc recipes`).", show_default=False),
    overrides: List[str] = typer.Argument(None, help="key=value (recipe variables) or step.option=value.", show_default=False),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="Run directory (default runs/<recipe name>); rerun to resume."),
    resume: bool = typer.Option(False, "--resume", help="Continue a step whose training was interrupted (its saved state is in the run dir)."),
    force: bool = typer.Option(False, "--force", help="Recompute finished steps whose options changed since they ran (and the steps that read them)."),
    json_out: bool = JsonOut,
):
    """Run a recipe: subcommand steps chained through one run directory, checked before
    anything runs, resumed at the first unfinished step.

    Examples:

        ditc run quickstart

        ditc run quickstart prune_steps=50 distill_steps=50 -o runs/qs-small

        ditc run tinydit-d14 data=/data/imagenet-latents

        ditc run quickstart --resume           # after an interrupted distill step
    """
    summary = run_recipe(recipe, output, list(overrides or []), echo=lambda m: err_console.print(m, highlight=False, markup=False),
                         resume=resume, force=force)
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
    rows = [{"name": name, "steps": " -> ".join(s.get("command", "?") for s in d.get("steps", [])),
             "description": d.get("description", "").split(". ")[0].strip() + "."}
            for name, d in recipe_table().items()]
    out_console.print(rows_table("built-in recipes", rows))


def _summary(report: dict | None, json_out: bool):
    if report is None:  # a process other than the main one under accelerate launch: it writes nothing
        return
    if report.get("warning"):
        err_console.print(f"[bold yellow]warning:[/] {escape(as_flags(str(report['warning'])))}", highlight=False,
                          soft_wrap=True)
    short = {k: v for k, v in report.items() if k not in ("history",)}
    if json_out:
        emit_json(short)
    else:
        out_console.print(kv_table(f"ditc {report.get('op', '')}", short))


def main():
    app()


if __name__ == "__main__":
    main()
