"""Datasets: native-layout readers, synthetic generators, cache, splits and label fractions (DESIGN.md §4).

A dataset reference (``ref``) is one of
- a registry name: ``synthetic-polyp`` or ``synthetic-gland`` (options: ``synthetic-polyp:seed=1,n=300``);
- ``LAYOUT:PATH``, e.g. ``kvasir-seg:/data/Kvasir-SEG`` (layouts: ``bench datasets``);
- a bare ``PATH``, whose layout is recognised from the folder.

Example:
    >>> import tempfile
    >>> data = load_dataset("synthetic-polyp", size=64, cache_dir=Path(tempfile.mkdtemp()), n=20)
    >>> data.images.shape, data.masks.shape, data.split
    ((20, 3, 64, 64), (20, 64, 64), 'seeded 80/20 (seed 0)')
    >>> len(label_fraction(data.train, 0.1, seed=0))                               # ceil(0.1 · 16)
    2
"""

from __future__ import annotations

import difflib
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.datasets import layouts, synthetic
from bench.datasets.cache import build_entry, cache_key, default_cache_dir, files_fingerprint, load_entry
from bench.datasets.splits import label_fraction, seeded_split, seeded_split_name, split_hash
from bench.errors import BenchError

__all__ = ["SegmentationData", "DatasetReport", "load_dataset", "load_pool", "label_fraction", "split_hash",
           "dataset_catalog", "inspect", "default_cache_dir"]

DEFAULT_N = 200          # images of a synthetic set when ``n`` is not given
POOL_SEED = 1            # a synthetic pool is a separate draw from the labelled set (seed 0)
MIN_SIZE = 16
Progress = Callable[[int, int], None]


@dataclass
class SegmentationData:
    name: str                 # registry name or layout name, e.g. "synthetic-polyp", "kvasir-seg"
    images: np.ndarray        # (N, 3, S, S) uint8, resized to the working size S
    masks: np.ndarray         # (N, S, S) uint8 in {0, 1}
    ids: list[str]            # one id per image (file stem or synthetic index)
    train: np.ndarray         # int64 indices of the training split
    test: np.ndarray          # int64 indices of the test split
    split: str                # "official" or e.g. "seeded 80/20 (seed 0)"
    fingerprint: str          # short hash of the source files (or of the generator params)
    notes: list[str] = field(default_factory=list)   # what the reader left out or decided, and why


@dataclass
class DatasetReport:
    """What ``inspect`` found: every file decoded, nothing wrong (else it raised)."""

    name: str
    root: Path | None
    n_pairs: int
    split: str
    n_train: int
    n_test: int
    image_sizes: dict[tuple[int, int], int]   # (W, H) → count
    foreground: float                          # mean foreground fraction of the masks
    empty_masks: int
    fingerprint: str
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        sizes = ", ".join(f"{w}×{h} ({c})" for (w, h), c in sorted(self.image_sizes.items(), key=lambda x: -x[1])[:4])
        more = f", +{len(self.image_sizes) - 4} more sizes" if len(self.image_sizes) > 4 else ""
        return [f"layout      {self.name}", f"root        {self.root or '(generated)'}",
                f"pairs       {self.n_pairs}", f"split       {self.split}: train {self.n_train} / test {self.n_test}",
                f"image sizes {sizes}{more}",
                f"masks       foreground {100 * self.foreground:.1f}% on average, {self.empty_masks} empty",
                f"fingerprint {self.fingerprint}", *(f"note        {note}" for note in self.notes)]


# ----------------------------------------------------------------------------------------------
# References


@dataclass(frozen=True)
class _Synthetic:
    name: str
    n: int | None
    seed: int | None


@dataclass(frozen=True)
class _Folder:
    layout: str | None
    root: Path


def _known() -> list[str]:
    return [*synthetic.GENERATORS, *layouts.LAYOUTS]


def _suggest(word: str) -> str:
    close = difflib.get_close_matches(word.lower(), _known(), n=1, cutoff=0.5)
    return f"did you mean {close[0]!r}? " if close else ""


def _synthetic_options(name: str, text: str) -> _Synthetic:
    options: dict[str, int] = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key.strip() not in ("n", "seed") or not value.strip().lstrip("-").isdigit():
            raise BenchError(f"bad option {item!r} in {name}; use e.g. {name}:seed=1,n=300")
        options[key.strip()] = int(value)
    return _Synthetic(name, options.get("n"), options.get("seed"))


def _parse(ref: str) -> _Synthetic | _Folder:
    ref = str(ref).strip()
    if ref in synthetic.GENERATORS:
        return _Synthetic(ref, None, None)
    match = re.fullmatch(r"([A-Za-z][\w.-]+):(.*)", ref)
    if match and not Path(ref).expanduser().exists():
        prefix, rest = match.group(1).lower(), match.group(2)
        if prefix in synthetic.GENERATORS:
            return _synthetic_options(prefix, rest)
        if prefix in layouts.LAYOUTS:
            if not rest:
                raise BenchError(f"{ref!r} names no folder; use {prefix}:PATH")
            return _Folder(prefix, Path(rest).expanduser())
        raise BenchError(f"unknown dataset layout {prefix!r}; {_suggest(prefix)}known layouts: "
                         f"{', '.join(layouts.LAYOUTS)} (bench datasets describes them)")
    path = Path(ref).expanduser()
    if not path.exists() and not re.search(r"[/\\~.]", ref):
        raise BenchError(f"unknown dataset {ref!r}; {_suggest(ref)}give a registry name "
                         f"({', '.join(synthetic.GENERATORS)}), LAYOUT:PATH or a folder path")
    return _Folder(None, path)


def _check_size(size: int) -> int:
    if int(size) != size or size < MIN_SIZE:
        raise BenchError(f"image size {size} is not usable; use an integer of at least {MIN_SIZE} (e.g. 64)")
    return int(size)


# ----------------------------------------------------------------------------------------------
# Decoding in parallel (PIL releases the GIL while decoding and resizing)


def _parallel(items: Sequence, work: Callable, store: Callable[[int, object], None],
              progress: Progress | None) -> None:
    workers = max(1, min(8, os.cpu_count() or 1))
    chunk = 8 * workers  # bounded look-ahead: the first error stops the run after at most one chunk
    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(items), chunk):
            for offset, result in enumerate(pool.map(work, items[start:start + chunk])):
                store(start + offset, result)
                if progress is not None:
                    progress(start + offset + 1, len(items))


def _decode_pairs(scan: layouts.Scan, size: int, arrays: dict[str, np.ndarray], progress: Progress | None) -> None:
    def store(i: int, result: tuple[np.ndarray, np.ndarray]) -> None:
        arrays["images"][i], arrays["masks"][i] = result

    _parallel(scan.pairs, lambda pair: layouts.decode_pair(pair, size, scan.mask_rule), store, progress)


# ----------------------------------------------------------------------------------------------
# Public API


def load_dataset(ref: str, size: int, cache_dir: Path | None = None, n: int | None = None,
                 split_seed: int = 0, progress: Progress | None = None) -> SegmentationData:
    """Images and binary masks at S×S, with the train/test split; decoded once, then read from the cache.

    ``n``: images of a synthetic set (default 200; ignored for real data). ``cache_dir``: default
    ``$BENCH_CACHE`` or ``~/.cache/medssl-bench``. ``progress(done, total)`` is called while decoding.
    """
    size = _check_size(size)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    source = _parse(ref)
    if isinstance(source, _Synthetic):
        return _load_synthetic(source, size, cache_dir, n, split_seed, progress)
    scan = layouts.scan(source.root, source.layout)
    ids = [pair.id for pair in scan.pairs]
    fingerprint = files_fingerprint(scan.root, scan.files)
    key = cache_key(scan.layout, fingerprint, size, scan.mask_rule)
    label = f"{scan.layout}-{size}px"
    loaded = load_entry(cache_dir, label, key, ("images", "masks"))
    if loaded is not None and loaded[1].get("ids") == ids:
        arrays = loaded[0]
        if progress is not None:
            progress(len(ids), len(ids))
    else:
        shapes = {"images": (len(ids), 3, size, size), "masks": (len(ids), size, size)}
        meta = {"layout": scan.layout, "ids": ids, "size": size, "fingerprint": fingerprint}
        arrays = build_entry(cache_dir, label, key, shapes, lambda a: _decode_pairs(scan, size, a, progress), meta)
    train, test, split, notes = _split(scan, split_seed)
    return SegmentationData(scan.layout, arrays["images"], arrays["masks"], ids, train, test, split,
                            fingerprint[:12], scan.notes + notes)


def _split(scan: layouts.Scan, seed: int) -> tuple[np.ndarray, np.ndarray, str, list[str]]:
    roles = np.array([pair.role for pair in scan.pairs], dtype=object)
    train, test = np.flatnonzero(roles == "train"), np.flatnonzero(roles == "test")
    if scan.official and train.size and test.size:
        return train.astype(np.int64), test.astype(np.int64), "official", []
    notes = [f"the official split has an empty {'test' if train.size else 'train'} part here: "
             "a seeded split is used"] if scan.official else []
    train, test = seeded_split(len(scan.pairs), seed=seed)
    return train, test, seeded_split_name(seed), notes


def _synthetic_params(source: _Synthetic, n: int | None, default_seed: int) -> tuple[int, int]:
    count = n if n is not None else source.n if source.n is not None else DEFAULT_N
    if int(count) != count or count < 2:
        raise BenchError(f"n = {count} images is too few for {source.name}; use n ≥ 2 (default {DEFAULT_N})")
    return int(count), source.seed if source.seed is not None else default_seed


def _synthetic_arrays(source: _Synthetic, size: int, cache_dir: Path, count: int, seed: int,
                      progress: Progress | None) -> tuple[dict[str, np.ndarray], str]:
    key = cache_key("synthetic", source.name, count, seed, size, synthetic.GENERATOR_VERSION)
    label = f"{source.name}-{size}px"
    loaded = load_entry(cache_dir, label, key, ("images", "masks"))
    if loaded is None:
        def fill(arrays: dict[str, np.ndarray]) -> None:
            arrays["images"][:], arrays["masks"][:] = synthetic.generate(source.name, count, size, seed)

        shapes = {"images": (count, 3, size, size), "masks": (count, size, size)}
        meta = {"generator": source.name, "n": count, "seed": seed, "size": size}
        arrays = build_entry(cache_dir, label, key, shapes, fill, meta)
    else:
        arrays = loaded[0]
    if progress is not None:
        progress(count, count)
    return arrays, _synthetic_fingerprint(source.name, count, seed)


def _synthetic_fingerprint(name: str, count: int, seed: int) -> str:
    return cache_key("synthetic", name, count, seed, synthetic.GENERATOR_VERSION)[:12]


def _load_synthetic(source: _Synthetic, size: int, cache_dir: Path, n: int | None, split_seed: int,
                    progress: Progress | None) -> SegmentationData:
    count, seed = _synthetic_params(source, n, default_seed=0)
    arrays, fingerprint = _synthetic_arrays(source, size, cache_dir, count, seed, progress)
    train, test = seeded_split(count, seed=split_seed)
    ids = [f"{i:05d}" for i in range(count)]
    return SegmentationData(source.name, arrays["images"], arrays["masks"], ids, train, test,
                            seeded_split_name(split_seed), fingerprint)


def load_pool(ref: str, size: int, cache_dir: Path | None = None, progress: Progress | None = None) -> np.ndarray:
    """(N, 3, S, S) uint8 unlabelled images: every image under a folder (recursively), or a synthetic draw.

    A folder pool is cached like a dataset and returned memory-mapped read-only (pools can be large:
    index it to get writable batches). A synthetic pool (``synthetic-polyp[:n=..,seed=..]``) is a
    separate draw (seed 1 unless given) from the labelled set of the same name (seed 0).
    """
    size = _check_size(size)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    source = _parse(ref)
    if isinstance(source, _Synthetic):
        count, seed = _synthetic_params(source, None, default_seed=POOL_SEED)
        return _synthetic_arrays(source, size, cache_dir, count, seed, progress)[0]["images"]
    if source.layout is not None:
        raise BenchError(f"a pool is a plain folder of unlabelled images; pass {source.root} without "
                         f"'{source.layout}:' (a labelled layout would put its masks and test images in the pool)")
    files = layouts.pool_files(source.root)
    fingerprint = files_fingerprint(source.root, files)
    key = cache_key("pool", fingerprint, size)
    label = f"pool-{size}px"
    loaded = load_entry(cache_dir, label, key, ("images",), mmap=True)
    if loaded is not None:
        if progress is not None:
            progress(len(files), len(files))
        return loaded[0]["images"]

    def fill(arrays: dict[str, np.ndarray]) -> None:
        def store(i: int, image: np.ndarray) -> None:
            arrays["images"][i] = image

        _parallel(files, lambda path: layouts.read_pool_image(path, size), store, progress)

    meta = {"root": str(source.root), "n": len(files), "size": size, "fingerprint": fingerprint}
    return build_entry(cache_dir, label, key, {"images": (len(files), 3, size, size)}, fill, meta, mmap=True)["images"]


def dataset_catalog() -> list[tuple[str, str]]:
    """(name or layout, one-line description), for ``bench datasets``."""
    rows = [(name, description) for name, (_, description) in synthetic.GENERATORS.items()]
    rows += [(f"{layout.name}:PATH", layout.description) for layout in layouts.LAYOUTS.values()]
    rows.append(("PATH", "a folder whose layout is recognised automatically (one of the above)"))
    rows.append(("pool PATH", "any folder of images, searched recursively: an unlabelled pretraining pool "
                              "(e.g. HyperKvasir's unlabeled-images)"))
    return rows


def inspect(ref: str, progress: Progress | None = None) -> DatasetReport:
    """Recognise the layout, pair the files and decode every one; raise BenchError on the first problem."""
    source = _parse(ref)
    if isinstance(source, _Synthetic):
        count, seed = _synthetic_params(source, None, default_seed=0)
        _, masks = synthetic.generate(source.name, count, 64, seed)
        if progress is not None:
            progress(count, count)
        train, test = seeded_split(count)
        fraction = masks.reshape(count, -1).mean(axis=1)
        return DatasetReport(source.name, None, count, seeded_split_name(0), len(train), len(test),
                             {(64, 64): count}, float(fraction.mean()), int((fraction == 0).sum()),
                             _synthetic_fingerprint(source.name, count, seed))
    scan = layouts.scan(source.root, source.layout)
    sizes: Counter = Counter()
    fractions = np.zeros(len(scan.pairs))

    def store(i: int, result: tuple[np.ndarray, np.ndarray]) -> None:
        image, mask = result
        sizes[(image.shape[2], image.shape[1])] += 1
        fractions[i] = mask.mean()

    _parallel(scan.pairs, lambda pair: layouts.decode_pair(pair, None, scan.mask_rule), store, progress)
    train, test, split, notes = _split(scan, 0)
    return DatasetReport(scan.layout, scan.root, len(scan.pairs), split, len(train), len(test), dict(sizes),
                         float(fractions.mean()), int((fractions == 0).sum()),
                         files_fingerprint(scan.root, scan.files)[:12], scan.notes + notes)
