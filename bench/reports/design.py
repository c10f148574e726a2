"""Can this design show a difference at all? Attainable significance and minimum detectable effects.

- Nemenyi: two methods differ when their average ranks differ by at least CD = q_α·√(k(k+1)/(6N))
  (Demšar 2006 §3.2.2). The largest possible difference is k − 1 (one method first on every block, the
  other last), so no pair can be significant while CD > k − 1; the smallest N that allows it is the
  smallest N with CD(k, N) ≤ k − 1.
- Wilcoxon signed-rank with Holm: with N blocks the smallest exact two-sided p is 2·2^(−N) (all
  differences of one sign, no ties), and Holm multiplies the smallest of the m = k(k−1)/2 p-values by m,
  so no pair can be significant while m·2^(1−N) ≥ α.
- Minimum detectable effect (MDE) of one dataset and fraction, from the seed-to-seed spread: the
  smallest true mean difference δ between two methods that a two-sided paired t-test over their n shared
  seeds detects with probability ``power`` at level α: the δ with
  P(|T| > t_{1−α/2, n−1}) = power, T noncentral t with n − 1 d.o.f. and noncentrality δ√n / SD_d, where
  SD_d is the SD of the paired seed differences pooled over all pairs of compared methods
  (SD_d² = Σ (n_i − 1)·s_i² / Σ (n_i − 1)).

``design_statement(k, n_blocks, test, alpha)`` says it in one sentence for the report and the run summary.
"""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pandas as pd
from scipy import optimize, stats

from bench.errors import BenchError
from bench.reports.ranks import at_fraction, fraction_label, fractions, ordered
from bench.reports.stats import CLIQUE_TESTS, critical_difference

MAX_BLOCKS = 10_000
POWER = 0.8


def wilcoxon_min_p(n: int) -> float:
    """The smallest exact two-sided Wilcoxon signed-rank p with ``n`` paired blocks: 2^(1−n) (1 if n < 2)."""
    return 1.0 if n < 2 else 2.0 ** (1 - n)


def can_reach(k: int, n: int, test: str = "nemenyi", alpha: float = 0.05) -> bool:
    """Whether any pair of ``k`` methods over ``n`` blocks can be significant under ``test`` at ``alpha``."""
    _check(test, alpha)
    if k < 2 or n < 1:
        return False
    if test == "nemenyi":
        return critical_difference(k, n, alpha) <= (k - 1) + 1e-12
    return k * (k - 1) // 2 * wilcoxon_min_p(n) < alpha


def smallest_blocks(k: int, test: str = "nemenyi", alpha: float = 0.05) -> int | None:
    """The smallest number of blocks with which some pair of ``k`` methods can be significant."""
    _check(test, alpha)
    if k < 2:
        return None
    return next((n for n in range(1, MAX_BLOCKS) if can_reach(k, n, test, alpha)), None)


def design_statement(k: int, n_blocks: int, test: str = "nemenyi", alpha: float = 0.05) -> str:
    """One sentence: can any pair of ``k`` methods over ``n_blocks`` blocks be significant, and from which N."""
    _check(test, alpha)
    if k < 2:
        return f"With k = {k} method(s) there is no pair to compare."
    need = smallest_blocks(k, test, alpha)
    if test == "nemenyi":
        cd = critical_difference(k, max(n_blocks, 1), alpha)
        head = f"Nemenyi at α = {alpha:g}, k = {k} methods over N = {n_blocks} blocks: "
        if n_blocks >= 1 and can_reach(k, n_blocks, test, alpha):
            return head + (f"a pair can be significant (CD = {cd:.3f} ≤ k − 1 = {k - 1}, the largest possible "
                           f"difference of average ranks; N = {need} is the smallest design that allows it).")
        return head + (f"no pair can be significant: the critical difference CD = {cd:.3f} exceeds k − 1 = {k - 1}, "
                       f"the largest possible difference of average ranks. It takes at least N = {need} blocks.")
    m = k * (k - 1) // 2
    pmin = wilcoxon_min_p(n_blocks)
    head = f"Wilcoxon signed-rank with Holm over {m} pairs at α = {alpha:g}, N = {n_blocks} blocks: "
    if can_reach(k, n_blocks, test, alpha):
        return head + (f"a pair can be significant (smallest exact p 2^(1−N) = {pmin:.2g}, times {m} for Holm = "
                       f"{m * pmin:.2g} < α; N = {need} is the smallest design that allows it).")
    return head + (f"no pair can be significant: the smallest exact two-sided p with N = {n_blocks} is "
                   f"{pmin:.2g}, and Holm multiplies the smallest p by {m} ({min(1.0, m * pmin):.2g} ≥ α). "
                   f"It takes at least N = {need} blocks.")


def _check(test: str, alpha: float) -> None:
    if test not in CLIQUE_TESTS:
        raise BenchError(f"unknown test '{test}': choose one of {', '.join(CLIQUE_TESTS)}")
    if not 0.0 < alpha < 1.0:
        raise BenchError(f"alpha must lie between 0 and 1, got {alpha}")


# --- minimum detectable effect ---------------------------------------------------------------------

def minimum_detectable_effect(sd_diff: float, n: int, alpha: float = 0.05, power: float = POWER) -> float:
    """The true paired mean difference a two-sided paired t-test over ``n`` pairs detects with ``power``.

    Solves P(|T| > t_{1−α/2, n−1}) = power for the noncentrality λ of T ~ t'(n − 1, λ); MDE = λ·SD_d/√n.
    NaN with fewer than two pairs; 0 when the differences do not vary.
    """
    if n < 2 or not math.isfinite(sd_diff):
        return math.nan
    if sd_diff == 0:
        return 0.0
    df = n - 1
    crit = stats.t.ppf(1 - alpha / 2, df)

    def short(lam: float) -> float:
        lower = float(stats.nct.cdf(-crit, df, lam))  # the far tail: negligible, and NaN in scipy when tiny
        return float(stats.nct.sf(crit, df, lam)) + (lower if math.isfinite(lower) else 0.0) - power

    hi = crit + 1.0
    while short(hi) < 0:  # power grows with λ; double until the root is bracketed
        hi *= 2
    lam = optimize.brentq(short, 0.0, hi, xtol=1e-10)
    return float(lam * sd_diff / math.sqrt(n))


def paired_spread(values: pd.DataFrame) -> tuple[float, int, int]:
    """Pooled SD of paired seed differences over all method pairs of a seeds × methods table.

    Returns (SD_d, n, pairs): n is the number of shared seeds most pairs have; pairs the number of
    method pairs with at least two shared seeds. NaN SD when no pair has two.
    """
    num, den, counts = 0.0, 0, []
    for a, b in combinations(values.columns, 2):
        d = (values[a] - values[b]).dropna().to_numpy()
        if len(d) >= 2:
            num += (len(d) - 1) * float(np.var(d, ddof=1))
            den += len(d) - 1
            counts.append(len(d))
    if not den:
        return math.nan, 0, 0
    return math.sqrt(num / den), int(pd.Series(counts).mode().max()), len(counts)


def mde_table(frame: pd.DataFrame, metric: str, methods: list[str], alpha: float = 0.05,
              power: float = POWER) -> pd.DataFrame:
    """Per dataset and fraction: shared seeds n, pooled SD of paired seed differences and the MDE."""
    ok = frame[(frame["status"] == "ok") & frame["method"].isin(methods)]
    rows = []
    for f in fractions(frame):
        sub = at_fraction(ok, f)
        for d in ordered(sub["dataset"]):
            table = sub[sub["dataset"] == d].pivot_table(index="seed", columns="method", values=metric)
            sd, n, pairs = paired_spread(table.reindex(columns=[m for m in methods if m in table.columns]))
            rows.append({"dataset": d, "fraction": fraction_label(f), "seeds": n, "pairs": pairs,
                         "sd_paired_diff": sd, "mde": minimum_detectable_effect(sd, n, alpha, power)})
    return pd.DataFrame(rows, columns=["dataset", "fraction", "seeds", "pairs", "sd_paired_diff", "mde"])


MDE_METHOD = ("Minimum detectable effect: the smallest true difference in {metric} between two methods on one "
              "dataset and fraction that a two-sided paired t-test over their n shared seeds detects with "
              "{power:.0%} power at α = {alpha:g}. SD_d is the standard deviation of the paired seed-to-seed "
              "differences, pooled over all pairs of compared methods (SD_d² = Σ(n_i − 1)s_i² / Σ(n_i − 1)); "
              "the MDE is λ·SD_d/√n, where λ is the noncentrality at which the noncentral t with n − 1 degrees "
              "of freedom exceeds the critical value t_(1−α/2, n−1) in absolute value with probability {power:.0%}.")
