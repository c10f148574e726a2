"""Executors: run a grid's pretrain jobs and finetune cells in dependency order through the runner
(docs/architecture.md): in this process (``run_benchmark``), in a pool of local processes
(``run_parallel``), as SLURM arrays (``run_submitit``), or on every rank under ``torchrun``
(``run_distributed``). Every path computes the same records; the caller exits non-zero at the end
when something failed.

Under ``torchrun`` (``bench.distributed``) each pretrain job is trained by all ranks together (DDP;
rank 0 writes its files), then the finetune cells are split over the ranks (cell i on rank
i % world), and rank 0 writes results.csv and run.json. There, only the failures that strike every
rank alike (a non-finite global loss, a ``BenchError``) are recorded as a failed job; any other
error in a pretraining ends the run (torchrun stops every process; rerun the command to resume),
because the other ranks are left waiting in a collective.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench import distributed
from bench.errors import BenchError
from bench.grid import FinetuneCell, Grid, PretrainJob, build_grid
from bench.runner import ELSEWHERE, Reporter, Runner, RunSummary, baseline_skips
from bench.runtime import Runtime, make_runtime
from bench.spec import BenchmarkSpec, spec_from_dict
from bench.store import Store


def prepare(spec: BenchmarkSpec, out: Path, runtime: Runtime, reporter: Reporter | None = None,
            force_new: bool = False, cache_dir: Path | None = None) -> tuple[Grid, Runner, dict[str, int]]:
    """Build the grid, load (and so check) every dataset, then bind the output folder to the spec:
    bad input fails before anything is written."""
    grid = build_grid(spec, baseline_skips(spec))
    runner = Runner(spec, out, runtime, reporter, cache_dir)
    steps = {**{j.id: runner.job_steps(j) for j in grid.jobs}, **{c.id: runner.cell_steps(c) for c in grid.cells}}
    if not distributed.active():
        runner.store.bind_spec(spec.to_dict(), force_new=force_new)
        return grid, runner, steps
    error = None
    if distributed.is_main():  # one rank binds the folder; all learn whether it could
        try:
            runner.store.bind_spec(spec.to_dict(), force_new=force_new)
        except BenchError as err:
            error = str(err)
    error = distributed.broadcast_object(error)
    if error is not None:
        raise BenchError(error)
    return grid, runner, steps


def run_benchmark(spec: BenchmarkSpec, out: Path, runtime: Runtime, reporter: Reporter | None = None,
                  force_new: bool = False, cache_dir: Path | None = None) -> RunSummary:
    """Run (or resume) every pretrain job and finetune cell of ``spec`` into ``out``, sequentially,
    each job followed by the cells that use its checkpoint. Under torchrun: ``run_distributed``."""
    start = time.perf_counter()
    grid, runner, steps = prepare(spec, out, runtime, reporter, force_new, cache_dir)
    summary = RunSummary(out, grid, notes=grid.notes())
    if distributed.active():
        return run_distributed(grid, runner, steps, summary, start)
    runner.reporter.start(sum(steps.values()))
    try:
        later = []  # jobs another process holds: after everything else
        for job in [None, *grid.jobs]:
            job_error = runner.ensure_job(job)
            if job_error == ELSEWHERE:
                later.append(job)
                continue
            for cell in grid.cells_of(None if job is None else job.id):
                runner.run_cell(cell, job_error)
        runner.run_deferred(grid, later)
    finally:
        runner.reporter.stop()
        runner.finish(grid, summary.notes)
        summary.seconds = time.perf_counter() - start
        summary.ran, summary.reused, summary.failures = runner.ran, runner.reused, runner.failures
        summary.phases = dict(runner.phases.seconds)
    return summary


def run_distributed(grid: Grid, runner: Runner, steps: dict[str, int], summary: RunSummary,
                    start: float) -> RunSummary:
    """Every rank: the pretrain jobs together (DDP), then cell i on rank i % world; after every rank's
    cells are done, rank 0 writes results.csv and run.json with the failures of all ranks."""
    rank, world = distributed.rank(), distributed.world_size()
    mine = [cell for i, cell in enumerate(grid.cells) if i % world == rank]
    runner.reporter.start(sum(steps[j.id] for j in grid.jobs) + sum(steps[c.id] for c in mine))
    try:
        job_errors = {job.id: runner.ensure_job(job, wait=True) for job in grid.jobs}
        for cell in mine:
            runner.run_cell(cell, job_errors.get(cell.pretrain_id), wait=True)
    except BaseException:
        runner.reporter.stop()
        if distributed.is_main():  # derived tables from the records on disk, as far as they go
            runner.finish(grid, summary.notes)
        raise
    runner.reporter.stop()
    parts = distributed.gather_objects((runner.failures, runner.ran, runner.reused, runner.phases.seconds))
    runner.failures = [failure for part in parts for failure in part[0]]
    summary.failures = runner.failures
    summary.ran, summary.reused = sum(part[1] for part in parts), sum(part[2] for part in parts)
    summary.phases = _sum_phases([part[3] for part in parts])
    if distributed.is_main():
        runner.finish(grid, summary.notes, summary.phases)
    distributed.barrier()  # results.csv and run.json exist when any rank returns
    summary.seconds = time.perf_counter() - start
    return summary


def _sum_phases(parts: list[dict[str, float]]) -> dict[str, float]:
    """Seconds per phase summed over processes (several processes: more than the wall-clock time)."""
    total: dict[str, float] = {}
    for part in parts:
        for phase, seconds in part.items():
            total[phase] = total.get(phase, 0.0) + seconds
    return total


# --- beyond one process ---------------------------------------------------------------------------

def run_item(spec_dict: dict[str, Any], out: str, kind: str, item_id: str, device: str,
             threads: int | None = None) -> tuple[list[tuple[str, str]], dict[str, float]]:
    """Run one pretrain job or finetune cell in a fresh process (pool worker or SLURM task); return
    its failures and seconds per phase. The grid is rebuilt from the spec, so every executor computes
    the same records."""
    spec = spec_from_dict(spec_dict)
    grid = build_grid(spec, baseline_skips(spec))
    runtime = make_runtime(device, spec.precision, spec.compile, threads)
    runner = Runner(spec, Path(out), runtime)
    if kind == "job":
        runner.ensure_job(next(j for j in grid.jobs if j.id == item_id), wait=True)
    else:
        runner.run_cell(next(c for c in grid.cells if c.id == item_id), wait=True)
    return runner.failures, dict(runner.phases.seconds)


def _pending(grid: Grid, store: Store) -> tuple[list[PretrainJob], list[FinetuneCell]]:
    jobs = [j for j in grid.jobs if not store.job_done(j.id)]
    cells = [c for c in grid.cells if not store.cell_done(c.id)]
    return jobs, cells


def run_parallel(spec: BenchmarkSpec, out: Path, runtime: Runtime, workers: int,
                 reporter: Reporter | None = None, force_new: bool = False) -> RunSummary:
    """``--workers N``: independent jobs and cells in N processes; a cell starts once its checkpoint
    exists. Each item is seeded by its own config, so the records equal a sequential run's.
    ``runtime.threads`` is each worker's thread count (``make_runtime(..., processes=N)``)."""
    import concurrent.futures as cf
    import multiprocessing as mp

    start = time.perf_counter()
    grid, runner, steps = prepare(spec, out, runtime, reporter, force_new)
    summary = RunSummary(out, grid, notes=grid.notes())
    jobs, cells = _pending(grid, runner.store)
    summary.reused = len(grid.jobs) + len(grid.cells) - len(jobs) - len(cells)
    runner.reporter.start(sum(steps.values()))
    runner.reporter.skip(sum(steps.values()) - sum(steps[i.id] for i in [*jobs, *cells]))
    args = (spec.to_dict(), str(out))
    parts = [dict(runner.phases.seconds)]
    try:
        with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            def submit(kind: str, item) -> cf.Future:
                future = pool.submit(run_item, *args, kind, item.id, str(runtime.device), runtime.threads)
                future.item = item  # type: ignore[attr-defined]
                return future

            waiting = {j.id: [c for c in cells if c.pretrain_id == j.id] for j in jobs}
            futures = {submit("job", j) for j in jobs}
            futures |= {submit("cell", c) for c in cells if c.pretrain_id not in waiting}
            while futures:
                done, futures = cf.wait(futures, return_when=cf.FIRST_COMPLETED)
                for future in done:
                    item = future.item  # type: ignore[attr-defined]
                    failures, phases = future.result()
                    summary.failures.extend(failures)
                    parts.append(phases)
                    summary.ran += 1
                    runner.reporter.advance(steps[item.id])
                    futures |= {submit("cell", c) for c in waiting.pop(item.id, [])}
    finally:
        runner.reporter.stop()
        runner.failures = summary.failures
        summary.phases = _sum_phases(parts)
        runner.finish(grid, summary.notes, summary.phases)
        summary.seconds = time.perf_counter() - start
    return summary


def run_submitit(spec: BenchmarkSpec, out: Path, runtime: Runtime, device: str, cluster: str | None = None,
                 parameters: dict[str, Any] | None = None, force_new: bool = False) -> RunSummary:
    """``--executor slurm``: pretrain jobs as one array, then the cells as a second array that depends
    on them (``afterany``: a failed job's cells record the failure themselves). ``cluster="local"``
    runs the same path with submitit's local executor (tests), waiting instead of SLURM dependencies.
    ``runtime``: this process's (it checks the data); ``device``: what each task resolves on its node."""
    try:
        import submitit
    except ImportError:
        raise BenchError("--executor slurm needs submitit: pip install -e '.[slurm]'") from None
    start = time.perf_counter()
    grid, runner, _ = prepare(spec, out, runtime, None, force_new)
    jobs, cells = _pending(grid, runner.store)
    summary = RunSummary(out, grid, notes=grid.notes())
    summary.reused = len(grid.jobs) + len(grid.cells) - len(jobs) - len(cells)
    executor = submitit.AutoExecutor(folder=Path(out) / "submitit", cluster=cluster)
    executor.update_parameters(**(parameters or {}))
    args = (spec.to_dict(), str(out))
    parts = [dict(runner.phases.seconds)]
    job_tasks = _submit_array(executor, [(*args, "job", j.id, device, spec.threads) for j in jobs])
    if cluster == "local":
        for task in job_tasks:
            _collect(task, summary, parts)
    elif job_tasks:
        ids = ":".join(str(t.job_id) for t in job_tasks)
        executor.update_parameters(slurm_additional_parameters={"dependency": f"afterany:{ids}"})
    cell_tasks = _submit_array(executor, [(*args, "cell", c.id, device, spec.threads) for c in cells])
    if cluster == "local":
        for task in cell_tasks:
            _collect(task, summary, parts)
        runner.failures = summary.failures
        summary.phases = _sum_phases(parts)
        runner.finish(grid, summary.notes, summary.phases)
    else:
        summary.notes.append(f"submitted {len(job_tasks)} pretrain job(s) and {len(cell_tasks)} cell(s); "
                             f"watch them with: bench status {out}")
    summary.ran = len(job_tasks) + len(cell_tasks)
    summary.seconds = time.perf_counter() - start
    return summary


def _collect(task, summary: RunSummary, parts: list[dict[str, float]]) -> None:
    """A submitit task's failures and phases; a task that crashed outright counts as one failure."""
    try:
        failures, phases = task.result()
    except Exception as err:  # submitit wraps the worker's exception; keep its last line
        summary.failures.append((f"submitit task {task.job_id}", str(err).strip().splitlines()[-1][:300]))
        return
    summary.failures.extend(failures)
    parts.append(phases)


def _submit_array(executor, calls: list[tuple]) -> list:
    """One submitit array of ``run_item`` calls (nothing submitted for an empty list)."""
    if not calls:
        return []
    with executor.batch():
        return [executor.submit(run_item, *call) for call in calls]


def record_phase(out: Path, phase: str, seconds: float) -> None:
    """Add ``seconds`` to ``phase`` in run.json's time breakdown (the CLI's report phase comes after
    the executors wrote it)."""
    store = Store(out)
    info = store.read_run()
    if info is None:
        return
    phases = info.setdefault("phases_s", {})
    phases[phase] = round(phases.get(phase, 0.0) + seconds, 3)
    store.write_run(info)
