"""Rank tables as Markdown, LaTeX (booktabs) and HTML — the layout of DiCoH's Tables 1–2.

Rows are methods; each dataset column holds the seed-averaged metric (± std over seeds, optional)
and the rank on that dataset in parentheses; the last two columns are the average rank and the
average metric. The best entry of each column is bold, the second underlined (ties share a place).
One small table model (``Table`` of ``Cell``) feeds all three renderers, so they cannot disagree.
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from bench.reports.ranks import RankTable, fraction_label, protocol_key, protocol_name

PRETTY = {"miou": "mIoU", "dice": "Dice", "precision": "Precision", "recall": "Recall", "hd95": "HD95",
          "auc": "AUC", "accuracy": "Accuracy", "f1": "F1"}
LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                 "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}", "[": "{[}", "]": "{]}"}
LATEX_SYMBOLS = {"±": r"$\pm$", "–": "--", "↑": r"$\uparrow$", "↓": r"$\downarrow$", "†": r"$^\dagger$"}
DASH = "–"


@dataclass
class Cell:
    text: str
    bold: bool = False
    underline: bool = False


@dataclass
class Table:
    header: list[str]
    rows: list[list[Cell]]
    caption: str = ""
    label: str = ""
    notes: list[str] = field(default_factory=list)


def pretty_metric(metric: str) -> str:
    return PRETTY.get(metric.lower(), metric)


def decimals(values) -> int:
    """Digits after the point for a column of metric values: 3 below 10 (mIoU, AUC), fewer above."""
    arr = np.abs(np.asarray(values, dtype=float))
    top = np.nanmax(arr) if np.isfinite(arr).any() else 0.0
    return 3 if top < 10 else 2 if top < 100 else 1


def fmt_rank(rank: float) -> str:
    return DASH if rank is None or math.isnan(rank) else f"{rank:.2f}".rstrip("0").rstrip(".")


def fmt_value(value: float, digits: int, std: float | None = None) -> str:
    if value is None or math.isnan(value):
        return DASH
    text = f"{value:.{digits}f}"
    return text if std is None or math.isnan(std) else f"{text} ± {std:.{digits}f}"


def podium(values: pd.Series, lower_is_better: bool) -> tuple[set, set]:
    """The keys holding the best value and those holding the second-best value (ties share a place)."""
    v = values.dropna()
    if v.empty:
        return set(), set()
    distinct = sorted(set(np.round(v.to_numpy(dtype=float), 12)), reverse=not lower_is_better)
    best = {k for k in v.index if round(float(v[k]), 12) == distinct[0]}
    second = {k for k in v.index if len(distinct) > 1 and round(float(v[k]), 12) == distinct[1]}
    return best, second


def rank_table_model(t: RankTable, show_std: bool = True) -> Table:
    """The DiCoH-layout table of one ``RankTable``."""
    name = pretty_metric(t.metric)
    arrow = "↑" if t.higher_is_better else "↓"
    digits = decimals(t.mean.to_numpy())
    header = ["Method", *t.datasets, "Avg. rank ↓", f"Avg. {name} {arrow}"]
    marks = {d: podium(t.ranks[d], True) for d in t.datasets}
    marks["_rank"] = podium(t.avg_rank, True)
    marks["_metric"] = podium(t.avg_metric.drop(index=t.unranked), not t.higher_is_better)
    rows = []
    for m in t.methods:
        row = [Cell(m)]
        for d in t.datasets:
            std = t.std.at[m, d] if show_std else None
            text = fmt_value(t.mean.at[m, d], digits, std)
            if not math.isnan(t.ranks.at[m, d]):
                text += f" ({fmt_rank(t.ranks.at[m, d])})"
            row.append(_marked(text, m, marks[d]))
        row.append(_marked(fmt_rank(t.avg_rank[m]), m, marks["_rank"]))
        row.append(_marked(fmt_value(t.avg_metric[m], digits), m, marks["_metric"]))
        rows.append(row)
    frac = fraction_label(t.fraction)
    where = "" if frac == "all" else f" at label fraction {frac}"
    where += f", {protocol_name(t.protocol)}" if t.protocol is not None else ""
    with_std = show_std and bool(t.std.notna().to_numpy().any())
    caption = (f"{name}{where}: seed-averaged {name}" + (" ± std over seeds" if with_std else "")
               + " with the rank per dataset in parentheses, average rank and average "
               + f"{name} over the {len(t.ranked_datasets)} ranked datasets. Best in bold, second underlined."
               + (" Reference methods are listed last, without a rank." if t.unranked else ""))
    notes = [f"{d} not ranked: no result for {', '.join(ms)}" for d, ms in t.excluded_datasets.items()]
    notes += [f"{m} has no result at this fraction" for m in t.excluded_methods]
    label = f"tab:ranks-{slug(t.metric)}-{frac}" + (f"-{protocol_key(t.protocol)}" if t.by_protocol else "")
    return Table(header, rows, caption, label, notes)


def _marked(text: str, key, marks: tuple[set, set]) -> Cell:
    return Cell(text, bold=key in marks[0], underline=key in marks[1])


def slug(text: str) -> str:
    """The reports' one file- and label-safe form of a name (``CVC-ClinicDB`` stays, spaces → ``_``).
    Run ids use ``bench.grid.slug``, which the reports cannot import (they import no training code)."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_") or "_"


# --- renderers -------------------------------------------------------------------------------------

def md_escape(text: str) -> str:
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("*", "\\*").replace("_", "\\_")
    return re.sub(r"<(?=[A-Za-z/!])", "&lt;", text)  # only what could open an HTML tag


def to_markdown(table: Table, heading: str | None = None) -> str:
    def cell(c: Cell) -> str:
        text = md_escape(c.text)
        text = f"<u>{text}</u>" if c.underline else text
        return f"**{text}**" if c.bold else text

    lines = [f"### {heading}", ""] if heading else []
    lines += ["| " + " | ".join(md_escape(h) for h in table.header) + " |",
              "|" + "|".join([":---"] + [":---:"] * (len(table.header) - 1)) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in table.rows]
    if table.caption:
        lines += ["", md_escape(table.caption)]
    lines += [f"- {md_escape(n)}" for n in table.notes]
    return "\n".join(lines) + "\n"


def latex_escape(text: str) -> str:
    out = "".join(LATEX_SPECIAL.get(ch, ch) for ch in str(text))
    for symbol, latex in LATEX_SYMBOLS.items():
        out = out.replace(symbol, latex)
    return out


def to_latex(table: Table) -> str:
    """A booktabs ``table`` environment with caption and label (needs ``\\usepackage{booktabs}``)."""
    def cell(c: Cell) -> str:
        text = latex_escape(c.text)
        text = rf"\underline{{{text}}}" if c.underline else text
        return rf"\textbf{{{text}}}" if c.bold else text

    lines = [r"\begin{table}[t]", r"  \centering", r"  \small",
             rf"  \caption{{{latex_escape(table.caption)}}}", rf"  \label{{{table.label}}}",
             rf"  \begin{{tabular}}{{l{'c' * (len(table.header) - 1)}}}", r"    \toprule",
             "    " + " & ".join(latex_escape(h) for h in table.header) + r" \\", r"    \midrule"]
    lines += ["    " + " & ".join(cell(c) for c in row) + r" \\" for row in table.rows]
    lines += [r"    \bottomrule", r"  \end{tabular}"]
    if table.notes:
        lines += [r"  \par\smallskip\footnotesize " + "; ".join(latex_escape(n) for n in table.notes) + "."]
    lines += [r"\end{table}"]
    return "\n".join(lines) + "\n"


def to_html(table: Table) -> str:
    def cell(c: Cell) -> str:
        text = html.escape(c.text)
        text = f"<u>{text}</u>" if c.underline else text
        return f"<b>{text}</b>" if c.bold else text

    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.header)
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in row) + "</tr>" for row in table.rows)
    caption = f"<caption>{html.escape(table.caption)}</caption>" if table.caption else ""
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in table.notes)
    return (f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
            + (f"<ul class='notes'>{notes}</ul>" if notes else ""))


def frame_table(frame: pd.DataFrame, caption: str = "", digits: int = 4) -> Table:
    """Any small data frame as a ``Table`` (floats to ``digits`` significant digits)."""
    def text(v) -> str:
        if isinstance(v, float | np.floating):
            return DASH if math.isnan(v) else f"{v:.{digits}g}"
        return str(v)

    rows = [[Cell(text(v)) for v in rec] for rec in frame.itertuples(index=False)]
    return Table([str(c) for c in frame.columns], rows, caption)


def ranks_markdown(tables: list[Table], headings: list[str]) -> str:
    return "\n".join(to_markdown(t, h) for t, h in zip(tables, headings, strict=True))


def ranks_latex(tables: list[Table]) -> str:
    header = "% Rank tables written by medssl-bench; requires \\usepackage{booktabs}.\n\n"
    return header + "\n".join(to_latex(t) for t in tables)
