"""``evaluate`` (``ditc eval``), ``bench`` and ``prepare_data``: quality, speed and data."""

from __future__ import annotations

from pathlib import Path

import torch

from .. import checks
from ..config import DiTConfig
from ..data.datasets import bundled_digits, digits_split
from ..data.digit_shards import prepare_digit_captions
from ..data.images import prepare, scan_captioned
from ..data.text import PIXART_MAX_LENGTH, TextEncoder, load_prompts
from ..diffusion.caching import parse_policy
from ..diffusion.sampling import SAMPLERS, check_spacing, eval_sampler, resolve_spacing
from ..errors import DitcError, UsageError
from ..evaluate import bench as bench_mod
from ..evaluate import fidelity
from ..evaluate import frontier as frontier_mod
from ..formats import own_text_encoder
from ..outputs import atomic_dir, is_main_process
from ..model import Routing, routing
from ..model.build import fingerprint
from ..model.graphs import check_mode as check_graphs
from ..model.family import family_of, require
from ..report import write_report
from .common import (
    load_facts,
    load_source,
    parse_interval,
    parse_ints,
    parse_names,
    seed as check_seed,
    source_name,
    writes_output,
)


@writes_output("source", "ref", "loss_data", "prompts", "text_encoder", "clip", "fidelity_ref", "inception_weights",
               "vae")
def evaluate_model(source, *, output: str | Path, num_samples: int = 1000, sampler: str | None = None,
             steps: int | None = None, guidance_interval=None, cfg_scale: float = 1.0,
             cfg_channels: int | None = None, ref: str | None = None, metrics="fid,prc",
             inception_weights: str | None = None, extractor: str | None = None, vae: str | None = None,
             seed: int = 0, shard_size: int = 250, batch_size: int = 125, kid_subset_size: int | None = None,
             dense_masks: bool = False, loss_data: str | None = None, grid: bool = True,
             timestep_spacing: str | None = None, revision: str | None = None, no_ema: bool = False,
             num_heads: int | None = None, prediction: str | None = None, numerics: str | None = None,
             compile: bool = False, device: str = "auto", cache: bool = True, force: bool = False,
             prompts: str | Path | None = None, text_encoder: str | Path | None = None,
             clip: str | Path | None = None, feature_cache: str | None = None,
             fidelity_ref: str | Path | None = None) -> dict | None:
    """Sample class-balanced images (text-to-image models: the ``prompts`` in turn, a text file
    encoded with ``text_encoder``, default the source pipeline's, or caption shards; ``clip``, a
    local CLIP model dir, adds the CLIP score) (sharded, resumable, split over ``accelerate launch``
    processes), then FID / IS / KID / precision-recall, class accuracy and held-out loss on the
    digits testbed. Writes ``output`` (report.json/.md, samples) atomically once complete;
    an unfinished run's shards wait in a work dir beside it, recorded with the model and the
    settings that made them (a rerun with the same ones resumes, other ones are refused,
    ``force`` starts over). Returns the report (None on processes other than the main one).
    ``compile``: torch.compile the model first (the first batch's time, compile included, is
    reported apart from the steady seconds per image). ``device``: auto (the process's GPU
    under accelerate, CUDA when present, else the CPU), cpu, cuda or cuda:N. ``cache``: reuse a
    finished eval whose every input is the same (the report says where it came from).
    ``feature_cache``: a caching policy over every sampling run (fora:N, fbcache:T,
    taylorseer:N,O); ``fidelity_ref``: an earlier eval output from the same noise (e.g. of the
    uncompressed model), against whose samples the per-pixel MSE and PSNR are reported."""
    from accelerate import PartialState  # heavy: imported on first use

    c = checks
    num_samples = c.integer("num_samples", num_samples, lo=1, hi=c.MAX_COUNT)
    steps = c.integer("steps", steps, lo=1, hi=c.MAX_STEPS, optional=True)
    cfg_scale = c.real("cfg_scale", cfg_scale, lo=0.0)
    cfg_channels = c.integer("cfg_channels", cfg_channels, lo=1, hi=4096, optional=True)
    for name, value in (("ref", ref), ("inception_weights", inception_weights), ("extractor", extractor),
                        ("vae", vae), ("loss_data", loss_data)):
        c.text(name, value, optional=True)
    prompts, text_encoder = c.path("prompts", prompts, optional=True), c.path("text_encoder", text_encoder, optional=True)
    clip = c.path("clip", clip, optional=True)
    if clip is not None:
        fidelity.check_clip(clip, [])  # the path; the prompts' texts are checked once they are read
    seed = check_seed(seed)
    shard_size = c.integer("shard_size", shard_size, lo=1, hi=c.MAX_COUNT)
    batch_size = c.integer("batch_size", batch_size, lo=1, hi=c.MAX_BATCH)
    kid_subset_size = c.integer("kid_subset_size", kid_subset_size, lo=1, hi=c.MAX_COUNT, optional=True)
    dense_masks, grid, compile = c.flag("dense_masks", dense_masks), c.flag("grid", grid), c.flag("compile", compile)
    cache = c.flag("cache", cache)
    check_spacing(timestep_spacing)
    metric_list = parse_names(metrics, "metrics")
    fidelity.check_metrics(metric_list, num_samples, kid_subset_size)
    interval = parse_interval(guidance_interval)
    parse_policy(feature_cache)  # an unknown policy is refused before the model is read
    fidelity_ref = c.path("fidelity_ref", fidelity_ref, optional=True)
    resolve_device(device)  # checked before the model is read
    model = load_source(source, revision=revision, no_ema=no_ema, num_heads=num_heads, prediction=prediction,
                        numerics=numerics)
    require(model, "eval")
    if prompts is not None and family_of(model).condition != "captions":
        family_of(model).eval_conditions(model.config, num_samples, prompts)  # the family's own one-line refusal
    if prompts is not None and text_encoder is None and Path(prompts).is_file():
        text_encoder = own_text_encoder(source)  # the pipeline's own text encoder
    prompt_set = load_prompts(prompts, model.config, text_encoder) if prompts is not None else None
    conds = family_of(model).eval_conditions(model.config, num_samples, prompt_set)  # checked before anything runs
    if clip is not None and prompt_set is None:
        raise UsageError("`clip` scores each image against its prompt: it is for a text-to-image model eval with "
                         "`prompts`")
    if clip is not None:
        fidelity.check_clip(clip, conds.texts)
    sampler, steps = eval_sampler(model.config, sampler, steps)
    resolve_spacing(sampler, timestep_spacing)  # checked before anything is written
    if cfg_channels is not None and cfg_channels > model.config.in_channels:
        raise UsageError(f"`cfg_channels` {cfg_channels} is more than the model's {model.config.in_channels} channels")
    state = PartialState(cpu=not torch.cuda.is_available())
    model = model.to(resolve_device(device, state.device))
    if loss_data is None:
        loss_data = held_out_data(model.config)
    producer = {"model": fingerprint(model), "dense_masks": dense_masks}
    with routing(model, Routing.DENSE if dense_masks else Routing.FAST):
        return fidelity.evaluate(model, Path(output), num_samples, sampler, steps, cfg_scale, cfg_channels, seed, ref,
                                 metric_list, inception_weights, extractor, vae, shard_size, batch_size,
                                 kid_subset_size, state.process_index, state.num_processes,
                                 barrier=state.wait_for_everyone, loss_data=None if loss_data == "none" else loss_data,
                                 timestep_spacing=timestep_spacing, guidance_interval=interval,
                                 source=source_name(source), grid=grid, compile=compile, force=force,
                                 producer=producer, cache=cache, prompts=prompt_set, clip=clip,
                                 feature_cache=feature_cache, fidelity_ref=fidelity_ref)


def resolve_device(device, auto=None) -> torch.device:
    """``auto`` -> the process's accelerator (``auto``: the device accelerate assigned), CUDA
    when present, else the CPU; ``cpu``/``cuda``/``cuda:N`` as given (CUDA must be there)."""
    if device is None or device == "auto":
        return torch.device(auto) if auto is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise UsageError(f"`device` must be auto, cpu, cuda or cuda:N, got {device!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"unknown `device` {device!r}; choose auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"`device` {device!r}: only cpu and cuda are supported")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"`device` {device!r}: no CUDA device is available here")
    return dev


def held_out_data(config) -> str | None:
    """The held-out loss data a model's own record names: a model whose lineage trained on the
    digits testbed's train split gets ``digits:test``; any other model none unless the user
    gives ``loss_data`` (its shape alone says nothing about the data it learned)."""
    trained = {str(step.get("data")) for step in config.lineage if step.get("data")}
    return "digits:test" if trained & {"digits", "digits:train"} else None


def bench_specs(sources=None, shape: str | None = None, variants=None, baseline: str | None = None) -> list[str]:
    """The list of models to measure, baseline first, each checked before anything runs."""
    if isinstance(sources, (str, Path)):  # one source given as a name
        sources = [sources]
    specs = [checks.source("sources", s) for s in (sources or [])]
    if any(not isinstance(s, str) for s in specs):
        raise UsageError("`sources` of bench are names or paths (each model is measured in its own process)")
    checks.text("shape", shape, optional=True)
    checks.text("baseline", baseline, optional=True)
    if shape:
        DiTConfig.preset(shape)  # an unknown architecture is refused here, not in a child process
        specs = [f"shape:{shape}"] + [f"shape:{shape}{'' if v.startswith('@') else '+'}{v}"  # @POLICY: the base, cached
                                      for v in parse_names(variants, "variants")] + specs
    elif variants:
        raise UsageError("`variants` goes with `shape`")
    if baseline:
        specs = [baseline] + [s for s in specs if s != baseline]
    if not specs:
        raise UsageError("nothing to benchmark: give sources or `shape`")
    for s in specs:
        bench_mod.check_spec(s)
    return specs


@writes_output("sources", "baseline", required=False)
def bench(sources=None, *, shape: str | None = None, variants=None, baseline: str | None = None, batch_sizes="1,8",
          repeats: int = 5, warmup: int = 2, sampler: str | None = None, steps: int | None = None,
          device: str = "auto", dtype: str = "fp32", compile: bool = False, loop: bool = False,
          cfg_scale: float = 1.0, dense_masks: bool = False, threads: int | None = None,
          output: str | Path | None = None, timestep_spacing: str | None = None, force: bool = False,
          num_heads: int | None = None, prediction: str | None = None, numerics: str | None = None,
          cuda_graphs: str = "auto", token_capacity: float | None = None, feature_cache: str | None = None,
          echo=None) -> dict:
    """Speed side by side, each model in its own process: single forwards (latency, images/s,
    peak memory) or with ``loop`` the whole sampling loop (seconds_per_image, CFG included,
    routers as in eval), with the FLOPs ratio next to every speedup. Returns the report (and
    writes it with the speed-vs-FLOPs plot to ``output`` when given). ``cuda_graphs``: auto (on a
    CUDA device, each model that can be captured runs as CUDA graphs), on (refused where not)
    or off. ``token_capacity``: the inference capacity of token-routed models, a share in (0, 1]
    (the ``tokensF`` variants set their own)."""
    c = checks
    dev = resolve_device(device)
    graphs = check_graphs(cuda_graphs)
    if graphs == "on" and dev.type != "cuda":
        raise UsageError(f"`cuda_graphs` on needs a CUDA device; this bench runs on {dev}")
    token_capacity = c.real("token_capacity", token_capacity, lo=0.0, hi=1.0, lo_open=True, optional=True)
    specs = bench_specs(sources, shape, variants, baseline)
    if (parse_policy(feature_cache) is not None or any(bench_mod.split_policy(s)[1] for s in specs)) and not loop:
        raise UsageError("`feature_cache` acts across the steps of a sampling run: it needs `loop`")
    bs = parse_ints(batch_sizes, "batch_sizes", lo=1, hi=c.MAX_BATCH)
    if not bs:
        raise UsageError("`batch_sizes` lists nothing: give e.g. 1,8")
    repeats = c.integer("repeats", repeats, lo=1, hi=10**6)
    warmup = c.integer("warmup", warmup, lo=0, hi=10**6)
    if sampler is not None and (not isinstance(sampler, str) or sampler not in SAMPLERS):
        raise UsageError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    steps = c.integer("steps", steps, lo=1, hi=c.MAX_STEPS, optional=True)
    c.choice("dtype", dtype, bench_mod.DTYPES)
    compile, loop, dense_masks = c.flag("compile", compile), c.flag("loop", loop), c.flag("dense_masks", dense_masks)
    cfg_scale = c.real("cfg_scale", cfg_scale, lo=0.0)
    if cfg_scale != 1.0 and not loop:
        raise UsageError("`cfg_scale` guides a sampling loop; single forwards run without it: add `loop`")
    threads = c.integer("threads", threads, lo=1, hi=4096, optional=True)
    check_spacing(timestep_spacing)
    if sampler is not None:
        resolve_spacing(sampler, timestep_spacing)  # checked before anything runs
    facts = load_facts(num_heads=num_heads, prediction=prediction, numerics=numerics)
    facts = {k: facts[k] for k in ("num_heads", "prediction", "numerics")}  # load_model keywords
    shapes = [bench_mod.check_spec(s, {"schedule": (sampler, steps, timestep_spacing), "compile_": compile,
                                       "dense": dense_masks, "graphs": graphs,
                                       "policy": feature_cache if loop else None, "loop": loop})
              for s in specs]  # a shape's options checked here; a loaded model's in its child, refused the same way
    no_tokens = "`token_capacity` caps token routers and none of the benched models has them (add-token-router)"
    if token_capacity is not None and dense_masks:
        raise UsageError("`token_capacity` caps the fast token path and `dense_masks` times the masked-dense reference, "
                         "which runs every token: give one or the other")
    if token_capacity is not None and all(cfg is not None and cfg.tokens is None for cfg in shapes):
        raise UsageError(no_tokens)
    results, failed = [], {}
    if echo is not None:
        echo(f"measuring {', '.join(specs)} on {dev} ...")
    for res in bench_mod.measure_all(specs, bs, repeats, warmup, (sampler, steps, timestep_spacing), threads, dtype,
                                     compile, dense_masks, load=facts,
                                     loop={"cfg_scale": cfg_scale, "feature_cache": feature_cache} if loop else None,
                                     device=str(dev), graphs=graphs, token_capacity=token_capacity):
        if res.get("usage"):  # an option the model cannot take: refused, nothing written
            raise UsageError(res["error"])
        if "error" in res:  # the baseline is needed by every row; any other model's failure is reported
            msg = f"benchmark of {res['spec']} failed: {res['error']}"
            if not results:
                raise DitcError(msg)
            failed[res["spec"]] = res["error"]
            if echo is not None:
                echo(f"error: {msg}")
        else:
            results.append(res)
            if echo is not None:
                echo(f"measured {res['spec']}")
    if token_capacity is not None and not failed and not any(r.get("token_capacity") is not None for r in results):
        raise UsageError(no_tokens + "; nothing written")  # loaded models: known once their processes read them
    rows = bench_mod.compare(results)
    report = {"mode": "sampling loop" if loop else "single forward", "cfg_scale": cfg_scale if loop else None,
              "cuda_graphs": graphs, "feature_cache": feature_cache,
              "sampler": {r["spec"]: r.get("sampler") for r in results}, "device": str(dev), "dtype": dtype,
              "threads": threads or torch.get_num_threads(), "repeats": repeats, "warmup": warmup,
              "timesteps": {r["spec"]: r.get("timesteps") for r in results}, "baseline": specs[0], "rows": rows,
              "failed": failed}
    if output is not None:
        with atomic_dir(Path(output), force) as tmp:
            write_report(tmp, report, "ditc bench")
            bench_mod.plot_speed_vs_flops(rows, tmp / "speed_vs_flops.png")
    return report


DEFAULT_VAE, DEFAULT_IMAGE_SIZE = "stabilityai/sd-vae-ft-ema", 256  # prepare-data of an image folder


@writes_output("images", "text_encoder")
def prepare_data(images: str | Path, *, output: str | Path, vae: str | None = DEFAULT_VAE,
                 image_size: int | None = None, batch_size: int = 32, shard_size: int = 1024, force: bool = False,
                 text_encoder: str | Path | None = None, max_length: int = PIXART_MAX_LENGTH) -> dict:
    """Encode an image folder into latent shards for training data (center crop, scale
    0.18215); ``vae=None`` stores pixels. Class folders (ROOT/<class>/<image>): image + flip,
    with labels. With ``text_encoder`` (a local pipeline dir with text_encoder/ and tokenizer/,
    e.g. PixArt's T5), images with captions (a .txt beside each, or ROOT/metadata.jsonl):
    latents with the caption features (``max_length`` tokens, the pipeline's 120), their masks
    and the null caption. The shards are made in a work dir beside ``output``, recorded with
    what produced them (the images, captions, VAE, text encoder, sizes): a rerun with the same
    inputs resumes, other inputs are refused (``force`` starts over); ``output`` appears
    complete at the end."""
    split = bundled_digits(images)
    images = images if split is not None else Path(checks.path("images", images))
    if not is_main_process():  # under accelerate launch the main process encodes; the others write nothing
        return None
    vae = checks.text("vae", vae, optional=True)
    image_size = checks.integer("image_size", image_size, lo=8, hi=8192, optional=True)
    batch_size = checks.integer("batch_size", batch_size, lo=1, hi=checks.MAX_BATCH)
    shard_size = checks.integer("shard_size", shard_size, lo=1, hi=checks.MAX_COUNT)
    max_length = checks.integer("max_length", max_length, lo=1, hi=4096)
    text_encoder = checks.path("text_encoder", text_encoder, optional=True)
    if split is not None:  # the bundled digits with their generated captions (the text-to-image testbed's data)
        if text_encoder is None:
            raise UsageError("the bundled digits train as they are (`data` digits); prepare-data makes caption "
                             "shards of them with `text_encoder`")
        digits_split(split, 1)  # the split name checked before the encoder loads
        if vae not in (DEFAULT_VAE, None, "none") or image_size not in (None, 8):
            raise UsageError(f"{images} are the bundled 8x8 digits, stored as pixels: `vae` and `image_size` do not "
                             "apply to them (leave them out)")
        info = prepare_digit_captions(split, Path(output), TextEncoder(text_encoder, max_length), shard_size,
                                      force=force)
        return {"op": "prepare-data", **info}
    if not images.exists():
        raise UsageError(f"image folder {images} does not exist")
    if not images.is_dir():
        raise UsageError(f"{images} is not a folder (prepare-data reads ROOT/<class>/<image>, or captioned images)")
    if text_encoder is not None:
        scan_captioned(images)  # the folder's captions checked before the encoder loads
    encoder = TextEncoder(text_encoder, max_length) if text_encoder is not None else None
    info = prepare(images, Path(output), None if vae in (None, "none") else vae, image_size or DEFAULT_IMAGE_SIZE,
                   batch_size, shard_size,
                   force=force, text_encoder=encoder)
    return {"op": "prepare-data", **info, **({"warning": info["note"]} if info.get("note") else {})}


@writes_output("run_dirs")
def frontier(run_dirs, *, output: str | Path, base: str | None = None, seconds_from=None, force: bool = False) -> dict:
    """Every eval output in ``run_dirs`` (recipe run dirs, or eval outputs; the same name in
    several dirs, e.g. seeds, is one point with its mean and sd) on one speed-quality frontier:
    measured seconds per image against FID, fidelity to the base (PSNR) and held-out loss, with
    the Pareto-optimal points marked and the plain baseline, the ``base`` model at fewer sampler
    steps, always drawn (default: the one source with uncached evals at several step counts).
    ``seconds_from``: run dirs whose evals alone give the seconds per image (a run timed on a
    quiet machine; the others' quality still counts). Writes report.json/.md, frontier.md and
    one PNG per measure to ``output`` atomically."""
    dirs = _dirs("run_dirs", run_dirs)
    if not dirs:
        raise UsageError("`run_dirs` names nothing: give recipe run dirs or eval outputs")
    clock = _dirs("seconds_from", seconds_from) or None
    with atomic_dir(Path(output), force) as tmp:
        return frontier_mod.frontier(dirs, tmp, base, clock)


def _dirs(what: str, value) -> list[Path]:
    if isinstance(value, (str, Path)):
        value = [value]
    dirs = [Path(checks.path(what, d)) for d in (value or [])]
    for d in dirs:
        if not d.is_dir():
            raise UsageError(f"`{what}`: {d} is not a directory")
    return dirs
