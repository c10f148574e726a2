"""Expand a spec into pretrain jobs and finetune cells (docs/architecture.md), each identified by a
short hash of its resolved config, so that changing any hyperparameter makes a new job or cell and a
rerun finds what already exists.

The grid is also the one place that reads a method's label flags (``reads_labels``,
``trains_on_labelled``, ``label_fraction``): a job carries the result as ``LabelUse``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.checkpoints import file_sha256
from bench.methods import MethodSpec, parse_method
from bench.methods.external import finetune_init
from bench.protocol import PROTOCOL_VERSION
from bench.spec import INITS, BenchmarkSpec, DatasetEntry, Schedule

POOLED = "pooled:"  # ref prefix of the generalisation protocol's block: pooled:{"train": [...], "test": [...]}


def config_hash(config: dict[str, Any]) -> str:
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def slug(text: str) -> str:
    """A file-name-safe short form of a label (job and cell ids start with it)."""
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", text).strip("_")[:60]


@dataclass(frozen=True)
class LabelUse:
    """Which labelled images a pretrain job sees, and how.

    ``fraction``/``seed``: the labelled subset of the dataset's training split (``fraction`` 1.0: all
    of it, whatever the seed). ``aligned``: the method trains on those images with their masks
    (Med-DisSeg stage I, the supervised control); otherwise it trains on the pool and receives
    batches of those masks as extra inputs (MeanFlow)."""

    fraction: float
    seed: int
    aligned: bool

    @property
    def all(self) -> bool:
        return self.fraction >= 1.0


@dataclass(frozen=True)
class PretrainJob:
    id: str
    method: MethodSpec
    pool: str  # pool reference: "self" pools are "self:<dataset ref>"
    dataset: DatasetEntry  # the dataset whose pool (or labels) it uses
    seed: int
    labels: LabelUse | None  # None: the job reads no label
    config: dict[str, Any]  # its identity (hashed into the id)
    backbone: str = "resnet18"
    init: str = "scratch"
    schedule: Schedule = field(default_factory=Schedule)


@dataclass(frozen=True)
class FinetuneCell:
    id: str
    method: MethodSpec
    dataset: DatasetEntry
    fraction: float
    seed: int
    pretrain_id: str | None
    config: dict[str, Any]  # its identity (hashed into the id)
    backbone: str = "resnet18"
    init: str | None = None  # without a pretrain job: scratch | imagenet | ckpt:... (the method's own)
    schedule: Schedule = field(default_factory=Schedule)
    eval: str = "native"  # native | resized
    reference: str | None = None  # "upper" for the supervised positive control
    keep_predictions: int = 0  # predicted test masks to keep (0 none, -1 all): not identity
    keep_model: bool = False  # keep the fine-tuned weights: not identity

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

    def notes(self) -> list[str]:
        """What the run summary says about methods left out."""
        return [f"{label} left out: {why}" for label, why in self.left_out]


def pooled_entry(spec: BenchmarkSpec) -> DatasetEntry:
    """The one grid block of the generalisation protocol (its ref names every train and test set)."""
    refs = {"train": [e.ref for e in spec.train], "test": [e.ref for e in spec.test]}
    return DatasetEntry(POOLED + json.dumps(refs, separators=(",", ":")), spec.train[0].n)


def is_pooled(entry: DatasetEntry) -> bool:
    return entry.ref.startswith(POOLED)


def dataset_key(entry: DatasetEntry, split_seed: int) -> dict[str, Any]:
    return {"ref": entry.ref, "n": entry.n, "split_seed": split_seed}


def pool_key(entry: DatasetEntry) -> str:
    return f"self:{entry.ref}" + (f"?n={entry.n}" if entry.n else "") if entry.pool == "self" else entry.pool


def init_identity(init: str) -> str:
    """A pretraining ``init`` as it enters a job's identity: ``scratch`` and ``imagenet`` by name, a
    checkpoint file by its content, ``sha256:<hex>`` (``bench.checkpoints.file_sha256``, the hash that
    identifies external encoders too).

    A changed file at the same path is a new job (and so are the cells fine-tuned from it). The path
    is left out on purpose: the weights a job starts from are the file's bytes, so the same file
    moved, renamed or copied elsewhere is the same job and a rerun reuses its checkpoint instead of
    pretraining again. The path stays in the spec (``spec.json``, ``run.json``) and in ``PretrainJob.init``,
    from which the job reads the file. (An external encoder's row, ``LABEL=ckpt:PATH``, keeps its path in
    its method config as well: that is the method's identity, not this one.)"""
    if init in INITS:
        return init
    return "sha256:" + file_sha256(Path(init).expanduser())


def label_use(method: MethodSpec, fraction: float, seed: int, pretrain_seed: int) -> LabelUse | None:
    """How a job of ``method`` for the cell (fraction, seed) sees labels (None: it reads none)."""
    cls = method.cls
    if not cls.reads_labels(method.cfg):
        return None
    fixed = cls.label_fraction
    if fixed is not None:  # the method's own share of the labels, the same for every cell
        return LabelUse(float(fixed), pretrain_seed, cls.trains_on_labelled)
    return LabelUse(fraction, seed, cls.trains_on_labelled)


def blocks(spec: BenchmarkSpec) -> tuple[DatasetEntry, ...]:
    """The datasets a grid trains on: each of ``datasets`` (its own split), or the one pooled block of
    the generalisation protocol."""
    return (pooled_entry(spec),) if spec.train else spec.datasets


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
        for entry in blocks(spec):
            for fraction in spec.fractions:
                for seed in spec.seeds:
                    job = _job_for(spec, method, entry, fraction, seed)
                    if job is not None:
                        job = jobs.setdefault(job.id, job)
                    for freeze in spec.finetune.protocols():  # the job is shared: it does not depend on freeze
                        cells.append(_cell(spec, method, entry, fraction, seed, job, freeze))
    return Grid(tuple(jobs.values()), tuple(cells), tuple(left_out))


def _job_for(spec: BenchmarkSpec, method: MethodSpec, entry: DatasetEntry, fraction: float,
             seed: int) -> PretrainJob | None:
    if not method.cls.pretrains:
        return None
    per_cell = method.cls.reads_labels(method.cfg) and method.cls.label_fraction is None
    pretrain_seed = seed if (spec.pretrain_per_seed or per_cell) else spec.pretrain_seed
    labels = label_use(method, fraction, seed, pretrain_seed)
    config = {
        "kind": "pretrain",
        "protocol": PROTOCOL_VERSION,
        "method": method.resolved(),
        "pool": pool_key(entry),
        "backbone": spec.backbone,
        "init": init_identity(spec.init),
        "schedule": spec.pretrain.identity("pretrain"),
        "seed": pretrain_seed,
        "labels": None if labels is None else {
            "dataset": dataset_key(entry, spec.split_seed), "fraction": labels.fraction,
            "seed": None if labels.all else labels.seed},
    }
    if entry.pool == "self":  # the pool is the dataset's training split, which depends on the split seed
        config["split"] = dataset_key(entry, spec.split_seed)
    job_id = f"{slug(method.label)}-{config_hash(config)}"
    return PretrainJob(job_id, method, pool_key(entry), entry, pretrain_seed, labels, config, spec.backbone,
                       spec.init, spec.pretrain)


def _cell(spec: BenchmarkSpec, method: MethodSpec, entry: DatasetEntry, fraction: float, seed: int,
          job: PretrainJob | None, freeze: str) -> FinetuneCell:
    """One finetune cell under one fine-tuning protocol (``freeze``: none | backbone): its schedule is the
    spec's with that one value, so a single-protocol spec's cells keep the ids they always had."""
    init = finetune_init(method, spec) if job is None else None
    schedule = dataclasses.replace(spec.finetune, freeze=freeze)
    config = {
        "kind": "finetune",
        "protocol": PROTOCOL_VERSION,
        "method": method.resolved(),
        "init": init if job is None else f"pretrain:{job.id}",
        "backbone": spec.backbone,
        "dataset": dataset_key(entry, spec.split_seed),
        "fraction": fraction,
        "seed": seed,
        "schedule": schedule.identity("finetune"),
        "eval": spec.eval,
    }
    where = "pooled" if is_pooled(entry) else entry.ref.split("/")[-1]
    name = slug(f"{method.label}_{where}_f{fraction:g}_s{seed}")
    return FinetuneCell(f"{name}-{config_hash(config)}", method, entry, fraction, seed,
                        None if job is None else job.id, config, spec.backbone, init, schedule, spec.eval,
                        method.cls.reference, spec.keep_predictions, spec.keep_models)
