"""Turn the run directories of the results recipes into the Markdown tables of
docs/results.md:

    python benchmarks/make_results.py runs/ > tables.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fid_at_n import fid_at  # benchmarks/: the FID of an eval's first N samples


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


def mean_sd(values: list, nd: int = 4) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return f"{m:.{nd}f} (1 seed)"
    sd = (sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5
    return f"{m:.{nd}f} ± {sd:.{nd}f}"


MIN_FID_SAMPLES = 100  # evals that drew fewer samples carry only the held-out loss


COMMON_N: dict = {}  # eval dir -> (N, FID of its first N samples): evals compared at one N


def eval_report(run: Path, step: str | None) -> dict:
    """The report of step ``eval-<step>`` (``eval-base`` for the base row), with its folder."""
    d = run / f"eval-{step or 'base'}"
    return {**rj(d / "report.json"), "_dir": str(d)}


def fid_n(report: dict):
    """The N an eval report's FID is quoted at (its own, or the common N it was cut to)."""
    common = COMMON_N.get(report.get("_dir"))
    return common[0] if common else report.get("num_samples")


def fid_of(report: dict):
    """An eval report's FID (at the common N when one is set for it), or None when it drew
    too few samples to have one."""
    common = COMMON_N.get(report.get("_dir"))
    if common:
        return common[1]
    if (report.get("num_samples") or 0) < MIN_FID_SAMPLES:
        return None
    return report.get("metrics", {}).get("frechet_inception_distance")


def fid_cell(evals: list[dict]) -> str:
    """FID mean ± sd over the seeds whose eval has one, with N."""
    with_fid = [e for e in evals if fid_of(e) is not None]
    if not with_fid:
        return "- (held-out loss only)"
    ns = sorted({fid_n(e) for e in with_fid})
    return f"{mean_sd([fid_of(e) for e in with_fid], 2)}, N={'/'.join(str(n) for n in ns)}"


def row_reports(runs: list[Path], step: str | None) -> tuple[list[dict], list[dict], list[dict]]:
    """One table row over the seeds: the step's own reports (none for the base row), its
    eval reports and their metrics."""
    ft = [rj(r / step / "report.json") for r in runs] if step else []
    evs = [eval_report(r, step) for r in runs]
    return ft, evs, [e.get("metrics", {}) for e in evs]


def seeded_runs(root: Path, name: str) -> list[Path]:
    return sorted(p for p in root.glob(f"{name}-s*") if p.is_dir())


DYN_ROWS = (("base", None), ("dynamic width, lambda 0.7", "dynw07"), ("dynamic width + tokens, lambda 0.7", "dynwt07"),
            ("static width 0.7", "static07"), ("dynamic width, lambda 0.5", "dynw05"),
            ("dynamic width + tokens, lambda 0.5", "dynwt05"), ("static width 0.5", "static05"))


def dynamic_table(root: Path) -> str:
    """Table 3 from results-dynamic runs named dynamic-s0, dynamic-s1, ...: FLOPs the written
    (EMA) model runs at inference (DDIM-50 and over the eval's own sampling), FID, class accuracy,
    held-out loss and MSE, each mean ± sd over the seeds."""
    runs = seeded_runs(root, "dynamic")
    out = [("| model | target | inference block FLOPs (EMA, DDIM-50) | FLOPs over the eval's sampling | token keep | "
           f"FID | class acc | held-out loss ({len(runs)} seeds) | held-out MSE |"), "|---" * 9 + "|"]
    for label, step in DYN_ROWS:
        ft, evs, ev = row_reports(runs, step)
        target = next((f.get("target_block_flops") for f in ft if f.get("target_block_flops")), None)
        if step and step.startswith("static"):
            target = float(step[-2:]) / 10
        inf = [f.get("inference_block_flops_ratio") for f in ft]
        sampled = [e.get("inference_block_flops_ratio") for e in evs]
        keep = [e.get("token_keep_ratio") for e in evs]
        out.append(f"| {label} | {fmt(target, 2) if step else '1.00'} | {mean_sd(inf) if step and any(inf) else ('1.00' if not step else 'static')} | "
                   f"{mean_sd(sampled, 3) if any(sampled) else '-'} | {mean_sd(keep, 3) if any(keep) else '-'} | "
                   f"{fid_cell(evs)} | {mean_sd([e.get('class_accuracy') for e in ev], 3)} | "
                   f"{mean_sd([e.get('heldout_loss') for e in ev])} | {mean_sd([e.get('heldout_mse') for e in ev])} |")
    return "\n".join(out)


def seed_table(runs: list[Path], rows, extra: str | None = None) -> str:
    """Per-seed values of each row (seed: FID / held-out loss [/ ``extra`` metric]), so the
    spread can be read row by row."""
    what = "FID, held-out loss" + (f", {extra.replace('_', ' ')}" if extra else "")
    out = ["| model | " + " | ".join(f"{r.name.rsplit('-s', 1)[1]}: {what}" for r in runs) + " |",
           "|---" * (len(runs) + 1) + "|"]
    for label, step in rows:
        cells = []
        for r in runs:
            e = eval_report(r, step)
            m = e.get("metrics", {})
            cells.append(f"{fmt(fid_of(e), 2)}, {fmt(m.get('heldout_loss'), 4)}"
                         + (f", {fmt(m.get(extra), 3)}" if extra else ""))
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def paired_table(runs: list[Path], pairs, extra: str | None = None) -> str:
    """Comparisons paired by seed: within one seed every model's held-out loss uses the same
    timesteps and noises and its samples the same sampling seed, so the per-seed differences
    cancel that shared draw. Mean ± sd over the seeds, and how many seeds the first model is
    lower (better) in (``extra``, a higher-is-better metric: higher in)."""
    out = [f"| comparison (A - B) | held-out loss diff ({len(runs)} seeds) | A lower in | FID diff | A lower in |"
           + (f" {extra.replace('_', ' ')} diff | A higher in |" if extra else ""),
           "|---" * (7 if extra else 5) + "|"]
    for label, sa, sb in pairs:
        diffs = {"loss": [], "fid": [], "extra": []}
        for r in runs:
            ea, eb = eval_report(r, sa), eval_report(r, sb)
            ma, mb = ea.get("metrics", {}), eb.get("metrics", {})
            for key, a, b in (("loss", ma.get("heldout_loss"), mb.get("heldout_loss")),
                              ("fid", fid_of(ea), fid_of(eb)), ("extra", ma.get(extra), mb.get(extra))):
                if a is not None and b is not None:
                    diffs[key].append(a - b)
        dl, df, dx = diffs["loss"], diffs["fid"], diffs["extra"]
        row = (f"| {label} | {mean_sd(dl)} | {sum(d < 0 for d in dl)}/{len(dl)} | "
               f"{mean_sd(df, 2) if df else '-'} | {f'{sum(d < 0 for d in df)}/{len(df)}' if df else '-'} |")
        if extra:
            row += f" {mean_sd(dx, 3) if dx else '-'} | {f'{sum(d > 0 for d in dx)}/{len(dx)}' if dx else '-'} |"
        out.append(row)
    return "\n".join(out)


def dynamic_seed_table(root: Path) -> str:
    """Table 3's per-seed values."""
    return seed_table(seeded_runs(root, "dynamic"), DYN_ROWS)


def dynamic_paired_table(root: Path) -> str:
    """Table 3's comparisons, paired by seed."""
    pairs = [(f"{a} - {b}, lambda {lam[0]}.{lam[1]}", f"{sa}{lam}", f"{sb}{lam}") for lam in ("07", "05")
             for a, sa, b, sb in (("dynamic width", "dynw", "static width", "static"),
                                  ("dynamic width + tokens", "dynwt", "static width", "static"),
                                  ("dynamic width + tokens", "dynwt", "dynamic width", "dynw"))]
    return paired_table(seeded_runs(root, "dynamic"), pairs)


PIX_WIDTH_ROWS = (("base", None), ("dynamic width, lambda 0.7", "dynw07"), ("static width 0.7", "static07"),
                  ("dynamic width, lambda 0.5", "dynw05"), ("static width 0.5", "static05"))
PIX_DEPTH_ROWS = (("base (8 blocks)", None), ("learned (TinyFusion)", "learned"), ("uniform", "uniform"),
                  ("block influence", "block-influence"))


def pixart_width_table(root: Path) -> str:
    """Table 7 from results-pixart runs named pixart-s0, pixart-s1, ...: each row's target, the
    block FLOPs the written (EMA) model runs at inference (DDIM-50, from the fine-tune's report)
    and over the eval's own sampling, prompt-following accuracy, FID, held-out loss and MSE."""
    runs = seeded_runs(root, "pixart")
    out = [("| model | target | inference block FLOPs (EMA, DDIM-50) | block FLOPs over the eval's sampling | "
            f"prompt accuracy | FID | held-out loss ({len(runs)} seeds) | held-out MSE |"), "|---" * 8 + "|"]
    for label, step in PIX_WIDTH_ROWS:
        ft, evs, ev = row_reports(runs, step)
        target = float(step[-2:]) / 10 if step else 1.0
        inf = [f.get("inference_block_flops_ratio") for f in ft]
        sampled = [e.get("inference_block_flops_ratio") for e in evs]
        base = "-" if step else "1.00"  # a compressed row without its reports says nothing
        out.append(f"| {label} | {target:.2f} | {mean_sd(inf) if any(v is not None for v in inf) else base} | "
                   f"{mean_sd(sampled) if any(v is not None for v in sampled) else base} | "
                   f"{mean_sd([e.get('prompt_accuracy') for e in ev], 3)} | {fid_cell(evs)} | "
                   f"{mean_sd([e.get('heldout_loss') for e in ev])} | {mean_sd([e.get('heldout_mse') for e in ev])} |")
    return "\n".join(out)


def pixart_depth_table(root: Path) -> str:
    """Table 8: depth 1:2 on digits-pixart, the kept blocks per seed, the mask's calibration
    loss before fine-tuning, then the fine-tuned model's prompt accuracy, FID and held-out loss."""
    runs = seeded_runs(root, "pixart")
    out = [("| method | kept blocks (per seed) | calib loss before FT | prompt accuracy | FID | "
            f"held-out loss ({len(runs)} seeds) | held-out MSE |"), "|---" * 7 + "|"]
    for label, step in PIX_DEPTH_ROWS:
        evs = [eval_report(r, step) for r in runs]
        ev = [e.get("metrics", {}) for e in evs]
        pr = [rj(r / step / "report.json") for r in runs] if step else []
        kept = [p.get("kept_layers", "-") for p in pr]
        kept = ("all" if not step else str(kept[0]) if all(k == kept[0] for k in kept)
                else "; ".join(str(k) for k in kept))
        # a calibration loss equal to the full model's is the signature of the PixArt only_blocks bug
        # (fixed after seed 0's prune steps ran): those seeds did not measure it
        measured = [p.get("calib_loss_chosen") for p in pr if p.get("calib_loss_chosen") != p.get("calib_loss_full")]
        calib = (f"{mean_sd(measured)}; measured in {len(measured)} of {len(pr)} seeds" if measured
                 else "not measured") if step else "-"
        out.append(f"| {label} | {kept} | {calib} | {mean_sd([e.get('prompt_accuracy') for e in ev], 3)} | "
                   f"{fid_cell(evs)} | {mean_sd([e.get('heldout_loss') for e in ev])} | "
                   f"{mean_sd([e.get('heldout_mse') for e in ev])} |")
    return "\n".join(out)


PIX_COMMON_N = 500  # FID at 500: evals that drew more are cut to their first 500, fewer give none


def pixart_tables(root: Path) -> str:
    runs = seeded_runs(root, "pixart")
    larger = []
    for r in runs:
        for label, step in PIX_WIDTH_ROWS + PIX_DEPTH_ROWS[1:]:
            e = eval_report(r, step)
            n = e.get("num_samples") or 0
            if n > PIX_COMMON_N:
                larger.append((r, label, e))
                COMMON_N[e["_dir"]] = (PIX_COMMON_N, fid_at(PIX_COMMON_N, Path(e["_dir"])))
            elif 0 < n < PIX_COMMON_N:  # held-out loss and prompt accuracy only: no FID at another N
                COMMON_N[e["_dir"]] = (n, None)
    full = ["| model | seed | N | FID | prompt accuracy |", "|---" * 5 + "|"]
    full += [f"| {label} | {r.name.rsplit('-s', 1)[1]} | {e['num_samples']} | "
             f"{fmt(e.get('metrics', {}).get('frechet_inception_distance'), 2)} | "
             f"{fmt(e.get('metrics', {}).get('prompt_accuracy'), 3)} |" for r, label, e in larger]
    width_pairs = [(f"dynamic width - static width, lambda 0.{lam[1]}", f"dynw{lam}", f"static{lam}") for lam in ("07", "05")]
    depth_pairs = [("learned - uniform", "learned", "uniform"), ("learned - block influence", "learned", "block-influence"),
                   ("block influence - uniform", "block-influence", "uniform")]
    return ("## 7. DyDiT on digits-pixart\n\n" + pixart_width_table(root) + "\n\nPer seed:\n\n"
            + seed_table(runs, PIX_WIDTH_ROWS, "prompt_accuracy") + "\n\nPaired by seed:\n\n"
            + paired_table(runs, width_pairs, "prompt_accuracy") + "\n\n## 8. Depth 1:2 on digits-pixart\n\n"
            + pixart_depth_table(root) + "\n\nPer seed:\n\n" + seed_table(runs, PIX_DEPTH_ROWS, "prompt_accuracy")
            + "\n\nPaired by seed:\n\n" + paired_table(runs, depth_pairs, "prompt_accuracy")
            + (f"\n\nThe evals that drew more than {PIX_COMMON_N} samples, at their own N (the tables above use "
               f"their first {PIX_COMMON_N}):\n\n" + "\n".join(full) if larger else "") + "\n")


def sit_depth_table(root: Path) -> str:
    runs = seeded_runs(root, "sit-depth")
    out = [f"| method | kept layers (per seed) | FID (per seed) | class acc (per seed) | held-out velocity loss ({len(runs)} seeds) |",
           "|---" * 5 + "|"]
    for m in ("learned", "uniform", "block-influence"):
        ev = [metrics(r, f"eval-{m}") for r in runs]
        if not any(ev):
            continue
        kept = [rj(r / m / "report.json").get("kept_layers") for r in runs]
        kept = str(kept[0]) if all(k == kept[0] for k in kept) else "; ".join(str(k) for k in kept)
        out.append(f"| {m} | {kept} | {', '.join(fmt(e.get('frechet_inception_distance'), 1) for e in ev)} | "
                   f"{', '.join(fmt(e.get('class_accuracy'), 3) for e in ev)} | {mean_sd([e.get('heldout_loss') for e in ev])} |")
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


def loop_speed_table(runs: list[Path]) -> str:
    """Table 6: one row per (shape and sampler, model, batch), eager and compiled side by side,
    from every ``<shape>-eager`` step (and its ``<shape>-compiled`` twin, if run) of the given
    run directories of recipe ``results-loop-speed``."""
    out = [("| shape, sampler | model | batch | loop FLOPs ratio | eager s/image | eager speedup | eager speedup / FLOPs | "
           "compiled s/image | compiled speedup | compiled speedup / FLOPs | compiled vs eager | warm-up s (compile) | graphs |"),
           "|---" * 13 + "|"]
    for run in runs:
        for shape, arch in (("b2", "DiT-B/2"), ("xl", "DiT-XL/2")):
            report = rj(run / f"{shape}-eager" / "report.json")
            eager = report.get("rows", [])
            sampler = f"{arch}, {next(iter(report.get('sampler', {}).values()), '?').upper().replace(' ', '-')}"
            comp = {(r["model"], r["batch"]): r for r in rj(run / f"{shape}-compiled" / "report.json").get("rows", [])}
            for r in eager:
                c = comp.get((r["model"], r["batch"]), {})
                name = r["model"].split("+", 1)[1] if "+" in r["model"] else "base"
                cs = c.get("seconds_per_image")
                out.append(f"| {sampler} | {name} | {r['batch']} | {r['flops_ratio']:.2f} | {r['seconds_per_image']:.2f} | "
                           f"{r['speedup']:.2f} | {r['speedup_per_flops']:.2f} | {fmt(cs, 2)} | {fmt(c.get('speedup'), 2)} | "
                           f"{fmt(c.get('speedup_per_flops'), 2)} | {fmt(r['seconds_per_image'] / cs if cs else None, 2)} | "
                           f"{fmt(c.get('warmup_s'), 0)} | {c.get('graphs', '-')} |")
    return "\n".join(out)


def main():
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs")
    print("## 1. Depth pruning\n\n" + depth_table(root / "results-depth") + "\n")
    print("## 2. Distillation\n\n" + distill_table(root / "results-distill") + "\n")
    print("## 3. Dynamic width + tokens\n\n" + dynamic_table(root) + "\n\nPer seed:\n\n" + dynamic_seed_table(root)
          + "\n\nPaired by seed:\n\n" + dynamic_paired_table(root) + "\n")
    print("## 5. Flow matching: depth pruning on digits-sit\n\n" + sit_depth_table(root) + "\n")
    print("## 4. Speed at DiT-XL/2 shape\n\n" + speed_table(root / "results-speed") + "\n")
    print("## 6. Speed over the whole sampling loop\n\n" + loop_speed_table(sorted(root.glob("results-loop-speed*"))) + "\n")
    print(pixart_tables(root))


if __name__ == "__main__":
    main()
