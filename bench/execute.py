"""Executors: run a grid's pretrain jobs and finetune cells, in dependency order, writing one record
per finished cell. A job or cell that fails is recorded with its reason and the run goes on; the
caller exits non-zero at the end.

Under ``torchrun`` (``bench.distributed``) ``run_benchmark`` runs on every rank: each pretrain job is
trained by all ranks together (DDP; rank 0 writes its files), then the finetune cells are split over
the ranks (cell i on rank i % world), and rank 0 writes results.csv and run.json. There, only the
failures that strike every rank alike (a non-finite global loss, a ``BenchError``) are recorded
as a failed job; any other error in a pretraining ends the run (torchrun stops every process;
rerun the command to resume), because the other ranks are left waiting in a collective.
"""

from __future__ import annotations

import contextlib
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import datasets, distributed
from bench.errors import BenchError
from bench.grid import FinetuneCell, Grid, PretrainJob, build_grid
from bench.models import imagenet_weights_available
from bench.protocol import LabelledBatchSource, NonFiniteLoss, environment, finetune, pretrain, resolve_precision
from bench.spec import BenchmarkSpec, DatasetEntry
from bench.store import Store, save_tensors, write_atomic, write_json


@dataclass
class RunSummary:
    out: Path
    grid: Grid
    ran: int = 0
    reused: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (what, reason)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures


class Reporter:
    """What the executor tells the user; the CLI implements it with rich, tests with nothing."""

    def start(self, total_steps: int) -> None: ...
    def task(self, description: str, steps: int) -> None: ...
    def advance(self, steps: int = 1) -> None: ...
    def skip(self, steps: int) -> None: ...
    def message(self, text: str) -> None: ...
    def stop(self) -> None: ...


class DataCache:
    """Datasets and pools loaded once per (ref, size) for the whole run (decoded files come from the
    on-disk cache)."""

    def __init__(self, spec: BenchmarkSpec, cache_dir: Path | None):
        self.spec = spec
        self.cache_dir = cache_dir
        self._data: dict[tuple, Any] = {}

    def dataset(self, entry: DatasetEntry, size: int) -> datasets.SegmentationData:
        key = ("data", entry.ref, entry.n, size)
        if key not in self._data:
            self._data[key] = datasets.load_dataset(entry.ref, size, self.cache_dir, n=entry.n,
                                                    split_seed=self.spec.split_seed)
        return self._data[key]

    def pool(self, entry: DatasetEntry, size: int) -> torch.Tensor:
        """Pretraining images: a named unlabelled folder, or the dataset's training split (labels unused)."""
        key = ("pool", entry.pool, entry.ref, entry.n, size)
        if key not in self._data:
            if entry.pool == "self":
                data = self.dataset(entry, size)
                images = data.images[data.train]
            else:
                images = datasets.load_pool(entry.pool, size, self.cache_dir)
            self._data[key] = torch.from_numpy(np.ascontiguousarray(images))
        return self._data[key]

    def labelled(self, entry: DatasetEntry, size: int, fraction: float, seed: int) -> np.ndarray:
        data = self.dataset(entry, size)
        return datasets.label_fraction(data.train, fraction, seed)


def baseline_skips(spec: BenchmarkSpec) -> dict[str, str]:
    """Methods that cannot run here, with the reason (the summary says so)."""
    skips = {}
    if any(m.split(":")[0].split("+")[0].strip() == "imagenet" for m in spec.methods) or spec.init == "imagenet":
        ok, why = imagenet_weights_available(spec.backbone)
        if not ok:
            if spec.init == "imagenet":
                raise BenchError(f"init imagenet: {why}; use --init scratch or put the weights in the hub cache")
            skips["imagenet"] = why
    return skips


class Runner:
    """Runs single pretrain jobs and finetune cells of one spec into one store; the executors (this
    process, a process pool, SLURM) call it per item, so every path computes the same records."""

    def __init__(self, spec: BenchmarkSpec, out: Path, device: torch.device, reporter: Reporter | None = None,
                 cache_dir: Path | None = None):
        self.spec = spec
        self.store = Store(out)
        self.device = device
        self.precision = resolve_precision(spec.precision, device)
        self.data = DataCache(spec, cache_dir)
        self.reporter = reporter or Reporter()
        self.env = environment()
        self.failures: list[tuple[str, str]] = []
        self.ran = 0
        self.reused = 0

    def job_steps(self, job: PretrainJob) -> int:
        if job.method.cls.trains_on_labelled and job.labels:
            n = len(self.data.labelled(job.dataset, self.spec.pretrain.size, *job.labels))
        else:
            n = len(self.data.pool(job.dataset, self.spec.pretrain.size))
        return self.spec.pretrain.num_steps(n)

    def cell_steps(self, cell: FinetuneCell) -> int:
        chosen = self.data.labelled(cell.dataset, self.spec.finetune.size, cell.fraction, cell.seed)
        return self.spec.finetune.num_steps(len(chosen))

    def ensure_job(self, job: PretrainJob | None) -> str | None:
        """Run a pretrain job unless its checkpoint exists; return the failure reason, if any.

        Under torchrun every rank calls this for every job and they train it together; rank 0 decides
        whether it exists, writes its files and counts it, the others wait until the files are there.
        """
        if job is None:
            return None
        steps = self.job_steps(job)
        main = distributed.is_main()
        if distributed.broadcast_object(self.store.job_done(job.id)):
            self.reporter.skip(steps)
            if main:
                self.reused += 1
            return None
        self.reporter.task(f"pretrain {job.method.label} on {job.pool}", steps)
        spec = self.spec
        try:
            with self.store.running(job.id) if main else contextlib.nullcontext():
                result = pretrain(job.method, self.data.pool(job.dataset, spec.pretrain.size), spec.pretrain,
                                  spec.backbone, spec.init, job.seed, self.device, self.precision,
                                  self._labelled(job), progress=self.reporter.advance, compile_model=spec.compile)
        except _recorded_errors() as err:
            reason = _reason(err)
            if main:
                self.store.mark_job(job.id, job.config, error=reason)
                self.failures.append((f"pretrain {job.method.label} ({job.id})", reason))
            self.reporter.message(f"[red]pretrain {job.method.label} failed:[/red] {reason}")
            distributed.barrier()
            return reason
        if main:
            save_tensors(self.store.checkpoint(job.id), result.state)
            write_atomic(self.store.job_dir(job.id) / "log.csv", _csv(result.log))
            cost = {"seconds": result.seconds, "steps": result.steps, "images_per_s": result.images_per_s,
                    "precision": self.precision, "device": str(self.device)}
            if distributed.active():
                cost["processes"] = distributed.world_size()
            self.store.mark_job(job.id, {**job.config, "result": cost, **self.env})
            self.ran += 1
        distributed.barrier()
        return None

    def _labelled(self, job: PretrainJob) -> LabelledBatchSource | None:
        if job.labels is None:
            return None
        size = self.spec.pretrain.size
        chosen = self.data.labelled(job.dataset, size, *job.labels)
        ds = self.data.dataset(job.dataset, size)
        return LabelledBatchSource(torch.from_numpy(ds.images[chosen]),
                                   torch.from_numpy(ds.masks[chosen]).unsqueeze(1))

    def run_cell(self, cell: FinetuneCell, job_error: str | None = None) -> None:
        steps = self.cell_steps(cell)
        if self.store.cell_done(cell.id):
            self.reporter.skip(steps)
            self.reused += 1
            return
        base = self._record_base(cell)
        if job_error is None and cell.pretrain_id and not self.store.job_done(cell.pretrain_id):
            job_error = self.store.job_failure(cell.pretrain_id) or "its checkpoint is missing"
        if job_error is not None:
            reason = f"pretraining failed: {job_error}"
            self.store.write_cell(cell.id, {**base, "status": "failed", "error": reason})
            self.reporter.skip(steps)
            self.failures.append((f"cell {cell.id}", reason))
            return
        self.reporter.task(f"finetune {cell.label} on {cell.dataset.ref} @ {cell.fraction:g}, "
                           f"seed {cell.seed}", steps)
        spec = self.spec
        ds = self.data.dataset(cell.dataset, spec.finetune.size)
        chosen = self.data.labelled(cell.dataset, spec.finetune.size, cell.fraction, cell.seed)
        init = str(self.store.checkpoint(cell.pretrain_id)) if cell.pretrain_id else cell.config["init"]
        try:
            with self.store.running(cell.id):
                result = finetune(init, spec.backbone, ds.images, ds.masks, chosen, ds.test, ds.ids, spec.finetune,
                                  cell.seed, self.device, self.precision, progress=self.reporter.advance,
                                  regulariser=_finetune_regulariser(spec), compile_model=spec.compile)
        except (NonFiniteLoss, BenchError, RuntimeError, ValueError) as err:
            reason = _reason(err)
            self.store.write_cell(cell.id, {**base, "status": "failed", "error": reason})
            self.failures.append((f"cell {cell.id}", reason))
            self.reporter.message(f"[red]finetune {cell.label} failed:[/red] {reason}")
            return
        self.store.write_cell(cell.id, {
            **base, "status": "ok",
            "metrics": result.metrics, "per_image": result.per_image, "test_ids": result.test_ids,
            "cost": {"finetune_s": result.seconds, "finetune_images_per_s": result.images_per_s,
                     "finetune_steps": result.steps, "peak_memory_mb": result.peak_memory_mb,
                     **_job_cost(self.store, cell.pretrain_id)},
            "final_loss": result.final_loss,
        })
        self.ran += 1

    def _record_base(self, cell: FinetuneCell) -> dict[str, Any]:
        size = self.spec.finetune.size
        ds = self.data.dataset(cell.dataset, size)
        chosen = self.data.labelled(cell.dataset, size, cell.fraction, cell.seed)
        return {
            "cell_id": cell.id, "method": cell.label, "dataset": dataset_label(cell.dataset),
            "fraction": cell.fraction, "seed": cell.seed, "pretrain_id": cell.pretrain_id,
            "config": cell.config, "precision": self.precision, "device": str(self.device),
            "compiled": self.spec.compile,
            "split": {"kind": ds.split, "train_hash": datasets.split_hash(ds.train),
                      "test_hash": datasets.split_hash(ds.test), "n_train": len(ds.train),
                      "n_test": len(ds.test)},
            "labelled": {"n": len(chosen), "hash": datasets.split_hash(chosen),
                         "ids": [ds.ids[i] for i in chosen]},
            "data_fingerprint": ds.fingerprint, **self.env,
            **({"process": {"rank": distributed.rank(), "world_size": distributed.world_size()}}
               if distributed.active() else {}),
        }

    def finish(self, grid: Grid, notes: list[str]) -> None:
        """Derive results.csv and run.json from the records (also after an interruption)."""
        self.store.write_results([c.id for c in grid.cells])
        missing = [c.id for c in grid.cells if self.store.cell_record(c.id) is None]
        write_json(self.store.root / "run.json", {
            **self.env, "spec": self.spec.to_dict(), "precision": self.precision, "device": str(self.device),
            "notes": notes, "failures": [list(f) for f in self.failures], "missing": missing})


def dataset_label(entry: DatasetEntry) -> str:
    """Short dataset name for tables: the registry name, or the folder name of LAYOUT:PATH / PATH."""
    ref = entry.ref
    if ":" in ref and not Path(ref).exists():
        ref = ref.split(":", 1)[1]
    return Path(ref).name or ref


def prepare(spec: BenchmarkSpec, out: Path, device: torch.device, reporter: Reporter | None = None,
            force_new: bool = False, cache_dir: Path | None = None) -> tuple[Grid, Runner, dict[str, int]]:
    """Build the grid, load (and so check) every dataset, then bind the output folder to the spec:
    bad input fails before anything is written."""
    grid = build_grid(spec, baseline_skips(spec))
    runner = Runner(spec, out, device, reporter, cache_dir)
    steps = {**{j.id: runner.job_steps(j) for j in grid.jobs}, **{c.id: runner.cell_steps(c) for c in grid.cells}}
    if not distributed.active():
        Store(out).claim(spec.to_dict(), force_new=force_new)
        return grid, runner, steps
    error = None
    if distributed.is_main():  # one rank binds the folder; all learn whether it could
        try:
            Store(out).claim(spec.to_dict(), force_new=force_new)
        except BenchError as err:
            error = str(err)
    error = distributed.broadcast_object(error)
    if error is not None:
        raise BenchError(error)
    return grid, runner, steps


def run_benchmark(spec: BenchmarkSpec, out: Path, device: torch.device, reporter: Reporter | None = None,
                  force_new: bool = False, cache_dir: Path | None = None) -> RunSummary:
    """Run (or resume) every pretrain job and finetune cell of ``spec`` into ``out``, sequentially,
    each job followed by the cells that use its checkpoint. Under torchrun: ``run_distributed``."""
    grid, runner, steps = prepare(spec, out, device, reporter, force_new, cache_dir)
    summary = RunSummary(out, grid, notes=[f"{m} left out: {why}" for m, why in grid.left_out])
    if distributed.active():
        return run_distributed(grid, runner, steps, summary)
    start = time.perf_counter()
    runner.reporter.start(sum(steps.values()))
    try:
        for job in [None, *grid.jobs]:
            job_error = runner.ensure_job(job)
            for cell in grid.cells_of(None if job is None else job.id):
                runner.run_cell(cell, job_error)
    finally:
        runner.reporter.stop()
        runner.finish(grid, summary.notes)
        summary.seconds = time.perf_counter() - start
        summary.ran, summary.reused, summary.failures = runner.ran, runner.reused, runner.failures
    return summary


def run_distributed(grid: Grid, runner: Runner, steps: dict[str, int], summary: RunSummary) -> RunSummary:
    """Every rank: the pretrain jobs together (DDP), then cell i on rank i % world; after every rank's
    cells are done, rank 0 writes results.csv and run.json with the failures of all ranks."""
    rank, world = distributed.rank(), distributed.world_size()
    mine = [cell for i, cell in enumerate(grid.cells) if i % world == rank]
    start = time.perf_counter()
    runner.reporter.start(sum(steps[j.id] for j in grid.jobs) + sum(steps[c.id] for c in mine))
    try:
        job_errors = {job.id: runner.ensure_job(job) for job in grid.jobs}
        for cell in mine:
            runner.run_cell(cell, job_errors.get(cell.pretrain_id))
    except BaseException:
        runner.reporter.stop()
        if distributed.is_main():  # derived tables from the records on disk, as far as they go
            runner.finish(grid, summary.notes)
        raise
    runner.reporter.stop()
    parts = distributed.gather_objects((runner.failures, runner.ran, runner.reused))  # waits for all cells
    runner.failures = [failure for part in parts for failure in part[0]]
    summary.failures = runner.failures
    summary.ran, summary.reused = sum(part[1] for part in parts), sum(part[2] for part in parts)
    if distributed.is_main():
        runner.finish(grid, summary.notes)
    distributed.barrier()  # results.csv and run.json exist when any rank returns
    summary.seconds = time.perf_counter() - start
    return summary


def _recorded_errors() -> tuple[type[BaseException], ...]:
    """Pretraining errors recorded as a failed job (module docstring: fewer under torchrun)."""
    if distributed.active():
        return NonFiniteLoss, BenchError
    return NonFiniteLoss, BenchError, RuntimeError, ValueError


def _job_cost(store: Store, job_id: str | None) -> dict[str, Any]:
    if job_id is None:
        return {"pretrain_s": 0.0, "pretrain_images_per_s": None}
    result = _read_job_result(store, job_id)
    return {"pretrain_s": result.get("seconds"), "pretrain_images_per_s": result.get("images_per_s")}


def _read_job_result(store: Store, job_id: str) -> dict[str, Any]:
    from bench.store import read_json

    path = store.job_dir(job_id) / "config.json"
    return read_json(path).get("result", {}) if path.is_file() else {}


def _finetune_regulariser(spec: BenchmarkSpec) -> Callable | None:
    if spec.finetune.reg != "disp":
        return None
    from bench.methods.dispersive import finetune_regulariser

    return finetune_regulariser(spec.finetune)


def _reason(err: BaseException) -> str:
    if isinstance(err, (NonFiniteLoss, BenchError)):
        return str(err)
    frame = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
    where = f" ({Path(frame.filename).name}:{frame.lineno})" if frame else ""
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}{where}"


def _csv(rows: list[dict[str, float]]) -> str:
    if not rows:
        return ""
    keys = sorted({k for row in rows for k in row}, key=lambda k: (k != "step", k))
    lines = [",".join(keys)] + [",".join(f"{row.get(k, '')}" for k in keys) for row in rows]
    return "\n".join(lines) + "\n"


def grid_status(out: Path) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """Per method: cells done / running / failed / pending; and the pretrain jobs' states."""
    from bench.spec import spec_from_dict
    from bench.store import read_json

    path = Path(out) / "spec.json"
    if not path.is_file():
        raise BenchError(f"{out} is not a run folder (no spec.json); pass the --out folder of a bench run")
    spec = spec_from_dict(read_json(path), where=str(path))
    grid = build_grid(spec)
    store = Store(out)
    running = store.in_flight()
    rows: dict[str, dict[str, int]] = {}
    for cell in grid.cells:
        record = store.cell_record(cell.id)
        state = ("done" if record and record.get("status") == "ok" else "failed" if record
                 else "running" if cell.id in running else "pending")
        counts = rows.setdefault(cell.label, {"done": 0, "running": 0, "failed": 0, "pending": 0})
        counts[state] += 1
    jobs = {"done": 0, "running": 0, "failed": 0, "pending": 0}
    for job in grid.jobs:
        state = ("done" if store.job_done(job.id) else "failed" if store.job_failure(job.id)
                 else "running" if job.id in running else "pending")
        jobs[state] += 1
    return rows, jobs


# --- beyond one process ---------------------------------------------------------------------------

def run_item(spec_dict: dict[str, Any], out: str, kind: str, item_id: str, device: str,
             threads: int | None = None) -> list[tuple[str, str]]:
    """Run one pretrain job or finetune cell in a fresh process (pool worker or SLURM task); return
    its failures. The grid is rebuilt from the spec, so every executor computes the same records."""
    from bench.protocol import resolve_device
    from bench.spec import spec_from_dict

    if threads:
        torch.set_num_threads(threads)
    spec = spec_from_dict(spec_dict)
    grid = build_grid(spec, baseline_skips(spec))
    runner = Runner(spec, Path(out), resolve_device(device))
    if kind == "job":
        runner.ensure_job(next(j for j in grid.jobs if j.id == item_id))
    else:
        runner.run_cell(next(c for c in grid.cells if c.id == item_id))
    return runner.failures


def _pending(grid: Grid, store: Store) -> tuple[list[PretrainJob], list[FinetuneCell]]:
    jobs = [j for j in grid.jobs if not store.job_done(j.id)]
    cells = [c for c in grid.cells if not store.cell_done(c.id)]
    return jobs, cells


def run_parallel(spec: BenchmarkSpec, out: Path, device: torch.device, workers: int,
                 reporter: Reporter | None = None, force_new: bool = False) -> RunSummary:
    """``--workers N``: independent jobs and cells in N processes; a cell starts once its checkpoint
    exists. Each item is seeded by its own config, so the records equal a sequential run's."""
    import concurrent.futures as cf
    import multiprocessing as mp
    import os

    grid, runner, steps = prepare(spec, out, device, reporter, force_new)
    store = runner.store
    summary = RunSummary(out, grid, notes=[f"{m} left out: {why}" for m, why in grid.left_out])
    jobs, cells = _pending(grid, store)
    summary.reused = len(grid.jobs) + len(grid.cells) - len(jobs) - len(cells)
    runner.reporter.start(sum(steps.values()))
    runner.reporter.skip(sum(steps.values()) - sum(steps[i.id] for i in [*jobs, *cells]))
    threads = max(1, (os.cpu_count() or 1) // workers)
    args = (spec.to_dict(), str(out))
    start = time.perf_counter()
    try:
        with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            def submit(kind: str, item) -> cf.Future:
                future = pool.submit(run_item, *args, kind, item.id, str(device), threads)
                future.item = item  # type: ignore[attr-defined]
                return future

            waiting = {j.id: [c for c in cells if c.pretrain_id == j.id] for j in jobs}
            futures = {submit("job", j) for j in jobs}
            futures |= {submit("cell", c) for c in cells if c.pretrain_id not in waiting}
            while futures:
                done, futures = cf.wait(futures, return_when=cf.FIRST_COMPLETED)
                for future in done:
                    item = future.item  # type: ignore[attr-defined]
                    summary.failures.extend(future.result())
                    summary.ran += 1
                    runner.reporter.advance(steps[item.id])
                    futures |= {submit("cell", c) for c in waiting.pop(item.id, [])}
    finally:
        runner.reporter.stop()
        runner.failures = summary.failures
        runner.finish(grid, summary.notes)
        summary.seconds = time.perf_counter() - start
    return summary


def run_submitit(spec: BenchmarkSpec, out: Path, device: str, cluster: str | None = None,
                 parameters: dict[str, Any] | None = None, force_new: bool = False) -> RunSummary:
    """``--executor slurm``: pretrain jobs as one array, then the cells as a second array that depends
    on them (``afterany``: a failed job's cells record the failure themselves). ``cluster="local"``
    runs the same path with submitit's local executor (tests), waiting instead of SLURM dependencies."""
    try:
        import submitit
    except ImportError:
        raise BenchError("--executor slurm needs submitit: pip install -e '.[slurm]'") from None
    grid, runner, _ = prepare(spec, out, torch.device("cpu"), None, force_new)
    store = runner.store
    jobs, cells = _pending(grid, store)
    summary = RunSummary(out, grid, notes=[f"{m} left out: {why}" for m, why in grid.left_out])
    summary.reused = len(grid.jobs) + len(grid.cells) - len(jobs) - len(cells)
    executor = submitit.AutoExecutor(folder=Path(out) / "submitit", cluster=cluster)
    executor.update_parameters(**(parameters or {}))
    args = (spec.to_dict(), str(out))
    start = time.perf_counter()
    job_tasks = _submit_array(executor, [(*args, "job", j.id, device) for j in jobs])
    if cluster == "local":
        for task in job_tasks:
            summary.failures.extend(_task_failures(task))
    elif job_tasks:
        ids = ":".join(str(t.job_id) for t in job_tasks)
        executor.update_parameters(slurm_additional_parameters={"dependency": f"afterany:{ids}"})
    cell_tasks = _submit_array(executor, [(*args, "cell", c.id, device) for c in cells])
    if cluster == "local":
        for task in cell_tasks:
            summary.failures.extend(_task_failures(task))
        runner.failures = summary.failures
        runner.finish(grid, summary.notes)
    else:
        summary.notes.append(f"submitted {len(job_tasks)} pretrain job(s) and {len(cell_tasks)} cell(s); "
                             f"watch them with: bench status {out}")
    summary.ran = len(job_tasks) + len(cell_tasks)
    summary.seconds = time.perf_counter() - start
    return summary


def _task_failures(task) -> list[tuple[str, str]]:
    """A submitit task's failures; a task that crashed outright counts as one failure."""
    try:
        return task.result()
    except Exception as err:  # submitit wraps the worker's exception; keep its first line
        return [(f"submitit task {task.job_id}", str(err).strip().splitlines()[-1][:300])]


# --- feature diagnostics of a run's backbones --------------------------------------------------------

def diagnose_run(out: Path, seed: int = 0, max_pixels: int = 2000, max_images: int | None = 64,
                 cache_dir: Path | None = None) -> list[Path]:
    """``bench diagnose``: embed each dataset's test images with every pretrained backbone of the run
    (and the baselines) and write DiCoH's Tables 5–7 quantities and t-SNE plots to ``<out>/diagnostics``."""
    import shutil

    import pandas as pd

    from bench.models import create_backbone
    from bench.reports.diagnostics import run_diagnostics
    from bench.spec import spec_from_dict
    from bench.store import read_json

    path = Path(out) / "spec.json"
    if not path.is_file():
        raise BenchError(f"{out} is not a run folder (no spec.json); pass the --out folder of a bench run")
    spec = spec_from_dict(read_json(path), where=str(path))
    grid = build_grid(spec, baseline_skips(spec))
    store = Store(out)
    data = DataCache(spec, cache_dir)
    target = Path(out) / "diagnostics"
    frames, files = [], []
    for entry in spec.datasets:
        name = dataset_label(entry)
        backbones = {}
        for cell in grid.cells:
            if cell.dataset != entry or cell.label in backbones:
                continue
            if cell.pretrain_id is None:
                torch.manual_seed(seed)
                backbones[cell.label] = create_backbone(spec.backbone, cell.config["init"] == "imagenet")
            elif store.job_done(cell.pretrain_id):
                backbone = create_backbone(spec.backbone)
                state = torch.load(store.checkpoint(cell.pretrain_id), map_location="cpu", weights_only=True)
                backbone.load_state_dict(state["backbone"], strict=True)
                backbones[cell.label] = backbone
        if not backbones:
            continue
        folder = target / name
        frames.append(run_diagnostics(Path(out), {name: data.dataset(entry, spec.finetune.size)}, backbones,
                                      out_dir=folder, seed=seed, max_pixels=max_pixels, max_images=max_images))
        for png in folder.glob("*.png"):  # the report embeds the PNGs of diagnostics/
            files.append(target / f"{png.stem}_{name}.png")
            shutil.copyfile(png, files[-1])
    if not frames:
        raise BenchError(f"{out} has no finished pretraining and no baseline to diagnose; run bench run first")
    table = pd.concat(frames, ignore_index=True)
    write_atomic(target / "diagnostics.csv", table.to_csv(index=False))
    return [target / "diagnostics.csv", *files]


def _submit_array(executor, calls: list[tuple]) -> list:
    """One submitit array of ``run_item`` calls (nothing submitted for an empty list)."""
    if not calls:
        return []
    with executor.batch():
        return [executor.submit(run_item, *call) for call in calls]
