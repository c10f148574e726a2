"""Per-dataset ranks and average ranks — Demšar (2006) §3.2.2, the layout of DiCoH's Tables 1–2.

For each label fraction: the metric is averaged over seeds first (seeds are repetitions, not data
sets), the methods are ranked on each dataset (rank 1 = best; ties get the average of the ranks
they span, ``scipy.stats.rankdata(method="average")``), and the ranks are averaged over datasets:
R_j = (1/N) Σ_i r_i^j. Only datasets on which every method has a result are ranked; the others are
listed, never silently dropped. Reference methods (``unranked``) keep their rows and values but take
no rank and do not decide which datasets are complete.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.stats import rankdata

ALL = "all"


def fraction_label(fraction: float | None) -> str:
    """``0.05`` → "0.05"; no fraction (a plain CSV) → "all"."""
    if fraction is None or (isinstance(fraction, float) and math.isnan(fraction)):
        return ALL
    return f"{fraction:g}"


def fractions(frame: pd.DataFrame) -> list[float]:
    """The label fractions in ascending order; ``[nan]`` when the table has none."""
    values = sorted(frame["fraction"].dropna().unique().tolist())
    return [float(v) for v in values] or [math.nan]


def at_fraction(frame: pd.DataFrame, fraction: float) -> pd.DataFrame:
    if math.isnan(fraction):
        return frame[frame["fraction"].isna()]
    return frame[np.isclose(frame["fraction"].fillna(-1.0), fraction)]


def ordered(values: pd.Series) -> list[str]:
    """Distinct values in order of first appearance (the order of the spec / the published table)."""
    return list(dict.fromkeys(values.tolist()))


def rank_rows(values: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """Rank each row (block) of an N×k matrix: 1 = best, ties → average ranks."""
    values = np.asarray(values, dtype=float)
    return rankdata(-values if higher_is_better else values, axis=1, method="average")


def complete_blocks(values: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, list[str]], list[str]]:
    """Split a blocks × methods matrix (NaN = no result) into the blocks every method has.

    Methods with no result in any block are excluded first (and returned), so that one method that
    failed everywhere does not void the whole comparison; then blocks lacking any remaining method
    are excluded and returned with the methods they lack.
    """
    no_result = [m for m in values.columns if values[m].isna().all()]
    kept = values.drop(columns=no_result)
    if kept.shape[1] == 0:  # nothing to compare: no block counts as complete
        return kept.iloc[0:0], {}, no_result
    lacking = kept.isna()
    excluded = {str(b): [m for m in kept.columns if lacking.at[b, m]] for b in kept.index if lacking.loc[b].any()}
    return kept[~lacking.any(axis=1)], excluded, no_result


@dataclass
class RankTable:
    """Ranks at one label fraction: rows methods, columns datasets (DiCoH Tables 1–2)."""

    fraction: float
    metric: str
    higher_is_better: bool
    mean: pd.DataFrame  # method × dataset: metric averaged over seeds (NaN: no successful seed)
    std: pd.DataFrame  # method × dataset: sample std over seeds (NaN with a single seed)
    n_seeds: pd.DataFrame  # method × dataset: number of successful seeds
    ranks: pd.DataFrame  # method × dataset: rank on each ranked dataset, NaN elsewhere
    avg_rank: pd.Series  # per method, over the ranked datasets
    avg_metric: pd.Series  # per method, seed-averaged metric averaged over the ranked datasets
    excluded_datasets: dict[str, list[str]]  # dataset → methods without a result there
    excluded_methods: list[str]  # methods without any result at this fraction
    ranked_datasets: list[str]  # the datasets on which every (remaining) method has a result
    unranked: list[str] = field(default_factory=list)  # reference methods shown without a rank

    @property
    def methods(self) -> list[str]:
        return list(self.mean.index)

    @property
    def datasets(self) -> list[str]:
        return list(self.mean.columns)


def seed_stats(frame: pd.DataFrame, metric: str, methods: list[str], datasets: list[str]):
    """Mean, sample std and count over seeds of the successful cells, as method × dataset tables."""
    ok = frame[frame["status"] == "ok"]
    grouped = ok.groupby(["method", "dataset"])[metric]
    shape = {"index": methods, "columns": datasets}
    mean = grouped.mean().unstack().reindex(**shape)
    std = grouped.std(ddof=1).unstack().reindex(**shape)
    count = grouped.count().unstack().reindex(**shape).fillna(0).astype(int)
    return mean, std, count


def rank_table(frame: pd.DataFrame, metric: str, fraction: float, higher_is_better: bool,
               methods: list[str] | None = None, datasets: list[str] | None = None,
               unranked: list[str] | tuple[str, ...] = ()) -> RankTable:
    """Ranks of the seed-averaged ``metric`` at one ``fraction`` (rows ``methods``, columns ``datasets``);
    the ``unranked`` methods (references) are listed after the others, with values but without ranks."""
    methods = methods or ordered(frame["method"])
    methods = [m for m in methods if m not in unranked] + [m for m in methods if m in unranked]
    datasets = datasets or ordered(frame["dataset"])
    mean, std, count = seed_stats(at_fraction(frame, fraction), metric, methods, datasets)
    complete, excluded, no_result = complete_blocks(mean.T.drop(columns=list(unranked)))
    ranks = pd.DataFrame(np.nan, index=methods, columns=datasets)
    if len(complete):
        ranked = rank_rows(complete.to_numpy(), higher_is_better)
        ranks.loc[list(complete.columns), list(complete.index)] = ranked.T
    used = list(complete.index)
    avg_rank = ranks[used].mean(axis=1) if used else pd.Series(np.nan, index=methods)
    avg_metric = mean[used].mean(axis=1) if used else pd.Series(np.nan, index=methods)
    avg_metric[no_result] = np.nan
    if used:  # a reference's average counts only when it has every ranked dataset
        avg_metric[[m for m in unranked if mean.loc[m, used].isna().any()]] = np.nan
    return RankTable(fraction, metric, higher_is_better, mean, std, count, ranks, avg_rank, avg_metric,
                     excluded, no_result, used, [m for m in methods if m in unranked])


def rank_tables(frame: pd.DataFrame, metric: str, higher_is_better: bool,
                unranked: list[str] | tuple[str, ...] = ()) -> list[RankTable]:
    """One rank table per label fraction, all with the same method and dataset order."""
    methods, datasets = ordered(frame["method"]), ordered(frame["dataset"])
    return [rank_table(frame, metric, f, higher_is_better, methods, datasets, unranked) for f in fractions(frame)]


def ranks_frame(tables: list[RankTable]) -> pd.DataFrame:
    """``ranks.csv``: one row per (method, fraction): method, fraction, rank per dataset, avg_rank, metric."""
    rows = []
    for t in tables:
        for m in t.methods:
            row = {"method": m, "fraction": t.fraction}
            row.update({d: t.ranks.at[m, d] for d in t.datasets})
            row.update({"avg_rank": t.avg_rank[m], t.metric: t.avg_metric[m]})
            rows.append(row)
    return pd.DataFrame(rows)
