"""``bench report``: from a results table to ranks, statistics, figures, ``report.md`` and ``report.html``.

Works from the table alone — a run folder (``results.csv`` + ``run.json``, optionally
``diagnostics/``, ``predictions/`` and ``speed.json``) or a plain long-format CSV of published numbers —
and never imports training code (docs/reports.md). Writes into ``<run>/report/`` (or
``<csv stem>_report/`` beside a CSV): ``ranks.csv|md|tex``, ``stats.json``, ``mde.csv``,
``cd_<fraction>``, ``rank_chart``, ``label_efficiency``, ``strip_<dataset>`` and ``predictions_<dataset>``
figures (each as ``.pdf|.svg|.png``, two-column and ``_1col`` widths), ``figures.tex``, ``report.md``,
``report.html``. Results of several fine-tuning protocols (``freeze``: none and backbone) are never ranked
or tested together: every table, analysis and figure is made per protocol (figures in ``full/`` and
``frozen/``, groups keyed ``full-<fraction>`` / ``frozen-<fraction>``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from bench.errors import BenchError
from bench.reports import cd as cd_diagram
from bench.reports import plots
from bench.reports import sections as sec
from bench.reports.control import Control, positive_controls
from bench.reports.design import POWER, design_statement, mde_table
from bench.reports.document import Document
from bench.reports.figures import FORMATS, FigureFiles, figures_latex, render
from bench.reports.load import Source, load_source, metric_direction, reference_label, reference_methods
from bench.reports.predictions import choose_images, mask_iou, predictions_figure, read_predictions
from bench.reports.ranks import (
    PROTOCOL_COLUMN,
    RankTable,
    by_protocol,
    fraction_label,
    ordered,
    protocol_frames,
    protocol_key,
    protocol_name,
    rank_tables,
    ranks_frame,
)
from bench.reports.stats import BLOCKS, CLIQUE_TESTS, ZERO_METHOD, Analysis, json_safe, run_analyses, stats_document
from bench.reports.tables import frame_table, pretty_metric, rank_table_model, ranks_latex, ranks_markdown, slug

TestImages = Callable[[str], tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]]]


@dataclass
class ReportSummary:
    out_dir: Path
    files: list[Path] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)  # a short text summary for the terminal (no "written to")


@dataclass
class Settings:
    metric: str
    higher: bool
    direction_reason: str
    blocks: str
    alpha: float
    cliques: str
    show_std: bool
    references: dict[str, str]  # display name → kind
    rank_references: bool
    formats: tuple[str, ...]

    @property
    def unranked(self) -> list[str]:
        return [] if self.rank_references else list(self.references)


def build_report(source: Path, out_dir: Path | None = None, metric: str = "miou",
                 lower_is_better: bool | None = None, blocks: str = "dataset", cliques: str = "nemenyi",
                 alpha: float = 0.05, show_std: bool = True, references: Sequence[str] = (),
                 rank_references: bool = False, test_images: TestImages | None = None,
                 formats: tuple[str, ...] = FORMATS) -> ReportSummary:
    """Write the full report for ``source`` (a run folder or a long-format CSV) and summarise it.

    ``lower_is_better=None`` infers the direction from the metric's name (distances, errors, losses and
    times are lower-is-better; the summary says which was assumed); ``blocks`` is ``dataset`` |
    ``dataset-fraction`` | ``dataset-seed``; ``cliques`` picks the test behind the CD diagram's groups:
    ``nemenyi`` or ``wilcoxon`` (Holm). Methods whose ``reference`` column is set, and the ``references``
    named here, are shown marked and kept out of ranks and statistics unless ``rank_references``.
    ``test_images(dataset)`` may return (images, ground truths) by test id for the predictions figure.
    ``formats``: the figure files to write (PDF, SVG, PNG by default; PNG always).
    """
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise BenchError(f"unknown figure format(s) {', '.join(unknown)}: choose from {', '.join(FORMATS)}")
    if blocks not in BLOCKS:
        raise BenchError(f"unknown blocks '{blocks}': choose one of {', '.join(BLOCKS)}")
    if cliques not in CLIQUE_TESTS:
        raise BenchError(f"unknown clique test '{cliques}': choose one of {', '.join(CLIQUE_TESTS)}")
    if not 0.0 < alpha < 1.0:
        raise BenchError(f"alpha must lie between 0 and 1, got {alpha}")
    src = load_source(Path(source), metric)
    guessed, reason = metric_direction(metric)
    lower = guessed if lower_is_better is None else bool(lower_is_better)
    reason = reason if lower_is_better is None else "as asked"
    refs = reference_methods(src.frame, tuple(references))
    src.frame["method_name"] = src.frame["method"]
    src.frame["method"] = [reference_label(m, refs[m]) if m in refs else m for m in src.frame["method"]]
    cfg = Settings(metric, not lower, reason, blocks, alpha, cliques, show_std,
                   {reference_label(m, k): k for m, k in refs.items()}, rank_references, tuple(formats))
    out = _out_dir(src, out_dir)
    tables = rank_tables(src.frame, metric, cfg.higher, cfg.unranked)
    ranked = [m for m in ordered(src.frame["method"]) if m not in cfg.unranked]
    analyses = [sec.with_protocol(a, p) for p, frame in protocol_frames(src.frame)  # issue 14: per protocol
                for a in run_analyses(frame, metric, cfg.higher, blocks, alpha, cliques, ranked)]
    complete = completeness(src)
    mde = by_protocol(src.frame, lambda frame: mde_table(frame, metric, ranked, alpha, POWER))
    files = _write_ranks(tables, out, show_std)
    files.append(_write_stats(analyses, complete, mde, cfg, out))
    mde.to_csv(out / "mde.csv", index=False, float_format="%.6g")
    files.append(out / "mde.csv")
    figures = _protocol_figures(src, tables, analyses, cfg, out, test_images)
    files += [p for f in figures for p in f.paths]
    files.append(_write(out / "figures.tex", figures_latex(figures, out)))
    controls = positive_controls(src.frame, metric, cfg.higher, cfg.references, alpha)
    doc = _document(src, tables, analyses, complete, mde, figures, cfg, controls)
    files += _write(out / "report.md", doc.markdown(out)), _write(out / "report.html", doc.html())
    _add_controls_to_stats(out / "stats.json", controls)
    return ReportSummary(out, files, [c.statement() for c in controls] + _summary_lines(analyses, complete, cfg))


def _add_controls_to_stats(path: Path, controls: list[Control]) -> None:
    doc = json.loads(path.read_text(encoding="utf-8"))
    doc["positive_control"] = json_safe([{**asdict(c), "passed": c.passed, "statement": c.statement()}
                                         for c in controls])
    _write(path, json.dumps(doc, indent=2, allow_nan=False) + "\n")


def _out_dir(src: Source, out_dir: Path | None) -> Path:
    if out_dir is None:
        out_dir = src.run_dir / "report" if src.run_dir else src.path.with_name(f"{src.path.stem}_report")
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BenchError(f"cannot create report folder {out_dir} ({err.strerror}): pass another output folder") \
            from None
    return out_dir


def _write(path: Path, text: str) -> Path:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as err:
        raise BenchError(f"cannot write {path} ({err.strerror}): pass another output folder") from None
    return path


# --- ranks, stats and completeness ---------------------------------------------------------------------

def _write_ranks(tables: list[RankTable], out: Path, show_std: bool) -> list[Path]:
    models = [rank_table_model(t, show_std) for t in tables]
    headings = [sec.group_title(t.group) for t in tables]
    csv = out / "ranks.csv"
    ranks_frame(tables).to_csv(csv, index=False, float_format="%.6g")
    return [csv, _write(out / "ranks.md", ranks_markdown(models, headings)),
            _write(out / "ranks.tex", ranks_latex(models))]


def _write_stats(analyses: list[Analysis], complete: sec.Completeness, mde: pd.DataFrame, cfg: Settings,
                 out: Path) -> Path:
    doc = stats_document(analyses, cfg.metric, cfg.higher, cfg.blocks, cfg.alpha, cfg.cliques)
    doc["direction"] = cfg.direction_reason
    doc["references"] = {"methods": cfg.references, "ranked": cfg.rank_references}
    for a in doc["analyses"]:
        if "k" in a and "n" in a:
            a["design"] = design_statement(a["k"], a["n"], cfg.cliques, cfg.alpha)
    doc["minimum_detectable_effect"] = json_safe({"power": POWER, "rows": mde.to_dict(orient="records")})
    doc["incomplete"] = json_safe({
        "failed_cells": complete.failed.to_dict(orient="records"), "absent_cells": complete.absent,
        "run_missing": complete.run_missing, "fewer_seeds": complete.fewer_seeds,
        "seed_mismatch": complete.seed_mismatch,
    })
    return _write(out / "stats.json", json.dumps(doc, indent=2, allow_nan=False) + "\n")


def completeness(src: Source) -> sec.Completeness:
    """Failed cells (with reasons), cells absent from the table, run.json's missing list, (method,
    dataset, fraction) entries with fewer seeds than the others, and seed ids that differ between methods.

    A cell is absent when its (dataset, fraction) has rows and its method lacks a seed that another
    method has there; (dataset, fraction) pairs that no method has are not expected.
    """
    frame = src.frame
    cols = [c for c in ("cell_id", "method", "dataset", "fraction", "seed", "error") if c in frame.columns]
    failed = frame.loc[frame["status"] != "ok", cols].reset_index(drop=True)
    run_missing = [", ".join(f"{k}={v}" for k, v in m.items()) if isinstance(m, dict) else str(m)
                   for m in src.run.get("missing", []) or []]
    methods = ordered(frame["method"])
    absent, mismatch = [], []
    several = protocol_frames(frame)[0][0] is not None  # issue 14: each protocol is its own grid
    by = [PROTOCOL_COLUMN] * several
    for (d, f, *p), sub in frame.groupby(["dataset", frame["fraction"].fillna(-1.0), *by], sort=False):
        where = f"{d}, fraction {fraction_label(None if f == -1.0 else f)}" + "".join(
            f", {protocol_name(x)}" for x in p)
        seeds = sorted(sub["seed"].unique().tolist())
        have = set(zip(sub["method"], sub["seed"], strict=True))
        absent += [f"{m} on {where}, seed {s}" for m in methods for s in seeds if (m, s) not in have]
        ids = {m: tuple(sorted(sub.loc[sub["method"] == m, "seed"].unique().tolist())) for m in methods}
        present = {m: s for m, s in ids.items() if s}
        if len(set(present.values())) > 1:
            mismatch.append(f"{where}: " + "; ".join(f"{m}: {', '.join(map(str, s))}" for m, s in present.items()))
    ok = frame[frame["status"] == "ok"]
    n = ok.groupby(["method", "dataset", "fraction", *by], dropna=False)["seed"].nunique()
    fewer = [f"{m} on {d} at fraction {fraction_label(f)}{''.join(f', {protocol_name(x)}' for x in p)}: "
             f"{c} of {n.max()} seeds" for (m, d, f, *p), c in n.items() if c < n.max()]
    return sec.Completeness(failed, absent, run_missing, fewer, mismatch)


# --- figures -------------------------------------------------------------------------------------------

def _protocol_figures(src: Source, tables: list[RankTable], analyses: list[Analysis], cfg: Settings, out: Path,
                      test_images: TestImages | None) -> list[FigureFiles]:
    """Issue 14: ``_figures`` once per fine-tuning protocol when the results hold several, each protocol's
    files in ``<out>/<full|frozen>/``, its keys suffixed and its captions prefixed with the protocol (CD
    diagrams already carry it in their group); plainly ``_figures`` otherwise."""
    parts = protocol_frames(src.frame)
    if parts[0][0] is None:
        return _figures(src, tables, analyses, cfg, out, test_images)
    figs = []
    for p, frame in parts:
        short, name = protocol_key(p), protocol_name(p)
        (out / short).mkdir(exist_ok=True)
        mine = [a for a in analyses if a.result.get("protocol") == p]
        for f in _figures(replace(src, frame=frame), [t for t in tables if t.protocol == p], mine, cfg,
                          out / short, test_images):
            if not f.key.startswith("cd_"):
                f.key, f.caption = f"{f.key}_{short}", f"{name[:1].upper()}{name[1:]}: {f.caption}"
            figs.append(f)
    return figs


def _figures(src: Source, tables: list[RankTable], analyses: list[Analysis], cfg: Settings, out: Path,
             test_images: TestImages | None) -> list[FigureFiles]:
    figs: list[FigureFiles | None] = []
    for a in analyses:
        r = a.result
        if r["k"] >= 2 and r["n"] >= 1:
            cd = r["nemenyi"]["cd"] if cfg.cliques == "nemenyi" else None
            figs.append(render(f"cd_{a.group}", _cd_caption(a, cfg),
                               lambda w, r=r, cd=cd: cd_diagram.cd_figure(r["avg_ranks"], cd, r["cliques"], w),
                               out / f"cd_{a.group}", formats=cfg.formats))
    if any(t.avg_rank.notna().any() for t in tables):
        figs.append(render("rank_chart", "Average rank of each method over the ranked datasets, one marker per "
                           "label fraction (1 = best).", lambda w: plots.rank_chart(tables, w), out / "rank_chart",
                           formats=cfg.formats))
    refs = set(cfg.references)
    figs.append(render("label_efficiency", f"{pretty_metric(cfg.metric)} against the label fraction (log axis), "
                       "mean ± std over seeds, per dataset and averaged over the datasets every method has (the "
                       "one-column version: the average alone)" + ("; reference methods dashed." if refs else "."),
                       lambda w: plots.label_efficiency(src.frame, cfg.metric, w, cfg.higher, refs),
                       out / "label_efficiency", "2col", cfg.formats))
    direction = "higher is better" if cfg.higher else "lower is better"
    for d in tables[0].datasets:
        figs.append(render(f"strip_{d}", f"{d}: {pretty_metric(cfg.metric)} of every seed (dots) and the seed mean "
                           f"(bars) per method and label fraction, on an axis zoomed to the values ({direction}).",
                           lambda w, d=d: plots.dataset_strip(src.frame, cfg.metric, d, w, cfg.higher),
                           out / f"strip_{slug(d)}", formats=cfg.formats))
    figs += _prediction_figures(src, out, test_images, cfg.formats)
    return [f for f in figs if f is not None]


def _cd_caption(a: Analysis, cfg: Settings) -> str:
    r = a.result
    head = (f"Critical-difference diagram, {sec.group_title(a.group).lower()}: average ranks of k = {r['k']} methods "
            f"over N = {r['n']} blocks (rank 1, the best, at the left). ")
    if cfg.cliques == "nemenyi":
        return head + (f"Bars join the methods whose average ranks differ by less than the critical difference "
                       f"CD = {r['nemenyi']['cd']:.3f} (Nemenyi, α = {cfg.alpha}).")
    return head + (f"Bars join groups with no significant pair under the Wilcoxon signed-rank test with Holm's "
                   f"correction (α = {cfg.alpha}); a thin line with dots joins a group that skips a method ranked "
                   "between its members. No CD bar is drawn: the groups do not come from Nemenyi.")


def _prediction_figures(src: Source, out: Path, test_images: TestImages | None,
                        formats: tuple[str, ...]) -> list[FigureFiles | None]:
    folder = src.run_dir / "predictions" if src.run_dir else None
    if folder is None or not folder.is_dir() or "cell_id" not in src.frame.columns:
        return []
    frame = src.frame[(src.frame["status"] == "ok") & src.frame["cell_id"].notna()]
    frame = frame[[(folder / f"{c}.npz").is_file() for c in frame["cell_id"]]]
    figs = []
    for dataset, sub in frame.groupby("dataset", sort=False):
        f = sub["fraction"].min()
        sub = sub[sub["fraction"].isna()] if pd.isna(f) else sub[sub["fraction"] == f]
        sub = sub[sub["seed"] == sub["seed"].min()]
        cells = {r.method: read_predictions(folder / f"{r.cell_id}.npz") for r in sub.itertuples()}
        key = str(sub["test_set"].iloc[0]) if "test_set" in sub and pd.notna(sub["test_set"].iloc[0]) else dataset
        images, truths = test_images(key) if test_images else (None, None)
        preds = {m: masks for m, (masks, _) in cells.items()}
        ious = {m: {i: (iou[i] if i in iou else mask_iou(masks[i], truths[i]) if truths and i in truths
                        else float("nan")) for i in masks} for m, (masks, iou) in cells.items()}
        base = "scratch" if "scratch" in preds else next(iter(preds))
        common = [i for i in preds[base] if all(i in p for p in preds.values())]
        rows = choose_images(ious[base], 4, common)
        chosen = f"test images spread over {base}'s IoU range (top: lowest)"
        if not rows:  # no IoU recorded and no ground truth given: the first test images
            rows, chosen = common[:4], "the first test images (no IoU recorded)"
        if not rows:
            continue
        seed = int(sub["seed"].iloc[0])
        caption = (f"{dataset}: {chosen}, "
                   + ("the image, its ground truth and " if truths else "")
                   + f"each method's prediction at label fraction {fraction_label(f)}, seed {seed}; "
                   "the number in the corner is the image's IoU.")
        figs.append(render(f"predictions_{dataset}", caption,
                           lambda w, rows=rows, p=preds, i=ious, im=images, t=truths: predictions_figure(
                               rows, p, i, w, im, t), out / f"predictions_{slug(dataset)}", "2col", formats))
    return figs


# --- the document --------------------------------------------------------------------------------------

def _document(src: Source, tables: list[RankTable], analyses: list[Analysis], complete: sec.Completeness,
              mde: pd.DataFrame, figs: list[FigureFiles], cfg: Settings, controls: Sequence[Control] = ()
              ) -> Document:
    doc = Document(f"Benchmark report: {pretty_metric(cfg.metric)}")
    direction = "higher is better" if cfg.higher else "lower is better"
    doc.para(f"Source: {src.path}. Metric: {cfg.metric} ({direction}; {cfg.direction_reason}). Blocks: "
             f"{cfg.blocks}. Post-hoc test for the diagram: {sec.TEST_NAMES[cfg.cliques]}, α = {cfg.alpha}.")
    facts = sec.protocol_facts(src.frame, src.run)
    designs = {(a.result["k"], a.result["n"]): a.group for a in analyses if a.result["k"] >= 2 and a.result["n"] >= 1}
    facts += [f"Design{'' if len(designs) == 1 else ' (' + sec.group_title(g).lower() + ')'}: "
              + design_statement(k, n, cfg.cliques, cfg.alpha) for (k, n), g in designs.items()]
    if cfg.references:
        facts.append("Reference methods (" + ", ".join(cfg.references) + "): " + (
            "ranked with the others, as asked." if cfg.rank_references else
            "shown for comparison, kept out of the ranks and the statistics."))
    doc.bullets(facts)
    if controls:  # before anything else is read: can this design tell a good initialisation from a bad one?
        doc.heading("Positive control")
        doc.bullets([c.statement() for c in controls])
    sec.run_section(doc, src.frame, src.run)
    sec.completeness_section(doc, complete, analyses)
    doc.heading("Ranks")
    doc.para("Per dataset, the metric is averaged over seeds first (seeds are repetitions), methods are "
             "ranked (1 = best, ties share the average rank), and ranks are averaged over the datasets on "
             "which every method has a result (Demšar 2006).")
    for t in tables:
        doc.heading(sec.group_title(t.group), 3)
        doc.table(rank_table_model(t, cfg.show_std))
    by_key = {f.key: f for f in figs}
    _stats_section(doc, analyses, by_key, mde, cfg)
    doc.heading("Figures")
    for f in figs:
        if not f.key.startswith("cd_"):
            doc.image(f.png(), f.key, f.caption)
    doc.para(f"Every figure is written as {', '.join(f.upper() for f in cfg.formats)}, 6.9 in wide and 3.3 in "
             "wide (…_1col); figures.tex holds their LaTeX figure environments with these captions.")
    _diagnostics_section(doc, src)
    sec.cost_section(doc, src.frame, src.run_dir / "speed.json" if src.run_dir else None)
    notes = [str(n) for n in src.run.get("notes", []) or []]
    if notes:
        doc.heading("Notes")
        doc.bullets(notes)
    return doc


def _stats_section(doc: Document, analyses: list[Analysis], figs: dict[str, FigureFiles], mde: pd.DataFrame,
                   cfg: Settings) -> None:
    doc.heading("Statistics")
    doc.para(sec.blocks_sentence(cfg.blocks) + f" Wilcoxon signed-rank tests use zero_method='{ZERO_METHOD}' "
             "(zero differences split evenly between the signed-rank sums, Demšar 2006 §3.1.3) and Holm's "
             "correction over all pairs (Benavoli et al. 2016). The omnibus test is the exact Friedman test where "
             "its distribution can be enumerated, Iman–Davenport's F otherwise. Effect sizes: mean difference of "
             f"{cfg.metric} over blocks (first minus second method) with a Student-t 95% interval, and d_z.")
    for a in analyses:
        doc.heading(sec.group_title(a.group), 3)
        doc.bullets(sec.statements(a.result, cfg.alpha, cfg.cliques))
        if f"cd_{a.group}" in figs:
            f = figs[f"cd_{a.group}"]
            doc.image(f.png(), f"critical-difference diagram, {sec.group_title(a.group)}", f.caption)
        if a.result.get("pairs"):
            doc.table(sec.pairs_table(a.result["pairs"]))
    sec.mde_section(doc, mde, cfg.metric, cfg.alpha, POWER)


def _diagnostics_section(doc: Document, src: Source) -> None:
    folder = src.run_dir / "diagnostics" if src.run_dir else None
    if folder is None or not folder.is_dir():
        return
    from bench.reports.diagnostics import LEGEND

    doc.heading("Feature diagnostics")
    doc.para(LEGEND)
    csv = folder / "diagnostics.csv"
    if csv.is_file():
        try:
            doc.table(frame_table(pd.read_csv(csv)))
        except (pd.errors.ParserError, pd.errors.EmptyDataError):
            doc.para(f"{csv} could not be read as CSV.")
    for png in sorted(folder.glob("*.png")):
        doc.image(png, png.stem)


def _summary_lines(analyses: list[Analysis], c: sec.Completeness, cfg: Settings) -> list[str]:
    lines = [f"metric {cfg.metric}: {'higher' if cfg.higher else 'lower'} is better ({cfg.direction_reason}"
             + ("; pass --lower-is-better/--higher-is-better to change it)" if cfg.direction_reason != "as asked"
                else ")")]
    for a in analyses:
        r = a.result
        head = f"{sec.group_title(a.group)}: "
        if "friedman" not in r:
            lines.append(head + f"no statistics ({r.get('note', 'not enough data')})")
            continue
        best = min(r["avg_ranks"], key=r["avg_ranks"].get)
        lines.append(head + f"best {best} (avg rank {r['avg_ranks'][best]:.2f}) of k={r['k']} over "
                     f"N={r['n']}/{a.blocks_total} blocks; {r['omnibus']['test']} p={sec.p_text(r['omnibus']['p'])}; "
                     f"CD={r['nemenyi']['cd']:.3f}; {len(r['significant_pairs'])} significant pair(s) "
                     f"({r['clique_test']})")
        lines.append("  " + design_statement(r["k"], r["n"], cfg.cliques, cfg.alpha))
    issues = []
    if len(c.failed):
        issues.append(f"{len(c.failed)} failed cell(s)")
    if c.absent or c.run_missing:
        issues.append(f"{max(len(c.absent), len(c.run_missing))} missing cell(s)")
    if c.seed_mismatch:
        issues.append(f"seed ids differ between methods in {len(c.seed_mismatch)} place(s)")
    if issues:
        lines.append(", ".join(issues) + " — listed in report.md")
    return lines
