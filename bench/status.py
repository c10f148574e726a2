"""A run folder seen from outside (docs/architecture.md): ``open_run`` reads the spec it belongs to
(``bench status``, ``bench diagnose``, ``bench export``), ``grid_status`` counts what is done, running,
failed and pending from the records and claims."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from bench.errors import BenchError
from bench.grid import Grid, build_grid
from bench.spec import BenchmarkSpec, spec_from_dict
from bench.store import Store

STATES = ("done", "running", "failed", "pending")


def open_run(out: Path, report: Callable[[str], None] | None = None) -> tuple[Store, BenchmarkSpec]:
    """The store of run folder ``out`` and the spec it was run with (checked without looking at this
    machine's datasets); a folder without a readable spec.json is a one-line error."""
    store = Store(out, report=report)
    raw = store.read_spec()
    if raw is None:
        raise BenchError(f"{out} is not a run folder (no readable spec.json); pass the --out folder of a bench run")
    return store, spec_from_dict(raw, where=str(Path(out) / "spec.json"), resources=False)


def grid_status(out: Path, report: Callable[[str], None] | None = None
                ) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """Per method: cells done / running / failed / pending; and the pretrain jobs' states. Records
    that fail validation count as pending (moved aside; ``report`` gets one line each)."""
    store, spec = open_run(out, report)
    return _count(build_grid(spec), store)


def _count(grid: Grid, store: Store) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    running = store.in_flight()
    rows: dict[str, dict[str, int]] = {}
    for cell in grid.cells:
        record = store.cell_record(cell.id)
        state = ("done" if record and record.get("status") == "ok" else "failed" if record
                 else "running" if cell.id in running else "pending")
        rows.setdefault(cell.label, dict.fromkeys(STATES, 0))[state] += 1
    jobs = dict.fromkeys(STATES, 0)
    for job in grid.jobs:
        state = ("done" if store.job_done(job.id) else "failed" if store.job_failure(job.id)
                 else "running" if job.id in running else "pending")
        jobs[state] += 1
    return rows, jobs
