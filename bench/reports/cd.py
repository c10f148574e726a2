"""Critical-difference diagram — Demšar (2006), §3.2.4 and Fig. 1–2.

Methods sit on an axis of average ranks (rank 1, the best, at the left); the better half is labelled
on the left, the worse half on the right, each with its average rank. Under Nemenyi a bar of length CD
is drawn above the axis; when the groups come from Wilcoxon–Holm it is left out (it would invite the
opposite reading). Below the axis every group of ``bench.reports.stats.cliques`` — a maximal set of
methods with no significant pair under the chosen test — is drawn on a row of its own unless it clears
the others on that row: a thick bar when its members are contiguous in rank order, a thin line with a
dot on each member when the group skips a method (possible under Wilcoxon–Holm). Rows are packed by
what is drawn — the bar with its round caps, or the dots — so two bars on one row never touch.

The figure is laid out in inches for an exact width (``bench.reports.figures.WIDTHS``): label widths
are measured, long names wrap and the font shrinks (to 6 pt at the least) until the rank axis keeps a
readable length. Rendered with the Agg canvas, no pyplot.
"""

from __future__ import annotations

import re

from matplotlib.figure import Figure

from bench.reports.figures import FONT, WIDTHS, new_figure

BAR_LW = 3.0  # points: the thick bar of a contiguous group (round caps add BAR_LW/2 at each end)
THIN_LW = 0.9  # points: the line of a group that skips methods
DOT_MS = 4.5  # points: the member dots of such a group
GROUP_ROW = 0.085  # inches between rows of groups
GAP = 0.05  # inches between the drawn ends of two groups on one row
STUB = 0.1  # inches of horizontal line before a label
MIN_SIZE = 6.0


def stack(intervals: list[tuple[float, float]], gap: float = GAP) -> list[int]:
    """Row index for each interval so that intervals on one row are more than ``gap`` apart (greedy)."""
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


def wrap_label(text: str, width: int = 22) -> str:
    """Break a method label into lines of about ``width`` characters, only before ``+``/``[``/`` · ``/`` (``
    or after ``,`` (never inside a name or an override)."""
    pieces = [p for p in re.split(r"(?=\+)|(?=\[)|(?<=,)|(?= · )|(?= \()", text) if p]
    lines = [""]
    for piece in pieces:
        if lines[-1] and len(lines[-1]) + len(piece) > width:
            lines.append(piece.lstrip())
        else:
            lines[-1] += piece
    return "\n".join(lines)


def contiguous(group: list[str], order: list[str]) -> bool:
    """Whether ``group``'s members are consecutive in ``order`` (the methods sorted by average rank)."""
    idx = sorted(order.index(m) for m in group)
    return idx == list(range(idx[0], idx[-1] + 1))


def cd_figure(avg_ranks: dict[str, float], cd: float | None, groups: list[list[str]],
              width: float = WIDTHS["2col"]) -> Figure:
    """The diagram at ``width`` inches; ``cd=None`` leaves the CD bar out (groups from Wilcoxon–Holm)."""
    names = sorted(avg_ranks, key=lambda m: avg_ranks[m])
    k = len(names)
    half = -(-k // 2)
    left, right = names[:half], names[half:][::-1]
    fig = new_figure(width, 1.0, layout=None)
    size, texts, margins = _fit_labels(fig, avg_ranks, left, right, width)
    lo, hi = 1, max(k, 2)
    x0, x1 = margins[0], width - margins[1]

    def x(rank: float) -> float:
        return x0 + (rank - lo) / (hi - lo) * (x1 - x0)

    extents = [_extent(x, avg_ranks, g, contiguous(g, names)) for g in groups]
    rows = stack(extents)
    n_rows = max(rows, default=-1) + 1
    line = size * 1.35 / 72
    heights = {m: texts[m].count("\n") * line + line + 0.03 for m in names}
    top = 0.62 if cd else 0.3
    first = 0.14 + n_rows * GROUP_ROW + 0.05
    depth = first + max(sum(heights[m] for m in left), sum(heights[m] for m in right))
    fig.set_size_inches(width, top + depth)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.set_xlim(0, width)
    ax.set_ylim(-depth, top)
    ax.axis("off")
    _axis(ax, x, lo, hi, size)
    if cd:
        _cd_bar(ax, x, cd, size)
    for group, row in zip(groups, rows, strict=True):
        _group(ax, x, avg_ranks, group, contiguous(group, names), -0.14 - row * GROUP_ROW)
    for side, members in (("left", left), ("right", right)):
        y = -first
        for m in members:
            y -= heights[m] / 2
            xt = x0 - STUB if side == "left" else x1 + STUB
            ax.plot([x(avg_ranks[m]), x(avg_ranks[m]), xt], [0, y, y], color="0.3", lw=0.6, zorder=1)
            ax.text(xt + (-0.03 if side == "left" else 0.03), y, texts[m], ha="right" if side == "left" else "left",
                    va="center", fontsize=size, linespacing=1.1)
            y -= heights[m] / 2
    return fig


def _fit_labels(fig: Figure, avg_ranks: dict[str, float], left: list[str], right: list[str],
                width: float) -> tuple[float, dict[str, str], tuple[float, float]]:
    """Font size, label texts and (left, right) margins so that the rank axis keeps ≥ 40% of the width."""
    renderer = fig.canvas.get_renderer()
    best = None
    for size in (FONT, FONT - 1, MIN_SIZE):
        for wrap in (None, 20, 14, 10):
            texts = {m: _label(m, avg_ranks[m], side == "left", wrap)
                     for side, ms in (("left", left), ("right", right)) for m in ms}
            margins = tuple(max((_text_width(fig, renderer, texts[m], size) for m in ms), default=0.0)
                            + STUB + 0.08 for ms in (left, right))
            best = (size, texts, margins)
            if width - sum(margins) >= 0.4 * width:
                return best
    return best


def _label(name: str, rank: float, left: bool, wrap: int | None) -> str:
    text = wrap_label(name, wrap) if wrap else name
    return f"{text}  ({rank:.2f})" if left else f"({rank:.2f})  {text}"


def _text_width(fig: Figure, renderer, text: str, size: float) -> float:
    t = fig.text(0, 0, text, fontsize=size, linespacing=1.1)
    w = 1.03 * t.get_window_extent(renderer).width / fig.dpi  # a little slack for the vector backends
    t.remove()
    return w


def _extent(x, avg_ranks: dict[str, float], group: list[str], solid: bool) -> tuple[float, float]:
    """The horizontal extent (inches) of what is drawn for ``group``: bar plus round caps, or the dots."""
    pad = (BAR_LW if solid else DOT_MS) / 2 / 72
    xs = [x(avg_ranks[m]) for m in group]
    return min(xs) - pad, max(xs) + pad


def _group(ax, x, avg_ranks: dict[str, float], group: list[str], solid: bool, y: float) -> None:
    xs = sorted(x(avg_ranks[m]) for m in group)
    if solid:
        (art,) = ax.plot([xs[0], xs[-1]], [y, y], color="black", lw=BAR_LW, solid_capstyle="round", zorder=3)
    else:
        (art,) = ax.plot(xs, [y] * len(xs), color="black", lw=THIN_LW, marker="o", ms=DOT_MS, mew=0,
                         solid_capstyle="butt", zorder=3)
    art.set_gid("group:" + "|".join(group))


def _cd_bar(ax, x, cd: float, size: float) -> None:
    y = 0.38
    ax.plot([x(1), x(1 + cd)], [y, y], color="black", lw=1.0)
    for end in (1, 1 + cd):
        ax.plot([x(end)] * 2, [y - 0.04, y + 0.04], color="black", lw=1.0)
    ax.text((x(1) + x(1 + cd)) / 2, y + 0.05, f"CD = {cd:.3f}", ha="center", va="bottom", fontsize=size)


def _axis(ax, x, lo: int, hi: int, size: float) -> None:
    ax.plot([x(lo), x(hi)], [0, 0], color="black", lw=0.8)
    step = 1 if (x(2) - x(1)) >= 0.16 else 2
    labelled = set(range(lo, hi + 1, step))
    if hi not in labelled:  # label both ends
        labelled = (labelled - {hi - 1}) | {hi}
    for r in range(lo, hi + 1):
        ax.plot([x(r)] * 2, [0, 0.06], color="black", lw=0.8)
        if r in labelled:
            ax.text(x(r), 0.09, str(r), ha="center", va="bottom", fontsize=size - 1)
    for r in range(lo, hi):
        ax.plot([x(r + 0.5)] * 2, [0, 0.03], color="black", lw=0.5)
