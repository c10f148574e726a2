"""End to end: ``build_report`` on Demšar's Table 6 (a plain CSV) and on a synthetic run folder with
failed and missing cells, diagnostics, throughput, costs, protocol columns, references and kept predictions
(built here in tmp_path). Figures are written as PNG only here (PDF and SVG: tests/test_reports_figures.py)."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from bench.errors import BenchError
from bench.reports import build_report, load_results
from bench.reports.stats import run_analyses

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PNG = ("png",)
METHODS = ["scratch", "byol", "byol+disp[weight=0.2]", "dicoh"]
DATASETS = ["Kvasir-SEG", "CVC-ColonDB", "ETIS", "GlaS", "ISIC 2016", "CVC-ClinicDB"]
FRACTIONS = [0.05, 0.1]
SEEDS = [0, 1, 2]


def synthetic_run(root, fail: bool = True, datasets: list[str] = DATASETS, fractions: list[float] = FRACTIONS) -> None:
    """A run folder: dicoh best everywhere, scratch worst; byol+disp fails on ETIS at 5% (all seeds)
    and byol on GlaS at 10% seed 2; one ISIC cell is missing from results.csv (listed in run.json)."""
    rng = np.random.default_rng(0)
    rows = []
    quality = dict(zip(METHODS, [0.0, 0.05, 0.07, 0.12], strict=True))
    for f in fractions:
        for d_i, d in enumerate(datasets):
            for s in SEEDS:
                for m in METHODS:
                    if (m, d, f, s) == ("dicoh", "ISIC 2016", 0.1, 1):
                        continue  # missing
                    miou = 0.4 + 0.03 * d_i + quality[m] + 0.5 * f + rng.normal(0, 0.005)
                    failed = fail and ((m == "byol+disp[weight=0.2]" and d == "ETIS" and f == 0.05)
                                       or (m == "byol" and d == "GlaS" and f == 0.1 and s == 2))
                    rows.append({
                        "cell_id": f"{m}-{d}-{f}-{s}", "method": m, "dataset": d, "fraction": f, "seed": s,
                        "status": "failed" if failed else "ok",
                        "error": "CUDA out of memory at batch 12" if failed else "",
                        "miou": np.nan if failed else miou, "dice": np.nan if failed else miou + 0.08,
                        "precision": 0.8, "recall": 0.7, "hd95": np.nan if failed else 40 - 60 * quality[m] + d_i,
                        "pretrain_s": 0.0 if m == "scratch" else 120.0, "finetune_s": 30.0 + 5 * s,
                        "pretrain_images_per_s": np.nan if m == "scratch" else 250.0,
                        "finetune_images_per_s": 400.0, "precision_mode": "bf16", "device": "cuda:0",
                    })
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(root / "results.csv", index=False)
    run = {"spec": {"name": "quick", "backbone": "resnet18", "fractions": FRACTIONS, "seeds": SEEDS},
           "versions": {"torch": "2.4.0", "timm": "1.0.9", "lightly": "1.6.0"},
           "hardware": {"gpu": "NVIDIA H100", "cpu_count": 16},
           "missing": [{"method": "dicoh", "dataset": "ISIC 2016", "fraction": 0.1, "seed": 1,
                        "reason": "worker killed"}],
           "notes": ["imagenet left out: weights not available offline"]}
    (root / "run.json").write_text(json.dumps(run))
    diag = root / "diagnostics"
    diag.mkdir()
    pd.DataFrame({"method": METHODS, "rankme": [12.5, 30.1, 33.0, 41.7]}).to_csv(diag / "diagnostics.csv", index=False)
    fig = Figure(figsize=(1, 1))
    fig.savefig(diag / "tsne_dicoh.png")
    (root / "speed.json").write_text(json.dumps([{"method": "byol", "images_per_s": 251.0}]))


@pytest.fixture(scope="module")
def run_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("run") / "out"
    synthetic_run(root)
    return root, build_report(root, formats=PNG)


@pytest.fixture(scope="module")
def demsar_report(tmp_path_factory):
    csv = SHARED_DATA / "demsar2006_table6.csv"
    if not csv.is_file():
        pytest.skip(f"real-data excerpts not found at {SHARED_DATA}")
    src = tmp_path_factory.mktemp("demsar") / "demsar2006_table6.csv"
    shutil.copy(csv, src)
    return src, build_report(src, metric="auc", cliques="wilcoxon", formats=PNG)


def test_demsar_report(demsar_report):
    src, summary = demsar_report
    out = src.with_name("demsar2006_table6_report")  # default: <csv stem>_report beside the CSV
    assert summary.out_dir == out
    names = {p.name for p in summary.files}
    assert {"ranks.csv", "ranks.md", "ranks.tex", "stats.json", "mde.csv", "cd_all.png", "cd_all_1col.png",
            "rank_chart.png", "figures.tex", "report.md", "report.html", "strip_breast_cancer_wisconsin.png"} <= names
    assert "label_efficiency.png" not in names  # a single (absent) fraction: nothing to plot
    assert all(p.is_file() and p.stat().st_size > 0 for p in summary.files)
    stats = json.loads((out / "stats.json").read_text())
    (a,) = stats["analyses"]
    assert a["friedman"]["chi2"] == pytest.approx(9.857, abs=5e-4)
    assert a["iman_davenport"]["F"] == pytest.approx(3.987, abs=5e-4)
    assert a["nemenyi"]["cd"] == pytest.approx(1.254, abs=5e-4)
    assert (a["blocks_used"], a["blocks_total"]) == (14, 14)
    assert stats["wilcoxon_zero_method"] == "zsplit" and stats["clique_test"] == "wilcoxon"
    ranks = pd.read_csv(out / "ranks.csv").set_index("method")
    assert ranks.loc["C4.5", "avg_rank"] == pytest.approx(3.143, abs=5e-4)
    assert ranks.loc["C4.5+m+cf", "auc"] == pytest.approx(0.827214, abs=1e-5)
    assert ranks.loc["C4.5", "breast cancer"] == 1.0
    md = (out / "report.md").read_text()
    assert "No significant differences between any pair at α = 0.05 (Nemenyi)" in md
    assert "9.857" in md and "3.987" in md and "1.254" in md
    assert "(cd_all.png)" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == md.count("![") == 2 + 14  # CD, rank chart, 14 strips
    assert not re.search(r"<img[^>]+src=\"(?!data:)", html)  # self-contained
    assert any("best C4.5+m+cf" in line for line in summary.lines)
    assert not any("report written to" in line for line in summary.lines)  # the CLI prints it, once
    assert summary.lines[0].startswith("metric auc: higher is better (not a known distance")
    # Demšar's design: k = 4 over N = 14 can show a pair under Wilcoxon–Holm (6 · 2^(1−14) < 0.05)
    assert "a pair can be significant" in md and "Protocol version" not in md  # a plain CSV: no header facts


def test_run_report_files_and_statistics(run_report):
    root, summary = run_report
    out = root / "report"
    assert summary.out_dir == out
    names = {p.name for p in summary.files}
    expected = {"cd_0.05.png", "cd_0.05_1col.png", "cd_0.1.png", "rank_chart.png", "label_efficiency.png",
                "label_efficiency_1col.png", "strip_Kvasir-SEG.png", "strip_ISIC_2016.png", "report.md", "report.html"}
    assert expected <= names
    stats = json.loads((out / "stats.json").read_text())
    assert [a["group"] for a in stats["analyses"]] == ["0.05", "0.1"]
    a05 = stats["analyses"][0]
    # ETIS at 5% has no byol+disp result: ranked over the 5 other datasets, and it says so
    assert (a05["blocks_used"], a05["blocks_total"]) == (5, 6)
    assert a05["excluded_blocks"] == {"ETIS": ["byol+disp[weight=0.2]"]}
    assert a05["avg_ranks"]["dicoh"] == 1.0 and a05["avg_ranks"]["scratch"] == 4.0
    # k = 4, N = 5: CD = 2.569·√(20/30) = 2.098 < 3 → dicoh beats scratch under Nemenyi
    assert a05["nemenyi"]["cd"] == pytest.approx(2.569 * math.sqrt(20 / 30), abs=1e-3)
    assert ["dicoh", "scratch"] in a05["significant_pairs"]
    # 10%: byol lost one GlaS seed (averaged over 2), dicoh one ISIC seed: every block still complete
    a10 = stats["analyses"][1]
    assert (a10["blocks_used"], a10["blocks_total"]) == (6, 6)
    failed = stats["incomplete"]["failed_cells"]
    assert len(failed) == 4 and all(f["error"] == "CUDA out of memory at batch 12" for f in failed)
    assert stats["incomplete"]["absent_cells"] == ["dicoh on ISIC 2016, fraction 0.1, seed 1"]
    ranks = pd.read_csv(out / "ranks.csv")
    r05 = ranks[ranks.fraction == 0.05].set_index("method")
    assert r05["ETIS"].isna().all()  # unranked, yet every method keeps its row
    assert set(r05.index) == set(METHODS)


def test_run_report_markdown_content(run_report):
    root, summary = run_report
    md = (root / "report" / "report.md").read_text()
    for text in ("2.4.0", "NVIDIA H100", "Precision: bf16", "Device: cuda:0", "\"backbone\": \"resnet18\"",
                 "imagenet left out: weights not available offline", "CUDA out of memory at batch 12",
                 "worker killed", "ranked over 5 of 6 blocks", "ETIS (no result for byol+disp[weight=0.2])",
                 "dicoh is significantly better than scratch at α = 0.05 (Nemenyi)",
                 "Feature diagnostics", "rankme", "41.7", "Compute cost", "finetune images/s",
                 "images_per_s", "(rank_chart.png)", "(label_efficiency.png)", "../diagnostics/tsne_dicoh.png"):
        assert text in md or text.replace("_", "\\_") in md, text
    assert any("4 failed cell(s)" in line for line in summary.lines)


def test_hd95_is_ranked_lower_is_better(tmp_path):
    root = tmp_path / "out"
    synthetic_run(root, fail=False, datasets=DATASETS[:3])
    frame = load_results(root, "hd95")
    a05, _ = run_analyses(frame, "hd95", higher_is_better=False)
    assert a05.result["avg_ranks"]["dicoh"] == 1.0  # lowest HD95
    summary = build_report(root, tmp_path / "rep", metric="hd95", formats=PNG)
    stats = json.loads((tmp_path / "rep" / "stats.json").read_text())
    assert stats["higher_is_better"] is False
    assert any("best dicoh" in line for line in summary.lines)
    assert summary.lines[0].startswith("metric hd95: lower is better ('hd95' names a distance")


def test_block_choices(tmp_path):
    root = tmp_path / "out"
    synthetic_run(root, fail=False)
    frame = load_results(root, "miou")
    (overall,) = run_analyses(frame, "miou", True, blocks="dataset-fraction")
    assert overall.group == "all" and overall.result["n"] == len(DATASETS) * len(FRACTIONS)
    per_seed = run_analyses(frame, "miou", True, blocks="dataset-seed")
    assert per_seed[0].result["n"] == len(DATASETS) * len(SEEDS)
    assert per_seed[1].result["n"] == len(DATASETS) * len(SEEDS) - 1  # the missing ISIC seed's block
    assert per_seed[1].excluded_blocks == {"ISIC 2016 / seed 1": ["dicoh"]}
    with pytest.raises(BenchError, match="unknown blocks"):
        build_report(root, tmp_path / "rep", blocks="seed")
    with pytest.raises(BenchError, match="unknown clique test"):
        build_report(root, tmp_path / "rep", cliques="tukey")


def test_unwritable_output_is_a_bench_error(tmp_path):
    root = tmp_path / "out"
    synthetic_run(root, fail=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(BenchError, match="cannot create report folder"):
        build_report(root, tmp_path / "file" / "sub", formats=PNG)


# --- issue 13 §3: a design that cannot show a difference says so -------------------------------------

def _plain(tmp_path, rows: list[dict], name: str = "r.csv"):
    path = tmp_path / name
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_k4_n2_report_says_no_pair_can_be_significant(tmp_path):
    rows = [{"method": m, "dataset": d, "miou": 0.5 + 0.1 * i + 0.01 * j}
            for j, d in enumerate(("d1", "d2")) for i, m in enumerate(("A", "B", "C", "D"))]
    summary = build_report(_plain(tmp_path, rows), tmp_path / "rep", formats=PNG)
    md = (tmp_path / "rep" / "report.md").read_text().replace("\\_", "_")
    for text in (md, "\n".join(summary.lines)):
        assert "no pair can be significant" in text and "CD = 3.317 exceeds k − 1 = 3" in text
        assert "at least N = 3 blocks" in text
    # identical rankings at N = 2: F_F undefined, the exact Friedman p (1/24) decides; never p = 0
    assert "Iman–Davenport's F_F is infinite and undefined" in md and "exact Friedman p = 0.0417" in md
    assert not re.search(r"p = 0(?![.\d])", md)


# --- issue 12 §1 / 14 §4 / 13 §1: the protocol in the header ---------------------------------------

def test_report_header_states_protocol_eval_freeze_and_empty_masks(tmp_path):
    root = tmp_path / "out"
    synthetic_run(root, fail=False, datasets=DATASETS[:2], fractions=[0.1])
    frame = pd.read_csv(root / "results.csv")
    frame["protocol_version"] = 3
    frame["eval"] = "native"
    frame["freeze"] = "backbone"
    frame["n_test"] = np.where(frame["dataset"] == "Kvasir-SEG", 100, 60)
    frame["n_test_empty_gt"] = np.where(frame["dataset"] == "Kvasir-SEG", 0, 2)
    frame.to_csv(root / "results.csv", index=False)
    build_report(root, formats=PNG)
    md = (root / "report" / "report.md").read_text()
    assert "Protocol version: 3." in md
    assert "Evaluation: native: logits upsampled to each test image's original size" in md
    assert "Fine-tuning: frozen backbone (head trained, backbone frozen with BatchNorm in eval mode" in md
    assert "an empty prediction of an empty mask scores IoU = Dice = 1 and HD95 = 0" in md
    assert "Test images with an empty mask: Kvasir-SEG 0 of 100, CVC-ColonDB 2 of 60." in md
    frame.loc[frame.index[:4], "protocol_version"] = 2
    frame.to_csv(root / "results.csv", index=False)
    build_report(root, formats=PNG)
    md = (root / "report" / "report.md").read_text()
    assert "Protocol versions: 2 (4 cells), 3 (20 cells) — cells of different versions are not comparable" in md


# --- issue 13 §4: reference methods ----------------------------------------------------------------

def _with_supervised(tmp_path):
    root = tmp_path / "out"
    synthetic_run(root, fail=False, datasets=DATASETS[:2], fractions=[0.05])
    frame = pd.read_csv(root / "results.csv")
    sup = frame[frame["method"] == "dicoh"].copy()
    sup["method"], sup["cell_id"] = "supervised", "sup-" + sup["cell_id"]
    sup["miou"] += 0.2
    frame = pd.concat([frame, sup], ignore_index=True)
    frame["reference"] = np.where(frame["method"] == "supervised", "upper", "")
    frame.to_csv(root / "results.csv", index=False)
    return root


def test_upper_reference_is_marked_and_kept_out_of_the_ranks(tmp_path):
    root = _with_supervised(tmp_path)
    build_report(root, formats=PNG)
    stats = json.loads((root / "report" / "stats.json").read_text())
    a05 = stats["analyses"][0]
    assert a05["k"] == 4 and "supervised (upper reference)" not in a05["methods"]
    assert a05["avg_ranks"]["dicoh"] == 1.0  # supervised is better, but not ranked
    md = (root / "report" / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| supervised (upper reference) |"))
    assert "**" not in row  # no bold for a reference, no rank
    assert "kept out of the ranks and the statistics" in md
    ranks = pd.read_csv(root / "report" / "ranks.csv")
    assert ranks.loc[ranks["method"] == "supervised (upper reference)", "avg_rank"].isna().all()
    build_report(root, tmp_path / "ranked", rank_references=True, formats=PNG)
    a05 = json.loads((tmp_path / "ranked" / "stats.json").read_text())["analyses"][0]
    assert a05["k"] == 5 and a05["avg_ranks"]["supervised (upper reference)"] == 1.0


def test_reference_named_on_the_command_line(tmp_path):
    root = tmp_path / "out"
    synthetic_run(root, fail=False, datasets=DATASETS[:2], fractions=[0.05])
    build_report(root, tmp_path / "rep", references=["scratch"], formats=PNG)
    a05 = json.loads((tmp_path / "rep" / "stats.json").read_text())["analyses"][0]
    assert a05["k"] == 3 and "scratch" not in a05["methods"]
    assert "scratch (upper reference)" in (tmp_path / "rep" / "report.md").read_text()
    with pytest.raises(BenchError, match="--reference nope: no such method"):
        build_report(root, tmp_path / "rep", references=["nope"], formats=PNG)


# --- issue 12 §3: one block per test set ------------------------------------------------------------

def test_generalisation_report_has_a_column_per_test_set(tmp_path):
    sets = [("Kvasir", True), ("ClinicDB", True), ("ColonDB", False), ("ETIS", False), ("CVC-300", False)]
    rows = [{"method": m, "dataset": "kvasir-seg+cvc-clinicdb", "test_set": t, "seen": seen, "fraction": 1.0,
             "seed": s, "miou": 0.6 + 0.05 * i - 0.1 * (not seen) + 0.01 * s}
            for t, seen in sets for i, m in enumerate(("scratch", "byol", "dicoh")) for s in (0, 1)]
    build_report(_plain(tmp_path, rows), tmp_path / "rep", formats=PNG)
    md = (tmp_path / "rep" / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| Method |"))
    for t, seen in sets:
        assert f"{t} ({'seen' if seen else 'unseen'})" in header
    stats = json.loads((tmp_path / "rep" / "stats.json").read_text())
    assert stats["analyses"][0]["n"] == 5


# --- issue 16 item 7: completeness counts ---------------------------------------------------------------

def test_different_seed_ids_with_the_same_count_are_reported(tmp_path):
    # a plain CSV without status: A ran seeds 0–2, B seeds 3–5 on both datasets (same count, other ids)
    rows = [{"method": m, "dataset": d, "fraction": 0.1, "seed": s, "miou": 0.5 + 0.01 * s}
            for d in ("d1", "d2") for m, seeds in (("A", (0, 1, 2)), ("B", (3, 4, 5))) for s in seeds]
    summary = build_report(_plain(tmp_path, rows), tmp_path / "rep", blocks="dataset-seed", formats=PNG)
    stats = json.loads((tmp_path / "rep" / "stats.json").read_text())
    assert len(stats["incomplete"]["absent_cells"]) == 12  # 2 datasets × (3 + 3) seeds one method lacks
    assert "A on d1, fraction 0.1, seed 3" in stats["incomplete"]["absent_cells"]
    assert stats["incomplete"]["seed_mismatch"] == ["d1, fraction 0.1: A: 0, 1, 2; B: 3, 4, 5",
                                                    "d2, fraction 0.1: A: 0, 1, 2; B: 3, 4, 5"]
    (a,) = stats["analyses"]
    assert (a["blocks_used"], a["blocks_total"]) == (0, 12)  # 12 (dataset, seed) blocks exist, none complete
    assert any("12 missing cell(s)" in line and "seed ids differ" in line for line in summary.lines)
    assert "Seed ids that differ between methods" in (tmp_path / "rep" / "report.md").read_text()


# --- issue 14 §3: kept predictions ----------------------------------------------------------------------

def test_report_shows_kept_predictions_with_the_images_passed_in(tmp_path):
    from bench.reports.predictions import pack_predictions

    root = tmp_path / "out"
    synthetic_run(root, fail=False, datasets=DATASETS[:1], fractions=[0.05])
    frame = pd.read_csv(root / "results.csv")
    rng = np.random.default_rng(0)
    ids = [f"img{i}" for i in range(6)]
    truths = {i: rng.random((12, 16)) > 0.6 for i in ids}
    images = {i: rng.integers(0, 255, (12, 16, 3), dtype=np.uint8) for i in ids}
    (root / "predictions").mkdir()
    for cell in frame[frame["dataset"] == "Kvasir-SEG"].itertuples():
        masks = [truths[i] ^ (rng.random((12, 16)) > 0.8) for i in ids]
        pack_predictions(root / "predictions" / f"{cell.cell_id}.npz", masks, ids)
    asked = []

    def provider(dataset):
        asked.append(dataset)
        return images, truths

    summary = build_report(root, test_images=provider, formats=PNG)
    assert asked == ["Kvasir-SEG"]
    assert (root / "report" / "predictions_Kvasir-SEG.png").is_file()
    md = (root / "report" / "report.md").read_text()
    assert "(predictions_Kvasir-SEG.png)" in md and "spread over scratch's IoU range" in md
    assert "the image, its ground truth and each method's prediction at label fraction 0.05, seed 0" in md
    assert summary.out_dir == root / "report"
    build_report(root, tmp_path / "no-images", formats=PNG)  # without images: the predictions alone
    assert (tmp_path / "no-images" / "predictions_Kvasir-SEG.png").is_file()


# --- issue 16 items 12–13: vector output with captions in LaTeX ------------------------------------------

def test_default_report_writes_pdf_svg_png_at_both_widths_and_figures_tex(tmp_path):
    rows = [{"method": m, "dataset": d, "miou": 0.5 + 0.1 * i + 0.01 * j}
            for j, d in enumerate(("d1", "d2", "d3")) for i, m in enumerate(("A", "B", "C"))]
    summary = build_report(_plain(tmp_path, rows), tmp_path / "rep")
    names = {p.name for p in summary.files}
    for stem in ("cd_all", "rank_chart", "strip_d1"):
        assert {f"{stem}{w}.{e}" for w in ("", "_1col") for e in ("pdf", "svg", "png")} <= names
    tex = (tmp_path / "rep" / "figures.tex").read_text()
    assert tex.count(r"\begin{figure}") == 5 and r"\includegraphics[width=\columnwidth]{cd_all_1col.pdf}" in tex
    assert r"\caption{Critical-difference diagram, overall" in tex and r"\label{fig:cd_all}" not in tex
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "*Critical-difference diagram, overall" in md  # the caption under the image, not in it


# --- issue 15: reports import no training code --------------------------------------------------------

def test_reports_import_no_training_code():
    import subprocess
    import sys

    code = ("import sys, bench.reports, bench.reports.diagnostics, bench.reports.predictions, bench.reports.figures; "
            "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('bench', 'torch'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.strip().split(",")
    training = [m for m in out if m.startswith(("bench.protocol", "bench.augment", "bench.models", "bench.methods",
                                                "bench.geometry", "bench.execute", "bench.runner", "bench.diagnose",
                                                "torch"))]
    assert training == [], f"bench.reports imported training code: {training}"
    assert "bench.reports.report" in out
