"""``ditc frontier``: every compression and caching choice on one speed-quality frontier.

Each eval output is a point: its measured seconds per image (the eval's own sampling, steady
state: later batches' median; a single-batch eval, its one batch) against its quality (FID,
fidelity to the base from the same noise as PSNR, held-out loss). Evals of the same name in
several run dirs (seeds) are one point with a mean and a seed-to-seed sd. The plain baseline
is always drawn: the base model alone (no compression, no cache) at its several step counts,
the cheapest competitor of every method; each point is marked Pareto-optimal or not, and
whether it beats "fewer steps" (better quality than the baseline interpolated at its time).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from .. import checks
from ..errors import UsageError
from ..report import figure, table_md, write_report

METRICS = {  # report key: (axis label, better)
    "frechet_inception_distance": ("FID", "lower"),
    "fidelity_psnr": ("PSNR to the base, same noise (dB)", "higher"),
    "heldout_loss": ("held-out loss", "lower"),
}


def _eval_reports(root: Path):
    """(name, report) of every eval output under ``root`` (itself, or its sub-folders)."""
    cands = [root] + sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    for d in cands:
        f = d / "report.json"
        if not f.is_file():
            continue
        try:
            rep = json.loads(f.read_bytes()[: 16 << 20])
        except (OSError, ValueError):
            continue
        if isinstance(rep, dict) and isinstance(rep.get("metrics"), dict) and "sampler" in rep and "num_samples" in rep:
            yield d.name, rep


def _seconds(rep: dict) -> float | None:
    if rep.get("steady_seconds_per_image"):
        return float(rep["steady_seconds_per_image"])
    first = rep.get("first_batch_seconds")
    n = min(rep.get("num_samples") or 0, (rep.get("producer") or {}).get("batch_size") or 0)
    return float(first) / n if first and n else None


def collect(run_dirs, seconds_from=None) -> list[dict]:
    """One row per eval name: its model, sampler, steps, cache policy, seconds per image and
    metrics, each a mean over the run dirs holding it (with the sd and count). ``seconds_from``
    (run dirs): take seconds per image from these alone (a run timed on a quiet machine), the
    quality from every run dir."""
    by_name: dict[str, list[dict]] = {}
    for rd in run_dirs:
        for name, rep in _eval_reports(Path(rd)):
            by_name.setdefault(name, []).append(rep)
    timed: dict[str, list[dict]] | None = None
    if seconds_from:
        timed = {}
        for rd in seconds_from:
            for name, rep in _eval_reports(Path(rd)):
                timed.setdefault(name, []).append(rep)
        missing = sorted(set(by_name) - set(timed))
        if missing:
            raise UsageError(f"`seconds_from` holds no eval named {', '.join(missing[:5])}: it must time every point")
    rows = []
    for name, reps in by_name.items():
        first = reps[0]
        policy = (first.get("feature_cache") or {}).get("policy") if isinstance(first.get("feature_cache"), dict) else None
        row = {"point": name, "source": first.get("source"), "sampler": first.get("sampler"), "steps": first.get("steps"),
               "feature_cache": policy, "seeds": len(reps), "samples": first.get("num_samples")}
        clock = reps if timed is None else timed[name]
        secs = [s for s in (_seconds(r) for r in clock) if s is not None]
        row["seconds_per_image"] = statistics.mean(secs) if secs else None
        row["cached_timing"] = any("cached" in r for r in clock)  # a served eval keeps its first run's seconds
        for key in METRICS:
            vals = [float(r["metrics"][key]) for r in reps if r["metrics"].get(key) is not None]
            row[key] = statistics.mean(vals) if vals else None
            row[f"{key}_sd"] = statistics.stdev(vals) if len(vals) > 1 else None
        rows.append(row)
    return rows


def _better(a: float, b: float, better: str) -> bool:
    return a < b if better == "lower" else a > b


def _baseline_at(base: list[dict], key: str, secs: float) -> float | None:
    """The baseline's quality interpolated (linearly in seconds) at ``secs``; None outside its range."""
    pts = sorted((r["seconds_per_image"], r[key]) for r in base if r.get(key) is not None and r["seconds_per_image"])
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= secs <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (secs - x0) / (x1 - x0)
    return None


def analyse(rows: list[dict], base: str | None = None) -> tuple[str, list[dict]]:
    """(the baseline's source, the rows with ``baseline``, ``pareto_<metric>`` and
    ``beats_fewer_steps_<metric>`` marks)."""
    plain = [r for r in rows if r["feature_cache"] is None and r["seconds_per_image"]]
    if base is None:
        multi = sorted({r["source"] for r in plain if len({x["steps"] for x in plain if x["source"] == r["source"]}) > 1})
        if len(multi) != 1:
            raise UsageError("give `base`: the source whose evals at fewer steps are the baseline "
                             f"({'found: ' + ', '.join(map(str, multi)) if multi else 'no source has uncached evals at two or more step counts'})")
        base = multi[0]
    baseline = [r for r in plain if r["source"] == base]
    if len({r["steps"] for r in baseline}) < 2:
        raise UsageError(f"the baseline {base} needs evals at two or more step counts (the fewer-steps competitor)")
    for r in rows:
        r["baseline"] = r in baseline
        for key, (_, better) in METRICS.items():
            v = r.get(key)
            if v is None or not r["seconds_per_image"]:
                r[f"pareto_{key}"] = r[f"beats_fewer_steps_{key}"] = None
                continue
            dominated = any(o is not r and o.get(key) is not None and o["seconds_per_image"]
                            and o["seconds_per_image"] <= r["seconds_per_image"] and not _better(v, o[key], better)
                            and (o["seconds_per_image"] < r["seconds_per_image"] or _better(o[key], v, better))
                            for o in rows)
            r[f"pareto_{key}"] = not dominated
            ref = None if r["baseline"] else _baseline_at(baseline, key, r["seconds_per_image"])
            r[f"beats_fewer_steps_{key}"] = None if ref is None else _better(v, ref, better)
    return base, rows


def plot(rows: list[dict], path: Path, key: str) -> None:
    label, better = METRICS[key]
    pts = [r for r in rows if r.get(key) is not None and r["seconds_per_image"]]
    if not pts:
        return
    with figure(path, f"speed-quality frontier ({label}, {better} is better)", "seconds per image (measured)", label,
                size=(7, 4.5)) as (_, ax):
        base = sorted((r for r in pts if r["baseline"]), key=lambda r: r["seconds_per_image"])
        ax.plot([r["seconds_per_image"] for r in base], [r[key] for r in base], "k--", lw=1,
                label="base model, fewer steps")
        front = sorted((r for r in pts if r[f"pareto_{key}"]), key=lambda r: r["seconds_per_image"])
        ax.step([r["seconds_per_image"] for r in front], [r[key] for r in front], where="post", color="tab:green",
                lw=1, alpha=0.6, label="Pareto front")
        for r in pts:
            err = r.get(f"{key}_sd")
            color = "black" if r["baseline"] else ("tab:green" if r[f"pareto_{key}"] else "tab:blue")
            ax.errorbar([r["seconds_per_image"]], [r[key]], yerr=[err] if err else None, fmt="o", color=color, capsize=3)
            ax.annotate(r["point"], (r["seconds_per_image"], r[key]), fontsize=6, xytext=(4, 3), textcoords="offset points")
        ax.legend(fontsize=7)


def frontier(run_dirs, output, base: str | None = None, seconds_from=None) -> dict:
    """Collect, analyse and write ``output``: report.json/.md (the table) and one PNG per
    quality measure present (``frontier_fid.png``, ``frontier_psnr.png``, ``frontier_loss.png``)."""
    rows = collect(run_dirs, seconds_from)
    if not rows:
        raise UsageError("no eval outputs found in the given run dirs (folders holding report.json of `ditc eval`)")
    base, rows = analyse(rows, checks.text("base", base, optional=True))
    report = {"base": base, "run_dirs": [str(r) for r in run_dirs], "points": rows,
              "seconds_from": [str(r) for r in seconds_from] if seconds_from else None,
              "note": "seconds per image are each eval's own measured sampling (steady state"
                      + ("; taken from seconds_from alone" if seconds_from else "; the mean over run dirs")
                      + "); evals served from a cache keep their first run's seconds (cached_timing)"}
    out = Path(output)
    write_report(out, report, "ditc frontier")
    names = {"frechet_inception_distance": "fid", "fidelity_psnr": "psnr", "heldout_loss": "loss"}
    for key, short in names.items():
        plot(rows, out / f"frontier_{short}.png", key)
    (out / "frontier.md").write_text(table_md([{k: v for k, v in r.items() if not k.endswith("_sd")} for r in rows]))
    return report
