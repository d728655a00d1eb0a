"""Fixed overheads of a dynamic model's sampling loop: the per-run width cache (widths
resolved once per run, model/dit.py ``width_cache``) against routers run on every call, side
by side in one process (interleaved repeats, median), on a model small enough that the
overheads show (default: digits-dit with dynamic width 0.5, routers fixed per timestep band).

    python benchmarks/loop_overheads.py --batch-sizes 1,8 --steps 50 --repeats 5

Prints a Markdown table and writes benchmarks/results/loop_overheads.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path
from unittest import mock

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", default="digits-dit")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--cfg-scale", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "loop_overheads.json"))
    a = ap.parse_args()

    import dit_compress
    from dit_compress.compress.dynamic import add_dynamic_width, set_banded_width
    from dit_compress.diffusion import sampling
    from dit_compress.diffusion.sampling import sampler_timesteps

    model = add_dynamic_width(dit_compress.load_model(a.source), 0.5, sort_by="none").eval()
    set_banded_width(model, 0.5, sampler_timesteps("ddim", a.steps, None, model.config))
    cfg = model.config
    no_cache = mock.patch.object(sampling, "width_cache", lambda m, times=None: contextlib.nullcontext(m))
    rows = []
    for bs in [int(b) for b in a.batch_sizes.split(",")]:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(bs, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
        y = torch.arange(bs) % cfg.num_classes
        runs = {"cached": contextlib.nullcontext, "per_call": lambda: no_cache}
        times = {k: [] for k in runs}
        outs = {}
        with torch.inference_mode():
            for i in range(a.repeats + 1):  # the first round warms up
                for k, ctx in runs.items():
                    with ctx():
                        t0 = time.perf_counter()
                        outs[k] = dit_compress.sample(model, x, y, sampler="ddim", steps=a.steps, cfg_scale=a.cfg_scale)
                        dt = time.perf_counter() - t0
                    if i:
                        times[k].append(dt)
        assert torch.allclose(outs["cached"], outs["per_call"], atol=1e-5), "cached widths changed the samples"
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"source": a.source, "batch": bs, "steps": a.steps, "per_call_ms": med["per_call"] * 1e3,
                     "cached_ms": med["cached"] * 1e3, "speedup": med["per_call"] / med["cached"]})
    print("| model | batch | DDIM steps | routers per call, ms/loop | widths cached per run, ms/loop | speedup |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['source']} + dynwidth0.5 | {r['batch']} | {r['steps']} | {r['per_call_ms']:.0f} | {r['cached_ms']:.0f} | {r['speedup']:.3f} |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
