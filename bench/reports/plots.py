"""Figures of a report: average ranks, label efficiency, the seeds of each dataset (seaborn, no pyplot).

Each function draws one figure at a given width (inches) and returns it; ``bench.reports.figures``
saves it as PDF, SVG and PNG at one- and two-column widths. Captions are the report's, not the image's.

- ``rank_chart``: average rank of each method (DiCoH's ranking), a dot per label fraction, on the
  axis 1 … k (1 = best).
- ``label_efficiency``: metric vs label fraction on a log axis with the fractions as ticks, mean ± std
  over seeds, one panel per dataset plus the mean over the datasets every method has (one column wide:
  the mean panel alone when there are more than two panels).
- ``dataset_strip``: every seed of every method as a dot and the seed mean as a bar, on an axis zoomed
  to the data (not from 0), with the metric's direction in the axis label.
Reference methods are drawn dashed (label efficiency) and keep their marked names.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from bench.reports.figures import FONT, new_figure
from bench.reports.ranks import RankTable, fraction_label, fractions, ordered
from bench.reports.tables import pretty_metric

MARKERS = "osD^v<>pPX*h"


def colours(n: int) -> list:
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def direction_label(metric: str, higher_is_better: bool) -> str:
    """``mIoU (higher is better →)`` / ``HD95 (← lower is better)``: the axis label of a metric."""
    name = pretty_metric(metric)
    return f"{name} (higher is better →)" if higher_is_better else f"{name} (← lower is better)"


def rank_chart(tables: list[RankTable], width: float) -> Figure:
    """Dots: average rank per method (best at the top), one dot per fraction, axis 1 … k (1 = best)."""
    methods = [m for m in tables[0].methods if m not in tables[0].unranked]
    mean_rank = pd.concat([t.avg_rank for t in tables], axis=1).reindex(methods).mean(axis=1)
    order = sorted(methods, key=lambda m: (math.isnan(mean_rank[m]), mean_rank[m]))
    nf = len(tables)
    fig = new_figure(width, 0.55 + 0.17 * len(order) + (0.25 if nf > 1 else 0.0))
    ax = fig.add_subplot()
    cols = colours(nf)
    y = np.arange(len(order))
    for i, t in enumerate(tables):
        vals = t.avg_rank.reindex(order).to_numpy(dtype=float)
        offset = (i - (nf - 1) / 2) * min(0.18, 0.7 / nf)
        ax.plot(vals, y + offset, ls="none", marker=MARKERS[i % len(MARKERS)], color=cols[i], ms=4,
                label=fraction_label(t.fraction))
    ax.set_yticks(y, order)
    ax.invert_yaxis()
    k = len(methods)
    ax.set_xlim(0.8, max(k, 2) + 0.2)
    ax.set_xticks(range(1, max(k, 2) + 1))
    ax.set_xlabel("average rank over datasets (1 = best)")
    ax.grid(axis="x", alpha=0.3, lw=0.5)
    if nf > 1:
        _legend(fig, *ax.get_legend_handles_labels(), width, "label fraction")
    return fig


def _legend(fig: Figure, handles: list, labels: list[str], width: float, title: str | None = None,
            per_row: int | None = None) -> None:
    """One legend for the figure, below the axes (constrained layout makes room for it)."""
    per_row = per_row or (6 if width > 5 else 3)
    fig.legend(handles, labels, loc="outside lower center", ncols=min(per_row, len(labels)), frameon=False,
               title=title, handletextpad=0.3, columnspacing=1.0)


def label_efficiency(frame: pd.DataFrame, metric: str, width: float, higher_is_better: bool = True,
                     references: set[str] | frozenset[str] = frozenset()) -> Figure | None:
    """Metric vs label fraction (log axis), mean ± std over seeds; None with fewer than 2 fractions."""
    fr = [f for f in fractions(frame) if not math.isnan(f)]
    if len(fr) < 2:
        return None
    ok = frame[frame["status"] == "ok"]
    methods, datasets = ordered(frame["method"]), ordered(frame["dataset"])
    panels = [(d, ok[ok["dataset"] == d]) for d in datasets]
    if len(datasets) > 1:
        panels.append(("mean over datasets", _dataset_average(ok, metric, datasets)))
    if width < 5 and len(panels) > 2:  # one column holds one readable panel: the average over datasets
        panels = panels[-1:]
    ncols = min(3 if width > 5 else 2, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    panel_w = width / ncols
    fig = new_figure(width, nrows * panel_w * 0.78 + 0.25 + 0.14 * math.ceil(len(methods) / 3))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    cols = colours(len(methods))
    for ax in axes.flat[len(panels):]:
        ax.set_axis_off()
    for i, (ax, (title, sub)) in enumerate(zip(axes.flat, panels, strict=False)):
        stats = sub.groupby(["method", "fraction"])[metric].agg(["mean", "std"])
        for j, m in enumerate(methods):
            if m not in stats.index.get_level_values(0):
                continue
            s = stats.loc[m].sort_index()
            ax.errorbar(s.index, s["mean"], yerr=s["std"].fillna(0.0), color=cols[j], marker=MARKERS[j % 12],
                        ms=3, lw=1.0, capsize=1.5, elinewidth=0.6, ls="--" if m in references else "-", label=m)
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks(fr, [fraction_label(f) for f in fr])
        # upright tick labels when the closest two fractions sit nearer than a label is wide (≈ 0.09 in a digit)
        gap = min(np.diff(np.log10(fr))) / (np.log10(fr[-1]) - np.log10(fr[0])) * panel_w * 0.7
        widest = max(len(fraction_label(f)) for f in fr)
        ax.tick_params(axis="x", labelrotation=90 if gap < 0.09 * widest + 0.03 else 0)
        ax.set_title(title)
        ax.grid(alpha=0.3, lw=0.5)
        if i + ncols >= len(panels):  # the lowest panel of its column
            ax.set_xlabel("label fraction (log)")
    fig.supylabel(direction_label(metric, higher_is_better) + "\nmean ± std over seeds", fontsize=FONT)
    handles = {lab: h for a in fig.axes for h, lab in zip(*a.get_legend_handles_labels(), strict=True)}
    _legend(fig, [handles[m] for m in methods if m in handles], [m for m in methods if m in handles], width,
            per_row=3 if width > 5 else 2)
    return fig


def _dataset_average(ok: pd.DataFrame, metric: str, datasets: list[str]) -> pd.DataFrame:
    """Per (method, fraction, seed): the metric averaged over datasets, kept only when all are present."""
    g = ok.groupby(["method", "fraction", "seed"])[metric].agg(["mean", "count"])
    g = g[g["count"] == len(datasets)]
    return g["mean"].rename(metric).reset_index()


def dataset_strip(frame: pd.DataFrame, metric: str, dataset: str, width: float,
                  higher_is_better: bool = True) -> Figure:
    """Every seed as a dot and the seed mean as a vertical bar, per method (rows) and fraction (colour),
    on an axis zoomed to the values; the direction of the metric in the axis label."""
    methods = ordered(frame["method"])
    ok = frame[(frame["status"] == "ok") & (frame["dataset"] == dataset)].copy()
    fr = fractions(frame)
    labels = [fraction_label(f) for f in fr]
    ok["fraction_label"] = [fraction_label(f) for f in ok["fraction"]]
    nf = len(fr)
    fig = new_figure(width, 0.6 + len(methods) * (0.16 + 0.06 * (nf - 1)) + (0.2 if nf > 1 else 0.0))
    ax = fig.add_subplot()
    palette = dict(zip(labels, colours(nf), strict=True))
    if len(ok):
        sns.stripplot(data=ok, x=metric, y="method", hue="fraction_label", order=methods, hue_order=labels,
                      dodge=nf > 1, jitter=False, size=3.2, alpha=0.75, palette=palette, linewidth=0,
                      legend=nf > 1, ax=ax)
    means = ok.groupby(["method", "fraction_label"])[metric].mean()
    band = 0.8 / nf if nf > 1 else 0.0
    for i, m in enumerate(methods):
        for j, lab in enumerate(labels):
            if (m, lab) in means.index:
                y = i + (j - (nf - 1) / 2) * band
                ax.plot([means[(m, lab)]] * 2, [y - 0.28 / nf, y + 0.28 / nf], color="black", lw=1.2)
        if m not in set(ok["method"]):
            ax.text(0.01, i, "no result", transform=ax.get_yaxis_transform(), va="center",
                    fontsize=FONT - 1, color="0.4")
    ax.set_yticks(range(len(methods)), methods)
    ax.set_ylim(len(methods) - 0.5, -0.5)
    ax.set_ylabel("")
    ax.set_xlabel(direction_label(metric, higher_is_better))
    ax.grid(axis="x", alpha=0.3, lw=0.5)
    if ax.get_legend() is not None:
        handles, names = ax.get_legend_handles_labels()
        ax.get_legend().remove()
        _legend(fig, handles, names, width, "label fraction")
    return fig

