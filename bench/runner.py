"""The runner: one pretrain job or one finetune cell at a time, into one run folder
(docs/architecture.md). The executors (``bench.executors``: this process, a process pool, SLURM,
torchrun) call it per item, so every path computes the same records.

For each item the runner loads the data (``DataCache``, once per dataset and size), hands it to the
protocol (``bench.protocol``) with the run's ``Runtime``, and gives the result to the ``Store``,
which writes every file. A job or cell that fails is recorded with its reason and the run goes on.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import datasets, distributed
from bench.datacache import DataCache, Phases, dataset_label
from bench.errors import BenchError
from bench.grid import FinetuneCell, Grid, LabelUse, PretrainJob, blocks, slug
from bench.models import imagenet_weights_available
from bench.protocol import (
    PROTOCOL_VERSION,
    FinetuneData,
    FinetuneResult,
    LabelledBatchSource,
    NonFiniteLoss,
    PretrainData,
    Scores,
    finetune,
    pretrain,
)
from bench.records import environment, log_csv, prediction_arrays, reason
from bench.runtime import Runtime
from bench.spec import BenchmarkSpec, DatasetEntry
from bench.store import Store

ELSEWHERE = "claimed by another process"  # ensure_job's answer for a job another process computes now
__all__ = ["DataCache", "Reporter", "RunSummary", "Runner", "baseline_skips", "dataset_label", "test_images"]


@dataclass
class RunSummary:
    out: Path
    grid: Grid
    ran: int = 0
    reused: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (what, reason)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase of this process

    @property
    def ok(self) -> bool:
        return not self.failures


class Reporter:
    """What the runner tells the user; the CLI implements it with rich, tests with nothing."""

    def start(self, total_steps: int) -> None: ...
    def task(self, description: str, steps: int) -> None: ...
    def advance(self, steps: int = 1) -> None: ...
    def skip(self, steps: int) -> None: ...
    def message(self, text: str) -> None: ...
    def stop(self) -> None: ...


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
    """Runs single pretrain jobs and finetune cells of one spec into one store."""

    def __init__(self, spec: BenchmarkSpec, out: Path, runtime: Runtime, reporter: Reporter | None = None,
                 cache_dir: Path | None = None):
        self.spec = spec
        self.runtime = runtime
        self.reporter = reporter or Reporter()
        self.store = Store(out, report=lambda line: self.reporter.message(f"[yellow]note:[/yellow] {line}"))
        self.phases = Phases()
        self.data = DataCache(spec, cache_dir, self.phases)
        self.env = environment()
        self.failures: list[tuple[str, str]] = []
        self.deferred: list[tuple[FinetuneCell, str | None]] = []  # cells another process held
        self.ran = 0
        self.reused = 0

    # --- sizes of the work --------------------------------------------------------------------
    def job_steps(self, job: PretrainJob) -> int:
        size = job.schedule.size
        if job.labels is not None and job.labels.aligned:
            n = len(self._labelled_indices(job.dataset, size, job.labels))
        else:
            n = len(self.data.pool(job.dataset, size))
        return job.schedule.num_steps(n)

    def cell_steps(self, cell: FinetuneCell) -> int:
        chosen = self.data.labelled(cell.dataset, cell.schedule.size, cell.fraction, cell.seed)
        return cell.schedule.num_steps(len(chosen))

    # --- pretraining ----------------------------------------------------------------------------
    def ensure_job(self, job: PretrainJob | None, wait: bool = False) -> str | None:
        """Run a pretrain job unless its checkpoint exists; return the failure reason, if any, or
        ``ELSEWHERE`` when another process holds the job (``wait``: wait for it, then reuse its result).

        Under torchrun every rank calls this for every job and they train it together; rank 0 claims
        it, decides whether it exists, writes its files and counts it, the others follow rank 0.
        """
        if job is None:
            return None
        main = distributed.is_main()
        while True:
            with self.store.claim(job.id) if main else contextlib.nullcontext(True) as mine:
                if distributed.broadcast_object(mine):
                    return self._ensure_job(job, main, reuse_failure=wait)
            if not wait:
                return ELSEWHERE
            if main:
                self.store.wait_released(job.id)
            distributed.barrier()

    def _ensure_job(self, job: PretrainJob, main: bool, reuse_failure: bool) -> str | None:
        steps = self.job_steps(job)
        if distributed.broadcast_object(self.store.job_done(job.id)):
            self.reporter.skip(steps)
            if main:
                self.reused += 1
            return None
        failure = distributed.broadcast_object(self.store.job_failure(job.id) if reuse_failure else None)
        if failure is not None:  # the process we waited for failed it: not retried in this run
            self.reporter.skip(steps)
            if main:
                self.failures.append((f"pretrain {job.method.label} ({job.id})", failure))
            return failure
        self.reporter.task(f"pretrain {job.method.label} on {job.pool}", steps)
        try:
            data = self._pretrain_data(job)
            with self.phases.timing("pretrain"):
                result = pretrain(job, data, self.runtime, self.reporter.advance)
        except _recorded_errors() as err:
            why = reason(err)
            if main:
                self.store.mark_job(job.id, job.config, error=why)
                self.failures.append((f"pretrain {job.method.label} ({job.id})", why))
            self.reporter.message(f"[red]pretrain {job.method.label} failed:[/red] {why}")
            distributed.barrier()
            return why
        if main:
            self.store.save_checkpoint(job.id, result.state)
            self.store.write_log(job.id, log_csv(result.log))
            cost = {"seconds": result.seconds, "steps": result.steps, "images_per_s": result.images_per_s,
                    "numerics": result.numerics, "device": str(self.runtime.device)}
            if distributed.active():
                cost["processes"] = distributed.world_size()
            self.store.mark_job(job.id, {**job.config, "result": cost, "protocol_version": PROTOCOL_VERSION,
                                         "runtime": self.runtime.provenance(), **self.env})
            self.ran += 1
        distributed.barrier()
        return None

    def _labelled_indices(self, entry: DatasetEntry, size: int, labels: LabelUse) -> np.ndarray:
        return self.data.labelled(entry, size, labels.fraction, labels.seed)

    def _pretrain_data(self, job: PretrainJob) -> PretrainData:
        size = job.schedule.size
        pool = self.data.pool(job.dataset, size)
        if job.labels is None:
            return PretrainData(pool)
        chosen = self._labelled_indices(job.dataset, size, job.labels)
        ds = self.data.dataset(job.dataset, size)
        return PretrainData(pool, LabelledBatchSource(torch.from_numpy(ds.images[chosen]),
                                                      torch.from_numpy(ds.masks[chosen]).unsqueeze(1)))

    # --- fine-tuning ----------------------------------------------------------------------------
    def run_cell(self, cell: FinetuneCell, job_error: str | None = None, wait: bool = False) -> None:
        """Run a cell unless its record exists; one that another process holds is deferred to
        ``self.deferred`` (``wait``: waited for, then its record reused)."""
        while True:
            with self.store.claim(cell.id) as mine:
                if mine:
                    return self._run_cell(cell, job_error, reuse_failure=wait)
            if not wait:
                self.deferred.append((cell, job_error))
                return
            self.store.wait_released(cell.id)

    def run_deferred(self, grid: Grid, jobs: list[PretrainJob]) -> None:
        """Second pass over what other processes held: wait for each, then reuse (or compute) it."""
        for job in jobs:
            job_error = self.ensure_job(job, wait=True)
            for cell in grid.cells_of(job.id):
                self.run_cell(cell, job_error, wait=True)
        deferred, self.deferred = self.deferred, []
        for cell, job_error in deferred:
            self.run_cell(cell, job_error, wait=True)

    def _run_cell(self, cell: FinetuneCell, job_error: str | None, reuse_failure: bool) -> None:
        steps = self.cell_steps(cell)
        if self._cell_done(cell.id):
            self.reporter.skip(steps)
            self.reused += 1
            return
        record = self.store.cell_record(cell.id) if reuse_failure else None
        if record is not None:  # the process we waited for failed it: not retried in this run
            self.reporter.skip(steps)
            self.failures.append((f"cell {cell.id}", record.get("error", "failed")))
            return
        base = self._record_base(cell)
        if job_error is None and cell.pretrain_id and not self.store.job_done(cell.pretrain_id):
            job_error = self.store.job_failure(cell.pretrain_id) or "its checkpoint is missing"
        if job_error is not None:
            self._cell_failed(cell, base, f"pretraining failed: {job_error}")
            self.reporter.skip(steps)
            return
        self.reporter.task(f"finetune {cell.label} on {cell.dataset.ref} @ {cell.fraction:g}, "
                           f"seed {cell.seed}", steps)
        try:
            data = self._finetune_data(cell)
            start = time.perf_counter()
            result = finetune(cell, data, self.runtime, self.reporter.advance)
            self.phases.add("finetune", time.perf_counter() - start - result.eval_seconds)
            self.phases.add("evaluate", result.eval_seconds)
        except (NonFiniteLoss, BenchError, RuntimeError, ValueError) as err:
            why = reason(err)
            self._cell_failed(cell, base, why)
            self.reporter.message(f"[red]finetune {cell.label} failed:[/red] {why}")
            return
        common = {"status": "ok", "numerics": result.numerics, "cost": self._cost(cell, result),
                  "final_loss": result.final_loss, "runtime": self.runtime.provenance()}
        if result.test_sets:
            self._write_test_sets(cell, {**base, **common}, result)
        else:
            own = Scores(result.metrics, result.per_image, result.test_ids, result.predictions)
            self.store.write_cell(cell.id, {**base, **common, **self._scores(cell.id, own),
                                            **self._kept_model(cell.id, result)})
        self.ran += 1

    def _cell_done(self, cell_id: str) -> bool:
        """The cell's record is ok, and so are the records of its test sets (generalisation protocol)."""
        if not self.store.cell_done(cell_id):
            return False
        parts = (self.store.cell_record(cell_id) or {}).get("test_sets") or {}
        return all(self.store.cell_done(part) for part in parts.values())

    def _write_test_sets(self, cell: FinetuneCell, base: dict[str, Any], result: FinetuneResult) -> None:
        """The generalisation protocol: one record (one row of results.csv) per test set, ``<cell-id>@<name>``,
        then the cell's own record, which names them."""
        tests = self.data.test_sets(cell.dataset, cell.schedule.size)
        parts = {}
        for name, scores in result.test_sets.items():
            part, test = f"{cell.id}@{slug(name)}", tests[name]
            empty = int((test.native.fractions() <= 0).sum())
            self.store.write_cell(part, {**base, **self._scores(part, scores), "cell_id": part, "test_set": name,
                                         "seen": bool(test.seen), "train_set": base["dataset"],
                                         "n_test": len(test.test), "n_test_empty_gt": empty})
            parts[name] = part
        self.store.write_cell(cell.id, {**base, "metrics": {}, "test_sets": parts, **self._kept_model(cell.id, result)})

    def _cell_failed(self, cell: FinetuneCell, base: dict[str, Any], why: str) -> None:
        self.store.write_cell(cell.id, {**base, "status": "failed", "error": why})
        self.failures.append((f"cell {cell.id}", why))

    def _finetune_data(self, cell: FinetuneCell) -> FinetuneData:
        size = cell.schedule.size
        ds = self.data.dataset(cell.dataset, size)
        chosen = self.data.labelled(cell.dataset, size, cell.fraction, cell.seed)
        init_state = self.store.load_checkpoint(cell.pretrain_id) if cell.pretrain_id else None
        tests = {name: FinetuneData(t.images, t.masks, t.ids, t.train, t.test, t.native)
                 for name, t in self.data.test_sets(cell.dataset, size).items()}
        return FinetuneData(ds.images, ds.masks, ds.ids, chosen, ds.test, ds.native, init_state, tests)

    def _scores(self, item_id: str, scores: Scores) -> dict[str, Any]:
        """A record's scores; the kept predictions go beside it (the record names the file)."""
        out: dict[str, Any] = {"metrics": scores.metrics, "per_image": scores.per_image, "test_ids": scores.test_ids}
        if scores.predictions:
            n = len(scores.predictions)
            arrays = prediction_arrays(scores.test_ids[:n], scores.predictions, scores.per_image["iou"][:n])
            out["predictions"] = self._relative(self.store.save_predictions(item_id, arrays))
        return out

    def _kept_model(self, item_id: str, result: FinetuneResult) -> dict[str, Any]:
        if result.state is None:
            return {}
        return {"model": self._relative(self.store.save_model(item_id, result.state))}

    def _relative(self, path: Path) -> str:
        with contextlib.suppress(ValueError):
            return str(Path(path).relative_to(self.store.root))
        return str(path)

    def _cost(self, cell: FinetuneCell, result: FinetuneResult) -> dict[str, Any]:
        job = (self.store.job_config(cell.pretrain_id) or {}).get("result", {}) if cell.pretrain_id else {}
        return {"finetune_s": result.seconds, "eval_s": result.eval_seconds,
                "finetune_images_per_s": result.images_per_s, "finetune_steps": result.steps,
                "peak_memory_mb": result.peak_memory_mb,
                "pretrain_s": job.get("seconds") if cell.pretrain_id else 0.0,
                "pretrain_images_per_s": job.get("images_per_s")}

    def _record_base(self, cell: FinetuneCell) -> dict[str, Any]:
        size = cell.schedule.size
        ds = self.data.dataset(cell.dataset, size)
        chosen = self.data.labelled(cell.dataset, size, cell.fraction, cell.seed)
        empty = int((ds.native.fractions()[ds.test] <= 0).sum()) if len(ds.test) else 0
        return {
            "cell_id": cell.id, "method": cell.label, "dataset": dataset_label(cell.dataset),
            "fraction": cell.fraction, "seed": cell.seed, "pretrain_id": cell.pretrain_id,
            "config": cell.config, "protocol_version": PROTOCOL_VERSION, "eval": cell.eval,
            "freeze": cell.schedule.freeze, "reference": cell.reference, "device": str(self.runtime.device),
            "compiled": self.runtime.compile, "n_test": len(ds.test), "n_test_empty_gt": empty,
            "split": {"kind": ds.split, "train_hash": datasets.split_hash(ds.train),
                      "test_hash": datasets.split_hash(ds.test), "n_train": len(ds.train),
                      "n_test": len(ds.test)},
            "labelled": {"n": len(chosen), "hash": datasets.split_hash(chosen),
                         "ids": [ds.ids[i] for i in chosen]},
            "data_fingerprint": ds.fingerprint, **self.env,
            **({"process": {"rank": distributed.rank(), "world_size": distributed.world_size()}}
               if distributed.active() else {}),
        }

    # --- the run's derived files ----------------------------------------------------------------
    def finish(self, grid: Grid, notes: list[str], phases: dict[str, float] | None = None) -> None:
        """Derive results.csv and run.json from the records (also after an interruption)."""
        rows, missing = [], []
        runtime = self.runtime.provenance()
        for cell in grid.cells:  # a generalisation cell has one row per test set
            record = self.store.cell_record(cell.id)
            if record is None:
                missing.append(cell.id)
            parts = (record or {}).get("test_sets")
            rows += list(parts.values()) if parts else [cell.id]
            # decisions taken in worker processes (--workers, SLURM) live in their cells' records
            runtime["precision_decisions"].update((record or {}).get("runtime", {}).get("precision_decisions", {}))
        self.store.write_results(rows)
        self.store.write_run({
            **self.env, "spec": self.spec.to_dict(), "protocol_version": PROTOCOL_VERSION,
            "runtime": runtime, "device": str(self.runtime.device),
            "phases_s": {k: round(v, 3) for k, v in (phases or self.phases.seconds).items()},
            "notes": notes, "failures": [list(f) for f in self.failures], "missing": missing})


def test_images(spec: BenchmarkSpec, cache_dir: Path | None = None
                ) -> Callable[[str], tuple[dict[str, np.ndarray] | None, dict[str, np.ndarray] | None]]:
    """For the report's predictions figure: a dataset's test images and ground truths by test id (at the
    resolution the cells were scored at), looked up by the dataset's label in the tables."""
    cache = DataCache(spec, cache_dir)
    entries = {dataset_label(entry): entry for entry in blocks(spec)}

    def lookup(label: str) -> tuple[dict[str, np.ndarray] | None, dict[str, np.ndarray] | None]:
        tests = cache.test_sets(entries[next(iter(entries))], spec.finetune.size) if spec.train else {}
        if label not in entries and label not in tests:
            return None, None
        ds = tests[label] if label in tests else cache.dataset(entries[label], spec.finetune.size)
        truth = ds.native_mask if spec.eval == "native" else (lambda i: ds.masks[i] > 0)
        return ({ds.ids[i]: ds.images[i] for i in ds.test}, {ds.ids[i]: truth(i) for i in ds.test})

    return lookup


def _recorded_errors() -> tuple[type[BaseException], ...]:
    """Pretraining errors recorded as a failed job. Under torchrun only those that strike every rank
    alike (a non-finite global loss, a ``BenchError``): any other error ends the run, because the other
    ranks are left waiting in a collective (rerun to resume)."""
    if distributed.active():
        return NonFiniteLoss, BenchError
    return NonFiniteLoss, BenchError, RuntimeError, ValueError
