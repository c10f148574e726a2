"""Critical-difference diagram — Demšar (2006), §3.2.4 and Fig. 1–2.

Methods sit on an axis of average ranks (rank 1, the best, at the left); the better half is
labelled on the left, the worse half on the right, each with its average rank. A bar of length CD
(Nemenyi) is drawn above the axis. Thick bars below the axis join the cliques of
``bench.reports.stats.cliques`` — maximal runs of methods with no significant pair under the chosen
test — stacked on separate rows wherever they overlap. Rendered with the Agg canvas, no pyplot.
"""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

FONT = 10
ROW = 0.32  # vertical spacing of label rows (axis units ≈ inches)
CLIQUE_ROW = 0.13
AXIS_WIDTH = 6.0  # inches for the rank axis


def stack(intervals: list[tuple[float, float]], gap: float = 0.1) -> list[int]:
    """Row index for each interval so that intervals on one row are at least ``gap`` apart (greedy)."""
    order = sorted(range(len(intervals)), key=lambda i: intervals[i])
    ends: list[float] = []
    rows = [0] * len(intervals)
    for i in order:
        lo, hi = intervals[i]
        row = next((r for r, end in enumerate(ends) if lo > end + gap), len(ends))
        if row == len(ends):
            ends.append(hi)
        else:
            ends[row] = hi
        rows[i] = row
    return rows


def draw_cd(avg_ranks: dict[str, float], cd: float | None, groups: list[list[str]], path_stem: Path,
            title: str = "", test_label: str = "Nemenyi") -> list[Path]:
    """Write ``<path_stem>.pdf`` and ``.png``; returns the two paths."""
    fig = cd_figure(avg_ranks, cd, groups, title, test_label)
    paths = [path_stem.with_name(path_stem.name + ".pdf"), path_stem.with_name(path_stem.name + ".png")]
    for p in paths:
        fig.savefig(p, bbox_inches="tight", pad_inches=0.1, dpi=150)
    return paths


def cd_figure(avg_ranks: dict[str, float], cd: float | None, groups: list[list[str]], title: str = "",
              test_label: str = "Nemenyi") -> Figure:
    """The diagram as a figure (saved with ``bbox_inches="tight"`` so that no name is cut)."""
    names = sorted(avg_ranks, key=lambda m: avg_ranks[m])
    k = len(names)
    lo, hi = 1, max(k, 2)
    scale = AXIS_WIDTH / (hi - lo)  # inches per rank unit

    def x(rank: float) -> float:
        return (rank - lo) * scale

    half = math.ceil(k / 2)
    left, right = names[:half], names[half:][::-1]
    spans = [(avg_ranks[g[0]], avg_ranks[g[-1]]) for g in groups]
    rows = stack([(x(a), x(b)) for a, b in spans])
    n_clique_rows = max(rows, default=-1) + 1
    top = 0.9 if cd else 0.45
    first_label = 0.35 + n_clique_rows * CLIQUE_ROW
    depth = first_label + ROW * max(len(left), len(right))
    fig = Figure(figsize=(AXIS_WIDTH + 3.0, depth + top + 0.3))
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.set_xlim(-1.5, AXIS_WIDTH + 1.5)
    ax.set_ylim(-depth - 0.15, top + 0.3)
    ax.axis("off")
    _axis(ax, x, lo, hi)
    if cd:
        ax.plot([x(1), x(1 + cd)], [top - 0.1] * 2, color="black", lw=1.5)
        for end in (1, 1 + cd):
            ax.plot([x(end)] * 2, [top - 0.16, top - 0.04], color="black", lw=1.5)
        ax.text(x(1 + cd / 2), top - 0.02, f"CD = {cd:.3f}", ha="center", va="bottom", fontsize=FONT)
    ax.text(x(lo), 0.42, "best", ha="center", va="bottom", fontsize=FONT - 1, style="italic")
    for (a, b), row in zip(spans, rows, strict=True):
        y = -0.2 - row * CLIQUE_ROW
        ax.plot([x(a) - 0.06, x(b) + 0.06], [y, y], color="black", lw=4, solid_capstyle="round")
    for i, m in enumerate(left):
        _label(ax, x(avg_ranks[m]), -first_label - i * ROW, -0.1, f"{m}  ({avg_ranks[m]:.2f})", "right")
    for i, m in enumerate(right):
        _label(ax, x(avg_ranks[m]), -first_label - i * ROW, AXIS_WIDTH + 0.1, f"({avg_ranks[m]:.2f})  {m}", "left")
    caption = title + (f" — bars: no significant difference ({test_label})" if groups else "")
    if caption:
        ax.text(AXIS_WIDTH / 2, -depth - 0.05, caption, ha="center", va="top", fontsize=FONT - 1, color="0.3")
    return fig


def _axis(ax, x, lo: int, hi: int) -> None:
    ax.plot([x(lo), x(hi)], [0, 0], color="black", lw=1.2)
    for r in range(lo, hi + 1):
        ax.plot([x(r)] * 2, [0, 0.1], color="black", lw=1.2)
        ax.text(x(r), 0.14, str(r), ha="center", va="bottom", fontsize=FONT)
    for r in range(lo, hi):
        ax.plot([x(r + 0.5)] * 2, [0, 0.05], color="black", lw=0.8)


def _label(ax, xr: float, y: float, x_text: float, text: str, ha: str) -> None:
    ax.plot([xr, xr, x_text], [0, y, y], color="0.25", lw=0.9)
    pad = -0.05 if ha == "right" else 0.05
    ax.text(x_text + pad, y, text, ha=ha, va="center", fontsize=FONT)
