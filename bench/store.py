"""Records on disk (DESIGN.md §8): every file is written to a temporary name and renamed, so a killed
run loses at most the job in flight; a rerun skips what exists. ``results.csv`` is derived from the
cell records, never the source of truth.

    <out>/spec.json                      the spec the folder belongs to
    <out>/pretrain/<job-id>/{config.json, backbone.pt, log.csv, DONE | FAILED}
    <out>/cells/<cell-id>.json           one record per finetune cell (status ok | failed)
    <out>/results.csv, results.parquet, run.json
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from bench.errors import BenchError

METRICS = ("miou", "dice", "precision", "recall", "hd95")


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


def save_tensors(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


class Store:
    """The run folder of one benchmark."""

    def __init__(self, root: Path):
        self.root = Path(root)

    # --- the folder's spec ----------------------------------------------------------------------
    def claim(self, spec: dict[str, Any], force_new: bool = False) -> None:
        """Bind the folder to ``spec``; refuse a folder holding records of a different spec."""
        path = self.root / "spec.json"
        spec = json.loads(json.dumps(spec, default=str))  # tuples → lists, as read back from disk
        if path.is_file():
            old = read_json(path)
            if _comparable(old) != _comparable(spec):
                if not force_new:
                    raise BenchError(
                        f"{self.root} holds results of a different spec named {old.get('name')!r} "
                        f"(differs in: {', '.join(_differences(old, spec))}); pass --out to use another "
                        "folder, or --force-new to start a new spec there (existing records are kept)")
                write_json(self.root / f"spec.previous-{int(time.time())}.json", old)
        write_json(path, spec)

    # --- pretraining ----------------------------------------------------------------------------
    def job_dir(self, job_id: str) -> Path:
        return self.root / "pretrain" / job_id

    def checkpoint(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "backbone.pt"

    def job_done(self, job_id: str) -> bool:
        return (self.job_dir(job_id) / "DONE").is_file() and self.checkpoint(job_id).is_file()

    def job_failure(self, job_id: str) -> str | None:
        path = self.job_dir(job_id) / "FAILED"
        return path.read_text().strip() if path.is_file() else None

    def mark_job(self, job_id: str, config: dict[str, Any], error: str | None = None) -> None:
        folder = self.job_dir(job_id)
        write_json(folder / "config.json", config)
        if error is None:
            (folder / "FAILED").unlink(missing_ok=True)
            write_atomic(folder / "DONE", time.strftime("%Y-%m-%dT%H:%M:%S"))
        else:
            write_atomic(folder / "FAILED", error)

    # --- cells ----------------------------------------------------------------------------------
    def cell_path(self, cell_id: str) -> Path:
        return self.root / "cells" / f"{cell_id}.json"

    def cell_record(self, cell_id: str) -> dict[str, Any] | None:
        path = self.cell_path(cell_id)
        if not path.is_file():
            return None
        try:
            return read_json(path)
        except json.JSONDecodeError:  # cannot happen with atomic writes, but never trust a file blindly
            return None

    def cell_done(self, cell_id: str) -> bool:
        record = self.cell_record(cell_id)
        return record is not None and record.get("status") == "ok"

    def write_cell(self, cell_id: str, record: dict[str, Any]) -> None:
        write_json(self.cell_path(cell_id), record)

    # --- in flight ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def running(self, item_id: str):
        """Mark ``item_id`` as in flight (for ``bench status``) while the block runs."""
        marker = self.root / "running" / item_id
        write_atomic(marker, f"{socket.gethostname()} {os.getpid()} {time.strftime('%Y-%m-%dT%H:%M:%S')}")
        try:
            yield
        finally:
            marker.unlink(missing_ok=True)

    def in_flight(self) -> dict[str, str]:
        folder = self.root / "running"
        return {p.name: p.read_text() for p in folder.glob("*")} if folder.is_dir() else {}

    # --- derived tables -------------------------------------------------------------------------
    def results_table(self, cell_ids: list[str] | None = None) -> pd.DataFrame:
        """One row per cell record (of ``cell_ids`` when given), metrics and cost flattened."""
        paths = ([self.cell_path(c) for c in cell_ids] if cell_ids is not None
                 else sorted((self.root / "cells").glob("*.json")))
        rows = [_row(read_json(p)) for p in paths if p.is_file()]
        columns = ["cell_id", "method", "dataset", "fraction", "seed", "status", "error", *METRICS,
                   "pretrain_s", "finetune_s", "pretrain_images_per_s", "finetune_images_per_s",
                   "precision_mode", "device"]
        return pd.DataFrame(rows, columns=columns)

    def write_results(self, cell_ids: list[str] | None = None) -> pd.DataFrame:
        table = self.results_table(cell_ids)
        write_atomic(self.root / "results.csv", table.to_csv(index=False))
        try:
            import io

            buffer = io.BytesIO()
            table.to_parquet(buffer, index=False)
            write_atomic(self.root / "results.parquet", buffer.getvalue())
        except ImportError:
            pass
        return table


def _row(record: dict[str, Any]) -> dict[str, Any]:
    metrics = record.get("metrics", {})
    cost = record.get("cost", {})
    return {
        "cell_id": record["cell_id"], "method": record["method"], "dataset": record["dataset"],
        "fraction": record["fraction"], "seed": record["seed"], "status": record["status"],
        "error": record.get("error", ""), **{m: metrics.get(m) for m in METRICS},
        "pretrain_s": cost.get("pretrain_s"), "finetune_s": cost.get("finetune_s"),
        "pretrain_images_per_s": cost.get("pretrain_images_per_s"),
        "finetune_images_per_s": cost.get("finetune_images_per_s"),
        "precision_mode": record.get("precision"), "device": record.get("device"),
    }


def _comparable(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in spec.items() if k not in ("description", "showcase_note")}


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = _comparable(old), _comparable(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)) or ["details"]
