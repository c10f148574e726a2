"""Train/test splits and nested label fractions (DESIGN.md §4), and their hashes for cell records.

- Seeded split: the ids are sorted naturally, permuted with ``numpy.random.default_rng(seed)`` and
  the first ``max(1, round(test_share · n))`` become the test split; the split therefore depends on
  the set of ids and the seed only, never on the order a file system lists them in.
- Label fraction: a seeded permutation of the (sorted) training indices; the labelled subset is its
  first ``k = max(1, ceil(fraction · n))`` entries. The same permutation serves every fraction of a
  seed, so the 5% subset is a prefix of, hence inside, the 10% subset (nested). ``ceil`` (with a
  1e-9 tolerance against float error: 0.05 · 880 selects 44, not 45) guarantees at least the
  requested share.

Example:
    >>> train, test = seeded_split(10, test_share=0.2, seed=0)
    >>> len(train), len(test)
    (8, 2)
    >>> five, ten = label_fraction(train, 0.25, seed=0), label_fraction(train, 0.5, seed=0)
    >>> set(five) <= set(ten)
    True
"""

from __future__ import annotations

import hashlib
import math
import re

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
