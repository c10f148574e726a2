"""Decode once: arrays in ``.npy`` files, keyed by the source files' fingerprint, checksummed (docs/datasets.md).

An entry is a folder ``<cache>/<label>-<key>/`` holding one ``.npy`` file per array and ``meta.json``
with each file's sha256 and shape. It is built in a temporary folder beside it and renamed into
place (atomic on POSIX), so a killed run leaves no half-written entry and parallel workers never
read one. The key hashes the reader version, the layout, the fingerprint (relative path, size and
mtime of every source file, as nnU-Net's dataset fingerprint), the working size S and the mask
rule; for synthetic data the generator name, n, seed, S and generator version. A changed file
changes its size or mtime, hence the key: the entry is rebuilt, never silently reused.

Every read verifies the entry: each file present, non-empty, a readable ``.npy`` of the recorded
(and expected) shape, with the sha256 written at build time. An entry that fails is rebuilt, and
one line on stderr (logger ``bench.datasets``) says which and why.

Example:
    >>> entry = cached(cache_dir, "kvasir-seg-64px", key, shapes, fill, meta)   # doctest: +SKIP
    >>> entry.arrays["images"].shape, entry.built, entry.problem                 # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

READER_VERSION = 2  # bump when decoding, binarising, resizing or the entry format changes
log = logging.getLogger("bench.datasets")
Arrays = dict[str, np.ndarray]


def default_cache_dir() -> Path:
    """``$BENCH_CACHE``, else ``~/.cache/medssl-bench``."""
    env = os.environ.get("BENCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "medssl-bench"


def files_fingerprint(root: Path, files: list[Path]) -> str:
    """sha256 over (path relative to ``root``, size, mtime in ns) of every file, in sorted order."""
    digest = hashlib.sha256()
    for rel, path in sorted((p.relative_to(root).as_posix(), p) for p in files):
        stat = path.stat()
        digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cache_key(*parts: object, version: int = READER_VERSION) -> str:
    text = json.dumps([version, *parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _entry(cache_dir: Path, label: str, key: str) -> Path:
    return Path(cache_dir) / f"{label}-{key}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Entry:
    arrays: Arrays | None       # None: absent or unusable
    meta: dict | None
    problem: str | None = None  # why an existing entry could not be used
    built: bool = False


def _verify(folder: Path, meta: dict, expected: dict[str, tuple[int, ...]], mmap: bool) -> Arrays | str:
    """The arrays, or what is wrong with them (one phrase)."""
    sums, shapes = meta.get("sha256"), meta.get("shapes")
    if not isinstance(sums, dict) or not isinstance(shapes, dict):
        return "meta.json has no checksums"
    arrays: Arrays = {}
    for name, digest in sums.items():
        path = folder / f"{name}.npy"
        if not path.is_file():
            return f"{path.name} is missing"
        if path.stat().st_size == 0:
            return f"{path.name} is empty (0 bytes)"
        if _sha256(path) != digest:
            return f"{path.name} does not match its checksum"
        try:
            array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            return f"{path.name} is unreadable ({type(err).__name__})"
        want = expected.get(name, tuple(shapes.get(name, ())))
        if tuple(array.shape) != tuple(want) or tuple(array.shape) != tuple(shapes.get(name, ())):
            return f"{path.name} has shape {tuple(array.shape)}, expected {tuple(want)}"
        arrays[name] = array
    missing = set(expected) - set(arrays)
    return f"{sorted(missing)[0]}.npy is not recorded" if missing else arrays


def lookup(cache_dir: Path, label: str, key: str, expected: dict[str, tuple[int, ...]],
           mmap: bool = False) -> Entry:
    """The verified entry; ``arrays`` None when absent or when it fails the check (``problem`` says why)."""
    folder = _entry(cache_dir, label, key)
    if not folder.exists():
        return Entry(None, None)
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return Entry(None, None, "meta.json is missing or unreadable")
    if not isinstance(meta, dict):
        return Entry(None, None, "meta.json is not an object")
    result = _verify(folder, meta, expected, mmap)
    return Entry(None, meta, result) if isinstance(result, str) else Entry(result, meta)


def _write(tmp: Path, shapes: dict[str, tuple[int, ...]], fill: Callable[[Arrays], Arrays | None],
           meta: dict) -> None:
    arrays = {name: np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=np.uint8, shape=shape)
              for name, shape in shapes.items()}
    extra = fill(arrays) or {}
    for array in arrays.values():
        array.flush()
    del arrays
    for name, array in extra.items():
        np.save(tmp / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)
    names = [*shapes, *extra]
    record = {"sha256": {n: _sha256(tmp / f"{n}.npy") for n in names},
              "shapes": {n: list(shapes[n]) if n in shapes else list(extra[n].shape) for n in names}}
    (tmp / "meta.json").write_text(json.dumps({**meta, **record}))


def build_entry(cache_dir: Path, label: str, key: str, shapes: dict[str, tuple[int, ...]],
                fill: Callable[[Arrays], Arrays | None], meta: dict, mmap: bool = False) -> Entry:
    """Create uint8 ``.npy`` files of ``shapes`` (memory-mapped), let ``fill`` write them, rename into place.

    ``fill`` may return further arrays (any dtype and shape) to store in the entry.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = _entry(cache_dir, label, key)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{label}-", dir=cache_dir))
    try:
        _write(tmp, shapes, fill, meta)
        if final.exists() and lookup(cache_dir, label, key, shapes, mmap=True).arrays is None:
            shutil.rmtree(final, ignore_errors=True)  # a damaged entry with this key: replace it
        try:
            os.rename(tmp, final)
        except OSError:  # another worker renamed its complete copy first: use that one
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    entry = lookup(cache_dir, label, key, shapes, mmap=mmap)
    if entry.arrays is None:
        raise OSError(f"cache entry {final} could not be read back after writing ({entry.problem})")
    entry.built = True
    return entry


def cached(cache_dir: Path, label: str, key: str, shapes: dict[str, tuple[int, ...]],
           fill: Callable[[Arrays], Arrays | None], meta: dict, mmap: bool = False,
           accept: Callable[[dict], str | None] | None = None) -> Entry:
    """The verified entry, else built; a damaged one is rebuilt with one line on stderr saying so.

    ``accept(meta)`` may name a reason to rebuild an otherwise sound entry (e.g. other file ids).
    """
    entry = lookup(cache_dir, label, key, shapes, mmap=mmap)
    problem = entry.problem
    if entry.arrays is not None and accept is not None:
        problem = accept(entry.meta or {})
    if entry.arrays is not None and problem is None:
        return entry
    if problem is not None:
        log.warning("cache entry %s: %s; rebuilding it", _entry(cache_dir, label, key), problem)
        shutil.rmtree(_entry(cache_dir, label, key), ignore_errors=True)
    rebuilt = build_entry(cache_dir, label, key, shapes, fill, meta, mmap=mmap)
    rebuilt.problem = problem
    return rebuilt
