"""The sections of ``report.md``: protocol header, completeness, statistics in words, design, costs.

Every function adds blocks to a ``Document`` from numbers already computed; nothing here computes a
statistic. Optional columns (``protocol_version``, ``eval``, ``freeze``, ``n_test_empty_gt``) are read
when present and skipped silently when not (a plain CSV of published numbers has none).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from bench.reports.design import MDE_METHOD, can_reach, design_statement
from bench.reports.document import Document
from bench.reports.ranks import PROTOCOL_COLUMN, group_key, protocol_key, protocol_name, protocols, split_group
from bench.reports.stats import Analysis
from bench.reports.tables import DASH, Cell, Table, frame_table

TEST_NAMES = {"nemenyi": "Nemenyi", "wilcoxon": "Wilcoxon signed-rank, Holm"}
EVAL_MODES = {"native": "native: logits upsampled to each test image's original size and scored there",
              "resized": "resized: scored on the masks resized to the working size"}
EMPTY_GT = ("Empty ground truth: an empty prediction of an empty mask scores IoU = Dice = 1 and HD95 = 0; "
            "when exactly one of them is empty, IoU = Dice = 0 and HD95 = the image diagonal.")


@dataclass
class Completeness:
    """What is not in the ranking, and why: failed cells, absent cells, fewer or different seeds."""

    failed: pd.DataFrame
    absent: list[str]
    run_missing: list[str]
    fewer_seeds: list[str]
    seed_mismatch: list[str]

    @property
    def any(self) -> bool:
        return bool(len(self.failed) or self.absent or self.run_missing or self.fewer_seeds or self.seed_mismatch)


def group_title(group: str) -> str:
    """"Label fraction 0.05", "Overall"; within a protocol (``frozen-0.05``): "Frozen backbone (linear-style
    probe of the head), label fraction 0.05"."""
    protocol, group = split_group(group)
    if protocol is None:
        return "Overall" if group == "all" else f"Label fraction {group}"
    name = protocol_name(protocol)
    return name[:1].upper() + name[1:] + (", overall" if group == "all" else f", label fraction {group}")


def with_protocol(analysis: Analysis, protocol: str | None) -> Analysis:
    """An analysis of one protocol's rows, its group keyed by the protocol (``frozen-0.05``) and its
    result saying which (``protocol``: none | backbone); unchanged for ``None`` (a single protocol)."""
    if protocol is None:
        return analysis
    key = group_key(protocol, analysis.group)
    analysis.result.update(group=key, protocol=protocol, protocol_name=protocol_name(protocol))
    return dataclasses.replace(analysis, group=key)


def p_text(p: float | None) -> str:
    """A p-value for print: never "0" (an underflow is "< 1e-16"), NaN as a dash."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return DASH
    if p < 1e-16:
        return "< 1e-16"
    return f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}"


def num_text(x: float) -> str:
    return "∞" if math.isinf(x) else DASH if math.isnan(x) else f"{x:.3f}"


# --- header ------------------------------------------------------------------------------------------

def distinct(frame: pd.DataFrame, col: str) -> list[str]:
    if col not in frame.columns:
        return []
    return [str(v) for v in dict.fromkeys(frame[col].dropna().tolist()) if str(v).strip()]


def _spec(run: dict, *keys: str):
    value = run.get("spec")
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def protocol_facts(frame: pd.DataFrame, run: dict) -> list[str]:
    """Protocol version(s), evaluation and fine-tuning mode, empty-ground-truth counts (what is recorded)."""
    facts = []
    versions = distinct(frame, "protocol_version") or ([str(run["protocol_version"])] if run.get("protocol_version")
                                                      else [])
    if len(versions) == 1:
        facts.append(f"Protocol version: {versions[0]}.")
    elif versions:
        counts = frame["protocol_version"].astype(str).value_counts()
        facts.append("Protocol versions: " + ", ".join(f"{v} ({counts.get(v, 0)} cells)" for v in versions)
                     + " — cells of different versions are not comparable.")
    modes = distinct(frame, "eval") or ([str(_spec(run, "eval"))] if _spec(run, "eval") else [])
    if modes:
        facts.append("Evaluation: " + "; ".join(EVAL_MODES.get(m, m) for m in modes) + ".")
    freeze = distinct(frame, "freeze") or ([str(_spec(run, "finetune", "freeze"))]
                                            if _spec(run, "finetune", "freeze") is not None else [])
    if freeze:
        facts.append("Fine-tuning: " + "; ".join(_freeze_text(f) for f in freeze) + ".")
    if len(protocols(frame)) > 1:
        facts.append("Fine-tuning protocols are analysed separately: each (" + ", ".join(
            protocol_name(p) for p in protocols(frame)) + ") has its own rank tables, statistics and figures; "
            "no ranking or test mixes them.")
    if "n_test_empty_gt" in frame.columns:
        facts.append(EMPTY_GT + " Test images with an empty mask: " + _empty_counts(frame) + ".")
    elif run:
        facts.append(EMPTY_GT)
    return facts


def _freeze_text(value: str) -> str:
    if value.lower() in ("none", "", "false", "no"):
        return "full fine-tuning (backbone and head trained; freeze: none)"
    if value.lower() == "backbone":
        return ("frozen backbone (head trained, backbone frozen with BatchNorm in eval mode: a linear-style probe "
                "of the head; freeze: backbone)")
    return f"freeze: {value}"


def _empty_counts(frame: pd.DataFrame) -> str:
    parts = []
    for dataset, sub in frame.groupby("dataset", sort=False):
        empty = pd.to_numeric(sub["n_test_empty_gt"], errors="coerce").dropna().astype(int)
        if empty.empty:
            continue
        total = pd.to_numeric(sub["n_test"], errors="coerce").dropna().astype(int) if "n_test" in sub else None
        count = str(empty.iloc[0]) if empty.nunique() == 1 else f"{empty.min()}–{empty.max()}"
        if total is not None and len(total) and total.nunique() == 1:
            count += f" of {total.iloc[0]}"
        parts.append(f"{dataset} {count}")
    return ", ".join(parts) or "not recorded"


def run_section(doc: Document, frame: pd.DataFrame, run: dict) -> None:
    precision = ", ".join(distinct(frame, "precision_mode")) or (str(_spec(run, "precision"))
                                                                  if _spec(run, "precision") else "")
    device = ", ".join(distinct(frame, "device"))
    if not (run or precision or device):
        return
    doc.heading("Run")
    doc.bullets([f"Precision: {precision}"] * bool(precision) + [f"Device: {device}"] * bool(device))
    for key, title in (("versions", "Versions"), ("hardware", "Hardware")):
        if isinstance(run.get(key), dict) and run[key]:
            doc.heading(title, 3)
            rows = [[Cell(str(k)), Cell(v if isinstance(v, str) else json.dumps(v, default=str))]
                    for k, v in run[key].items()]
            doc.table(Table(["key", "value"], rows))
    if run.get("spec"):
        doc.heading("Spec", 3)
        doc.code(json.dumps(run["spec"], indent=2, default=str))


# --- completeness ------------------------------------------------------------------------------------

def completeness_section(doc: Document, c: Completeness, analyses: list[Analysis]) -> None:
    doc.heading("Completeness")
    if not c.any and not any(a.excluded_blocks or a.excluded_methods for a in analyses):
        doc.para("Every cell of the grid has a result.")
        return
    if len(c.failed):
        doc.heading(f"Failed cells ({len(c.failed)})", 3)
        doc.table(frame_table(c.failed))
    for title, items in ((f"Cells expected by the run but missing ({len(c.run_missing)})", c.run_missing),
                         (f"Cells absent from the results table ({len(c.absent)})", c.absent),
                         ("Seed ids that differ between methods", c.seed_mismatch),
                         ("Averaged over fewer seeds", c.fewer_seeds)):
        if items:
            doc.heading(title, 3)
            doc.bullets(items)
    doc.heading("Effect on the ranking", 3)
    doc.bullets([_coverage(a) for a in analyses])


def _coverage(a: Analysis) -> str:
    text = f"{group_title(a.group)}: ranked over {a.result['blocks_used']} of {a.blocks_total} blocks"
    if a.excluded_blocks:
        left = [f"{b} (no result for {', '.join(ms)})" for b, ms in a.excluded_blocks.items()]
        text += "; left out: " + "; ".join(left)
    if a.excluded_methods:
        text += f"; not ranked (no result at all): {', '.join(a.excluded_methods)}"
    return text


# --- statistics --------------------------------------------------------------------------------------

def blocks_sentence(blocks: str) -> str:
    if blocks == "dataset":
        return "One block per dataset (metric averaged over seeds); each label fraction is analysed separately."
    if blocks == "dataset-fraction":
        return "One block per (dataset, label fraction), metric averaged over seeds; all fractions analysed together."
    return ("One block per (dataset, seed) within each fraction. Seeds are repetitions, not independent data "
            "sets: this inflates N and shrinks the critical difference; prefer blocks=dataset.")


def statements(r: dict, alpha: float, cliques: str) -> list[str]:
    """The statistics of one analysis in words, the design statement first."""
    if "friedman" not in r:
        return [f"No statistics: {r.get('note', 'not enough data')} (k = {r['k']}, N = {r['n']})."]
    k, n = r["k"], r["n"]
    out = [design_statement(k, n, cliques, alpha)]
    other = "wilcoxon" if cliques == "nemenyi" else "nemenyi"
    if not can_reach(k, n, other, alpha):
        out.append(design_statement(k, n, other, alpha))
    out.append(_omnibus_text(r, alpha))
    nem = r["nemenyi"]
    out.append(f"Nemenyi: q_α = {nem['q_alpha']:.3f}, critical difference CD = {nem['cd']:.3f}.")
    for test in ("nemenyi", "wilcoxon"):
        key = "" if test == "nemenyi" else "wilcoxon_"
        sig = [p for p in r["pairs"] if p[f"{test}_significant"]]
        if sig:
            out += [f"{p[key + 'better']} is significantly better than {p[key + 'worse']} at α = {alpha} "
                    f"({TEST_NAMES[test]})." for p in sig]
            if test == "nemenyi" and not r["omnibus"]["significant"]:
                out.append("Caution: the omnibus Friedman test does not reject equal performance, so Demšar (2006) "
                           "advises against reading the Nemenyi pairs above.")
        else:
            out.append(f"No significant differences between any pair at α = {alpha} ({TEST_NAMES[test]}).")
    groups = "; ".join("{" + ", ".join(g) + "}" for g in r["cliques"]) or "none"
    out.append(f"Groups without a significant difference ({TEST_NAMES[cliques]}): {groups}.")
    return out


def _omnibus_text(r: dict, alpha: float) -> str:
    fr, idv, om = r["friedman"], r["iman_davenport"], r["omnibus"]
    text = f"Friedman χ²_F = {fr['chi2']:.3f} (df {fr['df']}, χ² approximation p = {p_text(fr['p'])}); "
    if fr["at_maximum"]:
        text += (f"χ²_F is at its maximum N(k−1) = {r['n'] * (r['k'] - 1)} (every block ranks the methods the same "
                 "way), where Iman–Davenport's F_F is infinite and undefined; ")
    elif math.isnan(idv["p"]):
        text += "Iman–Davenport is undefined with a single block; "
    else:
        text += f"Iman–Davenport F_F = {num_text(idv['F'])} (df {idv['df1']}, {idv['df2']}, p = {p_text(idv['p'])}); "
    if fr["exact_p"] is not None:
        text += f"exact Friedman p = {p_text(fr['exact_p'])} (permutation distribution of untied rankings); "
    if math.isnan(om["p"]):
        return text + "nothing can be concluded."
    verdict = "differ" if om["significant"] else "do not differ"
    return text + f"by the {om['test']} p, the methods {verdict} significantly at α = {alpha}."


def pairs_table(pairs: list[dict]) -> Table:
    header = ["pair", "Δ avg rank", "Nemenyi p", "Wilcoxon p", "Holm p", "mean diff [95% t-CI]", "d_z",
              "wins/ties/losses"]
    rows = []
    for p in pairs:
        ci = DASH if p["ci_low"] is None or math.isnan(p["ci_low"]) else f"[{p['ci_low']:+.4g}, {p['ci_high']:+.4g}]"
        dz = p.get("effect_dz")
        rows.append([Cell(f"{p['a']} vs {p['b']}"), Cell(f"{p['rank_diff']:+.3f}"),
                     Cell(p_text(p["nemenyi_p"]), bold=p["nemenyi_significant"]), Cell(p_text(p["wilcoxon_p"])),
                     Cell(p_text(p["holm_p"]), bold=p["wilcoxon_significant"]),
                     Cell(f"{p['mean_diff']:+.4g} {ci}"), Cell(DASH if dz is None or math.isnan(dz) else f"{dz:+.2f}"),
                     Cell(f"{p['a_wins']}/{p['ties']}/{p['b_wins']}")])
    return Table(header, rows, "Pairwise comparisons (bold: significant). Δ avg rank and the mean difference are "
                 "first minus second method, with a Student-t 95% interval over blocks; d_z = mean / SD of the "
                 "paired differences; wins count blocks where the first method ranks better.")


def mde_section(doc: Document, mde: pd.DataFrame, metric: str, alpha: float, power: float) -> None:
    doc.heading("What this design can detect", 3)
    usable = mde[mde["seeds"] >= 2]
    if usable.empty:
        doc.para("No dataset has two or more seeds shared by two methods, so the seed-to-seed spread, and with it the "
                 "smallest detectable difference, is unknown. Run more seeds to know it.")
        return
    doc.para(MDE_METHOD.format(metric=metric, alpha=alpha, power=power))
    shown = mde.rename(columns={"sd_paired_diff": "SD_d", "mde": f"MDE ({metric})", "pairs": "method pairs"})
    doc.table(frame_table(shown, f"Minimum detectable effect at {power:.0%} power per dataset and label fraction."))


# --- costs -------------------------------------------------------------------------------------------

COST_COLUMNS = {"pretrain_s": "pretrain (s)", "finetune_s": "finetune (s)",
                "pretrain_images_per_s": "pretrain images/s", "finetune_images_per_s": "finetune images/s"}


def cost_section(doc: Document, frame: pd.DataFrame, speed: Path | None) -> None:
    cols = [c for c in COST_COLUMNS if c in frame.columns]
    if not cols and not (speed and speed.is_file()):
        return
    doc.heading("Compute cost")
    if cols:
        ok = frame[frame["status"] == "ok"]
        costs = ok.groupby("method", sort=False)[cols].agg(lambda s: pd.to_numeric(s, errors="coerce").mean())
        costs = costs.reindex(list(dict.fromkeys(frame["method"]))).reset_index()
        if len(protocols(frame)) > 1:  # a frozen backbone trains faster: one row per (protocol, method)
            keys = [ok[PROTOCOL_COLUMN].astype(str).map(protocol_key), "method"]
            costs = ok.groupby(keys, sort=False)[cols].agg(lambda s: pd.to_numeric(s, errors="coerce").mean())
            costs = costs.rename_axis(["protocol", "method"]).reset_index()
        doc.table(frame_table(costs.rename(columns=COST_COLUMNS),
                              "Mean per finetune cell over successful cells (pretraining time is that of "
                              "the checkpoint the cell used; a shared checkpoint is counted in each cell)."))
    if speed and speed.is_file():
        doc.heading("Throughput (speed.json)", 3)
        try:
            data = json.loads(speed.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            doc.para(f"{speed} is not valid JSON.")
            return
        if isinstance(data, list) and data and all(isinstance(r, dict) for r in data):
            doc.table(frame_table(pd.json_normalize(data)))
        else:
            doc.code(json.dumps(data, indent=2, default=str))

