"""Publication output of every report figure: PDF, SVG and PNG, one column and two columns wide.

Each figure is drawn twice, at the exact widths of a two-column paper: 6.9 in (``<name>.*``, a
``figure*`` across both columns) and 3.3 in (``<name>_1col.*``, one column), with 8 pt text that stays
readable at that size (no ``bbox_inches="tight"``: the width on paper is the width asked for). Fonts are
embedded as TrueType (Type 42; conference checkers reject Type 3), and the files carry no timestamp, so
the same results give byte-identical files. Captions live in ``report.md`` and ``figures.tex``, never in
the image. Rendered with the Agg canvas, no pyplot.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib as mpl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bench.reports.tables import latex_escape

FONT = 8.0
WIDTHS = {"2col": 6.9, "1col": 3.3}  # inches: \textwidth and \columnwidth of a two-column paper
SUFFIX = {"2col": "", "1col": "_1col"}
FORMATS = ("pdf", "svg", "png")
PNG_DPI = 200
STYLE = {
    "pdf.fonttype": 42, "ps.fonttype": 42, "svg.fonttype": "path", "svg.hashsalt": "medssl-bench",
    "font.size": FONT, "axes.titlesize": FONT, "axes.labelsize": FONT, "xtick.labelsize": FONT - 1,
    "ytick.labelsize": FONT - 1, "legend.fontsize": FONT - 1, "legend.title_fontsize": FONT - 1,
    "figure.titlesize": FONT, "axes.linewidth": 0.6, "xtick.major.width": 0.6, "ytick.major.width": 0.6,
    "lines.linewidth": 1.0, "lines.markersize": 4.0, "savefig.dpi": PNG_DPI,
}
METADATA = {"pdf": {"CreationDate": None, "ModDate": None, "Producer": None}, "svg": {"Date": None},
            "png": {"Software": None}}


@dataclass
class FigureFiles:
    """One report figure: its caption and the files written for each width."""

    key: str
    caption: str
    files: dict[str, list[Path]] = field(default_factory=dict)  # width name → [pdf, svg, png]
    preferred: str = "1col"  # the width figures.tex uses

    def png(self, width: str = "2col") -> Path:
        return next(p for p in self.files[width] if p.suffix == ".png")

    def pdf(self, width: str) -> Path:
        """The PDF of ``width`` (its path even when only PNGs were written)."""
        return next((p for p in self.files[width] if p.suffix == ".pdf"), self.png(width).with_suffix(".pdf"))

    @property
    def paths(self) -> list[Path]:
        return [p for w in WIDTHS for p in self.files.get(w, [])]


def new_figure(width: float, height: float, layout: str | None = "constrained") -> Figure:
    """A figure of exactly ``width`` × ``height`` inches on the Agg canvas, in the report style."""
    with mpl.rc_context(STYLE):
        fig = Figure(figsize=(width, height), dpi=PNG_DPI, layout=layout)  # text measured as the PNG has it
        FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, stem: Path, formats: tuple[str, ...] = FORMATS) -> list[Path]:
    """Write ``<stem>.pdf|svg|png`` deterministically (Type-42 fonts, no timestamps)."""
    paths = []
    with mpl.rc_context(STYLE):
        for ext in formats:
            path = stem.with_name(stem.name + "." + ext)
            fig.savefig(path, format=ext, metadata=METADATA[ext], dpi=PNG_DPI if ext == "png" else "figure")
            paths.append(path)
    return paths


def render(key: str, caption: str, draw: Callable[[float], Figure | None], stem: Path,
           preferred: str = "1col", formats: tuple[str, ...] = FORMATS) -> FigureFiles | None:
    """Draw a figure at each width (``draw(width_in) -> Figure``, drawn inside the report style) and save
    it in ``formats`` (PNG always, the report shows it); None when ``draw`` has nothing to show."""
    formats = tuple(dict.fromkeys((*formats, "png")))
    out = FigureFiles(key, caption, preferred=preferred)
    for name, width in WIDTHS.items():
        with mpl.rc_context(STYLE):
            fig = draw(width)
        if fig is None:
            return None
        out.files[name] = save(fig, stem.with_name(stem.name + SUFFIX[name]), formats)
    return out


def figures_latex(figures: list[FigureFiles], base: Path) -> str:
    """``figures.tex``: one figure environment per figure (needs ``\\usepackage{graphicx}``); one-column
    figures use ``\\columnwidth``, two-column ones ``figure*`` and ``\\textwidth``."""
    out = ["% Figures written by medssl-bench; needs \\usepackage{graphicx}. Each figure also exists at the",
           "% other width: <name>.pdf is 6.9 in wide (figure*), <name>_1col.pdf 3.3 in (figure).", ""]
    for f in figures:
        wide = f.preferred == "2col"
        env = "figure*" if wide else "figure"
        rel = f.pdf(f.preferred).relative_to(base).as_posix() if f.pdf(f.preferred).is_relative_to(base) \
            else f.pdf(f.preferred).as_posix()
        out += [rf"\begin{{{env}}}[t]", r"  \centering",
                rf"  \includegraphics[width=\{'textwidth' if wide else 'columnwidth'}]{{{rel}}}",
                rf"  \caption{{{latex_escape(f.caption)}}}", rf"  \label{{fig:{_label(f.key)}}}",
                rf"\end{{{env}}}", ""]
    return "\n".join(out)


def _label(key: str) -> str:
    return "".join(ch if ch.isalnum() or ch in ".-" else "-" for ch in key).strip("-")
