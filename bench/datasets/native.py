"""Masks at each image's own resolution, stored compactly: bit-packed, then zlib-compressed, per mask.

A 574×500 polyp mask packs to 36 kB and compresses to 0.2–2 kB, so a few hundred test masks cost
under a few MB in the cache. ``NativeMasks`` keeps one ``blob`` (uint8) and an ``index`` with one
row per mask: (offset, length, H, W, foreground pixels); ``mask(i)`` decompresses one on demand.
Synthetic data has one resolution: ``NativeMasks.from_resized(masks)`` serves the S×S masks themselves.

Example:
    >>> native = NativeMasks.pack([np.eye(3, dtype=bool)])
    >>> native.mask(0).tolist() == np.eye(3, dtype=bool).tolist(), native.size(0), native.fraction(0)
    (True, (3, 3), 0.3333333333333333)
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

INDEX_COLUMNS = 5   # offset, length, H, W, foreground pixels


def pack_one(mask: np.ndarray) -> tuple[bytes, int, int, int]:
    """(compressed bits, H, W, foreground pixels) of one (H, W) mask."""
    mask = np.asarray(mask, bool)
    return zlib.compress(np.packbits(mask, axis=None).tobytes(), 6), mask.shape[0], mask.shape[1], int(mask.sum())


class NativeMasks:
    """Per-image binary masks at their original H×W (``resized`` when they are the S×S masks)."""

    def __init__(self, blob: np.ndarray | None, index: np.ndarray | None, dense: np.ndarray | None = None):
        self.blob, self._dense = blob, dense
        self.index = np.asarray(index, np.int64) if index is not None else None

    @classmethod
    def pack(cls, masks: Sequence[np.ndarray]) -> NativeMasks:
        return cls.from_packed([pack_one(mask) for mask in masks])

    @classmethod
    def from_packed(cls, packed: Sequence[tuple[bytes, int, int, int]]) -> NativeMasks:
        """From ``pack_one`` results, in order."""
        rows, offset = [], 0
        for data, h, w, foreground in packed:
            rows.append((offset, len(data), h, w, foreground))
            offset += len(data)
        blob = np.frombuffer(b"".join(item[0] for item in packed), np.uint8).copy()
        return cls(blob, np.array(rows, np.int64).reshape(-1, INDEX_COLUMNS))

    @classmethod
    def concat(cls, parts: Sequence[NativeMasks]) -> NativeMasks:
        """One collection of all masks of ``parts``, in order (resized ones are packed as they are)."""
        packed = [part if not part.resized else cls.pack([part.mask(i) for i in range(len(part))]) for part in parts]
        blobs, indices, offset = [], [], 0
        for part in packed:
            chunk = b"".join(part.blob[o:o + n].tobytes() for o, n in part.index[:, :2])
            index = part.index.copy()
            if len(index):
                index[:, 0] = offset + np.concatenate([[0], np.cumsum(index[:-1, 1])])
            blobs.append(chunk)
            indices.append(index)
            offset += len(chunk)
        blob = np.frombuffer(b"".join(blobs), np.uint8).copy()
        return cls(blob, np.concatenate(indices) if indices else np.zeros((0, INDEX_COLUMNS), np.int64))

    @classmethod
    def from_resized(cls, masks: np.ndarray) -> NativeMasks:
        """The (N, S, S) masks themselves: native and resized agree (synthetic data)."""
        return cls(None, None, masks)

    @property
    def resized(self) -> bool:
        """True when these are the working-size masks (no separate original resolution)."""
        return self._dense is not None

    def __len__(self) -> int:
        return len(self._dense) if self._dense is not None else len(self.index)

    def mask(self, i: int) -> np.ndarray:
        """(H, W) bool."""
        if self._dense is not None:
            return np.asarray(self._dense[i]) != 0
        offset, length, h, w, _ = (int(v) for v in self.index[i])
        bits = np.frombuffer(zlib.decompress(self.blob[offset:offset + length].tobytes()), np.uint8)
        return np.unpackbits(bits, count=h * w).reshape(h, w).astype(bool)

    def size(self, i: int) -> tuple[int, int]:
        """(H, W) of mask ``i``."""
        if self._dense is not None:
            return int(self._dense.shape[1]), int(self._dense.shape[2])
        return int(self.index[i, 2]), int(self.index[i, 3])

    def fraction(self, i: int) -> float:
        """Foreground share of mask ``i`` at its own resolution (no decompression)."""
        if self._dense is not None:
            return float(np.count_nonzero(self._dense[i])) / self._dense[i].size
        return float(self.index[i, 4]) / max(1, int(self.index[i, 2] * self.index[i, 3]))

    def fractions(self) -> np.ndarray:
        if self._dense is not None:
            flat = np.asarray(self._dense).reshape(len(self._dense), -1)
            return np.count_nonzero(flat, axis=1) / max(1, flat.shape[1])
        area = np.maximum(1, self.index[:, 2] * self.index[:, 3])
        return self.index[:, 4] / area

    def subset(self, indices: Sequence[int] | np.ndarray) -> NativeMasks:
        """The masks at ``indices`` (the blob is shared, not copied)."""
        indices = np.asarray(indices, np.int64)
        if self._dense is not None:
            return NativeMasks.from_resized(self._dense[indices])
        return NativeMasks(self.blob, self.index[indices])

    @property
    def nbytes(self) -> int:
        if self._dense is not None:
            return int(self._dense.nbytes)
        return int(self.index[:, 1].sum())
