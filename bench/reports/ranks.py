"""Per-dataset ranks and average ranks — Demšar (2006) §3.2.2, the layout of DiCoH's Tables 1–2.

For each label fraction: the metric is averaged over seeds first (seeds are repetitions, not data
sets), the methods are ranked on each dataset (rank 1 = best; ties get the average of the ranks
they span, ``scipy.stats.rankdata(method="average")``), and the ranks are averaged over datasets:
R_j = (1/N) Σ_i r_i^j. Only datasets on which every method has a result are ranked; the others are
listed, never silently dropped. Reference methods (``unranked``) keep their rows and values but take
no rank and do not decide which datasets are complete.

Fine-tuning protocols (the ``freeze`` column: ``none`` full fine-tuning, ``backbone`` a frozen-backbone
probe of the head) are never ranked together: a table holding several is split by protocol first, and
each protocol gets its own tables, statistics and figures, exactly as each label fraction does. The
protocol then becomes part of the group key (``full-0.05``, ``frozen-0.05``; ``group_key``); a table of
one protocol keeps the keys it always had (``0.05``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.stats import rankdata

ALL = "all"
PROTOCOL_COLUMN = "freeze"  # the fine-tuning protocol of a row (records and results.csv carry it)
PROTOCOL_NAMES = {"none": "full fine-tuning", "backbone": "frozen backbone (linear-style probe of the head)"}
PROTOCOL_KEYS = {"none": "full", "backbone": "frozen"}  # in group keys and file names


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


def protocols(frame: pd.DataFrame) -> list[str]:
    """The fine-tuning protocols of a table (``freeze`` values; ``none`` first, then ``backbone``, then
    any other in order of appearance); ``[]`` when the table does not say (a plain CSV)."""
    if PROTOCOL_COLUMN not in frame.columns:
        return []
    present = ordered(frame[PROTOCOL_COLUMN].dropna().astype(str))
    return [p for p in PROTOCOL_NAMES if p in present] + [p for p in present if p not in PROTOCOL_NAMES]


def protocol_frames(frame: pd.DataFrame) -> list[tuple[str | None, pd.DataFrame]]:
    """(protocol, its rows) for each fine-tuning protocol when the table holds several, else
    ``[(None, frame)]``: the unit every ranking, test and figure is computed within."""
    found = protocols(frame)
    if len(found) < 2:
        return [(None, frame)]
    return [(p, frame[frame[PROTOCOL_COLUMN].astype(str) == p].copy()) for p in found]


def protocol_name(protocol: str) -> str:
    """``none`` → "full fine-tuning", ``backbone`` → "frozen backbone (linear-style probe of the head)"."""
    return PROTOCOL_NAMES.get(protocol, f"freeze: {protocol}")


def protocol_key(protocol: str) -> str:
    """The protocol's short name in group keys and file names: ``full``, ``frozen`` (another value:
    ``freeze_<value>``, without dashes)."""
    return PROTOCOL_KEYS.get(protocol) or "freeze_" + (re.sub(r"[^A-Za-z0-9]+", "_", protocol).strip("_") or "x")


def group_key(protocol: str | None, group: str) -> str:
    """A group (a fraction label or "all") within a protocol: ``frozen-0.05``; the plain group without one."""
    return group if protocol is None else f"{protocol_key(protocol)}-{group}"


def split_group(key: str) -> tuple[str | None, str]:
    """``group_key``'s inverse: (protocol or None, group); an unknown protocol comes back as its key's
    name part. Fraction labels start with a digit or "all" and protocol keys hold no dash, so the split
    is never ambiguous."""
    head, sep, rest = key.partition("-")
    if sep:
        for protocol, short in PROTOCOL_KEYS.items():
            if head == short:
                return protocol, rest
        if head.startswith("freeze_"):
            return head[len("freeze_"):], rest
    return None, key


def by_protocol(frame: pd.DataFrame, make: Callable[[pd.DataFrame], pd.DataFrame]) -> pd.DataFrame:
    """``make`` (a per-fraction table such as the MDE table) within each protocol, concatenated with a
    leading ``protocol`` column when there are several; ``make(frame)`` unchanged otherwise."""
    parts = protocol_frames(frame)
    if parts[0][0] is None:
        return make(frame)
    tables = [make(sub).assign(protocol=protocol_key(p)) for p, sub in parts]
    out = pd.concat(tables, ignore_index=True)
    return out[["protocol", *[c for c in out.columns if c != "protocol"]]]


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
    protocol: str | None = None  # the fine-tuning protocol of its rows, when the table says (freeze column)
    by_protocol: bool = False  # the results hold several protocols: the protocol is part of the group

    @property
    def group(self) -> str:
        """Its group key: the fraction label, within its protocol when there are several (``frozen-0.05``)."""
        return group_key(self.protocol if self.by_protocol else None, fraction_label(self.fraction))

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
    """One rank table per label fraction — per fine-tuning protocol and fraction when the table holds
    several protocols — all with the same method and dataset order."""
    methods, datasets = ordered(frame["method"]), ordered(frame["dataset"])
    found = protocols(frame)
    out = []
    for protocol, sub in protocol_frames(frame):
        for f in fractions(sub):
            table = rank_table(sub, metric, f, higher_is_better, methods, datasets, unranked)
            table.protocol = protocol if protocol is not None else (found[0] if len(found) == 1 else None)
            table.by_protocol = protocol is not None
            out.append(table)
    return out


def ranks_frame(tables: list[RankTable]) -> pd.DataFrame:
    """``ranks.csv``: one row per (method, fraction): method, fraction, rank per dataset, avg_rank, metric;
    with several fine-tuning protocols, one row per (protocol, method, fraction), ``protocol`` first."""
    several = any(t.by_protocol for t in tables)
    rows = []
    for t in tables:
        for m in t.methods:
            row = {"protocol": protocol_key(t.protocol)} if several and t.protocol is not None else {}
            row.update({"method": m, "fraction": t.fraction})
            row.update({d: t.ranks.at[m, d] for d in t.datasets})
            row.update({"avg_rank": t.avg_rank[m], t.metric: t.avg_metric[m]})
            rows.append(row)
    return pd.DataFrame(rows)
