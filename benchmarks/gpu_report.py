"""The markdown table of a device check's outputs (benchmarks/gpu_check.sh): python gpu_report.py DIR."""

import json
import sys
from pathlib import Path


def load(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def main(d: Path) -> None:
    gpu = (d / "gpu.txt").read_text().strip().replace("\n", ", ") if (d / "gpu.txt").exists() else "?"
    print(f"Device check: {gpu}\n")
    fwd, loop = load(d / "bench_forward.json"), load(d / "bench_loop.json")
    rows = {}
    for rep, kind in ((fwd, "forward"), (loop, "loop")):
        for r in (rep or {}).get("rows", []):
            name = r["model"].split("+", 1)[1] if "+" in r["model"] else "base"
            e = rows.setdefault(name, {"flops": r["flops_ratio"]})
            e[f"{kind}_b{r['batch']}"] = (r["speedup"], r["latency_ms"] if kind == "forward" else r["seconds_per_image"] * 1e3)
            e.setdefault("build_s", r.get("build_s"))
            if r.get("token_capacity"):
                e["dropped"] = r["token_capacity"]["dropped_share"]
    if rows:
        print("| variant | FLOPs ratio | forward b1 | forward b64 | DDIM-50 loop, CFG 1.5, b16 | build (s) |")
        print("|---|---|---|---|---|---|")
        for name, e in rows.items():
            cells = []
            for k, unit in (("forward_b1", "ms"), ("forward_b64", "ms"), ("loop_b16", "ms/image")):
                v = e.get(k)
                cells.append(f"{v[0]:.2f}x ({v[1]:.2f} {unit})" if v else "-")
            b = e.get("build_s")
            tail = f" | {b:.1f} |" if b is not None else " | - |"
            print(f"| {name} | {e['flops']:.2f} | " + " | ".join(cells) + tail)
        print()
    peer = load(d / "peer.json")
    if peer:
        print("| base forward (bf16) | ditc ms | diffusers ms | diffusers / ditc |")
        print("|---|---|---|---|")
        for k, v in peer.items():
            if isinstance(v, dict) and "ditc_ms" in v:
                extra = f" (ditc {v['share_of_bf16_limit']:.0%} of the bf16 limit, diffusers {v['diffusers_share_of_bf16_limit']:.0%})" if "share_of_bf16_limit" in v else ""
                print(f"| {k}{extra} | {v['ditc_ms']:.2f} | {v['diffusers_ms']:.2f} | {v['ratio']:.2f} |")
        for k in ("width0.5_b64", "tokens0.5_b64"):
            if k in peer:
                v = peer[k]
                print(f"| {k} eager / compiled | {v['eager_ms']:.2f} / {v['compiled_ms']:.2f} | | compiled speedup over compiled base {v['compiled_speedup_vs_compiled_base']:.2f}x |")
        print()
    log = d / "gpu_tests.log"
    if log.exists():
        lines = log.read_text().strip().splitlines()
        print("gpu tests: " + (lines[-1] if lines else "no output"))
        for line in lines:
            if line.startswith("FAILED"):
                print("  " + line)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
