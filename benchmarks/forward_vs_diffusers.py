"""Base forward speed: the ditc DiT module (eager, and with --compile also compiled by
``dit_compress.compile_model``) vs diffusers' eager DiTTransformer2DModel on the same
weights, measured side by side in one process (interleaved repeats, median).

    python benchmarks/forward_vs_diffusers.py --arch DiT-XL/2 --batch-sizes 1,8 --repeats 5
    python benchmarks/forward_vs_diffusers.py --arch DiT-B/2 --compile --out benchmarks/results/compiled_vs_diffusers.json

Prints a Markdown table and writes benchmarks/results/forward_vs_diffusers.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="DiT-XL/2")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also time the compiled ditc forward")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "forward_vs_diffusers.json"))
    a = ap.parse_args()

    from diffusers import DiTTransformer2DModel

    from dit_compress.config import DiTConfig
    from dit_compress.model.build import build_model
    from dit_compress.formats.diffusers_fmt import diffusers_config, original_to_diffusers
    from dit_compress.model import DiT
    from dit_compress.model.compile import compile_model

    cfg = DiTConfig.preset(a.arch)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in DiT(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    ours = build_model(cfg, state).eval()
    dcfg = {k: v for k, v in diffusers_config(cfg).items() if not k.startswith("_")}
    theirs = DiTTransformer2DModel(**dcfg).eval()
    theirs.load_state_dict(original_to_diffusers({k: v for k, v in state.items() if k != "pos_embed"}, cfg.depth))
    models = {"ditc": ours, "diffusers": lambda x, t, y: theirs(x, timestep=t, class_labels=y)}
    if a.compile:
        models["ditc_compiled"] = compile_model(build_model(cfg, state).eval())

    rows = []
    for bs in [int(b) for b in a.batch_sizes.split(",")]:
        x = torch.randn(bs, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
        t = torch.full((bs,), 500)
        y = torch.randint(0, cfg.num_classes, (bs,), generator=g)
        times = {k: [] for k in models}
        first = {}
        with torch.inference_mode():
            for k, fn in models.items():  # warm-up (for the compiled model: the compile)
                t0 = time.perf_counter()
                fn(x, t, y)
                first[k] = time.perf_counter() - t0
            for _ in range(a.repeats):  # interleaved so drift hits all alike
                for k, fn in models.items():
                    t0 = time.perf_counter()
                    fn(x, t, y)
                    times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {"arch": a.arch, "batch": bs, "ditc_ms": med["ditc"] * 1e3, "diffusers_ms": med["diffusers"] * 1e3,
               "speed_ratio": med["diffusers"] / med["ditc"]}
        if a.compile:
            row.update(ditc_compiled_ms=med["ditc_compiled"] * 1e3, compiled_speed_ratio=med["diffusers"] / med["ditc_compiled"],
                       compile_s=first["ditc_compiled"])
        rows.append(row)
    extra = " ditc compiled ms | diffusers/compiled | compile s |" if a.compile else ""
    print("| arch | batch | ditc ms | diffusers ms | diffusers/ditc |" + extra)
    print("|---|---|---|---|---|" + ("---|---|---|" if a.compile else ""))
    for r in rows:
        more = f" {r['ditc_compiled_ms']:.0f} | {r['compiled_speed_ratio']:.3f} | {r['compile_s']:.0f} |" if a.compile else ""
        print(f"| {r['arch']} | {r['batch']} | {r['ditc_ms']:.0f} | {r['diffusers_ms']:.0f} | {r['speed_ratio']:.3f} |" + more)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
