"""``evaluate`` (``ditc eval``), ``bench`` and ``prepare_data``: quality, speed and data."""

from __future__ import annotations

from pathlib import Path

import torch

from ..data.images import prepare
from ..diffusion.sampling import eval_sampler, resolve_spacing
from ..errors import UsageError
from ..evaluate import bench as bench_mod
from ..evaluate import fidelity
from ..formats.atomic import atomic_dir, check_output
from ..model import Routing, routing
from ..report import write_report
from .common import load_source, parse_interval, parse_ints, parse_names, source_name


def evaluate_model(source, *, output: str | Path, num_samples: int = 1000, sampler: str | None = None,
             steps: int | None = None, guidance_interval=None, cfg_scale: float = 1.0,
             cfg_channels: int | None = None, ref: str | None = None, metrics="fid,prc",
             inception_weights: str | None = None, extractor: str | None = None, vae: str | None = None,
             seed: int = 0, shard_size: int = 250, batch_size: int = 125, kid_subset_size: int | None = None,
             dense_masks: bool = False, loss_data: str | None = None, grid: bool = True,
             timestep_spacing: str | None = None, revision: str | None = None, no_ema: bool = False,
             num_heads: int | None = None, prediction: str | None = None, numerics: str | None = None,
             compile: bool = False) -> dict | None:
    """Sample class-balanced images (sharded, resumable, split over ``accelerate launch``
    processes), then FID / IS / KID / precision-recall, class accuracy and held-out loss on the
    digits testbed. Writes ``output``/report.json/.md; returns the report (None on processes
    other than the main one). ``compile``: torch.compile the model first (the first batch's
    time, compile included, is reported apart from the steady seconds per image)."""
    from accelerate import PartialState  # heavy: imported on first use

    interval = parse_interval(guidance_interval)
    model = load_source(source, revision=revision, no_ema=no_ema, num_heads=num_heads, prediction=prediction,
                        numerics=numerics)
    sampler, steps = eval_sampler(model.config, sampler, steps)
    resolve_spacing(sampler, timestep_spacing)  # checked before anything is written
    state = PartialState(cpu=not torch.cuda.is_available())
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    if loss_data is None:
        loss_data = held_out_data(model.config)
    with routing(model, Routing.DENSE if dense_masks else Routing.FAST):
        return fidelity.evaluate(model, output, num_samples, sampler, steps, cfg_scale, cfg_channels, seed, ref,
                                 parse_names(metrics), inception_weights, extractor, vae, shard_size, batch_size,
                                 kid_subset_size, state.process_index, state.num_processes,
                                 barrier=state.wait_for_everyone, loss_data=None if loss_data == "none" else loss_data,
                                 timestep_spacing=timestep_spacing, guidance_interval=interval,
                                 source=source_name(source), grid=grid, compile=compile)


def held_out_data(config) -> str | None:
    """The held-out loss data a model's own record names: a model whose lineage trained on the
    digits testbed's train split gets ``digits:test``; any other model none unless the user
    gives ``loss_data`` (its shape alone says nothing about the data it learned)."""
    trained = {str(step.get("data")) for step in config.lineage if step.get("data")}
    return "digits:test" if trained & {"digits", "digits:train"} else None


def bench_specs(sources=None, shape: str | None = None, variants=None, baseline: str | None = None) -> list[str]:
    """The list of models to measure, baseline first, each checked before anything runs."""
    specs = [str(s) for s in (sources or [])]
    if shape:
        specs = [f"shape:{shape}"] + [f"shape:{shape}+{v}" for v in parse_names(variants)] + specs
    elif variants:
        raise UsageError("`variants` goes with `shape`")
    if baseline:
        specs = [baseline] + [s for s in specs if s != baseline]
    if not specs:
        raise UsageError("nothing to benchmark: give sources or `shape`")
    for s in specs:
        bench_mod.parse_spec(s)
    return specs


def bench(sources=None, *, shape: str | None = None, variants=None, baseline: str | None = None, batch_sizes="1,8",
          repeats: int = 5, warmup: int = 2, sampler: str | None = None, steps: int | None = None,
          device: str = "cpu", dtype: str = "fp32", compile: bool = False, loop: bool = False,
          cfg_scale: float = 1.0, dense_masks: bool = False, threads: int | None = None,
          output: str | Path | None = None, timestep_spacing: str | None = None, force: bool = False,
          num_heads: int | None = None, prediction: str | None = None, numerics: str | None = None,
          echo=None) -> dict:
    """Speed side by side, each model in its own process: single forwards (latency, images/s,
    peak memory) or with ``loop`` the whole sampling loop (seconds_per_image, CFG included,
    routers as in eval), with the FLOPs ratio next to every speedup. Returns the report (and
    writes it with the speed-vs-FLOPs plot to ``output`` when given)."""
    if device != "cpu":
        raise UsageError("only `device` cpu is measured in this build")
    specs = bench_specs(sources, shape, variants, baseline)
    bs = parse_ints(batch_sizes, "`batch_sizes`")
    if output is not None:
        check_output(Path(output), force)
    if sampler is not None:
        resolve_spacing(sampler, timestep_spacing)  # checked before anything runs
    facts = dict(num_heads=num_heads, prediction=prediction, numerics=numerics)  # load_model keywords
    results = []
    for s in specs:
        if echo is not None:
            echo(f"measuring {s} ...")
        results.append(bench_mod.measure(s, bs, repeats, warmup, (sampler, steps, timestep_spacing), threads, dtype,
                                         compile, dense_masks, load=facts,
                                         loop={"cfg_scale": cfg_scale} if loop else None))
    rows = bench_mod.compare(results)
    report = {"mode": "sampling loop" if loop else "single forward", "cfg_scale": cfg_scale if loop else None,
              "sampler": {r["spec"]: r.get("sampler") for r in results}, "device": device, "dtype": dtype,
              "threads": threads or torch.get_num_threads(), "repeats": repeats, "warmup": warmup,
              "timesteps": {r["spec"]: r.get("timesteps") for r in results}, "baseline": specs[0], "rows": rows}
    if output is not None:
        with atomic_dir(Path(output), force) as tmp:
            write_report(tmp, report, "ditc bench")
            bench_mod.plot_speed_vs_flops(rows, tmp / "speed_vs_flops.png")
    return report


def prepare_data(images: str | Path, *, output: str | Path, vae: str | None = "stabilityai/sd-vae-ft-ema",
                 image_size: int = 256, batch_size: int = 32, shard_size: int = 1024) -> dict:
    """Encode an image folder (one sub-folder per class) into latent shards for training data
    (center crop, image + flip, scale 0.18215); ``vae=None`` stores pixels. Resumable."""
    output = Path(output)
    if (output.exists() and not (output / "manifest.json").exists()
            and not list(output.glob("shard-*.safetensors")) and any(output.iterdir())):
        raise UsageError(f"output {output} exists and is not a latent-shard folder")
    info = prepare(Path(images), output, None if vae in (None, "none") else vae, image_size, batch_size, shard_size)
    return {"op": "prepare-data", **info}
