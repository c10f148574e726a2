"""The predictions figure papers show: image | ground truth | each method's prediction, with its IoU.

A run keeps each cell's test-set predictions in ``<out>/predictions/<cell-id>.npz`` (docs/reports.md):

- ``test_ids`` (n,): the test images' identifiers, the same for every method of a dataset split;
- ``shapes`` (n, 2): each mask's height and width, and ``masks``: the masks' bits, each mask
  ``np.packbits(mask.ravel())`` in turn (padded to whole bytes) — masks of different sizes (native
  evaluation) fit; or ``shape`` (3,) = (n, H, W) and ``masks`` = ``np.packbits`` of the whole stack;
- optionally ``iou`` (n,): each image's IoU as the cell scored it.

The rows are a handful of test images chosen the same for every method: spread evenly over the IoU
range of the baseline (``scratch`` where present), so that easy and hard cases both appear. Images and
ground truths are not in the run folder: the caller passes them as arrays, so reports load no dataset
and import no training code; without them the figure shows the predictions alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from bench.errors import BenchError
from bench.reports.cd import wrap_label
from bench.reports.figures import FONT, new_figure

Masks = dict[str, np.ndarray]  # test id → (H, W) bool


def read_predictions(path: Path) -> tuple[Masks, dict[str, float]]:
    """The masks (test id → (H, W) bool) and the recorded per-image IoUs (possibly empty) of one cell."""
    try:
        with np.load(path, allow_pickle=False) as z:
            ids = [str(i) for i in z["test_ids"].tolist()]
            bits = z["masks"]
            if "shapes" in z:
                masks = _unpack_each(bits, z["shapes"].astype(int))
            elif "shape" in z:
                shape = tuple(int(v) for v in z["shape"])
                masks = list(np.unpackbits(bits, count=int(np.prod(shape))).reshape(shape).astype(bool))
            else:
                raise KeyError("shapes")
            iou = z["iou"].astype(float).tolist() if "iou" in z else []
    except (OSError, ValueError, KeyError) as err:
        raise BenchError(f"cannot read predictions {path} ({err}): it needs test_ids, masks and shapes "
                         "(see docs/reports.md); delete it or rerun the cell") from None
    if len(masks) != len(ids):
        raise BenchError(f"{path}: {len(ids)} test ids but {len(masks)} masks; delete it or rerun the cell")
    return dict(zip(ids, masks, strict=True)), dict(zip(ids, iou, strict=False)) if iou else {}


def _unpack_each(bits: np.ndarray, shapes: np.ndarray) -> list[np.ndarray]:
    out, start = [], 0
    for h, w in shapes:
        nbytes = -(-(h * w) // 8)
        out.append(np.unpackbits(bits[start:start + nbytes], count=h * w).reshape(h, w).astype(bool))
        start += nbytes
    return out


def pack_predictions(path: Path, masks: Sequence[np.ndarray], test_ids: Sequence, iou: Sequence[float] | None = None
                     ) -> Path:
    """Write masks in the layout ``read_predictions`` reads (for tests and for the run layer)."""
    shapes = np.array([m.shape for m in masks], dtype=np.int32).reshape(-1, 2)
    bits = np.concatenate([np.packbits(np.asarray(m, dtype=bool).ravel()) for m in masks]) if len(masks) \
        else np.zeros(0, np.uint8)
    extra = {"iou": np.asarray(iou, dtype=np.float32)} if iou is not None else {}
    np.savez_compressed(path, test_ids=np.asarray([str(i) for i in test_ids]), shapes=shapes, masks=bits, **extra)
    return path


def mask_iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Foreground IoU; both empty → 1, exactly one empty → 0 (the convention of the cell's metrics)."""
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape:
        raise BenchError(f"prediction {pred.shape} and ground truth {truth.shape} differ in size")
    union = np.logical_or(pred, truth).sum()
    return 1.0 if union == 0 else float(np.logical_and(pred, truth).sum() / union)


def choose_images(baseline_iou: Mapping[str, float], n: int = 4, among: Sequence[str] | None = None) -> list[str]:
    """``n`` test ids spread evenly over the baseline's IoU range (lowest, …, highest), in that order."""
    ids = [i for i in (among if among is not None else baseline_iou) if i in baseline_iou
           and math.isfinite(baseline_iou[i])]
    ranked = sorted(ids, key=lambda i: (baseline_iou[i], i))
    if len(ranked) <= n:
        return ranked
    picks = np.unique(np.round(np.linspace(0, len(ranked) - 1, n)).astype(int))
    return [ranked[p] for p in picks]


def predictions_figure(rows: Sequence[str], predictions: Mapping[str, Masks], ious: Mapping[str, Mapping[str, float]],
                       width: float, images: Mapping[str, np.ndarray] | None = None,
                       truths: Mapping[str, np.ndarray] | None = None) -> Figure:
    """Rows: test images; columns: image, ground truth (when given), then each method's prediction with
    its IoU in the corner. ``predictions[method][test_id]`` (H, W) bool; ``ious[method][test_id]``."""
    methods = list(predictions)
    lead = [c for c, have in (("image", images), ("ground truth", truths)) if have is not None]
    n_cols = len(lead) + len(methods)
    cell = width / n_cols
    first = predictions[methods[0]] if methods else truths or {}
    aspect = float(np.median([first[i].shape[0] / first[i].shape[1] for i in rows])) if rows and first else 1.0
    fig = new_figure(width, cell * aspect * len(rows) + 0.35, layout=None)
    grid = fig.add_gridspec(len(rows), n_cols, left=0.0, right=1.0, bottom=0.0, top=1 - 0.35 / fig.get_figheight(),
                            wspace=0.04, hspace=0.04)
    size = max(5.0, min(FONT - 1, cell * 72 / 9))
    for r, test_id in enumerate(rows):
        panels = []
        if images is not None:
            panels.append(("image", _rgb(images[test_id]), None))
        if truths is not None:
            panels.append(("ground truth", np.asarray(truths[test_id], dtype=bool), None))
        panels += [(m, predictions[m][test_id], ious.get(m, {}).get(test_id)) for m in methods]
        for c, (title, pixels, iou) in enumerate(panels):
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(pixels, cmap=None if pixels.ndim == 3 else "gray", vmin=0, vmax=1 if pixels.ndim == 2 else None,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(wrap_label(title, 14), fontsize=size, pad=2)
            if iou is not None and math.isfinite(iou):
                ax.text(0.03, 0.97, f"{iou:.2f}", transform=ax.transAxes, ha="left", va="top", fontsize=size,
                        color="black", bbox={"boxstyle": "square,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})
    return fig


def _rgb(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) or (3, H, W) uint8/float → (H, W, 3) in [0, 1]; grey (H, W) → RGB."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    a = a.astype(float)
    return a / 255.0 if a.max(initial=0.0) > 1.0 else a
