"""Expand a spec into pretrain jobs and finetune cells (DESIGN.md §2), each identified by a short
hash of its resolved config, so that changing any hyperparameter makes a new job or cell and a rerun
finds what already exists."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from bench.methods import MethodSpec, parse_method
from bench.spec import BenchmarkSpec, DatasetEntry


def config_hash(config: dict[str, Any]) -> str:
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", text).strip("_")[:60]


@dataclass(frozen=True)
class PretrainJob:
    id: str
    method: MethodSpec
    pool: str  # pool reference: "self" pools are "self:<dataset ref>"
    dataset: DatasetEntry  # the dataset whose pool (or labels) it uses
    seed: int
    labels: tuple[float, int] | None  # (fraction, seed) for label-reading methods
    config: dict[str, Any]


@dataclass(frozen=True)
class FinetuneCell:
    id: str
    method: MethodSpec
    dataset: DatasetEntry
    fraction: float
    seed: int
    pretrain_id: str | None
    config: dict[str, Any]

    @property
    def label(self) -> str:
        return self.method.label


@dataclass(frozen=True)
class Grid:
    jobs: tuple[PretrainJob, ...]
    cells: tuple[FinetuneCell, ...]
    left_out: tuple[tuple[str, str], ...] = ()  # (method label, reason)

    def cells_of(self, job_id: str | None) -> list[FinetuneCell]:
        return [c for c in self.cells if c.pretrain_id == job_id]


def dataset_key(entry: DatasetEntry, split_seed: int) -> dict[str, Any]:
    return {"ref": entry.ref, "n": entry.n, "split_seed": split_seed}


def pool_key(entry: DatasetEntry) -> str:
    return f"self:{entry.ref}" + (f"?n={entry.n}" if entry.n else "") if entry.pool == "self" else entry.pool


def build_grid(spec: BenchmarkSpec, skip: dict[str, str] | None = None) -> Grid:
    """All pretrain jobs and finetune cells of ``spec``; ``skip`` maps method names to a reason to
    leave them out (e.g. imagenet weights not available offline)."""
    skip = skip or {}
    jobs: dict[str, PretrainJob] = {}
    cells: list[FinetuneCell] = []
    left_out: list[tuple[str, str]] = []
    for text in spec.methods:
        method = parse_method(text)
        if method.name in skip:
            left_out.append((method.label, skip[method.name]))
            continue
        for entry in spec.datasets:
            for fraction in spec.fractions:
                for seed in spec.seeds:
                    job = _job_for(spec, method, entry, fraction, seed)
                    if job is not None:
                        jobs.setdefault(job.id, job)
                    cells.append(_cell(spec, method, entry, fraction, seed, job))
    return Grid(tuple(jobs.values()), tuple(cells), tuple(left_out))


def _job_for(spec: BenchmarkSpec, method: MethodSpec, entry: DatasetEntry, fraction: float,
             seed: int) -> PretrainJob | None:
    if not method.cls.pretrains:
        return None
    labels = (fraction, seed) if method.cls.reads_labels(method.cfg) else None
    pretrain_seed = seed if (spec.pretrain_per_seed or labels) else spec.pretrain_seed
    config = {
        "kind": "pretrain",
        "method": method.resolved(),
        "pool": pool_key(entry),
        "backbone": spec.backbone,
        "init": spec.init,
        "schedule": dataclasses.asdict(spec.pretrain),
        "seed": pretrain_seed,
        "labels": None if labels is None else {"dataset": dataset_key(entry, spec.split_seed),
                                               "fraction": fraction, "seed": seed},
    }
    if entry.pool == "self":  # the pool is the dataset's training split, which depends on the split seed
        config["split"] = dataset_key(entry, spec.split_seed)
    job_id = f"{_slug(method.label)}-{config_hash(config)}"
    return PretrainJob(job_id, method, pool_key(entry), entry, pretrain_seed, labels, config)


def _cell(spec: BenchmarkSpec, method: MethodSpec, entry: DatasetEntry, fraction: float, seed: int,
          job: PretrainJob | None) -> FinetuneCell:
    init = getattr(method.cls, "init", None) if job is None else f"pretrain:{job.id}"
    config = {
        "kind": "finetune",
        "method": method.resolved(),
        "init": init,
        "backbone": spec.backbone,
        "dataset": dataset_key(entry, spec.split_seed),
        "fraction": fraction,
        "seed": seed,
        "schedule": dataclasses.asdict(spec.finetune),
    }
    slug = _slug(f"{method.label}_{entry.ref.split('/')[-1]}_f{fraction:g}_s{seed}")
    return FinetuneCell(f"{slug}-{config_hash(config)}", method, entry, fraction, seed,
                        None if job is None else job.id, config)
