"""The runner's data (docs/architecture.md): each dataset, pool and test set loaded once per size for
the whole run (decoded files come from the on-disk cache); the time spent counts as the ``data`` phase.

A grid block is a ``DatasetEntry``: one dataset trained and tested on its own split, or, for the
generalisation protocol (``train`` + ``test`` in the spec), a pooled entry (``bench.grid.pooled_entry``)
whose "dataset" is the pooled training images (all ``train``) and whose test sets are scored
separately (``test_sets``).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import datasets
from bench.grid import POOLED, is_pooled
from bench.spec import BenchmarkSpec, DatasetEntry


class Phases:
    """Wall-clock seconds per phase of a run, for run.json and the summary line."""

    NAMES = ("data", "pretrain", "finetune", "evaluate", "report")

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(self.NAMES, 0.0)

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] += max(0.0, seconds)

    @contextlib.contextmanager
    def timing(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - start)


def dataset_label(entry: DatasetEntry) -> str:
    """Short dataset name for tables: the registry name, the folder name of LAYOUT:PATH / PATH, or the
    training sets of the generalisation protocol joined by "+"."""
    ref = entry.ref
    if is_pooled(entry):
        return "+".join(dataset_label(DatasetEntry(r)) for r in json.loads(ref[len(POOLED):])["train"])
    if ":" in ref and not Path(ref).exists():
        ref = ref.split(":", 1)[1]
    return Path(ref).name or ref


class DataCache:
    """Datasets, pools and test sets of one spec, loaded once per (entry, size)."""

    def __init__(self, spec: BenchmarkSpec, cache_dir: Path | None, phases: Phases | None = None):
        self.spec = spec
        self.cache_dir = cache_dir
        self.phases = phases or Phases()
        self._data: dict[tuple, Any] = {}

    def dataset(self, entry: DatasetEntry, size: int) -> datasets.SegmentationData:
        """The entry's images, masks and split (for a pooled entry: the pooled training images)."""
        key = ("data", entry.ref, entry.n, size)
        if key not in self._data:
            with self.phases.timing("data"):
                if is_pooled(entry):
                    refs = json.loads(entry.ref[len(POOLED):])
                    pool, tests = datasets.load_parts(refs["train"], refs["test"], size, self.cache_dir,
                                                      split_seed=self.spec.split_seed, n=entry.n)
                    self._data[key], self._data[("tests", entry.ref, entry.n, size)] = pool, tests
                else:
                    self._data[key] = datasets.load_dataset(entry.ref, size, self.cache_dir, n=entry.n,
                                                            split_seed=self.spec.split_seed)
        return self._data[key]

    def test_sets(self, entry: DatasetEntry, size: int) -> dict[str, datasets.TestSet]:
        """The generalisation protocol's test sets by name (empty for an ordinary dataset)."""
        if not is_pooled(entry):
            return {}
        self.dataset(entry, size)
        return self._data[("tests", entry.ref, entry.n, size)]

    def pool(self, entry: DatasetEntry, size: int) -> torch.Tensor:
        """Pretraining images: a named unlabelled folder, or the entry's training images (labels unused)."""
        key = ("pool", entry.pool, entry.ref, entry.n, size)
        if key not in self._data:
            if entry.pool == "self":
                data = self.dataset(entry, size)
                images = data.images[data.train]
            else:
                with self.phases.timing("data"):
                    images = datasets.load_pool(entry.pool, size, self.cache_dir)
            self._data[key] = torch.from_numpy(np.ascontiguousarray(images))
        return self._data[key]

    def labelled(self, entry: DatasetEntry, size: int, fraction: float, seed: int) -> np.ndarray:
        """Indices of the labelled subset (``fraction`` of the training images, drawn with ``seed``)."""
        return datasets.label_fraction(self.dataset(entry, size).train, fraction, seed)
