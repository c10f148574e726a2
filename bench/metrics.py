"""Per-image binary segmentation metrics (docs/architecture.md, "Evaluation"): IoU, Dice, precision, recall, HD95.

Foreground class only, one value per image, so that statistics can be recomputed from the records.
With TP, FP, FN the pixel counts of an image:

- IoU (Jaccard) = TP / (TP + FP + FN); Dice = 2·TP / (2·TP + FP + FN);
- precision = TP / (TP + FP); recall = TP / (TP + FN);
- HD95 = medpy's ``hd95`` (``medpy.metric.binary``, connectivity 1): the surface of a mask is the
  mask minus its erosion by the 4-neighbourhood cross (pixels on the image border count as surface);
  the distances from each surface pixel of one mask to the nearest surface pixel of the other (exact
  Euclidean distances, as medpy's distance transform gives them) are pooled over *both* directions
  and the 95th percentile (numpy's linear interpolation) of the pooled set is taken, in pixels.
  (MONAI's ``compute_hausdorff_distance(percentile=95)`` instead takes the larger of the two
  directed 95th percentiles.)

Empty-mask conventions: empty prediction and empty truth → IoU = Dice = precision = recall = 1,
HD95 = 0. Exactly one empty → IoU = Dice = 0, HD95 = the image diagonal √(H² + W²). A ratio whose
denominator is 0 (precision with an empty prediction, recall with an empty truth) is 1 when the other
mask is empty too and 0 when it is not.

Example:
    >>> import numpy as np
    >>> pred = np.zeros((1, 8, 8), bool); pred[0, 1:5, 1:5] = True
    >>> truth = np.zeros((1, 8, 8), bool); truth[0, 2:6, 2:6] = True
    >>> round(float(segmentation_metrics(pred, truth)["iou"][0]), 4)  # 9 / 23
    0.3913
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree
from torch import Tensor

from bench.errors import BenchError

KEYS = ("iou", "dice", "precision", "recall", "hd95")

def _as_bool_stack(masks: np.ndarray | Tensor, name: str) -> np.ndarray:
    if isinstance(masks, Tensor):
        masks = masks.detach().cpu().numpy()
    masks = np.asarray(masks)
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3:
        raise BenchError(f"{name} must be (N, H, W) binary masks, got shape {masks.shape}")
    if masks.dtype != bool:
        if not ((masks == 0) | (masks == 1)).all():
            raise BenchError(f"{name} must be binary (bool or 0/1); threshold probabilities first")
        masks = masks.astype(bool)
    return masks


def _ratio(num: np.ndarray, den: np.ndarray, other_empty: np.ndarray) -> np.ndarray:
    """num / den, with 0/0 := 1 when the other mask is empty too and 0 otherwise."""
    safe = np.where(den > 0, den, 1)
    return np.where(den > 0, num / safe, np.where(other_empty, 1.0, 0.0))


def surface(masks: np.ndarray) -> np.ndarray:
    """Surface pixels of (..., H, W) bool masks: the mask minus its erosion by the 4-neighbourhood
    cross, outside the image counting as background (``binary_erosion``'s ``border_value=0``)."""
    padded = np.pad(masks, [(0, 0)] * (masks.ndim - 2) + [(1, 1), (1, 1)])
    interior = (padded[..., :-2, 1:-1] & padded[..., 2:, 1:-1]  # up and down neighbours
                & padded[..., 1:-1, :-2] & padded[..., 1:-1, 2:])  # left and right neighbours
    return masks & ~interior


def _hd95_one(pred: np.ndarray, true: np.ndarray) -> float:
    """medpy's hd95 of one (H, W) pair, both non-empty.

    The distance from each surface pixel of one mask to the nearest surface pixel of the other is an
    exact Euclidean nearest-neighbour query (``cKDTree``): the same numbers as medpy's
    ``distance_transform_edt(~other_surface)[surface]``, 10–25× faster on noisy 352² predictions.
    """
    p_points, t_points = np.argwhere(surface(pred)), np.argwhere(surface(true))
    to_truth, _ = cKDTree(t_points).query(p_points)
    to_pred, _ = cKDTree(p_points).query(t_points)
    return float(np.percentile(np.concatenate([to_truth, to_pred]), 95))


def hd95(pred: np.ndarray | Tensor, target: np.ndarray | Tensor) -> np.ndarray:
    """Per-image HD95 (N,) in pixels with the empty-mask conventions of the module docstring."""
    p, t = _as_bool_stack(pred, "pred"), _as_bool_stack(target, "target")
    _check_shapes(p, t)
    _, height, width = p.shape
    p_any, t_any = p.any(axis=(1, 2)), t.any(axis=(1, 2))
    out = np.where(p_any | t_any, np.hypot(height, width), 0.0)
    for i in np.flatnonzero(p_any & t_any):
        out[i] = _hd95_one(p[i], t[i])
    return out


def _check_shapes(p: np.ndarray, t: np.ndarray) -> None:
    if p.shape != t.shape:
        raise BenchError(f"prediction shape {p.shape} differs from target shape {t.shape}; "
                         "evaluate at the masks' resolution")


def segmentation_metrics(pred: np.ndarray | Tensor, target: np.ndarray | Tensor) -> dict[str, np.ndarray]:
    """Per-image IoU, Dice, precision, recall and HD95 of (N, H, W) binary masks: each (N,) float64."""
    p, t = _as_bool_stack(pred, "pred"), _as_bool_stack(target, "target")
    _check_shapes(p, t)
    tp = (p & t).sum(axis=(1, 2)).astype(np.float64)
    n_pred = p.sum(axis=(1, 2)).astype(np.float64)
    n_true = t.sum(axis=(1, 2)).astype(np.float64)
    fp, fn = n_pred - tp, n_true - tp
    pred_empty, true_empty = n_pred == 0, n_true == 0
    return {
        "iou": _ratio(tp, tp + fp + fn, pred_empty & true_empty),
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, pred_empty & true_empty),
        "precision": _ratio(tp, n_pred, true_empty),
        "recall": _ratio(tp, n_true, pred_empty),
        "hd95": hd95(p, t),
    }


def summarize(per_image: dict[str, np.ndarray]) -> dict[str, float]:
    """Means over images of every per-image metric, plus the headline names ``miou`` (mean IoU,
    the polyp-benchmark convention and the default ranking metric) and ``mdice`` (mean Dice)."""
    means = {key: float(np.mean(values)) if len(values) else float("nan")
             for key, values in per_image.items()}
    if "iou" in means:
        means["miou"] = means["iou"]
    if "dice" in means:
        means["mdice"] = means["dice"]
    return means
