"""Datasets: native-layout readers, synthetic generators, cache, splits, label fractions (docs/datasets.md).

A dataset reference (``ref``) is one of
- a registry name: ``synthetic-polyp``, ``synthetic-gland``, ``synthetic-skin``, ``synthetic-cell``
  (options: ``synthetic-polyp:seed=1,n=300``);
- ``LAYOUT:PATH``, e.g. ``kvasir-seg:/data/Kvasir-SEG`` (layouts: ``bench datasets``), or a bare ``PATH``;
- with ``#PART`` for a part of a layout made of parts (``pranet:/data/PraNet#Kvasir``) and
  ``?mask=RULE&split=FILE.csv&name=NAME&seen=yes`` options (``bench.datasets.refs``).

Modules: ``refs`` (parsing), ``layouts`` (one module per dataset family), ``decode`` (files →
arrays, mask rules), ``native`` (original-resolution masks), ``cache``, ``splits``, ``synthetic``,
``loading`` (``load_dataset``, ``load_pool``, ``inspect``), ``parts`` (the generalisation
protocol's ``load_parts``), ``data`` (what they return, mask statistics and ``check_masks``).

Example:
    >>> import tempfile
    >>> data = load_dataset("synthetic-polyp", size=64, cache_dir=tempfile.mkdtemp(), n=20)
    >>> data.images.shape, data.masks.shape, data.split
    ((20, 3, 64, 64), (20, 64, 64), 'seeded 80/20 (seed 0)')
    >>> len(label_fraction(data.train, 0.1, seed=0))                               # ceil(0.1 · 16)
    2
    >>> data.native_is_resized, data.native_mask(0).shape, data.mask_stats().empty
    (True, (64, 64), 0)
"""

from __future__ import annotations

from bench.datasets.cache import default_cache_dir
from bench.datasets.data import (
    DatasetReport,
    MaskStats,
    SegmentationData,
    TestSet,
    TrainingPool,
    check_masks,
)
from bench.datasets.loading import dataset_catalog, inspect, load_dataset, load_pool
from bench.datasets.native import NativeMasks
from bench.datasets.parts import load_parts
from bench.datasets.splits import label_fraction, split_hash

__all__ = ["SegmentationData", "TrainingPool", "TestSet", "MaskStats", "NativeMasks", "DatasetReport",
           "load_dataset", "load_parts", "load_pool", "check_masks", "label_fraction", "split_hash",
           "dataset_catalog", "inspect", "default_cache_dir"]
