"""The positive control: is an upper reference (``supervised``) ahead of ``scratch``?

A harness that cannot tell in-domain supervised pretraining from a random initialisation cannot rank
pretraining methods either, so the report checks it before anything else is read. The comparison is
paired over blocks — each (dataset, label fraction[, protocol]) where both methods have results, the
metric averaged over seeds first, as the ranks are — with the mean difference, its Student-t 95%
interval and a one-sided Wilcoxon signed-rank test (exact distribution). With N blocks no p below
0.5**N is possible; the statement says so when that floor lies above α.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as sps

from bench.reports.stats import t_interval

BASELINE = "scratch"
GROUPING = ("dataset", "fraction", "protocol", "freeze")  # whichever of these the results have


@dataclass
class Control:
    reference: str  # the display name, e.g. "supervised (upper reference)"
    baseline: str
    metric: str
    higher: bool
    n: int  # paired blocks
    ahead: int  # blocks where the reference is better
    mean: float  # mean difference, reference minus baseline, in the metric's own sign
    interval: tuple[float, float]
    p: float  # one-sided Wilcoxon signed-rank, exact (H1: the reference is better)
    alpha: float

    @property
    def passed(self) -> bool:
        return self.n > 0 and self.mean_better > 0 and self.p < self.alpha

    @property
    def mean_better(self) -> float:
        """The mean difference oriented so that positive means the reference is better."""
        return self.mean if self.higher else -self.mean

    def statement(self) -> str:
        if self.n == 0:
            return (f"Positive control: no block has both {self.reference} and {self.baseline}; "
                    "nothing shows that this design can tell a good initialisation from a bad one.")
        lo, hi = self.interval
        facts = (f"{self.reference} is ahead of {self.baseline} in {self.ahead} of {self.n} blocks, by "
                 f"{self.mean:+.3f} {self.metric} on average (95% t-interval [{lo:+.3f}, {hi:+.3f}]); one-sided "
                 f"Wilcoxon signed-rank exact p = {self.p:.4f}")
        floor = 0.5 ** self.n
        if self.passed:
            return (f"Positive control passed: {facts} < α = {self.alpha}. The design tells in-domain supervised "
                    "pretraining from a random initialisation.")
        if self.mean_better > 0 and floor >= self.alpha:
            return (f"Positive control not conclusive: {facts}; with N = {self.n} blocks no p below {floor:.3g} is "
                    f"possible, so at least {_blocks_needed(self.alpha)} blocks are needed to show it at α = "
                    f"{self.alpha}.")
        return (f"Positive control FAILED: {facts}. This design does not show a good initialisation ahead of a bad "
                "one, so its ranking of pretraining methods cannot be trusted: lengthen fine-tuning, add seeds or "
                "blocks.")


def _blocks_needed(alpha: float) -> int:
    """The fewest blocks for which a one-sided exact signed-rank p below ``alpha`` exists (0.5**N)."""
    return int(np.floor(np.log(alpha) / np.log(0.5))) + 1


def positive_controls(frame: pd.DataFrame, metric: str, higher: bool, references: dict[str, str],
                      alpha: float = 0.05) -> list[Control]:
    """One ``Control`` per upper reference (display name → kind ``upper``), when ``scratch`` is in the results."""
    ok = frame[(frame["status"] == "ok") & frame[metric].notna()] if "status" in frame else frame[frame[metric].notna()]
    names = ok["method_name"] if "method_name" in ok else ok["method"]
    base = ok[names == BASELINE]
    if base.empty:
        return []
    keys = [c for c in GROUPING if c in ok.columns]
    out = []
    for reference in (label for label, kind in references.items() if kind == "upper"):
        diffs = _block_differences(ok[ok["method"] == reference], base, keys, metric)
        signed = diffs if higher else -diffs
        out.append(_control(reference, metric, higher, signed, alpha))
    return out


def _block_differences(ref: pd.DataFrame, base: pd.DataFrame, keys: list[str], metric: str) -> np.ndarray:
    """Seed-averaged reference minus baseline, per block both have."""
    a = ref.groupby(keys, dropna=False)[metric].mean()
    b = base.groupby(keys, dropna=False)[metric].mean()
    both = a.index.intersection(b.index)
    return (a.loc[both] - b.loc[both]).to_numpy(dtype=float)


def _control(reference: str, metric: str, higher: bool, better: np.ndarray, alpha: float) -> Control:
    """``better``: per-block differences oriented so that positive means the reference is better."""
    n = len(better)
    if n == 0:
        return Control(reference, BASELINE, metric, higher, 0, 0, float("nan"), (float("nan"),) * 2, 1.0, alpha)
    mean = float(better.mean())
    interval = t_interval(better)
    if not np.any(better != 0):
        p = 1.0
    else:
        p = float(sps.wilcoxon(better, alternative="greater", method="exact").pvalue)
    sign = 1.0 if higher else -1.0  # report the difference in the metric's own sign
    lo, hi = (sign * interval[0], sign * interval[1]) if higher else (sign * interval[1], sign * interval[0])
    return Control(reference, BASELINE, metric, higher, n, int((better > 0).sum()), sign * mean, (lo, hi), p, alpha)
