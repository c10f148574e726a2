"""End to end: ``build_report`` on Demšar's Table 6 (a plain CSV) and on a synthetic run folder with
failed and missing cells, diagnostics, throughput and costs (built here in tmp_path)."""

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
METHODS = ["scratch", "byol", "byol+disp[weight=0.2]", "dicoh"]
DATASETS = ["Kvasir-SEG", "CVC-ColonDB", "ETIS", "GlaS", "ISIC 2016", "CVC-ClinicDB"]
FRACTIONS = [0.05, 0.1]
SEEDS = [0, 1, 2]


def synthetic_run(root, fail: bool = True, datasets: list[str] = DATASETS) -> None:
    """A run folder: dicoh best everywhere, scratch worst; byol+disp fails on ETIS at 5% (all seeds)
    and byol on GlaS at 10% seed 2; one ISIC cell is missing from results.csv (listed in run.json)."""
    rng = np.random.default_rng(0)
    rows = []
    quality = dict(zip(METHODS, [0.0, 0.05, 0.07, 0.12], strict=True))
    for f in FRACTIONS:
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
    return root, build_report(root)


@pytest.fixture(scope="module")
def demsar_report(tmp_path_factory):
    csv = SHARED_DATA / "demsar2006_table6.csv"
    if not csv.is_file():
        pytest.skip(f"real-data excerpts not found at {SHARED_DATA}")
    src = tmp_path_factory.mktemp("demsar") / "demsar2006_table6.csv"
    shutil.copy(csv, src)
    return src, build_report(src, metric="auc", cliques="wilcoxon")


def test_demsar_report(demsar_report):
    src, summary = demsar_report
    out = src.with_name("demsar2006_table6_report")  # default: <csv stem>_report beside the CSV
    assert summary.out_dir == out
    names = {p.name for p in summary.files}
    assert {"ranks.csv", "ranks.md", "ranks.tex", "stats.json", "cd_all.pdf", "cd_all.png", "rank_chart.png",
            "report.md", "report.html", "bars_breast_cancer_wisconsin.png"} <= names
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
    assert html.count("data:image/png;base64,") == sum(p.suffix == ".png" for p in summary.files)
    assert not re.search(r"<img[^>]+src=\"(?!data:)", html)  # self-contained
    assert any("best C4.5+m+cf" in line for line in summary.lines)


def test_run_report_files_and_statistics(run_report):
    root, summary = run_report
    out = root / "report"
    assert summary.out_dir == out
    names = {p.name for p in summary.files}
    expected = {"cd_0.05.pdf", "cd_0.05.png", "cd_0.1.pdf", "cd_0.1.png", "rank_chart.png",
                "label_efficiency.png", "bars_Kvasir-SEG.png", "bars_ISIC_2016.png", "report.md", "report.html"}
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
    summary = build_report(root, tmp_path / "rep", metric="hd95")
    stats = json.loads((tmp_path / "rep" / "stats.json").read_text())
    assert stats["higher_is_better"] is False
    assert any("best dicoh" in line for line in summary.lines)


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
        build_report(root, tmp_path / "file" / "sub")
