"""Figures of a report: average ranks, label efficiency, per-dataset bars (Agg canvas, no pyplot).

- ``rank_chart.png``: average rank of each method (DiCoH's ranking), one bar per label fraction.
- ``label_efficiency.png``: metric vs label fraction per method, mean ± std over seeds, one panel
  per dataset plus the mean over the datasets every method has.
- ``bars_<dataset>.png``: seed-averaged metric per method and fraction, error bars = std over seeds,
  the individual seeds as dots.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bench.reports.ranks import RankTable, at_fraction, fraction_label, fractions, ordered
from bench.reports.tables import decimals, pretty_metric

FONT = 10
MARKERS = "osD^v<>pPX*h"


def slug(name: str) -> str:
    """A file-name-safe form of a dataset name (``CVC-ClinicDB`` stays, spaces → ``_``)."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", name).strip("_") or "dataset"


def colours(n: int) -> list:
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=150, bbox_inches="tight", pad_inches=0.1)
    return path


def rank_chart(tables: list[RankTable], path: Path) -> Path:
    """Horizontal bars: average rank per method (best at the top), one bar per fraction."""
    methods = tables[0].methods
    mean_rank = pd.concat([t.avg_rank for t in tables], axis=1).mean(axis=1)
    order = sorted(methods, key=lambda m: (math.isnan(mean_rank[m]), mean_rank[m]))
    nf = len(tables)
    height = 0.8 / nf
    fig = _figure(7.0, 1.2 + len(methods) * max(0.35, 0.22 * nf))
    ax = fig.add_subplot()
    cols = colours(nf)
    y = np.arange(len(order))
    for i, t in enumerate(tables):
        vals = t.avg_rank.reindex(order).to_numpy(dtype=float)
        pos = y - 0.4 + height * (i + 0.5)
        ax.barh(pos, np.nan_to_num(vals), height=height * 0.9, color=cols[i],
                label=f"fraction {fraction_label(t.fraction)}")
        for p, v in zip(pos, vals, strict=True):
            ax.text((0 if math.isnan(v) else v) + 0.05, p, "–" if math.isnan(v) else f"{v:.2f}", va="center",
                    fontsize=FONT - 2)
    ax.set_yticks(y, order, fontsize=FONT)
    ax.invert_yaxis()
    ax.set_xlim(0, len(methods) + 0.8)
    ax.set_xlabel("average rank (lower is better)", fontsize=FONT)
    ax.set_title(f"Average rank of {pretty_metric(tables[0].metric)} over datasets", fontsize=FONT + 1)
    if nf > 1 or fraction_label(tables[0].fraction) != "all":
        ax.legend(fontsize=FONT - 1, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def label_efficiency(frame: pd.DataFrame, metric: str, path: Path) -> Path | None:
    """Metric vs label fraction, mean ± std over seeds; None when the table has < 2 fractions."""
    fr = [f for f in fractions(frame) if not math.isnan(f)]
    if len(fr) < 2:
        return None
    ok = frame[frame["status"] == "ok"]
    methods, datasets = ordered(frame["method"]), ordered(frame["dataset"])
    panels = [(d, ok[ok["dataset"] == d]) for d in datasets]
    if len(datasets) > 1:
        panels.append(("mean over datasets", _dataset_average(ok, metric, datasets)))
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = _figure(4.2 * ncols, 3.2 * nrows)
    cols = colours(len(methods))
    for i, (title, sub) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        stats = sub.groupby(["method", "fraction"])[metric].agg(["mean", "std"])
        for j, m in enumerate(methods):
            if m not in stats.index.get_level_values(0):
                continue
            s = stats.loc[m].sort_index()
            ax.errorbar(s.index, s["mean"], yerr=s["std"].fillna(0.0), color=cols[j], marker=MARKERS[j % 12],
                        ms=4, lw=1.2, capsize=2, label=m)
        ax.set_title(title, fontsize=FONT)
        ax.set_xticks(fr, [fraction_label(f) for f in fr], fontsize=FONT - 1)
        ax.set_xlabel("label fraction", fontsize=FONT - 1)
        ax.set_ylabel(pretty_metric(metric) + " (mean ± std over seeds)", fontsize=FONT - 1)
        ax.grid(alpha=0.3)
    handles = {lab: h for a in fig.axes for h, lab in zip(*a.get_legend_handles_labels(), strict=True)}
    handles = {m: handles[m] for m in methods if m in handles}
    fig.tight_layout()
    if len(panels) < nrows * ncols:  # an empty slot: the legend goes there
        slot = fig.add_subplot(nrows, ncols, len(panels) + 1)
        slot.axis("off")
        slot.legend(handles.values(), handles.keys(), loc="center", fontsize=FONT - 1, frameon=False)
    else:
        fig.legend(handles.values(), handles.keys(), loc="upper center", bbox_to_anchor=(0.5, 0.0),
                   ncol=min(3, len(handles)), fontsize=FONT - 1, frameon=False)
    return _save(fig, path)


def _dataset_average(ok: pd.DataFrame, metric: str, datasets: list[str]) -> pd.DataFrame:
    """Per (method, fraction, seed): the metric averaged over datasets, kept only when all are present."""
    g = ok.groupby(["method", "fraction", "seed"])[metric].agg(["mean", "count"])
    g = g[g["count"] == len(datasets)]
    return g["mean"].rename(metric).reset_index()


def dataset_bars(frame: pd.DataFrame, metric: str, dataset: str, path: Path) -> Path:
    """Seed-averaged metric per method (rows) and fraction (bars), std error bars, seeds as dots."""
    ok = frame[(frame["status"] == "ok") & (frame["dataset"] == dataset)]
    methods = ordered(frame["method"])
    fr = fractions(frame)
    nf = len(fr)
    height = 0.8 / nf
    fig = _figure(7.0, 1.2 + len(methods) * max(0.35, 0.22 * nf))
    ax = fig.add_subplot()
    cols = colours(nf)
    y = np.arange(len(methods))
    digits = decimals(ok[metric].to_numpy()) if len(ok) else 3
    for i, f in enumerate(fr):
        sub = at_fraction(ok, f)
        g = sub.groupby("method")[metric].agg(["mean", "std"]).reindex(methods)
        pos = y - 0.4 + height * (i + 0.5)
        ax.barh(pos, g["mean"].fillna(0.0), height=height * 0.9, xerr=g["std"].fillna(0.0), color=cols[i],
                alpha=0.85, capsize=2, error_kw={"lw": 0.8}, label=f"fraction {fraction_label(f)}")
        for p, m in zip(pos, methods, strict=True):
            seeds = sub.loc[sub["method"] == m, metric].to_numpy()
            ax.plot(seeds, np.full(len(seeds), p), "o", ms=2.5, color="black", alpha=0.6)
            if not len(seeds):
                ax.text(0, p, " no result", va="center", fontsize=FONT - 2, color="0.4")
            else:
                top = np.nanmax(seeds) if len(seeds) > 1 else seeds[0]
                ax.text(max(top, g.at[m, "mean"] + np.nan_to_num(g.at[m, "std"])), p,
                        f"  {g.at[m, 'mean']:.{digits}f}", va="center", fontsize=FONT - 2)
    ax.set_yticks(y, methods, fontsize=FONT)
    ax.invert_yaxis()
    ax.set_xlabel(pretty_metric(metric) + " (mean ± std over seeds; dots: seeds)", fontsize=FONT)
    ax.set_xlim(right=ax.get_xlim()[1] * 1.12)
    ax.set_title(dataset, fontsize=FONT + 1)
    if nf > 1 or not math.isnan(fr[0]):
        ax.legend(fontsize=FONT - 1, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)
