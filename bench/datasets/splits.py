"""Train/test splits, split files and nested label fractions, and their hashes for cell records.

See docs/datasets.md.

- Seeded split: the ids are sorted naturally, permuted with ``numpy.random.default_rng(seed)`` and
  the first ``max(1, round(test_share · n))`` become the test split; the split therefore depends on
  the set of ids and the seed only, never on the order a file system lists them in.
- Label fraction: a seeded permutation of the (sorted) training indices; the labelled subset is its
  first ``k = max(1, ceil(fraction · n))`` entries. The same permutation serves every fraction of a
  seed, so the 5% subset is a prefix of, hence inside, the 10% subset (nested). ``ceil`` (with a
  1e-9 tolerance against float error: 0.05 · 880 selects 44, not 45) guarantees at least the
  requested share.
- Split file (``LAYOUT:PATH?split=FILE.csv``): a CSV ``id,split`` (train/test per image) replaces
  the official or seeded split; ``id,group`` gives a grouped seeded split, whole groups (e.g. the
  frames of one video) on one side, groups taken in seeded order until the test side holds 20%.

Example:
    >>> train, test = seeded_split(10, test_share=0.2, seed=0)
    >>> len(train), len(test)
    (8, 2)
    >>> five, ten = label_fraction(train, 0.25, seed=0), label_fraction(train, 0.5, seed=0)
    >>> set(five) <= set(ten)
    True
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.errors import BenchError

TEST_SHARE = 0.2


def natural_key(text: str) -> list:
    """Sort key that orders ``"2"`` before ``"10"`` (frame numbers) and is total over strings."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text)]


def seeded_split(n: int, test_share: float = TEST_SHARE, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) int64 index arrays, sorted, for ``n`` items already in a canonical order."""
    if n < 2:
        raise BenchError(f"a dataset with {n} image pair(s) cannot be split into train and test; "
                         "it needs at least 2 pairs")
    n_test = min(n - 1, max(1, round(test_share * n)))
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_test:]).astype(np.int64), np.sort(order[:n_test]).astype(np.int64)


def seeded_split_name(seed: int, test_share: float = TEST_SHARE) -> str:
    train_pct = round(100 * (1 - test_share))
    return f"seeded {train_pct}/{100 - train_pct} (seed {seed})"


def label_fraction(train: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """The labelled subset (sorted int64 indices) of ``train`` for ``fraction`` and ``seed``; nested."""
    try:
        value = float(fraction)
    except (TypeError, ValueError):
        value = math.nan
    if not 0 < value <= 1:  # also rejects NaN
        raise BenchError(f"fraction {fraction} is not in (0, 1]; use e.g. 0.05")
    pool = np.sort(np.asarray(train, dtype=np.int64))
    if pool.size == 0:
        raise BenchError(f"fraction {fraction} selects no image: the training split is empty; "
                         "check the dataset's split")
    k = max(1, math.ceil(value * pool.size - 1e-9))
    order = np.random.default_rng(seed).permutation(pool.size)
    return np.sort(pool[order[:k]])


def split_hash(indices: np.ndarray) -> str:
    """Short hash (12 hex digits) of an index set; order-insensitive, recorded in cell records."""
    canonical = np.sort(np.asarray(indices, dtype=np.int64)).astype("<i8")
    return hashlib.sha256(canonical.tobytes()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------
# User split files: ``id,split`` (train/test per image) or ``id,group`` (a grouped seeded split)

_SPLIT_VALUES = {"train": "train", "training": "train", "test": "test", "testing": "test"}
_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".ppm", ".pgm")


@dataclass(frozen=True)
class SplitFile:
    """A parsed split file: ``column`` is "split" or "group"; ``values`` maps image id → value."""

    path: Path
    column: str
    values: dict[str, str]
    digest: str   # first 8 hex digits of the file's sha256: the split's name changes with the file


def read_split_file(path: str | Path) -> SplitFile:
    """Parse a CSV with a header ``id,split`` or ``id,group``; BenchError on anything else."""
    path = Path(path).expanduser()
    try:
        raw = path.read_bytes()
        rows = list(csv.reader(io.StringIO(raw.decode("utf-8-sig"))))
    except (OSError, UnicodeDecodeError) as err:
        raise BenchError(f"cannot read split file {path} ({type(err).__name__}); give a UTF-8 CSV "
                         "with a header id,split or id,group") from None
    header = [cell.strip().lower() for cell in rows[0]] if rows else []
    columns = [c for c in ("split", "group") if c in header]
    if "id" not in header or len(columns) != 1:
        raise BenchError(f"split file {path} has the header {','.join(header) or '(none)'}; it needs id and one "
                         "of split (train/test per image) or group (e.g. the video sequence)")
    id_col, value_col = header.index("id"), header.index(columns[0])
    values: dict[str, str] = {}
    for number, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(id_col, value_col):
            raise BenchError(f"split file {path}, line {number}: {len(row)} column(s); expected {len(header)}")
        key, value = row[id_col].strip(), row[value_col].strip()
        if columns[0] == "split":
            if value.lower() not in _SPLIT_VALUES:
                raise BenchError(f"split file {path}, line {number}: split {value!r}; use train or test")
            value = _SPLIT_VALUES[value.lower()]
        if key in values and values[key] != value:
            raise BenchError(f"split file {path}: id {key!r} is listed twice with {values[key]!r} and {value!r}")
        values[key] = value
    if not values:
        raise BenchError(f"split file {path} lists no images")
    return SplitFile(path, columns[0], values, hashlib.sha256(raw).hexdigest()[:8])


def _strip_extension(key: str) -> str:
    suffix = Path(key).suffix
    return key[: -len(suffix)] if suffix.lower() in _EXTENSIONS else key


def _lookup(values: dict[str, str], ids: list[str]) -> tuple[list[str], int]:
    """The value of every id (listed as the id or as its file name), and how many file rows went unused."""
    by_id = {**{_strip_extension(key): value for key, value in values.items()}, **values}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise BenchError(f"the split file gives nothing for {len(missing)} of {len(ids)} image(s) "
                         f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); list every image id "
                         "(the image file name without its extension)")
    known = set(ids)
    unused = sum(1 for key in values if key not in known and _strip_extension(key) not in known)
    return [by_id[i] for i in ids], unused


def grouped_split(groups: list[str], test_share: float = TEST_SHARE, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices with whole groups on one side: the groups, sorted naturally and permuted
    with ``seed``, go to the test side until it holds at least ``round(test_share · n)`` images."""
    names = sorted(set(groups), key=natural_key)
    if len(names) < 2:
        raise BenchError(f"a grouped split needs at least 2 groups; the split file gives {len(names)}")
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    sizes = {name: groups.count(name) for name in names}
    target, chosen, count = max(1, round(test_share * len(groups))), set(), 0
    for name in order[:-1]:          # at least one group stays on the training side
        if count >= target:
            break
        chosen.add(name)
        count += sizes[name]
    test = np.array([i for i, g in enumerate(groups) if g in chosen], np.int64)
    train = np.array([i for i, g in enumerate(groups) if g not in chosen], np.int64)
    return train, test


def apply_split_file(split_file: SplitFile, ids: list[str], seed: int = 0) -> tuple[np.ndarray, np.ndarray, str,
                                                                                      list[str]]:
    """(train, test, split name, notes) of the dataset ``ids`` under the split file."""
    values, unused = _lookup(split_file.values, ids)
    notes = [f"{unused} id(s) of split file {split_file.path.name} are not in this dataset: ignored"] if unused else []
    label = f"{split_file.path.name} (sha {split_file.digest})"
    if split_file.column == "split":
        train = np.array([i for i, v in enumerate(values) if v == "train"], np.int64)
        test = np.array([i for i, v in enumerate(values) if v == "test"], np.int64)
        if not train.size or not test.size:
            raise BenchError(f"split file {split_file.path} puts no image on the {'test' if train.size else 'train'} "
                             "side; give both train and test images")
        return train, test, f"split file {label}", notes
    train, test = grouped_split(values, seed=seed)
    groups = len(set(values))
    return train, test, f"grouped by {label}: {groups} groups, {seeded_split_name(seed)}", notes
