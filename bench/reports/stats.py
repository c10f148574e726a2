"""Comparing k methods over N blocks — Demšar (2006), JMLR 7; Benavoli, Corani & Mangili (2016), JMLR 17.

- Friedman (Demšar Eq. 1): χ²_F = 12N/(k(k+1)) · [Σ_j R_j² − k(k+1)²/4], from the average ranks R_j,
  χ² with k−1 degrees of freedom. ``scipy.stats.friedmanchisquare`` divides this by the tie correction
  1 − Σ(t³−t)/(N(k³−k)); both are recorded (they agree when no block has ties).
- Iman–Davenport (Demšar Eq. 2): F_F = (N−1)χ²_F / (N(k−1) − χ²_F), F with (k−1), (k−1)(N−1) d.o.f.
- Nemenyi: q_α = studentized range quantile(1−α; k, ∞)/√2, CD = q_α·√(k(k+1)/(6N)) (Demšar §3.2.2);
  two methods differ when their average ranks differ by at least CD.
- Wilcoxon signed-rank per pair on the block values (Demšar §3.1.3), ``zero_method="zsplit"``: ranks of
  zero differences are split evenly between the positive and negative sums, as Demšar prescribes
  (``"wilcox"`` would drop ties and overstate significance; ``"pratt"`` keeps their ranks but drops them
  from the sums); Holm's step-down correction over all k(k−1)/2 pairs (Benavoli et al. 2016 recommend
  this over the mean-ranks post-hoc test, whose outcome depends on the other methods in the comparison).
- Exact Friedman test: the permutation distribution of χ²_F when each block ranks the methods at random
  (k! equally likely untied rankings per block), enumerated where that is small. Its p-value decides the
  omnibus test whenever it is available; Iman–Davenport's F approximation decides otherwise. When χ²_F
  reaches its maximum N(k−1) (every block ranks the methods identically) F_F is infinite and undefined;
  the exact p is then (k!)^(1−N).
- Effect size per pair: mean difference over blocks with a 95% t-interval (mean ± t_{0.975, N−1}·s/√N;
  a percentile bootstrap covers far less than 95% with a handful of blocks) and the standardised mean
  difference d_z = mean/s of the paired differences (Cohen 1988).
- Groups (the bars of a CD diagram): maximal sets of methods with no significant pair under the chosen test.

Blocks: ``dataset`` (default; metric averaged over seeds, each fraction analysed separately),
``dataset-fraction`` (all fractions together, one block per (dataset, fraction)) or ``dataset-seed``
(one block per (dataset, seed) within each fraction — seeds are repetitions, so this inflates N and
shrinks the CD; offered for comparison only).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from bench.errors import BenchError
from bench.reports.ranks import ALL, at_fraction, complete_blocks, fraction_label, fractions, ordered, rank_rows

BLOCKS = ("dataset", "dataset-fraction", "dataset-seed")
CLIQUE_TESTS = ("nemenyi", "wilcoxon")
ZERO_METHOD = "zsplit"
CI_LEVEL = 0.95
EXACT_FRIEDMAN_STATES = 300_000  # enumerate the exact distribution up to this many rank-sum states


# --- omnibus tests ---------------------------------------------------------------------------------

def friedman_chi2(avg_ranks: np.ndarray, n: int) -> float:
    """Demšar Eq. 1: χ²_F from the average ranks R_j of k methods over n blocks (no tie correction)."""
    r = np.asarray(avg_ranks, dtype=float)
    k = len(r)
    return float(12.0 * n / (k * (k + 1)) * (np.sum(r**2) - k * (k + 1) ** 2 / 4.0))


def tie_correction(ranks: np.ndarray) -> float:
    """1 − Σ_blocks Σ_ties (t³ − t) / (N(k³ − k)): the divisor scipy applies to χ²_F."""
    ranks = np.asarray(ranks, dtype=float)
    n, k = ranks.shape
    ties = sum(float(np.sum(c**3 - c)) for c in (np.unique(row, return_counts=True)[1] for row in ranks))
    return 1.0 - ties / (n * (k**3 - k))


def degenerate(chi2: float, n: int, k: int) -> bool:
    """χ²_F at its maximum N(k−1): every block ranks the methods the same way, without ties."""
    return chi2 >= n * (k - 1) - 1e-9


def iman_davenport(chi2: float, n: int, k: int) -> tuple[float, int, int, float]:
    """Demšar Eq. 2: F_F = (N−1)χ²_F / (N(k−1) − χ²_F) and its p-value from F((k−1), (k−1)(N−1)).

    Undefined (p = NaN) with a single block, and when χ²_F reaches its maximum N(k−1): F_F = ∞ there,
    and the F approximation says nothing (use ``friedman_exact_p``).
    """
    df1, df2 = k - 1, (k - 1) * (n - 1)
    if df2 == 0:  # a single block: no within-block variation to compare against
        return math.nan, df1, df2, math.nan
    if degenerate(chi2, n, k):
        return math.inf, df1, df2, math.nan
    ff = (n - 1) * chi2 / (n * (k - 1) - chi2)
    return float(ff), df1, df2, float(stats.f.sf(ff, df1, df2))


def friedman_exact_p(chi2: float, n: int, k: int, max_states: int = EXACT_FRIEDMAN_STATES) -> float | None:
    """P(χ²_F ≥ ``chi2``) when each of ``n`` blocks ranks ``k`` methods uniformly at random (no ties).

    The distribution of the rank sums (S_1 … S_{k−1}; S_k follows) is convolved block by block over the
    k! rankings; χ²_F = 12/(Nk(k+1))·Σ S_j² − 3N(k+1). None when the enumeration exceeds ``max_states``
    (except at the maximum N(k−1), whose probability is (k!)^(1−N): all blocks share one ranking). With
    ties in the data the observed χ²_F is smaller than any untied value it stands for, so p is conservative.
    """
    if k < 2 or n < 1:
        return None
    if degenerate(chi2, n, k):
        return float(math.exp((1 - n) * math.lgamma(k + 1)))
    size = n * (k - 1) + 1
    if k > 6 or size ** (k - 1) > max_states:
        return None
    perms = np.array(list(itertools.permutations(range(k))))[:, : k - 1]
    dist = np.zeros((size,) * (k - 1))
    dist[(0,) * (k - 1)] = 1.0
    for block in range(n):
        used = block * (k - 1) + 1
        src = dist[(slice(0, used),) * (k - 1)].copy()
        dist[:] = 0.0
        for p in perms:
            dist[tuple(slice(o, o + used) for o in p)] += src
        dist /= len(perms)
    sums = [g + n for g in np.indices(dist.shape)]  # ranks 1..k: S_j = n + Σ (rank − 1)
    last = n * k * (k + 1) / 2 - sum(sums)
    stat = 12.0 / (n * k * (k + 1)) * (sum(s**2 for s in sums) + last**2) - 3.0 * n * (k + 1)
    return float(min(1.0, dist[stat >= chi2 - 1e-9].sum()))


# --- Nemenyi -----------------------------------------------------------------------------------------

def nemenyi_q(k: int, alpha: float = 0.05) -> float:
    """q_α: the studentized range quantile (k groups, ∞ d.o.f.) divided by √2 (Demšar Table 5a)."""
    return float(stats.studentized_range.ppf(1.0 - alpha, k, np.inf) / math.sqrt(2.0))


def critical_difference(k: int, n: int, alpha: float = 0.05) -> float:
    """CD = q_α·√(k(k+1)/(6N)) (Demšar §3.2.2)."""
    return nemenyi_q(k, alpha) * math.sqrt(k * (k + 1) / (6.0 * n))


def nemenyi_p(rank_diff: float, k: int, n: int) -> float:
    """Two-sided p-value of a difference of average ranks under Nemenyi's test."""
    z = abs(rank_diff) / math.sqrt(k * (k + 1) / (6.0 * n))
    return float(stats.studentized_range.sf(z * math.sqrt(2.0), k, np.inf))


# --- pairwise Wilcoxon with Holm ------------------------------------------------------------------

def wilcoxon_p(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Wilcoxon signed-rank statistic and two-sided p of paired samples (``zero_method="zsplit"``).

    All differences zero → p = 1 (no evidence of a difference). Fewer than 2 blocks → NaN.
    """
    d = np.asarray(x, dtype=float) - np.asarray(y, dtype=float)
    if len(d) < 2:
        return math.nan, math.nan
    if np.allclose(d, 0.0):
        return math.nan, 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns that exact p is unavailable with zeros/ties
        res = stats.wilcoxon(x, y, zero_method=ZERO_METHOD, method="auto")
    return float(res.statistic), float(res.pvalue)


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values: p̃_(i) = max_{j≤i} min(1, (m − j + 1)·p_(j)); NaN stays NaN."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full_like(p, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    order = valid[np.argsort(p[valid], kind="stable")]
    m = len(order)
    running = 0.0
    for i, idx in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[idx]))
        out[idx] = running
    return out.tolist()


# --- effect size -----------------------------------------------------------------------------------

def t_interval(diffs: np.ndarray, level: float = CI_LEVEL) -> tuple[float, float]:
    """Student-t interval of the mean of ``diffs``: mean ± t_{(1+level)/2, N−1}·s/√N (NaN below 2 values)."""
    d = np.asarray(diffs, dtype=float)
    if len(d) < 2:
        return math.nan, math.nan
    half = float(stats.t.ppf((1 + level) / 2, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))
    return float(d.mean() - half), float(d.mean() + half)


def standardised_effect(diffs: np.ndarray) -> float:
    """Cohen's d_z = mean / s of paired differences (NaN below 2 values or when s = 0)."""
    d = np.asarray(diffs, dtype=float)
    if len(d) < 2 or d.std(ddof=1) == 0:
        return math.nan
    return float(d.mean() / d.std(ddof=1))


# --- cliques ---------------------------------------------------------------------------------------

def cliques(avg_ranks: Mapping[str, float], significant_pair_fn: Callable[[str, str], bool]) -> list[list[str]]:
    """Groups of methods joined in a critical-difference diagram: every maximal set of ≥ 2 methods with no
    significant pair (the maximal cliques of the "not significantly different" graph, Bron–Kerbosch).

    Members are listed in average-rank order (ties: input order), groups by their members' positions. Under
    Nemenyi the groups are runs contiguous in rank order; under Wilcoxon–Holm a group may skip a method
    between its members (A ~ C while B, ranked between them, differs from both). A chain A~B, B~C, A≁C
    gives {A, B} and {B, C}, never {A, B, C}.
    """
    names = sorted(avg_ranks, key=lambda m: avg_ranks[m])  # stable: ties keep the input order
    pos = {m: i for i, m in enumerate(names)}
    near = {a: {b for b in names if b != a and not significant_pair_fn(a, b)} for a in names}
    found: list[list[str]] = []

    def expand(group: set, candidates: set, excluded: set) -> None:
        if not candidates and not excluded:
            if len(group) >= 2:
                found.append(sorted(group, key=pos.get))
            return
        pivot = max(candidates | excluded, key=lambda u: (len(near[u] & candidates), -pos[u]))
        for v in sorted(candidates - near[pivot], key=pos.get):
            expand(group | {v}, candidates & near[v], excluded & near[v])
            candidates = candidates - {v}
            excluded = excluded | {v}

    expand(set(), set(names), set())
    return sorted(found, key=lambda g: [pos[m] for m in g])


# --- one analysis ----------------------------------------------------------------------------------

@dataclass
class Analysis:
    """The statistics of one comparison: k methods over the N complete blocks of one group."""

    group: str  # fraction label, or "all" for blocks=dataset-fraction
    fraction: float | None
    values: pd.DataFrame  # N complete blocks × k methods
    blocks_total: int
    excluded_blocks: dict[str, list[str]]
    excluded_methods: list[str]
    result: dict  # every number, JSON-ready

    @property
    def avg_ranks(self) -> dict[str, float]:
        return self.result.get("avg_ranks", {})


def _existing(sub: pd.DataFrame, keys: list[str]) -> list[tuple]:
    """The (dataset, fraction|seed) combinations some row has (any status): datasets in order of first
    appearance, then ascending fraction or seed; a missing fraction stays NaN."""
    datasets = ordered(sub["dataset"])
    seen = dict.fromkeys((d, -1.0 if isinstance(v, float) and math.isnan(v) else v)
                         for d, v in sub[keys].itertuples(index=False, name=None))
    pairs = sorted(seen, key=lambda p: (datasets.index(p[0]), p[1]))
    return [(d, math.nan if keys[1] == "fraction" and v == -1.0 else v) for d, v in pairs]


def block_matrices(frame: pd.DataFrame, metric: str, blocks: str,
                   methods: list[str] | None = None) -> list[tuple[str, float | None, pd.DataFrame]]:
    """(group label, fraction, blocks × methods matrix with NaN where a method has no result).

    A block exists when some compared method has a row for it (failed or not); combinations that no
    method has are no blocks at all and are not counted.
    """
    if blocks not in BLOCKS:
        raise BenchError(f"unknown blocks '{blocks}': choose one of {', '.join(BLOCKS)}")
    methods = methods if methods is not None else ordered(frame["method"])
    frame = frame[frame["method"].isin(methods)]
    ok = frame[frame["status"] == "ok"]
    if blocks == "dataset-fraction":
        keys = _existing(frame, ["dataset", "fraction"])
        rows = [at_fraction(ok[ok["dataset"] == d], f).groupby("method")[metric].mean() for d, f in keys]
        labels = [f"{d} @ {fraction_label(f)}" for d, f in keys]
        return [(ALL, None, pd.DataFrame(rows, index=labels).reindex(columns=methods))]
    out = []
    for f in fractions(frame):
        present = at_fraction(frame, f)
        sub = at_fraction(ok, f)
        if blocks == "dataset":
            index = ordered(present["dataset"])
            matrix = sub.groupby(["dataset", "method"])[metric].mean().unstack().reindex(index, columns=methods)
        else:
            pairs = _existing(present, ["dataset", "seed"])
            grid = sub.groupby(["dataset", "seed", "method"])[metric].mean().unstack()
            matrix = grid.reindex(pd.MultiIndex.from_tuples(pairs, names=["dataset", "seed"]), columns=methods)
            matrix.index = [f"{d} / seed {s}" for d, s in matrix.index]
        matrix.index = matrix.index.astype(str)
        out.append((fraction_label(f), None if math.isnan(f) else f, matrix))
    return out


def analyse(values: pd.DataFrame, higher_is_better: bool, alpha: float = 0.05,
            clique_test: str = "nemenyi") -> dict:
    """All statistics of a complete N×k matrix (rows blocks, columns methods), JSON-ready."""
    if clique_test not in CLIQUE_TESTS:
        raise BenchError(f"unknown clique test '{clique_test}': choose one of {', '.join(CLIQUE_TESTS)}")
    methods = list(values.columns)
    n, k = values.shape
    ranks = rank_rows(values.to_numpy(), higher_is_better) if n and k else np.full((n, k), np.nan)
    avg = ranks.mean(axis=0) if n else np.full(k, np.nan)
    out: dict = {"k": k, "n": n, "methods": methods,
                 "avg_ranks": dict(zip(methods, avg.tolist(), strict=True)),
                 "mean_metric": dict(zip(methods, values.mean(axis=0).tolist(), strict=True))}
    if k < 2 or n < 1:
        out["note"] = "needs at least two methods and one complete block"
        out.update(pairs=[], cliques=[], significant_pairs=[])
        return out
    out["friedman"] = _friedman(ranks, avg, values)
    ff, df1, df2, p_ff = iman_davenport(out["friedman"]["chi2"], n, k)
    out["iman_davenport"] = {"F": ff, "df1": df1, "df2": df2, "p": p_ff,
                             "significant": bool(not math.isnan(p_ff) and p_ff < alpha)}
    out["omnibus"] = _omnibus(out["friedman"], out["iman_davenport"], alpha)
    q, cd = nemenyi_q(k, alpha), critical_difference(k, n, alpha)
    out["nemenyi"] = {"alpha": alpha, "q_alpha": q, "cd": cd}
    out["pairs"] = _pairs(values, ranks, cd, alpha, higher_is_better)
    significant = {(p["a"], p["b"]) for p in out["pairs"] if p[f"{clique_test}_significant"]}
    out["cliques"] = cliques(out["avg_ranks"], lambda a, b: (a, b) in significant or (b, a) in significant)
    out["clique_test"] = clique_test
    key = "" if clique_test == "nemenyi" else "wilcoxon_"
    out["significant_pairs"] = [[p[f"{key}better"], p[f"{key}worse"]] for p in out["pairs"]
                                if p[f"{clique_test}_significant"]]
    return out


def _friedman(ranks: np.ndarray, avg: np.ndarray, values: pd.DataFrame) -> dict:
    n, k = ranks.shape
    chi2 = friedman_chi2(avg, n)
    out = {"chi2": chi2, "df": k - 1, "p": float(stats.chi2.sf(chi2, k - 1)),
           "tie_correction": tie_correction(ranks), "exact_p": friedman_exact_p(chi2, n, k),
           "at_maximum": degenerate(chi2, n, k)}
    if k >= 3 and n >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = stats.friedmanchisquare(*values.to_numpy().T)
        out.update(scipy_chi2=float(res.statistic), scipy_p=float(res.pvalue))
    return out


def _omnibus(friedman: dict, idv: dict, alpha: float) -> dict:
    """The omnibus decision: the exact Friedman p where it was enumerated, Iman–Davenport's elsewhere."""
    if friedman["exact_p"] is not None:
        test, p = "Friedman exact", friedman["exact_p"]
    else:
        test, p = "Iman–Davenport", idv["p"]
    return {"test": test, "p": p, "significant": bool(not math.isnan(p) and p < alpha)}


def _pairs(values: pd.DataFrame, ranks: np.ndarray, cd: float, alpha: float, higher_is_better: bool) -> list[dict]:
    methods = list(values.columns)
    n, k = values.shape
    avg = ranks.mean(axis=0)
    pairs = []
    for i in range(k):
        for j in range(i + 1, k):
            a, b = methods[i], methods[j]
            x, y = values[a].to_numpy(), values[b].to_numpy()
            diff = float(avg[i] - avg[j])
            stat, p = wilcoxon_p(x, y)
            lo, hi = t_interval(x - y)
            signed = signed_rank_sum(x - y if higher_is_better else y - x)
            pairs.append({
                "a": a, "b": b, "rank_diff": diff, "better": a if diff <= 0 else b, "worse": b if diff <= 0 else a,
                "nemenyi_p": nemenyi_p(diff, k, n), "nemenyi_significant": bool(abs(diff) >= cd - 1e-12),
                "wilcoxon_statistic": stat, "wilcoxon_p": p,
                "wilcoxon_better": a if signed >= 0 else b, "wilcoxon_worse": b if signed >= 0 else a,
                "mean_diff": float(np.mean(x - y)), "ci_low": lo, "ci_high": hi,
                "effect_dz": standardised_effect(x - y),
                "a_wins": int(np.sum(ranks[:, i] < ranks[:, j])), "ties": int(np.sum(ranks[:, i] == ranks[:, j])),
                "b_wins": int(np.sum(ranks[:, i] > ranks[:, j])),
            })
    for pair, ph in zip(pairs, holm([p["wilcoxon_p"] for p in pairs]), strict=True):
        pair["holm_p"] = ph
        pair["wilcoxon_significant"] = bool(not math.isnan(ph) and ph < alpha)
    return pairs


def signed_rank_sum(d: np.ndarray) -> float:
    """R⁺ − R⁻ of the differences ``d`` (zero differences contribute nothing): its sign says who wins."""
    d = np.asarray(d, dtype=float)
    nz = d[d != 0]
    return float(np.sum(np.sign(nz) * stats.rankdata(np.abs(nz)))) if len(nz) else 0.0


def run_analyses(frame: pd.DataFrame, metric: str, higher_is_better: bool, blocks: str = "dataset",
                 alpha: float = 0.05, clique_test: str = "nemenyi",
                 methods: list[str] | None = None) -> list[Analysis]:
    """One analysis per fraction (blocks ``dataset``/``dataset-seed``) or one overall (``dataset-fraction``).

    ``methods`` restricts the comparison (e.g. without the reference methods); default: every method.
    """
    if not 0.0 < alpha < 1.0:
        raise BenchError(f"alpha must lie between 0 and 1, got {alpha}")
    out = []
    for group, fraction, matrix in block_matrices(frame, metric, blocks, methods):
        complete, excluded, no_result = complete_blocks(matrix)
        result = analyse(complete, higher_is_better, alpha, clique_test)
        result.update(group=group, fraction=fraction, blocks_total=len(matrix), blocks_used=len(complete),
                      blocks=list(complete.index), excluded_blocks=excluded, excluded_methods=no_result)
        out.append(Analysis(group, fraction, complete, len(matrix), excluded, no_result, result))
    return out


def stats_document(analyses: list[Analysis], metric: str, higher_is_better: bool, blocks: str,
                   alpha: float, clique_test: str) -> dict:
    """The content of ``stats.json``: the settings, then every number of every analysis."""
    return json_safe({
        "metric": metric, "higher_is_better": higher_is_better, "blocks": blocks, "alpha": alpha,
        "clique_test": clique_test, "wilcoxon_zero_method": ZERO_METHOD, "multiple_comparisons": "holm",
        "interval": {"statistic": "mean difference over blocks", "method": "student t", "confidence": CI_LEVEL},
        "effect_size": "d_z = mean / sd of the paired differences over blocks",
        "omnibus": "exact Friedman p where enumerated, Iman–Davenport otherwise",
        "analyses": [a.result for a in analyses],
    })


def json_safe(obj):
    """Plain JSON: numpy scalars → Python numbers, NaN/±∞ → null (strict JSON has neither)."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
