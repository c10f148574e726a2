"""Decode once: uint8 arrays in ``.npy`` files, keyed by the source files' fingerprint (DESIGN.md §4).

An entry is a folder ``<cache>/<label>-<key>/`` holding one ``.npy`` file per array and ``meta.json``.
It is built in a temporary folder beside it and renamed into place (atomic on POSIX), so a killed
run leaves no half-written entry and parallel workers never read one. The key hashes the reader
version, the layout, the fingerprint (relative path, size and mtime of every source file, as
nnU-Net's dataset fingerprint), the working size S and the mask rule; for synthetic data the
generator name, n, seed, S and generator version. A changed file changes its size or mtime, hence
the key: the entry is rebuilt, never silently reused.

Example:
    >>> key = cache_key("kvasir-seg", files_fingerprint(root, files), 64)   # doctest: +SKIP
    >>> arrays = load_entry(cache_dir, "kvasir-seg", key) or build_entry(...)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

READER_VERSION = 1  # bump when decoding, binarising or resizing changes


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


def cache_key(*parts: object) -> str:
    text = json.dumps([READER_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _entry(cache_dir: Path, label: str, key: str) -> Path:
    return Path(cache_dir) / f"{label}-{key}"


def load_entry(cache_dir: Path, label: str, key: str, names: tuple[str, ...],
               mmap: bool = False) -> tuple[dict[str, np.ndarray], dict] | None:
    """The cached arrays and meta, or None when absent or unreadable (then it is rebuilt)."""
    folder = _entry(cache_dir, label, key)
    try:
        meta = json.loads((folder / "meta.json").read_text())
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r" if mmap else None) for name in names}
    except (OSError, ValueError):
        return None
    return arrays, meta


def build_entry(cache_dir: Path, label: str, key: str, shapes: dict[str, tuple[int, ...]],
                fill: Callable[[dict[str, np.ndarray]], None], meta: dict,
                mmap: bool = False) -> dict[str, np.ndarray]:
    """Create uint8 ``.npy`` files of ``shapes`` (memory-mapped), let ``fill`` write them, rename into place."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = _entry(cache_dir, label, key)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{label}-", dir=cache_dir))
    try:
        arrays = {name: np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=np.uint8, shape=shape)
                  for name, shape in shapes.items()}
        fill(arrays)
        for array in arrays.values():
            array.flush()
        del arrays
        (tmp / "meta.json").write_text(json.dumps(meta))
        if final.exists() and load_entry(cache_dir, label, key, tuple(shapes), mmap=True) is None:
            shutil.rmtree(final, ignore_errors=True)  # an unreadable entry with this key: replace it
        try:
            os.rename(tmp, final)
        except OSError:  # another worker renamed its complete copy first: use that one
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    loaded = load_entry(cache_dir, label, key, tuple(shapes), mmap=mmap)
    if loaded is None:
        raise OSError(f"cache entry {final} could not be read back after writing")
    return loaded[0]
