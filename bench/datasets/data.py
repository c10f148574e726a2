"""What loading returns: ``SegmentationData`` (and its training-pool and test-set forms), mask statistics
and the mask sanity check (docs/datasets.md)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.datasets.decode import KINDS
from bench.datasets.native import NativeMasks
from bench.errors import BenchError


@dataclass(frozen=True)
class MaskStats:
    """Foreground share of the masks at their own resolution: min / median / max, empty and full counts."""

    n: int
    min: float
    median: float
    max: float
    empty: int
    full: int

    @classmethod
    def of(cls, fractions: np.ndarray) -> MaskStats:
        f = np.asarray(fractions, np.float64)
        if f.size == 0:
            return cls(0, 0.0, 0.0, 0.0, 0, 0)
        return cls(int(f.size), float(f.min()), float(np.median(f)), float(f.max()), int((f <= 0).sum()),
                   int((f >= 1).sum()))

    def describe(self) -> str:
        return (f"foreground min {100 * self.min:.1f}% / median {100 * self.median:.1f}% / max {100 * self.max:.1f}%, "
                f"{self.empty} empty, {self.full} full (of {self.n})")


def kinds_note(kinds: dict[str, int]) -> str:
    """"masks read as: 380 two-level, 20 noisy grey ..." (how the mask rule read them)."""
    return "masks read as: " + ", ".join(f"{count} {kind}" for kind, count in kinds.items() if count)


def kind_counts(codes: np.ndarray) -> dict[str, int]:
    counts = np.bincount(np.asarray(codes, np.int64), minlength=len(KINDS))
    return {KINDS[i]: int(c) for i, c in enumerate(counts) if c}


@dataclass
class SegmentationData:
    name: str                 # registry name or layout name, e.g. "synthetic-polyp", "kvasir-seg"
    images: np.ndarray        # (N, 3, S, S) uint8, resized to the working size S
    masks: np.ndarray         # (N, S, S) uint8 in {0, 1}
    ids: list[str]            # one id per image (file stem or synthetic index)
    train: np.ndarray         # int64 indices of the training split
    test: np.ndarray          # int64 indices of the test split
    split: str                # "official", e.g. "seeded 80/20 (seed 0)", or the split file's name
    fingerprint: str          # short hash of the source files and how they were decoded (or of the generator)
    notes: list[str] = field(default_factory=list)   # what the reader left out or decided, and why
    native: NativeMasks | None = None   # per image, the mask at its original H×W (None: the S×S masks)
    mask_rule: str = "auto"             # the rule the masks were decoded with
    mask_kinds: dict[str, int] = field(default_factory=dict)   # how ``auto`` read them (kind → count)

    def __post_init__(self) -> None:
        if self.native is None:
            self.native = NativeMasks.from_resized(self.masks)

    @property
    def native_is_resized(self) -> bool:
        """True when the data has one resolution (synthetic): native masks are the S×S masks."""
        return self.native.resized

    def native_mask(self, i: int) -> np.ndarray:
        """(H, W) bool: mask ``i`` at its image's original resolution."""
        return self.native.mask(int(i))

    def native_size(self, i: int) -> tuple[int, int]:
        """(H, W) of image ``i`` as stored on disk."""
        return self.native.size(int(i))

    def mask_stats(self, indices: np.ndarray | None = None) -> MaskStats:
        """Foreground statistics of all masks (or of ``indices``), at their own resolution."""
        fractions = self.native.fractions()
        return MaskStats.of(fractions if indices is None else fractions[np.asarray(indices, np.int64)])

    def part(self, indices: np.ndarray) -> dict:
        """The fields of a dataset holding only ``indices`` (to build a ``TestSet`` or ``TrainingPool``)."""
        indices = np.asarray(indices, np.int64)
        return dict(name=self.name, images=self.images[indices], masks=self.masks[indices],
                    ids=[self.ids[i] for i in indices], fingerprint=self.fingerprint,
                    native=self.native.subset(indices), mask_rule=self.mask_rule)


@dataclass
class TestSet(SegmentationData):
    """One test set of the generalisation protocol: all of it is ``test``; ``seen`` marks a set whose
    dataset also contributed training images."""

    __test__ = False   # not a pytest class
    seen: bool = False
    ref: str = ""


@dataclass
class TrainingPool(SegmentationData):
    """The pooled training images of the generalisation protocol: all of it is ``train``.

    ``sources[i]`` indexes ``source_names``: the test-set/ref name each image came from.
    """

    sources: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    source_names: list[str] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        """Training images per source."""
        return {name: int((self.sources == k).sum()) for k, name in enumerate(self.source_names)}


def check_masks(data: SegmentationData, ref: str) -> None:
    """BenchError (one line) when more than half of the masks are empty or all foreground: the masks were
    probably decoded with the wrong rule; the message names what it saw and the override."""
    stats = data.mask_stats()
    if stats.n == 0 or max(stats.empty, stats.full) * 2 <= stats.n:
        return
    empty = stats.empty * 2 > stats.n
    what = f"{stats.empty} of {stats.n} masks are empty" if empty else \
        f"{stats.full} of {stats.n} masks are all foreground"
    kinds = f"; {kinds_note(data.mask_kinds)}" if data.mask_kinds else ""
    base = str(ref).split("?", 1)[0]
    target = base if re.match(r"[A-Za-z][\w.-]+:", base) and not Path(base).exists() else f"LAYOUT:{base}"
    fix = "?mask=nonzero (or mask=label, mask=color=R,G,B)" if empty else \
        "?mask=threshold (or mask=color=R,G,B naming the foreground colour; inverted masks must be fixed)"
    raise BenchError(f"{ref}: {what} ({stats.describe()}; rule {data.mask_rule}{kinds}): the masks are probably "
                     f"stored in a way the decoder misread; force the rule with {target}{fix}, or fix the mask files")


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
    stats: MaskStats | None = None
    parts: dict[str, int] = field(default_factory=dict)
    mask_rule: str = "auto"
    mask_kinds: dict[str, int] = field(default_factory=dict)

    def lines(self) -> list[str]:
        sizes = ", ".join(f"{w}×{h} ({c})" for (w, h), c in sorted(self.image_sizes.items(), key=lambda x: -x[1])[:4])
        more = f", +{len(self.image_sizes) - 4} more sizes" if len(self.image_sizes) > 4 else ""
        stats = self.stats or MaskStats(self.n_pairs, 0.0, 0.0, 0.0, self.empty_masks, 0)
        kinds = f" ({kinds_note(self.mask_kinds)})" if self.mask_kinds else ""
        out = [f"layout      {self.name}", f"root        {self.root or '(generated)'}",
               f"pairs       {self.n_pairs}", f"split       {self.split}: train {self.n_train} / test {self.n_test}",
               f"image sizes {sizes}{more}",
               f"foreground  min {100 * stats.min:.1f}% / median {100 * stats.median:.1f}% / "
               f"max {100 * stats.max:.1f}% (mean {100 * self.foreground:.1f}%)",
               f"masks       {stats.empty} empty, {stats.full} full (of {stats.n}); rule {self.mask_rule}{kinds}"]
        out += [f"part        {name}: {count} pairs" for name, count in self.parts.items()]
        return out + [f"fingerprint {self.fingerprint}", *(f"note        {note}" for note in self.notes)]
