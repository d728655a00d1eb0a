"""Turn the run directories of the results recipes into the Markdown tables of
docs/results.md:

    python benchmarks/make_results.py runs/ > tables.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rj(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def metrics(run: Path, step: str) -> dict:
    return rj(run / step / "report.json").get("metrics", {})


def fmt(v, nd=3):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def quality_cols(m: dict) -> list[str]:
    return [fmt(m.get("frechet_inception_distance"), 2), fmt(m.get("class_accuracy"), 3), fmt(m.get("precision"), 3),
            fmt(m.get("recall"), 3), fmt(m.get("heldout_loss"), 4), fmt(m.get("heldout_mse"), 4)]


QH = "| FID (digits) | class acc | precision | recall | held-out loss | held-out MSE |"


def depth_table(run: Path) -> str:
    out = ["| method | kept layers | calib loss before FT | " + QH[2:], "|---" * 9 + "|"]
    base = metrics(run, "eval-base")
    if base:
        out.append("| base (12 layers) | all | - | " + " | ".join(quality_cols(base)) + " |")
    for m in ("learned", "block-influence", "uniform", "random", "min-loss"):
        p = rj(run / m / "report.json")
        if not p:
            continue
        out.append(f"| {m} | {p.get('kept_layers')} | {fmt(p.get('calib_loss_chosen'), 4)} | "
                   + " | ".join(quality_cols(metrics(run, f"eval-{m}"))) + " |")
    return "\n".join(out)


def distill_table(run: Path) -> str:
    out = ["| recovery | " + QH[2:], "|---" * 7 + "|"]
    for name, label in (("plain", "plain fine-tune"), ("kd-out", "output KD"), ("kd-rep", "output KD + masked RepKD")):
        m = metrics(run, f"eval-{name}")
        if m:
            out.append(f"| {label} | " + " | ".join(quality_cols(m)) + " |")
    return "\n".join(out)


def dynamic_table(run: Path, base_run: Path | None) -> str:
    bench = rj(run / "bench" / "report.json").get("rows", [])

    def speed(model_suffix, batch):
        for r in bench:
            if r["model"].endswith(model_suffix) and r["batch"] == batch:
                return r
        return {}

    out = ["| model | GFLOPs (expected) | FLOPs ratio | speedup b1 | speedup b64 | " + QH[2:], "|---" * 11 + "|"]
    rows = [("base", "digits-dit", None)]
    rows += [(n, f"/{n}", n) for n in ("dyn07", "dyn05", "static05")]
    for label, suffix, step in rows:
        b1, b64 = speed(suffix, 1), speed(suffix, 64)
        m = metrics(run, f"eval-{step}") if step else (metrics(base_run, "eval-base") if base_run else {})
        out.append(f"| {label} | {fmt(b1.get('gflops'), 4)} | {fmt(b1.get('flops_ratio'), 2)} | {fmt(b1.get('speedup'), 2)} | "
                   f"{fmt(b64.get('speedup'), 2)} | " + " | ".join(quality_cols(m)) + " |")
    return "\n".join(out)


def speed_table(run: Path) -> str:
    rows = rj(run / "bench-xl" / "report.json").get("rows", [])
    out = ["| model | batch | GFLOPs | FLOPs ratio | latency ms (IQR) | images/s | speedup | speedup / FLOPs ratio | peak RSS MB | memory ratio |",
           "|---" * 10 + "|"]
    for r in rows:
        name = r["model"].split("+", 1)[1] if "+" in r["model"] else "DiT-XL/2 (D28)"
        out.append(f"| {name} | {r['batch']} | {r['gflops']:.1f} | {r['flops_ratio']:.2f} | {r['latency_ms']:.0f} ({r['iqr_ms']:.0f}) | "
                   f"{r['images_per_s']:.2f} | {r['speedup']:.2f} | {r['speedup_per_flops']:.2f} | {r['peak_rss_mb']:.0f} | {r['peak_mem_ratio']:.2f} |")
    return "\n".join(out)


def main():
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs")
    print("## 1. Depth pruning\n\n" + depth_table(root / "results-depth") + "\n")
    print("## 2. Distillation\n\n" + distill_table(root / "results-distill") + "\n")
    print("## 3. Dynamic width + tokens\n\n" + dynamic_table(root / "results-dynamic", root / "results-depth") + "\n")
    print("## 4. Speed at DiT-XL/2 shape\n\n" + speed_table(root / "results-speed") + "\n")


if __name__ == "__main__":
    main()
