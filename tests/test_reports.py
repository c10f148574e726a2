"""Rank statistics, rank tables, LaTeX, cliques and CSV validation of bench.reports (no figures here).

Reference numbers: Demšar (2006) §3.2.2, Table 6, recomputed from the printed table (docs/reports.md);
Friedman's exact distribution against the published table (Siegel & Castellan 1988, Table M); sample
sizes of the paired t-test against Cohen (1988) / G*Power; small cases computed by hand in the comments.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from bench.errors import BenchError
from bench.reports import load_results
from bench.reports.load import lower_is_better, metric_direction
from bench.reports.ranks import rank_rows, rank_tables, ranks_frame
from bench.reports.stats import (
    analyse,
    cliques,
    critical_difference,
    friedman_chi2,
    friedman_exact_p,
    holm,
    iman_davenport,
    nemenyi_q,
    run_analyses,
    standardised_effect,
    t_interval,
    tie_correction,
    wilcoxon_p,
)
from bench.reports.tables import latex_escape, podium, rank_table_model, ranks_latex, to_latex, to_markdown

DEMSAR = "demsar2006_table6.csv"


@pytest.fixture
def demsar(shared_data) -> pd.DataFrame:
    return load_results(shared_data / DEMSAR, "auc")


# --- Demšar's worked example --------------------------------------------------------------------------

def test_demsar_average_ranks_friedman_iman_davenport_cd(demsar):
    (a,) = run_analyses(demsar, "auc", higher_is_better=True)
    r = a.result
    assert (r["k"], r["n"]) == (4, 14)
    expected = {"C4.5": 3.143, "C4.5+m": 2.000, "C4.5+cf": 2.929, "C4.5+m+cf": 1.929}
    for method, rank in expected.items():
        assert r["avg_ranks"][method] == pytest.approx(rank, abs=5e-4)
    assert r["friedman"]["chi2"] == pytest.approx(9.857, abs=5e-4)
    assert r["friedman"]["df"] == 3
    assert r["iman_davenport"]["F"] == pytest.approx(3.987, abs=5e-4)
    assert (r["iman_davenport"]["df1"], r["iman_davenport"]["df2"]) == (3, 39)
    assert r["iman_davenport"]["p"] == pytest.approx(sps.f.sf(3.98667, 3, 39), rel=1e-4)
    assert r["iman_davenport"]["p"] < 0.05  # Demšar: F(3, 39) critical value 2.85 < 3.99, reject
    assert r["nemenyi"]["q_alpha"] == pytest.approx(2.569, abs=5e-4)
    assert r["nemenyi"]["cd"] == pytest.approx(1.254, abs=5e-4)
    # Demšar §3.2.4: with CD = 1.25 no pair differs (largest difference 3.143 − 1.929 = 1.214 < CD)
    assert r["significant_pairs"] == []
    assert r["cliques"] == [["C4.5+m+cf", "C4.5+m", "C4.5+cf", "C4.5"]]


def test_demsar_scipy_friedman_is_the_tie_corrected_statistic(demsar):
    (a,) = run_analyses(demsar, "auc", higher_is_better=True)
    f = a.result["friedman"]
    ranks = rank_rows(a.values.to_numpy(), True)
    scipy_chi2 = sps.friedmanchisquare(*a.values.to_numpy().T).statistic
    assert f["scipy_chi2"] == pytest.approx(scipy_chi2)
    # Table 6 has ties (e.g. mushroom: all four 1.000), so scipy divides by the tie correction
    assert f["tie_correction"] < 1.0
    assert f["tie_correction"] == pytest.approx(tie_correction(ranks))
    assert f["chi2"] / f["tie_correction"] == pytest.approx(scipy_chi2)


def test_demsar_wilcoxon_c45_vs_m(demsar):
    # Demšar §3.1.3 (Table 2, the same AUCs): R+ = 93, R− = 12 with zero ranks split, T = min = 12
    x = demsar[demsar.method == "C4.5"]["auc"].to_numpy()
    y = demsar[demsar.method == "C4.5+m"]["auc"].to_numpy()
    stat, p = wilcoxon_p(x, y)
    assert stat == pytest.approx(12.0)
    assert p < 0.05


# --- hand-computed small cases ----------------------------------------------------------------------

def test_ties_get_average_ranks():
    # d1: A = B = 0.9 > C → 1.5, 1.5, 3 ; d2: C > B > A → 3, 2, 1 for A, B, C reversed
    values = np.array([[0.9, 0.9, 0.5], [0.4, 0.6, 0.8]])
    ranks = rank_rows(values, higher_is_better=True)
    np.testing.assert_allclose(ranks, [[1.5, 1.5, 3.0], [3.0, 2.0, 1.0]])
    np.testing.assert_allclose(ranks.mean(axis=0), [2.25, 1.75, 2.0])
    np.testing.assert_allclose(rank_rows(values, higher_is_better=False), [[2.5, 2.5, 1.0], [1.0, 2.0, 3.0]])
    # tie correction: one tie of size 2 in N·(k³ − k) = 2·24 → 1 − 6/48
    assert tie_correction(ranks) == pytest.approx(1 - 6 / 48)


def test_two_methods_by_hand():
    # A beats B on 4 of 5 blocks: R_A = 1.2, R_B = 1.8
    # χ²_F = 12·5/(2·3)·(1.2² + 1.8² − 2·3²/4) = 10·0.18 = 1.8 ; F_F = 4·1.8/(5·1 − 1.8) = 2.25
    # q_0.05(k=2) = 1.95996 (= z_0.975) ; CD = 1.95996·√(2·3/30)
    values = pd.DataFrame({"A": [0.9, 0.8, 0.7, 0.6, 0.1], "B": [0.5, 0.4, 0.3, 0.2, 0.3]})
    r = analyse(values, higher_is_better=True)
    assert r["avg_ranks"] == pytest.approx({"A": 1.2, "B": 1.8})
    assert r["friedman"]["chi2"] == pytest.approx(1.8)
    assert r["friedman"]["p"] == pytest.approx(sps.chi2.sf(1.8, 1))
    assert r["iman_davenport"]["F"] == pytest.approx(2.25)
    assert (r["iman_davenport"]["df1"], r["iman_davenport"]["df2"]) == (1, 4)
    assert r["nemenyi"]["q_alpha"] == pytest.approx(1.959964, abs=1e-5)
    assert r["nemenyi"]["cd"] == pytest.approx(1.959964 * math.sqrt(0.2), abs=1e-5)
    assert "scipy_chi2" not in r["friedman"]  # scipy's Friedman needs k ≥ 3
    (pair,) = r["pairs"]
    assert (pair["a_wins"], pair["ties"], pair["b_wins"]) == (4, 0, 1)
    assert pair["mean_diff"] == pytest.approx(0.28)
    assert not pair["nemenyi_significant"]  # |Δ| = 0.6 < CD = 0.877
    assert r["cliques"] == [["A", "B"]]


def test_friedman_formula_and_iman_davenport_edges():
    assert friedman_chi2([1.0, 2.0, 3.0], n=4) == pytest.approx(8.0)  # 12·4/12·(14 − 12)
    ff, df1, df2, p = iman_davenport(8.0, n=4, k=3)  # identical rankings: N(k−1) = χ², F undefined
    assert math.isinf(ff) and math.isnan(p) and (df1, df2) == (2, 6)
    ff, *_ = iman_davenport(2.0, n=4, k=3)
    assert ff == pytest.approx(3 * 2.0 / (8 - 2.0))


def test_exact_friedman_matches_the_published_table_and_brute_force():
    # Siegel & Castellan (1988) Table M (Friedman 1937): P(χ²_r ≥ x)
    published = [(3, 3, 6.0, 0.028), (3, 4, 6.5, 0.042), (3, 4, 8.0, 0.0046), (3, 5, 5.2, 0.093),
                 (3, 5, 6.4, 0.039), (4, 3, 7.4, 0.033), (4, 3, 8.2, 0.017), (4, 3, 9.0, 0.0017)]
    for k, n, chi2, p in published:
        assert friedman_exact_p(chi2, n, k) == pytest.approx(p, abs=6e-4), (k, n, chi2)
    # every untied ranking of k = 3 over N = 3 blocks, counted
    import itertools

    perms = list(itertools.permutations((1, 2, 3)))
    chis = np.array([friedman_chi2(np.mean(combo, axis=0), 3) for combo in itertools.product(perms, repeat=3)])
    for c in np.unique(chis.round(9)):
        assert friedman_exact_p(c, 3, 3) == pytest.approx((chis >= c - 1e-9).mean(), abs=1e-12)
    assert friedman_exact_p(9.0, 40, 6) is None  # too large to enumerate


def test_degenerate_iman_davenport_reports_the_exact_friedman_p():
    # k = 4, N = 2, both blocks rank A > B > C > D: χ²_F = N(k − 1) = 6 (its maximum), F_F = ∞.
    # χ² approximation p = 0.11; exact p = P(both blocks share one of 4! rankings) = 1/24.
    values = pd.DataFrame({"A": [0.9, 0.8], "B": [0.7, 0.6], "C": [0.5, 0.4], "D": [0.3, 0.2]})
    r = analyse(values, higher_is_better=True)
    assert r["friedman"]["chi2"] == pytest.approx(6.0) and r["friedman"]["at_maximum"]
    assert r["friedman"]["p"] == pytest.approx(sps.chi2.sf(6.0, 3))
    assert math.isinf(r["iman_davenport"]["F"]) and math.isnan(r["iman_davenport"]["p"])
    assert r["omnibus"] == {"test": "Friedman exact", "p": pytest.approx(1 / 24), "significant": True}
    from bench.reports.sections import statements

    text = " ".join(statements(r, 0.05, "nemenyi"))
    assert "p = 0 " not in text and "p = 0:" not in text and "p = 0," not in text
    assert "undefined" in text and "exact Friedman p = 0.0417" in text


def test_nemenyi_q_matches_demsar_table_5a():
    # Demšar (2006) Table 5(a), α = 0.05: k = 2..10
    table = [1.960, 2.343, 2.569, 2.728, 2.850, 2.949, 3.031, 3.102, 3.164]
    for k, q in zip(range(2, 11), table, strict=True):
        assert nemenyi_q(k, 0.05) == pytest.approx(q, abs=1.5e-3)
    assert nemenyi_q(4, 0.10) == pytest.approx(2.291, abs=1.5e-3)  # Table 5(a), α = 0.10
    assert critical_difference(4, 14) == pytest.approx(1.254, abs=5e-4)


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04, 0.5 → 4·0.01, 3·0.03, max(0.09, 2·0.04), max(0.09, 0.5)
    assert holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert holm([0.2, 0.6]) == pytest.approx([0.4, 0.6])
    assert holm([0.5, 0.4]) == pytest.approx([0.8, 0.8])
    out = holm([0.01, math.nan])
    assert out[0] == pytest.approx(0.01) and math.isnan(out[1])


def test_wilcoxon_edge_cases_and_zero_split():
    assert wilcoxon_p([0.5, 0.6, 0.7], [0.5, 0.6, 0.7])[1] == 1.0
    assert math.isnan(wilcoxon_p([0.5], [0.4])[1])
    # zsplit: d = (0, 1, −2, 3, 4): zero's rank 1 split → R+ = 0.5 + 2 + 4 + 5 = 11.5, R− = 0.5 + 3 = 3.5
    stat, _ = wilcoxon_p([1.0, 2.0, 0.0, 4.0, 5.0], [1.0, 1.0, 2.0, 1.0, 1.0])
    assert stat == pytest.approx(3.5)


def test_t_interval_and_standardised_effect_by_hand():
    # d = (1, 2, 3): mean 2, s = 1, t_{0.975, 2} = 4.302653 → 2 ± 4.302653/√3; d_z = 2/1
    lo, hi = t_interval(np.array([1.0, 2.0, 3.0]))
    assert (lo, hi) == pytest.approx((2 - 4.302653 / math.sqrt(3), 2 + 4.302653 / math.sqrt(3)), abs=1e-6)
    assert standardised_effect(np.array([1.0, 2.0, 3.0])) == pytest.approx(2.0)
    assert all(math.isnan(v) for v in t_interval(np.array([0.2])))
    assert math.isnan(standardised_effect(np.array([0.2, 0.2])))


@pytest.mark.parametrize("n", [4, 5, 14])
def test_effect_interval_covers_95_percent_at_small_n(n):
    # Simulated coverage with a fixed seed; the percentile bootstrap gave 0.78 (N = 4), 0.85 (5), 0.90 (14).
    rng = np.random.default_rng(20240516 + n)
    true_mean, reps = 0.03, 4000
    samples = true_mean + 0.05 * rng.standard_normal((reps, n))
    covered = sum(lo <= true_mean <= hi for lo, hi in map(t_interval, samples))
    assert 0.935 <= covered / reps <= 0.965


def test_an_interval_does_not_exclude_zero_against_one_win_in_four():
    # the case: wins/ties/losses 1/0/3 and Wilcoxon p = 0.25 must not come with an interval
    # that excludes 0 in the losing direction
    values = pd.DataFrame({"A": [0.90, 0.50, 0.51, 0.52], "B": [0.60, 0.52, 0.53, 0.54]})
    (pair,) = analyse(values, higher_is_better=True)["pairs"]
    assert (pair["a_wins"], pair["ties"], pair["b_wins"]) == (1, 0, 3)
    assert pair["ci_low"] < 0 < pair["ci_high"]


# --- cliques -----------------------------------------------------------------------------------------

def _sig(pairs):
    return lambda a, b: (a, b) in pairs or (b, a) in pairs


def test_cliques_chain_gives_two_cliques():
    ranks = {"A": 1.0, "B": 2.0, "C": 3.0}
    assert cliques(ranks, _sig({("A", "C")})) == [["A", "B"], ["B", "C"]]


def test_cliques_all_or_nothing():
    ranks = {"C": 2.5, "A": 1.2, "B": 2.0}
    assert cliques(ranks, _sig(set())) == [["A", "B", "C"]]
    assert cliques(ranks, _sig({("A", "B"), ("A", "C"), ("B", "C")})) == []


def test_cliques_nemenyi_rule_on_a_hand_made_rank_table():
    # CD = 1.2: A–B 0.5 ns, B–C 1.1 ns, A–C 1.6 sig, C–D 1.3 sig → {A, B}, {B, C}; D alone
    ranks = {"A": 1.0, "B": 1.5, "C": 2.6, "D": 3.9}
    assert cliques(ranks, lambda a, b: abs(ranks[a] - ranks[b]) >= 1.2) == [["A", "B"], ["B", "C"]]


def test_cliques_drop_contained_runs_and_handle_non_monotone_tests():
    ranks = {"A": 1.0, "B": 2.0, "C": 3.0, "D": 4.0}
    # only A–D significant: A..C and B..D; C..D is inside B..D and dropped
    assert cliques(ranks, _sig({("A", "D")})) == [["A", "B", "C"], ["B", "C", "D"]]
    # Wilcoxon need not follow rank distance: only B–C significant → {A, B, D} and {A, C, D}
    assert cliques(ranks, _sig({("B", "C")})) == [["A", "B", "D"], ["A", "C", "D"]]


def test_cliques_keep_groups_that_skip_a_method():
    # A ~ C with B between them (A–B, B–D, A–D significant): {A, C} is a group, not lost
    ranks = {"A": 1.0, "B": 2.0, "C": 3.0, "D": 4.0}
    assert cliques(ranks, _sig({("A", "B"), ("B", "D"), ("A", "D")})) == [["A", "C"], ["B", "C"], ["C", "D"]]


def test_cliques_are_every_maximal_group_on_random_decisions():
    # brute force: every subset without a significant pair, maximal under inclusion
    import itertools

    rng = np.random.default_rng(7)
    names = list("ABCDEF")
    ranks = {m: float(i) for i, m in enumerate(names)}
    for _ in range(200):
        sig = {frozenset(p) for p in itertools.combinations(names, 2) if rng.random() < 0.4}
        fn = lambda a, b, sig=sig: frozenset((a, b)) in sig  # noqa: E731
        free = [set(c) for r in range(2, 7) for c in itertools.combinations(names, r)
                if not any(frozenset(p) in sig for p in itertools.combinations(c, 2))]
        maximal = sorted(sorted(g, key=names.index) for g in free if not any(g < o for o in free))
        assert sorted(cliques(ranks, fn)) == maximal


def test_recorded_cliques_never_hold_a_significant_pair():
    rng = np.random.default_rng(0)
    values = pd.DataFrame(rng.normal(size=(12, 6)) + np.linspace(0, 1.5, 6), columns=list("UVWXYZ"))
    for test in ("nemenyi", "wilcoxon"):
        r = analyse(values, higher_is_better=True, clique_test=test)
        sig = {frozenset(p) for p in r["significant_pairs"]}
        assert sig, "the test data should have at least one significant pair"
        for group in r["cliques"]:
            assert not any(frozenset((a, b)) in sig for a in group for b in group if a != b)
        members = {m for g in r["cliques"] for m in g}
        assert members <= set(values.columns)


# --- rank tables -----------------------------------------------------------------------------------

def _results(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["method", "dataset", "fraction", "seed", "miou"])


@pytest.fixture
def hand_table(tmp_path):
    # fraction 0.1, d1: A seeds (0.9, 0.1) → 0.5, B (0.6, 0.6) → 0.6, C (0.2, 0.2) → 0.2 ⇒ B 1, A 2, C 3
    # (ranking per seed first would give A 2, B 1.5: seeds must be averaged before ranking)
    # fraction 0.1, d2: A 0.7, B 0.7, C 0.9 (both seeds) ⇒ C 1, A 2.5, B 2.5
    # fraction 0.05: A always best, then B, then C
    rows = []
    for seed, a in ((0, 0.9), (1, 0.1)):
        rows += [("A", "d1", 0.1, seed, a), ("B", "d1", 0.1, seed, 0.6), ("C", "d1", 0.1, seed, 0.2)]
        rows += [("A", "d2", 0.1, seed, 0.7), ("B", "d2", 0.1, seed, 0.7), ("C", "d2", 0.1, seed, 0.9)]
        for d in ("d1", "d2"):
            rows += [("A", d, 0.05, seed, 0.5), ("B", d, 0.05, seed, 0.4), ("C", d, 0.05, seed, 0.3)]
    path = tmp_path / "hand.csv"
    _results(rows).to_csv(path, index=False)
    return load_results(path, "miou")


def test_rank_tables_from_a_hand_made_results_table(hand_table):
    t05, t10 = rank_tables(hand_table, "miou", higher_is_better=True)
    assert (t05.fraction, t10.fraction) == (0.05, 0.1)
    assert t10.ranks.loc[["A", "B", "C"], "d1"].tolist() == [2.0, 1.0, 3.0]
    assert t10.ranks.loc[["A", "B", "C"], "d2"].tolist() == [2.5, 2.5, 1.0]
    assert t10.avg_rank.to_dict() == pytest.approx({"A": 2.25, "B": 1.75, "C": 2.0})
    assert t10.avg_metric.to_dict() == pytest.approx({"A": 0.6, "B": 0.65, "C": 0.55})
    assert t10.std.at["A", "d1"] == pytest.approx(np.std([0.9, 0.1], ddof=1))
    assert t05.avg_rank.to_dict() == pytest.approx({"A": 1.0, "B": 2.0, "C": 3.0})
    csv = ranks_frame([t05, t10])
    assert list(csv.columns) == ["method", "fraction", "d1", "d2", "avg_rank", "miou"]
    row = csv[(csv.method == "B") & (csv.fraction == 0.1)].iloc[0]
    assert (row["d1"], row["d2"], row["avg_rank"], row["miou"]) == pytest.approx((1.0, 2.5, 1.75, 0.65))


def test_lower_is_better_direction(hand_table):
    assert lower_is_better("hd95") and lower_is_better("val_loss") and lower_is_better("error_rate")
    assert not lower_is_better("miou") and not lower_is_better("finetune_images_per_s")
    for name in ("assd_mm", "asd_px", "rmse_px", "hd95_mm", "HD95", "masd", "finetune_s", "mae"):
        lower, why = metric_direction(name)
        assert lower and why, name
    for name in ("miou", "dice", "auc", "nsd", "surface_dice", "recall", "pretrain_images_per_s"):
        assert not metric_direction(name)[0], name
    t05, _ = rank_tables(hand_table, "miou", higher_is_better=False)
    assert t05.avg_rank.to_dict() == pytest.approx({"A": 3.0, "B": 2.0, "C": 1.0})


def test_markdown_marks_best_bold_and_second_underlined(hand_table):
    _, t10 = rank_tables(hand_table, "miou", higher_is_better=True)
    md = to_markdown(rank_table_model(t10))
    row_b = next(line for line in md.splitlines() if line.startswith("| B |"))
    row_c = next(line for line in md.splitlines() if line.startswith("| C |"))
    assert "**0.600 ± 0.000 (1)**" in row_b  # best on d1
    assert "**1.75**" in row_b  # best average rank
    assert "<u>2</u>" in row_c  # second average rank
    assert "**0.900 ± 0.000 (1)**" in row_c  # best on d2
    plain = to_markdown(rank_table_model(t10, show_std=False))
    assert "±" not in plain and "**0.600 (1)**" in plain


def test_podium_shares_places_on_ties():
    best, second = podium(pd.Series({"a": 1.0, "b": 1.0, "c": 2.0, "d": 3.0}), lower_is_better=True)
    assert best == {"a", "b"} and second == {"c"}
    best, second = podium(pd.Series({"a": 0.1, "b": 0.3, "c": math.nan}), lower_is_better=False)
    assert best == {"b"} and second == {"a"}


# --- LaTeX --------------------------------------------------------------------------------------------

def _balanced(tex: str) -> bool:
    depth = 0
    for m in re.finditer(r"(?<!\\)[{}]", tex):
        depth += 1 if m.group() == "{" else -1
        if depth < 0:
            return False
    return depth == 0


def _split_cells(row: str) -> list[str]:
    return re.split(r"(?<!\\)&", row.rstrip().removesuffix(r"\\"))


def test_latex_structure(tmp_path):
    rows = []
    names = ["scratch", "byol+disp[weight=0.2]", "my_method&x%", "dicoh[percentile=50]"]
    for i, m in enumerate(names):
        for d in ("Kvasir-SEG", "CVC_ColonDB"):
            rows += [(m, d, 0.05, s, 0.5 + 0.1 * i + 0.01 * s) for s in (0, 1)]
    path = tmp_path / "r.csv"
    _results(rows).to_csv(path, index=False)
    (t,) = rank_tables(load_results(path, "miou"), "miou", True)
    tex = ranks_latex([rank_table_model(t)])
    assert _balanced(tex)
    assert tex.count(r"\toprule") == tex.count(r"\midrule") == tex.count(r"\bottomrule") == 1
    assert r"\caption{" in tex and r"\label{tab:ranks-miou-0.05}" in tex
    body = [line.strip() for line in tex.split(r"\midrule")[1].split(r"\bottomrule")[0].strip().splitlines()]
    assert len(body) == len(names)
    header = tex.split(r"\toprule")[1].split(r"\midrule")[0].strip()
    assert len(_split_cells(header)) == len(_split_cells(body[0])) == 2 + 2 + 1
    assert r"CVC\_ColonDB" in header
    assert body[1].startswith(r"byol+disp{[}weight=0.2{]}")
    assert body[2].startswith(r"my\_method\&x\%")
    best = body[3]  # dicoh[...] has the highest mIoU everywhere
    assert all(c.strip().startswith(r"\textbf{") for c in _split_cells(best)[1:])
    assert all(r"\underline{" in c for c in _split_cells(body[2])[1:])
    assert "$\\pm$" in tex and "±" not in tex


def test_latex_escape():
    assert latex_escape("a_b&c%d$e#f{g}h~i^j\\k") == (
        r"a\_b\&c\%d\$e\#f\{g\}h\textasciitilde{}i\textasciicircum{}j\textbackslash{}k")


TEX = next((e for e in ("pdflatex", "lualatex", "xelatex") if shutil.which(e)), None)


@pytest.mark.skipif(TEX is None, reason="no TeX engine (pdflatex/lualatex/xelatex) installed")
def test_latex_compiles(tmp_path, hand_table):
    tables = [rank_table_model(t) for t in rank_tables(hand_table, "miou", True)]
    doc = ("\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n"
           + "\n".join(to_latex(t) for t in tables) + "\\end{document}\n")
    (tmp_path / "t.tex").write_text(doc)
    res = subprocess.run([TEX, "-interaction=nonstopmode", "-halt-on-error", "t.tex"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-2000:]


# --- validation --------------------------------------------------------------------------------------

def _csv(tmp_path, text: str):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, metric, pattern", [
    ("method,auc\nA,0.5\n", "auc", r"lacks column\(s\) dataset"),
    ("method,dataset,auc,acc\nA,d,0.5,0.7\nB,d,0.6,0.8\n", "miou", r"unknown metric 'miou'.*auc, acc"),
    ("method,dataset,auc\nA,d,0.5\nB,d,high\n", "auc", r"line 3: auc of B on d is 'high'"),
    ("method,dataset,auc\nA,d1,0.5\nA,d2,0.5\nB,d1,0.6\n", "auc", r"method B has no row for dataset d2"),
    ("method,dataset,auc\nA,d1,0.5\nA,d1,0.6\n", "auc", r"more than one result"),
    ("method,dataset,seed,auc\nA,d1,x,0.5\n", "auc", r"seed 'x' is not a number"),
    ("method,dataset,status,auc\nA,d1,done,0.5\n", "auc", r"status must be 'ok' or 'failed'"),
    ("method,dataset,auc\nA,d1,\n", "auc", r"auc of A on d1 is empty"),
    ("", "auc", r"cannot read"),
])
def test_bad_csvs_raise_bench_error(tmp_path, text, metric, pattern):
    with pytest.raises(BenchError, match=pattern) as info:
        load_results(_csv(tmp_path, text), metric)
    assert "\n" not in str(info.value)


def test_missing_source_and_run_folder_without_results(tmp_path):
    with pytest.raises(BenchError, match="does not exist"):
        load_results(tmp_path / "nope.csv", "miou")
    with pytest.raises(BenchError, match="no results.csv"):
        load_results(tmp_path, "miou")


def test_failed_cells_are_allowed_with_a_status_column(tmp_path):
    text = "method,dataset,status,error,auc\nA,d1,ok,,0.5\nA,d2,failed,OOM,\nB,d1,ok,,0.6\nB,d2,ok,,0.7\n"
    frame = load_results(_csv(tmp_path, text), "auc")
    assert frame["status"].tolist() == ["ok", "failed", "ok", "ok"]
    assert frame.loc[1, "error"] == "OOM" and math.isnan(frame.loc[1, "auc"])
    assert frame["seed"].tolist() == [0, 0, 0, 0] and frame["fraction"].isna().all()


# --- incomplete grids --------------------------------------------------------------------------------

def test_incomplete_grid_keeps_every_method_and_says_what_is_left_out(tmp_path):
    text = ("method,dataset,fraction,seed,status,error,miou\n"
            "A,d1,0.05,0,failed,boom,\nB,d1,0.05,0,failed,boom,\nA,d2,0.05,0,failed,boom,\n"
            "B,d2,0.05,0,failed,boom,\n"
            "A,d1,0.1,0,ok,,0.5\nB,d1,0.1,0,ok,,0.6\nA,d2,0.1,0,ok,,0.5\nB,d2,0.1,0,failed,nan loss,\n"
            "A,d3,0.1,0,ok,,0.7\nB,d3,0.1,0,ok,,0.8\n")
    frame = load_results(_csv(tmp_path, text), "miou")
    t05, t10 = rank_tables(frame, "miou", True)
    assert t05.excluded_methods == ["A", "B"] and t05.ranked_datasets == []
    assert t05.avg_rank.isna().all() and list(t05.avg_rank.index) == ["A", "B"]
    assert t10.excluded_datasets == {"d2": ["B"]} and t10.ranked_datasets == ["d1", "d3"]
    assert t10.avg_rank.to_dict() == {"A": 2.0, "B": 1.0}
    assert math.isnan(t10.ranks.at["A", "d2"]) and t10.mean.at["A", "d2"] == 0.5  # shown, not ranked
    a05, a10 = run_analyses(frame, "miou", True)
    assert (a05.result["blocks_used"], a05.result["excluded_methods"]) == (0, ["A", "B"])
    assert "friedman" not in a05.result and "note" in a05.result
    assert (a10.result["blocks_used"], a10.blocks_total) == (2, 3)
    assert a10.result["excluded_blocks"] == {"d2": ["B"]}
    md = to_markdown(rank_table_model(t10))
    assert "d2 not ranked: no result for B" in md


def test_iman_davenport_is_undefined_with_one_block():
    r = analyse(pd.DataFrame({"A": [0.5], "B": [0.6]}), higher_is_better=True)
    assert math.isnan(r["iman_davenport"]["F"]) and not r["iman_davenport"]["significant"]
    assert r["avg_ranks"] == {"A": 2.0, "B": 1.0}


# --- the CD diagram's layout ------------------------------------------------------------------------

def test_clique_bars_are_stacked_without_overlap():
    from bench.reports.cd import stack

    # (0, 2) and (1, 3) overlap → rows 0 and 1; (2.5, 4) clears (0, 2) by more than the gap → row 0
    assert stack([(0, 2), (1, 3), (2.5, 4)], gap=0.1) == [0, 1, 0]
    assert stack([(0, 1), (0.5, 1.5), (1.05, 2)], gap=0.1) == [0, 1, 2]  # 1.05 is within the gap of 1


def test_cd_diagram_labels_of_twelve_methods_do_not_overlap():
    from bench.reports.cd import cd_figure

    names = ["scratch", "imagenet", "byol", "byol+disp[weight=0.2]", "dicoh", "dicoh[percentile=50]", "cp2",
             "mocov2", "densecl", "simclr", "vicregl", "spectraflow[mask_ratio=0.75]"]
    ranks = dict(zip(names, [1.0, 1.05, 2.5, 3.0, 3.1, 5.5, 6.0, 8.2, 9.0, 11.4, 11.45, 12.0], strict=True))
    groups = cliques(ranks, lambda a, b: abs(ranks[a] - ranks[b]) >= 3.0)
    for width in (6.9, 3.3):
        fig = cd_figure(ranks, 3.0, groups, width)
        renderer = fig.canvas.get_renderer()
        boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in fig.axes[0].texts]
        labels = [(s, b) for s, b in boxes if any(n in s.replace("\n", "") for n in names)]
        assert len(labels) == len(names)
        for i, (s1, b1) in enumerate(boxes):
            assert b1.x0 >= 0 and b1.x1 <= fig.bbox.width, f"{s1!r} is cut off at {width} in"
            for s2, b2 in boxes[i + 1:]:
                assert not b1.overlaps(b2), f"{s1!r} overlaps {s2!r}"


# --- what a design can detect ----------------------------------------------------------------------

def test_design_statement_nemenyi_k4_n2_cannot_be_significant():
    from bench.reports import design_statement
    from bench.reports.design import can_reach, smallest_blocks

    # CD(4, 2) = 2.569·√(20/12) = 3.317 > k − 1 = 3: no pair, whatever the data; N = 3 gives CD = 2.708
    text = design_statement(4, 2, "nemenyi", 0.05)
    assert "no pair can be significant" in text and "3.317" in text and "at least N = 3 blocks" in text
    assert not can_reach(4, 2) and can_reach(4, 3) and smallest_blocks(4) == 3
    assert smallest_blocks(2) == 4  # CD(2, N) = 1.96/√N ≤ 1 from N = 4
    assert "a pair can be significant" in design_statement(4, 14)


def test_wilcoxon_design_counts_holm():
    from bench.reports.design import can_reach, design_statement, smallest_blocks, wilcoxon_min_p

    # k = 5 → m = 10 pairs; N = 8: 10·2^(1−8) = 0.078 ≥ 0.05 (without Holm 0.0078 would pass)
    assert wilcoxon_min_p(8) == pytest.approx(2 ** -7)
    assert sps.wilcoxon(np.arange(1.0, 9.0), np.zeros(8)).pvalue == pytest.approx(wilcoxon_min_p(8))
    assert not can_reach(5, 8, "wilcoxon") and can_reach(5, 9, "wilcoxon")
    assert smallest_blocks(5, "wilcoxon") == 9 and smallest_blocks(2, "wilcoxon") == 6
    text = design_statement(5, 8, "wilcoxon")
    assert "no pair can be significant" in text and "by 10" in text and "at least N = 9" in text


def test_statements_warn_about_wilcoxon_holm_even_when_nemenyi_draws_the_bars():
    from bench.reports.sections import statements

    rng = np.random.default_rng(1)
    values = pd.DataFrame(rng.normal(size=(8, 5)) + np.arange(5) * 2.0, columns=list("ABCDE"))
    r = analyse(values, higher_is_better=True, clique_test="nemenyi")
    assert not any(p["wilcoxon_significant"] for p in r["pairs"])  # impossible at N = 8, k = 5
    text = " ".join(statements(r, 0.05, "nemenyi"))
    assert "Wilcoxon signed-rank with Holm over 10 pairs" in text and "no pair can be significant" in text


def test_minimum_detectable_effect_matches_cohen_sample_sizes_and_simulation():
    from bench.reports.design import minimum_detectable_effect as mde

    # paired t, two-sided α = 0.05, power 0.8: d_z = 1 needs n = 10, d_z = 0.5 needs n = 34 (G*Power)
    assert mde(1.0, 10) <= 1.0 < mde(1.0, 9)
    assert mde(1.0, 34) <= 0.5 < mde(1.0, 33)
    assert mde(1.0, 4000) * math.sqrt(4000) == pytest.approx(1.959964 + 0.841621, abs=2e-3)
    assert mde(0.02, 5) == pytest.approx(50 * mde(0.0004, 5))  # linear in the SD
    assert math.isnan(mde(1.0, 1)) and mde(0.0, 3) == 0.0
    # at the MDE a paired t-test rejects in 80% of simulated designs (fixed seed)
    rng = np.random.default_rng(3)
    n, sd = 5, 0.02
    delta = mde(sd, n)
    d = delta + sd * rng.standard_normal((4000, n))
    t = d.mean(axis=1) / (d.std(axis=1, ddof=1) / math.sqrt(n))
    power = np.mean(np.abs(t) > sps.t.ppf(0.975, n - 1))
    assert power == pytest.approx(0.8, abs=0.02)


def test_mde_table_pools_paired_seed_differences(tmp_path):
    from bench.reports.design import mde_table, minimum_detectable_effect

    # d1: A − B over seeds = (0.01, 0.03, 0.02) → s² = 1e-4; A − C = (0, 0, 0); B − C = (−0.01, −0.03, −0.02)
    rows = []
    for s, (a, b, c) in enumerate([(0.51, 0.50, 0.51), (0.63, 0.60, 0.63), (0.72, 0.70, 0.72)]):
        rows += [("A", "d1", 0.1, s, a), ("B", "d1", 0.1, s, b), ("C", "d1", 0.1, s, c)]
    path = tmp_path / "mde.csv"
    _results(rows).to_csv(path, index=False)
    table = mde_table(load_results(path, "miou"), "miou", ["A", "B", "C"])
    (row,) = table.to_dict(orient="records")
    pooled = math.sqrt((2 * 1e-4 + 0 + 2 * 1e-4) / 6)
    assert (row["seeds"], row["pairs"]) == (3, 3)
    assert row["sd_paired_diff"] == pytest.approx(pooled)
    assert row["mde"] == pytest.approx(minimum_detectable_effect(pooled, 3))


# --- blocks: test sets, references, counts ----------------------------------------------------------

def test_each_test_set_is_a_block_marked_seen_or_unseen(tmp_path):
    sets = [("Kvasir", True), ("ClinicDB", True), ("ColonDB", False), ("ETIS", False), ("CVC-300", False)]
    rows = [f"{m},kvasir+clinicdb,{t},{str(seen).lower()},0.1,0,{0.5 + 0.1 * i + 0.01 * j}"
            for j, (t, seen) in enumerate(sets) for i, m in enumerate(("A", "B", "C"))]
    path = tmp_path / "gen.csv"
    path.write_text("method,dataset,test_set,seen,fraction,seed,miou\n" + "\n".join(rows) + "\n")
    frame = load_results(path, "miou")
    (t,) = rank_tables(frame, "miou", True)
    assert t.datasets == ["Kvasir (seen)", "ClinicDB (seen)", "ColonDB (unseen)", "ETIS (unseen)",
                          "CVC-300 (unseen)"]
    assert set(frame["train_set"]) == {"kvasir+clinicdb"}
    (a,) = run_analyses(frame, "miou", True)
    assert (a.result["n"], a.result["k"]) == (5, 3)
    assert "ETIS (unseen)" in to_markdown(rank_table_model(t))
    path.write_text(path.read_text().replace(",true,", ",maybe,", 1))
    with pytest.raises(BenchError, match="seen 'maybe' is not true/false"):
        load_results(path, "miou")


def test_reference_methods_are_listed_without_a_rank(hand_table):
    t05, t10 = rank_tables(hand_table, "miou", True, unranked=["A"])
    assert t10.methods == ["B", "C", "A"] and t10.unranked == ["A"]
    assert t10.ranks.loc["A"].isna().all() and math.isnan(t10.avg_rank["A"])
    # without A: d1 B 0.6 > C 0.2, d2 C 0.9 > B 0.7 → both 1.5
    assert t10.avg_rank[["B", "C"]].tolist() == [1.5, 1.5]
    assert t10.avg_metric["A"] == pytest.approx(0.6)  # shown, not ranked
    md = to_markdown(rank_table_model(t10))
    row_a = next(line for line in md.splitlines() if line.startswith("| A |"))
    assert "**" not in row_a and "<u>" not in row_a and "Reference methods are listed last" in md
    (a05, _) = run_analyses(hand_table, "miou", True, methods=["B", "C"])[:2]
    assert a05.result["methods"] == ["B", "C"]


def test_dataset_seed_blocks_count_only_blocks_some_method_has(tmp_path):
    # d1 ran seeds 0–2, d2 seeds 3–5: 6 (dataset, seed) blocks exist, not 2 × 6 = 12
    rows = [(m, d, 0.1, s, 0.5 + 0.1 * (m == "A") + 0.01 * s)
            for d, seeds in (("d1", (0, 1, 2)), ("d2", (3, 4, 5))) for s in seeds for m in ("A", "B")]
    path = tmp_path / "seeds.csv"
    _results(rows).to_csv(path, index=False)
    (a,) = run_analyses(load_results(path, "miou"), "miou", True, blocks="dataset-seed")
    assert (a.blocks_total, a.result["blocks_used"]) == (6, 6)
    (overall,) = run_analyses(load_results(path, "miou"), "miou", True, blocks="dataset-fraction")
    assert overall.blocks_total == 2
