"""Loading a dataset reference: scan, decode in parallel, cache, split (docs/datasets.md)."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench.datasets import decode, layouts, refs, synthetic
from bench.datasets.cache import cache_key, cached, default_cache_dir, files_fingerprint
from bench.datasets.data import DatasetReport, MaskStats, SegmentationData, kind_counts
from bench.datasets.native import NativeMasks, pack_one
from bench.datasets.splits import apply_split_file, read_split_file, seeded_split, seeded_split_name
from bench.errors import BenchError

DEFAULT_N = 200          # images of a synthetic set when ``n`` is not given
POOL_SEED = 1            # a synthetic pool is a separate draw from the labelled set (seed 0)
MIN_SIZE = 16
Progress = Callable[[int, int], None]
Split = tuple[np.ndarray, np.ndarray, str, list[str]]


def check_size(size: int) -> int:
    if int(size) != size or size < MIN_SIZE:
        raise BenchError(f"image size {size} is not usable; use an integer of at least {MIN_SIZE} (e.g. 64)")
    return int(size)


def parallel(items: Sequence, work: Callable, store: Callable[[int, object], None],
             progress: Progress | None) -> None:
    """``store(i, work(items[i]))`` for every item, decoded by threads (PIL releases the GIL)."""
    workers = max(1, min(8, os.cpu_count() or 1))
    chunk = 8 * workers  # bounded look-ahead: the first error stops the run after at most one chunk
    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(items), chunk):
            for offset, result in enumerate(pool.map(work, items[start:start + chunk])):
                store(start + offset, result)
                if progress is not None:
                    progress(start + offset + 1, len(items))


# ----------------------------------------------------------------------------------------------
# Folders


def folder_scan(source: refs.FolderRef) -> layouts.Scan:
    """The scan of a folder reference (of its part, for ``LAYOUT:PATH#PART``)."""
    if source.part is None:
        return layouts.scan(source.root, source.layout)
    _, folder = layouts.find_part(source.root, source.layout, source.part)
    return layouts.scan(folder)


def _rule(source: refs.FolderRef, keyword: str | None, default: str) -> str:
    asked = decode.check_rule(keyword) if keyword is not None else None
    if asked is not None and source.mask is not None and asked != source.mask:
        raise BenchError(f"mask rule {asked!r} given twice, differently: {source.root} says mask={source.mask}; "
                         "keep one")
    return asked or source.mask or default


def _fill(scan: layouts.Scan, size: int, rule: str, progress: Progress | None) -> Callable:
    def fill(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        packed: list = [None] * len(scan.pairs)
        kinds = np.zeros(len(scan.pairs), np.uint8)

        def work(pair: layouts.Pair) -> tuple[decode.Decoded, tuple]:
            decoded = decode.decode_pair(pair, size, rule)
            return decoded, pack_one(decoded.native)

        def store(i: int, result: tuple[decode.Decoded, tuple]) -> None:
            decoded, packed[i] = result
            arrays["images"][i], arrays["masks"][i], kinds[i] = decoded.image, decoded.mask, decoded.kind

        parallel(scan.pairs, work, store, progress)
        native = NativeMasks.from_packed(packed)
        return {"native_blob": native.blob, "native_index": native.index, "mask_kinds": kinds}

    return fill


def _folder_fingerprint(scan: layouts.Scan, rule: str) -> tuple[str, str]:
    """(source files' fingerprint, short data fingerprint: the files and how their masks are decoded)."""
    files = files_fingerprint(scan.root, scan.files)
    return files, cache_key("data", files, rule)[:12]


def _load_folder(source: refs.FolderRef, size: int, cache_dir: Path, mask_rule: str | None,
                 progress: Progress | None) -> tuple[SegmentationData, layouts.Scan]:
    scan = folder_scan(source)
    rule = _rule(source, mask_rule, scan.mask_rule)
    ids = [pair.id for pair in scan.pairs]
    files, fingerprint = _folder_fingerprint(scan, rule)
    shapes = {"images": (len(ids), 3, size, size), "masks": (len(ids), size, size)}
    meta = {"layout": scan.layout, "ids": ids, "size": size, "fingerprint": files, "mask_rule": rule}
    entry = cached(cache_dir, f"{scan.layout}-{size}px", cache_key(scan.layout, files, size, rule), shapes,
                   _fill(scan, size, rule, progress), meta,
                   accept=lambda m: None if m.get("ids") == ids else "it lists other image ids")
    if not entry.built and progress is not None:
        progress(len(ids), len(ids))
    arrays = entry.arrays
    notes = list(scan.notes) + ([f"cache entry rebuilt: {entry.problem}"] if entry.problem else [])
    native = NativeMasks(arrays["native_blob"], arrays["native_index"])
    data = SegmentationData(scan.layout, arrays["images"], arrays["masks"], ids, np.zeros(0, np.int64),
                            np.zeros(0, np.int64), "", fingerprint, notes, native, rule,
                            kind_counts(arrays["mask_kinds"]))
    return data, scan


def _split(scan: layouts.Scan | None, ids: list[str], seed: int, split_file: Path | None) -> Split:
    if split_file is not None:
        return apply_split_file(read_split_file(split_file), ids, seed)
    if scan is not None and scan.official:
        roles = np.array([pair.role for pair in scan.pairs], dtype=object)
        train, test = np.flatnonzero(roles == "train"), np.flatnonzero(roles == "test")
        if train.size and test.size:
            return train.astype(np.int64), test.astype(np.int64), "official", []
    notes = []
    if scan is not None and scan.official:
        notes.append("the official split has an empty part here: a seeded split is used")
    train, test = seeded_split(len(ids), seed=seed)
    return train, test, seeded_split_name(seed), notes


# ----------------------------------------------------------------------------------------------
# Synthetic sets


def synthetic_params(source: refs.SyntheticRef, n: int | None, default_seed: int) -> tuple[int, int]:
    count = n if n is not None else source.n if source.n is not None else DEFAULT_N
    if int(count) != count or count < 2:
        raise BenchError(f"n = {count} images is too few for {source.name}; use n ≥ 2 (default {DEFAULT_N})")
    return int(count), source.seed if source.seed is not None else default_seed


def synthetic_fingerprint(name: str, count: int, seed: int) -> str:
    # version 1 frozen: the fingerprints recorded by earlier runs stay valid (the generator version covers changes)
    return cache_key("synthetic", name, count, seed, synthetic.GENERATOR_VERSION, version=1)[:12]


def synthetic_arrays(source: refs.SyntheticRef, size: int, cache_dir: Path, count: int, seed: int,
                     progress: Progress | None) -> tuple[dict[str, np.ndarray], str, str | None]:
    """(arrays, fingerprint, cache problem) of a synthetic draw, generated once and cached."""
    def fill(arrays: dict[str, np.ndarray]) -> None:
        arrays["images"][:], arrays["masks"][:] = synthetic.generate(source.name, count, size, seed)

    shapes = {"images": (count, 3, size, size), "masks": (count, size, size)}
    meta = {"generator": source.name, "n": count, "seed": seed, "size": size}
    key = cache_key("synthetic", source.name, count, seed, size, synthetic.GENERATOR_VERSION)
    entry = cached(cache_dir, f"{source.name}-{size}px", key, shapes, fill, meta)
    if progress is not None:
        progress(count, count)
    return entry.arrays, synthetic_fingerprint(source.name, count, seed), entry.problem


def _load_synthetic(source: refs.SyntheticRef, size: int, cache_dir: Path, n: int | None,
                    progress: Progress | None) -> SegmentationData:
    count, seed = synthetic_params(source, n, default_seed=0)
    arrays, fingerprint, problem = synthetic_arrays(source, size, cache_dir, count, seed, progress)
    ids = [f"{i:05d}" for i in range(count)]
    notes = [f"cache entry rebuilt: {problem}"] if problem else []
    return SegmentationData(source.name, arrays["images"], arrays["masks"], ids, np.zeros(0, np.int64),
                            np.zeros(0, np.int64), "", fingerprint, notes)


# ----------------------------------------------------------------------------------------------
# Public entry points


def load_dataset(ref: str, size: int, cache_dir: Path | None = None, n: int | None = None,
                 split_seed: int = 0, progress: Progress | None = None, mask_rule: str | None = None,
                 split_file: str | Path | None = None) -> SegmentationData:
    """Images and binary masks at S×S, native masks, and the train/test split; decoded once, then cached.

    ``n``: images of a synthetic set (default 200; ignored for real data). ``cache_dir``: default
    ``$BENCH_CACHE`` or ``~/.cache/medssl-bench``. ``progress(done, total)`` is called while decoding.
    ``mask_rule`` forces the mask rule (as ``?mask=`` does); ``split_file`` a user split (as ``?split=``).
    """
    size = check_size(size)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    source = refs.parse(ref)
    scan = None
    if isinstance(source, refs.SyntheticRef):
        if mask_rule is not None:
            raise BenchError(f"{ref}: a synthetic set has no mask rule to force; drop mask_rule")
        data = _load_synthetic(source, size, cache_dir, n, progress)
    else:
        data, scan = _load_folder(source, size, cache_dir, mask_rule, progress)
    chosen = Path(split_file).expanduser() if split_file is not None else source.split
    if split_file is not None and source.split is not None and chosen != source.split:
        raise BenchError(f"two split files for {ref}: {source.split} and {chosen}; keep one")
    data.train, data.test, data.split, notes = _split(scan, data.ids, split_seed, chosen)
    data.notes += notes
    return data


def load_pool(ref: str, size: int, cache_dir: Path | None = None, progress: Progress | None = None) -> np.ndarray:
    """(N, 3, S, S) uint8 unlabelled images: every image under a folder (recursively), or a synthetic draw.

    A folder pool is cached like a dataset and returned memory-mapped read-only (pools can be large:
    index it to get writable batches). A synthetic pool (``synthetic-polyp[:n=..,seed=..]``) is a
    separate draw (seed 1 unless given) from the labelled set of the same name (seed 0).
    """
    size = check_size(size)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    source = refs.parse(ref)
    if isinstance(source, refs.SyntheticRef):
        count, seed = synthetic_params(source, None, default_seed=POOL_SEED)
        return synthetic_arrays(source, size, cache_dir, count, seed, progress)[0]["images"]
    if source.layout is not None or source.part is not None:
        raise BenchError(f"a pool is a plain folder of unlabelled images; pass {source.root} without "
                         f"'{source.layout or ''}:' or '#' (a labelled layout would put its masks and test images "
                         "in the pool)")
    files = layouts.pool_files(source.root)
    fingerprint = files_fingerprint(source.root, files)

    def fill(arrays: dict[str, np.ndarray]) -> None:
        def store(i: int, image: np.ndarray) -> None:
            arrays["images"][i] = image

        parallel(files, lambda path: decode.read_pool_image(path, size), store, progress)

    meta = {"root": str(source.root), "n": len(files), "size": size, "fingerprint": fingerprint}
    entry = cached(cache_dir, f"pool-{size}px", cache_key("pool", fingerprint, size),
                   {"images": (len(files), 3, size, size)}, fill, meta, mmap=True)
    if not entry.built and progress is not None:
        progress(len(files), len(files))
    return entry.arrays["images"]


def dataset_catalog() -> list[tuple[str, str]]:
    """(name or layout, one-line description), for ``bench datasets``."""
    rows = [(name, description) for name, (_, description) in synthetic.GENERATORS.items()]
    rows += [(f"{layout.name}:PATH", layout.description) for layout in layouts.LAYOUTS.values()]
    rows.append(("PATH", "a folder whose layout is recognised automatically (one of the above)"))
    rows.append(("...?mask=RULE", f"force the mask rule ({', '.join(decode.RULES)}); default auto: by content"))
    rows.append(("...?split=FILE.csv", "a user split: CSV id,split (train/test) or id,group (grouped seeded split)"))
    rows.append(("pool PATH", "any folder of images, searched recursively: an unlabelled pretraining pool "
                              "(e.g. HyperKvasir's unlabeled-images)"))
    return rows


def inspect(ref: str, progress: Progress | None = None, mask_rule: str | None = None) -> DatasetReport:
    """Recognise the layout, pair the files and decode every one; raise BenchError on the first problem."""
    source = refs.parse(ref)
    if isinstance(source, refs.SyntheticRef):
        count, seed = synthetic_params(source, None, default_seed=0)
        _, masks = synthetic.generate(source.name, count, 64, seed)
        if progress is not None:
            progress(count, count)
        train, test = seeded_split(count)
        fraction = masks.reshape(count, -1).mean(axis=1)
        return DatasetReport(source.name, None, count, seeded_split_name(0), len(train), len(test),
                             {(64, 64): count}, float(fraction.mean()), int((fraction == 0).sum()),
                             synthetic_fingerprint(source.name, count, seed), stats=MaskStats.of(fraction),
                             mask_rule="generated")
    scan = folder_scan(source)
    rule = _rule(source, mask_rule, scan.mask_rule)
    sizes: Counter = Counter()
    fractions = np.zeros(len(scan.pairs))
    kinds = np.zeros(len(scan.pairs), np.uint8)

    def store(i: int, decoded: decode.Decoded) -> None:
        sizes[(decoded.image.shape[2], decoded.image.shape[1])] += 1
        fractions[i], kinds[i] = decoded.native.mean(), decoded.kind

    parallel(scan.pairs, lambda pair: decode.decode_pair(pair, None, rule), store, progress)
    train, test, split, notes = _split(scan, [p.id for p in scan.pairs], 0, source.split)
    return DatasetReport(scan.layout, scan.root, len(scan.pairs), split, len(train), len(test), dict(sizes),
                         float(fractions.mean()), int((fractions == 0).sum()), _folder_fingerprint(scan, rule)[1],
                         scan.notes + notes, MaskStats.of(fractions), dict(scan.parts), rule, kind_counts(kinds))
