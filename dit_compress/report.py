"""Reports for people and machines: report.json, report.md and PNG plots."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import numpy as np


def _fmt(v) -> str:
    if isinstance(v, float):
        if v != v or math.isinf(v):
            return str(v)
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)) and len(v) > 16:
        return "[" + ", ".join(_fmt(x) for x in v[:16]) + ", ...]"
    if isinstance(v, dict):
        return json.dumps(v, default=str)
    return str(v)


def columns(rows: list[dict]) -> list[str]:
    """The union of the rows' keys, in first-seen order."""
    return list(dict.fromkeys(k for r in rows for k in r))


def table_md(rows: list[dict]) -> str:
    if not rows:
        return "(empty)\n"
    cols = columns(rows)
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    return "\n".join(out) + "\n"


def to_markdown(report: dict, title: str) -> str:
    lines = [f"# {title}", ""]
    scalars = {k: v for k, v in report.items() if not isinstance(v, (dict, list))}
    if scalars:
        lines.append(table_md([{"field": k, "value": v} for k, v in scalars.items()]))
    for k, v in report.items():
        if isinstance(v, dict):
            lines += [f"## {k}", "", table_md([{"field": kk, "value": vv} for kk, vv in v.items()])]
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            shown = v if len(v) <= 50 else v[:: max(1, len(v) // 50)]
            lines += [f"## {k}", "", table_md(shown)]
        elif isinstance(v, list):
            lines += [f"## {k}", "", _fmt(v), ""]
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path, report: dict, title: str) -> None:
    out_dir = Path(out_dir)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out_dir / "report.md").write_text(to_markdown(report, title))


@contextlib.contextmanager
def figure(path: Path, title: str | None, xlabel: str, ylabel: str, size=(6, 3.6)):
    """One PNG: yields the axes, labels them, writes ``path`` (matplotlib imported on first use)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size, dpi=100)
    try:
        yield fig, ax
        if title:
            ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)


def plot_lines(path: Path, xs, series: dict, title: str, xlabel: str, ylabel: str) -> None:
    with figure(path, title, xlabel, ylabel) as (_, ax):
        for name, ys in series.items():
            ax.plot(xs, ys, label=name)
        if len(series) > 1:
            ax.legend(fontsize=7)


def plot_points(path: Path, points, xlabel: str, ylabel: str, diagonal: str | None = None, size=(5, 3.5)) -> None:
    """Scatter of (x, y, label, group) points, one colour per group, optional y = x line."""
    with figure(path, None, xlabel, ylabel, size) as (_, ax):
        for group in dict.fromkeys(p[3] for p in points):
            sel = [p for p in points if p[3] == group]
            ax.scatter([p[0] for p in sel], [p[1] for p in sel], label=group)
            for x, y, label, _ in sel:
                ax.annotate(label, (x, y), fontsize=6)
        if diagonal:
            lim = max(max(p[0] for p in points), max(p[1] for p in points)) * 1.1
            ax.plot([0, lim], [0, lim], "k--", lw=0.8, label=diagonal)
        if diagonal or len({p[3] for p in points}) > 1:
            ax.legend(fontsize=7)


def plot_with_noise(path: Path, points, band: tuple[float, float, str] | None, xlabel: str, ylabel: str,
                    size=(5.5, 3.8)) -> None:
    """(x, y, yerr, label) points with error bars, over a shaded horizontal band (low, high,
    label): e.g. FID against speedup with the seed-to-seed spread of FID drawn, so a difference
    inside the noise looks like one. The y axis starts at 0, so a small gap is drawn small."""
    with figure(path, None, xlabel, ylabel, size) as (_, ax):
        xs = [p[0] for p in points]
        if band is not None:
            lo, hi, text = band
            ax.axhspan(lo, hi, color="0.85", label=text, zorder=0)
        for x, y, err, label in points:
            ax.errorbar([x], [y], yerr=[err] if err else None, fmt="o", capsize=4, zorder=2)
            ax.annotate(label, (x, y), fontsize=7, xytext=(5, 5), textcoords="offset points")
        top = max(max(p[1] + (p[2] or 0) for p in points), band[1] if band else 0)
        ax.set_ylim(0, top * 1.25)
        ax.set_xlim(0, max(xs) * 1.25 if xs else 1)
        if band is not None:
            ax.legend(fontsize=7, loc="lower right")


def plot_heatmap(path: Path, matrix, title: str, xlabel: str, ylabel: str, xticks=None) -> None:
    m = np.asarray(matrix)
    with figure(path, title, xlabel, ylabel) as (fig, ax):
        im = ax.imshow(m, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=1)
        if xticks is not None:
            idx = np.linspace(0, len(xticks) - 1, min(8, len(xticks))).astype(int)
            ax.set_xticks(idx)
            ax.set_xticklabels([str(xticks[i]) for i in idx])
        fig.colorbar(im, ax=ax)
