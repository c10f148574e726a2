"""The generalisation protocol's data: train on some datasets, test on others (docs/datasets.md).

``load_parts(train, test, ...)`` takes two lists of dataset references and returns one
``TrainingPool`` and one ``TestSet`` per test entry. The rule per reference:

- only in ``train``: all its images train;
- only in ``test``: all its images are one test set;
- in both: its own split (official, split file or seeded): the training part trains, the test part
  is its test set.

A PraNet root (``pranet:ROOT``) stands for TrainDataset in ``train`` and for its TestDataset
folders in ``test`` (one test set each); ``pranet:ROOT#Kvasir`` or ``#train`` names one part.
A test set is ``seen`` when its dataset also trained: the same reference, a PraNet test part whose
training images are in TrainDataset (Kvasir, CVC-ClinicDB), or the same named (non-generic) layout
or synthetic generator; ``?seen=yes|no`` overrides. Test images identical (pixel for pixel, at
S×S) to training images of another reference are an error, not a silently inflated score.

Example (the PraNet protocol):
    >>> pool, tests = load_parts(["pranet:/data/PraNet"], ["pranet:/data/PraNet"], 64)   # doctest: +SKIP
    >>> pool.counts, {name: (len(t.ids), t.seen) for name, t in tests.items()}          # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.datasets import refs
from bench.datasets.data import SegmentationData, TestSet, TrainingPool
from bench.datasets.layouts.pranet import TRAIN, is_seen
from bench.datasets.loading import Progress, load_dataset
from bench.datasets.native import NativeMasks
from bench.errors import BenchError


@dataclass
class _Source:
    ref: str
    parsed: refs.SyntheticRef | refs.FolderRef
    key: str                     # the reference without its naming options: same key, same data and split
    data: SegmentationData | None = None

    @property
    def pranet_root(self) -> bool:
        return self.data is not None and self.data.name == "pranet"

    def display(self) -> str:
        parsed = self.parsed
        return parsed.label or getattr(parsed, "part", None) or self.data.name


def _key(parsed: refs.SyntheticRef | refs.FolderRef) -> str:
    if isinstance(parsed, refs.SyntheticRef):
        return repr((parsed.name, parsed.n, parsed.seed, parsed.split))
    part = parsed.part.lower() if parsed.part else None
    return repr((parsed.layout, str(parsed.root.resolve()), part, parsed.mask, parsed.split))


def _sources(items: Sequence[str], side: str) -> list[_Source]:
    if not items:
        raise BenchError(f"the generalisation protocol needs at least one {side} dataset")
    sources = [_Source(str(ref), parsed := refs.parse(str(ref)), _key(parsed)) for ref in items]
    keys = [s.key for s in sources]
    for i, key in enumerate(keys):
        if key in keys[:i]:
            raise BenchError(f"{side} lists {items[i]!r} twice; list each dataset once")
    return sources


def _pool(contributions: list[tuple[_Source, np.ndarray]]) -> TrainingPool:
    names = [source.display() for source, _ in contributions]
    if len(set(names)) != len(names):
        raise BenchError(f"two training datasets are both named {sorted(n for n in names if names.count(n) > 1)[0]!r}; "
                         "name one with ?name=NAME")
    parts = [source.data.part(indices) for source, indices in contributions]
    n = sum(len(p["ids"]) for p in parts)
    if n == 0:
        raise BenchError("the training datasets contribute no image; check the train list")
    fingerprint = hashlib.sha256(repr([(s.data.fingerprint, s.data.split, idx.tolist())
                                       for s, idx in contributions]).encode()).hexdigest()[:12]
    kinds: dict[str, int] = {}
    for source, _ in contributions:
        for kind, count in source.data.mask_kinds.items():
            kinds[kind] = kinds.get(kind, 0) + count
    rules = sorted({p["mask_rule"] for p in parts})
    return TrainingPool(
        "+".join(names), np.concatenate([p["images"] for p in parts]), np.concatenate([p["masks"] for p in parts]),
        [f"{name}/{i}" for name, p in zip(names, parts, strict=True) for i in p["ids"]],
        np.arange(n, dtype=np.int64), np.zeros(0, np.int64),
        "training pool: " + ", ".join(f"{name} {len(p['ids'])}" for name, p in zip(names, parts, strict=True)),
        fingerprint, [], NativeMasks.concat([p["native"] for p in parts]), "/".join(rules), kinds,
        sources=np.repeat(np.arange(len(parts)), [len(p["ids"]) for p in parts]).astype(np.int64),
        source_names=names)


def _seen(source: _Source, part: str | None, train: list[_Source], pranet_roots: set[str]) -> bool:
    if source.parsed.seen is not None:
        return source.parsed.seen
    if part is not None and _root_key(source) in pranet_roots:   # a PraNet test part: by the protocol
        return is_seen(part)
    if any(t.key == source.key for t in train):
        return True
    return source.data.name != "generic" and any(t.data.name == source.data.name for t in train)


def _root_key(source: _Source) -> str:
    return str(getattr(source.parsed, "root", Path(".")).resolve())


def _test_sets(source: _Source, in_train: bool, train: list[_Source], pranet_roots: set[str]) -> list[TestSet]:
    data = source.data
    indices = data.test if in_train else np.arange(len(data.ids))
    if source.pranet_root:   # one test set per TestDataset folder
        groups: dict[str, list[int]] = {}
        for i in indices:
            groups.setdefault(data.ids[i].split("/", 1)[0], []).append(int(i))
        groups.pop(TRAIN, None)
        if not groups:
            raise BenchError(f"{source.ref} has no TestDataset folders to test on")
        return [_test_set(source, name, np.array(idx), _seen(source, name, train, pranet_roots), data.split)
                for name, idx in groups.items()]
    part = getattr(source.parsed, "part", None)
    return [_test_set(source, source.display(), indices, _seen(source, part, train, pranet_roots),
                      data.split if in_train else "all images")]


def _test_set(source: _Source, name: str, indices: np.ndarray, seen: bool, split: str) -> TestSet:
    fields = {**source.data.part(indices), "name": name}
    return TestSet(**fields, train=np.zeros(0, np.int64), test=np.arange(len(fields["ids"]), dtype=np.int64),
                   split=split, notes=list(source.data.notes), mask_kinds=dict(source.data.mask_kinds), seen=seen,
                   ref=source.ref)


def _training_indices(source: _Source, in_test: bool) -> np.ndarray:
    data = source.data
    if source.pranet_root and not (in_test and source.parsed.split is not None):
        indices = np.array([i for i, name in enumerate(data.ids) if name.startswith(f"{TRAIN}/")], np.int64)
        if not indices.size:
            raise BenchError(f"{source.ref} has no TrainDataset folder to train on")
        return indices
    return data.train if in_test else np.arange(len(data.ids), dtype=np.int64)


def _trains_pranet(source: _Source) -> bool:
    part = getattr(source.parsed, "part", None)
    return source.pranet_root or (part is not None and part.lower() in (TRAIN, "traindataset"))


def _digests(images: np.ndarray) -> set[bytes]:
    return {hashlib.sha1(np.ascontiguousarray(image).tobytes()).digest() for image in images}


def _check_overlap(pool: TrainingPool, pool_keys: list[str], tests: dict[str, tuple[TestSet, str]]) -> None:
    """Test images pixel-identical to training images of another reference: leakage, refused."""
    by_source = {k: _digests(pool.images[pool.sources == k]) for k in range(len(pool.source_names))}
    for name, (test, key) in tests.items():
        others = set().union(*(d for k, d in by_source.items() if pool_keys[k] != key)) if by_source else set()
        shared = sum(hashlib.sha1(np.ascontiguousarray(img).tobytes()).digest() in others for img in test.images)
        if shared:
            raise BenchError(f"test set {name}: {shared} of {len(test.ids)} images are also training images of "
                             "another dataset (identical pixels); test on a set disjoint from the training data "
                             "(e.g. train on pranet:ROOT#train rather than the full Kvasir-SEG)")


def load_parts(train: Sequence[str], test: Sequence[str], size: int, cache_dir: Path | None = None,
               split_seed: int = 0, n: int | None = None, mask_rule: str | None = None,
               progress: Progress | None = None) -> tuple[TrainingPool, dict[str, TestSet]]:
    """(training pool, test sets by name) for the generalisation protocol; see the module docstring."""
    train_sources, test_sources = _sources(train, "train"), _sources(test, "test")
    loaded: dict[str, SegmentationData] = {}
    for source in [*train_sources, *test_sources]:
        if source.key not in loaded:
            rule = mask_rule if isinstance(source.parsed, refs.FolderRef) else None   # synthetic: no rule
            loaded[source.key] = load_dataset(source.ref, size, cache_dir, n=n, split_seed=split_seed,
                                              progress=progress, mask_rule=rule)
        source.data = loaded[source.key]
    test_keys = {s.key for s in test_sources}
    contributions = [(source, _training_indices(source, source.key in test_keys)) for source in train_sources]
    pool = _pool(contributions)
    pranet_roots = {_root_key(s) for s in train_sources if _trains_pranet(s)}
    tests: dict[str, tuple[TestSet, str]] = {}
    train_keys = {s.key for s in train_sources}
    for source in test_sources:
        for test_set in _test_sets(source, source.key in train_keys, train_sources, pranet_roots):
            if test_set.name in tests:
                raise BenchError(f"two test sets are named {test_set.name!r}; name one with ?name=NAME")
            tests[test_set.name] = (test_set, source.key)
    _check_overlap(pool, [s.key for s, _ in contributions], tests)
    return pool, {name: test_set for name, (test_set, _) in tests.items()}
