"""Read a results table — a run folder's ``results.csv`` or a plain long-format CSV — and validate it.

A run folder ``<out>/`` holds ``results.csv`` (one row per finetune cell: ``method, dataset, fraction,
seed, status, error``, metrics, costs), ``run.json`` (spec, versions, hardware, missing cells, notes)
and optionally ``diagnostics/`` and ``speed.json``. A plain CSV has ``method``, ``dataset`` and one or
more numeric metric columns; ``fraction`` and ``seed`` are optional (e.g. Demšar 2006, Table 6).

Reports never import training code: everything here works from the table alone.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from bench.errors import BenchError

KEY_COLUMNS = ("method", "dataset", "fraction", "seed")
NON_METRIC_COLUMNS = {"cell_id", "method", "dataset", "fraction", "seed", "status", "error",
                      "precision_mode", "device"}
LOWER_IS_BETTER_NAMES = {"hd95", "hd", "hausdorff", "assd", "asd", "mae", "rmse", "mse"}
LOWER_IS_BETTER_PARTS = ("loss", "error", "hd95", "hausdorff", "time", "seconds")


@dataclass
class Source:
    """A loaded results table plus whatever the run folder adds around it."""

    frame: pd.DataFrame  # validated: method, dataset, fraction, seed, status, error, <metric>, ...
    path: Path  # the CSV that was read
    run_dir: Path | None = None  # the run folder, when one was given
    run: dict = field(default_factory=dict)  # run.json (empty for a plain CSV)
    strict: bool = True  # plain CSV without status: every (method, dataset, fraction) must be present


def lower_is_better(metric: str) -> bool:
    """Known lower-is-better metrics: ``hd95`` and other distances, ``*loss*``, ``*error*``, times."""
    name = metric.lower()
    if "per_s" in name or "per_sec" in name:  # throughput (images/s): higher is better
        return False
    return name in LOWER_IS_BETTER_NAMES or any(p in name for p in LOWER_IS_BETTER_PARTS) or name.endswith("_s")


def numeric_columns(frame: pd.DataFrame) -> list[str]:
    """Columns that could serve as the metric: numeric (or all-numeric strings), not keys or labels."""
    cols = []
    for col in frame.columns:
        if col in NON_METRIC_COLUMNS:
            continue
        values = pd.to_numeric(frame[col], errors="coerce")
        if values.notna().any() and values.notna().sum() == frame[col].notna().sum():
            cols.append(str(col))
    return cols


def load_source(source: Path, metric: str) -> Source:
    """Find and validate the results table at ``source`` (a run folder or a CSV file)."""
    source = Path(source)
    if source.is_dir():
        csv = source / "results.csv"
        if not csv.is_file():
            raise BenchError(f"no results.csv in {source}: pass a run folder written by `bench run` or a CSV file")
        run = _read_run_json(source / "run.json")
        frame = _read_csv(csv)
        return Source(_validate(frame, metric, csv, strict=False), csv, source, run, strict=False)
    if not source.is_file():
        raise BenchError(f"{source} does not exist: pass a run folder or a long-format CSV file")
    frame = _read_csv(source)
    strict = "status" not in frame.columns
    return Source(_validate(frame, metric, source, strict=strict), source, None, {}, strict=strict)


def load_results(source: Path, metric: str) -> pd.DataFrame:
    """The validated long-format table: one row per (method, dataset, fraction, seed) cell.

    Adds ``fraction`` (NaN when absent), ``seed`` (0 when absent), ``status`` ("ok" when absent) and
    ``error`` columns; the metric column is float (NaN only on failed cells). Raises ``BenchError``
    for missing columns, an unknown or non-numeric metric, duplicate cells, or — in a plain CSV without
    a ``status`` column — a method that has no row for some dataset.
    """
    return load_source(source, metric).frame


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BenchError(f"cannot read {path} as CSV ({first}): check the file") from None


def _read_run_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        run = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BenchError(f"{path} is not valid JSON ({err}): rewrite it or delete it") from None
    if not isinstance(run, dict):
        raise BenchError(f"{path} must hold a JSON object (spec, versions, hardware, missing, notes)")
    return run


def _validate(frame: pd.DataFrame, metric: str, path: Path, strict: bool) -> pd.DataFrame:
    frame = frame.copy()
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in ("method", "dataset") if c not in frame.columns]
    if missing:
        raise BenchError(f"{path} lacks column(s) {', '.join(missing)}: a results table needs method, "
                         f"dataset and at least one numeric metric column (columns found: "
                         f"{', '.join(frame.columns)})")
    if frame.empty:
        raise BenchError(f"{path} has no rows")
    if metric not in frame.columns:
        cols = numeric_columns(frame)
        hint = f"numeric columns are {', '.join(cols)}" if cols else "it has no numeric column"
        raise BenchError(f"unknown metric '{metric}' in {path}: {hint}; pass one of them as the metric")
    for col in ("method", "dataset"):
        if frame[col].isna().any():
            row = int(frame.index[frame[col].isna()][0]) + 2
            raise BenchError(f"{path} line {row}: empty '{col}': every row needs a method and a dataset")
        frame[col] = frame[col].astype(str).str.strip()
    frame["status"] = _status(frame, path)
    frame["error"] = frame["error"].astype(object).fillna("").astype(str) if "error" in frame.columns else ""
    frame["fraction"] = _numeric(frame, "fraction", path, default=np.nan)
    frame["seed"] = _numeric(frame, "seed", path, default=0)
    if frame["fraction"].isna().any() and frame["fraction"].notna().any():
        row = int(frame.index[frame["fraction"].isna()][0]) + 2
        raise BenchError(f"{path} line {row}: empty fraction while other rows have one: fill it in")
    if (frame["seed"] != frame["seed"].round()).any():
        raise BenchError(f"{path}: seed must be an integer")
    frame["seed"] = frame["seed"].astype(int)
    frame[metric] = _metric(frame, metric, path)
    _check_duplicates(frame, path)
    if strict:
        _check_complete(frame, path)
    return frame


def _status(frame: pd.DataFrame, path: Path) -> pd.Series:
    if "status" not in frame.columns:
        return pd.Series("ok", index=frame.index)
    status = frame["status"].fillna("").astype(str).str.strip().str.lower()
    bad = sorted(set(status) - {"ok", "failed"})
    if bad:
        raise BenchError(f"{path}: status must be 'ok' or 'failed', found {', '.join(map(repr, bad))}")
    return status


def _numeric(frame: pd.DataFrame, col: str, path: Path, default: float) -> pd.Series:
    if col not in frame.columns:
        return pd.Series(default, index=frame.index, dtype=float)
    values = pd.to_numeric(frame[col], errors="coerce")
    bad = values.isna() & frame[col].notna()
    if bad.any():
        i = frame.index[bad][0]
        raise BenchError(f"{path} line {int(i) + 2}: {col} {frame.at[i, col]!r} is not a number")
    return values.astype(float)


def _metric(frame: pd.DataFrame, metric: str, path: Path) -> pd.Series:
    values = pd.to_numeric(frame[metric], errors="coerce").astype(float)
    ok = frame["status"] == "ok"
    bad = ok & (values.isna() | ~np.isfinite(values.fillna(0.0)))
    if bad.any():
        i = frame.index[bad][0]
        raw = frame.at[i, metric]
        what = "is empty" if pd.isna(raw) else f"is {raw!r}, not a finite number"
        fix = "mark the row status=failed or fill in the value" if "status" in frame.columns \
            else "fix the value or add a status column and mark the row failed"
        raise BenchError(f"{path} line {int(i) + 2}: {metric} of {frame.at[i, 'method']} on "
                         f"{frame.at[i, 'dataset']} {what}: {fix}")
    return values


def _check_duplicates(frame: pd.DataFrame, path: Path) -> None:
    ok = frame[frame["status"] == "ok"]
    dup = ok.duplicated(list(KEY_COLUMNS), keep=False)
    if dup.any():
        row = ok[dup].iloc[0]
        raise BenchError(f"{path}: more than one result for method {row['method']}, dataset {row['dataset']}"
                         f", fraction {_fmt(row['fraction'])}, seed {row['seed']}: results of two "
                         "configurations are mixed; report one spec at a time")


def _check_complete(frame: pd.DataFrame, path: Path) -> None:
    have = set(map(tuple, frame[["method", "dataset", "fraction"]].fillna(-1.0).to_numpy().tolist()))
    for method in frame["method"].unique():
        for dataset in frame["dataset"].unique():
            for fraction in frame["fraction"].fillna(-1.0).unique():
                if (method, dataset, fraction) not in have:
                    where = "" if fraction == -1.0 else f" at fraction {_fmt(fraction)}"
                    raise BenchError(f"{path}: method {method} has no row for dataset {dataset}{where}: add "
                                     "it, or add a status column and mark missing cells 'failed'")


def _fmt(fraction: float) -> str:
    return "-" if fraction is None or (isinstance(fraction, float) and math.isnan(fraction)) else f"{fraction:g}"
