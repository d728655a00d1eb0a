"""``ditc bench``: analytic FLOPs, measured forward latency, images/s and peak memory.

Each model is measured in a fresh child process (spawned), one after the other, so the
peak-memory figure (the child's max RSS) belongs to that model alone and one model's
allocator state cannot flatter the next. Sources may be checkpoints or architecture
shapes with random weights plus transforms: ``shape:DiT-XL/2``, ``shape:DiT-XL/2+d14``,
``shape:DiT-XL/2+width0.5+tokens0.5``, ``shape:DiT-XL/2+dynwidth0.5`` (width routers fixed per
timestep band of the benchmark's sampler: narrow / 0.5 / wide, averaging 0.5 over the loop).
"""

from __future__ import annotations

import contextlib
import gc
import math
import multiprocessing as mp
import queue
import re
import statistics
import threading
import time

import torch

from ..compress.depth import prune_layers, uniform_keep
from ..compress.dynamic import (
    add_dynamic_width,
    add_token_router,
    set_banded_width,
    set_static_width,
    set_token_capacity,
    set_token_keep,
)
from ..config import DiTConfig, TokenSpec, WidthSpec
from ..diffusion import generation_loop
from ..diffusion.processes import process_of
from ..diffusion.caching import POLICIES, parse_policy, run_policy
from ..diffusion.measure import FlopsMeter
from ..diffusion.sampling import (
    eval_sampler,
    loop_time_inputs,
    resolve_spacing,
    sample,
    sampler_timesteps,
)
from ..errors import DitcError, UsageError
from ..formats import load_model
from ..model.build import build_model, expected_shapes
from ..model.family import family_of
from ..model.compile import compile_model, compiled_graphs
from ..model.dit import width_cache
from ..model.graphs import cuda_graphs, graph_cache
from ..model.flops import static_macs
from ..model.routers import Routing, routing
from ..model.run import RunContext
from ..report import plot_points

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHARE = r"(?:[0-9]+(?:\.[0-9]+)?|\.[0-9]+)"
VARIANT_RE = re.compile(rf"^(d[0-9]+|width{SHARE}|dynwidth{SHARE}|tokens{SHARE})$")


def parse_spec(spec: str) -> tuple[str, list[str]]:
    base, *variants = spec.split("+")
    kinds = [re.sub(r"[0-9.]+$", "", v) for v in variants]
    twice = next((k for k in kinds if k != "d" and (kinds.count(k) > 1 or (k == "width" and "dynwidth" in kinds))), None)
    if twice is not None:  # a second one would silently replace the first (depth prunes again: it chains)
        raise UsageError(f"bench spec {spec!r} sets {twice} twice: the second would replace the first")
    for v in variants:
        if not VARIANT_RE.match(v):
            raise UsageError(f"unknown bench variant {v!r} in {spec!r} (use dN, widthF, dynwidthF, tokensF, e.g. d14, width0.5)")
        share = re.sub(r"^(dynwidth|width|tokens)", "", v)
        if share != v and not 0.0 < float(share) <= 1.0:
            raise UsageError(f"bench variant {v!r}: the share must be in (0, 1]")
    return base, variants


def split_policy(spec: str) -> tuple[str, str | None]:
    """``SOURCE@POLICY`` (e.g. ``shape:DiT-XL/2+d14@fora:2``): the model, and the feature cache
    policy its sampling loop runs with (None without one)."""
    if "@" in spec:
        head, tail = spec.rsplit("@", 1)
        if tail.split(":", 1)[0].lower() in POLICIES:
            parse_policy(tail)  # checked: an unknown or malformed policy is one line
            return head, tail
    return spec, None


def check_spec(spec: str, options: dict | None = None):
    """A shape spec's variants checked against its architecture (e.g. a depth it has), its
    policy, and (``options``: ``check_loop_options``' keywords) the bench options its sampling
    process takes, before any process starts. Returns the shape's structure (a config), or None
    for a model to be loaded (checked in its own process)."""
    source, own_policy = split_policy(spec)
    base, variants = parse_spec(source)
    if not base.startswith("shape:"):
        return None
    cfg = _structure(DiTConfig.preset(base[len("shape:"):]), variants)
    if options is not None:
        check_loop_options(spec, cfg, **{**options, "policy": own_policy or options.get("policy")})
    return cfg


class LoopOptionError(UsageError):
    """A bench option a model's own generation loop cannot take: the whole bench is refused."""


def check_loop_options(spec: str, cfg: DiTConfig, schedule=(None, None, None), compile_: bool = False,
                       dense: bool = False, graphs: str = "off", policy: str | None = None, loop: bool = True):
    """The bench options a model sampled by its own generation process (MAR) cannot take,
    refused in one line; returns that process's loop class, or None for a diffusion model."""
    proc = process_of(cfg)
    if proc is None:
        return None
    loop_cls = proc[1]
    if schedule[2] is not None or compile_ or dense or graphs == "on":
        raise LoopOptionError(f"{spec} samples by its own loop: timestep spacing, compile, dense masks and CUDA graphs "
                              "act on the diffusion transformers")
    try:
        loop_cls.resolve(cfg, schedule[0], schedule[1])  # a diffusion sampler or a num_iter out of range, as eval
    except UsageError as e:
        raise LoopOptionError(f"{spec}: {e}") from None
    if policy not in (None, "none"):
        raise LoopOptionError(f"feature caches act across a diffusion sampler's steps; {spec} samples by its own loop")
    if not loop:
        raise LoopOptionError(f"{spec} is timed over its own sampling loop (it has no single forward to time): pass "
                              "--loop")
    return loop_cls


def _random_state(shapes: dict, device: torch.device, dtype: torch.dtype, seed: int) -> dict:
    """Random weights (N(0, 0.02)) for every key, made on ``device`` in ``dtype``. On a CUDA
    device each tensor is drawn; on the CPU, where drawing 675M values takes seconds, each
    tensor is a window of one drawn pool of 2^20 values at a random offset (no two tensors
    alike, nothing constant, same arithmetic cost for the kernels)."""
    g = torch.Generator(device=device).manual_seed(seed)
    if device.type == "cuda":
        return {k: torch.randn(s, generator=g, device=device, dtype=dtype).mul_(0.02) for k, s in shapes.items()}
    pool = torch.randn(1 << 20, generator=g, dtype=dtype).mul_(0.02)
    out = {}
    for k, s in shapes.items():
        n = math.prod(s)
        start = int(torch.randint(0, pool.numel(), (1,), generator=g))
        flat = pool.roll(-start).repeat(-(-n // pool.numel()))[:n] if n > pool.numel() - start else pool[start:start + n]
        out[k] = flat.clone().view(s)
    return out


def _structure(cfg: DiTConfig, variants: list[str]) -> DiTConfig:
    """The config a shape's variants make (fewer blocks, width routers, token routers), so its
    random weights are drawn once for the final structure."""
    for v in variants:
        if v.startswith(("dynwidth", "width")) and cfg.width is None:
            share = float(v[8:] if v.startswith("dyn") else v[5:])
            cfg = cfg.copy(width=WidthSpec(target_flops=share, sort_by="none"))
        elif v.startswith("tokens") and cfg.tokens is None:
            cfg = cfg.copy(tokens=TokenSpec())
        elif v.startswith("d") and not v.startswith("dyn"):
            keep = _depth_keep(v, cfg.stack_split)
            cfg = cfg.copy(depth=len(keep), kept_layers=[cfg.kept_layers[i] for i in keep])
    return cfg


def _depth_keep(v: str, stacks: list[int]) -> list[int]:
    """Evenly spaced blocks, ending at the last, in each stack alike (``d16`` of MAR's 16 + 16
    keeps 8 of each)."""
    n, depth = int(v[1:]), sum(stacks)
    if not (0 < n <= depth):
        raise UsageError(f"variant {v}: depth {n} is not in 1..{depth}")
    if any(n * s % depth for s in stacks):
        raise UsageError(f"variant {v}: {n} of {depth} blocks does not split evenly over the stacks {stacks}")
    return uniform_keep([(n * s // depth, s) for s in stacks])


def build(spec: str, seed: int = 0, load: dict | None = None, schedule=(None, None, None), device="cpu",
          dtype: torch.dtype = torch.float32, token_capacity: float | None = None):
    """A model for a source or shape spec (random weights for shapes, made on ``device`` in
    ``dtype`` for the variants' final structure: nothing is copied, written or read back);
    ``load`` holds ``load_model`` keywords (num_heads, prediction, numerics) for checkpoint
    sources, whose variants are applied as transforms; ``schedule`` (sampler, steps, spacing)
    places the bands of ``dynwidth`` variants; ``token_capacity`` sets the inference capacity
    of a token-routed model."""

    base, variants = parse_spec(spec)
    device = torch.device(device)
    if base.startswith("shape:"):
        cfg = _structure(DiTConfig.preset(base[len("shape:"):]), variants)
        model = build_model(cfg, _random_state(expected_shapes(cfg), device, dtype, seed), dtype=dtype)
    else:
        model = load_model(base, **(load or {})).to(device, dtype)
    for v in variants:
        if v.startswith("dynwidth"):
            share = float(v[8:])
            if model.config.width is None:
                model = add_dynamic_width(model, share, sort_by="none")
            sampler, steps = eval_sampler(model.config, schedule[0], schedule[1])
            set_banded_width(model, share, sampler_timesteps(sampler, steps, schedule[2], model.config))
        elif v.startswith("d"):
            if not base.startswith("shape:"):
                model = prune_layers(model, _depth_keep(v, model.config.stack_split))
        elif v.startswith("width"):
            share = float(v[5:])
            if model.config.width is None:
                model = add_dynamic_width(model, share, sort_by="none")
            set_static_width(model, share, share)
        elif v.startswith("tokens"):
            share = float(v[6:])
            if model.config.tokens is None:
                model = add_token_router(model)
            set_token_capacity(set_token_keep(model, share), share)  # the capacity the routers were set to
    if token_capacity is not None and model.config.tokens is not None:  # the others have no token routers to cap
        set_token_capacity(model, token_capacity)
    return model.eval()


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a clock reading covers it (CUDA runs async)."""
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(device)


def _static_forward_rows(model, cfg, batch_sizes, repeats, warmup, timesteps, dtype, graphs="off"):
    rows = []
    dev = _device(model)
    for bs in batch_sizes:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(bs, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g).to(dev, dtype)
        y = family_of(cfg).example_condition(cfg, bs, g)[0].to(dev)
        times = []
        with torch.inference_mode(), width_cache(model, timesteps), cuda_graphs(model, graphs) as cache:
            if cache is not None:  # every timestep's graph captured before timing starts
                warmup = max(warmup, len(timesteps))
            for i in range(warmup + repeats):
                t_in = timesteps[i % len(timesteps)]
                t = torch.full((bs,), t_in, device=dev)
                _sync(dev)
                t0 = time.perf_counter()
                model(x, t, y, run=RunContext(step=i, t=t_in))
                _sync(dev)
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
        rows.append({"batch": bs, **_stats(times), "images_per_s": bs / statistics.median(times)})
    return rows


def _stats(times: list[float]) -> dict:
    med = statistics.median(times)
    q_lo, q_hi = (statistics.quantiles(times, n=4)[0], statistics.quantiles(times, n=4)[2]) if len(times) > 1 else (med, med)
    return {"latency_ms": med * 1e3, "iqr_ms": (q_hi - q_lo) * 1e3}


def _warm_up(model, x, y, cfg_scale, times: list, dtype=torch.float32, negative=None, graphs="off") -> None:
    """One forward per distinct width profile of the loop (static models: one forward), at
    the loop's batch shape (CFG doubles it): everything the loop will run is compiled (and
    allocated) before timing starts, without paying for a whole untimed loop."""
    if cfg_scale != 1.0:
        family = family_of(model)
        x, y = torch.cat([x, x]), family.cat(y, family.null_condition(model, y, negative))
    with width_cache(model, times), cuda_graphs(model, graphs):
        cache = getattr(model, "_width_cache", None)
        seen = set()
        for t in times:
            key = tuple(cache[t]) if cache else None
            if key not in seen:
                seen.add(key)
                tt = torch.full((len(x),), t, dtype=torch.long if isinstance(t, int) else dtype, device=x.device)
                model(x, tt, y, run=RunContext(t=t))


def _loop_rows(model, cfg, batch_sizes, repeats, warmup, sampler, steps, spacing, cfg_scale, dtype, graphs="off",
               feature_cache=None):
    """The whole sampling loop, CFG included, routers acting as in eval. ``warmup`` warm-up
    passes (``_warm_up``) come first; ``warmup_s`` is their time (with --compile: the compile);
    ``graphs_in_timed_runs`` counts graphs compiled after them (0 means the timing holds no compile)."""

    rows = []
    dev = _device(model)
    times_in = loop_time_inputs(cfg, sampler, steps, spacing)
    resolved = resolve_spacing(sampler, spacing)
    for bs in batch_sizes:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(bs, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g).to(dev, dtype)
        y, negative = family_of(cfg).example_condition(cfg, bs, g)
        y, negative = y.to(dev), None if negative is None else negative.to(dev)
        times = []
        with torch.inference_mode():
            t0 = time.perf_counter()
            for _ in range(warmup):
                _warm_up(model, x, y, cfg_scale, times_in, dtype, negative, graphs)
            _sync(dev)
            warm = time.perf_counter() - t0
            compiled0 = compiled_graphs()
            for _ in range(repeats):
                # a fresh policy each run (the model's own schedule too), resolved outside the timing
                policy = run_policy(model.config, feature_cache, sampler, steps, resolved)
                t0 = time.perf_counter()
                sample(model, x, y, sampler=sampler, steps=steps, cfg_scale=cfg_scale, timestep_spacing=spacing,
                       generator=torch.Generator().manual_seed(1), negative=negative, cuda_graphs=graphs,
                       feature_cache=policy if policy is not None else "none")
                _sync(dev)
                times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        rows.append({"batch": bs, **_stats(times), "seconds_per_image": med / bs, "images_per_s": bs / med,
                     "warmup_s": warm, "graphs_in_timed_runs": compiled_graphs() - compiled0,
                     **({"feature_cache": policy.stats()} if policy is not None else {})})
    return rows


def _loop_macs(model, cfg, sampler, steps, spacing, cfg_scale, dtype, feature_cache=None) -> tuple[float, int]:
    """(MACs per image over one sampling loop, model calls per loop, what the token capacity
    did), measured on a batch of 2; blocks a feature cache skips cost nothing."""

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g).to(_device(model), dtype)
    y, negative = family_of(cfg).example_condition(cfg, 2, g)
    with torch.inference_mode(), FlopsMeter(model) as meter:
        sample(model, x, y, sampler=sampler, steps=steps, cfg_scale=cfg_scale, timestep_spacing=spacing,
               generator=torch.Generator().manual_seed(1), negative=negative, cuda_graphs="off",
               feature_cache=feature_cache)
    r = meter.result()
    per_row = 2 if cfg_scale != 1.0 else 1  # CFG runs the conditional and the null row for every image
    return r["macs"] * r["calls"] * per_row, r["calls"], r.get("token_capacity")


def _measure_child(specs, batch_sizes, repeats, warmup, schedule, threads, dtype_name, compile_, dense, load, loop,
                   device, graphs, token_capacity, q):
    """Measure ``specs`` one after the other in this process, each result (or its error) put on
    ``q`` as soon as it is known; each model is dropped before the next is built."""
    torch.set_num_threads(threads)
    for spec in specs:
        try:
            q.put(_measure_one(spec, batch_sizes, repeats, warmup, schedule, dtype_name, compile_, dense, load, loop,
                               device, graphs, token_capacity))
        except LoopOptionError as e:  # an option this model's loop cannot take: the parent refuses the bench (exit 2)
            q.put({"spec": spec, "error": str(e), "usage": True})
        except Exception as e:  # noqa: BLE001 - reported to the parent as one line
            q.put({"spec": spec, "error": f"{type(e).__name__}: {e}"})
        gc.collect()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()


def _measure_one(spec, batch_sizes, repeats, warmup, schedule, dtype_name, compile_, dense, load, loop, device, graphs,
                 token_capacity) -> dict:
    dev = torch.device(device)
    dtype = DTYPES[dtype_name]
    t0 = time.perf_counter()
    source, own_policy = split_policy(spec)
    if own_policy is not None:
        loop = {**loop, "feature_cache": own_policy}
    model = build(source, load=load, schedule=schedule, device=dev, dtype=dtype, token_capacity=token_capacity)
    _sync(dev)
    build_s = time.perf_counter() - t0
    gen = generation_loop(model)
    if gen is not None:
        check_loop_options(spec, model.config, schedule, compile_, dense, graphs,
                           own_policy or (loop or {}).get("feature_cache"), loop=loop is not None)
        return _measure_generation(gen, spec, own_policy or (loop or {}).get("feature_cache"), batch_sizes, repeats,
                                   warmup, schedule[1], (loop or {}).get("cfg_scale", 1.0), dev, build_s)
    sampler, steps, spacing = schedule
    sampler, steps = eval_sampler(model.config, sampler, steps)
    timesteps = sampler_timesteps(sampler, steps, spacing, model.config)
    timesteps = timesteps[:: max(1, len(timesteps) // 5)]
    modes = contextlib.ExitStack()  # held until the child ends
    if dense:
        modes.enter_context(routing(model, Routing.DENSE))
    cfg = model.config
    out = {"spec": spec, "sampler": f"{sampler} {steps}", "params": model.num_params(), "depth": cfg.depth,
           "build_s": build_s}
    if loop is not None:
        try:  # a learned schedule holds for its own sampler and steps: refused as an option, before timing
            run_policy(cfg, loop.get("feature_cache"), sampler, steps, resolve_spacing(sampler, spacing))
        except UsageError as e:
            raise LoopOptionError(f"{spec}: {e}") from None
    t0 = time.perf_counter()
    if loop is not None:
        macs, calls, capacity = _loop_macs(model, cfg, sampler, steps, spacing, loop["cfg_scale"], dtype,
                                           loop.get("feature_cache"))
        out.update(loop_gflops_per_image=macs / 1e9, calls_per_loop=calls, cfg_scale=loop["cfg_scale"])
        if capacity is not None:
            out["token_capacity"] = capacity
    else:
        macs = static_macs(cfg)["total"]
        out["timesteps"] = timesteps
        if cfg.is_dynamic:  # FLOPs of the very forwards that are timed below (same inputs, same t)
            g = torch.Generator().manual_seed(0)
            bs0 = batch_sizes[0]
            x = torch.randn(bs0, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g).to(dev, dtype)
            y = family_of(cfg).example_condition(cfg, bs0, g)[0].to(dev)
            with torch.inference_mode(), FlopsMeter(model) as meter:
                for tt in timesteps:
                    model(x, torch.full((bs0,), tt, device=dev), y)
            res = meter.result()
            macs = res["macs"]
            if "token_capacity" in res:
                out["token_capacity"] = res["token_capacity"]
    out["count_s"] = time.perf_counter() - t0
    if compile_:  # in place, so CFG (forward_with_cfg -> forward) runs compiled too
        compile_model(model)
    graphs0 = compiled_graphs()
    gc.collect()
    if dev.type == "cuda":  # peak device memory of the timed runs alone, from the allocator
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        out["weights_cuda_mb"] = torch.cuda.memory_allocated(dev) / 2**20
    with _peak_rss() as rss:
        if loop is not None:
            rows = _loop_rows(model, cfg, batch_sizes, repeats, warmup, sampler, steps, spacing, loop["cfg_scale"],
                              dtype, graphs, loop.get("feature_cache"))
        else:
            rows = _static_forward_rows(model, cfg, batch_sizes, repeats, warmup, timesteps, dtype, graphs)
    rss_after_load, peak = rss[0], rss
    cache = graph_cache(model)
    out["cuda_graphs"] = cache.captures if cache is not None else 0
    if dev.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    if compile_:
        out["graphs"] = compiled_graphs() - graphs0
    return {**out, "gflops": macs / 1e9, "rows": rows, "peak_rss_mb": peak[1] / 2**20,
            "peak_mb": out.get("peak_cuda_mb", peak[1] / 2**20), "rss_after_load_mb": rss_after_load / 2**20}


@contextlib.contextmanager
def _peak_rss():
    """Sample the process's resident memory while the block runs (ru_maxrss would include
    building): yields [after-load rss, peak rss], the peak filled in as it goes."""
    import psutil

    proc = psutil.Process()
    got = [proc.memory_info().rss] * 2
    stop = threading.Event()

    def sample_rss():
        while not stop.is_set():
            got[1] = max(got[1], proc.memory_info().rss)
            stop.wait(0.002)

    thread = threading.Thread(target=sample_rss, daemon=True)
    thread.start()
    try:
        yield got
    finally:
        stop.set()
        thread.join()


def _measure_generation(gen, spec, policy, batch_sizes, repeats, warmup, steps, cfg_scale, dev, build_s) -> dict:
    """A model sampled by its own generation process (MAR's masked-AR loop): always the whole
    loop, CFG as given; FLOPs counted from the loop's own token counts."""
    if policy not in (None, "none"):
        raise UsageError(f"feature caches act across a diffusion sampler's steps; {spec} samples by {gen.describe(1)}")
    model = gen.model
    steps = gen.steps(steps)
    macs = gen.macs_per_image(steps, cfg_scale)
    out = {"spec": spec, "sampler": gen.describe(steps), "params": model.num_params(), "depth": model.config.depth,
           "build_s": build_s, "loop_gflops_per_image": macs / 1e9, "cfg_scale": cfg_scale, "count_s": 0.0}
    rows = []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    with torch.inference_mode(), _peak_rss() as rss:
        for bs in batch_sizes:
            t0 = time.perf_counter()
            for _ in range(warmup):
                gen.run(bs, steps, cfg_scale)
            _sync(dev)
            warm = time.perf_counter() - t0
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                gen.run(bs, steps, cfg_scale, seed=1)
                _sync(dev)
                times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            rows.append({"batch": bs, **_stats(times), "seconds_per_image": med / bs, "images_per_s": bs / med,
                         "warmup_s": warm, "graphs_in_timed_runs": 0})
    peak = rss[1]
    if dev.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return {**out, "gflops": macs / 1e9, "rows": rows, "cuda_graphs": 0, "peak_rss_mb": peak / 2**20,
            "peak_mb": out.get("peak_cuda_mb", peak / 2**20), "rss_after_load_mb": rss[0] / 2**20}


def _run_child(target, args, timeout: float, n: int = 1, poll: float = 1.0):
    """Run ``target`` in a spawned child and yield the ``n`` results it puts on the queue, each as
    it arrives. A child that dies before answering them all (killed, out of memory, a crash in
    native code) yields an error for each one missing within ``poll`` seconds, not a wait until
    ``timeout``."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    deadline = time.monotonic() + timeout
    got = 0
    try:
        while got < n:
            try:
                item = q.get(timeout=poll)
            except queue.Empty:
                if not p.is_alive():
                    try:  # it may have answered just before exiting
                        item = q.get(timeout=poll)
                    except queue.Empty:
                        item = {"error": f"the measuring process died without a result (exit code {p.exitcode})"}
                elif time.monotonic() > deadline:
                    item = {"error": f"no result within {timeout:.0f} s"}
                else:
                    continue
            got += 1
            yield item
    finally:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()


def measure_all(specs: list[str], batch_sizes=(1, 8), repeats: int = 5, warmup: int = 2, schedule=(None, None, None),
                threads: int | None = None, dtype: str = "fp32", compile_: bool = False, dense: bool = False,
                timeout: float = 3600, load: dict | None = None, loop: dict | None = None, device: str = "cpu",
                graphs: str = "off", token_capacity: float | None = None):
    """Yield each spec's result (a dict with ``error`` where it failed), in order. Each model is
    built on the measuring device (random weights for shapes, drawn there in the measured dtype)
    and timed in a spawned process: on the CPU one process per model, so the peak resident memory
    sampled while the forwards run is that model's alone; on CUDA one process for all (the CUDA
    context is made once), each model's peak taken from the allocator after a reset and the
    model dropped before the next. ``graphs``: CUDA graphs (auto | on | off, model/graphs.py)."""
    groups = [list(specs)] if torch.device(device).type == "cuda" else [[s] for s in specs]
    for group in groups:
        args = (group, list(batch_sizes), repeats, warmup, tuple(schedule), threads or torch.get_num_threads(), dtype,
                compile_, dense, load, loop, str(device), graphs, token_capacity)
        for spec, res in zip(group, _run_child(_measure_child, args, timeout * len(group), n=len(group))):
            res["spec"] = spec
            yield res


def measure(spec: str, **kw) -> dict:
    """One spec's measurement (``measure_all``'s keywords); a failure is a DitcError."""
    res = next(measure_all([spec], **kw))
    if "error" in res:
        raise DitcError(f"benchmark of {spec} failed: {res['error']}")
    return res


def compare(results: list[dict], baseline: int = 0, tolerance: float = 0.25) -> list[dict]:
    """Rows with speedup next to the FLOPs ratio; ``diverges`` flags speedup/FLOPs-ratio
    disagreements beyond ``tolerance`` (relative)."""
    base = results[baseline]
    out = []
    for r in results:
        for row, brow in zip(r["rows"], base["rows"]):
            speedup = brow["latency_ms"] / row["latency_ms"]
            fr = base["gflops"] / r["gflops"]
            out.append({
                "model": r["spec"], "batch": row["batch"], "gflops": r["gflops"], "flops_ratio": fr,
                "latency_ms": row["latency_ms"], "iqr_ms": row["iqr_ms"], "images_per_s": row["images_per_s"],
                "speedup": speedup, "speedup_per_flops": speedup / fr, "peak_rss_mb": r["peak_rss_mb"],
                "peak_mb": r["peak_mb"], "peak_mem_ratio": r["peak_mb"] / base["peak_mb"],
                "diverges": abs(speedup / fr - 1) > tolerance,
                **{k: row[k] for k in ("seconds_per_image", "warmup_s", "graphs_in_timed_runs", "feature_cache") if k in row},
                **({"graphs": r["graphs"]} if "graphs" in r else {}),
                **{k: r[k] for k in ("build_s", "cuda_graphs", "token_capacity") if k in r},
            })
    return out


def plot_speed_vs_flops(rows: list[dict], path) -> None:
    pts = [(r["flops_ratio"], r["speedup"], r["model"].split("+", 1)[-1] if "+" in r["model"] else "base",
            f"batch {r['batch']}") for r in sorted(rows, key=lambda r: r["batch"])]
    plot_points(path, pts, "FLOPs reduction (x)", "measured speedup (x)", diagonal="speedup = FLOPs ratio", size=(6, 4))
