"""Records on disk (docs/architecture.md). Every file is written to a temporary name and renamed, so a
killed run loses at most the item in flight; a rerun skips what exists and verifies what it reuses.
``results.csv`` is derived from the cell records, never the source of truth.

    <out>/spec.json                      the spec the folder belongs to
    <out>/pretrain/<job-id>/{config.json, backbone.pt, backbone.pt.sha256, log.csv, DONE | FAILED}
    <out>/cells/<cell-id>.json           one record per finetune cell (status ok | failed)
    <out>/claims/<item-id>               who computes an item right now (``bench.claims``)
    <out>/results.csv, results.parquet, run.json

Integrity: ``DONE`` holds the checkpoint's sha256 and every JSON record a ``checksum`` of its own
content, both written at save time. A rerun verifies what it reuses; what fails (or does not parse as
a record) is moved aside as ``*.corrupt``, reported in one line and recomputed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from bench.claims import Claims
from bench.errors import BenchError
from bench.files import (
    checksum_problem,
    file_sha256,
    load_weights,
    make_dir,
    parse_json_file,
    read_json,
    save_tensors,
    with_checksum,
    write_atomic,
    write_json,
)

__all__ = ["METRICS", "Store", "load_weights", "make_dir", "read_json", "save_tensors", "write_atomic", "write_json"]
METRICS = ("miou", "dice", "precision", "recall", "hd95")
# top-level record keys copied into results.csv as they are (the generalisation protocol's test_set,
# seen and train_set are absent, so empty, for the per-dataset protocol)
RECORD_COLUMNS = ("reference", "protocol_version", "eval", "freeze", "n_test", "n_test_empty_gt", "test_set", "seen",
                  "train_set")
SPEC_IGNORED = ("description", "showcase_note", "keep_predictions", "keep_models", "threads")  # not identity


def _cell_problem(obj: Any, cell_id: str) -> str | None:
    problem = checksum_problem(obj)
    if problem is not None:
        return problem
    types = {"cell_id": str, "method": str, "dataset": str, "fraction": (int, float), "seed": int, "status": str}
    missing = [k for k, kind in types.items() if not isinstance(obj.get(k), kind) or isinstance(obj.get(k), bool)]
    if missing:
        return f"missing or wrong {', '.join(missing)}"
    if obj["cell_id"] != cell_id:
        return f"it belongs to cell {obj['cell_id']}"
    if obj["status"] not in ("ok", "failed"):
        return f"unknown status {obj['status']!r}"
    if obj["status"] == "ok" and not isinstance(obj.get("metrics"), dict):
        return "an ok record without metrics"
    return None


def _read_done(path: Path) -> dict[str, Any] | None:
    """A DONE marker: JSON with the checkpoint's sha256, or (older folders) a bare timestamp."""
    try:
        text = path.read_bytes().decode("utf-8").strip()
    except (UnicodeDecodeError, OSError):
        return None
    if re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", text):
        return {"finished": text}
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None
    if checksum_problem(obj) or not re.fullmatch(r"[0-9a-f]{64}", str(obj.get("sha256", ""))):
        return None
    return obj


class Store:
    """The run folder of one benchmark. Problems found in it (a corrupt record, a stale claim) are
    appended to ``problems`` and passed to ``report`` (one line each) as they are found."""

    def __init__(self, root: Path, report: Callable[[str], None] | None = None, stale_after_s: float = 600.0,
                 heartbeat_s: float = 30.0):
        self.root = Path(root)
        self.report = report
        self.problems: list[str] = []
        self.claims = Claims(self.root / "claims", self._problem, stale_after_s, heartbeat_s)
        self._spec: dict[str, Any] | None = None
        self._saved: dict[str, str] = {}  # job id -> sha256 of the checkpoint this process saved
        self._verified: dict[str, tuple] = {}  # job id -> file stamps of a verified checkpoint

    # --- problems -----------------------------------------------------------------------------
    def _problem(self, text: str) -> None:
        if text in self.problems:
            return
        self.problems.append(text)
        if self.report is not None:
            self.report(text)

    def _rel(self, path: Path) -> str:
        with contextlib.suppress(ValueError):
            return str(path.relative_to(self.root))
        return str(path)

    def _quarantine(self, path: Path, why: str, then: str = "recomputing") -> None:
        """Move ``path`` aside as ``<name>.corrupt`` (numbered if taken) and say so in one line."""
        target = path.with_name(path.name + ".corrupt")
        number = 1
        while target.exists():
            target, number = path.with_name(f"{path.name}.corrupt{number}"), number + 1
        with contextlib.suppress(FileNotFoundError):  # another process may have moved it already
            os.replace(path, target)
        self._problem(f"{self._rel(path)} {why}: moved aside as {target.name}, {then}")

    # --- the folder's spec ----------------------------------------------------------------------
    def read_spec(self, quarantine: bool = False) -> dict[str, Any] | None:
        """The folder's spec.json as a dict; None when absent or unreadable (with ``quarantine``, as
        when a run binds the folder: then also moved aside, one line)."""
        path = self.root / "spec.json"
        if not path.is_file():
            return None
        obj, why = parse_json_file(path)
        if why is None and not (isinstance(obj, dict) and isinstance(obj.get("name"), str)
                                and isinstance(obj.get("methods"), list)):
            why = "not a spec (no name or methods)"
        if why is not None:
            if quarantine:
                self._quarantine(path, f"is unreadable ({why})", "the folder takes this run's spec")
            return None
        return obj

    def bind_spec(self, spec: dict[str, Any], force_new: bool = False) -> None:
        """Bind the folder to ``spec``; refuse a folder holding records of a different spec."""
        path = self.root / "spec.json"
        spec = json.loads(json.dumps(spec, default=str))  # tuples → lists, as read back from disk
        old = self.read_spec(quarantine=True)
        if old is not None and _comparable(old) != _comparable(spec):
            if not force_new:
                raise BenchError(
                    f"{self.root} holds results of a different spec named {old.get('name')!r} "
                    f"(differs in: {', '.join(_differences(old, spec))}); pass --out to use another "
                    "folder, or --force-new to start a new spec there (existing records are kept)")
            write_json(self.root / f"spec.previous-{int(time.time())}.json", old)
        write_json(path, spec)
        self._spec = spec

    def requested_precision(self) -> str | None:
        """The precision the bound spec asks for (auto | bf16 | fp32); reused items must match it."""
        if self._spec is None:
            self._spec = self.read_spec()
        return None if self._spec is None else self._spec.get("precision")

    def _precision_ok(self, what: str, record: dict[str, Any]) -> bool:
        asked, made = self.requested_precision(), record.get("precision_requested")
        if asked is None or made is None or asked == made:
            return True
        self._problem(f"{what} was computed for precision {made}, the spec asks {asked}: recomputing")
        return False

    # --- pretraining ----------------------------------------------------------------------------
    def job_dir(self, job_id: str) -> Path:
        return self.root / "pretrain" / job_id

    def checkpoint(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "backbone.pt"

    def save_checkpoint(self, job_id: str, state: dict[str, Any]) -> str:
        """The one checkpoint writer: atomic, with ``backbone.pt.sha256`` beside it; returns the sha256."""
        path = self.checkpoint(job_id)
        digest = save_tensors(path, state)
        write_atomic(path.with_name(path.name + ".sha256"), f"{digest}  {path.name}\n")
        self._saved[job_id] = digest
        return digest

    def load_checkpoint(self, job_id: str) -> dict[str, Any]:
        """The one checkpoint reader for a job: verified against DONE's sha256, then ``load_weights``."""
        if not self.job_done(job_id):
            raise BenchError(f"pretrain/{job_id} has no verified checkpoint; rerun bench run to compute it")
        state = load_weights(self.checkpoint(job_id))
        if not isinstance(state.get("backbone"), dict):
            raise BenchError(f"{self.checkpoint(job_id)} holds no 'backbone' weights; delete it and rerun")
        return state

    def write_log(self, job_id: str, text: str) -> None:
        write_atomic(self.job_dir(job_id) / "log.csv", text)

    def job_done(self, job_id: str, verify: bool = True) -> bool:
        """Whether the job's checkpoint exists, is whole (its sha256 matches DONE's) and was made for
        the spec's precision. A checkpoint that fails is moved aside (one line) so the job reruns."""
        folder, path = self.job_dir(job_id), self.checkpoint(job_id)
        done_path = folder / "DONE"
        if not done_path.is_file():
            return False
        done = _read_done(done_path)
        if done is None:
            self._quarantine(done_path, "is unreadable")
            return False
        if not path.is_file():
            self._quarantine(done_path, "names a checkpoint that is missing")
            return False
        if self.job_config(job_id) is None:
            self._quarantine(done_path, "belongs to an unreadable config.json")
            return False
        if not self._precision_ok(f"pretrain/{job_id}", done):
            return False
        if not verify:
            return True
        stamp = (path.stat().st_size, path.stat().st_mtime_ns, done_path.stat().st_mtime_ns)
        if self._verified.get(job_id) == stamp:
            return True
        if not self._checkpoint_ok(job_id, done):
            self._quarantine(path, "failed its checksum")
            done_path.unlink(missing_ok=True)
            return False
        self._verified[job_id] = (path.stat().st_size, path.stat().st_mtime_ns, done_path.stat().st_mtime_ns)
        return True

    def _checkpoint_ok(self, job_id: str, done: dict[str, Any]) -> bool:
        path = self.checkpoint(job_id)
        if "sha256" in done:
            return file_sha256(path) == done["sha256"]
        try:  # an older folder's DONE carries no sha256: verify by loading once, then record it
            load_weights(path)
        except BenchError:
            return False
        self._write_done(job_id, {**done, "sha256": file_sha256(path)})
        return True

    def _write_done(self, job_id: str, done: dict[str, Any]) -> None:
        write_json(self.job_dir(job_id) / "DONE", with_checksum(done))

    def job_failure(self, job_id: str) -> str | None:
        path = self.job_dir(job_id) / "FAILED"
        return path.read_bytes().decode("utf-8", "replace").strip() if path.is_file() else None

    def job_config(self, job_id: str) -> dict[str, Any] | None:
        """The job's config.json (its config and, once done, its cost); None if absent or corrupt."""
        path = self.job_dir(job_id) / "config.json"
        if not path.is_file():
            return None
        obj, why = parse_json_file(path)
        why = why or checksum_problem(obj)
        if why is not None:
            self._quarantine(path, f"is not a valid record ({why})")
            return None
        return obj

    def mark_job(self, job_id: str, config: dict[str, Any], error: str | None = None) -> None:
        """Record a finished job (config.json, then DONE with the checkpoint's sha256) or its failure."""
        folder = self.job_dir(job_id)
        write_json(folder / "config.json", with_checksum(config))
        if error is not None:
            write_atomic(folder / "FAILED", error)
            return
        (folder / "FAILED").unlink(missing_ok=True)
        digest = self._saved.pop(job_id, None) or file_sha256(self.checkpoint(job_id))
        done = {"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "sha256": digest, "checkpoint": "backbone.pt"}
        if self.requested_precision() is not None:
            done["precision_requested"] = self.requested_precision()
        self._write_done(job_id, done)

    # --- cells ----------------------------------------------------------------------------------
    def cell_path(self, cell_id: str) -> Path:
        return self.root / "cells" / f"{cell_id}.json"

    def cell_record(self, cell_id: str) -> dict[str, Any] | None:
        """The cell's record; None when absent or invalid (then moved aside as ``*.corrupt``, one line)."""
        path = self.cell_path(cell_id)
        if not path.is_file():
            return None
        obj, why = parse_json_file(path)
        why = why or _cell_problem(obj, cell_id)
        if why is not None:
            self._quarantine(path, f"is not a valid record ({why})")
            return None
        return obj

    def cell_done(self, cell_id: str) -> bool:
        record = self.cell_record(cell_id)
        return (record is not None and record.get("status") == "ok"
                and self._precision_ok(f"cells/{cell_id}.json", record))

    def write_cell(self, cell_id: str, record: dict[str, Any]) -> None:
        """Write a cell record with its checksum (and the spec's requested precision)."""
        record = dict(record)
        if self.requested_precision() is not None:
            record.setdefault("precision_requested", self.requested_precision())
        write_json(self.cell_path(cell_id), with_checksum(record))

    # --- who computes what ----------------------------------------------------------------------
    def claim(self, item_id: str) -> contextlib.AbstractContextManager[bool]:
        """``with store.claim(item_id) as mine:`` - True when this process now owns the item (then
        re-check whether it is done: another process may have finished it), False when a live
        process holds it. Released when the block ends, also on an exception."""
        if not isinstance(item_id, str):
            raise TypeError("Store.claim takes a job or cell id; bind a spec with Store.bind_spec")
        return self.claims.hold(item_id)

    def wait_released(self, item_id: str, poll_s: float = 0.5) -> None:
        """Block until no live process holds ``item_id`` (its owner finished, failed or died)."""
        self.claims.wait(item_id, poll_s)

    def in_flight(self) -> dict[str, str]:
        """Items held by a live process: id -> "host pid since"."""
        return self.claims.live()

    # --- what a cell keeps beside its record (added by run-B; see /tmp/team/request-from-run-B.md) ---
    def save_predictions(self, cell_id: str, arrays: dict[str, Any]) -> Path:
        """``<out>/predictions/<cell-id>.npz`` (compressed arrays, written atomically)."""
        import numpy as np

        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        path = self.root / "predictions" / f"{cell_id}.npz"
        write_atomic(path, buffer.getvalue())
        return path

    def save_model(self, cell_id: str, state: dict[str, Any]) -> Path:
        """``<out>/models/<cell-id>.pt``: a cell's fine-tuned weights (``--keep-models``)."""
        path = self.root / "models" / f"{cell_id}.pt"
        save_tensors(path, state)
        return path

    # --- the run's summary ----------------------------------------------------------------------
    def write_run(self, info: dict[str, Any]) -> None:
        write_json(self.root / "run.json", info)

    def read_run(self) -> dict[str, Any] | None:
        """run.json, or None when absent or unreadable."""
        obj, why = parse_json_file(self.root / "run.json")
        return obj if why is None and isinstance(obj, dict) else None

    # --- derived tables -------------------------------------------------------------------------
    def results_table(self, cell_ids: list[str] | None = None) -> pd.DataFrame:
        """One row per valid cell record (of ``cell_ids`` when given), metrics and cost flattened."""
        if cell_ids is None:
            cell_ids = sorted(p.stem for p in (self.root / "cells").glob("*.json"))
        records = [self.cell_record(c) for c in cell_ids]
        rows = [_row(r) for r in records if r is not None]
        columns = ["cell_id", "method", "dataset", "fraction", "seed", "status", "error", *METRICS,
                   "pretrain_s", "finetune_s", "pretrain_images_per_s", "finetune_images_per_s",
                   "precision_mode", "device", *RECORD_COLUMNS]
        return pd.DataFrame(rows, columns=columns)

    def write_results(self, cell_ids: list[str] | None = None) -> pd.DataFrame:
        table = self.results_table(cell_ids)
        write_atomic(self.root / "results.csv", table.to_csv(index=False))
        buffer = io.BytesIO()
        table.to_parquet(buffer, index=False)  # pyarrow is a declared dependency
        write_atomic(self.root / "results.parquet", buffer.getvalue())
        return table


def _row(record: dict[str, Any]) -> dict[str, Any]:
    metrics = record.get("metrics") or {}
    cost = record.get("cost") or {}
    return {
        "cell_id": record["cell_id"], "method": record["method"], "dataset": record["dataset"],
        "fraction": record["fraction"], "seed": record["seed"], "status": record["status"],
        "error": record.get("error", ""), **{m: metrics.get(m) for m in METRICS},
        "pretrain_s": cost.get("pretrain_s"), "finetune_s": cost.get("finetune_s"),
        "pretrain_images_per_s": cost.get("pretrain_images_per_s"),
        "finetune_images_per_s": cost.get("finetune_images_per_s"),
        "precision_mode": record.get("numerics", record.get("precision")),  # older records: "precision"
        "device": record.get("device"), **{k: record.get(k) for k in RECORD_COLUMNS},
    }


def _comparable(spec: dict[str, Any]) -> dict[str, Any]:
    """The fields that make a spec's results; absent ones (older folders) count as their defaults."""
    from bench.spec import BenchmarkSpec

    defaults = json.loads(json.dumps(BenchmarkSpec().to_dict(), default=str))
    out = {**defaults, **spec}
    for key in ("pretrain", "finetune"):
        if isinstance(out[key], dict):
            out[key] = {**defaults[key], **out[key]}
    return {k: v for k, v in out.items() if k not in SPEC_IGNORED}


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = _comparable(old), _comparable(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)) or ["details"]
