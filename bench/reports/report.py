"""``bench report``: from a results table to ranks, statistics, figures, ``report.md`` and ``report.html``.

Works from the table alone — a run folder (``results.csv`` + ``run.json``, optionally
``diagnostics/`` and ``speed.json``) or a plain long-format CSV of published numbers — and never
imports training code. Writes into ``<run>/report/`` (or ``<csv stem>_report/`` beside a CSV):
``ranks.csv|md|tex``, ``stats.json``, ``cd_<fraction>.pdf|png``, ``rank_chart.png``,
``label_efficiency.png``, ``bars_<dataset>.png``, ``report.md``, ``report.html``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path

import pandas as pd

from bench.errors import BenchError
from bench.reports import cd as cd_diagram
from bench.reports import plots
from bench.reports.document import Document
from bench.reports.load import Source, load_source
from bench.reports.load import lower_is_better as known_lower_is_better
from bench.reports.ranks import RankTable, fraction_label, rank_tables, ranks_frame
from bench.reports.stats import (
    BLOCKS,
    CLIQUE_TESTS,
    ZERO_METHOD,
    Analysis,
    json_safe,
    run_analyses,
    stats_document,
)
from bench.reports.tables import (
    DASH,
    Cell,
    Table,
    frame_table,
    pretty_metric,
    rank_table_model,
    ranks_latex,
    ranks_markdown,
)

COST_COLUMNS = {"pretrain_s": "pretrain (s)", "finetune_s": "finetune (s)",
                "pretrain_images_per_s": "pretrain images/s", "finetune_images_per_s": "finetune images/s"}
TEST_NAMES = {"nemenyi": "Nemenyi", "wilcoxon": "Wilcoxon signed-rank, Holm"}


@dataclass
class ReportSummary:
    out_dir: Path
    files: list[Path] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)  # a short text summary for the terminal


@dataclass
class Completeness:
    """What is not in the ranking, and why: failed cells, cells absent from the table, fewer seeds."""

    failed: pd.DataFrame
    absent: list[str]
    run_missing: list[str]
    fewer_seeds: list[str]

    @property
    def any(self) -> bool:
        return bool(len(self.failed) or self.absent or self.run_missing or self.fewer_seeds)


def build_report(source: Path, out_dir: Path | None = None, metric: str = "miou",
                 lower_is_better: bool | None = None, blocks: str = "dataset", cliques: str = "nemenyi",
                 alpha: float = 0.05, show_std: bool = True) -> ReportSummary:
    """Write the full report for ``source`` (a run folder or a long-format CSV) and summarise it.

    ``lower_is_better=None`` infers the direction from the metric's name (``hd95``, ``*loss*``,
    ``*error*`` are lower-is-better); ``blocks`` is ``dataset`` | ``dataset-fraction`` | ``dataset-seed``;
    ``cliques`` picks the test behind the CD diagram's bars: ``nemenyi`` or ``wilcoxon`` (Holm).
    """
    if blocks not in BLOCKS:
        raise BenchError(f"unknown blocks '{blocks}': choose one of {', '.join(BLOCKS)}")
    if cliques not in CLIQUE_TESTS:
        raise BenchError(f"unknown clique test '{cliques}': choose one of {', '.join(CLIQUE_TESTS)}")
    if not 0.0 < alpha < 1.0:
        raise BenchError(f"alpha must lie between 0 and 1, got {alpha}")
    src = load_source(Path(source), metric)
    lower = known_lower_is_better(metric) if lower_is_better is None else bool(lower_is_better)
    out = _out_dir(src, out_dir)
    files: list[Path] = []
    tables = rank_tables(src.frame, metric, not lower)
    files += _write_ranks(tables, out, show_std)
    analyses = run_analyses(src.frame, metric, not lower, blocks, alpha, cliques)
    complete = completeness(src)
    files.append(_write_stats(analyses, complete, metric, not lower, blocks, alpha, cliques, out))
    figures = _figures(src, tables, analyses, metric, cliques, out)
    files += [p for paths in figures.values() for p in paths]
    doc = _document(src, tables, analyses, complete, figures, metric, not lower, blocks, alpha, cliques, show_std)
    files += _write(out / "report.md", doc.markdown(out)), _write(out / "report.html", doc.html())
    return ReportSummary(out, files, _summary_lines(out, analyses, complete, metric))


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


# --- ranks and stats files ---------------------------------------------------------------------------

def _write_ranks(tables: list[RankTable], out: Path, show_std: bool) -> list[Path]:
    models = [rank_table_model(t, show_std) for t in tables]
    headings = [_group_title(fraction_label(t.fraction)) for t in tables]
    csv = out / "ranks.csv"
    ranks_frame(tables).to_csv(csv, index=False, float_format="%.6g")
    return [csv, _write(out / "ranks.md", ranks_markdown(models, headings)),
            _write(out / "ranks.tex", ranks_latex(models))]


def _write_stats(analyses: list[Analysis], complete: Completeness, metric: str, higher: bool, blocks: str,
                 alpha: float, cliques: str, out: Path) -> Path:
    doc = stats_document(analyses, metric, higher, blocks, alpha, cliques)
    doc["incomplete"] = json_safe({
        "failed_cells": complete.failed.to_dict(orient="records"),
        "absent_cells": complete.absent, "run_missing": complete.run_missing,
        "fewer_seeds": complete.fewer_seeds,
    })
    return _write(out / "stats.json", json.dumps(doc, indent=2, allow_nan=False) + "\n")


def completeness(src: Source) -> Completeness:
    """Failed cells (with reasons), grid cells absent from the table, run.json's missing list, and
    (method, dataset, fraction) entries averaged over fewer seeds than the others."""
    frame = src.frame
    cols = [c for c in ("cell_id", "method", "dataset", "fraction", "seed", "error") if c in frame.columns]
    failed = frame.loc[frame["status"] != "ok", cols].reset_index(drop=True)
    absent = [] if src.strict else _absent(frame)
    run_missing = [_describe(m) for m in src.run.get("missing", []) or []]
    ok = frame[frame["status"] == "ok"]
    n = ok.groupby(["method", "dataset", "fraction"], dropna=False)["seed"].nunique()
    fewer = [f"{m} on {d} at fraction {fraction_label(f)}: {c} of {n.max()} seeds"
             for (m, d, f), c in n.items() if c < n.max()]
    return Completeness(failed, absent, run_missing, fewer)


def _absent(frame: pd.DataFrame) -> list[str]:
    keys = ["method", "dataset", "fraction", "seed"]
    have = set(map(tuple, frame[keys].fillna(-1.0).to_numpy().tolist()))
    levels = [list(dict.fromkeys(frame[k].fillna(-1.0).tolist())) for k in keys]
    return [f"{m} on {d}, fraction {fraction_label(None if f == -1.0 else f)}, seed {s}"
            for m, d, f, s in product(*levels) if (m, d, f, s) not in have]


def _describe(item) -> str:
    if isinstance(item, dict):
        return ", ".join(f"{k}={v}" for k, v in item.items())
    return str(item)


# --- figures -----------------------------------------------------------------------------------------

def _figures(src: Source, tables: list[RankTable], analyses: list[Analysis], metric: str, cliques: str,
             out: Path) -> dict[str, list[Path]]:
    figs: dict[str, list[Path]] = {}
    for a in analyses:
        r = a.result
        if r["k"] >= 2 and r["n"] >= 1:
            title = f"{_group_title(a.group)}: k = {r['k']} methods, N = {r['n']} blocks, α = {r['nemenyi']['alpha']}"
            figs[f"cd_{a.group}"] = cd_diagram.draw_cd(r["avg_ranks"], r["nemenyi"]["cd"], r["cliques"],
                                                       out / f"cd_{a.group}", title, TEST_NAMES[cliques])
    if any(t.avg_rank.notna().any() for t in tables):
        figs["rank_chart"] = [plots.rank_chart(tables, out / "rank_chart.png")]
    eff = plots.label_efficiency(src.frame, metric, out / "label_efficiency.png")
    if eff:
        figs["label_efficiency"] = [eff]
    for d in tables[0].datasets:
        figs[f"bars_{d}"] = [plots.dataset_bars(src.frame, metric, d, out / f"bars_{plots.slug(d)}.png")]
    return figs


# --- the document --------------------------------------------------------------------------------------

def _group_title(group: str) -> str:
    return "Overall" if group == "all" else f"Label fraction {group}"


def _document(src: Source, tables: list[RankTable], analyses: list[Analysis], complete: Completeness,
              figs: dict[str, list[Path]], metric: str, higher: bool, blocks: str, alpha: float,
              cliques: str, show_std: bool) -> Document:
    doc = Document(f"Benchmark report: {pretty_metric(metric)}")
    direction = "higher is better" if higher else "lower is better"
    doc.para(f"Source: {src.path}. Metric: {metric} ({direction}). Blocks: {blocks}. "
             f"Post-hoc test for the diagram: {TEST_NAMES[cliques]}, α = {alpha}.")
    _run_section(doc, src)
    _completeness_section(doc, complete, tables, analyses)
    doc.heading("Ranks")
    doc.para("Per dataset, the metric is averaged over seeds first (seeds are repetitions), methods are "
             "ranked (1 = best, ties share the average rank), and ranks are averaged over the datasets on "
             "which every method has a result (Demšar 2006).")
    for t in tables:
        doc.heading(_group_title(fraction_label(t.fraction)), 3)
        doc.table(rank_table_model(t, show_std))
    _stats_section(doc, analyses, figs, blocks, alpha, cliques, higher, metric)
    _figures_section(doc, figs)
    _diagnostics_section(doc, src)
    _cost_section(doc, src)
    notes = [str(n) for n in src.run.get("notes", []) or []]
    if notes:
        doc.heading("Notes")
        doc.bullets(notes)
    return doc


def _run_section(doc: Document, src: Source) -> None:
    run = src.run
    frame = src.frame
    precision = _distinct(frame, "precision_mode") or _distinct_spec(run, "precision")
    device = _distinct(frame, "device")
    if not (run or precision or device):
        return
    doc.heading("Run")
    facts = []
    if precision:
        facts.append(f"Precision: {precision}")
    if device:
        facts.append(f"Device: {device}")
    doc.bullets(facts)
    for key, title in (("versions", "Versions"), ("hardware", "Hardware")):
        if isinstance(run.get(key), dict) and run[key]:
            doc.heading(title, 3)
            doc.table(_key_value_table(run[key]))
    if run.get("spec"):
        doc.heading("Spec", 3)
        doc.code(json.dumps(run["spec"], indent=2, default=str))


def _distinct(frame: pd.DataFrame, col: str) -> str:
    if col not in frame.columns:
        return ""
    return ", ".join(str(v) for v in dict.fromkeys(frame[col].dropna().tolist()))


def _distinct_spec(run: dict, key: str) -> str:
    spec = run.get("spec")
    return str(spec[key]) if isinstance(spec, dict) and spec.get(key) is not None else ""


def _key_value_table(d: dict) -> Table:
    rows = [[Cell(str(k)), Cell(v if isinstance(v, str) else json.dumps(v, default=str))] for k, v in d.items()]
    return Table(["key", "value"], rows)


def _completeness_section(doc: Document, c: Completeness, tables: list[RankTable],
                          analyses: list[Analysis]) -> None:
    doc.heading("Completeness")
    if not c.any and not any(a.excluded_blocks or a.excluded_methods for a in analyses):
        doc.para("Every cell of the grid has a result.")
        return
    if len(c.failed):
        doc.heading(f"Failed cells ({len(c.failed)})", 3)
        doc.table(frame_table(c.failed))
    if c.run_missing:
        doc.heading(f"Cells expected by the run but missing ({len(c.run_missing)})", 3)
        doc.bullets(c.run_missing)
    if c.absent:
        doc.heading(f"Grid cells absent from the results table ({len(c.absent)})", 3)
        doc.bullets(c.absent)
    if c.fewer_seeds:
        doc.heading("Averaged over fewer seeds", 3)
        doc.bullets(c.fewer_seeds)
    doc.heading("Effect on the ranking", 3)
    doc.bullets([_coverage(a) for a in analyses])


def _coverage(a: Analysis) -> str:
    text = f"{_group_title(a.group)}: ranked over {a.result['blocks_used']} of {a.blocks_total} blocks"
    if a.excluded_blocks:
        left = [f"{b} (no result for {', '.join(ms)})" for b, ms in a.excluded_blocks.items()]
        text += "; left out: " + "; ".join(left)
    if a.excluded_methods:
        text += f"; not ranked (no result at all): {', '.join(a.excluded_methods)}"
    return text


def _stats_section(doc: Document, analyses: list[Analysis], figs: dict, blocks: str, alpha: float,
                   cliques: str, higher: bool, metric: str) -> None:
    doc.heading("Statistics")
    doc.para(_blocks_sentence(blocks) + f" Wilcoxon signed-rank tests use zero_method='{ZERO_METHOD}' "
             "(zero differences split evenly between the signed-rank sums, Demšar 2006 §3.1.3) and Holm's "
             "correction over all pairs (Benavoli et al. 2016). Effect sizes: mean difference of "
             f"{metric} over blocks (first minus second method) with a seeded 95% percentile-bootstrap interval.")
    for a in analyses:
        doc.heading(_group_title(a.group), 3)
        doc.bullets(statements(a.result, alpha, cliques))
        if f"cd_{a.group}" in figs:
            doc.image(figs[f"cd_{a.group}"][1], f"critical-difference diagram, {_group_title(a.group)}")
        if a.result.get("pairs"):
            doc.table(_pairs_table(a.result["pairs"]))


def _blocks_sentence(blocks: str) -> str:
    if blocks == "dataset":
        return "One block per dataset (metric averaged over seeds); each label fraction is analysed separately."
    if blocks == "dataset-fraction":
        return "One block per (dataset, label fraction), metric averaged over seeds; all fractions analysed together."
    return ("One block per (dataset, seed) within each fraction. Seeds are repetitions, not independent data "
            "sets: this inflates N and shrinks the critical difference; prefer blocks=dataset.")


def statements(r: dict, alpha: float, cliques: str) -> list[str]:
    """The statistics of one analysis in words."""
    if "friedman" not in r:
        return [f"No statistics: {r.get('note', 'not enough data')} (k = {r['k']}, N = {r['n']})."]
    fr, idv, nem = r["friedman"], r["iman_davenport"], r["nemenyi"]
    rejects = idv["significant"]
    out = [f"k = {r['k']} methods over N = {r['n']} blocks. Friedman χ²_F = {fr['chi2']:.3f} (df {fr['df']}, "
           f"p = {_p(fr['p'])}); Iman–Davenport F_F = {_num(idv['F'])} (df {idv['df1']}, {idv['df2']}, "
           f"p = {_p(idv['p'])}): " + ("undefined with a single block, so nothing can be concluded."
                                        if math.isnan(idv["p"]) else
                                        f"the methods {'differ' if rejects else 'do not differ'} significantly "
                                        f"at α = {alpha}.")]
    out.append(f"Nemenyi: q_α = {nem['q_alpha']:.3f}, critical difference CD = {nem['cd']:.3f}.")
    for test in ("nemenyi", "wilcoxon"):
        key = "" if test == "nemenyi" else "wilcoxon_"
        sig = [p for p in r["pairs"] if p[f"{test}_significant"]]
        name = TEST_NAMES[test]
        if sig:
            out += [f"{p[key + 'better']} is significantly better than {p[key + 'worse']} at α = {alpha} ({name})."
                    for p in sig]
            if test == "nemenyi" and not rejects:
                out.append("Caution: the Friedman test does not reject equal performance, so Demšar (2006) "
                           "advises against reading the Nemenyi pairs above.")
        else:
            out.append(f"No significant differences between any pair at α = {alpha} ({name}).")
    if 2.0 / 2 ** r["n"] >= alpha:
        out.append(f"With N = {r['n']} blocks an exact two-sided Wilcoxon test cannot reach p < {alpha}; "
                   "pairwise conclusions need more datasets.")
    groups = "; ".join("{" + ", ".join(g) + "}" for g in r["cliques"]) or "none"
    out.append(f"Groups without a significant difference ({TEST_NAMES[cliques]}): {groups}.")
    return out


def _pairs_table(pairs: list[dict]) -> Table:
    header = ["pair", "Δ avg rank", "Nemenyi p", "Wilcoxon p", "Holm p", "mean diff [95% CI]", "wins/ties/losses"]
    rows = []
    for p in pairs:
        rows.append([Cell(f"{p['a']} vs {p['b']}"), Cell(f"{p['rank_diff']:+.3f}"),
                     Cell(_p(p["nemenyi_p"]), bold=p["nemenyi_significant"]), Cell(_p(p["wilcoxon_p"])),
                     Cell(_p(p["holm_p"]), bold=p["wilcoxon_significant"]),
                     Cell(f"{p['mean_diff']:+.4g} [{p['ci_low']:+.4g}, {p['ci_high']:+.4g}]"),
                     Cell(f"{p['a_wins']}/{p['ties']}/{p['b_wins']}")])
    return Table(header, rows, "Pairwise comparisons (bold: significant). Δ avg rank and the mean difference "
                 "are first minus second method; wins count blocks where the first method ranks better.")


def _p(p: float | None) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return DASH
    if p == 0.0:
        return "0"
    return f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}"


def _num(x: float) -> str:
    return "∞" if math.isinf(x) else DASH if math.isnan(x) else f"{x:.3f}"


def _figures_section(doc: Document, figs: dict[str, list[Path]]) -> None:
    doc.heading("Figures")
    captions = {"rank_chart": "average rank per method and fraction",
                "label_efficiency": "metric vs label fraction (mean ± std over seeds)"}
    for key, caption in captions.items():
        if key in figs:
            doc.image(figs[key][0], caption)
    for key, paths in figs.items():
        if key.startswith("bars_"):
            doc.image(paths[0], f"{key[5:]}: metric per method (mean ± std over seeds)")


def _diagnostics_section(doc: Document, src: Source) -> None:
    folder = src.run_dir / "diagnostics" if src.run_dir else None
    if folder is None or not folder.is_dir():
        return
    doc.heading("Feature diagnostics")
    csv = folder / "diagnostics.csv"
    if csv.is_file():
        try:
            doc.table(frame_table(pd.read_csv(csv)))
        except (pd.errors.ParserError, pd.errors.EmptyDataError):
            doc.para(f"{csv} could not be read as CSV.")
    for png in sorted(folder.glob("*.png")):
        doc.image(png, png.stem)


def _cost_section(doc: Document, src: Source) -> None:
    frame = src.frame
    cols = [c for c in COST_COLUMNS if c in frame.columns]
    speed = src.run_dir / "speed.json" if src.run_dir else None
    if not cols and not (speed and speed.is_file()):
        return
    doc.heading("Compute cost")
    if cols:
        ok = frame[frame["status"] == "ok"]
        costs = ok.groupby("method", sort=False)[cols].agg(lambda s: pd.to_numeric(s, errors="coerce").mean())
        costs = costs.reindex(list(dict.fromkeys(frame["method"]))).reset_index()
        doc.table(frame_table(costs.rename(columns=COST_COLUMNS),
                              "Mean per finetune cell over successful cells (pretraining time is that of "
                              "the checkpoint the cell used; a shared checkpoint is counted in each cell)."))
    if speed and speed.is_file():
        doc.heading("Throughput (speed.json)", 3)
        _speed(doc, speed)


def _speed(doc: Document, path: Path) -> None:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        doc.para(f"{path} is not valid JSON.")
        return
    records = data if isinstance(data, list) else None
    if records and all(isinstance(r, dict) for r in records):
        doc.table(frame_table(pd.json_normalize(records)))
    else:
        doc.code(json.dumps(data, indent=2, default=str))


def _summary_lines(out: Path, analyses: list[Analysis], c: Completeness, metric: str) -> list[str]:
    lines = [f"report written to {out}"]
    for a in analyses:
        r = a.result
        head = f"{_group_title(a.group)}: "
        if "friedman" not in r:
            lines.append(head + f"no statistics ({r.get('note', 'not enough data')})")
            continue
        best = min(r["avg_ranks"], key=r["avg_ranks"].get)
        sig = len(r["significant_pairs"])
        lines.append(head + f"best {best} (avg rank {r['avg_ranks'][best]:.2f}) of k={r['k']} over "
                     f"N={r['n']}/{a.blocks_total} blocks; Iman–Davenport p={_p(r['iman_davenport']['p'])}; "
                     f"CD={r['nemenyi']['cd']:.3f}; {sig} significant pair(s) ({r['clique_test']})")
    issues = []
    if len(c.failed):
        issues.append(f"{len(c.failed)} failed cell(s)")
    if c.absent or c.run_missing:
        issues.append(f"{max(len(c.absent), len(c.run_missing))} missing cell(s)")
    if issues:
        lines.append(", ".join(issues) + " — listed in report.md")
    return lines
