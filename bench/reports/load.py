"""Read a results table — a run folder's ``results.csv`` or a plain long-format CSV — and validate it.

A run folder ``<out>/`` holds ``results.csv`` (one row per finetune cell: ``method, dataset, fraction,
seed, status, error``, metrics, costs), ``run.json`` (spec, versions, hardware, missing cells, notes)
and optionally ``diagnostics/``, ``predictions/`` and ``speed.json``. A plain CSV has ``method``,
``dataset`` and one or more numeric metric columns; ``fraction`` and ``seed`` are optional (e.g. Demšar
2006, Table 6).

Optional columns, read when present and never required (docs/reports.md lists them):
``test_set`` and ``seen`` (one row per test set of a train-on-some, test-on-others protocol: each test
set is one block, labelled "<test set> (seen|unseen)"), ``reference`` ("upper" marks a reference method
kept out of the ranks), ``protocol_version``, ``eval``, ``freeze``, ``n_test`` and ``n_test_empty_gt``
(shown in the report header). ``freeze`` is also the fine-tuning protocol (``none``: full fine-tuning,
``backbone``: frozen-backbone probe): a table may hold both, one row per protocol and cell, and the
report ranks and tests each protocol separately (``bench.reports.ranks.protocol_frames``); an empty
``freeze`` reads as ``none`` (records made before the field existed).

Reports never import training code: everything here works from the table alone.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from bench.errors import BenchError

KEY_COLUMNS = ("method", "dataset", "fraction", "seed")
NON_METRIC_COLUMNS = {"cell_id", "method", "dataset", "fraction", "seed", "status", "error",
                      "precision_mode", "device", "test_set", "seen", "train_set", "reference",
                      "protocol_version", "eval", "freeze", "n_test", "n_test_empty_gt"}
# name parts (split at _ - . and spaces) of lower-is-better metrics: distances, errors, losses, times
DISTANCE_PARTS = {"hd", "hd95", "hd100", "hausdorff", "assd", "asd", "msd", "masd", "distance", "dist", "mae",
                  "mse", "rmse", "nrmse", "error", "err", "loss", "nll", "fpr", "fnr"}
UNIT_PARTS = {"mm", "px", "pix", "pixels", "voxels", "cm", "um", "s", "sec", "seconds", "ms", "min", "time"}
RATE_PARTS = ("per_s", "per_sec", "/s")


@dataclass
class Source:
    """A loaded results table plus whatever the run folder adds around it."""

    frame: pd.DataFrame  # validated: method, dataset, fraction, seed, status, error, <metric>, ...
    path: Path  # the CSV that was read
    run_dir: Path | None = None  # the run folder, when one was given
    run: dict = field(default_factory=dict)  # run.json (empty for a plain CSV)
    strict: bool = True  # plain CSV without status: every (method, dataset, fraction) must be present


def metric_direction(metric: str) -> tuple[bool, str]:
    """(lower is better, why): distances, errors, losses and times are lower-is-better, the rest higher.

    Recognised by the parts of the name: ``hd95``, ``assd_mm``, ``asd_px``, ``rmse_px``, ``val_loss``,
    ``error_rate``, ``finetune_s`` are lower-is-better (a distance or time unit such as ``_mm``, ``_px``,
    ``_s`` counts); throughputs (``*_per_s``) and everything else (``miou``, ``dice``, ``auc``) higher.
    """
    name = metric.lower().strip()
    if any(r in name for r in RATE_PARTS):
        return False, "a rate per second"
    parts = [p for p in re.split(r"[_\-.\s]+", name) if p]
    hit = next((p for p in parts if p in DISTANCE_PARTS or re.fullmatch(r"(hd|assd|asd)\d*", p)), None)
    if hit:
        return True, f"'{hit}' names a distance, error or loss"
    unit = next((p for p in parts[1:] if p in UNIT_PARTS), None)
    if unit:
        return True, f"'{unit}' is a distance or time unit"
    if "hausdorff" in name or "distance" in name or "loss" in name or "error" in name:
        return True, "its name holds a distance, error or loss"
    return False, "not a known distance, error, loss or time"


def lower_is_better(metric: str) -> bool:
    """Known lower-is-better metrics (see ``metric_direction``)."""
    return metric_direction(metric)[0]


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
    frame = _test_set_blocks(frame, path)
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
    if "freeze" in frame.columns:
        frame["freeze"] = _freeze(frame["freeze"])
    _check_duplicates(frame, path)
    if strict:
        _check_complete(frame, path)
    return frame


def _test_set_blocks(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    """One block per test set: ``dataset`` becomes "<test set> (seen)" / "(unseen)"; the training data's
    label is ``train_set`` (given, or the old ``dataset``) and prefixes the block when several pools are present."""
    if "test_set" not in frame.columns or frame["test_set"].isna().all():
        return frame
    has = frame["test_set"].notna() & (frame["test_set"].astype(str).str.strip() != "")
    seen = _seen(frame, path) if "seen" in frame.columns else pd.Series(None, index=frame.index, dtype=object)
    given = frame["train_set"] if "train_set" in frame.columns else pd.Series(np.nan, index=frame.index)
    frame["train_set"] = given.where(given.notna() & (given.astype(str).str.strip() != ""), frame["dataset"])
    pools = frame.loc[has, "train_set"].unique()
    for i in frame.index[has]:
        label = str(frame.at[i, "test_set"]).strip()
        if len(pools) > 1:
            label = f"{frame.at[i, 'train_set']} → {label}"
        if seen[i] is not None:
            label += " (seen)" if seen[i] else " (unseen)"
        frame.at[i, "dataset"] = label
    return frame


def _seen(frame: pd.DataFrame, path: Path) -> pd.Series:
    words = {"true": True, "1": True, "yes": True, "seen": True, "1.0": True,
             "false": False, "0": False, "no": False, "unseen": False, "0.0": False}
    out = {}
    for i, v in frame["seen"].items():
        if pd.isna(v) or str(v).strip() == "":
            out[i] = None
            continue
        key = str(v).strip().lower()
        if key not in words:
            raise BenchError(f"{path} line {int(i) + 2}: seen {v!r} is not true/false")
        out[i] = words[key]
    return pd.Series(out, dtype=object)


def reference_methods(frame: pd.DataFrame, names: tuple[str, ...] | list[str] = ()) -> dict[str, str]:
    """Reference methods → their kind: the ``reference`` column ("upper", "lower", ...) and ``names``
    given by the user (kind "upper" unless the column says otherwise). Unknown names raise."""
    out: dict[str, str] = {}
    if "reference" in frame.columns:
        for method, kind in frame[["method", "reference"]].itertuples(index=False, name=None):
            if pd.notna(kind) and str(kind).strip() and str(kind).strip().lower() not in ("none", "false", "0"):
                out.setdefault(method, str(kind).strip().lower())
    known = set(frame["method"])
    for name in names:
        if name not in known:
            raise BenchError(f"--reference {name}: no such method in the results (methods: "
                             f"{', '.join(dict.fromkeys(frame['method']))})")
        out.setdefault(name, "upper")
    return out


def reference_label(method: str, kind: str) -> str:
    """The name shown in tables and figures: ``supervised (upper reference)``."""
    return f"{method} ({kind} reference)"


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


def _freeze(values: pd.Series) -> pd.Series:
    """The fine-tuning protocol of each row: ``none`` for an empty value (or false/no), else as written."""
    text = values.astype(object).where(values.notna(), "").astype(str).str.strip()
    return text.where(~text.str.lower().isin(["", "none", "false", "no", "nan"]), "none")


def _check_duplicates(frame: pd.DataFrame, path: Path) -> None:
    ok = frame[frame["status"] == "ok"]
    keys = [*KEY_COLUMNS, "freeze"] if "freeze" in frame.columns else list(KEY_COLUMNS)  # one row per protocol
    dup = ok.duplicated(keys, keep=False)
    if dup.any():
        row = ok[dup].iloc[0]
        protocol = f", freeze {row['freeze']}" if "freeze" in keys else ""
        raise BenchError(f"{path}: more than one result for method {row['method']}, dataset {row['dataset']}"
                         f", fraction {_fmt(row['fraction'])}, seed {row['seed']}{protocol}: results of two "
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
